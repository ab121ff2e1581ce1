-- Accounts and their access tokens (the client API's registration and Bearer
-- authentication), and the transaction IDs of client sends. Names follow
-- Synapse's schema.
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

-- `PUT /rooms/{roomId}/send/{type}/{txnId}` is idempotent per user and
-- transaction ID: the row is written in the transaction that persists the
-- event, so a retry after a crash finds it or finds nothing.
CREATE TABLE event_txn_id (
    user_id TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    inserted_ts BIGINT NOT NULL
);
CREATE UNIQUE INDEX event_txn_id_user_txn ON event_txn_id (user_id, txn_id);
