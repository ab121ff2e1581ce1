//! The HTTP listener every process serves: health, the operator's views
//! (`/admin/v1/streams`, `/metrics`), and the internal endpoints the processes
//! of a deployment call on each other (guarded by `worker_replication_secret`).
//! The client API (`crate::client`) is merged in here. `docs/http.md` documents
//! the endpoints.

use std::collections::BTreeMap;
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
    /// The epochs of the elastic streams' writers, as this process applies them.
    pub(crate) elastic: Arc<crate::elastic::ElasticWriters>,
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
        .route("/admin/v1/stream_writers/{stream}", get(show_stream_writers).put(set_stream_writers))
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
    let events = state.store.events();
    let rooms = match state.elastic.rooms(async || events.get_all_room_ids().await).await {
        Ok(rooms) => Some(rooms),
        Err(err) => {
            tracing::warn!("cannot count the rooms of each writer: {err}");
            None
        }
    };
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
        if state.hub.source(stream.name()).is_some() && stream.is_writer(instance) {
            entry["own_position"] = json!(stream.current_token(instance));
        }
        if let Some(set) = state.store.context().deployment_writers().current(stream.name()) {
            let states: serde_json::Map<String, Value> =
                set.states().into_iter().map(|(writer, state)| (writer, json!(state))).collect();
            entry["epoch"] = json!(set.epoch);
            entry["writer_states"] = Value::Object(states);
            if let (true, Some(rooms)) = (stream.spec().elastic, &rooms) {
                let mut owned: BTreeMap<String, u64> =
                    set.writers().into_iter().map(|writer| (writer, 0)).collect();
                for room in rooms.iter() {
                    *owned.entry(set.owner_of(room).to_owned()).or_default() += 1;
                }
                entry["rooms"] = json!(owned);
            }
        }
        streams.insert(stream.name().to_owned(), entry);
    }
    Json(json!({"instance": instance, "streams": streams}))
}

/// `PUT /admin/v1/stream_writers/{stream}` with `{"writers": [...]}`, on the
/// master, with the shared secret: a new epoch of the stream's writers, in
/// order. `202 {"epoch": N}`; `400` for an unknown or non-elastic stream, an
/// empty list, a name listed twice, or an instance that never started.
async fn set_stream_writers(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ClientError> {
    require_secret(&state, &headers)?;
    if state.config.instance_name != server_config::MASTER_INSTANCE {
        return Err(ClientError::invalid_param("the writers of a stream are changed on the master"));
    }
    let request: Value =
        serde_json::from_slice(&body).map_err(|err| ClientError::bad_json(err.to_string()))?;
    let Some(listed) = request.get("writers").and_then(Value::as_array) else {
        return Err(ClientError::bad_json("expected {\"writers\": [\"instance\", ...]}"));
    };
    let writers = listed
        .iter()
        .map(|writer| writer.as_str().filter(|name| !name.is_empty()).map(str::to_owned))
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| ClientError::invalid_param("`writers` must be a list of instance names"))?;
    let Some(target) = state.elastic.stream(&stream) else {
        let configurable = state.store.context().deployment_writers().current(&stream).is_some()
            || stream == replication::typing::TYPING_STREAM;
        let why = match configurable {
            true if writers.len() > 1 && stream == replication::typing::TYPING_STREAM => {
                "typing has exactly one writer".to_owned()
            }
            true => format!(
                "the writers of `{stream}` change only with a restart; elastic streams: {}",
                state.elastic.stream_names().collect::<Vec<_>>().join(", ")
            ),
            false => format!("no such stream with writers: `{stream}`"),
        };
        return Err(ClientError::invalid_param(why));
    };
    let caches = Some(Arc::clone(state.store.context().caches()));
    let epoch = store_core::writers::change_stream_writers(state.store.database(), caches, target, writers)
        .await
        .map_err(|err| match err {
            store_core::writers::WritersChangeError::Invalid(why) => ClientError::invalid_param(why),
            store_core::writers::WritersChangeError::Store(err) => ClientError::from(err),
        })?;
    let elastic = Arc::clone(&state.elastic);
    tokio::spawn(async move { elastic.refresh_or_warn().await });
    Ok((axum::http::StatusCode::ACCEPTED, Json(json!({"epoch": epoch}))).into_response())
}

/// `GET /admin/v1/stream_writers/{stream}`, with the shared secret: the
/// stream's epoch as recorded, each writer's state, and whether the
/// deployment settled on it (every live process applies it, every writer
/// allocates).
async fn show_stream_writers(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ClientError> {
    require_secret(&state, &headers)?;
    let db = state.store.database();
    let mut recorded = store_core::writers::read_writer_sets(db).await?;
    let Some(set) = recorded.remove(&stream) else {
        return Err(ClientError::new(
            axum::http::StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            format!("no such stream with writers: `{stream}`"),
        ));
    };
    Ok(Json(crate::elastic::status(db, &set).await?))
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
