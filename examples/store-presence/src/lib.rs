//! The `presence` stream, as a store crate outside the workspace adds it: each
//! user's current presence (`online`, `unavailable`, `offline`) and status
//! message.
//!
//! It has everything a store crate owns, and nothing outside it names the
//! stream:
//! - its tables ([`MIGRATIONS`], for both engines);
//! - its read half ([`PresenceReader`]: a cached read, the catch-up query, and
//!   the worker side that applies replicated rows);
//! - its write half ([`PresenceWriter`], only on the stream's writers);
//! - its row in wire form ([`PresenceRow`]) and its replication stream
//!   ([`PresenceStream`]);
//! - its mixins ([`PresenceStore`], [`PresenceWriteStore`]), which a
//!   composition implements.
//!
//! `docs/extending.md` walks through this crate step by step.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use store_core::{
    BoxFuture, Cache, CacheRegistry, CacheWeight, Database, MultiWriterIdGenerator, MultiWriterSource, Row,
    Store, StoreContext, StoreError, StreamChangeCache, StreamSpec, StreamTable, StreamUpdates, Transaction,
    WriterRule,
};

/// The stream's name, in `[stream_writers]`, in `stream_positions` and on the wire.
pub const PRESENCE_STREAM: &str = "presence";

/// The stream: written by the instances `[stream_writers] presence` names.
pub const PRESENCE: StreamSpec = StreamSpec::new(PRESENCE_STREAM, WriterRule::Configured);

/// This crate's tables (`presence_stream`, and its sequence on PostgreSQL).
pub static MIGRATIONS: store_core::Migrations = store_core::Migrations::new(
    env!("CARGO_PKG_NAME"),
    sqlx::migrate!("migrations/postgres"),
    sqlx::migrate!("migrations/sqlite"),
);

/// The cache of each user's current presence.
const PRESENCE_CACHE: &str = "get_presence";

/// A user's presence, as stored and as it travels on the stream: on the wire
/// `[user_id, state, status_msg, last_active_ts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PresenceTuple", into = "PresenceTuple")]
pub struct PresenceRow {
    /// Whose presence.
    pub user_id: String,
    /// `online`, `unavailable` or `offline`.
    pub state: String,
    /// What the user says about it.
    pub status_msg: Option<String>,
    /// When the user was last active, in milliseconds since the epoch.
    pub last_active_ts: i64,
}

type PresenceTuple = (String, String, Option<String>, i64);

impl From<PresenceTuple> for PresenceRow {
    fn from((user_id, state, status_msg, last_active_ts): PresenceTuple) -> Self {
        PresenceRow { user_id, state, status_msg, last_active_ts }
    }
}

impl From<PresenceRow> for PresenceTuple {
    fn from(row: PresenceRow) -> Self {
        (row.user_id, row.state, row.status_msg, row.last_active_ts)
    }
}

impl CacheWeight for PresenceRow {
    fn weight(&self) -> usize {
        let PresenceRow { user_id, state, status_msg, last_active_ts } = self;
        user_id.weight() + state.weight() + status_msg.weight() + last_active_ts.weight()
    }
}

const SELECT_PRESENCE: &str =
    "SELECT stream_id, user_id, state, status_msg, last_active_ts FROM presence_stream";

fn presence_from_row(row: &Row) -> Result<(i64, PresenceRow), StoreError> {
    let presence = PresenceRow {
        user_id: row.get(1)?,
        state: row.get(2)?,
        status_msg: row.get(3)?,
        last_active_ts: row.get(4)?,
    };
    Ok((row.get(0)?, presence))
}

/// Presence as every process reads it: a cache per user in front of the table,
/// and a change cache of users.
#[derive(Debug)]
pub struct PresenceReader {
    db: Database,
    ids: MultiWriterIdGenerator,
    registry: Arc<CacheRegistry>,
    presence: Arc<Cache<String, Option<PresenceRow>>>,
    user_changes: Arc<StreamChangeCache>,
}

impl Store for PresenceReader {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        vec![&MIGRATIONS]
    }
    fn stream_specs() -> Vec<StreamSpec> {
        vec![PRESENCE]
    }
    /// Loads the stream's positions on the start-up connection and registers
    /// the cache.
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        let tables = vec![StreamTable::new("presence_stream", "instance_name", "stream_id")];
        let generator = ctx.generator_config(PRESENCE, tables, "presence_stream_sequence");
        let ids = MultiWriterIdGenerator::new_in(&db, conn, generator).await?;
        let user_changes = StreamChangeCache::load_newest(
            conn,
            "presence_user_changes",
            "SELECT user_id, stream_id FROM presence_stream ORDER BY stream_id DESC LIMIT $1",
            ids.get_current_token(),
        )
        .await?;
        let registry = Arc::clone(ctx.registry());
        Ok(PresenceReader {
            presence: registry.register(PRESENCE_CACHE)?,
            user_changes: Arc::new(user_changes),
            registry,
            db,
            ids,
        })
    }
}

impl PresenceReader {
    /// The stream's positions, as this process knows them.
    pub fn stream(&self) -> &MultiWriterIdGenerator {
        &self.ids
    }

    /// Which users' presence changed after a position.
    pub fn user_changes(&self) -> &StreamChangeCache {
        &self.user_changes
    }

    /// `user_id`'s current presence, if it ever set one (cached).
    pub async fn get_presence(&self, user_id: &str) -> Result<Option<PresenceRow>, StoreError> {
        let db = self.db.clone();
        let user = user_id.to_owned();
        self.presence
            .get_or_load(user.clone(), || async move {
                db.run_autocommit("get_presence", move |txn| {
                    let user = user.clone();
                    Box::pin(async move {
                        let row =
                            txn.query_opt(&format!("{SELECT_PRESENCE} WHERE user_id = $1"), &[&user]).await?;
                        row.map(|row| presence_from_row(&row).map(|(_, presence)| presence)).transpose()
                    })
                })
                .await
            })
            .await
    }

    /// Replication catch-up: `writer`'s rows with `from < stream_id ≤ to`, at
    /// most `limit`.
    pub async fn get_presence_updates(
        &self,
        writer: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<StreamUpdates<PresenceRow>, StoreError> {
        let sql = format!(
            "{SELECT_PRESENCE} WHERE instance_name = $1 AND stream_id > $2 AND stream_id <= $3 \
             ORDER BY stream_id LIMIT $4"
        );
        StreamUpdates::fetch(
            &self.db,
            "get_presence_updates",
            &sql,
            writer,
            from,
            to,
            limit,
            presence_from_row,
        )
        .await
    }

    /// Worker side: applies `rows` that `writer` wrote up to `token`,
    /// invalidating before the writer's position moves.
    pub fn process_presence_rows(&self, writer: &str, token: i64, rows: &[PresenceRow]) {
        for row in rows {
            invalidate(&self.registry, &self.user_changes, &row.user_id, token);
        }
        self.ids.advance(writer, token);
    }
}

/// What a change of `user_id`'s presence at `stream_id` makes stale.
fn invalidate(registry: &CacheRegistry, user_changes: &StreamChangeCache, user_id: &str, stream_id: i64) {
    registry.invalidate_key(PRESENCE_CACHE, &[user_id.to_owned()]);
    user_changes.entity_has_changed(user_id, stream_id);
}

/// Writes presence: built only on the instances that write the stream.
#[derive(Debug)]
pub struct PresenceWriter {
    reader: Arc<PresenceReader>,
    instance_name: String,
}

impl Store for PresenceWriter {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        <PresenceReader as store_core::Store>::migrations()
    }
    fn stream_specs() -> Vec<StreamSpec> {
        <PresenceReader as store_core::Store>::stream_specs()
    }
    /// The write half: refused unless this instance writes `presence`; it
    /// allocates from the process's one read half, which `ctx` shares.
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        ctx.require_writer(PRESENCE)?;
        let reader = ctx.component::<PresenceReader>(&db, conn).await?;
        Ok(PresenceWriter { reader, instance_name: ctx.instance_name().to_owned() })
    }
}

impl PresenceWriter {
    /// Records `presence` as its user's current one; returns its stream ID.
    /// The user's cache entry is invalidated after the commit, before the
    /// position moves, here and (through replication) on every other process.
    pub async fn set_presence(&self, presence: &PresenceRow) -> Result<i64, StoreError> {
        let reader = &self.reader;
        let (generator, registry, user_changes) =
            (reader.ids.clone(), Arc::clone(&reader.registry), Arc::clone(&reader.user_changes));
        let (presence, instance) = (presence.clone(), self.instance_name.clone());
        reader
            .db
            .run_interaction_read_committed("set_presence", move |txn| {
                let (generator, registry, user_changes) =
                    (generator.clone(), Arc::clone(&registry), Arc::clone(&user_changes));
                let (presence, instance) = (presence.clone(), instance.clone());
                Box::pin(async move {
                    let stream_id = generator.get_next_txn(txn).await?;
                    // An upsert that keeps the later stream ID, whatever order two
                    // writers commit in.
                    txn.execute(
                        "INSERT INTO presence_stream (stream_id, instance_name, user_id, state, status_msg, \
                         last_active_ts) VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (user_id) DO UPDATE SET stream_id = EXCLUDED.stream_id, \
                         instance_name = EXCLUDED.instance_name, state = EXCLUDED.state, \
                         status_msg = EXCLUDED.status_msg, last_active_ts = EXCLUDED.last_active_ts \
                         WHERE presence_stream.stream_id < EXCLUDED.stream_id",
                        &[
                            &stream_id,
                            &instance,
                            &presence.user_id,
                            &presence.state,
                            &presence.status_msg,
                            &presence.last_active_ts,
                        ],
                    )
                    .await?;
                    txn.call_after(move || {
                        invalidate(&registry, &user_changes, &presence.user_id, stream_id)
                    });
                    Ok(stream_id)
                })
            })
            .await
    }
}

/// The `presence` stream, over the process's read half.
#[derive(Debug)]
pub struct PresenceStream(pub Arc<PresenceReader>);

impl MultiWriterSource for PresenceStream {
    type Row = PresenceRow;
    const SPEC: StreamSpec = PRESENCE;

    fn id_generator(&self) -> &MultiWriterIdGenerator {
        self.0.stream()
    }
    fn fetch<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<PresenceRow>, StoreError>> {
        Box::pin(self.0.get_presence_updates(writer, from, to, limit))
    }
    fn apply(&self, writer: &str, token: i64, rows: &[PresenceRow]) {
        self.0.process_presence_rows(writer, token, rows);
    }
}

/// The presence mixin's read side: a composition that reads presence says
/// where its read half is.
pub trait PresenceStore: Send + Sync {
    /// The read half of presence.
    fn presence(&self) -> &Arc<PresenceReader>;
}

/// The presence mixin's write side: `Some` on the stream's writers.
pub trait PresenceWriteStore: PresenceStore {
    /// The write half, on the instances configured to write the stream.
    fn presence_writer(&self) -> Option<&PresenceWriter>;
}

#[cfg(test)]
mod tests {
    use super::PresenceRow;

    #[test]
    fn rows_travel_as_four_element_arrays() {
        let json = r#"["@u:example.com","online","at lunch",1490197670513]"#;
        let row: PresenceRow = serde_json::from_str(json).expect("a presence row");
        assert_eq!(row.user_id, "@u:example.com");
        assert_eq!(row.status_msg.as_deref(), Some("at lunch"));
        assert_eq!(serde_json::to_string(&row).expect("serialisable"), json);
        assert!(serde_json::from_str::<PresenceRow>(r#"["@u","online"]"#).is_err());
    }
}
