-- legacy-version: 1
-- Each writer's persisted position per stream: the highest ID up to which
-- everything that writer wrote is finished. Read at start-up instead of
-- scanning the stream tables; written after every write. The caches stream
-- never has rows here: after a restart there are no caches to invalidate.
-- IDs are stored with their sign (negative for backfill).
CREATE TABLE stream_positions (
    stream_name TEXT NOT NULL,
    instance_name TEXT NOT NULL,
    stream_id BIGINT NOT NULL
);

CREATE UNIQUE INDEX stream_positions_idx ON stream_positions (stream_name, instance_name);
