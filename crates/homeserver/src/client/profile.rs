//! What clients ask right after signing in besides rooms: profiles
//! (`GET /profile/{userId}`, the display name to read and set) and the push
//! rules (`GET /pushrules/`, Matrix's default rule set: this server does not
//! store rules of its own yet).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ClientError, authenticate, parse_body, require_self};
use crate::http::AppState;

/// The longest display name taken, in bytes.
const MAX_DISPLAYNAME_BYTES: usize = 256;

/// The routes of this module.
pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/profile/{user_id}", get(profile))
        .route("/_matrix/client/v3/profile/{user_id}/displayname", get(displayname).put(set_displayname))
        .route("/_matrix/client/v3/pushrules/", get(push_rules))
}

/// The display name of `user_id`, or 404 for a user this server does not know.
async fn known_displayname(state: &AppState, user_id: &str) -> Result<Option<String>, ClientError> {
    state
        .store
        .users()
        .displayname(user_id)
        .await?
        .ok_or_else(|| ClientError::not_found("Profile was not found"))
}

/// `GET /profile/{userId}` → `{"displayname"}` (a name set to nothing is left out).
async fn profile(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, ClientError> {
    authenticate(&state, &headers).await?;
    let mut answer = json!({});
    if let Some(name) = known_displayname(&state, &user_id).await? {
        answer["displayname"] = json!(name);
    }
    Ok(Json(answer))
}

/// `GET /profile/{userId}/displayname` → `{"displayname"}`.
async fn displayname(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, ClientError> {
    authenticate(&state, &headers).await?;
    Ok(Json(json!({"displayname": known_displayname(&state, &user_id).await?})))
}

#[derive(Debug, Deserialize)]
struct Displayname {
    displayname: Option<String>,
}

/// `PUT /profile/{userId}/displayname` `{"displayname"}`: one's own only.
async fn set_displayname(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    let me = authenticate(&state, &headers).await?;
    require_self(&me, &user_id, "set your own display name")?;
    let Displayname { displayname } = parse_body(&body)?;
    if displayname.as_ref().is_some_and(|name| name.len() > MAX_DISPLAYNAME_BYTES) {
        return Err(ClientError::invalid_param(format!(
            "a display name is at most {MAX_DISPLAYNAME_BYTES} bytes"
        )));
    }
    state.store.users().set_displayname(&me, displayname.as_deref()).await?;
    Ok(Json(json!({})))
}

/// `GET /pushrules/`: Matrix's default push rules for the user, which is what
/// clients build their notification settings on.
async fn push_rules(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ClientError> {
    let user_id = authenticate(&state, &headers).await?;
    let localpart = user_id.trim_start_matches('@').split(':').next().unwrap_or_default().to_owned();
    Ok(Json(json!({"global": default_rules(&user_id, &localpart)})))
}

fn rule(rule_id: &str, conditions: Value, actions: Value) -> Value {
    json!({"rule_id": rule_id, "default": true, "enabled": true, "conditions": conditions, "actions": actions})
}

fn event_match(key: &str, pattern: &str) -> Value {
    json!({"kind": "event_match", "key": key, "pattern": pattern})
}

/// The default rule set of Matrix's push rules section, in its evaluation order.
fn default_rules(user_id: &str, localpart: &str) -> Value {
    let notify = || json!(["notify"]);
    let sound = |sound: &str| json!(["notify", {"set_tweak": "sound", "value": sound}]);
    let highlight =
        || json!(["notify", {"set_tweak": "sound", "value": "default"}, {"set_tweak": "highlight"}]);
    let mut master = rule(".m.rule.master", json!([]), json!([]));
    master["enabled"] = json!(false);
    json!({
        "override": [
            master,
            rule(".m.rule.suppress_notices", json!([event_match("content.msgtype", "m.notice")]), json!([])),
            rule(
                ".m.rule.invite_for_me",
                json!([
                    event_match("type", "m.room.member"),
                    event_match("content.membership", "invite"),
                    event_match("state_key", user_id),
                ]),
                sound("default"),
            ),
            rule(".m.rule.member_event", json!([event_match("type", "m.room.member")]), json!([])),
            rule(
                ".m.rule.is_user_mention",
                json!([{"kind": "event_property_contains", "key": "content.m\\.mentions.user_ids", "value": user_id}]),
                highlight(),
            ),
            rule(
                ".m.rule.tombstone",
                json!([event_match("type", "m.room.tombstone"), event_match("state_key", "")]),
                json!(["notify", {"set_tweak": "highlight"}]),
            ),
        ],
        "content": [{
            "rule_id": ".m.rule.contains_user_name",
            "default": true,
            "enabled": true,
            "pattern": localpart,
            "actions": highlight(),
        }],
        "room": [],
        "sender": [],
        "underride": [
            rule(".m.rule.call", json!([event_match("type", "m.call.invite")]), sound("ring")),
            rule(
                ".m.rule.room_one_to_one",
                json!([{"kind": "room_member_count", "is": "2"}, event_match("type", "m.room.message")]),
                sound("default"),
            ),
            rule(".m.rule.message", json!([event_match("type", "m.room.message")]), notify()),
            rule(".m.rule.encrypted", json!([event_match("type", "m.room.encrypted")]), notify()),
        ],
    })
}
