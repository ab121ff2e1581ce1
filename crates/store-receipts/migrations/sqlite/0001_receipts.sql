-- legacy-version: 4
-- Read receipts (the `receipts` stream): one current receipt per room, receipt
-- type, user and thread. Names follow Synapse's schema.
CREATE TABLE receipts_linearized (
    stream_id BIGINT NOT NULL,
    instance_name TEXT NOT NULL,
    room_id TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    thread_id TEXT,
    -- The receipt's data, as JSON text.
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX receipts_linearized_stream_id ON receipts_linearized (stream_id);
-- One current receipt per (room, type, user) outside threads and per thread
-- inside them: two indexes, since NULLs never conflict in a unique index.
CREATE UNIQUE INDEX receipts_linearized_unthreaded ON receipts_linearized (room_id, receipt_type, user_id)
    WHERE thread_id IS NULL;
CREATE UNIQUE INDEX receipts_linearized_threaded ON receipts_linearized (room_id, receipt_type, user_id, thread_id)
    WHERE thread_id IS NOT NULL;
CREATE INDEX receipts_linearized_room_stream ON receipts_linearized (room_id, stream_id);
CREATE INDEX receipts_linearized_user_room ON receipts_linearized (user_id, room_id, receipt_type);
-- Replication catch-up reads one writer's rows above a position.
CREATE INDEX receipts_linearized_instance_stream ON receipts_linearized (instance_name, stream_id);

-- SQLite has no sequences: IDs come from an in-process counter (one process).

