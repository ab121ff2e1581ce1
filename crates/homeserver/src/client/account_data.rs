//! A user's account data (`/user/{userId}/account_data/{type}`, and the same
//! per room): what clients keep about a user on the server, such as direct
//! chats or settings. Read from this process's caches; written on the
//! `account_data` stream's writer (`writes`), which every process then follows.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use super::writes::{self, AccountDataWrite};
use super::{ClientError, authenticate, parse_body, require_self};
use crate::http::AppState;

/// Matrix's limit on an event's size, applied to account data too.
const MAX_CONTENT_BYTES: usize = 65_536;

/// The routes of this module.
pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/user/{user_id}/account_data/{data_type}", get(get_global).put(put_global))
        .route(
            "/_matrix/client/v3/user/{user_id}/rooms/{room_id}/account_data/{data_type}",
            get(get_room).put(put_room),
        )
}

fn found(map: &store_account_data::AccountDataMap, data_type: &str) -> Result<Json<Value>, ClientError> {
    map.get(data_type).cloned().map(Json).ok_or_else(|| ClientError::not_found("Account data not found"))
}

async fn get_global(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((user_id, data_type)): Path<(String, String)>,
) -> Result<Json<Value>, ClientError> {
    require_self(&authenticate(&state, &headers).await?, &user_id, "use your own account data")?;
    found(&*state.store.account_data().get_global_account_data_for_user(&user_id).await?, &data_type)
}

async fn get_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((user_id, room_id, data_type)): Path<(String, String, String)>,
) -> Result<Json<Value>, ClientError> {
    require_self(&authenticate(&state, &headers).await?, &user_id, "use your own account data")?;
    found(&*state.store.account_data().get_room_account_data_for_user(&user_id, &room_id).await?, &data_type)
}

async fn put_global(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((user_id, data_type)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    put(&state, &headers, user_id, None, data_type, &body).await
}

async fn put_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((user_id, room_id, data_type)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    put(&state, &headers, user_id, Some(room_id), data_type, &body).await
}

async fn put(
    state: &AppState,
    headers: &HeaderMap,
    user_id: String,
    room_id: Option<String>,
    data_type: String,
    body: &Bytes,
) -> Result<Json<Value>, ClientError> {
    require_self(&authenticate(state, headers).await?, &user_id, "use your own account data")?;
    if body.len() > MAX_CONTENT_BYTES {
        return Err(ClientError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            format!("account data is at most {MAX_CONTENT_BYTES} bytes"),
        ));
    }
    let content: Value = parse_body(body)?;
    if !content.is_object() {
        return Err(ClientError::bad_json("account data is a JSON object"));
    }
    if data_type.is_empty() || data_type.len() > 255 {
        return Err(ClientError::invalid_param("an account data type is 1 to 255 bytes"));
    }
    writes::write_account_data(state, AccountDataWrite { user_id, room_id, data_type, content }).await?;
    Ok(Json(json!({})))
}
