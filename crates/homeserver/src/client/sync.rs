//! `GET /_matrix/client/v3/sync`: what changed for a user since a token, long
//! polling until something does.
//!
//! The token (`next_batch`) holds one position per stream: `s<events>_<receipts>_<typing>`,
//! where the events and receipts parts are multi-writer tokens (`5`, or
//! `m5~1.6~2.9`: everything up to 5 plus instance 1 up to 6 and instance 2 up to
//! 9; see `docs/http.md`). An event is returned by the sync whose token range
//! covers it by its own writer's position, so an event persisted out of order
//! (below another writer's position, after it was announced) comes in a later
//! sync: never skipped, never twice.
//!
//! Each room's timeline carries a `prev_batch`, a room token (`history`
//! pages back from it) just before its first event, by each writer; the room's
//! `state` is the state at that token, so it never repeats what the timeline
//! carries.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use store_core::{
    InstanceIds, MultiWriterIdGenerator, MultiWriterToken, RoomToken, StoreError, TokenParseError,
};
use store_events::{Event, MembershipChange, WriterFilter};
use tokio::time::Instant;

use super::rooms::{client_event, state_events};
use super::{ClientError, authenticate};
use crate::http::AppState;

/// Timeline events per room when the client's filter does not say.
const DEFAULT_TIMELINE_LIMIT: usize = 10;
/// The most a client may ask for per room.
const MAX_TIMELINE_LIMIT: usize = 1_000;
/// The longest a sync waits, whatever the client asks.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a process behind a client's token waits to catch up with it before
/// calling the token foreign.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// How long a writer waits to reach its own position in a client's token
/// before calling the token foreign.
const OWN_CATCH_UP_WAIT: Duration = Duration::from_secs(2);
/// The receipt type only its owner sees.
const PRIVATE_READ_RECEIPT: &str = "m.read.private";

/// A position on every stream sync reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyncToken {
    events: MultiWriterToken,
    receipts: MultiWriterToken,
    typing: i64,
    account_data: MultiWriterToken,
}

impl SyncToken {
    /// What this process has seen of every stream now.
    fn current(state: &AppState) -> SyncToken {
        SyncToken {
            events: MultiWriterToken::from_generator(state.store.events().events_stream()),
            receipts: MultiWriterToken::from_generator(state.store.receipts().stream()),
            typing: state.typing.latest(),
            account_data: MultiWriterToken::from_generator(state.store.account_data().stream()),
        }
    }

    /// The token after this one when this process has seen `current`: never
    /// behind this one on any writer, so tokens never go backwards. The typing
    /// serial restarts with its writer, so it is taken as it is now.
    fn advanced_to(&self, current: &SyncToken) -> SyncToken {
        SyncToken {
            events: self.events.copy_and_advance(&current.events),
            receipts: self.receipts.copy_and_advance(&current.receipts),
            typing: current.typing,
            account_data: self.account_data.copy_and_advance(&current.account_data),
        }
    }

    async fn to_text(&self, ids: &InstanceIds) -> Result<String, StoreError> {
        Ok(format!(
            "s{}_{}_{}_{}",
            self.events.to_text(ids).await?,
            self.receipts.to_text(ids).await?,
            self.typing,
            self.account_data.to_text(ids).await?,
        ))
    }

    /// The position on the `events` stream.
    pub(super) fn events(&self) -> &MultiWriterToken {
        &self.events
    }

    /// Parses what [`SyncToken::to_text`] wrote; 400 for anything else.
    pub(super) async fn parse(text: &str, ids: &InstanceIds) -> Result<SyncToken, ClientError> {
        let invalid = || ClientError::invalid_param(format!("Invalid sync token: {text:?}"));
        let (events, receipts, typing, account_data) = split_token(text).ok_or_else(invalid)?;
        let stream = async |part: &str| match MultiWriterToken::parse(part, ids).await {
            Ok(token) => Ok(token),
            Err(TokenParseError::Store(err)) => Err(ClientError::from(err)),
            Err(_) => Err(invalid()),
        };
        // Tokens handed out before sync followed account data have no part
        // for it: from the start, so the client gets it all once.
        let account_data = match account_data {
            Some(part) => stream(part).await?,
            None => MultiWriterToken::at(0),
        };
        Ok(SyncToken {
            events: stream(events).await?,
            receipts: stream(receipts).await?,
            typing,
            account_data,
        })
    }
}

/// A sync token's text split into its events and receipts parts (parsed by
/// `MultiWriterToken::parse`), its typing serial and its account data part
/// (absent from tokens made before sync followed account data); `None` when
/// malformed. Total: any text from a client gives an answer, never a panic.
fn split_token(text: &str) -> Option<(&str, &str, i64, Option<&str>)> {
    let mut parts = text.strip_prefix('s')?.split('_');
    let (events, receipts, typing) = (parts.next()?, parts.next()?, parts.next()?);
    let account_data = parts.next();
    if parts.next().is_some()
        || account_data.is_some_and(str::is_empty)
        || typing.is_empty()
        || !typing.bytes().all(|byte| byte.is_ascii_digit())
    {
        return None;
    }
    Some((events, receipts, typing.parse().ok()?, account_data))
}

#[derive(Debug, Deserialize)]
pub(crate) struct SyncParams {
    since: Option<String>,
    timeout: Option<String>,
    filter: Option<String>,
}

/// The timeline limit from an inline filter, `{"room": {"timeline": {"limit": N}}}`.
fn timeline_limit(filter: Option<&str>) -> Result<usize, ClientError> {
    let Some(filter) = filter else { return Ok(DEFAULT_TIMELINE_LIMIT) };
    let not_inline =
        || ClientError::invalid_param("filter must be a JSON filter object or a stored filter's ID");
    let filter: Value = serde_json::from_str(filter).map_err(|_| not_inline())?;
    if !filter.is_object() {
        return Err(not_inline());
    }
    match &filter["room"]["timeline"]["limit"] {
        Value::Null => Ok(DEFAULT_TIMELINE_LIMIT),
        limit => limit
            .as_u64()
            .filter(|limit| *limit > 0)
            .and_then(|limit| usize::try_from(limit).ok())
            .map(|limit| limit.min(MAX_TIMELINE_LIMIT))
            .ok_or_else(|| ClientError::invalid_param("the timeline limit must be a positive integer")),
    }
}

/// `GET /sync?since=&timeout=&filter=`.
pub(crate) async fn sync(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<SyncParams>,
) -> Result<Json<Value>, ClientError> {
    let user_id = authenticate(&state, &headers).await?;
    let timeout = match params.timeout.as_deref() {
        None => Duration::ZERO,
        Some(ms) => Duration::from_millis(
            ms.parse().map_err(|_| ClientError::invalid_param("timeout must be milliseconds"))?,
        ),
    }
    .min(MAX_TIMEOUT);
    let filter = match params.filter.as_deref() {
        Some(filter) => Some(super::filters::resolve(&state, &user_id, filter).await?),
        None => None,
    };
    let limit = timeline_limit(filter.as_deref())?;
    let since = match params.since.as_deref() {
        Some(text) => Some(SyncToken::parse(text, &state.instance_ids).await?),
        None => None,
    };
    if let Some(since) = &since {
        catch_up_with(&state, since).await?;
    }

    let deadline = Instant::now() + timeout;
    let mut events_changed = state.store.events().events_stream().subscribe();
    let mut receipts_changed = state.store.receipts().stream().subscribe();
    let mut typing_changed = state.typing.subscribe();
    let mut shutting_down = state.shutting_down.clone();
    loop {
        events_changed.borrow_and_update();
        receipts_changed.borrow_and_update();
        typing_changed.borrow_and_update();
        let last_look = Instant::now() >= deadline || *shutting_down.borrow_and_update();
        // The change caches only say when a look is worth it; the answer, and
        // the token it hands out, always come from a full look, which reads
        // what the token covers (a cached room list may trail the database).
        let worth_a_look = match &since {
            Some(since) => last_look || may_have_changed(&state, &user_id, since).await?,
            None => true,
        };
        if worth_a_look {
            let current = SyncToken::current(&state);
            let next = since.as_ref().map_or_else(|| current.clone(), |since| since.advanced_to(&current));
            let mut rooms = changes(&state, &user_id, since.as_ref(), &next, limit).await?;
            let account_data = account_data(&state, &user_id, since.as_ref(), &next, &mut rooms).await?;
            if since.is_none() || !rooms.is_empty() || !account_data.is_empty() || last_look {
                let next_batch = next.to_text(&state.instance_ids).await?;
                // Every section clients read is present, empty when this
                // server keeps nothing for it.
                return Ok(Json(json!({
                    "next_batch": next_batch,
                    "rooms": rooms.to_json(),
                    "account_data": {"events": account_data},
                    "presence": {"events": []},
                    "to_device": {"events": []},
                    "device_lists": {"changed": [], "left": []},
                    "device_one_time_keys_count": {},
                })));
            }
        }
        tokio::select! {
            _ = events_changed.changed() => {}
            _ = receipts_changed.changed() => {}
            _ = typing_changed.changed() => {}
            // A shutdown answers waiting syncs at once rather than holding the
            // graceful shutdown for their whole timeout.
            _ = shutting_down.changed() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Waits until this process has seen what `since` covers (a client may come
/// from a process further ahead); a token still ahead after that is not from
/// this deployment, or not from now.
async fn catch_up_with(state: &AppState, since: &SyncToken) -> Result<(), ClientError> {
    let (events, receipts) = (state.store.events().events_stream(), state.store.receipts().stream());
    let account_data = state.store.account_data().stream();
    let (events, receipts, account_data) = tokio::join!(
        catch_up_with_stream(state, &since.events, events),
        catch_up_with_stream(state, &since.receipts, receipts),
        catch_up_with_stream(state, &since.account_data, account_data),
    );
    events.and(receipts).and(account_data)
}

/// [`catch_up_with`] for a position on the `events` stream alone: what a
/// room token from a client (`history`) is waited for with.
pub(super) async fn catch_up_with_events(
    state: &AppState,
    token: &MultiWriterToken,
) -> Result<(), ClientError> {
    catch_up_with_stream(state, token, state.store.events().events_stream()).await
}

/// Waits until this process has seen what `token` covers of `stream`.
async fn catch_up_with_stream(
    state: &AppState,
    token: &MultiWriterToken,
    generator: &MultiWriterIdGenerator,
) -> Result<(), ClientError> {
    let ahead =
        || ClientError::invalid_param("the token is ahead of this server: it is not one of its tokens");
    match generator.wait_for_token(token, CATCH_UP_WAIT).await {
        Ok(()) => {}
        Err(StoreError::Timeout { .. }) => return Err(ahead()),
        Err(err) => return Err(err.into()),
    }
    // The wait returns at once for this process's own writes. Another process
    // may place this writer at a position it has not announced yet (the stream
    // moved past it while it was allocating), so a token ahead of it gets a
    // moment to be caught up with; one still ahead after that was never handed
    // out by this deployment.
    if !reaches_own_position(state, token, generator, Instant::now() + OWN_CATCH_UP_WAIT).await {
        return Err(ahead());
    }
    Ok(())
}

/// Whether this process, if it writes `stream`, reaches `token`'s position
/// for it by `deadline`.
async fn reaches_own_position(
    state: &AppState,
    token: &MultiWriterToken,
    generator: &MultiWriterIdGenerator,
    deadline: Instant,
) -> bool {
    let own = &state.config.instance_name;
    if !generator.is_writer(own) {
        return true;
    }
    let mut moved = generator.subscribe();
    loop {
        moved.borrow_and_update();
        if token.pos_for(own) <= generator.get_current_token_for_writer(own) {
            return true;
        }
        if tokio::time::timeout_at(deadline, moved.changed()).await.is_err() {
            return false;
        }
    }
}

/// Whether anything for `user_id` may have changed after `since`, as the
/// change caches tell without the database: a long poll woken by other users'
/// rooms costs no queries. Conservative: a yes may still find nothing.
async fn may_have_changed(state: &AppState, user_id: &str, since: &SyncToken) -> Result<bool, ClientError> {
    let events = state.store.events();
    if events.membership_changes().has_entity_changed(user_id, since.events.stream())
        || state.store.account_data().user_changes().has_entity_changed(user_id, since.account_data.stream())
    {
        return Ok(true);
    }
    let rooms = events.get_rooms_for_user(user_id).await?;
    let rooms: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let receipts = state.store.receipts().room_changes();
    Ok(rooms.iter().any(|room| {
        events.room_changes().has_entity_changed(room, since.events.stream())
            || receipts.has_entity_changed(room, since.receipts.stream())
            || state.typing.changed_since(room, since.typing)
    }))
}

/// What one sync returns for the user's rooms.
#[derive(Debug, Default)]
struct RoomChanges {
    join: BTreeMap<String, Value>,
    invite: BTreeMap<String, Value>,
    leave: BTreeMap<String, Value>,
}

impl RoomChanges {
    fn is_empty(&self) -> bool {
        self.join.is_empty() && self.invite.is_empty() && self.leave.is_empty()
    }

    fn to_json(&self) -> Value {
        json!({"join": self.join, "invite": self.invite, "leave": self.leave})
    }

    /// The joined room's entry; a room with no news of its timeline gets one
    /// with an empty timeline, which starts (and ends) at `next_batch`.
    async fn joined_entry(
        &mut self,
        state: &AppState,
        room_id: &str,
        next: &SyncToken,
    ) -> Result<&mut Value, ClientError> {
        Ok(match self.join.entry(room_id.to_owned()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let start = RoomToken::Live(next.events.clone()).to_text(&state.instance_ids).await?;
                entry.insert(room_shape(Vec::new(), false, &start, Vec::new()))
            }
        })
    }
}

/// The user's account data that changed since `since` (all of it on a first
/// sync), as sync events: the global ones returned, each joined room's put in
/// its entry (made for it when the room has no other news).
async fn account_data(
    state: &AppState,
    user_id: &str,
    since: Option<&SyncToken>,
    next: &SyncToken,
    rooms: &mut RoomChanges,
) -> Result<Vec<Value>, ClientError> {
    let changed = state
        .store
        .account_data()
        .get_account_data_between(user_id, since.map(|since| &since.account_data), &next.account_data)
        .await?;
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    // The latest of each (room, type): a change replaces the one before.
    let mut latest: BTreeMap<(Option<String>, String), Value> = BTreeMap::new();
    for (room_id, data_type, content) in changed {
        latest.insert((room_id, data_type), content);
    }
    let joined = state.store.events().get_rooms_for_user(user_id).await?;
    let mut global = Vec::new();
    for ((room_id, data_type), content) in latest {
        let event = json!({"type": data_type, "content": content});
        let Some(room_id) = room_id else {
            global.push(event);
            continue;
        };
        if !joined.contains(&room_id) {
            continue;
        }
        let entry = rooms.joined_entry(state, &room_id, next).await?;
        if let Some(events) = entry["account_data"]["events"].as_array_mut() {
            events.push(event);
        }
    }
    Ok(global)
}

/// The state types an invitation shows of its room (Matrix's stripped state).
const INVITE_STATE_TYPES: [&str; 5] =
    ["m.room.create", "m.room.join_rules", "m.room.name", "m.room.avatar", "m.room.canonical_alias"];

/// What an invited user sees of the room before joining: a few of its state
/// events, stripped to type, state key, sender and content, and the invitation.
async fn invite_state(state: &AppState, room_id: &str, user_id: &str) -> Result<Value, ClientError> {
    let events = state.store.events();
    let current = events.get_current_state_ids(room_id).await?;
    let mut stripped = Vec::new();
    let keys = INVITE_STATE_TYPES
        .iter()
        .map(|event_type| ((*event_type).to_owned(), String::new()))
        .chain(std::iter::once(("m.room.member".to_owned(), user_id.to_owned())));
    for key in keys {
        let Some(event_id) = current.get(&key) else { continue };
        let Some(event) = events.get_event(event_id).await? else { continue };
        let full = client_event(&event);
        stripped.push(json!({
            "type": full["type"],
            "state_key": full["state_key"],
            "sender": full["sender"],
            "content": full["content"],
        }));
    }
    Ok(json!({"invite_state": {"events": stripped}}))
}

/// The user's last membership change `token` covers (each by its own
/// writer), from the room's changes in stream order.
fn change_at<'a>(changes: &[&'a MembershipChange], token: &MultiWriterToken) -> Option<&'a MembershipChange> {
    changes
        .iter()
        .rev()
        .find(|change| !token.persisted_after(&change.instance_name, change.stream_ordering))
        .copied()
}

/// The user's membership as `token` sees it.
fn membership_at<'a>(changes: &[&'a MembershipChange], token: &MultiWriterToken) -> Option<&'a str> {
    change_at(changes, token).map(|change| change.membership.as_str())
}

async fn changes(
    state: &AppState,
    user_id: &str,
    since: Option<&SyncToken>,
    next: &SyncToken,
    limit: usize,
) -> Result<RoomChanges, ClientError> {
    let history = state.store.events().get_membership_history(user_id).await?;
    // Oldest first, as the history comes.
    let mut by_room: BTreeMap<&str, Vec<&MembershipChange>> = BTreeMap::new();
    for change in &history {
        by_room.entry(change.room_id.as_str()).or_default().push(change);
    }
    let mut changes = RoomChanges::default();
    let mut joined_rooms = Vec::new();
    for (room_id, room_changes) in &by_room {
        let room_id = *room_id;
        let invited_now = membership_at(room_changes, &next.events) == Some("invite");
        let invited_before =
            since.is_some_and(|since| membership_at(room_changes, &since.events) == Some("invite"));
        if invited_now && !invited_before {
            changes.invite.insert(room_id.to_owned(), invite_state(state, room_id, user_id).await?);
        }
        let joined_now = membership_at(room_changes, &next.events) == Some("join");
        let joined_before =
            since.is_some_and(|since| membership_at(room_changes, &since.events) == Some("join"));
        match (joined_before, joined_now) {
            (false, true) => {
                // New to the user (or the first sync): the state and the latest events.
                let (events, limited) = timeline(state, room_id, None, &next.events, limit).await?;
                let start = timeline_start(&next.events, &events);
                // The state at the timeline's start: what the timeline carries
                // is not repeated.
                let state_events = state_events(state, room_id, Some(&start)).await?;
                let room = room_json(state, user_id, &start, &events, limited, state_events).await?;
                changes.join.insert(room_id.to_owned(), room);
                joined_rooms.push(room_id);
            }
            (true, true) => {
                let since = since.map(|since| &since.events);
                let (events, limited) = timeline(state, room_id, since, &next.events, limit).await?;
                let start = timeline_start(&next.events, &events);
                // A gap in the timeline may hide state changes: send the state
                // at the timeline's start, as far as the client has not seen it
                // (what `since` covers it has).
                let state_events = match since {
                    Some(since) if limited => {
                        state_events(state, room_id, Some(&start.copy_and_advance(since))).await?
                    }
                    _ => Vec::new(),
                };
                if !events.is_empty() {
                    let room = room_json(state, user_id, &start, &events, limited, state_events).await?;
                    changes.join.insert(room_id.to_owned(), room);
                }
                joined_rooms.push(room_id);
            }
            (true, false) => {
                // Up to the user's leaving, and nothing after it.
                let left_at =
                    change_at(room_changes, &next.events).map_or(i64::MAX, |change| change.stream_ordering);
                let since = since.map(|since| &since.events);
                let upper = next.events.bound(left_at);
                let (events, limited) = timeline(state, room_id, since, &upper, limit).await?;
                let start = timeline_start(&upper, &events);
                let room = room_json(state, user_id, &start, &events, limited, Vec::new()).await?;
                changes.leave.insert(room_id.to_owned(), room);
            }
            (false, false) => {}
        }
    }
    add_ephemeral(state, user_id, &mut changes, &joined_rooms, since, next).await?;
    Ok(changes)
}

/// Receipts and typing for the joined rooms, into their entries (creating an
/// entry for a room with only ephemeral news).
async fn add_ephemeral(
    state: &AppState,
    user_id: &str,
    changes: &mut RoomChanges,
    joined_rooms: &[&str],
    since: Option<&SyncToken>,
    next: &SyncToken,
) -> Result<(), ClientError> {
    let mut ephemeral: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let receipts = state
        .store
        .receipts()
        .get_receipts_between(joined_rooms, since.map(|since| &since.receipts), &next.receipts)
        .await?;
    let mut by_room: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for receipt in receipts {
        // A private receipt is for its owner's eyes only.
        if receipt.receipt_type == PRIVATE_READ_RECEIPT && receipt.user_id != user_id {
            continue;
        }
        let content = by_room.entry(receipt.room_id.clone()).or_default();
        let by_type = content.entry(receipt.event_id.clone()).or_insert_with(|| json!({}));
        let mut data = receipt.data.clone();
        if let (Some(thread_id), Some(data)) = (&receipt.thread_id, data.as_object_mut()) {
            data.insert("thread_id".to_owned(), json!(thread_id));
        }
        by_type[&receipt.receipt_type][&receipt.user_id] = data;
    }
    for room_id in joined_rooms {
        if let Some(content) = by_room.remove(*room_id) {
            ephemeral.entry(room_id).or_default().push(json!({"type": "m.receipt", "content": content}));
        }
        let typing_changed = match since {
            None => !state.typing.typing_in(room_id).is_empty(),
            Some(since) => state.typing.changed_since(room_id, since.typing),
        };
        if typing_changed {
            let user_ids = state.typing.typing_in(room_id);
            ephemeral
                .entry(room_id)
                .or_default()
                .push(json!({"type": "m.typing", "content": {"user_ids": user_ids}}));
        }
    }
    for (room_id, events) in ephemeral {
        let entry = changes.joined_entry(state, room_id, next).await?;
        entry["ephemeral"]["events"] = Value::Array(events);
    }
    Ok(())
}

/// The token just before the first of `events` by every writer, within
/// `upper` (the token the timeline was read up to): a room token `history`
/// pages back from, through everything `upper` covers but the timeline. The
/// timeline holds the newest events of its range, so what it left out of the
/// range lies below its first event, whichever writer persisted it; an empty
/// timeline starts at `upper`.
fn timeline_start(upper: &MultiWriterToken, events: &[Event]) -> MultiWriterToken {
    match events.first() {
        Some(first) => upper.bound(first.stream_ordering - 1),
        None => upper.clone(),
    }
}

/// A room's entry in a sync: its timeline (starting at `start`), its state and
/// no ephemeral events yet.
async fn room_json(
    state: &AppState,
    user_id: &str,
    start: &MultiWriterToken,
    events: &[Event],
    limited: bool,
    state_events: Vec<Value>,
) -> Result<Value, ClientError> {
    let prev_batch = RoomToken::Live(start.clone()).to_text(&state.instance_ids).await?;
    let events = client_events(state, user_id, events).await?;
    Ok(room_shape(events, limited, &prev_batch, state_events))
}

/// The JSON of a room's entry, every section present.
fn room_shape(events: Vec<Value>, limited: bool, prev_batch: &str, state_events: Vec<Value>) -> Value {
    json!({
        "timeline": {"events": events, "limited": limited, "prev_batch": prev_batch},
        "state": {"events": state_events},
        "ephemeral": {"events": []},
        "account_data": {"events": []},
    })
}

/// `events` as clients see them; those `user_id` sent with a transaction ID
/// carry it as `unsigned.transaction_id`, so that the client that sent them
/// knows them for its own (in its own sync and history only).
pub(super) async fn client_events(
    state: &AppState,
    user_id: &str,
    events: &[Event],
) -> Result<Vec<Value>, ClientError> {
    let own: Vec<&str> = events
        .iter()
        .filter(|event| event.event.sender == user_id)
        .map(|event| event.event.event_id.as_str())
        .collect();
    let txn_ids = state.store.events().get_txn_ids_of_events(user_id, &own).await?;
    Ok(events
        .iter()
        .map(|event| {
            let mut json = client_event(event);
            if let Some(txn_id) = txn_ids.get(&event.event.event_id) {
                json["unsigned"]["transaction_id"] = json!(txn_id);
            }
            json
        })
        .collect())
}

/// The writers either token lists apart from its stream position, once each
/// and sorted: a range of the room's events is read per listed writer, and one
/// for all the others.
pub(super) fn listed_writers(low: Option<&MultiWriterToken>, high: &MultiWriterToken) -> Vec<String> {
    let mut listed: Vec<String> = high
        .instance_map()
        .keys()
        .chain(low.into_iter().flat_map(|low| low.instance_map().keys()))
        .cloned()
        .collect();
    listed.sort();
    listed.dedup();
    listed
}

/// The room's events in `(low, high]` by each event's own writer, the newest
/// `limit` of them, oldest first; and whether more were left out.
///
/// A writer's events lie between its positions in the two tokens, and the
/// writers neither token lists are all at the tokens' stream positions: one
/// query per listed writer and one for the rest, each for at most `limit + 1`
/// rows, so a writer far ahead of the others, or stalled behind them, costs
/// only its own new rows.
async fn timeline(
    state: &AppState,
    room_id: &str,
    low: Option<&MultiWriterToken>,
    high: &MultiWriterToken,
    limit: usize,
) -> Result<(Vec<Event>, bool), ClientError> {
    let reader = state.store.events();
    let listed = listed_writers(low, high);
    // Backfilled history (negative orderings) is not part of the live timeline.
    let after = |writer: Option<&str>| {
        low.map_or(0, |low| writer.map_or(low.stream(), |writer| low.pos_for(writer))).max(0)
    };
    let mut events = Vec::new();
    for writer in &listed {
        let only = WriterFilter::Only(writer.clone());
        let to = high.pos_for(writer);
        events.extend(
            reader.get_room_events_of_writers(room_id, &only, after(Some(writer)), to, limit + 1).await?,
        );
    }
    let rest = WriterFilter::AllBut(listed);
    events.extend(
        reader.get_room_events_of_writers(room_id, &rest, after(None), high.stream(), limit + 1).await?,
    );
    events.sort_by_key(|event| event.stream_ordering);
    let limited = events.len() > limit;
    let newest = events.split_off(events.len().saturating_sub(limit));
    Ok((newest, limited))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{DEFAULT_TIMELINE_LIMIT, split_token, timeline_limit};

    #[test]
    fn tokens_split_into_their_parts() {
        assert_eq!(split_token("s5_3_0_7"), Some(("5", "3", 0, Some("7"))));
        assert_eq!(split_token("sm5~1.6_3_12_m4~2.5"), Some(("m5~1.6", "3", 12, Some("m4~2.5"))));
        // Tokens from before sync followed account data.
        assert_eq!(split_token("s5_3_0"), Some(("5", "3", 0, None)));
        for bad in [
            "",
            "s",
            "5_3_0",
            "s5_3",
            "s5_3_0_1_2",
            "s5_3_0_",
            "s5_3_-1",
            "s5_3_",
            "s5_3_99999999999999999999",
        ] {
            assert_eq!(split_token(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn splitting_is_total(text in any::<String>()) {
            let _ = split_token(&text);
        }

        #[test]
        fn what_sync_writes_splits_back(
            events in "[0-9]{1,6}|m[0-9]{1,6}(~[0-9]{1,3}\\.[0-9]{1,6}){0,3}",
            receipts in "[0-9]{1,6}",
            typing in 0..i64::MAX,
            account_data in "[0-9]{1,6}|m[0-9]{1,6}(~[0-9]{1,3}\\.[0-9]{1,6}){0,3}",
        ) {
            let text = format!("s{events}_{receipts}_{typing}_{account_data}");
            prop_assert_eq!(
                split_token(&text),
                Some((events.as_str(), receipts.as_str(), typing, Some(account_data.as_str())))
            );
        }
    }

    #[test]
    fn the_timeline_limit_comes_from_an_inline_filter() {
        assert_eq!(timeline_limit(None).ok(), Some(DEFAULT_TIMELINE_LIMIT));
        assert_eq!(timeline_limit(Some(r#"{"room":{"timeline":{"limit":50}}}"#)).ok(), Some(50));
        assert_eq!(timeline_limit(Some(r#"{"room":{}}"#)).ok(), Some(DEFAULT_TIMELINE_LIMIT));
        assert_eq!(timeline_limit(Some(r#"{"room":{"timeline":{"limit":5000}}}"#)).ok(), Some(1_000));
        for bad in
            ["12", "{", r#"{"room":{"timeline":{"limit":0}}}"#, r#"{"room":{"timeline":{"limit":"a"}}}"#]
        {
            assert!(timeline_limit(Some(bad)).is_err(), "{bad}");
        }
    }
}
