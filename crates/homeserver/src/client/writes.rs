//! Where the client API's writes go, and the internal endpoints that take them.
//!
//! Room events are sharded by room: a stable hash of the room ID picks one of
//! the `events` writers (rendezvous hashing, so that a writer added or removed
//! moves only the rooms it gains or loses). That writer alone checks
//! the room's events, one request at a time per room, against the room's
//! state as the writes it queued before will leave it (`room_queue`), and
//! commits them in groups with the other writes that arrive meanwhile. A
//! process that does not write a room forwards the request to the writer's
//! internal endpoint with the shared secret. Receipts are sharded the same way over the `receipts` writers;
//! typing has one writer.
//!
//! After a write, the process that took the client's request waits until it
//! has itself seen the write's position, so the client reads its own writes
//! from the process it wrote through.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use replication::TypingStream;
use replication::typing::TYPING_STREAM;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use server_config::ServerConfig;
use store_account_data::ACCOUNT_DATA_STREAM;
use store_core::{Database, MultiWriterIdGenerator};
use store_events::{ClientTxn, EVENTS_STREAM, NewEvent, Persisted};
use store_receipts::{RECEIPTS_STREAM, ReceiptRow};

use super::auth_rules::{self, RoomState};
use super::room_queue::RoomTurn;
use super::{ClientError, detached, now_ms, parse_body, random_string, require_secret};
use crate::http::AppState;

/// Persists a room's events on its writer.
pub(crate) const SEND_EVENTS_PATH: &str = "/_synapse/replication/send_events";
/// Persists a receipt on a receipts writer.
pub(crate) const SEND_RECEIPT_PATH: &str = "/_synapse/replication/send_receipt";
/// Starts or stops typing on the typing writer.
pub(crate) const SET_TYPING_PATH: &str = "/_synapse/replication/set_typing";
/// Sets account data on an `account_data` writer.
pub(crate) const ADD_ACCOUNT_DATA_PATH: &str = "/_synapse/replication/add_account_data";

/// The longest a client may say it keeps typing.
pub(crate) const MAX_TYPING_TIMEOUT_MS: u64 = 120_000;

/// How long the process that took a write waits to see it replicated back
/// before answering anyway (the write is committed either way).
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(5);

/// The writer of `shard` (a room, or a user for account data) on `stream`, in
/// the epoch of the stream's writers this process goes by
/// ([`store_core::writer_for_shard`] over the active writers).
pub(crate) fn writer_of(state: &AppState, stream: &str, shard: &str) -> String {
    state.store.context().deployment_writers().owner_of(stream, shard)
}

/// How many times a write that came back "moved" is sent again, each after
/// applying the recorded epochs: one change of writers needs one.
const MOVED_RETRIES: usize = 5;

/// One event of a [`RoomWrite`], as the client gave it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EventContent {
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    #[serde(default)]
    pub(crate) state_key: Option<String>,
    pub(crate) content: Value,
}

/// What a room's writer is asked to persist: the events one client request
/// makes (`createRoom` makes two), from one sender.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RoomWrite {
    pub(crate) room_id: String,
    pub(crate) sender: String,
    pub(crate) events: Vec<EventContent>,
    /// The client's transaction ID, for `send`.
    #[serde(default)]
    pub(crate) txn_id: Option<String>,
    /// Whether this is `createRoom`'s write, the only one that may make a room.
    #[serde(default)]
    pub(crate) creates_room: bool,
}

/// What a write produced: where on the stream, and by whom.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Written {
    #[serde(default)]
    pub(crate) event_ids: Vec<String>,
    pub(crate) writer: String,
    pub(crate) stream_id: i64,
}

/// Where a write of a sharded stream goes, and how it is made.
struct Route<'a> {
    /// The stream, whose writers the write is sharded over.
    stream: &'a str,
    /// What picks the writer: the room, or the user.
    shard: &'a str,
    /// The writer's internal endpoint, for a writer elsewhere.
    path: &'a str,
    /// The stream's positions here, to wait on after the write.
    generator: &'a MultiWriterIdGenerator,
}

/// Makes `body` on its writer, through `here` when that is this process and
/// forwarded to the writer's endpoint otherwise, and waits until this process
/// has seen it (read-your-writes).
///
/// A write that comes back "moved" (the stream's writers changed since this
/// process routed it) is sent again to the writer of the epoch the process
/// then applies; the client sees a slower request, not an error.
async fn write_through<B: Serialize + Clone>(
    state: &AppState,
    route: Route<'_>,
    body: B,
    here: impl AsyncFn(&AppState, B) -> Result<Written, ClientError>,
) -> Result<Written, ClientError> {
    let mut retries = 0;
    let written = loop {
        let writer = writer_of(state, route.stream, route.shard);
        let outcome = if writer == state.config.instance_name {
            // A writer that has just joined the stream's writers takes its
            // rooms' writes once every process follows it.
            state.elastic.wait_writing(route.stream).await;
            here(state, body.clone()).await
        } else {
            forward(state, &writer, route.path, &body).await.inspect(|written: &Written| {
                // The writer's own word, over the secret: the replicated
                // position that follows needs no check against the database.
                route.generator.learn_handed_out(written.stream_id);
            })
        };
        match outcome {
            Err(err) if err.is_moved() && retries < MOVED_RETRIES => {
                retries += 1;
                tracing::debug!(
                    stream = route.stream,
                    shard = route.shard,
                    writer,
                    "a write moved; sending it again"
                );
                state.elastic.moved(route.stream).await;
            }
            Err(err) if err.is_moved() => {
                return Err(ClientError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "M_UNKNOWN",
                    "the writers of this room are changing; try again",
                ));
            }
            outcome => break outcome?,
        }
    };
    wait_to_see(route.generator, &written).await;
    Ok(written)
}

/// Persists `write` on the room's writer, here or there, and waits until this
/// process has seen it.
pub(crate) async fn write_room_events(state: &AppState, write: RoomWrite) -> Result<Written, ClientError> {
    let (shard, generator) = (write.room_id.clone(), state.store.events().events_stream());
    let route = Route { stream: EVENTS_STREAM, shard: &shard, path: SEND_EVENTS_PATH, generator };
    write_through(state, route, write, persist_room_write_detached).await
}

/// Persists a receipt on its writer and waits until this process has seen it.
pub(crate) async fn write_receipt(state: &AppState, receipt: ReceiptRow) -> Result<(), ClientError> {
    let (shard, generator) = (receipt.room_id.clone(), state.store.receipts().stream());
    let route = Route { stream: RECEIPTS_STREAM, shard: &shard, path: SEND_RECEIPT_PATH, generator };
    write_through(state, route, receipt, persist_receipt_detached).await.map(drop)
}

/// A user's account data to set, as its writer takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AccountDataWrite {
    pub(crate) user_id: String,
    pub(crate) room_id: Option<String>,
    pub(crate) data_type: String,
    pub(crate) content: Value,
}

/// Sets account data on its writer (the user's, by the same hash as rooms)
/// and waits until this process has seen it.
pub(crate) async fn write_account_data(state: &AppState, write: AccountDataWrite) -> Result<(), ClientError> {
    let (shard, generator) = (write.user_id.clone(), state.store.account_data().stream());
    let route = Route { stream: ACCOUNT_DATA_STREAM, shard: &shard, path: ADD_ACCOUNT_DATA_PATH, generator };
    write_through(state, route, write, persist_account_data_detached).await.map(drop)
}

async fn persist_account_data_detached(
    state: &AppState,
    write: AccountDataWrite,
) -> Result<Written, ClientError> {
    let state = state.clone();
    detached("an account data write failed", async move {
        let Some(writer) = state.store.account_data_writer() else {
            return Err(ClientError::internal(
                "account data reached a process that does not write it",
                &state.config.instance_name,
            ));
        };
        let stream_id = writer
            .add_account_data(&write.user_id, write.room_id.as_deref(), &write.data_type, &write.content)
            .await?;
        Ok(Written { event_ids: Vec::new(), writer: state.config.instance_name.clone(), stream_id })
    })
    .await
}

/// `POST /_synapse/replication/add_account_data`: an [`AccountDataWrite`] →
/// [`Written`].
pub(crate) async fn add_account_data_endpoint(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Written>, ClientError> {
    require_secret(&state, &headers)?;
    let write: AccountDataWrite = parse_body(&body)?;
    require_ownership(&state, ACCOUNT_DATA_STREAM, &write.user_id).await?;
    Ok(Json(persist_account_data_detached(&state, write).await?))
}

/// A change of someone's typing, as the typing writer takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TypingChange {
    pub(crate) room_id: String,
    pub(crate) user_id: String,
    pub(crate) typing: bool,
    pub(crate) timeout_ms: u64,
}

/// Applies a typing change on the typing writer.
pub(crate) async fn write_typing(state: &AppState, change: TypingChange) -> Result<(), ClientError> {
    let writer = state
        .store
        .context()
        .deployment_writers()
        .writers_of(TYPING_STREAM)
        .into_iter()
        .next()
        .unwrap_or_default();
    if writer == state.config.instance_name {
        apply_typing(state, &change)
    } else {
        let _: Value = forward(state, &writer, SET_TYPING_PATH, &change).await?;
        Ok(())
    }
}

async fn wait_to_see(generator: &MultiWriterIdGenerator, written: &Written) {
    if let Err(err) = generator.wait_for(&written.writer, written.stream_id, READ_YOUR_WRITES_WAIT).await {
        tracing::warn!(writer = %written.writer, "a write is not replicated back yet: {err}");
    }
}

/// Sends `body` to `writer`'s internal endpoint `path`; its refusals reach the
/// client as the writer worded them.
async fn forward<B: Serialize, A: DeserializeOwned>(
    state: &AppState,
    writer: &str,
    path: &str,
    body: &B,
) -> Result<A, ClientError> {
    let unavailable = |why: &str| {
        tracing::warn!(writer, path, "forwarding a write failed: {why}");
        ClientError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNKNOWN",
            format!("`{writer}`, which writes this, is unavailable; try again"),
        )
    };
    let addresses = &state.writer_addresses;
    let address = addresses.address_of(&state.config, writer).await.map_err(|why| unavailable(&why))?;
    // The config refuses to start without a secret when writers are elsewhere.
    let secret = state.config.worker_replication_secret.as_deref().unwrap_or_default();
    let body = serde_json::to_string(body).map_err(|err| ClientError::internal("encode a write", err))?;
    let client = &state.internal_client;
    let (status, answer) = match client.request(&address, "POST", path, secret, Some(&body)).await {
        Ok(answered) => answered,
        Err(why) => {
            // A writer that restarted elsewhere recorded its new address:
            // once, there. Safe to send again: a room write carries its
            // `txn_id`, and receipts and typing are idempotent.
            addresses.forget(writer);
            match addresses.address_of(&state.config, writer).await {
                Ok(moved) if moved != address => client
                    .request(&moved, "POST", path, secret, Some(&body))
                    .await
                    .map_err(|why| unavailable(&why))?,
                _ => return Err(unavailable(&why)),
            }
        }
    };
    if status == 200 {
        return serde_json::from_str(&answer).map_err(|err| unavailable(&err.to_string()));
    }
    // Only the writer's verdicts on the write itself reach the client; a 401
    // (a secret that differs) or a 404 (a writer of another release) is this
    // deployment's fault, and would read to a client as its own.
    let refusal: Value = serde_json::from_str(&answer).unwrap_or_default();
    match (status, refusal["errcode"].as_str()) {
        (
            400 | 403 | 404 | 413,
            Some(
                errcode @ ("M_INVALID_PARAM" | "M_ROOM_IN_USE" | "M_FORBIDDEN" | "M_NOT_FOUND"
                | "M_TOO_LARGE"),
            ),
        ) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            Err(ClientError::new(status, errcode, refusal["error"].as_str().unwrap_or_default()))
        }
        (409, Some(super::WRITER_MOVED)) => {
            Err(ClientError::moved(refusal["error"].as_str().unwrap_or_default()))
        }
        _ => Err(unavailable(&format!("it answered {status}: {answer}"))),
    }
}

/// Where the writers answer HTTP: `[instance_map]` first, then the address
/// each recorded in the database at start-up, remembered until a call to it
/// fails.
pub(crate) struct WriterAddresses {
    db: Database,
    found: Mutex<HashMap<String, String>>,
}

impl WriterAddresses {
    pub(crate) fn new(db: Database) -> WriterAddresses {
        WriterAddresses { db, found: Mutex::default() }
    }

    async fn address_of(&self, config: &ServerConfig, writer: &str) -> Result<String, String> {
        if let Some(address) = config.instance_map.get(writer) {
            return Ok(address.clone());
        }
        if let Some(address) = self.found().get(writer) {
            return Ok(address.clone());
        }
        match store_core::http_address_of(&self.db, writer).await {
            Ok(Some(address)) => {
                self.found().insert(writer.to_owned(), address.clone());
                Ok(address)
            }
            Ok(None) => {
                Err("not in [instance_map], and it has not recorded an address: has it started?".to_owned())
            }
            Err(err) => Err(format!("reading its address failed: {err}")),
        }
    }

    fn forget(&self, writer: &str) {
        self.found().remove(writer);
    }

    fn found(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // Whole entries are inserted and removed: a poisoned map is still right.
        self.found.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for WriterAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterAddresses").field("found", &*self.found()).finish_non_exhaustive()
    }
}

/// [`persist_room_write`], [`detached`] from the request.
async fn persist_room_write_detached(state: &AppState, write: RoomWrite) -> Result<Written, ClientError> {
    let state = state.clone();
    detached("a room write failed", async move { persist_room_write(&state, write).await }).await
}

/// [`persist_receipt`], [`detached`] from the request.
async fn persist_receipt_detached(state: &AppState, receipt: ReceiptRow) -> Result<Written, ClientError> {
    let state = state.clone();
    detached("a receipt write failed", async move { persist_receipt(&state, &receipt).await }).await
}

/// The checks and the persist, on the room's writer: checked and queued in
/// the room's turn, against the database and the room's writes queued before
/// it; committed with whatever else the writer's next commit takes.
async fn persist_room_write(state: &AppState, write: RoomWrite) -> Result<Written, ClientError> {
    let Some(writer) = state.store.events_writer() else {
        return Err(ClientError::internal(
            "a room write reached a process that does not write events",
            &state.config.instance_name,
        ));
    };
    let room = state.room_locks.lock(&write.room_id).await;
    let txn = write
        .txn_id
        .as_ref()
        .map(|txn_id| ClientTxn { user_id: write.sender.clone(), txn_id: txn_id.clone() });
    if let Some(txn) = &txn {
        // A retry while the first attempt is queued answers as it does after.
        room.queued_txn(txn).await;
    }
    // A retry of a committed transaction is not looked up first (a read per
    // send): its queued attempt persists nothing and answers
    // `TxnAlreadyUsed`. Only a refusal looks for an earlier attempt, which
    // the rules may refuse now (its sender left since) but was accepted then.
    if let Err(refusal) = check_room_write(state, &room, &write).await {
        return match &txn {
            Some(txn) => earlier_attempt(state, txn, &write.room_id).await?.ok_or(refusal),
            None => Err(refusal),
        };
    }
    let origin_server_ts = now_ms();
    let new_events: Vec<NewEvent> = write
        .events
        .iter()
        .map(|event| NewEvent {
            event_id: format!("${}", random_string(32)),
            event_type: event.event_type.clone(),
            state_key: event.state_key.clone(),
            sender: write.sender.clone(),
            origin_server_ts,
            content: event.content.to_string(),
        })
        .collect();
    let queued = room.queue(&new_events, txn.as_ref());
    let persisting = writer.persist_events_for_txn(&write.room_id, &new_events, txn.as_ref());
    drop(room);
    let persisted = persisting.await;
    drop(queued);
    match persisted? {
        Persisted::Events(orderings) => Ok(Written {
            event_ids: new_events.into_iter().map(|event| event.event_id).collect(),
            writer: state.config.instance_name.clone(),
            stream_id: orderings.into_iter().max().unwrap_or_default(),
        }),
        // A retry of a committed transaction, or the same transaction ID
        // sent at once to another room (another turn, perhaps another
        // writer), which won the race for it.
        Persisted::TxnAlreadyUsed => {
            let txn = txn.as_ref().ok_or_else(|| {
                ClientError::internal("a write without a transaction ID", "was refused as a retry")
            })?;
            earlier_attempt(state, txn, &write.room_id)
                .await?
                .ok_or_else(|| ClientError::internal("a transaction ID clashed and vanished", &txn.txn_id))
        }
    }
}

/// What an earlier attempt of the client's transaction `txn` wrote, if any. A
/// transaction ID names one request: reused for another room, it is refused
/// rather than answered with an event of a room the client did not name.
async fn earlier_attempt(
    state: &AppState,
    txn: &ClientTxn,
    room_id: &str,
) -> Result<Option<Written>, ClientError> {
    let events = state.store.events();
    let Some((earlier_room, event_id)) = events.get_event_id_for_txn(&txn.user_id, &txn.txn_id).await? else {
        return Ok(None);
    };
    if earlier_room != room_id {
        return Err(ClientError::invalid_param(format!(
            "transaction ID {:?} was already used in another room",
            txn.txn_id
        )));
    }
    let event = events
        .get_event(&event_id)
        .await?
        .ok_or_else(|| ClientError::internal("a transaction's event is missing", &event_id))?;
    Ok(Some(Written {
        event_ids: vec![event_id],
        writer: event.instance_name.clone(),
        stream_id: event.stream_ordering,
    }))
}

/// `sender`'s membership in `room_id` as the current state says.
pub(crate) async fn membership_of(
    state: &AppState,
    room_id: &str,
    sender: &str,
) -> Result<Option<String>, ClientError> {
    let events = state.store.events();
    let current = events.get_current_state_ids(room_id).await?;
    let Some(event_id) = current.get(&("m.room.member".to_owned(), sender.to_owned())) else {
        return Ok(None);
    };
    Ok(events.get_event(event_id).await?.and_then(|event| event.membership().map(str::to_owned)))
}

/// Whether the room exists here (its creation is in the current state).
pub(crate) async fn room_exists(state: &AppState, room_id: &str) -> Result<bool, ClientError> {
    let current = state.store.events().get_current_state_ids(room_id).await?;
    Ok(current.contains_key(&("m.room.create".to_owned(), String::new())))
}

/// The rules of this subset: a room is created once, by an `m.room.create`
/// that comes first; anyone may join an existing room; everything else needs
/// the sender to be joined.
async fn check_room_write(state: &AppState, room: &RoomTurn, write: &RoomWrite) -> Result<(), ClientError> {
    let Some(first) = write.events.first() else { return Err(ClientError::bad_json("no events to send")) };
    if write.creates_room {
        if first.event_type != "m.room.create" {
            return Err(ClientError::bad_json("a room's first event is its m.room.create"));
        }
        if room.has_queued_state()
            || !state.store.events().get_current_state_ids(&write.room_id).await?.is_empty()
        {
            return Err(ClientError::new(
                StatusCode::BAD_REQUEST,
                "M_ROOM_IN_USE",
                "the room already exists",
            ));
        }
        return Ok(());
    }
    if write.events.len() != 1 {
        return Err(ClientError::bad_json("one event per request"));
    }
    if first.event_type == "m.room.create" {
        return Err(ClientError::forbidden("a room is created once, by createRoom"));
    }
    let mut concerned = vec![write.sender.as_str()];
    if first.event_type == "m.room.member"
        && let Some(target) = first.state_key.as_deref()
    {
        concerned.push(target);
    }
    let Some(room) = room_state(state, room, &write.room_id, &concerned).await? else {
        return Err(ClientError::not_found(format!("unknown room {}", write.room_id)));
    };
    let proposed = auth_rules::Proposed {
        sender: &write.sender,
        event_type: &first.event_type,
        state_key: first.state_key.as_deref(),
        content: &first.content,
    };
    auth_rules::check(&room, proposed).map_err(ClientError::forbidden)
}

/// What the authorization rules read of `room_id`'s current state as the
/// writes queued in `turn` leave it, from one read of the database: its
/// creator, join rules and power levels, and the memberships of `users`;
/// `None` for a room that does not exist here.
async fn room_state(
    state: &AppState,
    turn: &RoomTurn,
    room_id: &str,
    users: &[&str],
) -> Result<Option<RoomState>, ClientError> {
    let queued = turn.queued_state();
    let events = state.store.events();
    let current = events.get_current_state_ids(room_id).await?;
    let event_at = async |event_type: &str, state_key: &str| -> Result<Option<NewEvent>, ClientError> {
        let key = (event_type.to_owned(), state_key.to_owned());
        if let Some(event) = queued.get(&key) {
            return Ok(Some(event.clone()));
        }
        match current.get(&key) {
            Some(event_id) => Ok(events.get_event(event_id).await?.map(|event| event.event.clone())),
            None => Ok(None),
        }
    };
    let Some(create) = event_at("m.room.create", "").await? else { return Ok(None) };
    let mut room = RoomState { creator: Some(create.sender), ..RoomState::default() };
    for (event_type, slot) in
        [("m.room.join_rules", &mut room.join_rules), ("m.room.power_levels", &mut room.power_levels)]
    {
        if let Some(event) = event_at(event_type, "").await? {
            *slot = serde_json::from_str(&event.content).ok();
        }
    }
    for user in users {
        if let Some(membership) = event_at("m.room.member", user).await?.and_then(|event| event.membership())
        {
            room.memberships.insert((*user).to_owned(), membership);
        }
    }
    Ok(Some(room))
}

async fn persist_receipt(state: &AppState, receipt: &ReceiptRow) -> Result<Written, ClientError> {
    let Some(writer) = state.store.receipts_writer() else {
        return Err(ClientError::internal(
            "a receipt reached a process that does not write receipts",
            &state.config.instance_name,
        ));
    };
    let stream_id = writer.insert_receipt(receipt).await?;
    Ok(Written { event_ids: Vec::new(), writer: state.config.instance_name.clone(), stream_id })
}

fn apply_typing(state: &AppState, change: &TypingChange) -> Result<(), ClientError> {
    let TypingStream::Writer(writer) = state.typing.as_ref() else {
        return Err(ClientError::internal(
            "a typing change reached a process that does not write typing",
            &state.config.instance_name,
        ));
    };
    if change.typing {
        let timeout = Duration::from_millis(change.timeout_ms.min(MAX_TYPING_TIMEOUT_MS));
        writer.started_typing(&change.room_id, &change.user_id, timeout);
    } else {
        writer.stopped_typing(&change.room_id, &change.user_id);
    }
    Ok(())
}

/// `POST /_synapse/replication/send_events`: a [`RoomWrite`] → [`Written`].
pub(crate) async fn send_events_endpoint(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Written>, ClientError> {
    require_secret(&state, &headers)?;
    let write: RoomWrite = parse_body(&body)?;
    // Two writers must never take one room: a room this process does not
    // write in the epoch it goes by is "moved" (the sender then applies the
    // recorded epochs and asks the writer they name; the fence stops a write
    // of an older epoch in any case).
    require_ownership(&state, EVENTS_STREAM, &write.room_id).await?;
    Ok(Json(persist_room_write_detached(&state, write).await?))
}

/// Refuses, as "moved", a forwarded write of a shard this process does not
/// write, once it has applied the recorded epochs (the sender may know a
/// newer one), and waits until it allocates if it has just joined.
async fn require_ownership(state: &AppState, stream: &str, shard: &str) -> Result<(), ClientError> {
    if writer_of(state, stream, shard) != state.config.instance_name {
        state.elastic.refresh_or_warn().await;
    }
    let owner = writer_of(state, stream, shard);
    if owner != state.config.instance_name {
        return Err(ClientError::moved(format!(
            "{shard} is written by `{owner}` in the writers of `{stream}` applied here"
        )));
    }
    state.elastic.wait_writing(stream).await;
    Ok(())
}

/// `POST /_synapse/replication/send_receipt`: a receipt row → [`Written`].
pub(crate) async fn send_receipt_endpoint(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Written>, ClientError> {
    require_secret(&state, &headers)?;
    let receipt: ReceiptRow = parse_body(&body)?;
    require_ownership(&state, RECEIPTS_STREAM, &receipt.room_id).await?;
    Ok(Json(persist_receipt_detached(&state, receipt).await?))
}

/// `POST /_synapse/replication/set_typing`: a [`TypingChange`] → `{}`.
pub(crate) async fn set_typing_endpoint(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    require_secret(&state, &headers)?;
    let change: TypingChange = parse_body(&body)?;
    apply_typing(&state, &change)?;
    Ok(Json(json!({})))
}
