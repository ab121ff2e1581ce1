-- legacy-version: 8
-- Accounts and their access tokens (the client API's registration and Bearer
-- authentication). Names follow Synapse's schema.
CREATE TABLE users (
    name TEXT NOT NULL,
    creation_ts BIGINT NOT NULL
);
CREATE UNIQUE INDEX users_name ON users (name);

CREATE TABLE access_tokens (
    token TEXT NOT NULL,
    user_id TEXT NOT NULL,
    creation_ts BIGINT NOT NULL
);
CREATE UNIQUE INDEX access_tokens_token ON access_tokens (token);
CREATE INDEX access_tokens_user_id ON access_tokens (user_id);
