-- Elastic writers (see the PostgreSQL migration). SQLite serves one process,
-- the master, which is then every stream's only writer: no fence is needed.
ALTER TABLE deployment_stream_writers ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;
ALTER TABLE deployment_stream_writers ADD COLUMN draining TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deployment_stream_writers ADD COLUMN retired TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deployment_stream_writers ADD COLUMN handover TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deployment_stream_writers ADD COLUMN changed_ts BIGINT NOT NULL DEFAULT 0;

CREATE TABLE stream_writer_acks (
    stream_name TEXT NOT NULL,
    instance_name TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    state TEXT NOT NULL,
    acked_ts BIGINT NOT NULL,
    PRIMARY KEY (stream_name, instance_name)
);

ALTER TABLE instance_addresses ADD COLUMN seen_ts BIGINT NOT NULL DEFAULT 0;
