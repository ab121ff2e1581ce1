//! The `caches` stream: invalidations made inside a transaction are applied
//! locally after commit and recorded for other processes to replay.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::CacheRegistry;
use crate::{
    Database, Engine, MultiWriterConfig, MultiWriterIdGenerator, StoreError, StreamTable, StreamUpdates,
    Transaction,
};

/// The magic cache name of the batched current-state poke: keys are the room,
/// then the members whose membership changed. Receivers expand it into every
/// cache that depends on the room's current state (the expansion is registered
/// by the crate that owns those caches).
pub const CURRENT_STATE_POKE: &str = "cs_cache_fake";

/// Members per `cs_cache_fake` row: keeps each replication line well under the
/// protocol's line limit (user IDs are at most 255 bytes).
pub const MEMBERS_PER_POKE_ROW: usize = 50;

/// A row of the `caches` stream; on the wire `[cache_func, keys-or-null, ts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(String, Option<Vec<String>>, i64)", into = "(String, Option<Vec<String>>, i64)")]
pub struct CachesRow {
    /// The cache's name, or a magic name such as [`CURRENT_STATE_POKE`].
    pub cache_func: String,
    /// The key's parts; `None` invalidates the whole cache.
    pub keys: Option<Vec<String>>,
    /// When the invalidation was made, in milliseconds since the epoch.
    pub invalidation_ts: i64,
}

impl From<(String, Option<Vec<String>>, i64)> for CachesRow {
    fn from((cache_func, keys, invalidation_ts): (String, Option<Vec<String>>, i64)) -> Self {
        CachesRow { cache_func, keys, invalidation_ts }
    }
}

impl From<CachesRow> for (String, Option<Vec<String>>, i64) {
    fn from(row: CachesRow) -> Self {
        (row.cache_func, row.keys, row.invalidation_ts)
    }
}

const TABLE: &str = "cache_invalidation_stream_by_instance";

/// Applies and records cache invalidations; one per process.
///
/// On PostgreSQL the stream's generator has no fixed writers (any process may
/// invalidate) and never touches `stream_positions`. Rows are written only when
/// the deployment has other processes to tell; SQLite writes none.
#[derive(Debug)]
pub struct CachesStream {
    db: Database,
    registry: Arc<CacheRegistry>,
    instance_name: String,
    /// Tracks every process's position on the stream (PostgreSQL only).
    generator: Option<MultiWriterIdGenerator>,
    /// Whether rows are written for other processes.
    recording: bool,
    retention: Duration,
}

impl CachesStream {
    /// The stream's name on the wire.
    pub const STREAM_NAME: &'static str = "caches";

    /// The stream: every process invalidates.
    pub const SPEC: crate::StreamSpec =
        crate::StreamSpec::new(Self::STREAM_NAME, crate::WriterRule::EveryProcess);

    /// Loads the stream's positions (PostgreSQL) on the start-up connection.
    pub async fn new(
        db: Database,
        conn: &mut Transaction,
        config: &crate::StoreSettings,
        registry: Arc<CacheRegistry>,
    ) -> Result<CachesStream, StoreError> {
        let generator = match db.engine() {
            Engine::Sqlite => None,
            Engine::Postgres => Some(
                MultiWriterIdGenerator::new_in(
                    &db,
                    conn,
                    MultiWriterConfig {
                        stream_name: Self::STREAM_NAME.to_owned(),
                        instance_name: config.instance_name.clone(),
                        tables: vec![StreamTable::new(TABLE, "instance_name", "stream_id")],
                        sequence_name: "cache_invalidation_stream_seq".to_owned(),
                        writers: Vec::new(),
                        ..MultiWriterConfig::default()
                    },
                )
                .await?,
            ),
        };
        let recording = generator.is_some() && config.has_other_processes;
        let retention = Duration::from_secs(u64::from(config.caches.invalidation_retention_days) * 24 * 3600);
        Ok(CachesStream {
            db,
            registry,
            instance_name: config.instance_name.clone(),
            generator,
            recording,
            retention,
        })
    }

    /// The registry invalidations apply to.
    pub fn registry(&self) -> &Arc<CacheRegistry> {
        &self.registry
    }

    /// Whether this process writes rows for others.
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// The stream's position tracking (PostgreSQL only).
    pub fn generator(&self) -> Option<&MultiWriterIdGenerator> {
        self.generator.as_ref()
    }

    /// This process's view of `writer`'s position; 0 on SQLite.
    pub fn current_token(&self, writer: &str) -> i64 {
        self.generator.as_ref().map_or(0, |generator| generator.get_current_token_for_writer(writer))
    }

    /// Invalidates `keys` of the cache `cache` (all of it for `None`) once `txn`
    /// commits, and records the invalidation for other processes in `txn`.
    pub async fn invalidate_in_txn(
        &self,
        txn: &mut Transaction,
        cache: &str,
        keys: Option<Vec<String>>,
    ) -> Result<(), StoreError> {
        self.invalidate_many_in_txn(txn, cache, vec![keys]).await
    }

    /// Like [`CachesStream::invalidate_in_txn`] for several keys of one cache: one
    /// row per key, IDs allocated at once.
    pub async fn invalidate_many_in_txn(
        &self,
        txn: &mut Transaction,
        cache: &str,
        keys: Vec<Option<Vec<String>>>,
    ) -> Result<(), StoreError> {
        if cache == CURRENT_STATE_POKE && keys.iter().any(Option::is_none) {
            return Err(StoreError::Misconfigured(format!("`{CURRENT_STATE_POKE}` needs keys")));
        }
        let rows: Vec<(String, Option<Vec<String>>)> =
            keys.into_iter().map(|keys| (cache.to_owned(), keys)).collect();
        let local = rows.clone();
        let registry = Arc::clone(&self.registry);
        txn.call_after(move || {
            for (cache, keys) in &local {
                registry.invalidate(cache, keys.as_deref());
            }
        });
        self.record(txn, rows).await
    }

    /// The batched current-state poke: once `txn` commits, every cache that
    /// depends on `room_id`'s current state (and, for `members_changed`, on their
    /// memberships) is invalidated; other processes get one row per
    /// [`MEMBERS_PER_POKE_ROW`] changed members (one row when none changed),
    /// however many caches depend on the state.
    pub async fn poke_current_state(
        &self,
        txn: &mut Transaction,
        room_id: &str,
        members_changed: &[String],
    ) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        if members_changed.is_empty() {
            rows.push((CURRENT_STATE_POKE.to_owned(), Some(vec![room_id.to_owned()])));
        }
        for chunk in members_changed.chunks(MEMBERS_PER_POKE_ROW) {
            let mut keys = Vec::with_capacity(chunk.len() + 1);
            keys.push(room_id.to_owned());
            keys.extend(chunk.iter().cloned());
            rows.push((CURRENT_STATE_POKE.to_owned(), Some(keys)));
        }
        let mut all_keys = vec![room_id.to_owned()];
        all_keys.extend(members_changed.iter().cloned());
        let registry = Arc::clone(&self.registry);
        txn.call_after(move || {
            registry.invalidate(CURRENT_STATE_POKE, Some(&all_keys));
        });
        self.record(txn, rows).await
    }

    async fn record(
        &self,
        txn: &mut Transaction,
        rows: Vec<(String, Option<Vec<String>>)>,
    ) -> Result<(), StoreError> {
        let Some(generator) = self.generator.as_ref().filter(|_| self.recording) else { return Ok(()) };
        let ids = generator.get_next_mult_txn(txn, rows.len()).await?;
        let now = crate::now_ms();
        // Nothing waits for these inserts: they go with the COMMIT.
        for (id, (cache, keys)) in ids.iter().zip(&rows) {
            txn.execute_at_commit(
                "INSERT INTO cache_invalidation_stream_by_instance \
                 (stream_id, instance_name, cache_func, keys, invalidation_ts) VALUES ($1, $2, $3, $4, $5)",
                &[id, &self.instance_name, cache, keys, &now],
            );
        }
        Ok(())
    }

    /// Worker side: applies `rows` that `writer` wrote up to `token`. Every
    /// invalidation happens before the writer's position moves, so a reader that
    /// sees the new position never reads a stale cache.
    pub fn apply_rows(&self, writer: &str, token: i64, rows: &[CachesRow]) {
        for row in rows {
            if !self.registry.invalidate_at(&row.cache_func, row.keys.as_deref(), Some(token)) {
                tracing::trace!(cache = %row.cache_func, "no such cache here; ignoring its invalidation");
            }
        }
        if let Some(generator) = &self.generator {
            generator.advance(writer, token);
        }
    }

    /// Catch-up: `writer`'s rows with `from < stream_id ≤ current`, oldest first,
    /// at most `limit`. Bounded above, unlike Synapse's: a row above `current`
    /// may sit beyond an ID still in flight, and a follower that applied it would
    /// move past that ID and then drop its row when it came.
    pub async fn get_updates_since(
        &self,
        writer: &str,
        from: i64,
        current: i64,
        limit: usize,
    ) -> Result<StreamUpdates<CachesRow>, StoreError> {
        StreamUpdates::fetch(
            &self.db,
            "get_all_updated_caches",
            "SELECT stream_id, cache_func, keys, invalidation_ts FROM cache_invalidation_stream_by_instance \
             WHERE instance_name = $1 AND stream_id > $2 AND stream_id <= $3 ORDER BY stream_id LIMIT $4",
            writer,
            from,
            current,
            limit,
            |row| {
                let caches_row = CachesRow {
                    cache_func: row.get(1)?,
                    keys: row.get(2)?,
                    invalidation_ts: row.get::<Option<i64>>(3)?.unwrap_or(0),
                };
                Ok((row.get::<i64>(0)?, caches_row))
            },
        )
        .await
    }

    /// Deletes up to `batch` rows older than the retention period, oldest first;
    /// returns how many went. Run it periodically (see
    /// [`CachesStream::prune_forever`]).
    pub async fn prune(&self, batch: usize) -> Result<u64, StoreError> {
        let retention_ms = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = crate::now_ms().saturating_sub(retention_ms);
        self.prune_before(cutoff, batch).await
    }

    /// Deletes up to `batch` rows stamped before `cutoff_ms`, oldest first.
    pub async fn prune_before(&self, cutoff_ms: i64, batch: usize) -> Result<u64, StoreError> {
        let batch = i64::try_from(batch).unwrap_or(i64::MAX);
        self.db
            .run_autocommit("prune_cache_invalidations", move |txn| {
                Box::pin(async move {
                    // Rows are stamped in ID order, so the old ones are the lowest
                    // IDs: the unique index on stream_id finds them without a scan.
                    txn.execute(
                        "DELETE FROM cache_invalidation_stream_by_instance WHERE stream_id IN (\
                         SELECT stream_id FROM cache_invalidation_stream_by_instance \
                         WHERE invalidation_ts < $1 ORDER BY stream_id LIMIT $2)",
                        &[&cutoff_ms, &batch],
                    )
                    .await
                })
            })
            .await
    }

    /// Prunes in the background for as long as the returned task runs: first a
    /// minute after start, then every minute while a backlog remains, else hourly.
    pub fn prune_forever(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        const BATCH: usize = 20_000;
        let stream = Arc::clone(self);
        tokio::spawn(async move {
            let mut pause = Duration::from_secs(60);
            loop {
                tokio::time::sleep(pause).await;
                pause = match stream.prune(BATCH).await {
                    Ok(deleted) if deleted >= BATCH as u64 => Duration::from_secs(60),
                    Ok(_) => Duration::from_secs(3600),
                    Err(err) => {
                        tracing::warn!("failed to prune old cache invalidations: {err}");
                        Duration::from_secs(60)
                    }
                };
            }
        })
    }
}
