-- Its second, version 2 like store-core's second.
CREATE INDEX notes_user ON notes (user_id);
