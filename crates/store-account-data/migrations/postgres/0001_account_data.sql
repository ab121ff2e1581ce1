-- legacy-version: 5
-- Account data (the `account_data` stream): one current value per user, room
-- and type, where a NULL room means the user's global account data. Synapse
-- keeps global and room data in two tables; one table with a nullable room keeps
-- one stream table for the generator and one catch-up query.
CREATE TABLE account_data (
    stream_id BIGINT NOT NULL,
    instance_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    -- NULL for global account data.
    room_id TEXT,
    account_data_type TEXT NOT NULL,
    -- The content, as JSON text.
    content TEXT NOT NULL
);
CREATE UNIQUE INDEX account_data_stream_id ON account_data (stream_id);
-- One current value per (user, type) globally and per (user, room, type) in
-- rooms: two indexes, since NULLs never conflict in a unique index. They also
-- serve the reads of a user's global data and of a user's data in one room.
CREATE UNIQUE INDEX account_data_global ON account_data (user_id, account_data_type)
    WHERE room_id IS NULL;
CREATE UNIQUE INDEX account_data_room ON account_data (user_id, room_id, account_data_type)
    WHERE room_id IS NOT NULL;
-- Replication catch-up reads one writer's rows above a position.
CREATE INDEX account_data_instance_stream ON account_data (instance_name, stream_id);

-- Readers take ID 1 as already persisted: the first real ID is 2.
CREATE SEQUENCE account_data_sequence;
SELECT nextval('account_data_sequence');
