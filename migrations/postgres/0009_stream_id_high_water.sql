-- The highest stream ID an in-process counter has ever handed out, per stream.
-- Streams of several writers take their IDs from sequences here, which never
-- hand a value out twice, and never touch this table. It serves the one
-- generator that counts in process on PostgreSQL too, `SingleWriterIdGenerator`,
-- so that a restart never hands out again an ID it allocated and abandoned.
-- Only ever moves away from zero. IDs are stored with their sign (negative for
-- backfill), as in `stream_positions`.
CREATE TABLE stream_id_high_water (
    stream_name TEXT NOT NULL PRIMARY KEY,
    stream_id BIGINT NOT NULL
);
