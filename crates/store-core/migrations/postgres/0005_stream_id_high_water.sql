-- legacy-version: 9
-- The highest stream ID an in-process counter has ever handed out, per stream.
-- On PostgreSQL stream IDs come from sequences, which never hand a value out
-- twice, so nothing writes here; the table keeps the schema the same as
-- SQLite's, whose counters need it. Only ever moves away from zero. IDs are
-- stored with their sign (negative for backfill), as in `stream_positions`.
CREATE TABLE stream_id_high_water (
    stream_name TEXT NOT NULL PRIMARY KEY,
    stream_id BIGINT NOT NULL
);
