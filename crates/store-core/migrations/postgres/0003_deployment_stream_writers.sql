-- legacy-version: 6
-- Which instances write each stream, as the deployment agreed at start-up
-- (slaved-stores' topology check): the master records its config; any other
-- process must match it or refuses to start. `writers` is a JSON array in the
-- configured order, which matters to anything sharding by writer.
CREATE TABLE deployment_stream_writers (
    stream_name TEXT NOT NULL PRIMARY KEY,
    writers TEXT NOT NULL,
    recorded_by TEXT NOT NULL
);
