-- Where each instance of the deployment answers HTTP (`HOST:PORT`), as it
-- recorded itself at start-up: a process forwarding a write to a writer its
-- `[instance_map]` does not name finds the writer's address here.
CREATE TABLE instance_addresses (
    instance_name TEXT NOT NULL PRIMARY KEY,
    http_address TEXT NOT NULL,
    recorded_ts BIGINT NOT NULL
);
