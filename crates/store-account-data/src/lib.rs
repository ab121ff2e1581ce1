//! The `account_data` stream: what clients store per user, either globally
//! (`m.push_rules`, `m.direct`, …) or for one room (`m.fully_read`, `m.tag`, …),
//! one current value per user, room and type.
//!
//! - [`AccountDataReader`], used by every process: cached reads of a user's
//!   global and per-room data, the replication catch-up query, and the worker
//!   side of the stream ([`AccountDataReader::process_account_data_rows`]).
//! - [`AccountDataWriter`], built only on the stream's writers.
//! - [`AccountDataRow`]: the stream's row in its wire form.
//!
//! This crate depends on `store-core` only, never on another domain crate.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use store_core::{
    Cache, CacheRegistry, Database, MultiWriterIdGenerator, MultiWriterToken, Row, StoreContext, StoreError,
    StreamChangeCache, StreamSpec, StreamTable, StreamUpdates, Transaction, WriterRule,
};

/// This crate's tables (`account_data` and `account_data_sequence`), for both engines: what a
/// composition including this crate lists in `Store::migrations`.
pub static MIGRATIONS: store_core::Migrations = store_core::Migrations::new(
    env!("CARGO_PKG_NAME"),
    sqlx::migrate!("migrations/postgres"),
    sqlx::migrate!("migrations/sqlite"),
);

/// The name of the stream this crate owns, as it appears in `[stream_writers]`,
/// in `stream_positions` and on the wire.
pub const ACCOUNT_DATA_STREAM: &str = "account_data";

/// The `account_data` stream: written by its configured writers.
pub const ACCOUNT_DATA: StreamSpec = StreamSpec::new(ACCOUNT_DATA_STREAM, WriterRule::Configured).elastic();

/// The cache of a user's global account data, keyed by user.
const GLOBAL_CACHE: &str = "get_global_account_data_for_user";

/// The cache of a user's account data in one room, keyed by (user, room).
const ROOM_CACHE: &str = "get_room_account_data_for_user";

/// Account data of one scope (global, or one room): type → content.
pub type AccountDataMap = BTreeMap<String, serde_json::Value>;

/// A change of account data, as it travels on the stream: on the wire
/// `[user_id, room_id, data_type]`, with a `null` room for global data.
///
/// The row names what changed, not the new content: a follower drops its cached
/// copy and reads the content again when asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "AccountDataTuple", into = "AccountDataTuple")]
pub struct AccountDataRow {
    /// Whose account data.
    pub user_id: String,
    /// The room, or `None` for global account data.
    pub room_id: Option<String>,
    /// `m.push_rules`, `m.fully_read`, `m.tag`, …
    pub data_type: String,
}

type AccountDataTuple = (String, Option<String>, String);

impl From<AccountDataTuple> for AccountDataRow {
    fn from((user_id, room_id, data_type): AccountDataTuple) -> Self {
        AccountDataRow { user_id, room_id, data_type }
    }
}

impl From<AccountDataRow> for AccountDataTuple {
    fn from(row: AccountDataRow) -> Self {
        (row.user_id, row.room_id, row.data_type)
    }
}

/// Account data as every process reads them.
///
/// Clients read a user's whole account data on every initial sync, so both
/// scopes are cached as whole maps: a user's global data, and a user's data in
/// one room. A change cache per user lets "what changed since token T" skip
/// users without new account data.
#[derive(Debug)]
pub struct AccountDataReader {
    db: Database,
    ids: MultiWriterIdGenerator,
    /// The instance the generator was built for, so that a writer sharing this
    /// reader stamps its rows with the same name.
    instance_name: String,
    registry: Arc<CacheRegistry>,
    global_data: Arc<Cache<String, Arc<AccountDataMap>>>,
    room_data: Arc<Cache<(String, String), Arc<AccountDataMap>>>,
    user_changes: Arc<StreamChangeCache>,
}

/// Reads the rows of a `SELECT account_data_type, content …` into a map.
fn map_from_rows(rows: &[Row]) -> Result<AccountDataMap, StoreError> {
    rows.iter()
        .map(|row| {
            let content: String = row.get(1)?;
            let content = serde_json::from_str(&content).map_err(|err| StoreError::Decode {
                column: "content".to_owned(),
                message: err.to_string(),
            })?;
            Ok((row.get(0)?, content))
        })
        .collect()
}

impl AccountDataReader {
    /// The stream's positions, as this process knows them.
    pub fn stream(&self) -> &MultiWriterIdGenerator {
        &self.ids
    }

    /// Which users' account data changed after a position.
    pub fn user_changes(&self) -> &StreamChangeCache {
        &self.user_changes
    }

    /// `user_id`'s global account data, type → content (cached).
    pub async fn get_global_account_data_for_user(
        &self,
        user_id: &str,
    ) -> Result<Arc<AccountDataMap>, StoreError> {
        let db = self.db.clone();
        let user = user_id.to_owned();
        self.global_data
            .get_or_load(user_id.to_owned(), || async move {
                let map = db
                    .run_autocommit(GLOBAL_CACHE, move |txn| {
                        let user = user.clone();
                        Box::pin(async move {
                            let rows = txn
                                .query(
                                    "SELECT account_data_type, content FROM account_data \
                                     WHERE user_id = $1 AND room_id IS NULL",
                                    &[&user],
                                )
                                .await?;
                            map_from_rows(&rows)
                        })
                    })
                    .await?;
                Ok(Arc::new(map))
            })
            .await
    }

    /// `user_id`'s account data in `room_id`, type → content (cached).
    pub async fn get_room_account_data_for_user(
        &self,
        user_id: &str,
        room_id: &str,
    ) -> Result<Arc<AccountDataMap>, StoreError> {
        let key = (user_id.to_owned(), room_id.to_owned());
        let db = self.db.clone();
        self.room_data
            .get_or_load(key.clone(), || async move {
                let map = db
                    .run_autocommit(ROOM_CACHE, move |txn| {
                        let (user, room) = key.clone();
                        Box::pin(async move {
                            let rows = txn
                                .query(
                                    "SELECT account_data_type, content FROM account_data \
                                     WHERE user_id = $1 AND room_id = $2",
                                    &[&user, &room],
                                )
                                .await?;
                            map_from_rows(&rows)
                        })
                    })
                    .await?;
                Ok(Arc::new(map))
            })
            .await
    }

    /// `user_id`'s account data changed in `(low, high]` as multi-writer tokens
    /// place it (each by its own writer's position, so a client paging with such
    /// tokens sees each change once): `(room, type, content)`, oldest first. No
    /// `low` means from the start. A user the change cache proves unchanged
    /// costs no query.
    pub async fn get_account_data_between(
        &self,
        user_id: &str,
        low: Option<&MultiWriterToken>,
        high: &MultiWriterToken,
    ) -> Result<Vec<(Option<String>, String, serde_json::Value)>, StoreError> {
        let from = low.map_or(0, MultiWriterToken::stream);
        if low.is_some() && !self.user_changes.has_entity_changed(user_id, from) {
            return Ok(Vec::new());
        }
        let (user, to) = (user_id.to_owned(), high.max_pos());
        let rows = self
            .db
            .run_autocommit("get_account_data_between", move |txn| {
                let user = user.clone();
                Box::pin(async move {
                    txn.query(
                        "SELECT stream_id, instance_name, room_id, account_data_type, content FROM account_data \
                         WHERE user_id = $1 AND stream_id > $2 AND stream_id <= $3 ORDER BY stream_id",
                        &[&user, &from, &to],
                    )
                    .await
                })
            })
            .await?;
        let mut changes = Vec::new();
        for row in &rows {
            let (stream_id, writer): (i64, String) = (row.get(0)?, row.get(1)?);
            if !MultiWriterToken::in_range(low, Some(high), Some(&writer), stream_id) {
                continue;
            }
            let content: String = row.get(4)?;
            let content = serde_json::from_str(&content).map_err(|err| StoreError::Decode {
                column: "content".to_owned(),
                message: err.to_string(),
            })?;
            changes.push((row.get(2)?, row.get(3)?, content));
        }
        Ok(changes)
    }

    /// Replication catch-up: `writer`'s changes with `from < stream_id ≤ to`, at
    /// most `limit`.
    pub async fn get_account_data_updates(
        &self,
        writer: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<StreamUpdates<AccountDataRow>, StoreError> {
        StreamUpdates::fetch(
            &self.db,
            "get_account_data_updates",
            "SELECT stream_id, user_id, room_id, account_data_type FROM account_data \
             WHERE instance_name = $1 AND stream_id > $2 AND stream_id <= $3 ORDER BY stream_id LIMIT $4",
            writer,
            from,
            to,
            limit,
            |row| {
                let change =
                    AccountDataRow { user_id: row.get(1)?, room_id: row.get(2)?, data_type: row.get(3)? };
                Ok((row.get(0)?, change))
            },
        )
        .await
    }

    /// Worker side: applies `rows` that `writer` wrote up to `token`,
    /// invalidating before the writer's position moves.
    pub fn process_account_data_rows(&self, writer: &str, token: i64, rows: &[AccountDataRow]) {
        for row in rows {
            account_data_changed(&self.registry, &self.user_changes, row, token);
        }
        self.ids.advance(writer, token);
    }
}

/// Invalidates exactly the cached map a change makes stale, and marks its user.
/// The same on the writer (after commit) and on followers (from the stream).
fn account_data_changed(
    registry: &CacheRegistry,
    user_changes: &StreamChangeCache,
    row: &AccountDataRow,
    stream_id: i64,
) {
    match &row.room_id {
        None => registry.invalidate_key(GLOBAL_CACHE, std::slice::from_ref(&row.user_id)),
        Some(room_id) => registry.invalidate_key(ROOM_CACHE, &[row.user_id.clone(), room_id.clone()]),
    }
    user_changes.entity_has_changed(&row.user_id, stream_id);
}

/// Writes account data: built only on the instances configured as writers of
/// the `account_data` stream.
#[derive(Debug)]
pub struct AccountDataWriter {
    reader: Arc<AccountDataReader>,
    /// The deployment's writers, in a deployment of several processes: a
    /// write is taken only for a user this writer owns in the epoch it goes
    /// by, behind the fence of that epoch.
    writers: Option<Arc<store_core::DeploymentWriters>>,
}

impl AccountDataWriter {
    /// The read half.
    pub fn reader(&self) -> &AccountDataReader {
        &self.reader
    }

    /// The read half, for components that keep it (a replication stream).
    pub fn shared_reader(&self) -> Arc<AccountDataReader> {
        Arc::clone(&self.reader)
    }

    /// Sets `user_id`'s account data of `data_type` to `content`, globally when
    /// `room_id` is `None` and for that room otherwise; returns its stream ID.
    /// The cached map it makes stale is invalidated after the commit, before the
    /// position moves. In a deployment whose writers of `account_data` are
    /// recorded, a user this writer does not own in the epoch it goes by is
    /// refused ([`StoreError::Moved`]), as is a write while the writers
    /// change under it: the caller routes it again.
    pub async fn add_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        let reader = &self.reader;
        let (generator, registry, user_changes) =
            (reader.ids.clone(), Arc::clone(&reader.registry), Arc::clone(&reader.user_changes));
        let row = AccountDataRow {
            user_id: user_id.to_owned(),
            room_id: room_id.map(str::to_owned),
            data_type: data_type.to_owned(),
        };
        let (instance, content) = (reader.instance_name.clone(), content.to_string());
        let epoch = store_core::writers::owned_epoch(self.writers.as_deref(), ACCOUNT_DATA_STREAM, user_id)?;
        reader
            .db
            .run_interaction_read_committed("add_account_data", move |txn| {
                let (generator, registry, user_changes) =
                    (generator.clone(), Arc::clone(&registry), Arc::clone(&user_changes));
                let (row, instance, content) = (row.clone(), instance.clone(), content.clone());
                Box::pin(async move {
                    if let Some(epoch) = epoch {
                        store_core::writers::fence(txn, ACCOUNT_DATA_STREAM, epoch);
                    }
                    let stream_id = generator.get_next_txn(txn).await?;
                    // An upsert, so that two first values of one key arriving at once
                    // cannot both insert (the unique indexes arbitrate); the later
                    // stream ID wins whatever order the transactions commit in.
                    let conflict = if row.room_id.is_some() {
                        "(user_id, room_id, account_data_type) WHERE room_id IS NOT NULL"
                    } else {
                        "(user_id, account_data_type) WHERE room_id IS NULL"
                    };
                    txn.execute(
                        &format!(
                            "INSERT INTO account_data \
                             (stream_id, instance_name, user_id, room_id, account_data_type, content) \
                             VALUES ($1, $2, $3, $4, $5, $6) \
                             ON CONFLICT {conflict} DO UPDATE SET stream_id = EXCLUDED.stream_id, \
                             instance_name = EXCLUDED.instance_name, content = EXCLUDED.content \
                             WHERE account_data.stream_id < EXCLUDED.stream_id"
                        ),
                        &[&stream_id, &instance, &row.user_id, &row.room_id, &row.data_type, &content],
                    )
                    .await?;
                    // `call_after` runs before the generator's `call_after_position`
                    // publishes `stream_id`.
                    txn.call_after(move || account_data_changed(&registry, &user_changes, &row, stream_id));
                    Ok(stream_id)
                })
            })
            .await
    }
}

/// The `account_data` stream.
#[derive(Debug)]
pub struct AccountDataStream(pub Arc<AccountDataReader>);

impl store_core::MultiWriterSource for AccountDataStream {
    type Row = AccountDataRow;
    const SPEC: StreamSpec = ACCOUNT_DATA;

    fn id_generator(&self) -> &MultiWriterIdGenerator {
        self.0.stream()
    }
    fn fetch<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> store_core::BoxFuture<'a, Result<StreamUpdates<AccountDataRow>, StoreError>> {
        Box::pin(self.0.get_account_data_updates(writer, from, to, limit))
    }
    fn apply(&self, writer: &str, token: i64, rows: &[AccountDataRow]) {
        self.0.process_account_data_rows(writer, token, rows);
    }
}

/// The account data mixin's read side: a composition that reads account data says where
/// its reader is, and handlers written against this trait serve a master's
/// store and a worker's alike.
pub trait AccountDataStore: Send + Sync {
    /// The read half of account data.
    fn account_data(&self) -> &Arc<AccountDataReader>;
}

/// The account data mixin's write side: `Some` on the stream's writers.
pub trait AccountDataWriteStore: AccountDataStore {
    /// The write half, on the instances configured to write the stream.
    fn account_data_writer(&self) -> Option<&AccountDataWriter>;
}

impl store_core::Store for AccountDataReader {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        vec![&MIGRATIONS]
    }
    fn stream_specs() -> Vec<store_core::StreamSpec> {
        vec![ACCOUNT_DATA]
    }
    /// Loads the stream's positions on the start-up connection and registers the
    /// caches.
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        let tables = vec![StreamTable::new("account_data", "instance_name", "stream_id")];
        let generator_config = ctx.generator_config(ACCOUNT_DATA, tables, "account_data_sequence");
        let ids = MultiWriterIdGenerator::new_in(&db, conn, generator_config).await?;
        let registry = Arc::clone(ctx.registry());
        // Prefilled from the newest rows, which may lie above the current token:
        // a cache that started empty would deny changes it never saw.
        let user_changes = StreamChangeCache::load_newest(
            conn,
            "account_data_user_changes",
            "SELECT user_id, stream_id FROM account_data ORDER BY stream_id DESC LIMIT $1",
            ids.get_current_token(),
        )
        .await?;
        Ok(AccountDataReader {
            global_data: registry.register(GLOBAL_CACHE)?,
            room_data: registry.register(ROOM_CACHE)?,
            user_changes: Arc::new(user_changes),
            instance_name: ctx.instance_name().to_owned(),
            registry,
            db,
            ids,
        })
    }
}

impl store_core::Store for AccountDataWriter {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        <AccountDataReader as store_core::Store>::migrations()
    }
    fn stream_specs() -> Vec<store_core::StreamSpec> {
        <AccountDataReader as store_core::Store>::stream_specs()
    }
    /// The write half: refused unless this instance writes `account_data`; it
    /// allocates from the read half's generator, which it shares with the
    /// rest of the process through `ctx`.
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        ctx.require_writer(ACCOUNT_DATA)?;
        let reader = ctx.component::<AccountDataReader>(&db, conn).await?;
        let writers = ctx.settings().has_other_processes.then(|| Arc::clone(ctx.deployment_writers()));
        Ok(AccountDataWriter { reader, writers })
    }
}
