-- Passwords and devices (the client API's login): a password is stored as an
-- Argon2id PHC string, NULL for an account without one; each access token
-- belongs to one of its user's devices (NULL for tokens issued before devices).
ALTER TABLE users ADD COLUMN password_hash TEXT;
ALTER TABLE access_tokens ADD COLUMN device_id TEXT;
CREATE INDEX access_tokens_user_device ON access_tokens (user_id, device_id);

CREATE TABLE devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    last_seen_ts BIGINT NOT NULL
);
CREATE UNIQUE INDEX devices_user_device ON devices (user_id, device_id);
