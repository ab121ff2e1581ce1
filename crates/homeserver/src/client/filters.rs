//! Stored filters: a client stores a filter once (`POST /user/{userId}/filter`)
//! and then names it in `sync?filter=` by its ID instead of sending it inline.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use super::{ClientError, authenticate, parse_body, require_self};
use crate::http::AppState;

/// The largest filter stored, in bytes of JSON.
const MAX_FILTER_BYTES: usize = 16 * 1024;

/// The routes of this module.
pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/user/{user_id}/filter", post(add_filter))
        .route("/_matrix/client/v3/user/{user_id}/filter/{filter_id}", get(get_filter))
}

/// `POST /user/{userId}/filter` with a filter object → `{"filter_id"}`.
async fn add_filter(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    let me = authenticate(&state, &headers).await?;
    require_self(&me, &user_id, "use your own filters")?;
    let filter: Value = parse_body(&body)?;
    if !filter.is_object() {
        return Err(ClientError::bad_json("a filter is a JSON object"));
    }
    let text = filter.to_string();
    if text.len() > MAX_FILTER_BYTES {
        return Err(ClientError::invalid_param(format!("a filter is at most {MAX_FILTER_BYTES} bytes")));
    }
    let filter_id = state.store.users().add_filter(&me, &text).await?;
    Ok(Json(json!({"filter_id": filter_id})))
}

/// `GET /user/{userId}/filter/{filterId}` → the filter.
async fn get_filter(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((user_id, filter_id)): Path<(String, String)>,
) -> Result<Json<Value>, ClientError> {
    let me = authenticate(&state, &headers).await?;
    require_self(&me, &user_id, "use your own filters")?;
    let text = state
        .store
        .users()
        .get_filter(&me, &filter_id)
        .await?
        .ok_or_else(|| ClientError::not_found("No such filter"))?;
    let filter: Value = serde_json::from_str(&text)
        .map_err(|err| ClientError::internal("a stored filter is not JSON", err))?;
    Ok(Json(filter))
}

/// The filter `sync?filter=` names, as JSON text: inline JSON as it is, or the
/// stored filter of that ID (404 when `user_id` has none of that ID).
pub(super) async fn resolve(state: &AppState, user_id: &str, filter: &str) -> Result<String, ClientError> {
    if filter.trim_start().starts_with('{') {
        return Ok(filter.to_owned());
    }
    state
        .store
        .users()
        .get_filter(user_id, filter)
        .await?
        .ok_or_else(|| ClientError::not_found("No such filter"))
}
