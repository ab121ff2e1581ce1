-- legacy-version: 3
-- Events, the current state of rooms and room memberships (the `events` and
-- `backfill` streams). Names follow Synapse's schema.
-- `stream_ordering` comes from the multi-writer `events` stream (positive) or,
-- for backfilled history, the `backfill` stream (negative).
CREATE TABLE events (
    stream_ordering BIGINT NOT NULL,
    instance_name TEXT NOT NULL,
    event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT,
    sender TEXT NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    -- The event's content, as JSON text.
    content TEXT NOT NULL
);
CREATE UNIQUE INDEX events_stream_ordering ON events (stream_ordering);
CREATE UNIQUE INDEX events_event_id ON events (event_id);
-- Room timelines and replication catch-up (one writer's rows above a position).
CREATE INDEX events_room_stream ON events (room_id, stream_ordering);
CREATE INDEX events_instance_stream ON events (instance_name, stream_ordering);

-- The current state of each room: one event per (type, state_key). Writers may
-- commit out of order, so the row keeps the stream ordering of its event and
-- only a later one replaces it.
CREATE TABLE current_state_events (
    event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    membership TEXT,
    stream_ordering BIGINT NOT NULL
);
CREATE UNIQUE INDEX current_state_events_room_type_key ON current_state_events (room_id, type, state_key);
CREATE INDEX current_state_events_member ON current_state_events (state_key) WHERE type = 'm.room.member';

-- Every membership event, for history and per-user queries.
CREATE TABLE room_memberships (
    event_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    room_id TEXT NOT NULL,
    membership TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL
);
CREATE UNIQUE INDEX room_memberships_event_id ON room_memberships (event_id);
CREATE INDEX room_memberships_user_id ON room_memberships (user_id);
CREATE INDEX room_memberships_room_id ON room_memberships (room_id);

-- Readers take ID 1 as already persisted: the first real IDs are 2 and -2.
CREATE SEQUENCE events_stream_seq;
SELECT nextval('events_stream_seq');
CREATE SEQUENCE events_backfill_stream_seq;
SELECT nextval('events_backfill_stream_seq');
