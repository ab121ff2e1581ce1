-- legacy-version: 2
-- The `caches` stream's table, kept for schema parity with PostgreSQL. A SQLite
-- deployment is one process, so no row is ever written: invalidations stay local.
-- Keys would be a JSON array (SQLite has no arrays).
CREATE TABLE cache_invalidation_stream_by_instance (
    stream_id BIGINT NOT NULL,
    instance_name TEXT NOT NULL,
    cache_func TEXT NOT NULL,
    keys TEXT,
    invalidation_ts BIGINT
);

CREATE UNIQUE INDEX cache_invalidation_stream_by_instance_id
    ON cache_invalidation_stream_by_instance (stream_id);
CREATE INDEX cache_invalidation_stream_by_instance_instance_index
    ON cache_invalidation_stream_by_instance (instance_name, stream_id);
