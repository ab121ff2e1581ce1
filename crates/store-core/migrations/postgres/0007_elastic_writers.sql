-- Elastic writers: the writers of a stream change at runtime, one epoch at a
-- time (`store_core::writers`). `writers` stays the active list, in order;
-- `draining` and `retired` are JSON objects of the writers taken out of it,
-- each with its final position; `handover` is the position of every writer of
-- the previous epoch at the change, which each process reaches before it
-- takes the new epoch's routing.
ALTER TABLE deployment_stream_writers ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;
ALTER TABLE deployment_stream_writers ADD COLUMN draining TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deployment_stream_writers ADD COLUMN retired TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deployment_stream_writers ADD COLUMN handover TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deployment_stream_writers ADD COLUMN changed_ts BIGINT NOT NULL DEFAULT 0;

-- The epoch each process applied, per stream; `state` is `applied`, or
-- `writing` once a writer of that epoch may allocate.
CREATE TABLE stream_writer_acks (
    stream_name TEXT NOT NULL,
    instance_name TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    state TEXT NOT NULL,
    acked_ts BIGINT NOT NULL,
    PRIMARY KEY (stream_name, instance_name)
);

-- When each process last said it is alive: the processes that must apply an
-- epoch before a new writer allocates are those seen lately.
ALTER TABLE instance_addresses ADD COLUMN seen_ts BIGINT NOT NULL DEFAULT 0;

-- The fence every write of an elastic stream runs first in its transaction:
-- it share-locks the stream's row, which a change of the stream's writers
-- updates, so the change waits for the writes in flight and no write of the
-- old epoch commits after it. A write that finds the row changed since its
-- snapshot fails with a serialization failure (retried, and then refused
-- here); a write routed by an older epoch fails with SQLSTATE HW001. A
-- stream without a record has no epochs to fence.
CREATE FUNCTION stream_writers_fence(stream TEXT, expected BIGINT) RETURNS VOID AS $$
DECLARE
    recorded BIGINT;
BEGIN
    SELECT epoch INTO recorded FROM deployment_stream_writers WHERE stream_name = stream FOR SHARE;
    IF recorded <> expected THEN
        RAISE EXCEPTION 'the writers of % changed: epoch % here, % in the database', stream, expected, recorded
            USING ERRCODE = 'HW001';
    END IF;
END
$$ LANGUAGE plpgsql VOLATILE;
