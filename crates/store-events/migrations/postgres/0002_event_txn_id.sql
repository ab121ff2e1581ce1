-- legacy-version: 8
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
