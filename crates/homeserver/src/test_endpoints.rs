//! Endpoints for the end-to-end tests only, behind the `test-endpoints`
//! feature: they skip the checks a deployment relies on.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use store_events::NewEvent;

use crate::client::{ClientError, detached, require_secret};
use crate::http::AppState;

/// Where tests persist events on a chosen writer, whatever room it is.
const PERSIST_EVENTS_PATH: &str = "/_synapse/replication/persist_events";

/// The routes, to merge into the listener's.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route(PERSIST_EVENTS_PATH, post(persist_events))
}

/// An event as the internal endpoint takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventJson {
    event_id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    state_key: Option<String>,
    sender: String,
    origin_server_ts: i64,
    content: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistEvents {
    room_id: String,
    events: Vec<EventJson>,
}

/// `POST /_synapse/replication/persist_events`: persists a batch of one room's
/// events on this process, which must be one of the `events` writers.
/// Answers `{"stream_orderings": […]}` once they are committed.
///
/// Only with the `test-endpoints` feature: it skips the client API's checks
/// and the room's ownership (tests use it to make two writers write one room),
/// so a real deployment must never serve it.
async fn persist_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<PersistEvents>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ClientError> {
    require_secret(&state, &headers)?;
    let Json(request) = body.map_err(|rejection| ClientError::bad_json(rejection.body_text()))?;
    if state.store.events_writer().is_none() {
        return Err(ClientError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            format!("`{}` does not write events", state.config.instance_name),
        ));
    }
    let events: Vec<NewEvent> = request
        .events
        .into_iter()
        .map(|event| NewEvent {
            event_id: event.event_id,
            event_type: event.event_type,
            state_key: event.state_key,
            sender: event.sender,
            origin_server_ts: event.origin_server_ts,
            content: event.content.to_string(),
        })
        .collect();
    // In line with the client API's writes of the same room.
    let orderings = detached("the events could not be persisted", async move {
        let _room = state.room_locks.lock(&request.room_id).await;
        let writer = state.store.events_writer();
        let writer = writer.ok_or_else(|| ClientError::internal("persist events", "no events writer"))?;
        writer
            .persist_events(&request.room_id, &events)
            .await
            .map_err(|err| ClientError::internal("the events could not be persisted", err))
    })
    .await?;
    Ok(Json(json!({"stream_orderings": orderings})))
}
