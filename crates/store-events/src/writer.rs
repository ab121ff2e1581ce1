//! [`EventsWriter`]: persisting events, on the instances that write the stream.

use std::sync::Arc;

use store_core::{Database, StoreContext, StoreError, Transaction};

use crate::NewEvent;
use crate::reader::EventsReader;

/// Persists events: built only on the instances configured as writers of the
/// `events` stream, which is what lets them allocate its IDs.
///
/// Every batch is one transaction: the events, the room's current state, the
/// memberships, and (when current state changed) one `cs_cache_fake` row per 50
/// changed members for the other processes. Several writers may persist at once,
/// even into one room: a current-state entry is only replaced by an event with a
/// later stream ordering, whatever order the transactions commit in.
#[derive(Debug)]
pub struct EventsWriter {
    reader: Arc<EventsReader>,
    instance_name: String,
}

/// A client's transaction: `PUT …/send/{type}/{txnId}` is idempotent per user
/// and transaction ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTxn {
    /// Who sent the request.
    pub user_id: String,
    /// The client's transaction ID.
    pub txn_id: String,
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

    /// Persists `events` of `room_id` in one transaction, in order; returns their
    /// stream orderings.
    pub async fn persist_events(&self, room_id: &str, events: &[NewEvent]) -> Result<Vec<i64>, StoreError> {
        self.persist_events_for_txn(room_id, events, None).await
    }

    /// Like [`EventsWriter::persist_events`], and records that `txn`, a client's
    /// transaction, produced the first of `events`, in the same database
    /// transaction: a retry of the client's request then finds it
    /// ([`EventsReader::get_event_id_for_txn`]) whether or not the process
    /// crashed after the commit.
    pub async fn persist_events_for_txn(
        &self,
        room_id: &str,
        events: &[NewEvent],
        txn: Option<&ClientTxn>,
    ) -> Result<Vec<i64>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let reader = &self.reader;
        let (generator, caches) = (reader.events_ids.clone(), Arc::clone(&reader.caches));
        let changes = (
            Arc::clone(&reader.room_changes),
            Arc::clone(&reader.membership_changes),
            Arc::clone(&reader.state_changes),
        );
        let (room_id, events, instance) =
            (room_id.to_owned(), Arc::<[NewEvent]>::from(events), self.instance_name.clone());
        let client_txn = txn.cloned();
        reader
            .db
            .run_interaction("persist_events", move |txn| {
                let (generator, caches, changes) = (generator.clone(), Arc::clone(&caches), changes.clone());
                let (room_id, events, instance) = (room_id.clone(), Arc::clone(&events), instance.clone());
                let client_txn = client_txn.clone();
                Box::pin(async move {
                    if let (Some(client), Some(first)) = (&client_txn, events.first()) {
                        txn.execute(
                            "INSERT INTO event_txn_id (user_id, txn_id, event_id, room_id, inserted_ts) \
                             VALUES ($1, $2, $3, $4, $5)",
                            &[
                                &client.user_id,
                                &client.txn_id,
                                &first.event_id,
                                &room_id,
                                &first.origin_server_ts,
                            ],
                        )
                        .await?;
                    }
                    let ids = generator.get_next_mult_txn(txn, events.len()).await?;
                    let mut members_changed = Vec::new();
                    let mut state_changed = false;
                    for (event, id) in events.iter().zip(&ids) {
                        insert_event(txn, &room_id, &instance, event, *id).await?;
                        if let Some(state_key) = &event.state_key {
                            state_changed = true;
                            let membership = event.membership();
                            upsert_current_state(txn, &room_id, event, state_key, membership.as_deref(), *id)
                                .await?;
                            if let Some(membership) = &membership {
                                txn.execute(
                                    "INSERT INTO room_memberships \
                                     (event_id, user_id, sender, room_id, membership, stream_ordering) \
                                     VALUES ($1, $2, $3, $4, $5, $6)",
                                    &[&event.event_id, state_key, &event.sender, &room_id, membership, id],
                                )
                                .await?;
                                if !members_changed.contains(state_key) {
                                    members_changed.push(state_key.clone());
                                }
                            }
                        }
                    }
                    // After the commit and before the position moves (positions are
                    // published last), the change caches learn of the new rows.
                    let last = ids.iter().copied().max().unwrap_or(0);
                    let (room, members) = (room_id.clone(), members_changed.clone());
                    txn.call_after(move || {
                        let (room_changes, membership_changes, state_changes) = &changes;
                        room_changes.entity_has_changed(&room, last);
                        for member in &members {
                            membership_changes.entity_has_changed(member, last);
                        }
                        if state_changed {
                            state_changes.entity_has_changed(&room, last);
                        }
                    });
                    if state_changed {
                        caches.poke_current_state(txn, &room_id, &members_changed).await?;
                    }
                    Ok(ids)
                })
            })
            .await
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
            (room_id.to_owned(), Arc::<[NewEvent]>::from(events), self.instance_name.clone());
        self.reader
            .db
            .run_interaction("persist_backfilled_events", move |txn| {
                let generator = generator.clone();
                let (room_id, events, instance) = (room_id.clone(), Arc::clone(&events), instance.clone());
                Box::pin(async move {
                    let ids = generator.get_next_mult_txn(txn, events.len()).await?;
                    for (event, id) in events.iter().zip(&ids) {
                        insert_event(txn, &room_id, &instance, event, *id).await?;
                    }
                    Ok(ids)
                })
            })
            .await
    }
}

async fn insert_event(
    txn: &mut Transaction,
    room_id: &str,
    instance: &str,
    event: &NewEvent,
    stream_ordering: i64,
) -> Result<(), StoreError> {
    txn.execute(
        "INSERT INTO events (stream_ordering, instance_name, event_id, room_id, type, state_key, sender, \
         origin_server_ts, content) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &stream_ordering,
            &instance,
            &event.event_id,
            &room_id,
            &event.event_type,
            &event.state_key,
            &event.sender,
            &event.origin_server_ts,
            &event.content,
        ],
    )
    .await?;
    Ok(())
}

async fn upsert_current_state(
    txn: &mut Transaction,
    room_id: &str,
    event: &NewEvent,
    state_key: &str,
    membership: Option<&str>,
    stream_ordering: i64,
) -> Result<(), StoreError> {
    txn.execute(
        "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership, stream_ordering) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = EXCLUDED.event_id, \
         membership = EXCLUDED.membership, stream_ordering = EXCLUDED.stream_ordering \
         WHERE current_state_events.stream_ordering < EXCLUDED.stream_ordering",
        &[&event.event_id, &room_id, &event.event_type, &state_key, &membership, &stream_ordering],
    )
    .await?;
    Ok(())
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
        Ok(EventsWriter { reader, instance_name: ctx.instance_name().to_owned() })
    }
}
