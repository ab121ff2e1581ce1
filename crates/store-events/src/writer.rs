//! [`EventsWriter`]: persisting events, on the instances that write the stream.

use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use store_core::{
    Database, DbError, DeploymentWriters, GroupCommit, GroupCommitStats, StoreContext, StoreError,
    ToSqlValue, Transaction,
};

use crate::reader::EventsReader;
use crate::{Event, NewEvent};

/// Persists events: built only on the instances configured as writers of the
/// `events` stream, which is what lets them allocate its IDs.
///
/// Writes go through one queue ([`GroupCommit`]): those that arrive while a
/// commit is in flight are persisted together by the next one, in their order
/// of arrival, so a room's events take stream orderings in the order they
/// were queued. Each commit is one transaction: the events, the rooms'
/// current state, the memberships, and (for each room whose current state
/// changed) one `cs_cache_fake` row per 50 changed members for the other
/// processes. Several writers may persist at once, even into one room: a
/// current-state entry is only replaced by an event with a later stream
/// ordering, whatever order the transactions commit in.
#[derive(Debug)]
pub struct EventsWriter {
    reader: Arc<EventsReader>,
    instance_name: Arc<str>,
    queue: GroupCommit<RoomBatch, Result<Persisted, StoreError>>,
}

/// The most writes one commit takes.
const MAX_GROUP: usize = 128;

/// The most events one `INSERT` carries (9 parameters each, well under both
/// engines' limits on parameters).
const EVENTS_PER_INSERT: usize = 200;

/// A client's transaction: `PUT …/send/{type}/{txnId}` is idempotent per user
/// and transaction ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTxn {
    /// Who sent the request.
    pub user_id: String,
    /// The client's transaction ID.
    pub txn_id: String,
}

/// What persisting one batch of a room's events came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persisted {
    /// The events' stream orderings, in order.
    Events(Vec<i64>),
    /// Nothing was persisted: the batch's client transaction was already
    /// recorded, by an earlier attempt or by a batch of another room
    /// ([`EventsReader::get_event_id_for_txn`] says which event it made).
    TxnAlreadyUsed,
}

/// One queued write: a batch of one room's events.
#[derive(Debug, Clone)]
struct RoomBatch {
    room_id: String,
    events: Vec<NewEvent>,
    txn: Option<ClientTxn>,
    /// Routed to this writer as the room's owner (a client's write), rather
    /// than placed here on purpose: refused as moved if it owns the room no
    /// more.
    routed: bool,
}

fn owned_room(batch: &RoomBatch) -> Option<&str> {
    batch.routed.then_some(batch.room_id.as_str())
}

fn room_of(batch: &RoomBatch) -> &str {
    &batch.room_id
}

impl EventsWriter {
    /// The read half, shared with every process.
    pub fn reader(&self) -> &EventsReader {
        &self.reader
    }

    /// The read half, for components that keep it (a replication stream).
    pub fn shared_reader(&self) -> Arc<EventsReader> {
        Arc::clone(&self.reader)
    }

    /// How this writer's commits grouped writes so far.
    pub fn group_stats(&self) -> GroupCommitStats {
        self.queue.stats()
    }

    /// Persists `events` of `room_id` in one transaction, in order, on this
    /// writer whichever writer the deployment gives the room (see
    /// [`EventsWriter::persist_events_here`]); returns their stream orderings.
    pub async fn persist_events(&self, room_id: &str, events: &[NewEvent]) -> Result<Vec<i64>, StoreError> {
        match self.persist_events_here(room_id, events).await? {
            Persisted::Events(ids) => Ok(ids),
            Persisted::TxnAlreadyUsed => Err(StoreError::Abandoned {
                interaction: "persist_events",
                reason: "a batch without a client transaction was refused as a retry".to_owned(),
            }),
        }
    }

    /// Queues `events` of `room_id` (before the returned future is first
    /// polled: batches queued one after another are persisted in that order)
    /// and, with `txn`, records that this client transaction produced the first
    /// of them, in the same database transaction: a retry of the client's
    /// request then finds it ([`EventsReader::get_event_id_for_txn`]) whether
    /// or not the process crashed after the commit. A transaction already
    /// recorded persists nothing ([`Persisted::TxnAlreadyUsed`]).
    ///
    /// The future answers once the batch's commit is known; dropping it does
    /// not take the batch back. In a deployment whose writers of `events` are
    /// recorded, a room this writer does not own in the epoch it goes by is
    /// refused ([`StoreError::Moved`]), as is any batch while the writers
    /// change under it: the caller routes it again.
    pub fn persist_events_for_txn(
        &self,
        room_id: &str,
        events: &[NewEvent],
        txn: Option<&ClientTxn>,
    ) -> impl Future<Output = Result<Persisted, StoreError>> + Send + use<> {
        self.submit(room_id, events, txn, true)
    }

    /// Like [`EventsWriter::persist_events_for_txn`], for a batch placed on
    /// this writer on purpose, whichever writer the deployment's epoch gives
    /// the room (a tool, a test); still refused while the writers change.
    pub fn persist_events_here(
        &self,
        room_id: &str,
        events: &[NewEvent],
    ) -> impl Future<Output = Result<Persisted, StoreError>> + Send + use<> {
        self.submit(room_id, events, None, false)
    }

    fn submit(
        &self,
        room_id: &str,
        events: &[NewEvent],
        txn: Option<&ClientTxn>,
        routed: bool,
    ) -> impl Future<Output = Result<Persisted, StoreError>> + Send + use<> {
        let batch =
            RoomBatch { room_id: room_id.to_owned(), events: events.to_vec(), txn: txn.cloned(), routed };
        let queued = (!events.is_empty()).then(|| self.queue.submit(batch));
        async move {
            match queued {
                Some(queued) => queued.await?,
                None => Ok(Persisted::Events(Vec::new())),
            }
        }
    }

    /// Persists history fetched from other servers: IDs come from the backfill
    /// stream (−2, −3, …), older than everything in the room, and the current
    /// state is left alone.
    pub async fn persist_backfilled_events(
        &self,
        room_id: &str,
        events: &[NewEvent],
    ) -> Result<Vec<i64>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let generator = self.reader.backfill_ids.clone();
        let (room_id, events, instance) =
            (room_id.to_owned(), Arc::<[NewEvent]>::from(events), Arc::clone(&self.instance_name));
        self.reader
            .db
            .run_interaction("persist_backfilled_events", move |txn| {
                let generator = generator.clone();
                let (room_id, events, instance) =
                    (room_id.clone(), Arc::clone(&events), Arc::clone(&instance));
                Box::pin(async move {
                    txn.assign_id();
                    let ids = generator.get_next_mult_txn(txn, events.len()).await?;
                    let rows: Vec<(&str, &NewEvent, i64)> = events
                        .iter()
                        .zip(ids.iter().copied())
                        .map(|(event, id)| (room_id.as_str(), event, id))
                        .collect();
                    insert_events(txn, &instance, &rows);
                    Ok(ids)
                })
            })
            .await
    }
}

/// Who commits a group: the process's read half, its name, whether other
/// processes follow it (then its streamer is handed what it persisted), and
/// the client transactions it committed last.
#[derive(Debug, Clone)]
struct Committer {
    reader: Arc<EventsReader>,
    instance: Arc<str>,
    streams_to_others: bool,
    /// The deployment's writers, in a deployment of several processes: each
    /// commit persists only the rooms this writer owns in the epoch it goes
    /// by, behind the fence of that epoch.
    writers: Option<Arc<DeploymentWriters>>,
    /// The client transactions this writer committed last.
    committed_txns: Arc<Mutex<CommittedTxns>>,
}

/// The client transactions a writer committed last, up to a bound: a retry of
/// one of them (a client that lost the answer) would lose the bet of
/// [`TxnCheck::WithCommit`] and cost its whole group a second run, so a group
/// holding one checks first.
#[derive(Debug, Default)]
struct CommittedTxns {
    known: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
}

/// How many committed client transactions a writer remembers.
const COMMITTED_TXNS_KEPT: usize = 10_000;

impl CommittedTxns {
    fn contains(&self, txn: &ClientTxn) -> bool {
        // A lookup without building an owned key would need a borrowed form
        // of the pair; the clone is two short strings per send.
        self.known.contains(&(txn.user_id.clone(), txn.txn_id.clone()))
    }

    fn remember(&mut self, txn: &ClientTxn) {
        let key = (txn.user_id.clone(), txn.txn_id.clone());
        if self.known.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > COMMITTED_TXNS_KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.known.remove(&oldest);
            }
        }
    }
}

/// How a commit records its batches' client transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnCheck {
    /// Records them first and persists only the batches whose transaction was
    /// new: a round trip of its own.
    First,
    /// Records them with the COMMIT, in its round trip, on the bet that none
    /// was used before; a transaction already recorded fails the commit with a
    /// unique violation, and the group is run again with [`TxnCheck::First`].
    /// Only a retry of a request whose answer was lost loses the bet.
    WithCommit,
}

/// Persists the batches of the rooms this writer owns in the epoch of the
/// stream's writers it goes by; the others are [`StoreError::Moved`].
async fn persist_group(
    committer: Committer,
    batches: Arc<[RoomBatch]>,
) -> Result<Vec<Result<Persisted, StoreError>>, StoreError> {
    let writers = committer.writers.clone();
    store_core::writers::commit_owned(
        writers.as_deref(),
        crate::EVENTS_STREAM,
        batches,
        owned_room,
        |mine, epoch| persist_owned(committer, mine, epoch),
    )
    .await
}

/// Persists `batches`, all of rooms this writer owns in `epoch` (if the
/// stream's writers are elastic here).
async fn persist_owned(
    committer: Committer,
    batches: Arc<[RoomBatch]>,
    epoch: Option<i64>,
) -> Result<Vec<Persisted>, StoreError> {
    let db = committer.reader.db.clone();
    let run = |check: TxnCheck| {
        let (committer, batches) = (committer.clone(), Arc::clone(&batches));
        db.run_interaction("persist_events", move |txn| {
            let (committer, batches) = (committer.clone(), Arc::clone(&batches));
            Box::pin(async move {
                if let Some(epoch) = epoch {
                    store_core::writers::fence(txn, crate::EVENTS_STREAM, epoch);
                }
                persist_group_txn(txn, &committer, &batches, check).await
            })
        })
    };
    let committed_txns = Arc::clone(&committer.committed_txns);
    let a_retry = {
        let committed = committed_txns.lock().unwrap_or_else(PoisonError::into_inner);
        batches.iter().filter_map(|batch| batch.txn.as_ref()).any(|txn| committed.contains(txn))
    };
    let outcome = if a_retry {
        run(TxnCheck::First).await
    } else {
        match run(TxnCheck::WithCommit).await {
            Err(err) if err.db_error().is_some_and(DbError::is_unique_violation) => {
                run(TxnCheck::First).await
            }
            outcome => outcome,
        }
    };
    if let Ok(persisted) = &outcome {
        let mut committed = committed_txns.lock().unwrap_or_else(PoisonError::into_inner);
        for (batch, persisted) in batches.iter().zip(persisted) {
            if let (Some(txn), Persisted::Events(_)) = (&batch.txn, persisted) {
                committed.remember(txn);
            }
        }
    }
    outcome
}

/// Persists `batches` in `txn`. When the bet of [`TxnCheck::WithCommit`]
/// holds, on PostgreSQL that is two round trips (`BEGIN` with the IDs, then
/// every write with the COMMIT), plus two per room whose current state
/// changed (its poke's ID); on SQLite, whose stream IDs come from counters in
/// this process, one call on the connection's thread (`BEGIN`, every write,
/// `COMMIT`).
async fn persist_group_txn(
    txn: &mut Transaction,
    committer: &Committer,
    batches: &[RoomBatch],
    check: TxnCheck,
) -> Result<Vec<Persisted>, StoreError> {
    let (reader, instance) = (&committer.reader, &*committer.instance);
    // Registered before the IDs are allocated, so that it runs before the
    // generator's own callback moves the position past them: the streamer,
    // woken by that move, then finds the events without reading them back.
    let committed: Arc<Mutex<Vec<Event>>> = Arc::default();
    if committer.streams_to_others {
        let (reader, committed, instance) = (Arc::clone(reader), Arc::clone(&committed), instance.to_owned());
        txn.call_after_position(move || {
            let events = std::mem::take(&mut *committed.lock().unwrap_or_else(PoisonError::into_inner));
            reader.recent.record(&instance, events);
        });
    }
    let taken = match check {
        TxnCheck::First => record_client_txns(txn, batches).await?,
        TxnCheck::WithCommit => vec![false; batches.len()],
    };
    let count =
        batches.iter().zip(&taken).filter(|(_, taken)| !**taken).map(|(batch, _)| batch.events.len()).sum();
    if count == 0 {
        return Ok(vec![Persisted::TxnAlreadyUsed; batches.len()]);
    }
    // Every write below goes with the COMMIT: the transaction's ID, which a
    // COMMIT in doubt is read back by, is learnt with the stream IDs.
    txn.assign_id();
    let mut ids = reader.events_ids.get_next_mult_txn(txn, count).await?;
    // Handed out in order; sorted all the same, since the queue's order is
    // what gives each room its order.
    ids.sort_unstable();
    let mut next_ids = ids.into_iter();
    let mut rows = Vec::with_capacity(count);
    let mut outcome = Vec::with_capacity(batches.len());
    for (batch, taken) in batches.iter().zip(&taken) {
        if *taken {
            outcome.push(Persisted::TxnAlreadyUsed);
            continue;
        }
        let batch_ids: Vec<i64> = next_ids.by_ref().take(batch.events.len()).collect();
        rows.extend(
            batch.events.iter().zip(&batch_ids).map(|(event, id)| (batch.room_id.as_str(), event, *id)),
        );
        outcome.push(Persisted::Events(batch_ids));
    }

    let mut rooms: Vec<RoomChanges> = Vec::new();
    let mut recorded = Vec::with_capacity(if committer.streams_to_others { rows.len() } else { 0 });
    // Parsed once (and only for member events), for the rows and the record.
    let memberships: Vec<Option<String>> = rows.iter().map(|(_, event, _)| event.membership()).collect();
    for ((room_id, event, id), membership) in rows.iter().zip(&memberships) {
        if committer.streams_to_others {
            let stored = Event::new(*id, instance.to_owned(), (*room_id).to_owned(), (*event).clone());
            if let Some(membership) = membership {
                stored.remember_membership(membership.clone());
            }
            recorded.push(stored);
        }
        let room = match rooms.iter().position(|room| room.room_id == *room_id) {
            Some(index) => &mut rooms[index],
            None => {
                rooms.push(RoomChanges { room_id: (*room_id).to_owned(), ..RoomChanges::default() });
                rooms.last_mut().expect("just pushed")
            }
        };
        room.last = room.last.max(*id);
        let Some(state_key) = &event.state_key else { continue };
        room.state_changed = true;
        if membership.is_some() && !room.members.contains(state_key) {
            room.members.push(state_key.clone());
        }
    }
    *committed.lock().unwrap_or_else(PoisonError::into_inner) = recorded;
    // The pokes take IDs of their own: a round trip each on PostgreSQL.
    for room in rooms.iter().filter(|room| room.state_changed) {
        reader.caches.poke_current_state(txn, &room.room_id, &room.members).await?;
    }
    if check == TxnCheck::WithCommit {
        queue_client_txns(txn, batches);
    }
    insert_events(txn, instance, &rows);
    for ((room_id, event, id), membership) in rows.iter().zip(&memberships) {
        let Some(state_key) = &event.state_key else { continue };
        upsert_current_state(txn, room_id, event, state_key, membership.as_deref(), *id);
        if let Some(membership) = membership {
            txn.execute_at_commit(
                "INSERT INTO room_memberships (event_id, user_id, sender, room_id, membership, stream_ordering) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&event.event_id, state_key, &event.sender, room_id, membership, id],
            );
        }
    }
    // After the commit and before the position moves (positions are
    // published last), the change caches learn of the new rows.
    let reader = Arc::clone(reader);
    txn.call_after(move || {
        for room in &rooms {
            reader.room_changes.entity_has_changed(&room.room_id, room.last);
            for member in &room.members {
                reader.membership_changes.entity_has_changed(member, room.last);
            }
            if room.state_changed {
                reader.state_changes.entity_has_changed(&room.room_id, room.last);
            }
        }
    });
    Ok(outcome)
}

/// What one commit changed in one room, for the change caches.
#[derive(Debug, Default)]
struct RoomChanges {
    room_id: String,
    /// Its last stream ordering in the commit.
    last: i64,
    /// The users whose membership changed.
    members: Vec<String>,
    state_changed: bool,
}

/// Records the client transactions of `batches`, in one statement; answers,
/// per batch, whether its transaction was already recorded (then nothing of
/// it is to be persisted).
async fn record_client_txns(txn: &mut Transaction, batches: &[RoomBatch]) -> Result<Vec<bool>, StoreError> {
    let with_txn = with_client_txn(batches);
    if with_txn.is_empty() {
        return Ok(vec![false; batches.len()]);
    }
    let params = client_txn_params(&with_txn);
    // Two batches of one group may name the same transaction (sent to two
    // rooms at once): the first wins, as it would have committed first.
    let recorded = txn
        .query(
            &format!(
                "INSERT INTO event_txn_id (user_id, txn_id, event_id, room_id, inserted_ts) VALUES {} \
                 ON CONFLICT (user_id, txn_id) DO NOTHING RETURNING event_id",
                placeholders(with_txn.len(), 5)
            ),
            &params,
        )
        .await?;
    let recorded: Vec<String> = recorded.iter().map(|row| row.get::<String>(0)).collect::<Result<_, _>>()?;
    Ok(batches
        .iter()
        .map(|batch| {
            batch.txn.is_some()
                && batch.events.first().is_some_and(|first| !recorded.contains(&first.event_id))
        })
        .collect())
}

/// Records the client transactions of `batches` with the COMMIT, refusing
/// any already recorded (see [`TxnCheck::WithCommit`]).
fn queue_client_txns(txn: &mut Transaction, batches: &[RoomBatch]) {
    let with_txn = with_client_txn(batches);
    if with_txn.is_empty() {
        return;
    }
    let params = client_txn_params(&with_txn);
    txn.execute_at_commit(
        format!(
            "INSERT INTO event_txn_id (user_id, txn_id, event_id, room_id, inserted_ts) VALUES {}",
            placeholders(with_txn.len(), 5)
        ),
        &params,
    );
}

/// The batches that carry a client transaction, with it and the first event
/// (the one the transaction answers).
fn with_client_txn(batches: &[RoomBatch]) -> Vec<(&RoomBatch, &ClientTxn, &NewEvent)> {
    batches.iter().filter_map(|batch| Some((batch, batch.txn.as_ref()?, batch.events.first()?))).collect()
}

fn client_txn_params<'a>(
    with_txn: &[(&'a RoomBatch, &'a ClientTxn, &'a NewEvent)],
) -> Vec<&'a dyn ToSqlValue> {
    let mut params: Vec<&dyn ToSqlValue> = Vec::with_capacity(with_txn.len() * 5);
    for (batch, client, first) in with_txn {
        params.extend([
            &client.user_id as &dyn ToSqlValue,
            &client.txn_id,
            &first.event_id,
            &batch.room_id,
            &first.origin_server_ts,
        ]);
    }
    params
}

/// `($1, $2, $3), ($4, $5, $6)`: `rows` rows of `width` placeholders.
fn placeholders(rows: usize, width: usize) -> String {
    let mut sql = String::with_capacity(rows * width * 5);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..width {
            if column > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "${}", row * width + column + 1);
        }
        sql.push(')');
    }
    sql
}

/// Inserts `(room, event, stream ordering)` rows, a few hundred a statement,
/// with the COMMIT.
fn insert_events(txn: &mut Transaction, instance: &str, rows: &[(&str, &NewEvent, i64)]) {
    let instance = instance.to_owned();
    for chunk in rows.chunks(EVENTS_PER_INSERT) {
        let mut params: Vec<&dyn ToSqlValue> = Vec::with_capacity(chunk.len() * 9);
        for (room_id, event, stream_ordering) in chunk {
            params.extend([
                stream_ordering as &dyn ToSqlValue,
                &instance,
                &event.event_id,
                room_id,
                &event.event_type,
                &event.state_key,
                &event.sender,
                &event.origin_server_ts,
                &event.content,
            ]);
        }
        txn.execute_at_commit(
            format!(
                "INSERT INTO events (stream_ordering, instance_name, event_id, room_id, type, state_key, sender, \
                 origin_server_ts, content) VALUES {}",
                placeholders(chunk.len(), 9)
            ),
            &params,
        );
    }
}

fn upsert_current_state(
    txn: &mut Transaction,
    room_id: &str,
    event: &NewEvent,
    state_key: &str,
    membership: Option<&str>,
    stream_ordering: i64,
) {
    txn.execute_at_commit(
        "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership, stream_ordering) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = EXCLUDED.event_id, \
         membership = EXCLUDED.membership, stream_ordering = EXCLUDED.stream_ordering \
         WHERE current_state_events.stream_ordering < EXCLUDED.stream_ordering",
        &[&event.event_id, &room_id, &event.event_type, &state_key, &membership, &stream_ordering],
    );
}

impl store_core::Store for EventsWriter {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        <crate::EventsReader as store_core::Store>::migrations()
    }
    fn stream_specs() -> Vec<store_core::StreamSpec> {
        <crate::EventsReader as store_core::Store>::stream_specs()
    }
    /// The write half: refused unless this instance writes `events`; it
    /// allocates from the read half's generator, which it shares with the
    /// rest of the process through `ctx`.
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        ctx.require_writer(crate::EVENTS)?;
        let reader = ctx.component::<EventsReader>(&db, conn).await?;
        let instance_name: Arc<str> = Arc::from(ctx.instance_name());
        let committer = Committer {
            reader: Arc::clone(&reader),
            instance: Arc::clone(&instance_name),
            streams_to_others: ctx.settings().has_other_processes,
            writers: ctx.settings().has_other_processes.then(|| Arc::clone(ctx.deployment_writers())),
            committed_txns: Arc::default(),
        };
        let queue = GroupCommit::spawn("persist_events", MAX_GROUP, room_of, move |batches| {
            Box::pin(persist_group(committer.clone(), batches))
        });
        Ok(EventsWriter { reader, instance_name, queue })
    }
}
