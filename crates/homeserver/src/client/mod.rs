//! The client-server API: the subset of Matrix's `/_matrix/client/v3` that
//! clients use to register, join rooms, send events, and read them back through
//! `sync`, served by every process of a deployment.
//!
//! - `accounts`: registration, login and devices, logout, and what clients ask
//!   first (`/versions`, `/capabilities`).
//! - `profile`: display names, and the default push rules clients ask for.
//! - `rooms`: the room endpoints; each write goes to the writer of its stream
//!   (`writes`), reads come from this process's caches and the database.
//! - `writes`: where a write goes (a stable hash of the room over the stream's
//!   writers), the internal endpoints the writers serve, and forwarding.
//! - `sync`: the long-polling `sync` and its multi-writer token.
//!
//! Errors are Matrix's `{"errcode": "M_…", "error": "…"}` with the matching
//! HTTP status. `docs/http.md` documents every endpoint.

mod account_data;
mod accounts;
mod auth_rules;
mod filters;
mod history;
mod profile;
mod room_queue;
mod rooms;
mod sync;
mod writes;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use rand::Rng as _;
use rand::distributions::Alphanumeric;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use store_core::StoreError;

use crate::http::AppState;

pub(crate) use accounts::{LoginThrottle, RegistrationNonces};
pub(crate) use room_queue::RoomLocks;
pub(crate) use writes::WriterAddresses;

/// The routes of the client API and of the internal write endpoints.
pub(crate) fn router(state: AppState) -> Router {
    const ROOM: &str = "/_matrix/client/v3/rooms/{room_id}";
    let client = Router::new()
        .merge(accounts::router())
        .merge(history::router())
        .route("/_matrix/client/v3/createRoom", post(rooms::create_room))
        .route(&format!("{ROOM}/join"), post(rooms::join))
        .route(&format!("{ROOM}/leave"), post(rooms::leave))
        .route(&format!("{ROOM}/invite"), post(rooms::invite))
        .route(&format!("{ROOM}/send/{{event_type}}/{{txn_id}}"), put(rooms::send))
        .route(&format!("{ROOM}/state/{{event_type}}/{{state_key}}"), put(rooms::put_state))
        // An empty state key: `…/state/{type}` and `…/state/{type}/`.
        .route(&format!("{ROOM}/state/{{event_type}}"), put(rooms::put_state_empty_key))
        .route(&format!("{ROOM}/state/{{event_type}}/"), put(rooms::put_state_empty_key))
        .route(&format!("{ROOM}/state"), get(rooms::get_state))
        .route(&format!("{ROOM}/joined_members"), get(rooms::joined_members))
        .route(&format!("{ROOM}/members"), get(rooms::members))
        .route(&format!("{ROOM}/event/{{event_id}}"), get(rooms::event))
        .route("/_matrix/client/v3/joined_rooms", get(rooms::joined_rooms))
        .merge(profile::router())
        .merge(account_data::router())
        .merge(filters::router())
        // Room IDs only: this server has no aliases.
        .route("/_matrix/client/v3/join/{room_id}", post(rooms::join))
        .route(&format!("{ROOM}/receipt/{{receipt_type}}/{{event_id}}"), post(rooms::receipt))
        .route(&format!("{ROOM}/typing/{{user_id}}"), put(rooms::typing))
        .route("/_matrix/client/v3/sync", get(sync::sync))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(matrix_error_body))
        .with_state(state.clone());
    // Outside that layer: what a writer answers in JSON is its verdict on the
    // write, which `forward` relays to the client; axum's own refusals of a
    // forwarded request stay plain text, the forwarder's fault, not the client's.
    let internal = Router::new()
        .route(writes::SEND_EVENTS_PATH, post(writes::send_events_endpoint))
        .route(writes::SEND_RECEIPT_PATH, post(writes::send_receipt_endpoint))
        .route(writes::SET_TYPING_PATH, post(writes::set_typing_endpoint))
        .route(writes::ADD_ACCOUNT_DATA_PATH, post(writes::add_account_data_endpoint))
        .with_state(state);
    client.merge(internal)
}

/// Refusals axum makes before a handler runs (a path that does not decode, a
/// query it cannot read, a body over its limit) come as plain text; clients
/// get Matrix's error shape for those too.
async fn matrix_error_body(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
    let message = String::from_utf8_lossy(&body).into_owned();
    let errcode = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "M_TOO_LARGE",
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "M_INVALID_PARAM",
        _ => "M_UNKNOWN",
    };
    // 422 is axum's word for a well-formed but unusable request; Matrix says 400.
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { status };
    ClientError::new(status, errcode, message).into_response()
}

/// Any path no route serves, in Matrix's words (merged as the fallback of the
/// whole listener).
pub(crate) async fn unrecognized() -> ClientError {
    ClientError::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
}

async fn method_not_allowed() -> ClientError {
    ClientError::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Unrecognized request method")
}

/// A refusal as Matrix clients expect it.
#[derive(Debug)]
pub(crate) struct ClientError {
    status: StatusCode,
    errcode: String,
    message: String,
    /// A whole answer instead of `{"errcode", "error"}` (user-interactive auth's
    /// flows, a rate limit's `retry_after_ms`).
    body: Option<Value>,
}

/// The errcode of [`ClientError::moved`], between processes only.
pub(crate) const WRITER_MOVED: &str = "HS_WRITER_MOVED";

impl ClientError {
    pub(crate) fn new(status: StatusCode, errcode: &str, message: impl Into<String>) -> ClientError {
        ClientError { status, errcode: errcode.to_owned(), message: message.into(), body: None }
    }

    /// A refusal whose answer is `body` as it is.
    pub(crate) fn with_body(status: StatusCode, body: Value) -> ClientError {
        let errcode = body["errcode"].as_str().unwrap_or_default().to_owned();
        let message = body["error"].as_str().unwrap_or_default().to_owned();
        ClientError { status, errcode, message, body: Some(body) }
    }

    /// A write that reached a process which does not write its shard (room,
    /// user) in the current epoch of the stream's writers: the process that
    /// forwarded it asks the new writer instead. Never reaches a client.
    pub(crate) fn moved(message: impl Into<String>) -> ClientError {
        ClientError::new(StatusCode::CONFLICT, WRITER_MOVED, message)
    }

    /// Whether this is [`ClientError::moved`].
    pub(crate) fn is_moved(&self) -> bool {
        self.errcode == WRITER_MOVED
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> ClientError {
        ClientError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", message)
    }

    pub(crate) fn invalid_param(message: impl Into<String>) -> ClientError {
        ClientError::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", message)
    }

    pub(crate) fn bad_json(message: impl Into<String>) -> ClientError {
        ClientError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> ClientError {
        ClientError::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", message)
    }

    /// A failure of this server, not of the request: logged here, told to the
    /// client without internals.
    pub(crate) fn internal(what: &str, err: impl std::fmt::Display) -> ClientError {
        tracing::warn!("{what}: {err}");
        ClientError::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", format!("{what}; try again"))
    }
}

impl From<StoreError> for ClientError {
    fn from(err: StoreError) -> ClientError {
        if err.is_moved() {
            return ClientError::moved(err.to_string());
        }
        ClientError::internal("the database failed", err)
    }
}

impl IntoResponse for ClientError {
    fn into_response(self) -> Response {
        let body = self.body.unwrap_or_else(|| json!({"errcode": self.errcode, "error": self.message}));
        (self.status, Json(body)).into_response()
    }
}

/// Refuses a request to an internal endpoint (or to room data for operators)
/// that does not present the deployment's shared secret.
pub(crate) fn require_secret(state: &AppState, headers: &HeaderMap) -> Result<(), ClientError> {
    if replication::http::is_authorised(headers, state.config.worker_replication_secret.as_deref()) {
        return Ok(());
    }
    Err(ClientError::new(
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
        "this endpoint needs the shared secret",
    ))
}

/// Runs a write in a task of its own: a caller that hangs up (dropping the
/// request's future) must not cut the write off between its commit and the
/// cache updates that follow it, which would leave this process's own view of
/// the room stale.
pub(crate) async fn detached<T: Send + 'static>(
    what: &str,
    work: impl Future<Output = Result<T, ClientError>> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::spawn(work).await.map_err(|err| ClientError::internal(what, err))?
}

/// Parses a JSON request body; an empty body counts as `{}`.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ClientError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    let value: Value = serde_json::from_slice(body)
        .map_err(|err| ClientError::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", format!("not JSON: {err}")))?;
    serde_json::from_value(value).map_err(|err| ClientError::bad_json(err.to_string()))
}

/// The access token of a request's `Authorization: Bearer` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// The user a request's `Authorization: Bearer` token belongs to.
pub(crate) async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, ClientError> {
    if !headers.contains_key(header::AUTHORIZATION) {
        return Err(ClientError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token"));
    }
    let unknown =
        || ClientError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unrecognised access token");
    let token = bearer(headers).ok_or_else(unknown)?;
    state.store.users().get_user_by_access_token(token).await?.ok_or_else(unknown)
}

/// Refuses, as 403, a caller acting for another user where one may only
/// `what` (e.g. "use your own filters").
pub(crate) fn require_self(me: &str, user_id: &str, what: &str) -> Result<(), ClientError> {
    if me == user_id {
        return Ok(());
    }
    Err(ClientError::forbidden(format!("you can only {what}")))
}

pub(crate) use store_core::now_ms;

/// `len` random letters and digits, from the thread's CSPRNG: room and event
/// IDs that no two processes can both pick.
pub(crate) fn random_string(len: usize) -> String {
    rand::thread_rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}
