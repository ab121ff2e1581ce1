//! The HTTP listener every process serves: health, the operator's views
//! (`/admin/v1/streams`, `/metrics`), and the internal endpoints the processes
//! of a deployment call on each other (guarded by `worker_replication_secret`).
//! The client API (`crate::client`) is merged in here. `docs/http.md` documents
//! the endpoints.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use replication::{Hub, TypingStream};
use serde_json::{Value, json};
use server_config::ServerConfig;
use store_core::InstanceIds;

use crate::client::{ClientError, RoomLocks, require_secret};

use crate::metrics;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) store: Arc<dyn crate::ServerStore>,
    pub(crate) hub: Arc<Hub>,
    /// Who types where.
    pub(crate) typing: Arc<TypingStream>,
    /// Instance names ↔ the numbers tokens carry.
    pub(crate) instance_ids: Arc<InstanceIds>,
    /// On an events writer: one request at a time per room.
    pub(crate) room_locks: Arc<RoomLocks>,
    /// Failed logins, per account and per address.
    pub(crate) login_throttle: Arc<crate::client::LoginThrottle>,
    /// Keep-alive connections to the other processes' internal endpoints, for
    /// forwarded writes.
    pub(crate) internal_client: replication::http::InternalClient,
    /// Where the writers answer, for forwarded writes.
    pub(crate) writer_addresses: Arc<crate::client::WriterAddresses>,
    /// The admin registration endpoint's nonces.
    pub(crate) registration_nonces: Arc<crate::client::RegistrationNonces>,
    /// Turns true when the process starts shutting down: long polls answer.
    pub(crate) shutting_down: tokio::sync::watch::Receiver<bool>,
}

/// The listener's routes: ours, the client API, the internal endpoints, and
/// `extra` (what a server with store crates of its own adds).
pub(crate) fn router(state: AppState, extra: Router) -> Router {
    let internal =
        replication::http::router(Arc::clone(&state.hub), state.config.worker_replication_secret.as_deref());
    let own = Router::new()
        .route("/health", get(health))
        .route("/admin/v1/streams", get(streams))
        .route("/admin/v1/rooms/{room_id}/state", get(room_state))
        .route("/metrics", get(metrics));
    #[cfg(feature = "test-endpoints")]
    let own = own.merge(crate::test_endpoints::routes());
    own.with_state(state.clone())
        .merge(crate::client::router(state))
        .merge(internal)
        .merge(extra)
        .fallback(crate::client::unrecognized)
        .layer(axum::middleware::from_fn(cors))
}

/// `GET /health`: 200 `OK` while the process serves, as Synapse answers, so load
/// balancers and orchestrators configured for Synapse work unchanged.
async fn health() -> &'static str {
    "OK"
}

/// `GET /admin/v1/streams`: every stream this process follows, with its current
/// token, every writer's position as known here, and for the streams this
/// process writes, its own position.
async fn streams(State(state): State<AppState>) -> Json<Value> {
    let instance = state.hub.instance_name();
    let mut streams = serde_json::Map::new();
    for stream in state.hub.inbound().streams().iter() {
        let mut writers: serde_json::Map<String, Value> = stream
            .writer_positions()
            .into_iter()
            .map(|(writer, position)| (writer, json!(position)))
            .collect();
        for writer in stream.spec().writers(state.store.context().settings()) {
            let position = stream.current_token(&writer);
            writers.entry(writer).or_insert(json!(position));
        }
        let mut entry = json!({"current_token": stream.current_stream_token(), "writers": writers});
        if state.hub.source(stream.name()).is_some() {
            entry["own_position"] = json!(stream.current_token(instance));
        }
        streams.insert(stream.name().to_owned(), entry);
    }
    Json(json!({"instance": instance, "streams": streams}))
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let body = metrics::render(&state);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// `GET /admin/v1/rooms/{room_id}/state`: the room's current state and joined
/// members as this process's caches answer them (needs the shared secret).
async fn room_state(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room_id): Path<String>,
) -> Result<Json<Value>, ClientError> {
    require_secret(&state, &headers)?;
    let events = state.store.events();
    let current = events.get_current_state_ids(&room_id).await?;
    let members = events.get_users_in_room(&room_id).await?;
    let state_events: Vec<Value> = current
        .iter()
        .map(|((event_type, state_key), event_id)| {
            json!({"type": event_type, "state_key": state_key, "event_id": event_id})
        })
        .collect();
    Ok(Json(json!({"room_id": room_id, "state": state_events, "joined_members": members.as_slice()})))
}

/// Matrix's CORS headers on every client path, and an answer to browsers'
/// preflight `OPTIONS` there, so that a web client can talk to the server at
/// all. The internal and operator endpoints are left alone.
async fn cors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    let is_client = path.starts_with("/_matrix/") || path.starts_with("/.well-known/matrix/");
    let response = if is_client && request.method() == axum::http::Method::OPTIONS {
        axum::http::StatusCode::OK.into_response()
    } else {
        next.run(request).await
    };
    if !is_client {
        return response;
    }
    let mut response = response;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, HEAD, POST, PUT, DELETE, OPTIONS"),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, "X-Requested-With, Content-Type, Authorization, Date"),
    ] {
        headers.insert(name, axum::http::HeaderValue::from_static(value));
    }
    response
}
