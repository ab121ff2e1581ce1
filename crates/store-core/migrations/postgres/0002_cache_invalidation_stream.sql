-- legacy-version: 2
-- The `caches` stream: invalidations made by one process, replayed by the others.
-- Any process may write (the stream's generator has no fixed writers and never
-- touches stream_positions: after a restart there are no caches to invalidate).
-- NULL keys mean "the whole cache". Old rows are pruned after a retention period
-- (`[caches] invalidation_retention_days`): Synapse's copy of this table grew to
-- millions of rows.
CREATE TABLE cache_invalidation_stream_by_instance (
    stream_id BIGINT NOT NULL,
    instance_name TEXT NOT NULL,
    cache_func TEXT NOT NULL,
    keys TEXT[],
    invalidation_ts BIGINT
);

CREATE UNIQUE INDEX cache_invalidation_stream_by_instance_id
    ON cache_invalidation_stream_by_instance (stream_id);
-- Catch-up reads one writer's rows above a position.
CREATE INDEX cache_invalidation_stream_by_instance_instance_index
    ON cache_invalidation_stream_by_instance (instance_name, stream_id);

-- Readers take ID 1 as already persisted: the first real ID is 2.
CREATE SEQUENCE cache_invalidation_stream_seq;
SELECT nextval('cache_invalidation_stream_seq');
