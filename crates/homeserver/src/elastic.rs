//! Elastic writers in a running process (`store_core::writers` has the
//! mechanism): the loop that applies each new epoch of a stream's writers,
//! the join of a writer new to a stream, the liveness every process records,
//! and on the master, the retirement of drained writers.
//!
//! A process applies the recorded epochs when a change arrives through
//! replication (its invalidation of [`writers::WRITERS_CHANGED`]), when a
//! write it routed comes back "moved", and every [`POLL`] in case replication
//! lost one; applying an epoch takes the handover
//! positions first, so the process routes a moved room to its new writer only
//! once it has every write of the room's old writer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use store_core::writers::{
    self, Applied, DeploymentWriters, WriterSet, apply_epoch, join_when_followed, read_writer_sets,
    record_alive, record_applied, retire_drained,
};
use store_core::{Database, Stream, StreamRegistry, WriterRule, now_ms};

/// How often a process reads the recorded epochs when replication brings no
/// change.
const POLL: Duration = Duration::from_secs(1);

/// How long the room list of `/admin/v1/streams` is reused.
const ROOMS_FRESH_FOR: Duration = Duration::from_secs(5);

/// How much longer than the join's timeout a write waits for its writer to
/// join: the join's own reads and its record.
const JOIN_MARGIN: Duration = Duration::from_secs(5);

/// How often a process records that it is alive.
const ALIVE_EVERY: Duration = Duration::from_secs(2);

/// One elastic stream, and the streams that follow its writers (backfill).
struct Elastic {
    stream: Arc<dyn Stream>,
    followers: Vec<Arc<dyn Stream>>,
    counters: ElasticCounters,
}

impl Elastic {
    fn all(&self) -> Vec<Arc<dyn Stream>> {
        std::iter::once(Arc::clone(&self.stream)).chain(self.followers.iter().cloned()).collect()
    }

    fn is_allocating(&self) -> bool {
        self.stream.generator().is_some_and(store_core::MultiWriterIdGenerator::is_allocating)
    }
}

/// What `/metrics` shows of elastic writers, per stream.
#[derive(Debug, Default)]
pub(crate) struct ElasticCounters {
    /// Epochs applied here (each a handover).
    pub(crate) epochs: AtomicU64,
    /// Writes that came back "moved" and were sent again.
    pub(crate) moved_retries: AtomicU64,
    /// The handovers' total and longest durations (µs): from the change's
    /// commit until this process routed by it.
    pub(crate) handover_micros: AtomicU64,
    pub(crate) handover_max_micros: AtomicU64,
}

/// The elastic writers of one process.
pub(crate) struct ElasticWriters {
    db: Database,
    instance: String,
    deployment: Arc<DeploymentWriters>,
    streams: BTreeMap<&'static str, Elastic>,
    /// One application at a time: the loop's, or one a "moved" answer asked for.
    applying: tokio::sync::Mutex<()>,
    /// The joins in progress, by stream and epoch.
    joining: Mutex<BTreeSet<(String, i64)>>,
    /// The epoch this process recorded applying, per stream (none: not yet
    /// since it started).
    acked: Mutex<BTreeMap<&'static str, i64>>,
    join_timeout: Duration,
    /// Whether to poll the recorded epochs (a deployment of several processes).
    polls: bool,
    /// Woken when a change of writers arrives on the `caches` stream.
    changed: Arc<tokio::sync::Notify>,
    /// The rooms, as last read for `/admin/v1/streams`, and when.
    rooms: tokio::sync::Mutex<Option<(Instant, Arc<Vec<String>>)>>,
}

impl std::fmt::Debug for ElasticWriters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElasticWriters")
            .field("instance", &self.instance)
            .field("streams", &self.streams.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ElasticWriters {
    /// The elastic streams of `registry` (the process's followed streams);
    /// `polls` for a process of a deployment of several.
    pub(crate) fn new(
        db: Database,
        instance: &str,
        deployment: Arc<DeploymentWriters>,
        registry: &StreamRegistry,
        caches: &store_core::CacheRegistry,
        join_timeout: Duration,
        polls: bool,
    ) -> ElasticWriters {
        let mut streams: BTreeMap<&'static str, Elastic> = BTreeMap::new();
        let all: Vec<Arc<dyn Stream>> = registry.iter().cloned().collect();
        for stream in &all {
            let spec = stream.spec();
            if spec.elastic && spec.writers == WriterRule::Configured {
                let followers = all
                    .iter()
                    .filter(|other| {
                        other.spec().elastic && other.spec().writers == WriterRule::Follows(spec.name)
                    })
                    .cloned()
                    .collect();
                let counters = ElasticCounters::default();
                streams.insert(spec.name, Elastic { stream: Arc::clone(stream), followers, counters });
            }
        }
        let changed = Arc::new(tokio::sync::Notify::new());
        let woken = Arc::clone(&changed);
        let wake: store_core::Expansion = Arc::new(move |_, _, _| woken.notify_one());
        if let Err(err) = caches.register_expansion(writers::WRITERS_CHANGED, wake) {
            tracing::warn!("changes of writers will be noticed by polling only: {err}");
        }
        ElasticWriters {
            db,
            instance: instance.to_owned(),
            deployment,
            streams,
            applying: tokio::sync::Mutex::new(()),
            joining: Mutex::default(),
            acked: Mutex::default(),
            join_timeout,
            rooms: tokio::sync::Mutex::new(None),
            polls,
            changed,
        }
    }

    /// Every room, read at most every [`ROOMS_FRESH_FOR`]: what the writers
    /// of room-sharded streams divide, for `/admin/v1/streams`, which tests
    /// and dashboards poll.
    pub(crate) async fn rooms(
        &self,
        read: impl AsyncFnOnce() -> Result<Vec<String>, store_core::StoreError>,
    ) -> Result<Arc<Vec<String>>, store_core::StoreError> {
        let mut rooms = self.rooms.lock().await;
        if let Some((at, rooms)) = rooms.as_ref()
            && at.elapsed() < ROOMS_FRESH_FOR
        {
            return Ok(Arc::clone(rooms));
        }
        let read = Arc::new(read().await?);
        *rooms = Some((Instant::now(), Arc::clone(&read)));
        Ok(read)
    }

    /// The counters of `stream`, if it is elastic.
    pub(crate) fn counters(&self, stream: &str) -> Option<&ElasticCounters> {
        self.streams.get(stream).map(|elastic| &elastic.counters)
    }

    /// The elastic streams' names.
    pub(crate) fn stream_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.streams.keys().copied()
    }

    /// The elastic stream called `name`.
    pub(crate) fn stream(&self, name: &str) -> Option<Arc<dyn Stream>> {
        self.streams.get(name).map(|elastic| Arc::clone(&elastic.stream))
    }

    /// Records this process's part in the epochs it started with, then applies
    /// new ones for as long as the process runs.
    pub(crate) async fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        if let Err(err) = record_alive(&self.db, &self.instance).await {
            tracing::warn!("failed to record that this process is alive: {err}");
        }
        for (name, elastic) in &self.streams {
            let Some(set) = self.deployment.current(name) else { continue };
            match self.take_part(elastic, &set, true).await {
                Ok(()) => self.acknowledged(name, set.epoch),
                Err(err) => {
                    tracing::warn!(
                        stream = name,
                        epoch = set.epoch,
                        "failed to record the epoch applied: {err}"
                    );
                }
            }
        }
        let this = Arc::clone(self);
        if self.streams.is_empty() || !self.polls {
            // A process alone: no one else changes its writers.
            return tokio::spawn(async {});
        }
        tokio::spawn(async move {
            let mut last_alive = Instant::now();
            loop {
                // Woken by the change's invalidation, or by the clock in
                // case a gap in replication lost it.
                let _ = tokio::time::timeout(POLL, this.changed.notified()).await;
                this.refresh_or_warn().await;
                if last_alive.elapsed() >= ALIVE_EVERY {
                    last_alive = Instant::now();
                    if let Err(err) = record_alive(&this.db, &this.instance).await {
                        tracing::warn!("failed to record that this process is alive: {err}");
                    }
                    if this.instance == store_core::MASTER_INSTANCE {
                        this.retire_drained().await;
                    }
                }
            }
        })
    }

    /// Applies the epochs recorded since the last look.
    pub(crate) async fn refresh(&self) -> Result<(), store_core::StoreError> {
        let _applying = self.applying.lock().await;
        let recorded = read_writer_sets(&self.db).await?;
        for (name, elastic) in &self.streams {
            let Some(set) = recorded.get(*name) else { continue };
            let local = self.deployment.current(name);
            match &local {
                Some(local) if local.epoch > set.epoch => continue,
                Some(local) if local.epoch == set.epoch => {
                    if **local != *set {
                        // Drained writers retired: nothing to apply.
                        self.deployment.publish(set.clone());
                    }
                    // Applied, but the record of it failed: record it again.
                    let acked = self.lock_acked().get(name).copied();
                    if acked.is_none_or(|acked| acked < set.epoch) {
                        self.take_part(elastic, set, acked.is_none()).await?;
                        self.acknowledged(name, set.epoch);
                    }
                    continue;
                }
                _ => {}
            }
            apply_epoch(&self.instance, set, elastic.stream.as_ref(), &elastic.followers).await?;
            self.deployment.publish(set.clone());
            let (counters, took) = (&elastic.counters, (now_ms() - set.changed_ts).max(0) * 1000);
            let took = u64::try_from(took).unwrap_or(0);
            counters.epochs.fetch_add(1, Ordering::Relaxed);
            counters.handover_micros.fetch_add(took, Ordering::Relaxed);
            counters.handover_max_micros.fetch_max(took, Ordering::Relaxed);
            tracing::info!(stream = name, epoch = set.epoch, writers = ?set.writers(), "applied the stream's writers");
            self.take_part(elastic, set, false).await?;
            self.acknowledged(name, set.epoch);
        }
        Ok(())
    }

    fn acknowledged(&self, stream: &'static str, epoch: i64) {
        self.lock_acked().insert(stream, epoch);
    }

    fn lock_acked(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, i64>> {
        self.acked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records what this process does in `set`: routes by it, or writes (a
    /// writer new to the stream first joins, in a task of its own).
    async fn take_part(
        &self,
        elastic: &Elastic,
        set: &WriterSet,
        at_start: bool,
    ) -> Result<(), store_core::StoreError> {
        let stream = elastic.stream.name();
        if !set.is_active(&self.instance) {
            return record_applied(&self.db, stream, &self.instance, set.epoch, Applied::Routing).await;
        }
        let joined = if at_start {
            // The seeded epoch's writers are every process's from the start;
            // a writer of a later one joined if it recorded so.
            set.epoch == 1
                || writers::applied_by(&self.db, stream, &self.instance)
                    .await?
                    .is_some_and(|(epoch, applied)| epoch >= set.epoch && applied == Applied::Writing)
        } else {
            elastic.is_allocating()
        };
        if joined {
            return record_applied(&self.db, stream, &self.instance, set.epoch, Applied::Writing).await;
        }
        for target in elastic.all() {
            if let Some(generator) = target.generator() {
                generator.stop_allocating();
            }
        }
        record_applied(&self.db, stream, &self.instance, set.epoch, Applied::Routing).await?;
        if !self.joining().insert((stream.to_owned(), set.epoch)) {
            return Ok(());
        }
        let (db, instance, set, streams, timeout) =
            (self.db.clone(), self.instance.clone(), set.clone(), elastic.all(), self.join_timeout);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut pause = Duration::from_millis(100);
            while let Err(err) = join_when_followed(&db, &instance, &set, &streams, timeout).await {
                tracing::warn!(stream = %set.stream, "failed to join the stream's writers; retrying: {err}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            tracing::info!(stream = %set.stream, epoch = set.epoch, took = ?started.elapsed(), "joined the stream's writers");
        });
        Ok(())
    }

    /// Waits until this process allocates on `stream` (at most the join's
    /// timeout and a margin): a writer that is joining takes the writes
    /// routed to it meanwhile. Returns at once, with no timer, when it
    /// allocates already: every write a writer makes goes through here.
    pub(crate) async fn wait_writing(&self, stream: &str) {
        let Some(elastic) = self.streams.get(stream) else { return };
        let Some(generator) = elastic.stream.generator() else { return };
        if generator.is_allocating() {
            return;
        }
        let timeout = self.join_timeout + JOIN_MARGIN;
        let mut changes = generator.subscribe();
        let wait = async {
            while !generator.is_allocating() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    /// Counts a write that came back "moved" and applies the recorded epochs.
    pub(crate) async fn moved(&self, stream: &str) {
        if let Some(counters) = self.counters(stream) {
            counters.moved_retries.fetch_add(1, Ordering::Relaxed);
        }
        self.refresh_or_warn().await;
    }

    /// Applies the recorded epochs, logging a failure (the loop tries again).
    pub(crate) async fn refresh_or_warn(&self) {
        if let Err(err) = self.refresh().await {
            tracing::warn!("failed to apply the deployment's writers: {err}");
        }
    }

    async fn retire_drained(&self) {
        for name in self.streams.keys() {
            let Some(set) = self.deployment.current(name) else { continue };
            match retire_drained(&self.db, &set).await {
                Ok(true) => tracing::info!(stream = name, epoch = set.epoch, "drained writers retired"),
                Ok(false) => {}
                Err(err) => tracing::warn!(stream = name, "failed to retire drained writers: {err}"),
            }
        }
    }

    fn joining(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, i64)>> {
        self.joining.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The answer of `GET /admin/v1/stream_writers/{stream}`.
pub(crate) async fn status(
    db: &Database,
    set: &WriterSet,
) -> Result<serde_json::Value, store_core::StoreError> {
    let progress = writers::epoch_progress(db, set).await?;
    let states: serde_json::Map<String, serde_json::Value> =
        set.states().into_iter().map(|(writer, state)| (writer, serde_json::json!(state))).collect();
    Ok(serde_json::json!({
        "epoch": set.epoch,
        "writers": states,
        "settled": progress.settled(),
        "behind": progress.behind,
        "joining": progress.joining,
    }))
}
