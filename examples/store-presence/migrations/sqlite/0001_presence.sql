-- The `presence` stream: each user's current presence, one row per user,
-- replaced by a later stream ID.
CREATE TABLE presence_stream (
    stream_id BIGINT NOT NULL,
    instance_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    state TEXT NOT NULL,
    status_msg TEXT,
    last_active_ts BIGINT NOT NULL
);
CREATE UNIQUE INDEX presence_stream_user ON presence_stream (user_id);
CREATE UNIQUE INDEX presence_stream_id ON presence_stream (stream_id);
-- Replication catch-up reads one writer's rows above a position.
CREATE INDEX presence_stream_instance_stream ON presence_stream (instance_name, stream_id);

-- SQLite has no sequences: IDs come from an in-process counter (one process).
