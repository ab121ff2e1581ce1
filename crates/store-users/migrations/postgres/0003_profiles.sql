-- Users' profiles (the client API's `/profile`): the display name, set to the
-- localpart at registration; the avatar is not stored yet.
CREATE TABLE profiles (
    user_id TEXT NOT NULL,
    displayname TEXT
);
CREATE UNIQUE INDEX profiles_user_id ON profiles (user_id);
