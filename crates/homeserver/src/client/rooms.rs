//! The room endpoints: creating, joining and leaving rooms, sending events and
//! state, receipts and typing (written through `writes`), and reading a room's
//! state and members (from this process's caches).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use store_core::MultiWriterToken;
use store_events::Event;
use store_receipts::ReceiptRow;

use super::writes::{self, EventContent, MAX_TYPING_TIMEOUT_MS, RoomWrite, TypingChange};
use super::{ClientError, authenticate, now_ms, parse_body, random_string, require_self};
use crate::http::AppState;

/// Matrix's limit on the size of an event, applied to its content.
const MAX_CONTENT_BYTES: usize = 65_536;

/// The longest event type, state key or transaction ID taken, in bytes.
const MAX_IDENTIFIER_BYTES: usize = 255;

/// Refuses what is not a room ID (`!opaque:server`).
pub(super) fn check_room_id(room_id: &str) -> Result<(), ClientError> {
    match room_id.strip_prefix('!').and_then(|rest| rest.split_once(':')) {
        Some((opaque, server)) if !opaque.is_empty() && !server.is_empty() => Ok(()),
        _ => Err(ClientError::invalid_param(format!("{room_id:?} is not a room ID"))),
    }
}

/// Refuses an event type, state key or transaction ID too long to store.
fn check_identifier(what: &str, value: &str) -> Result<(), ClientError> {
    if value.len() > MAX_IDENTIFIER_BYTES {
        return Err(ClientError::invalid_param(format!(
            "the {what} is longer than {MAX_IDENTIFIER_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The event types only createRoom, join and leave write.
fn check_client_may_send(event_type: &str) -> Result<(), ClientError> {
    if matches!(event_type, "m.room.create" | "m.room.member") {
        return Err(ClientError::forbidden(format!(
            "{event_type} is set by createRoom, join and leave, not sent by clients"
        )));
    }
    Ok(())
}

/// A JSON object from the body: event contents are objects.
fn content_object(body: &Bytes) -> Result<Value, ClientError> {
    if body.len() > MAX_CONTENT_BYTES {
        return Err(ClientError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            format!("event content is limited to {MAX_CONTENT_BYTES} bytes"),
        ));
    }
    let content: Value = parse_body(body)?;
    if !content.is_object() {
        return Err(ClientError::bad_json("the content must be a JSON object"));
    }
    Ok(content)
}

/// An event as clients see it.
pub(crate) fn client_event(event: &Event) -> Value {
    let content: Value = serde_json::from_str(&event.event.content).unwrap_or_else(|_| json!({}));
    let mut json = json!({
        "event_id": event.event.event_id,
        "type": event.event.event_type,
        "sender": event.event.sender,
        "origin_server_ts": event.event.origin_server_ts,
        "room_id": event.room_id,
        "content": content,
    });
    if let Some(state_key) = &event.event.state_key {
        json["state_key"] = json!(state_key);
    }
    json
}

/// Refuses, as a member-only read must, a caller who is not signed in or not
/// joined to `room_id` (a room ID).
async fn member_of_room(state: &AppState, headers: &HeaderMap, room_id: &str) -> Result<(), ClientError> {
    let user_id = authenticate(state, headers).await?;
    check_room_id(room_id)?;
    require_member(state, room_id, &user_id).await
}

/// Refuses a user who is not joined to the room, as this process knows it.
async fn require_member(state: &AppState, room_id: &str, user_id: &str) -> Result<(), ClientError> {
    if writes::membership_of(state, room_id, user_id).await?.as_deref() == Some("join") {
        return Ok(());
    }
    if !writes::room_exists(state, room_id).await? {
        return Err(ClientError::not_found(format!("unknown room {room_id}")));
    }
    Err(ClientError::forbidden(format!("{user_id} is not in the room")))
}

async fn write_one(
    state: &AppState,
    room_id: String,
    sender: String,
    event: EventContent,
    txn_id: Option<String>,
) -> Result<String, ClientError> {
    let write = RoomWrite { room_id, sender, events: vec![event], txn_id, creates_room: false };
    let written = writes::write_room_events(state, write).await?;
    written.event_ids.into_iter().next().ok_or_else(|| ClientError::internal("a write produced no event", ""))
}

fn member_event(user_id: &str, membership: &str) -> EventContent {
    EventContent {
        event_type: "m.room.member".to_owned(),
        state_key: Some(user_id.to_owned()),
        content: json!({"membership": membership}),
    }
}

#[derive(Debug, Default, Deserialize)]
struct CreateRoom {
    preset: Option<String>,
    visibility: Option<String>,
    name: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    invite: Vec<String>,
}

/// Whether `user_id` has the shape of a Matrix user ID (`@localpart:server`).
fn is_user_id(user_id: &str) -> bool {
    user_id.len() <= MAX_IDENTIFIER_BYTES
        && user_id
            .strip_prefix('@')
            .is_some_and(|rest| rest.split_once(':').is_some_and(|(l, s)| !l.is_empty() && !s.is_empty()))
}

fn state_event(event_type: &str, content: Value) -> EventContent {
    EventContent { event_type: event_type.to_owned(), state_key: Some(String::new()), content }
}

/// `POST /createRoom` → `{"room_id"}`: the creator is joined, with Matrix's
/// default power levels; `preset` (`private_chat`, the default, and
/// `trusted_private_chat`: invite only; `public_chat`, or a `"public"`
/// visibility without a preset: anyone may join), `name`, `topic` and
/// `invite` are honoured.
pub(crate) async fn create_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    let sender = authenticate(&state, &headers).await?;
    let options: CreateRoom = parse_body(&body)?;
    let preset = match (options.preset.as_deref(), options.visibility.as_deref()) {
        (Some(preset), _) => preset,
        (None, Some("public")) => "public_chat",
        (None, _) => "private_chat",
    };
    let join_rule = match preset {
        "private_chat" | "trusted_private_chat" => "invite",
        "public_chat" => "public",
        other => return Err(ClientError::invalid_param(format!("unknown preset {other:?}"))),
    };
    if let Some(bad) = options.invite.iter().find(|user| !is_user_id(user)) {
        return Err(ClientError::invalid_param(format!("{bad:?} is not a user ID")));
    }
    let mut admins = vec![sender.as_str()];
    if preset == "trusted_private_chat" {
        admins.extend(options.invite.iter().map(String::as_str));
    }
    let room_id = format!("!{}:{}", random_string(18), state.config.server_name);
    let mut events = vec![
        state_event("m.room.create", json!({"creator": sender, "room_version": "10"})),
        member_event(&sender, "join"),
        state_event("m.room.power_levels", super::auth_rules::initial_power_levels(&admins)),
        state_event("m.room.join_rules", json!({"join_rule": join_rule})),
        state_event("m.room.history_visibility", json!({"history_visibility": "shared"})),
    ];
    if let Some(name) = options.name {
        events.push(state_event("m.room.name", json!({"name": name})));
    }
    if let Some(topic) = options.topic {
        events.push(state_event("m.room.topic", json!({"topic": topic})));
    }
    events.extend(options.invite.iter().map(|user| member_event(user, "invite")));
    let write = RoomWrite { room_id: room_id.clone(), sender, events, txn_id: None, creates_room: true };
    writes::write_room_events(&state, write).await?;
    Ok(Json(json!({"room_id": room_id})))
}

/// `POST /rooms/{roomId}/join` → `{"room_id"}`.
pub(crate) async fn join(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room_id): Path<String>,
) -> Result<Json<Value>, ClientError> {
    set_own_membership(&state, &headers, &room_id, "join").await?;
    Ok(Json(json!({"room_id": room_id})))
}

/// `POST /rooms/{roomId}/leave` → `{}`.
pub(crate) async fn leave(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room_id): Path<String>,
) -> Result<Json<Value>, ClientError> {
    set_own_membership(&state, &headers, &room_id, "leave").await?;
    Ok(Json(json!({})))
}

#[derive(Debug, Deserialize)]
struct Invite {
    user_id: String,
}

/// `POST /rooms/{roomId}/invite` `{"user_id"}` → `{}`: a member invites.
pub(crate) async fn invite(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    let sender = authenticate(&state, &headers).await?;
    check_room_id(&room_id)?;
    let Invite { user_id } = parse_body(&body)?;
    if !is_user_id(&user_id) {
        return Err(ClientError::invalid_param(format!("{user_id:?} is not a user ID")));
    }
    write_one(&state, room_id, sender, member_event(&user_id, "invite"), None).await?;
    Ok(Json(json!({})))
}

/// The caller's own `m.room.member` event in `room_id`.
async fn set_own_membership(
    state: &AppState,
    headers: &HeaderMap,
    room_id: &str,
    membership: &str,
) -> Result<(), ClientError> {
    let sender = authenticate(state, headers).await?;
    check_room_id(room_id)?;
    let event = member_event(&sender, membership);
    write_one(state, room_id.to_owned(), sender, event, None).await?;
    Ok(())
}

/// `PUT /rooms/{roomId}/send/{eventType}/{txnId}` → `{"event_id"}`; a retry
/// with the same transaction ID answers the same event.
pub(crate) async fn send(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((room_id, event_type, txn_id)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    let sender = authenticate(&state, &headers).await?;
    check_room_id(&room_id)?;
    check_identifier("event type", &event_type)?;
    check_identifier("transaction ID", &txn_id)?;
    check_client_may_send(&event_type)?;
    let content = content_object(&body)?;
    let event = EventContent { event_type, state_key: None, content };
    let event_id = write_one(&state, room_id, sender, event, Some(txn_id)).await?;
    Ok(Json(json!({"event_id": event_id})))
}

/// `PUT /rooms/{roomId}/state/{eventType}/{stateKey}` → `{"event_id"}`.
pub(crate) async fn put_state(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((room_id, event_type, state_key)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    set_state(state, headers, room_id, event_type, state_key, body).await
}

/// `PUT /rooms/{roomId}/state/{eventType}`: the empty state key.
pub(crate) async fn put_state_empty_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((room_id, event_type)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    set_state(state, headers, room_id, event_type, String::new(), body).await
}

async fn set_state(
    state: AppState,
    headers: HeaderMap,
    room_id: String,
    event_type: String,
    state_key: String,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    let sender = authenticate(&state, &headers).await?;
    check_room_id(&room_id)?;
    check_identifier("event type", &event_type)?;
    check_identifier("state key", &state_key)?;
    check_client_may_send(&event_type)?;
    let content = content_object(&body)?;
    let event = EventContent { event_type, state_key: Some(state_key), content };
    let event_id = write_one(&state, room_id, sender, event, None).await?;
    Ok(Json(json!({"event_id": event_id})))
}

/// `GET /rooms/{roomId}/state`: the current state events, for members.
pub(crate) async fn get_state(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room_id): Path<String>,
) -> Result<Json<Value>, ClientError> {
    member_of_room(&state, &headers, &room_id).await?;
    Ok(Json(Value::Array(state_events(&state, &room_id, None).await?)))
}

/// How far back one state entry's history is read for a token that trails
/// its current event.
const STATE_HISTORY_LIMIT: usize = 50;

/// The room's state events, as clients see them: the current state, or with
/// `as_of`, the state as that token sees it: each entry's current event when
/// the token covers it, or else the entry's latest event the token covers (a
/// state event past the token comes in a later sync's timeline, not twice,
/// and the entry it replaces is not left out meanwhile).
pub(crate) async fn state_events(
    state: &AppState,
    room_id: &str,
    as_of: Option<&MultiWriterToken>,
) -> Result<Vec<Value>, ClientError> {
    let events = state.store.events();
    let covered = |event: &Event| {
        as_of.is_none_or(|token| !token.persisted_after(&event.instance_name, event.stream_ordering))
    };
    let mut state_events = Vec::new();
    for ((event_type, state_key), event_id) in events.get_current_state_ids(room_id).await?.iter() {
        let Some(event) = events.get_event(event_id).await? else { continue };
        if covered(&event) {
            state_events.push(client_event(&event));
            continue;
        }
        // Only events past the token are newer than the covered ones: a few.
        let history = events.get_state_history(room_id, event_type, state_key, STATE_HISTORY_LIMIT).await?;
        if let Some(event) = history.iter().find(|event| covered(event)) {
            state_events.push(client_event(event));
        }
    }
    Ok(state_events)
}

/// `GET /rooms/{roomId}/joined_members` → `{"joined": {userId: {}}}`, for members.
pub(crate) async fn joined_members(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room_id): Path<String>,
) -> Result<Json<Value>, ClientError> {
    member_of_room(&state, &headers, &room_id).await?;
    let members = state.store.events().get_users_in_room(&room_id).await?;
    let joined: Map<String, Value> = members.iter().map(|member| (member.clone(), json!({}))).collect();
    Ok(Json(json!({"joined": joined})))
}

/// `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}` → `{}`.
pub(crate) async fn receipt(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((room_id, receipt_type, event_id)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    #[derive(Deserialize)]
    struct ReceiptBody {
        #[serde(default)]
        thread_id: Option<String>,
    }
    let user_id = authenticate(&state, &headers).await?;
    check_room_id(&room_id)?;
    if !matches!(receipt_type.as_str(), "m.read" | "m.read.private") {
        return Err(ClientError::invalid_param(format!("unknown receipt type {receipt_type:?}")));
    }
    let ReceiptBody { thread_id } = parse_body(&body)?;
    if let Some(thread_id) = &thread_id {
        check_identifier("thread ID", thread_id)?;
    }
    require_member(&state, &room_id, &user_id).await?;
    match state.store.events().get_event(&event_id).await? {
        Some(event) if event.room_id == room_id => {}
        _ => return Err(ClientError::not_found(format!("no event {event_id} in the room"))),
    }
    let receipt =
        ReceiptRow { room_id, receipt_type, user_id, event_id, thread_id, data: json!({"ts": now_ms()}) };
    writes::write_receipt(&state, receipt).await?;
    Ok(Json(json!({})))
}

/// `PUT /rooms/{roomId}/typing/{userId}` `{"typing", "timeout"}` → `{}`.
pub(crate) async fn typing(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((room_id, typing_user)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    #[derive(Deserialize)]
    struct TypingBody {
        typing: bool,
        #[serde(default)]
        timeout: Option<u64>,
    }
    let user_id = authenticate(&state, &headers).await?;
    check_room_id(&room_id)?;
    require_self(&user_id, &typing_user, "set your own typing")?;
    let TypingBody { typing, timeout } = parse_body(&body)?;
    require_member(&state, &room_id, &user_id).await?;
    let timeout_ms = timeout.unwrap_or(30_000).min(MAX_TYPING_TIMEOUT_MS);
    writes::write_typing(&state, TypingChange { room_id, user_id, typing, timeout_ms }).await?;
    Ok(Json(json!({})))
}

/// `GET /rooms/{roomId}/members` → `{"chunk": [member events]}`: the room's
/// current membership, for members.
pub(crate) async fn members(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room_id): Path<String>,
) -> Result<Json<Value>, ClientError> {
    member_of_room(&state, &headers, &room_id).await?;
    let events = state.store.events();
    let mut chunk = Vec::new();
    for ((event_type, _), event_id) in events.get_current_state_ids(&room_id).await?.iter() {
        if event_type != "m.room.member" {
            continue;
        }
        if let Some(event) = events.get_event(event_id).await? {
            chunk.push(client_event(&event));
        }
    }
    Ok(Json(json!({"chunk": chunk})))
}

/// `GET /rooms/{roomId}/event/{eventId}`: one event of a room the user is in.
pub(crate) async fn event(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((room_id, event_id)): Path<(String, String)>,
) -> Result<Json<Value>, ClientError> {
    member_of_room(&state, &headers, &room_id).await?;
    match state.store.events().get_event(&event_id).await? {
        Some(event) if event.room_id == room_id => Ok(Json(client_event(&event))),
        _ => Err(ClientError::not_found(format!("no event {event_id} in {room_id}"))),
    }
}

/// `GET /joined_rooms` → `{"joined_rooms": [roomId]}`.
pub(crate) async fn joined_rooms(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ClientError> {
    let user_id = authenticate(&state, &headers).await?;
    let rooms = state.store.events().get_rooms_for_user(&user_id).await?;
    Ok(Json(json!({"joined_rooms": rooms.as_slice()})))
}
