//! Stream ID generators: allocation of stream IDs by several writers, and the
//! positions every process tracks for each writer.
//!
//! [`MultiWriterIdGenerator`] takes IDs from a PostgreSQL sequence (on SQLite, an
//! in-process counter: SQLite serves one process). A counter keeps its
//! high-water mark in `stream_id_high_water`, so that, like a sequence, it never
//! hands an ID out twice, even across restarts. Writers finish IDs out of
//! order; a stream's current token is the largest ID such that every ID at or
//! below it is finished, and positions never move backwards. After each
//! successful write a writer records its position in `stream_positions`, so a
//! restart reads that table instead of scanning the stream's tables; bursts of
//! writes share upserts (one in flight, the latest queued).
//!
//! ```no_run
//! # async fn example(db: store_core::Database) -> Result<(), store_core::StoreError> {
//! use store_core::{MultiWriterConfig, MultiWriterIdGenerator, StreamTable};
//!
//! let events = MultiWriterIdGenerator::new(&db, MultiWriterConfig {
//!     stream_name: "events".to_owned(),
//!     instance_name: "persister1".to_owned(),
//!     tables: vec![StreamTable::new("events", "instance_name", "stream_ordering")],
//!     sequence_name: "events_stream_seq".to_owned(),
//!     writers: vec!["persister1".to_owned(), "persister2".to_owned()],
//!     ..Default::default()
//! })
//! .await?;
//! let guard = events.get_next().await?;
//! // … insert the row with stream ID `guard.id()` …
//! guard.finish().await?; // the position moves on, and is recorded
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use crate::{Database, Engine, StoreError, Transaction};

mod startup;
mod tracker;

pub use tracker::{FetchToken, PositionTracker};

/// The default of [`MultiWriterConfig::background_record_delay`].
pub const DEFAULT_BACKGROUND_RECORD_DELAY: Duration = Duration::from_millis(20);

/// A table holding rows of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTable {
    /// The table's name.
    pub table: String,
    /// The column naming the instance that wrote each row.
    pub instance_column: String,
    /// The column holding each row's stream ID.
    pub id_column: String,
}

impl StreamTable {
    /// Describes `table`, whose rows carry the writer in `instance_column` and the
    /// stream ID in `id_column`.
    pub fn new(table: &str, instance_column: &str, id_column: &str) -> StreamTable {
        StreamTable {
            table: table.to_owned(),
            instance_column: instance_column.to_owned(),
            id_column: id_column.to_owned(),
        }
    }
}

/// What a [`MultiWriterIdGenerator`] generates IDs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiWriterConfig {
    /// The key of this stream in `stream_positions`.
    pub stream_name: String,
    /// This process.
    pub instance_name: String,
    /// The tables rows of the stream may live in.
    pub tables: Vec<StreamTable>,
    /// The PostgreSQL sequence IDs come from (unused on SQLite).
    pub sequence_name: String,
    /// The instances allowed to allocate. Empty means any instance may, and
    /// `stream_positions` is never read or written (the `caches` stream: after a
    /// restart there are no caches to invalidate).
    pub writers: Vec<String>,
    /// Writers taken out of the stream, with their final positions (signed):
    /// a token naming one counts it there. Everything they wrote is committed,
    /// so a process starting follows them no further.
    pub retired: BTreeMap<String, i64>,
    /// `true` for IDs 1, 2, 3, …; `false` for −1, −2, −3, … (backfill).
    pub positive: bool,
    /// How long a position finished inside a transaction (`get_next_txn`) waits
    /// before being recorded in the background, so that the writes of that
    /// interval share one upsert.
    pub background_record_delay: Duration,
}

impl MultiWriterConfig {
    /// The generator of `stream` for the process `settings` describes: its
    /// instance name, and the stream's configured writers.
    pub fn for_stream(
        settings: &crate::StoreSettings,
        stream: &str,
        tables: Vec<StreamTable>,
        sequence_name: &str,
    ) -> MultiWriterConfig {
        MultiWriterConfig {
            stream_name: stream.to_owned(),
            instance_name: settings.instance_name.clone(),
            tables,
            sequence_name: sequence_name.to_owned(),
            writers: settings.writers_for(stream),
            ..MultiWriterConfig::default()
        }
    }
}

impl Default for MultiWriterConfig {
    fn default() -> Self {
        MultiWriterConfig {
            stream_name: String::new(),
            instance_name: String::new(),
            tables: Vec::new(),
            sequence_name: String::new(),
            writers: Vec::new(),
            retired: BTreeMap::new(),
            positive: true,
            background_record_delay: DEFAULT_BACKGROUND_RECORD_DELAY,
        }
    }
}

/// Allocates stream IDs for several writers and tracks every writer's position.
///
/// `Send + Sync`; share it behind an `Arc`. See the module docs.
#[derive(Clone)]
pub struct MultiWriterIdGenerator {
    inner: Arc<Inner>,
}

/// Where new IDs come from.
enum IdSource {
    /// The name was checked at construction to be a plain identifier.
    Sequence {
        name: String,
        /// `SELECT nextval(…)`, the common case of one ID.
        next_one: Arc<str>,
        /// `n` IDs in one statement.
        next_many: Arc<str>,
        /// The sequence's state: what it has handed out.
        read_last: Arc<str>,
    },
    /// Shared with the background writes of abandoned IDs' high-water mark.
    Counter(Arc<Counter>),
}

impl IdSource {
    fn sequence(name: &str) -> IdSource {
        IdSource::Sequence {
            name: name.to_owned(),
            next_one: format!("SELECT nextval('{name}')").into(),
            next_many: format!("SELECT nextval('{name}') FROM generate_series(1, $1)").into(),
            read_last: format!("SELECT last_value, is_called FROM {name}").into(),
        }
    }
}

/// An in-process counter (SQLite), with the
/// highest ID it ever handed out kept in `stream_id_high_water`.
///
/// A stream's position must never pass an ID whose high-water mark is not
/// durable: a client may be handed a token covering it, and a restart would
/// then hand the ID out again for a row that client never receives. Committed
/// IDs are covered by the upsert in their own transaction (one statement, no
/// extra commit); abandoned ones (a rollback, a dropped guard) by a small
/// transaction of their own before they count as finished.
struct Counter {
    db: Database,
    stream_name: String,
    /// 1 for positive streams, −1 for backwards ones.
    factor: i64,
    /// The last ID handed out (internal); `None` until the first allocation.
    last: Mutex<Option<i64>>,
    /// The highest ID known to be recorded in `stream_id_high_water` (internal).
    durable: AtomicI64,
    /// Held while a high-water mark is written on its own: one at a time, and
    /// each writes the last ID handed out, covering everyone queued behind it.
    writing: tokio::sync::Mutex<()>,
    /// IDs given up before a high-water mark covered them, each set with its
    /// highest: finished by whatever makes a mark cover them first, the
    /// background write of their own or the commit of a later write.
    abandoned: Mutex<Vec<(i64, Vec<i64>)>>,
}

/// Moves a stream's high-water mark away from zero, never back. The same on
/// both engines.
const UPSERT_HIGH_WATER: &str = "INSERT INTO stream_id_high_water (stream_name, stream_id) VALUES ($1, $2) \
     ON CONFLICT (stream_name) DO UPDATE SET stream_id = EXCLUDED.stream_id \
     WHERE ABS(stream_id_high_water.stream_id) < ABS(EXCLUDED.stream_id)";

/// How far a counter's high-water mark runs ahead of the IDs it covers: a
/// restart skips at most that many IDs, and a busy writer writes the mark once
/// per that many IDs instead of once per transaction (which cost SQLite a
/// fifth of its commit rate).
const HIGH_WATER_LEAD: i64 = 100;

/// The first pause before an abandoned ID's high-water mark is written again,
/// doubling up to [`HIGH_WATER_MAX_BACKOFF`].
const HIGH_WATER_FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause between two attempts: the stream's position waits meanwhile.
const HIGH_WATER_MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Counter {
    fn new(db: &Database, config: &MultiWriterConfig) -> Counter {
        Counter {
            db: db.clone(),
            stream_name: config.stream_name.clone(),
            factor: if config.positive { 1 } else { -1 },
            last: Mutex::new(None),
            durable: AtomicI64::new(0),
            writing: tokio::sync::Mutex::new(()),
            abandoned: Mutex::new(Vec::new()),
        }
    }

    fn lock_last(&self) -> MutexGuard<'_, Option<i64>> {
        // Updated in one assignment: a poisoned lock still holds a valid value.
        self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `n` fresh IDs, starting above `floor()` (the highest ID seen) and
    /// the high-water mark the first time.
    fn next(&self, n: usize, floor: impl FnOnce() -> i64) -> Result<Vec<i64>, StoreError> {
        let n =
            i64::try_from(n).map_err(|_| StoreError::Misconfigured("too many IDs asked for".to_owned()))?;
        let mut last = self.lock_last();
        let start = last.unwrap_or_else(|| floor().max(self.durable.load(Ordering::Acquire)));
        *last = Some(start + n);
        Ok((start + 1..=start + n).collect())
    }

    /// The last ID handed out in this process's life, 0 before the first.
    fn last_handed_out(&self) -> i64 {
        self.lock_last().unwrap_or(0)
    }

    fn is_durable(&self, id: i64) -> bool {
        self.durable.load(Ordering::Acquire) >= id
    }

    /// Records a mark covering `highest` in `txn`, the transaction its row goes
    /// in: durable exactly when the row is. The mark runs
    /// [`HIGH_WATER_LEAD`] IDs ahead, so only one write in that many pays the
    /// statement. Returns the mark written, to pass to [`Counter::committed`].
    async fn record_in(&self, txn: &mut Transaction, highest: i64) -> Result<Option<i64>, StoreError> {
        if self.is_durable(highest) {
            return Ok(None);
        }
        let mark = highest.saturating_add(HIGH_WATER_LEAD);
        // With the COMMIT: nothing waits for it, and it commits with the row.
        txn.execute_at_commit(UPSERT_HIGH_WATER, &[&self.stream_name, &(mark * self.factor)]);
        Ok(Some(mark))
    }

    /// Called after the transaction of [`Counter::record_in`] committed.
    fn committed(&self, mark: i64) {
        self.durable.fetch_max(mark, Ordering::AcqRel);
    }

    /// Takes the abandoned IDs a high-water mark now covers.
    fn take_durable_abandoned(&self) -> Vec<i64> {
        let mut abandoned = self.abandoned.lock().unwrap_or_else(PoisonError::into_inner);
        if abandoned.is_empty() {
            return Vec::new();
        }
        let durable = self.durable.load(Ordering::Acquire);
        let mut covered = Vec::new();
        abandoned.retain_mut(|(highest, ids)| {
            let keep = *highest > durable;
            if !keep {
                covered.append(ids);
            }
            keep
        });
        covered
    }

    /// Makes the high-water mark cover `highest`, in a transaction of its own.
    async fn make_durable(&self, highest: i64) -> Result<(), StoreError> {
        if self.is_durable(highest) {
            return Ok(());
        }
        let _writing = self.writing.lock().await;
        if self.is_durable(highest) {
            return Ok(());
        }
        let latest = self.last_handed_out().max(highest).saturating_add(HIGH_WATER_LEAD);
        let (stream_name, signed) = (self.stream_name.clone(), latest * self.factor);
        self.db
            .run_autocommit("record_stream_id_high_water", move |txn| {
                let stream_name = stream_name.clone();
                Box::pin(
                    async move { txn.execute(UPSERT_HIGH_WATER, &[&stream_name, &signed]).await.map(|_| ()) },
                )
            })
            .await?;
        self.durable.fetch_max(latest, Ordering::AcqRel);
        Ok(())
    }
}

struct Inner {
    db: Database,
    stream_name: String,
    instance_name: String,
    /// 1 for positive streams, −1 for backwards ones.
    factor: i64,
    /// Whether this process may allocate: it is one of the stream's active
    /// writers (or the stream has no list), and has joined it.
    may_allocate: AtomicBool,
    /// The writers whose positions are followed (the active ones of the epoch applied here); empty
    /// means any instance (the `caches` stream). Changes with the stream's
    /// epoch ([`MultiWriterIdGenerator::track_writers`]).
    writers: Mutex<Vec<String>>,
    /// Set once this process writes the stream (at start-up or when it joins
    /// its writers), and so records its position in `stream_positions`.
    positions_table: OnceLock<PositionsTable>,
    /// How long positions finished in transactions wait to be recorded.
    background_record_delay: Duration,
    /// The tables the stream's rows live in.
    tables: Vec<StreamTable>,
    source: IdSource,
    tracker: Mutex<PositionTracker>,
    /// The highest ID (internal) the source is known to have handed out, from
    /// what start-up read and the last read of the sequence; the tracker knows
    /// the rest.
    handed_out: AtomicI64,
    /// Held while the sequence is read for [`MultiWriterIdGenerator::is_handed_out`],
    /// so that concurrent callers share one read.
    reading_sequence: tokio::sync::Mutex<()>,
    /// Bumped whenever a position may have moved (a finish, an advance), so the
    /// replication streamer and anyone waiting on a position wake up.
    changes: tokio::sync::watch::Sender<u64>,
}

/// Recording this writer's position, coalesced.
struct PositionsTable {
    /// The upsert, for this stream's direction.
    upsert_sql: &'static UpsertSql,
    /// Held while an upsert runs: one in flight; whoever waits next writes the
    /// latest position for everyone queued behind.
    in_flight: tokio::sync::Mutex<()>,
    /// The highest (internal) position stored so far by this process.
    stored: AtomicI64,
    /// Upserts run, for tests and benchmarks.
    writes: AtomicU64,
    /// The latest position finished inside a transaction, for the background
    /// recorder; dropping the generator closes it, which stops the recorder.
    background: tokio::sync::watch::Sender<i64>,
}

impl UpsertSql {
    fn for_engine(&self, engine: Engine) -> &'static str {
        match engine {
            Engine::Postgres => self.postgres,
            Engine::Sqlite => self.sqlite,
        }
    }
}

impl PositionsTable {
    /// The table state of a writer that has stored `stored` (internal) so far,
    /// and the receiving end of its background recorder.
    fn new(positive: bool, stored: i64) -> (PositionsTable, tokio::sync::watch::Receiver<i64>) {
        let (background, receiver) = tokio::sync::watch::channel(stored);
        let table = PositionsTable {
            upsert_sql: if positive { &UPSERT_POSITIVE } else { &UPSERT_NEGATIVE },
            in_flight: tokio::sync::Mutex::new(()),
            stored: AtomicI64::new(stored),
            writes: AtomicU64::new(0),
            background,
        };
        (table, receiver)
    }
}

/// The forward-only upsert of a writer's position, per engine.
struct UpsertSql {
    /// One statement, outside any transaction, that also turns off the WAL flush
    /// for its own commit: a recorded position is a lower bound that start-up
    /// completes from the sequence and the rows above it, so losing the last few
    /// to a server crash is harmless, and the flush would double the cost of an
    /// awaited record.
    postgres: &'static str,
    /// WAL mode with `synchronous = NORMAL` does not flush on commit anyway.
    sqlite: &'static str,
}

static UPSERT_POSITIVE: UpsertSql = UpsertSql {
    postgres: "INSERT INTO stream_positions (stream_name, instance_name, stream_id) \
         SELECT $1, $2, $3 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush \
         ON CONFLICT (stream_name, instance_name) DO UPDATE SET stream_id = EXCLUDED.stream_id \
         WHERE stream_positions.stream_id < EXCLUDED.stream_id",
    sqlite: "INSERT INTO stream_positions (stream_name, instance_name, stream_id) VALUES ($1, $2, $3) \
         ON CONFLICT (stream_name, instance_name) DO UPDATE SET stream_id = EXCLUDED.stream_id \
         WHERE stream_positions.stream_id < EXCLUDED.stream_id",
};

static UPSERT_NEGATIVE: UpsertSql = UpsertSql {
    postgres: "INSERT INTO stream_positions (stream_name, instance_name, stream_id) \
         SELECT $1, $2, $3 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush \
         ON CONFLICT (stream_name, instance_name) DO UPDATE SET stream_id = EXCLUDED.stream_id \
         WHERE stream_positions.stream_id > EXCLUDED.stream_id",
    sqlite: "INSERT INTO stream_positions (stream_name, instance_name, stream_id) VALUES ($1, $2, $3) \
         ON CONFLICT (stream_name, instance_name) DO UPDATE SET stream_id = EXCLUDED.stream_id \
         WHERE stream_positions.stream_id > EXCLUDED.stream_id",
};

impl fmt::Debug for MultiWriterIdGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_debug("MultiWriterIdGenerator", f)
    }
}

impl MultiWriterIdGenerator {
    /// Loads the stream's positions and repairs the sequence if needed (see
    /// `docs/stream-ids.md`), in a start-up transaction of its own.
    pub async fn new(db: &Database, config: MultiWriterConfig) -> Result<MultiWriterIdGenerator, StoreError> {
        let mut conn = db.begin("load_stream_positions").await?;
        let generator = MultiWriterIdGenerator::new_in(db, &mut conn, config).await?;
        conn.commit().await?;
        Ok(generator)
    }

    /// Like [`MultiWriterIdGenerator::new`], on a store constructor's start-up
    /// connection (`Store::new(db, conn, ctx)`); the caller commits.
    pub async fn new_in(
        db: &Database,
        conn: &mut Transaction,
        config: MultiWriterConfig,
    ) -> Result<MultiWriterIdGenerator, StoreError> {
        startup::validate(&config)?;
        let source = match db.engine() {
            Engine::Postgres => IdSource::sequence(&config.sequence_name),
            Engine::Sqlite => IdSource::Counter(Arc::new(Counter::new(db, &config))),
        };
        let (inner, background) = Inner::load(db, conn, &config, source).await?;
        let inner = Arc::new(inner);
        if let Some(background) = background {
            inner.start_recording(background);
        }
        Ok(MultiWriterIdGenerator { inner })
    }

    /// The stream's current token: every ID at or below it is finished.
    pub fn get_current_token(&self) -> i64 {
        self.inner.get_current_token()
    }

    /// Same as [`MultiWriterIdGenerator::get_current_token`].
    pub fn get_persisted_upto_position(&self) -> i64 {
        self.inner.get_current_token()
    }

    /// The position of `writer` as known here (never below the current token);
    /// for this process, the best it can claim.
    pub fn get_current_token_for_writer(&self, writer: &str) -> i64 {
        self.inner.get_current_token_for_writer(writer)
    }

    /// The position of this process's last finished write: what another process
    /// should wait for after asking this one to write.
    pub fn get_minimal_local_current_token(&self) -> i64 {
        self.inner.get_minimal_local_current_token()
    }

    /// Every writer's position as known here.
    pub fn get_positions(&self) -> BTreeMap<String, i64> {
        self.inner.get_positions()
    }

    /// Whether `instance` is one of the stream's configured writers (any
    /// instance, when the config lists none): replication takes positions only
    /// from them.
    pub fn is_writer(&self, instance: &str) -> bool {
        let writers = self.inner.lock_writers();
        writers.is_empty() || writers.iter().any(|writer| writer == instance)
    }

    /// Whether `instance` was one of the stream's writers and was retired:
    /// replication ignores what it still says instead of refusing it.
    pub fn is_retired(&self, instance: &str) -> bool {
        self.inner.tracker().retired_position(instance).is_some()
    }

    /// Whether this process may allocate IDs now.
    pub fn is_allocating(&self) -> bool {
        self.inner.may_allocate.load(Ordering::Acquire)
    }

    /// Follows the positions of `writers` (a stream's active writers, as a
    /// new epoch lists them): a writer new here starts at the
    /// stream's current position, as at start-up, and one retired before is
    /// followed again.
    pub fn track_writers(&self, writers: &[String]) {
        {
            let mut tracker = self.inner.tracker();
            for writer in writers {
                tracker.track(writer);
            }
        }
        let mut listed = self.inner.lock_writers();
        for writer in writers {
            if !listed.contains(writer) {
                listed.push(writer.clone());
            }
        }
        drop(listed);
        self.inner.changed();
    }

    /// Stops following `writer`, taken out of the stream's writers, whose
    /// writes up to `final_position` (signed) this process has applied: it
    /// no longer holds the stream's position back, and a token naming it
    /// counts it at `final_position`. Retiring this process stops its
    /// allocations.
    pub fn retire(&self, writer: &str, final_position: i64) {
        let internal = (final_position * self.inner.factor).max(1);
        if writer == self.inner.instance_name {
            self.inner.may_allocate.store(false, Ordering::Release);
        }
        self.inner.tracker().retire(writer, internal);
        self.inner.lock_writers().retain(|listed| listed != writer);
        self.inner.changed();
    }

    /// Stops this process's allocations (a writer draining, or one that has
    /// not joined the stream's writers yet); IDs already handed out finish as
    /// usual.
    pub fn stop_allocating(&self) {
        self.inner.may_allocate.store(false, Ordering::Release);
    }

    /// Makes this process one of the stream's writers at runtime: it claims
    /// the stream's current position (finished, so safe to announce), records
    /// it in `stream_positions` before allocating anything, as a writer does
    /// at start-up, and starts allocating.
    ///
    /// Call it only once every process follows this one's positions
    /// ([`MultiWriterIdGenerator::track_writers`] everywhere): a process that
    /// did not could move its position past an ID of ours it never heard of.
    pub async fn become_writer(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        if !inner.lock_writers().contains(&inner.instance_name) {
            self.track_writers(std::slice::from_ref(&inner.instance_name));
        }
        let claim = {
            let mut tracker = inner.tracker();
            tracker.claim_own_position();
            tracker.position_for_writer(&inner.instance_name)
        };
        if inner.positions_table.get().is_none() {
            let (table, receiver) = PositionsTable::new(inner.factor > 0, 0);
            if inner.positions_table.set(table).is_ok() {
                inner.start_recording(receiver);
            }
        }
        inner.record_position(claim).await?;
        inner.may_allocate.store(true, Ordering::Release);
        inner.changed();
        Ok(())
    }

    /// Records another writer's position, learned from replication. Positions
    /// never move backwards.
    pub fn advance(&self, writer: &str, position: i64) {
        self.inner.advance(writer, position);
    }

    /// Allocates one ID. Finish the guard after the row is committed; drop it if
    /// the write failed.
    pub async fn get_next(&self) -> Result<StreamIdGuard, StoreError> {
        Inner::allocate(&self.inner, 1, None).await.map(StreamIdGuard::from_single)
    }

    /// Allocates `n` IDs at once.
    pub async fn get_next_mult(&self, n: usize) -> Result<StreamIdsGuard, StoreError> {
        Inner::allocate(&self.inner, n, None).await
    }

    /// Allocates one ID inside `txn`, whose rows must carry it. The ID is finished
    /// when the transaction ends: on commit the position moves and is recorded in
    /// the background; on rollback it moves without being recorded.
    pub async fn get_next_txn(&self, txn: &mut Transaction) -> Result<i64, StoreError> {
        let ids = self.get_next_mult_txn(txn, 1).await?;
        Ok(ids[0])
    }

    /// Like [`MultiWriterIdGenerator::get_next_txn`], for `n` IDs.
    pub async fn get_next_mult_txn(&self, txn: &mut Transaction, n: usize) -> Result<Vec<i64>, StoreError> {
        let guard = Inner::allocate(&self.inner, n, Some(txn)).await?;
        let mut mark = None;
        if let (IdSource::Counter(counter), Some(highest)) = (&self.inner.source, guard.highest_internal()) {
            // Should this fail, or the future be dropped, the guard's drop
            // records the IDs on their own before finishing them.
            mark = counter.record_in(txn, highest).await?;
        }
        let ids = guard.ids().to_vec();
        guard.finish_with_transaction(txn, mark);
        Ok(ids)
    }

    /// Whether `position` (signed like [`MultiWriterIdGenerator::advance`]'s:
    /// negative on backwards streams) has been handed out by the stream's
    /// sequence, by any process: replication refuses a token beyond that.
    ///
    /// Answers without a query when the position is at or below the highest ID
    /// this generator already knows of (allocated here, advanced to, loaded at
    /// start-up, or read before). Otherwise, on PostgreSQL, it reads the
    /// sequence (one read at a time; callers waiting meanwhile share its
    /// answer) and remembers what it read. On SQLite the counter is this
    /// process's own, so what it knows is the whole answer. Zero and positions
    /// of the other direction are never handed out.
    pub async fn is_handed_out(&self, position: i64) -> Result<bool, StoreError> {
        let Some(internal) = position.checked_mul(self.inner.factor).filter(|internal| *internal >= 1) else {
            return Ok(false);
        };
        if internal <= self.inner.known_handed_out() {
            return Ok(true);
        }
        let IdSource::Sequence { read_last, .. } = &self.inner.source else { return Ok(false) };
        let _reading = self.inner.reading_sequence.lock().await;
        if internal <= self.inner.known_handed_out() {
            return Ok(true);
        }
        let sql = Arc::clone(read_last);
        let last_handed_out = self
            .inner
            .db
            .run_autocommit("read_stream_sequence", move |txn| {
                let sql = Arc::clone(&sql);
                Box::pin(async move {
                    let row = txn.query_one(&sql, &[]).await?;
                    let (last_value, is_called): (i64, bool) = (row.get(0)?, row.get(1)?);
                    // Not yet called: `last_value` is the next value, not handed out.
                    Ok(if is_called { last_value } else { last_value - 1 })
                })
            })
            .await?;
        self.inner.handed_out.fetch_max(last_handed_out, Ordering::AcqRel);
        Ok(internal <= last_handed_out)
    }

    /// Records that `position` (signed like [`MultiWriterIdGenerator::advance`]'s)
    /// was handed out, as a writer of the stream said in an answer this process
    /// asked for over an authenticated call (a forwarded write's): replication
    /// bringing that position then needs no read of the sequence, which is on
    /// the way of the forwarding process's read-your-writes.
    pub fn learn_handed_out(&self, position: i64) {
        if let Some(internal) = position.checked_mul(self.inner.factor).filter(|internal| *internal >= 1) {
            self.inner.handed_out.fetch_max(internal, Ordering::AcqRel);
        }
    }

    /// Records this writer's current position now, including positions finished
    /// in transactions and not yet recorded in the background. For a clean
    /// shutdown.
    pub async fn flush(&self) -> Result<(), StoreError> {
        if self.inner.positions_table.get().is_none() || !self.is_writer(&self.inner.instance_name) {
            // A writer taken out of the stream: its row is retired, not renewed.
            return Ok(());
        }
        let position = self.inner.tracker().position_for_writer(&self.inner.instance_name);
        self.inner.record_position(position).await
    }

    /// A receiver that sees a change whenever a position may have moved (an ID
    /// finished here, or another writer's position advanced).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Waits until this process knows `writer` to be at `token` or beyond: what a
    /// read that takes a token from a client does first, so a lagging process
    /// never serves data older than the token promised. Returns at once for
    /// this process's own instance; fails with [`StoreError::Timeout`] after
    /// `timeout`.
    pub async fn wait_for(
        &self,
        writer: &str,
        token: i64,
        timeout: std::time::Duration,
    ) -> Result<(), StoreError> {
        if writer == self.inner.instance_name {
            // Our own writes are ours to know: nothing to wait for (a token from
            // before a restart would otherwise wait for ever).
            return Ok(());
        }
        let mut changes = self.inner.changes.subscribe();
        // Compared as magnitudes, so backwards streams wait the same way.
        let factor = self.inner.factor;
        let reached = || self.get_current_token_for_writer(writer) * factor >= token * factor;
        let wait = async {
            while !reached() {
                if changes.changed().await.is_err() {
                    // The generator is gone; nothing will move any more.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| StoreError::Timeout {
            stream: self.inner.stream_name.clone(),
            writer: writer.to_owned(),
            token,
            reached: self.get_current_token_for_writer(writer),
        })
    }

    /// Each of `writers`' position (signed) as the database shows it while no
    /// write of the stream is in flight (a change of the stream's writers
    /// holds the fence): its recorded position, or its last row above that.
    /// Everything each wrote at or below its position is committed.
    pub async fn positions_at_fence(
        &self,
        txn: &mut Transaction,
        writers: &[String],
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        let (inner, factor) = (&self.inner, self.inner.factor);
        let mut positions = BTreeMap::new();
        for writer in writers {
            let recorded = txn
                .query_opt(
                    "SELECT stream_id FROM stream_positions WHERE stream_name = $1 AND instance_name = $2",
                    &[&inner.stream_name, writer],
                )
                .await?
                .map(|row| row.get::<i64>(0))
                .transpose()?;
            let mut highest = recorded.map_or(1, |position| (position * factor).max(1));
            for table in &inner.tables {
                let (instance, id, name) = (&table.instance_column, &table.id_column, &table.table);
                let sql = if factor > 0 {
                    format!("SELECT MAX({id}) FROM {name} WHERE {instance} = $1 AND {id} > $2")
                } else {
                    format!("SELECT -MIN({id}) FROM {name} WHERE {instance} = $1 AND {id} < $2")
                };
                let row = txn.query_one(&sql, &[writer, &(highest * factor)]).await?;
                if let Some(top) = row.get::<Option<i64>>(0)? {
                    highest = highest.max(top);
                }
            }
            positions.insert(writer.clone(), highest * factor);
        }
        Ok(positions)
    }

    /// How many upserts of `stream_positions` this generator has run: a burst of
    /// writes shares them.
    pub fn stream_positions_writes(&self) -> u64 {
        self.inner.positions_table.get().map_or(0, |table| table.writes.load(Ordering::Relaxed))
    }

    /// How long this process's oldest unfinished write on the stream has been
    /// in flight; `None` when nothing is. Every reader's token waits for it.
    pub fn oldest_in_flight_age(&self) -> Option<std::time::Duration> {
        self.inner.tracker().oldest_unfinished_age(std::time::Instant::now())
    }
}

impl Inner {
    fn fmt_debug(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tracker = self.tracker();
        f.debug_struct(name)
            .field("stream_name", &self.stream_name)
            .field("instance_name", &self.instance_name)
            .field("current_token", &(tracker.persisted_upto() * self.factor))
            .field("positions", tracker.positions())
            .finish_non_exhaustive()
    }

    /// Starts recording the positions finished inside transactions, in the
    /// background, until the generator is dropped.
    fn start_recording(self: &Arc<Inner>, latest: tokio::sync::watch::Receiver<i64>) {
        tokio::spawn(record_in_background(Arc::downgrade(self), latest, self.background_record_delay));
    }

    fn lock_writers(&self) -> MutexGuard<'_, Vec<String>> {
        self.writers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tracker(&self) -> MutexGuard<'_, PositionTracker> {
        // Every critical section leaves the tracker consistent before anything that
        // could panic; a poisoned lock still holds valid state.
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get_current_token(&self) -> i64 {
        self.tracker().persisted_upto() * self.factor
    }

    /// The highest ID (internal) known here to have been handed out.
    fn known_handed_out(&self) -> i64 {
        let seen = self.tracker().max_seen_allocated();
        let counted = match &self.source {
            IdSource::Counter(counter) => counter.last_handed_out(),
            IdSource::Sequence { .. } => 0,
        };
        seen.max(counted).max(self.handed_out.load(Ordering::Acquire))
    }

    fn get_current_token_for_writer(&self, writer: &str) -> i64 {
        self.tracker().position_for_writer(writer) * self.factor
    }

    fn get_minimal_local_current_token(&self) -> i64 {
        self.tracker().minimal_local() * self.factor
    }

    fn get_positions(&self) -> BTreeMap<String, i64> {
        self.tracker()
            .positions()
            .iter()
            .map(|(writer, position)| (writer.clone(), position * self.factor))
            .collect()
    }

    fn advance(&self, writer: &str, position: i64) {
        let internal = position * self.factor;
        if internal < 1 {
            // A position from the other direction, or zero: no real writer sends
            // one, and taking it would corrupt the bookkeeping.
            tracing::warn!(stream = %self.stream_name, writer, position, "ignoring an impossible stream position");
            return;
        }
        self.tracker().advance(writer, internal);
        self.changed();
    }

    async fn allocate(
        inner: &Arc<Inner>,
        n: usize,
        txn: Option<&mut Transaction>,
    ) -> Result<StreamIdsGuard, StoreError> {
        if !inner.may_allocate.load(Ordering::Acquire) {
            return Err(StoreError::NotAWriter {
                stream: inner.stream_name.clone(),
                instance: inner.instance_name.clone(),
            });
        }
        if n == 0 {
            return Ok(StreamIdsGuard {
                inner: Arc::clone(inner),
                internal_ids: Vec::new(),
                ids: Vec::new(),
                done: true,
            });
        }
        let fetch = FetchGuard::begin(inner);
        let internal_ids = inner.next_ids(n, txn).await?;
        fetch.end(&internal_ids);
        let ids = internal_ids.iter().map(|id| id * inner.factor).collect();
        Ok(StreamIdsGuard { inner: Arc::clone(inner), internal_ids, ids, done: false })
    }

    /// Takes `n` fresh IDs (internal, ascending) from the sequence or counter.
    async fn next_ids(&self, n: usize, txn: Option<&mut Transaction>) -> Result<Vec<i64>, StoreError> {
        match &self.source {
            // Start above everything seen and the high-water mark, so no ID is ever
            // handed out twice.
            IdSource::Counter(counter) => counter.next(n, || self.tracker().max_seen_allocated()),
            IdSource::Sequence { next_one, next_many, .. } => {
                let n = i64::try_from(n)
                    .map_err(|_| StoreError::Misconfigured("too many IDs asked for".to_owned()))?;
                // One ID is by far the most common request; a set-returning function
                // costs the server noticeably more than a plain call.
                let sql = if n == 1 { next_one } else { next_many };
                match txn {
                    // nextval ignores transactions; the caller's connection saves a
                    // trip to the pool.
                    Some(txn) => fetch_sequence_ids(txn, sql, n).await,
                    None => {
                        let sql = Arc::clone(sql);
                        self.db
                            .run_autocommit("allocate_stream_ids", move |txn| {
                                let sql = Arc::clone(&sql);
                                Box::pin(async move { fetch_sequence_ids(txn, &sql, n).await })
                            })
                            .await
                    }
                }
            }
        }
    }

    /// Makes the high-water mark of a counter cover `internal_ids`, so they may
    /// count as finished; nothing to do for a sequence.
    async fn make_durable(&self, internal_ids: &[i64]) -> Result<(), StoreError> {
        match (&self.source, internal_ids.iter().copied().max()) {
            (IdSource::Counter(counter), Some(highest)) => counter.make_durable(highest).await,
            _ => Ok(()),
        }
    }

    /// Marks IDs finished that were abandoned (rolled back, or their guard
    /// dropped), once a counter's high-water mark covers them: until then a
    /// restart could hand them out again, so the position must not pass them.
    /// That write happens in the background, retried until it succeeds.
    fn abandon(inner: &Arc<Inner>, internal_ids: Vec<i64>) {
        let pending = match (&inner.source, internal_ids.iter().copied().max()) {
            (IdSource::Counter(counter), Some(highest)) if !counter.is_durable(highest) => {
                Some((Arc::clone(counter), highest))
            }
            _ => None,
        };
        let Some((counter, highest)) = pending else {
            inner.mark_finished(&internal_ids);
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                counter
                    .abandoned
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((highest, internal_ids));
                runtime.spawn(finish_when_durable(Arc::downgrade(inner), counter, highest));
            }
            Err(_) => tracing::warn!(
                stream = %inner.stream_name,
                ?internal_ids,
                "no runtime to record abandoned stream IDs in; the stream's position stays below them"
            ),
        }
    }

    /// Finishes the abandoned IDs a high-water mark now covers, if any.
    fn finish_durable_abandoned(&self, counter: &Counter) {
        let covered = counter.take_durable_abandoned();
        if !covered.is_empty() {
            self.mark_finished(&covered);
        }
    }

    /// Marks IDs finished; returns the position to record, if recording applies.
    fn mark_finished(&self, internal_ids: &[i64]) -> Option<i64> {
        let wanted = {
            let mut tracker = self.tracker();
            tracker.mark_finished(internal_ids);
            self.positions_table.get().map(|_| tracker.position_for_writer(&self.instance_name))
        };
        self.changed();
        wanted
    }

    fn changed(&self) {
        self.changes.send_modify(|version| *version = version.wrapping_add(1));
    }

    /// Records this writer's position (at least `wanted`, internal) in
    /// `stream_positions`. Concurrent callers share upserts: one runs at a time,
    /// and it writes the latest position, covering everyone queued behind it.
    async fn record_position(&self, wanted: i64) -> Result<(), StoreError> {
        let Some(table) = self.positions_table.get() else { return Ok(()) };
        if table.stored.load(Ordering::Acquire) >= wanted {
            return Ok(());
        }
        let _in_flight = table.in_flight.lock().await;
        if table.stored.load(Ordering::Acquire) >= wanted {
            return Ok(());
        }
        let position = self.tracker().position_for_writer(&self.instance_name);
        let (stream_name, instance_name) = (self.stream_name.clone(), self.instance_name.clone());
        let signed = position * self.factor;
        let sql = table.upsert_sql.for_engine(self.db.engine());
        self.db
            .run_autocommit("update_stream_positions", move |txn| {
                let (stream_name, instance_name) = (stream_name.clone(), instance_name.clone());
                Box::pin(async move {
                    txn.execute(sql, &[&stream_name, &instance_name, &signed]).await.map(|_| ())
                })
            })
            .await?;
        table.writes.fetch_add(1, Ordering::Relaxed);
        table.stored.fetch_max(position, Ordering::AcqRel);
        Ok(())
    }
}

/// Records positions finished inside transactions, at most once per `delay`:
/// the writes of that interval share one upsert. Ends when the generator is
/// dropped.
async fn record_in_background(
    inner: Weak<Inner>,
    mut latest: tokio::sync::watch::Receiver<i64>,
    delay: Duration,
) {
    while latest.changed().await.is_ok() {
        tokio::time::sleep(delay).await;
        let wanted = *latest.borrow_and_update();
        let Some(inner) = inner.upgrade() else { return };
        if let Err(err) = inner.record_position(wanted).await {
            // The next write records a later position, and start-up copes with a
            // stale one; a warning is all this deserves.
            tracing::warn!(stream = %inner.stream_name, "failed to record the stream position: {err}");
        }
    }
}

/// Finishes abandoned IDs once the counter's high-water mark covers them; see
/// [`Inner::abandon`].
async fn finish_when_durable(inner: Weak<Inner>, counter: Arc<Counter>, highest: i64) {
    let mut pause = HIGH_WATER_FIRST_BACKOFF;
    while let Err(err) = counter.make_durable(highest).await {
        if inner.strong_count() == 0 {
            // Nothing can move the generator's position past these IDs any more,
            // so no token covers them: handing them out again is harmless.
            tracing::debug!(stream = %counter.stream_name, "gave up recording abandoned stream IDs of a dropped generator: {err}");
            return;
        }
        tracing::warn!(
            stream = %counter.stream_name,
            ?pause,
            "failed to record abandoned stream IDs; the stream's position waits for them: {err}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(HIGH_WATER_MAX_BACKOFF);
    }
    if let Some(inner) = inner.upgrade() {
        inner.finish_durable_abandoned(&counter);
    }
}

async fn fetch_sequence_ids(txn: &mut Transaction, sql: &str, n: i64) -> Result<Vec<i64>, StoreError> {
    let rows = if n == 1 { txn.query(sql, &[]).await? } else { txn.query(sql, &[&n]).await? };
    let mut ids = rows.iter().map(|row| row.get::<i64>(0)).collect::<Result<Vec<_>, _>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// Holds an allocation's place between asking for IDs and recording them, and
/// releases it even if the allocating future is dropped half-way.
struct FetchGuard<'a> {
    inner: &'a Inner,
    token: Option<FetchToken>,
}

impl<'a> FetchGuard<'a> {
    fn begin(inner: &'a Inner) -> FetchGuard<'a> {
        let token = inner.tracker().begin_fetch();
        FetchGuard { inner, token: Some(token) }
    }

    fn end(mut self, internal_ids: &[i64]) {
        if let Some(token) = self.token.take() {
            self.inner.tracker().end_fetch(token, internal_ids);
            self.inner.changed();
        }
    }
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            // Ending a fetch can release positions it held back: wake waiters.
            self.inner.tracker().end_fetch(token, &[]);
            self.inner.changed();
        }
    }
}

/// Allocated stream IDs, not yet finished.
///
/// [`StreamIdsGuard::finish`] after the rows are committed: the IDs count as
/// finished and this writer's position is recorded. Dropping the guard instead
/// (the write failed) marks them finished without recording anything: a
/// rolled-back ID is finished too, so it cannot hold the stream back. (From an
/// in-process counter, either way only once its high-water mark covers them,
/// which dropping the guard writes in the background.)
#[must_use = "finish the guard after committing, or drop it when the write failed"]
pub struct StreamIdsGuard {
    inner: Arc<Inner>,
    internal_ids: Vec<i64>,
    ids: Vec<i64>,
    done: bool,
}

impl fmt::Debug for StreamIdsGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamIdsGuard")
            .field("stream", &self.inner.stream_name)
            .field("ids", &self.ids)
            .finish()
    }
}

impl StreamIdsGuard {
    /// The allocated IDs, ascending in magnitude (−1, −2, … on backwards streams).
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// The highest of the IDs, as an internal magnitude.
    fn highest_internal(&self) -> Option<i64> {
        self.internal_ids.iter().copied().max()
    }

    /// Marks the IDs finished after a successful write and records this writer's
    /// position in `stream_positions` (shared with concurrent finishes).
    ///
    /// From an in-process counter, the high-water mark is written first; if that
    /// fails, so does this, and the IDs finish as a dropped guard's do.
    pub async fn finish(mut self) -> Result<(), StoreError> {
        // The guard may not have carried a row; should the write fail, or this
        // future be dropped, the guard's drop covers the IDs in the background.
        self.inner.make_durable(&self.internal_ids).await?;
        self.done = true;
        let wanted = self.inner.mark_finished(&self.internal_ids);
        match wanted {
            Some(wanted) => self.inner.record_position(wanted).await,
            None => Ok(()),
        }
    }

    /// Hands the finishing to `txn`: on commit, finish and record in the
    /// background; on rollback, finish only.
    /// `mark` is the high-water mark written in `txn`, if any.
    fn finish_with_transaction(mut self, txn: &mut Transaction, mark: Option<i64>) {
        self.done = true;
        let (inner, internal_ids) = (Arc::clone(&self.inner), std::mem::take(&mut self.internal_ids));
        let (on_failure, failed_ids) = (Arc::clone(&inner), internal_ids.clone());
        txn.call_after_position(move || {
            if let (IdSource::Counter(counter), Some(mark)) = (&inner.source, mark) {
                counter.committed(mark);
                // Given up by an earlier attempt, say: they need not wait for
                // a mark of their own, and the position can pass them with
                // these.
                inner.finish_durable_abandoned(counter);
            }
            let Some(wanted) = inner.mark_finished(&internal_ids) else { return };
            if let Some(table) = inner.positions_table.get() {
                table.background.send_if_modified(|latest| {
                    let newer = wanted > *latest;
                    *latest = (*latest).max(wanted);
                    newer
                });
            }
        });
        txn.call_on_exception(move || Inner::abandon(&on_failure, failed_ids));
    }
}

impl Drop for StreamIdsGuard {
    fn drop(&mut self) {
        if !self.done {
            Inner::abandon(&self.inner, std::mem::take(&mut self.internal_ids));
        }
    }
}

/// One allocated stream ID, not yet finished; see [`StreamIdsGuard`].
#[must_use = "finish the guard after committing, or drop it when the write failed"]
#[derive(Debug)]
pub struct StreamIdGuard {
    guard: StreamIdsGuard,
}

impl StreamIdGuard {
    fn from_single(guard: StreamIdsGuard) -> StreamIdGuard {
        debug_assert_eq!(guard.ids.len(), 1);
        StreamIdGuard { guard }
    }

    /// The allocated ID.
    pub fn id(&self) -> i64 {
        self.guard.ids[0]
    }

    /// Marks the ID finished after a successful write and records the position.
    pub async fn finish(self) -> Result<(), StoreError> {
        self.guard.finish().await
    }
}
