-- Filters a client stores once and then names in `sync?filter=` by their ID.
CREATE TABLE user_filters (
    user_id TEXT NOT NULL,
    filter_id TEXT NOT NULL,
    filter_json TEXT NOT NULL
);
CREATE UNIQUE INDEX user_filters_user_filter ON user_filters (user_id, filter_id);
