//! Accounts and their access tokens: what registration writes and what Bearer
//! authentication reads on every client request.
//!
//! - [`UsersStore`], used by every process: registering a user, issuing and
//!   revoking access tokens, and the cached token → user lookup.
//!
//! The tables (`users`, `access_tokens`) belong to no stream: a write goes
//! straight to the database from whichever process serves the request, and the
//! only thing other processes must learn of is a revoked token, which travels
//! as an invalidation on the `caches` stream.
//!
//! This crate depends on `store-core` only, never on another domain crate.

#![warn(missing_docs)]

use std::sync::Arc;
use store_core::now_ms;

use rand::Rng;
use rand::distributions::Alphanumeric;
use store_core::{Cache, CachesStream, Database, StoreContext, StoreError, Transaction};

/// This crate's tables (`users` and `access_tokens`), for both engines: what a
/// composition including this crate lists in `Store::migrations`.
pub static MIGRATIONS: store_core::Migrations = store_core::Migrations::new(
    env!("CARGO_PKG_NAME"),
    sqlx::migrate!("migrations/postgres"),
    sqlx::migrate!("migrations/sqlite"),
);

/// The cache of the user an access token belongs to, keyed by the token. The
/// name travels on the `caches` stream, so it is Synapse's.
pub const USER_BY_ACCESS_TOKEN_CACHE: &str = "get_user_by_access_token";

/// What every access token starts with, as Synapse's do, so that a leaked token
/// is recognisable to secret scanners.
const TOKEN_PREFIX: &str = "syt_";

/// Random alphanumeric characters after the prefix: 32 × log2(62) ≈ 190 bits.
const TOKEN_RANDOM_CHARS: usize = 32;

/// Users and access tokens, as every process reads and writes them.
///
/// Every authenticated client request resolves its access token, so
/// [`UsersStore::get_user_by_access_token`] is cached. Only tokens that exist
/// are cached: a client probing with made-up tokens then fills nothing, and a
/// new token needs no invalidation. A revoked token is invalidated in every
/// process through the `caches` stream, so a logout takes effect everywhere once
/// the other processes have applied the stream's rows.
#[derive(Debug)]
pub struct UsersStore {
    db: Database,
    caches: Arc<CachesStream>,
    users_by_token: Arc<Cache<String, String>>,
}

/// A fresh access token: [`TOKEN_PREFIX`] and [`TOKEN_RANDOM_CHARS`] characters
/// from `thread_rng`, a CSPRNG seeded from the operating system.
fn new_access_token() -> String {
    let random: String =
        rand::thread_rng().sample_iter(&Alphanumeric).take(TOKEN_RANDOM_CHARS).map(char::from).collect();
    format!("{TOKEN_PREFIX}{random}")
}

impl UsersStore {
    /// Creates the account `user_id`; `false` when the name is already taken.
    pub async fn register(&self, user_id: &str) -> Result<bool, StoreError> {
        let (user_id, creation_ts) = (user_id.to_owned(), now_ms());
        let inserted = self
            .db
            .run_interaction("register", move |txn| {
                let user_id = user_id.clone();
                Box::pin(async move {
                    // The unique index decides between two registrations racing
                    // for one name, on both engines, without an error to catch.
                    txn.execute(
                        "INSERT INTO users (name, creation_ts) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                        &[&user_id, &creation_ts],
                    )
                    .await
                })
            })
            .await?;
        Ok(inserted == 1)
    }

    /// Whether the account `user_id` exists.
    pub async fn user_exists(&self, user_id: &str) -> Result<bool, StoreError> {
        let user_id = user_id.to_owned();
        self.db
            .run_autocommit("user_exists", move |txn| {
                let user_id = user_id.clone();
                Box::pin(async move {
                    let row = txn.query_opt("SELECT 1 FROM users WHERE name = $1", &[&user_id]).await?;
                    Ok(row.is_some())
                })
            })
            .await
    }

    /// Issues a new access token for `user_id` and returns it. Does not check
    /// that the account exists: the caller has just registered or authenticated
    /// it.
    pub async fn create_access_token(&self, user_id: &str) -> Result<String, StoreError> {
        let (user_id, creation_ts) = (user_id.to_owned(), now_ms());
        self.db
            .run_interaction("create_access_token", move |txn| {
                // A fresh token per attempt; one that collided with an existing
                // token would fail on the unique index rather than be shared.
                let (user_id, token) = (user_id.clone(), new_access_token());
                Box::pin(async move {
                    txn.execute(
                        "INSERT INTO access_tokens (token, user_id, creation_ts) VALUES ($1, $2, $3)",
                        &[&token, &user_id, &creation_ts],
                    )
                    .await?;
                    Ok(token)
                })
            })
            .await
    }

    /// The user `token` belongs to, or `None` for a token that does not exist
    /// (or was revoked). Cached, hits only.
    pub async fn get_user_by_access_token(&self, token: &str) -> Result<Option<String>, StoreError> {
        let key = token.to_owned();
        if let Some(user_id) = self.users_by_token.get(&key) {
            return Ok(Some(user_id));
        }
        // Taken before the read: a revocation committed while it runs voids the
        // ticket, so the read's possibly stale answer is not cached.
        let ticket = self.users_by_token.begin_fill(&key);
        let loaded = self
            .db
            .run_autocommit(USER_BY_ACCESS_TOKEN_CACHE, move |txn| {
                let token = key.clone();
                Box::pin(async move {
                    let row = txn
                        .query_opt("SELECT user_id FROM access_tokens WHERE token = $1", &[&token])
                        .await?;
                    row.map(|row| row.get::<String>(0)).transpose()
                })
            })
            .await;
        match loaded {
            Ok(Some(user_id)) => {
                self.users_by_token.finish_fill(ticket, user_id.clone());
                Ok(Some(user_id))
            }
            Ok(None) => {
                self.users_by_token.cancel_fill(ticket);
                Ok(None)
            }
            Err(err) => {
                self.users_by_token.cancel_fill(ticket);
                Err(err)
            }
        }
    }

    /// Revokes `token` (logout); returns whether it existed.
    ///
    /// The same transaction records an invalidation of the token's cache entry
    /// on the `caches` stream, which this process applies after the commit and
    /// every other process when it applies the stream's rows. It is recorded
    /// even when no row was deleted, so that a token removed some other way is
    /// still dropped from every cache.
    pub async fn delete_access_token(&self, token: &str) -> Result<bool, StoreError> {
        let (caches, token) = (Arc::clone(&self.caches), token.to_owned());
        self.db
            .run_interaction("delete_access_token", move |txn| {
                let (caches, token) = (Arc::clone(&caches), token.clone());
                Box::pin(async move {
                    let deleted =
                        txn.execute("DELETE FROM access_tokens WHERE token = $1", &[&token]).await?;
                    // Also invalidates locally, in a `call_after` of this transaction.
                    caches.invalidate_in_txn(txn, USER_BY_ACCESS_TOKEN_CACHE, Some(vec![token])).await?;
                    Ok(deleted > 0)
                })
            })
            .await
    }
}

impl UsersStore {
    /// Creates the account `user_id` with `password_hash` (a PHC string made by
    /// the caller; `None` for an account that cannot log in with a password)
    /// and its profile's `displayname`; `false` when the name is already taken.
    pub async fn register_account(
        &self,
        user_id: &str,
        password_hash: Option<&str>,
        displayname: Option<&str>,
    ) -> Result<bool, StoreError> {
        let (user_id, hash, creation_ts) = (user_id.to_owned(), password_hash.map(str::to_owned), now_ms());
        let displayname = displayname.map(str::to_owned);
        let inserted = self
            .db
            .run_interaction("register_account", move |txn| {
                let (user_id, hash, displayname) = (user_id.clone(), hash.clone(), displayname.clone());
                Box::pin(async move {
                    let inserted = txn
                        .execute(
                            "INSERT INTO users (name, creation_ts, password_hash) VALUES ($1, $2, $3) \
                             ON CONFLICT (name) DO NOTHING",
                            &[&user_id, &creation_ts, &hash],
                        )
                        .await?;
                    if inserted == 1 {
                        txn.execute(
                            "INSERT INTO profiles (user_id, displayname) VALUES ($1, $2) \
                             ON CONFLICT (user_id) DO NOTHING",
                            &[&user_id, &displayname],
                        )
                        .await?;
                    }
                    Ok(inserted)
                })
            })
            .await?;
        Ok(inserted == 1)
    }

    /// The password hash of `user_id`: `None` for an unknown account or one
    /// without a password.
    pub async fn password_hash(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        let user_id = user_id.to_owned();
        self.db
            .run_autocommit("password_hash", move |txn| {
                let user_id = user_id.clone();
                Box::pin(async move {
                    let row =
                        txn.query_opt("SELECT password_hash FROM users WHERE name = $1", &[&user_id]).await?;
                    Ok(row.map(|row| row.get::<Option<String>>(0)).transpose()?.flatten())
                })
            })
            .await
    }

    /// Signs `user_id` in on `device_id` (created if new, its display name set
    /// when one is given) and returns the device's new access token. A device
    /// has one token: signing in on it again revokes the previous one, on
    /// every process.
    pub async fn create_device_token(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<String, StoreError> {
        let caches = Arc::clone(&self.caches);
        let (user_id, device_id, display_name) =
            (user_id.to_owned(), device_id.to_owned(), display_name.map(str::to_owned));
        self.db
            .run_interaction("create_device_token", move |txn| {
                let caches = Arc::clone(&caches);
                let (user_id, device_id, display_name) = (user_id.clone(), device_id.clone(), display_name.clone());
                let (token, now) = (new_access_token(), now_ms());
                Box::pin(async move {
                    txn.execute(
                        "INSERT INTO devices (user_id, device_id, display_name, last_seen_ts) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (user_id, device_id) DO UPDATE SET \
                         display_name = COALESCE(EXCLUDED.display_name, devices.display_name), \
                         last_seen_ts = EXCLUDED.last_seen_ts",
                        &[&user_id, &device_id, &display_name, &now],
                    )
                    .await?;
                    revoke_tokens(txn, &caches, "user_id = $1 AND device_id = $2", &[&user_id, &device_id]).await?;
                    txn.execute(
                        "INSERT INTO access_tokens (token, user_id, creation_ts, device_id) VALUES ($1, $2, $3, $4)",
                        &[&token, &user_id, &now, &device_id],
                    )
                    .await?;
                    Ok(token)
                })
            })
            .await
    }

    /// The device `token` belongs to, if it exists and has one.
    pub async fn device_of_token(&self, token: &str) -> Result<Option<String>, StoreError> {
        let token = token.to_owned();
        self.db
            .run_autocommit("device_of_token", move |txn| {
                let token = token.clone();
                Box::pin(async move {
                    let row = txn
                        .query_opt("SELECT device_id FROM access_tokens WHERE token = $1", &[&token])
                        .await?;
                    Ok(row.map(|row| row.get::<Option<String>>(0)).transpose()?.flatten())
                })
            })
            .await
    }

    /// `user_id`'s devices, by ID.
    pub async fn devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError> {
        let user_id = user_id.to_owned();
        self.db
            .run_autocommit("devices", move |txn| {
                let user_id = user_id.clone();
                Box::pin(async move {
                    let rows = txn
                        .query(
                            "SELECT device_id, display_name, last_seen_ts FROM devices WHERE user_id = $1",
                            &[&user_id],
                        )
                        .await?;
                    let mut devices = rows
                        .iter()
                        .map(|row| {
                            Ok(Device {
                                device_id: row.get(0)?,
                                display_name: row.get(1)?,
                                last_seen_ts: row.get(2)?,
                            })
                        })
                        .collect::<Result<Vec<_>, StoreError>>()?;
                    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
                    Ok(devices)
                })
            })
            .await
    }

    /// Logs out the device `token` belongs to: the token, any other token of
    /// that device, and the device itself are gone, on every process. Returns
    /// whether the token existed.
    pub async fn log_out(&self, token: &str) -> Result<bool, StoreError> {
        let (caches, token) = (Arc::clone(&self.caches), token.to_owned());
        self.db
            .run_interaction("log_out", move |txn| {
                let (caches, token) = (Arc::clone(&caches), token.clone());
                Box::pin(async move {
                    let owner = txn
                        .query_opt("SELECT user_id, device_id FROM access_tokens WHERE token = $1", &[&token])
                        .await?;
                    let Some(owner) = owner else {
                        // Gone some other way: still dropped from every cache.
                        caches.invalidate_in_txn(txn, USER_BY_ACCESS_TOKEN_CACHE, Some(vec![token])).await?;
                        return Ok(false);
                    };
                    let (user_id, device_id): (String, Option<String>) = (owner.get(0)?, owner.get(1)?);
                    match device_id {
                        Some(device_id) => {
                            revoke_tokens(
                                txn,
                                &caches,
                                "user_id = $1 AND device_id = $2",
                                &[&user_id, &device_id],
                            )
                            .await?;
                            txn.execute(
                                "DELETE FROM devices WHERE user_id = $1 AND device_id = $2",
                                &[&user_id, &device_id],
                            )
                            .await?;
                        }
                        None => revoke_tokens(txn, &caches, "token = $1", &[&token]).await?,
                    }
                    Ok(true)
                })
            })
            .await
    }

    /// Logs out every device of `user_id`, on every process.
    pub async fn log_out_everywhere(&self, user_id: &str) -> Result<(), StoreError> {
        let (caches, user_id) = (Arc::clone(&self.caches), user_id.to_owned());
        self.db
            .run_interaction("log_out_everywhere", move |txn| {
                let (caches, user_id) = (Arc::clone(&caches), user_id.clone());
                Box::pin(async move {
                    revoke_tokens(txn, &caches, "user_id = $1", &[&user_id]).await?;
                    txn.execute("DELETE FROM devices WHERE user_id = $1", &[&user_id]).await?;
                    Ok(())
                })
            })
            .await
    }
}

impl UsersStore {
    /// `user_id`'s display name: `None` for an account without a profile
    /// (unknown), `Some(None)` for one that set none.
    pub async fn displayname(&self, user_id: &str) -> Result<Option<Option<String>>, StoreError> {
        let user_id = user_id.to_owned();
        self.db
            .run_autocommit("displayname", move |txn| {
                let user_id = user_id.clone();
                Box::pin(async move {
                    // Accounts made before profiles existed have none: known, unnamed.
                    let row = txn
                        .query_opt(
                            "SELECT profiles.displayname FROM users \
                             LEFT JOIN profiles ON profiles.user_id = users.name WHERE users.name = $1",
                            &[&user_id],
                        )
                        .await?;
                    row.map(|row| row.get::<Option<String>>(0)).transpose()
                })
            })
            .await
    }

    /// Sets `user_id`'s display name (`None` clears it).
    pub async fn set_displayname(&self, user_id: &str, displayname: Option<&str>) -> Result<(), StoreError> {
        let (user_id, displayname) = (user_id.to_owned(), displayname.map(str::to_owned));
        self.db
            .run_interaction("set_displayname", move |txn| {
                let (user_id, displayname) = (user_id.clone(), displayname.clone());
                Box::pin(async move {
                    txn.execute(
                        "INSERT INTO profiles (user_id, displayname) VALUES ($1, $2) \
                         ON CONFLICT (user_id) DO UPDATE SET displayname = EXCLUDED.displayname",
                        &[&user_id, &displayname],
                    )
                    .await?;
                    Ok(())
                })
            })
            .await
    }
}

impl UsersStore {
    /// Stores `filter_json` as one of `user_id`'s filters; returns its new ID.
    pub async fn add_filter(&self, user_id: &str, filter_json: &str) -> Result<String, StoreError> {
        let (user_id, filter_json) = (user_id.to_owned(), filter_json.to_owned());
        self.db
            .run_interaction("add_filter", move |txn| {
                // A fresh random ID per attempt: opaque, and never shared.
                let (user_id, filter_json) = (user_id.clone(), filter_json.clone());
                let filter_id: String =
                    rand::thread_rng().sample_iter(&Alphanumeric).take(12).map(char::from).collect();
                Box::pin(async move {
                    txn.execute(
                        "INSERT INTO user_filters (user_id, filter_id, filter_json) VALUES ($1, $2, $3)",
                        &[&user_id, &filter_id, &filter_json],
                    )
                    .await?;
                    Ok(filter_id)
                })
            })
            .await
    }

    /// `user_id`'s filter `filter_id`, as stored.
    pub async fn get_filter(&self, user_id: &str, filter_id: &str) -> Result<Option<String>, StoreError> {
        let (user_id, filter_id) = (user_id.to_owned(), filter_id.to_owned());
        self.db
            .run_autocommit("get_filter", move |txn| {
                let (user_id, filter_id) = (user_id.clone(), filter_id.clone());
                Box::pin(async move {
                    let row = txn
                        .query_opt(
                            "SELECT filter_json FROM user_filters WHERE user_id = $1 AND filter_id = $2",
                            &[&user_id, &filter_id],
                        )
                        .await?;
                    row.map(|row| row.get(0)).transpose()
                })
            })
            .await
    }
}

/// Deletes the access tokens `filter` selects and records their invalidation
/// on the `caches` stream in the same transaction.
async fn revoke_tokens(
    txn: &mut Transaction,
    caches: &CachesStream,
    filter: &str,
    params: &[&dyn store_core::ToSqlValue],
) -> Result<(), StoreError> {
    let rows = txn.query(&format!("SELECT token FROM access_tokens WHERE {filter}"), params).await?;
    let tokens = rows.iter().map(|row| row.get::<String>(0)).collect::<Result<Vec<_>, _>>()?;
    txn.execute(&format!("DELETE FROM access_tokens WHERE {filter}"), params).await?;
    for token in tokens {
        caches.invalidate_in_txn(txn, USER_BY_ACCESS_TOKEN_CACHE, Some(vec![token])).await?;
    }
    Ok(())
}

/// One of a user's devices, as `GET /devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The device's ID, chosen by the client or the server.
    pub device_id: String,
    /// What the user calls it.
    pub display_name: Option<String>,
    /// When it last signed in, in milliseconds since the epoch.
    pub last_seen_ts: i64,
}

/// The accounts mixin: a composition that serves accounts says where its
/// [`UsersStore`] is (every process reads and writes accounts directly).
pub trait HasUsers: Send + Sync {
    /// Accounts and access tokens.
    fn users(&self) -> &Arc<UsersStore>;
}

impl store_core::Store for UsersStore {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        vec![&MIGRATIONS]
    }
    fn stream_specs() -> Vec<store_core::StreamSpec> {
        vec![]
    }
    /// Registers the token cache in the context's registry. Reads nothing at
    /// start-up: `conn` is taken for the uniform constructor's shape.
    async fn new(db: Database, _conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        let users_by_token = ctx.registry().register(USER_BY_ACCESS_TOKEN_CACHE)?;
        Ok(UsersStore { db, caches: Arc::clone(ctx.caches()), users_by_token })
    }
}
