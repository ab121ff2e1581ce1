//! Elastic writers: the writers of a stream live in the database
//! (`deployment_stream_writers`), one *epoch* at a time, and change while the
//! deployment runs.
//!
//! - [`WriterSet`]: one epoch of a stream's writers: the active ones, in
//!   order (what shards are hashed over, [`crate::writer_for_shard`]), those
//!   taken out and still draining, those retired, and every writer's position
//!   at the change (the *handover* positions).
//! - [`DeploymentWriters`]: the epochs this process applied, one per stream,
//!   which its routing and its writers go by.
//! - [`change_stream_writers`]: a new epoch, as the master's admin endpoint
//!   makes it.
//! - The *fence* ([`fence`]): every write of an elastic stream share-locks its
//!   stream's row first, so a change waits for the writes in flight, and a
//!   write routed by an older epoch never commits after the change.
//!
//! How a process applies an epoch (the binaries' loop, [`apply_epoch`]): it
//! follows the new writers' positions, reaches every writer's handover
//! position (from replication, or from the database), retires the writers
//! taken out, then routes by the new epoch and records that it applied it
//! (`stream_writer_acks`). A writer new to the stream allocates only once
//! every live process applied the epoch ([`join_when_followed`]): before
//! that, a process that did not follow it could move its position past one of
//! its IDs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use crate::{Database, Engine, MASTER_INSTANCE, StoreError, Stream, Transaction, now_ms, writer_for_shard};

/// The magic cache name a change of writers invalidates (with the stream as
/// key) on the `caches` stream: how every process learns of a new epoch
/// through replication, at once, rather than at its next look at the record.
pub const WRITERS_CHANGED: &str = "stream_writers_changed";

/// The SQLSTATE the fence raises for a write routed by an older epoch.
pub(crate) const FENCED: &str = "HW001";

/// How long a process that has not said it is alive for counts as gone: it
/// need not apply an epoch before a new writer joins.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(10);

/// What a writer is to its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WriterState {
    /// Listed: shards are hashed over it.
    Active,
    /// Taken out; some process may not have applied its last writes yet.
    Draining,
    /// Taken out, and every live process applied its final position.
    Retired,
}

/// One epoch of a stream's writers.
///
/// ```
/// use store_core::WriterSet;
///
/// let set = WriterSet::seeded("events", vec!["persister1".into(), "persister2".into()]);
/// assert_eq!(set.epoch, 1);
/// assert!(["persister1", "persister2"].contains(&set.owner_of("!room:example.org")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterSet {
    /// The stream.
    pub stream: String,
    /// Starts at 1; each change adds one.
    pub epoch: i64,
    /// The active writers, in order.
    pub active: Vec<String>,
    /// Writers taken out and draining, at their final positions.
    pub draining: BTreeMap<String, i64>,
    /// Writers taken out for good, at their final positions.
    pub retired: BTreeMap<String, i64>,
    /// Every writer's position when the epoch began.
    pub handover: BTreeMap<String, i64>,
    /// When the epoch began (ms since the Unix epoch; 0 for a seeded one).
    pub changed_ts: i64,
}

impl WriterSet {
    /// Epoch 1 of `stream`, as a fresh database records the config's list.
    pub fn seeded(stream: &str, active: Vec<String>) -> WriterSet {
        WriterSet {
            stream: stream.to_owned(),
            epoch: 1,
            active,
            draining: BTreeMap::new(),
            retired: BTreeMap::new(),
            handover: BTreeMap::new(),
            changed_ts: 0,
        }
    }

    /// The writer of `shard` (a room, a user) in this epoch; `master` when the
    /// list is empty.
    pub fn owner_of(&self, shard: &str) -> &str {
        writer_for_shard(shard, &self.active).map_or(MASTER_INSTANCE, String::as_str)
    }

    /// The active writers, or `master` alone when none are listed.
    pub fn writers(&self) -> Vec<String> {
        if self.active.is_empty() { vec![MASTER_INSTANCE.to_owned()] } else { self.active.clone() }
    }

    /// Whether `instance` is one of the active writers.
    pub fn is_active(&self, instance: &str) -> bool {
        if self.active.is_empty() {
            instance == MASTER_INSTANCE
        } else {
            self.active.iter().any(|w| w == instance)
        }
    }

    /// Every writer with its state: active ones first, in order.
    pub fn states(&self) -> Vec<(String, WriterState)> {
        let active = self.writers().into_iter().map(|writer| (writer, WriterState::Active));
        let draining = self.draining.keys().map(|writer| (writer.clone(), WriterState::Draining));
        let retired = self.retired.keys().map(|writer| (writer.clone(), WriterState::Retired));
        active.chain(draining).chain(retired).collect()
    }

    /// The writers taken out of the stream (draining or retired), with their
    /// final positions.
    pub fn taken_out(&self) -> BTreeMap<String, i64> {
        let mut out = self.retired.clone();
        out.extend(self.draining.iter().map(|(writer, position)| (writer.clone(), *position)));
        out
    }
}

/// The epochs of the writers this process goes by, one per configurable
/// stream: adopted from the database at start-up and replaced as the process
/// applies new ones. Shared by the routing of writes and the writers' fence.
///
/// A stream without a record (stores built without `build_store`, as some
/// tests do) goes by the settings' list, with no epochs: nothing changes it.
#[derive(Debug)]
pub struct DeploymentWriters {
    instance_name: String,
    sets: Mutex<BTreeMap<String, Arc<WriterSet>>>,
    unrecorded: BTreeMap<String, Vec<String>>,
}

impl DeploymentWriters {
    /// This process's view, starting from the recorded `sets`; the writers of
    /// streams without a record are `unrecorded`'s.
    pub fn new(
        instance_name: &str,
        sets: impl IntoIterator<Item = WriterSet>,
        unrecorded: BTreeMap<String, Vec<String>>,
    ) -> DeploymentWriters {
        let sets = sets.into_iter().map(|set| (set.stream.clone(), Arc::new(set))).collect();
        DeploymentWriters { instance_name: instance_name.to_owned(), sets: Mutex::new(sets), unrecorded }
    }

    /// The recorded epoch of `stream` this process goes by.
    pub fn current(&self, stream: &str) -> Option<Arc<WriterSet>> {
        self.lock().get(stream).cloned()
    }

    /// The writer of `shard` on `stream` in the epoch applied here.
    pub fn owner_of(&self, stream: &str, shard: &str) -> String {
        match self.current(stream) {
            Some(set) => set.owner_of(shard).to_owned(),
            None => self
                .unrecorded
                .get(stream)
                .and_then(|writers| writer_for_shard(shard, writers).cloned())
                .unwrap_or_else(|| MASTER_INSTANCE.to_owned()),
        }
    }

    /// The active writers of `stream` in the epoch applied here (`master` when
    /// none are listed).
    pub fn writers_of(&self, stream: &str) -> Vec<String> {
        match self.current(stream) {
            Some(set) => set.writers(),
            None => self
                .unrecorded
                .get(stream)
                .filter(|writers| !writers.is_empty())
                .cloned()
                .unwrap_or_else(|| vec![MASTER_INSTANCE.to_owned()]),
        }
    }

    /// Goes by `set` from now on.
    pub fn publish(&self, set: WriterSet) {
        self.lock().insert(set.stream.clone(), Arc::new(set));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<WriterSet>>> {
        self.sets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Queues the fence of `stream` at `epoch` in `txn`, ahead of the write's
/// first statement (PostgreSQL; SQLite has one process, and nothing to
/// fence). The write then fails with a [`StoreError::is_moved`] error if the
/// stream's writers changed since `epoch`, and a change waits for it.
pub fn fence(txn: &mut Transaction, stream: &str, epoch: i64) {
    if txn.engine() == Engine::Postgres {
        txn.execute_at_commit("SELECT stream_writers_fence($1, $2)", &[&stream, &epoch]);
    }
}

/// A JSON column of `stream`'s row in `deployment_stream_writers`.
fn decode<T: serde::de::DeserializeOwned>(stream: &str, column: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|err| StoreError::Decode {
        column: format!("deployment_stream_writers.{column} of `{stream}`"),
        message: err.to_string(),
    })
}

/// A JSON column, as [`decode`] reads it.
fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|err| StoreError::Misconfigured(format!("cannot record writers: {err}")))
}

/// Every stream's epoch as recorded, by stream.
pub async fn load_writer_sets(txn: &mut Transaction) -> Result<BTreeMap<String, WriterSet>, StoreError> {
    let rows = txn
        .query(
            "SELECT stream_name, writers, epoch, draining, retired, handover, changed_ts \
             FROM deployment_stream_writers",
            &[],
        )
        .await?;
    let mut sets = BTreeMap::new();
    for row in rows {
        let stream: String = row.get(0)?;
        let set = WriterSet {
            active: decode(&stream, "writers", &row.get::<String>(1)?)?,
            epoch: row.get(2)?,
            draining: decode(&stream, "draining", &row.get::<String>(3)?)?,
            retired: decode(&stream, "retired", &row.get::<String>(4)?)?,
            handover: decode(&stream, "handover", &row.get::<String>(5)?)?,
            changed_ts: row.get(6)?,
            stream: stream.clone(),
        };
        sets.insert(stream, set);
    }
    Ok(sets)
}

/// The recorded epoch of `stream`, its row locked until `txn` ends: a change
/// of the writers (which waits for the writes in flight, whose fence
/// share-locks the row) or a change of their states.
async fn lock_writer_set(txn: &mut Transaction, stream: &str) -> Result<Option<WriterSet>, StoreError> {
    txn.query_opt("SELECT 1 FROM deployment_stream_writers WHERE stream_name = $1 FOR UPDATE", &[&stream])
        .await?;
    Ok(load_writer_sets(txn).await?.remove(stream))
}

/// [`load_writer_sets`] in an interaction of its own.
pub async fn read_writer_sets(db: &Database) -> Result<BTreeMap<String, WriterSet>, StoreError> {
    db.run_autocommit("read_stream_writers", |txn| Box::pin(load_writer_sets(txn))).await
}

/// Records `set` as its stream's epoch.
pub(crate) async fn record_writer_set(txn: &mut Transaction, set: &WriterSet) -> Result<(), StoreError> {
    txn.execute(
        "INSERT INTO deployment_stream_writers \
         (stream_name, writers, recorded_by, epoch, draining, retired, handover, changed_ts) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (stream_name) DO UPDATE SET writers = EXCLUDED.writers, epoch = EXCLUDED.epoch, \
         draining = EXCLUDED.draining, retired = EXCLUDED.retired, handover = EXCLUDED.handover, \
         changed_ts = EXCLUDED.changed_ts",
        &[
            &set.stream,
            &encode(&set.active)?,
            &MASTER_INSTANCE,
            &set.epoch,
            &encode(&set.draining)?,
            &encode(&set.retired)?,
            &encode(&set.handover)?,
            &set.changed_ts,
        ],
    )
    .await?;
    Ok(())
}

/// Why [`change_stream_writers`] refused a new list.
#[derive(Debug, thiserror::Error)]
pub enum WritersChangeError {
    /// The list is not one the stream can take.
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes `writers` the active writers of `stream` (whose [`Stream`] this
/// process follows), in a new epoch, and returns it; a list equal to the
/// current one changes nothing and returns the current epoch. With `caches`,
/// the change also invalidates [`WRITERS_CHANGED`], so that the other
/// processes hear of it through replication.
///
/// Every instance must have started once (recorded its address). The change
/// waits for the stream's writes in flight (the fence) and records every
/// writer's position at that moment: the writers taken out are draining at
/// their final positions, and each process reaches those positions before it
/// routes by the new epoch.
pub async fn change_stream_writers(
    db: &Database,
    caches: Option<Arc<crate::CachesStream>>,
    stream: Arc<dyn Stream>,
    writers: Vec<String>,
) -> Result<i64, WritersChangeError> {
    if writers.is_empty() {
        return Err(WritersChangeError::Invalid("a stream needs at least one writer".to_owned()));
    }
    let mut seen = BTreeSet::new();
    if let Some(twice) = writers.iter().find(|writer| !seen.insert(writer.as_str())) {
        return Err(WritersChangeError::Invalid(format!("`{twice}` is listed twice")));
    }
    let name = stream.name();
    let outcome = db
        .run_interaction_read_committed("change_stream_writers", move |txn| {
            let (stream, writers, caches) = (Arc::clone(&stream), writers.clone(), caches.clone());
            Box::pin(async move {
                let changed = change_in(txn, stream.as_ref(), writers).await?;
                if let (Ok(_), Some(caches)) = (&changed, caches) {
                    caches
                        .invalidate_in_txn(txn, WRITERS_CHANGED, Some(vec![stream.name().to_owned()]))
                        .await?;
                }
                Ok(changed)
            })
        })
        .await?;
    match outcome {
        Ok(epoch) => {
            tracing::info!(stream = name, epoch, "the stream's writers changed");
            Ok(epoch)
        }
        Err(why) => Err(WritersChangeError::Invalid(why)),
    }
}

async fn change_in(
    txn: &mut Transaction,
    stream: &dyn Stream,
    writers: Vec<String>,
) -> Result<Result<i64, String>, StoreError> {
    let name = stream.name();
    for writer in &writers {
        if writer == MASTER_INSTANCE {
            continue;
        }
        let started = txn
            .query_opt("SELECT 1 FROM instance_addresses WHERE instance_name = $1", &[writer])
            .await?
            .is_some();
        if !started {
            return Ok(Err(format!(
                "`{writer}` never started: start it (with the master's address, the secret and the database) first"
            )));
        }
    }
    // The fence: waits for every write in flight, and holds new ones until
    // this commits (they then find the new epoch).
    let Some(mut set) = lock_writer_set(txn, name).await? else {
        return Ok(Err(format!("`{name}` has no recorded writers yet; start the master first")));
    };
    if set.writers() == writers {
        return Ok(Ok(set.epoch));
    }
    let Some(generator) = stream.generator() else {
        return Ok(Err(format!("`{name}` has no stream positions to hand over")));
    };
    let previous: Vec<String> = set.writers().into_iter().chain(set.draining.keys().cloned()).collect();
    let handover = generator.positions_at_fence(txn, &previous).await?;
    for writer in set.writers() {
        if !writers.contains(&writer) {
            let position = handover.get(&writer).copied().unwrap_or(1);
            set.draining.insert(writer, position);
        }
    }
    for writer in &writers {
        set.draining.remove(writer);
        set.retired.remove(writer);
    }
    set.active = writers;
    set.handover = handover;
    set.epoch += 1;
    set.changed_ts = now_ms();
    record_writer_set(txn, &set).await?;
    Ok(Ok(set.epoch))
}

/// Records that `instance` is alive (every process, every few seconds).
pub async fn record_alive(db: &Database, instance: &str) -> Result<(), StoreError> {
    let instance = instance.to_owned();
    db.run_autocommit("record_alive", move |txn| {
        let instance = instance.clone();
        Box::pin(async move {
            txn.execute(
                "UPDATE instance_addresses SET seen_ts = $2 WHERE instance_name = $1",
                &[&instance, &now_ms()],
            )
            .await
            .map(drop)
        })
    })
    .await
}

/// What a process did with an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It routes by the epoch.
    Routing,
    /// It also allocates as one of the epoch's writers.
    Writing,
}

impl Applied {
    fn as_str(self) -> &'static str {
        match self {
            Applied::Routing => "applied",
            Applied::Writing => "writing",
        }
    }

    fn from_recorded(state: &str) -> Applied {
        if state == Applied::Writing.as_str() { Applied::Writing } else { Applied::Routing }
    }
}

/// Records that `instance` applied `epoch` of `stream`.
pub async fn record_applied(
    db: &Database,
    stream: &str,
    instance: &str,
    epoch: i64,
    applied: Applied,
) -> Result<(), StoreError> {
    let (stream, instance) = (stream.to_owned(), instance.to_owned());
    db.run_autocommit("record_applied_epoch", move |txn| {
        let (stream, instance) = (stream.clone(), instance.clone());
        Box::pin(async move {
            txn.execute(
                "INSERT INTO stream_writer_acks (stream_name, instance_name, epoch, state, acked_ts) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream_name, instance_name) DO UPDATE \
                 SET epoch = EXCLUDED.epoch, state = EXCLUDED.state, acked_ts = EXCLUDED.acked_ts",
                &[&stream, &instance, &epoch, &applied.as_str(), &now_ms()],
            )
            .await
            .map(drop)
        })
    })
    .await
}

/// What `instance` last recorded applying of `stream`: the epoch, and
/// whether it writes under it.
pub async fn applied_by(
    db: &Database,
    stream: &str,
    instance: &str,
) -> Result<Option<(i64, Applied)>, StoreError> {
    let (stream, instance) = (stream.to_owned(), instance.to_owned());
    db.run_autocommit("read_applied_epoch", move |txn| {
        let (stream, instance) = (stream.clone(), instance.clone());
        Box::pin(async move {
            let row = txn
                .query_opt(
                    "SELECT epoch, state FROM stream_writer_acks WHERE stream_name = $1 AND instance_name = $2",
                    &[&stream, &instance],
                )
                .await?;
            let Some(row) = row else { return Ok(None) };
            Ok(Some((row.get(0)?, Applied::from_recorded(&row.get::<String>(1)?))))
        })
    })
    .await
}

/// Where the deployment stands on one stream's epoch: which live processes
/// have not applied it, and which active writers do not allocate yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochProgress {
    /// The epoch.
    pub epoch: i64,
    /// Live processes (seen within [`ALIVE_WITHIN`]) that have not applied it.
    pub behind: Vec<String>,
    /// Active writers not allocating under it yet.
    pub joining: Vec<String>,
}

impl EpochProgress {
    /// Every live process applies the epoch and every writer allocates.
    pub fn settled(&self) -> bool {
        self.behind.is_empty() && self.joining.is_empty()
    }
}

/// How far the deployment has applied `set`.
pub async fn epoch_progress(db: &Database, set: &WriterSet) -> Result<EpochProgress, StoreError> {
    let (stream, epoch, active) = (set.stream.clone(), set.epoch, set.writers());
    let alive_since = now_ms() - i64::try_from(ALIVE_WITHIN.as_millis()).unwrap_or(i64::MAX);
    db.run_autocommit("epoch_progress", move |txn| {
        let (stream, active) = (stream.clone(), active.clone());
        Box::pin(async move {
            let live = txn
                .query("SELECT instance_name FROM instance_addresses WHERE seen_ts >= $1", &[&alive_since])
                .await?
                .iter()
                .map(|row| row.get::<String>(0))
                .collect::<Result<Vec<String>, StoreError>>()?;
            let acks = txn
                .query(
                    "SELECT instance_name, epoch, state FROM stream_writer_acks WHERE stream_name = $1",
                    &[&stream],
                )
                .await?
                .iter()
                .map(|row| {
                    let applied = Applied::from_recorded(&row.get::<String>(2)?);
                    Ok((row.get::<String>(0)?, (row.get::<i64>(1)?, applied)))
                })
                .collect::<Result<BTreeMap<String, (i64, Applied)>, StoreError>>()?;
            let applied = |instance: &str| acks.get(instance).is_some_and(|(acked, _)| *acked >= epoch);
            let writing = |instance: &str| {
                acks.get(instance)
                    .is_some_and(|(acked, applied)| *acked >= epoch && *applied == Applied::Writing)
            };
            let behind = live.iter().filter(|instance| !applied(instance)).cloned().collect();
            let joining = active.iter().filter(|writer| !writing(writer)).cloned().collect();
            Ok(EpochProgress { epoch, behind, joining })
        })
    })
    .await
}

/// Moves the writers of `set` that every live process has applied out of
/// draining into retired, and forgets their rows in `stream_positions`: no
/// process can still need them (a process starting reads the stream's rows
/// instead). Returns whether anything moved.
pub async fn retire_drained(db: &Database, set: &WriterSet) -> Result<bool, StoreError> {
    if set.draining.is_empty() {
        return Ok(false);
    }
    let progress = epoch_progress(db, set).await?;
    if !progress.behind.is_empty() {
        return Ok(false);
    }
    let (stream, epoch) = (set.stream.clone(), set.epoch);
    db.run_interaction_read_committed("retire_drained_writers", move |txn| {
        let stream = stream.clone();
        Box::pin(async move {
            let Some(mut set) = lock_writer_set(txn, &stream).await? else { return Ok(false) };
            if set.epoch != epoch || set.draining.is_empty() {
                return Ok(false);
            }
            for (writer, position) in std::mem::take(&mut set.draining) {
                txn.execute(
                    "DELETE FROM stream_positions WHERE stream_name = $1 AND instance_name = $2",
                    &[&stream, &writer],
                )
                .await?;
                set.retired.insert(writer, position);
            }
            record_writer_set(txn, &set).await?;
            Ok(true)
        })
    })
    .await
}

/// How long [`apply_epoch`] waits for replication to bring a writer to its
/// handover position before reading the rest from the database.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// Rows read per query when a handover position is reached from the database.
const CATCH_UP_PAGE: usize = 1_000;

/// Applies `set` to `stream` (and to the streams that follow its writers,
/// `followers`) in this process: follows the new writers, reaches every
/// writer's handover position, retires the writers taken out, and stops this
/// process's allocations if it is no longer active. The caller then publishes
/// the set (routing by it) and records that it applied it.
pub async fn apply_epoch(
    instance: &str,
    set: &WriterSet,
    stream: &dyn Stream,
    followers: &[Arc<dyn Stream>],
) -> Result<(), StoreError> {
    let tracked: Vec<String> = set.writers();
    for target in std::iter::once(stream).chain(followers.iter().map(AsRef::as_ref)) {
        let Some(generator) = target.generator() else { continue };
        generator.track_writers(&tracked);
        if !set.is_active(instance) {
            generator.stop_allocating();
        }
    }
    for (writer, position) in &set.handover {
        if writer != instance {
            reach(stream, writer, *position).await?;
        }
    }
    for (writer, position) in set.taken_out() {
        if let Some(generator) = stream.generator() {
            // A process that skipped the epoch which took it out (it applies
            // a later one) reaches its final position first.
            if writer != instance && !generator.is_retired(&writer) {
                reach(stream, &writer, position).await?;
            }
            generator.retire(&writer, position);
        }
        for follower in followers {
            if let Some(generator) = follower.generator() {
                let final_position = follower.current_token(&writer);
                generator.retire(&writer, final_position);
            }
        }
    }
    Ok(())
}

/// Brings this process's position of `writer` on `stream` to `position`:
/// replication usually has; otherwise the rest is read from the database, as
/// a follower reads a gap.
async fn reach(stream: &dyn Stream, writer: &str, position: i64) -> Result<(), StoreError> {
    let Some(generator) = stream.generator() else { return Ok(()) };
    if generator.wait_for(writer, position, HANDOVER_WAIT).await.is_ok() {
        return Ok(());
    }
    let mut from = stream.current_token(writer);
    while from < position {
        let updates = stream.get_updates_since(writer, from, position, CATCH_UP_PAGE).await?;
        let mut rows = updates.rows.into_iter().peekable();
        while let Some((token, row)) = rows.next() {
            let mut batch = vec![row];
            while let Some((_, next)) = rows.next_if(|(next, _)| *next == token) {
                batch.push(next);
            }
            stream.apply_rows(writer, token, &batch).map_err(|err| StoreError::Decode {
                column: format!("a row of `{}`", stream.name()),
                message: err.to_string(),
            })?;
        }
        if !updates.limited || updates.token <= from {
            break;
        }
        from = updates.token;
    }
    stream.advance(writer, position);
    tracing::info!(
        stream = stream.name(),
        writer,
        position,
        "reached a writer's handover position from the database"
    );
    Ok(())
}

/// Makes this process one of the writers of `stream` under `set` once every
/// live process applied the epoch (or `timeout` passed: a process that stays
/// silent that long is taken for gone), then records that it writes.
pub async fn join_when_followed(
    db: &Database,
    instance: &str,
    set: &WriterSet,
    streams: &[Arc<dyn Stream>],
    timeout: Duration,
) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let progress = epoch_progress(db, set).await?;
        let behind: Vec<&String> = progress.behind.iter().filter(|other| *other != instance).collect();
        if behind.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(stream = %set.stream, epoch = set.epoch, ?behind, "joining the writers without these processes, which did not apply the epoch in time");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for stream in streams {
        if let Some(generator) = stream.generator() {
            generator.become_writer().await?;
        }
    }
    record_applied(db, &set.stream, instance, set.epoch, Applied::Writing).await
}

/// The epoch a single write of `shard` goes by, to [`fence`] it with, when
/// this writer owns `shard` in it; [`StoreError::Moved`] when it does not.
/// Without `writers` (a process alone) or a recorded epoch: no epoch.
pub fn owned_epoch(
    writers: Option<&DeploymentWriters>,
    stream: &str,
    shard: &str,
) -> Result<Option<i64>, StoreError> {
    let Some((writers, set)) = writers.and_then(|writers| Some((writers, writers.current(stream)?))) else {
        return Ok(None);
    };
    if set.owner_of(shard) != writers.instance_name {
        return Err(StoreError::Moved {
            stream: stream.to_owned(),
            shard: shard.to_owned(),
            epoch: set.epoch,
        });
    }
    Ok(Some(set.epoch))
}

/// Commits the jobs of a writer's group whose shards this writer owns in the
/// epoch of `stream`'s writers it goes by, through `commit` (which gets them
/// and that epoch, for its [`fence`]); the others fail with
/// [`StoreError::Moved`]. A job without a shard (`shard` answers `None`: a
/// write its caller placed on this writer on purpose) is committed whoever
/// owns its room, still behind the fence. Without `writers` (a process alone)
/// or a recorded epoch, every job is committed, with no epoch.
///
/// What a `GroupCommit` of an elastic stream runs: the check and the fence
/// go by one epoch, so a job routed by an older one never commits.
pub async fn commit_owned<J, O, F, Fut>(
    writers: Option<&DeploymentWriters>,
    stream: &str,
    jobs: Arc<[J]>,
    shard: fn(&J) -> Option<&str>,
    commit: F,
) -> Result<Vec<Result<O, StoreError>>, StoreError>
where
    J: Clone,
    F: FnOnce(Arc<[J]>, Option<i64>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<O>, StoreError>>,
{
    let Some((writers, set)) = writers.and_then(|writers| Some((writers, writers.current(stream)?))) else {
        return Ok(commit(jobs, None).await?.into_iter().map(Ok).collect());
    };
    let owned: Vec<bool> = jobs
        .iter()
        .map(|job| shard(job).is_none_or(|shard| set.owner_of(shard) == writers.instance_name))
        .collect();
    if owned.iter().all(|owned| *owned) {
        return Ok(commit(jobs, Some(set.epoch)).await?.into_iter().map(Ok).collect());
    }
    let mine: Arc<[J]> =
        jobs.iter().zip(&owned).filter(|(_, owned)| **owned).map(|(job, _)| job.clone()).collect();
    let mut committed =
        if mine.is_empty() { Vec::new() } else { commit(mine, Some(set.epoch)).await? }.into_iter();
    Ok(jobs
        .iter()
        .zip(owned)
        .map(|(job, owned)| {
            if owned {
                committed.next().ok_or_else(|| StoreError::Abandoned {
                    interaction: "commit_owned",
                    reason: "a commit answered for fewer jobs than it took".to_owned(),
                })
            } else {
                let shard = shard(job).unwrap_or_default().to_owned();
                Err(StoreError::Moved { stream: stream.to_owned(), shard, epoch: set.epoch })
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{DeploymentWriters, WriterSet, WriterState};

    fn set() -> WriterSet {
        WriterSet {
            draining: BTreeMap::from([("w1".to_owned(), 40)]),
            retired: BTreeMap::from([("w0".to_owned(), 10), ("w1".to_owned(), 5)]),
            ..WriterSet::seeded("events", vec!["w2".to_owned(), "w3".to_owned()])
        }
    }

    #[test]
    fn a_set_lists_its_writers_active_first_and_takes_the_latest_final_positions() {
        let set = set();
        assert_eq!(
            set.states(),
            [
                ("w2".to_owned(), WriterState::Active),
                ("w3".to_owned(), WriterState::Active),
                ("w1".to_owned(), WriterState::Draining),
                ("w0".to_owned(), WriterState::Retired),
                ("w1".to_owned(), WriterState::Retired),
            ]
        );
        // Draining is the later state of a writer also retired before.
        assert_eq!(set.taken_out(), BTreeMap::from([("w0".to_owned(), 10), ("w1".to_owned(), 40)]));
        assert!(set.is_active("w2") && !set.is_active("w1"));
        assert!(["w2", "w3"].contains(&set.owner_of("!a:b")));
    }

    #[test]
    fn an_empty_list_is_the_master() {
        let set = WriterSet::seeded("receipts", Vec::new());
        assert_eq!(set.writers(), ["master"]);
        assert_eq!(set.owner_of("!a:b"), "master");
        assert!(set.is_active("master"));
    }

    #[test]
    fn a_process_goes_by_the_record_and_else_by_its_settings() {
        let unrecorded = BTreeMap::from([("receipts".to_owned(), vec!["r1".to_owned()])]);
        let writers = DeploymentWriters::new("w2", [set()], unrecorded);
        assert_eq!(writers.writers_of("events"), ["w2", "w3"]);
        assert_eq!(writers.writers_of("receipts"), ["r1"]);
        assert_eq!(writers.owner_of("receipts", "!a:b"), "r1");
        assert_eq!(writers.writers_of("account_data"), ["master"]);
        assert!(writers.current("receipts").is_none());
        let next = WriterSet { epoch: 2, ..WriterSet::seeded("events", vec!["w3".to_owned()]) };
        writers.publish(next);
        assert_eq!(writers.owner_of("events", "!a:b"), "w3");
        assert_eq!(writers.current("events").map(|set| set.epoch), Some(2));
    }
}
