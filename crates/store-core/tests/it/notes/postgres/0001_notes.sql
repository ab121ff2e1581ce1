-- A test crate's first table: version 1, as store-core's first migration is.
CREATE TABLE notes (user_id TEXT NOT NULL, note TEXT NOT NULL);
