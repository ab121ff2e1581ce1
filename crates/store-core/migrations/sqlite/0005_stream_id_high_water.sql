-- legacy-version: 9
-- The highest stream ID an in-process counter has ever handed out, per stream:
-- SQLite has no sequences, so this is what keeps a restarted process from
-- handing out an ID again that it allocated and then abandoned (rolled back, or
-- committed without a row carrying it) after its last recorded write.
-- A generator writes it in the transaction that uses the ID, or in a small
-- transaction of its own before an abandoned ID may count as finished, and
-- start-up counts from above it. Only ever moves away from zero. IDs are stored
-- with their sign (negative for backfill), as in `stream_positions`.
CREATE TABLE stream_id_high_water (
    stream_name TEXT NOT NULL PRIMARY KEY,
    stream_id BIGINT NOT NULL
);
