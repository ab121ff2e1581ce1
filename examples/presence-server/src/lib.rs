//! A server with a store crate of its own, written as a downstream project
//! would write it: the reference server's events, receipts, account data and
//! accounts plus
//! `store-presence`, composed by hand into [`PresenceServerStore`], and the
//! endpoints that serve presence ([`routes`]). The binaries `presence-master`
//! and `presence-worker` run it with `homeserver::main_with`, so every process
//! follows the `presence` stream, its writers write it, and `/admin/v1/streams`
//! and `/metrics` report it, with nothing in the reference crates naming it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use homeserver::axum::extract::{Path, State};
use homeserver::axum::http::{HeaderMap, StatusCode, header};
use homeserver::axum::routing::get;
use homeserver::axum::{Json, Router};
use serde_json::{Value, json};
use server_config::ServerConfig;
use store_account_data::{
    ACCOUNT_DATA, AccountDataReader, AccountDataStore, AccountDataStream, AccountDataWriteStore,
    AccountDataWriter,
};
use store_core::{
    Composition, Database, HasDatabase, Migrations, Store, StoreContext, StoreError, Stream, StreamSpec,
    Transaction,
};
use store_events::{
    BACKFILL, BackfillStream, EVENTS, EventsReader, EventsStore, EventsStream, EventsWriteStore, EventsWriter,
};
use store_presence::{
    PRESENCE, PresenceReader, PresenceRow, PresenceStore, PresenceStream, PresenceWriteStore, PresenceWriter,
};
use store_receipts::{
    RECEIPTS, ReceiptsReader, ReceiptsStore, ReceiptsStream, ReceiptsWriteStore, ReceiptsWriter,
};
use store_users::{HasUsers, UsersStore};

/// Everything one process of this server stores: read halves of every crate,
/// and the write halves of the streams this instance writes.
#[derive(Debug)]
pub struct PresenceServerStore {
    db: Database,
    ctx: StoreContext,
    events: Arc<EventsReader>,
    events_writer: Option<EventsWriter>,
    receipts: Arc<ReceiptsReader>,
    receipts_writer: Option<ReceiptsWriter>,
    account_data: Arc<AccountDataReader>,
    account_data_writer: Option<AccountDataWriter>,
    users: Arc<UsersStore>,
    presence: Arc<PresenceReader>,
    presence_writer: Option<PresenceWriter>,
}

impl Store for PresenceServerStore {
    fn migrations() -> Vec<&'static Migrations> {
        vec![
            &store_events::MIGRATIONS,
            &store_receipts::MIGRATIONS,
            &store_account_data::MIGRATIONS,
            &store_users::MIGRATIONS,
            &store_presence::MIGRATIONS,
        ]
    }

    fn stream_specs() -> Vec<StreamSpec> {
        // Typing lives in the reference server's memory, but its writer is
        // configured like the others'.
        vec![EVENTS, BACKFILL, RECEIPTS, ACCOUNT_DATA, PRESENCE, replication::typing::TYPING]
    }

    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        Ok(PresenceServerStore {
            events: ctx.component(&db, conn).await?,
            events_writer: ctx.writer(&db, conn, EVENTS).await?,
            receipts: ctx.component(&db, conn).await?,
            receipts_writer: ctx.writer(&db, conn, RECEIPTS).await?,
            account_data: ctx.component(&db, conn).await?,
            account_data_writer: ctx.writer(&db, conn, ACCOUNT_DATA).await?,
            users: ctx.component(&db, conn).await?,
            presence: ctx.component(&db, conn).await?,
            presence_writer: ctx.writer(&db, conn, PRESENCE).await?,
            ctx: ctx.clone(),
            db,
        })
    }
}

impl HasDatabase for PresenceServerStore {
    fn database(&self) -> &Database {
        &self.db
    }
}

impl Composition for PresenceServerStore {
    fn context(&self) -> &StoreContext {
        &self.ctx
    }

    fn streams(&self) -> Vec<Arc<dyn Stream>> {
        vec![
            Arc::new(EventsStream(Arc::clone(&self.events))),
            Arc::new(BackfillStream(Arc::clone(&self.events))),
            Arc::new(ReceiptsStream(Arc::clone(&self.receipts))),
            Arc::new(AccountDataStream(Arc::clone(&self.account_data))),
            Arc::new(PresenceStream(Arc::clone(&self.presence))),
        ]
    }
}

impl EventsStore for PresenceServerStore {
    fn events(&self) -> &Arc<EventsReader> {
        &self.events
    }
}

impl EventsWriteStore for PresenceServerStore {
    fn events_writer(&self) -> Option<&EventsWriter> {
        self.events_writer.as_ref()
    }
}

impl ReceiptsStore for PresenceServerStore {
    fn receipts(&self) -> &Arc<ReceiptsReader> {
        &self.receipts
    }
}

impl ReceiptsWriteStore for PresenceServerStore {
    fn receipts_writer(&self) -> Option<&ReceiptsWriter> {
        self.receipts_writer.as_ref()
    }
}

impl AccountDataStore for PresenceServerStore {
    fn account_data(&self) -> &Arc<AccountDataReader> {
        &self.account_data
    }
}

impl AccountDataWriteStore for PresenceServerStore {
    fn account_data_writer(&self) -> Option<&AccountDataWriter> {
        self.account_data_writer.as_ref()
    }
}

impl HasUsers for PresenceServerStore {
    fn users(&self) -> &Arc<UsersStore> {
        &self.users
    }
}

impl PresenceStore for PresenceServerStore {
    fn presence(&self) -> &Arc<PresenceReader> {
        &self.presence
    }
}

impl PresenceWriteStore for PresenceServerStore {
    fn presence_writer(&self) -> Option<&PresenceWriter> {
        self.presence_writer.as_ref()
    }
}

/// The presence endpoints of Matrix's client API: `GET` and `PUT
/// /_matrix/client/v3/presence/{userId}/status`, for any signed-in user. A
/// read is answered by this process's cache, kept right by replication; a
/// write is taken on the stream's writers only.
pub fn routes(store: Arc<PresenceServerStore>, _config: &ServerConfig) -> Router {
    Router::new()
        .route("/_matrix/client/v3/presence/{user_id}/status", get(get_status).put(put_status))
        .with_state(store)
}

type Reply = (StatusCode, Json<Value>);

fn error(status: StatusCode, errcode: &str, message: &str) -> Reply {
    (status, Json(json!({"errcode": errcode, "error": message})))
}

fn store_failure(err: &StoreError) -> Reply {
    error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", &format!("the store failed: {err}"))
}

/// The signed-in user the request's Bearer token names.
async fn authenticate(store: &PresenceServerStore, headers: &HeaderMap) -> Result<String, Reply> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "missing access token"))?;
    store
        .users()
        .get_user_by_access_token(token)
        .await
        .map_err(|err| store_failure(&err))?
        .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "unknown access token"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

async fn get_status(
    State(store): State<Arc<PresenceServerStore>>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> Reply {
    if let Err(reply) = authenticate(&store, &headers).await {
        return reply;
    }
    match store.presence().get_presence(&user_id).await {
        Ok(Some(presence)) => {
            let mut body = json!({
                "presence": presence.state,
                "last_active_ago": now_ms().saturating_sub(presence.last_active_ts).max(0),
            });
            if let Some(status_msg) = presence.status_msg {
                body["status_msg"] = json!(status_msg);
            }
            (StatusCode::OK, Json(body))
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "no presence known for this user"),
        Err(err) => store_failure(&err),
    }
}

async fn put_status(
    State(store): State<Arc<PresenceServerStore>>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    body: Option<Json<Value>>,
) -> Reply {
    let user = match authenticate(&store, &headers).await {
        Ok(user) => user,
        Err(reply) => return reply,
    };
    if user != user_id {
        return error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "you can only set your own presence");
    }
    let Some(Json(body)) = body else {
        return error(StatusCode::BAD_REQUEST, "M_NOT_JSON", "the body must be a JSON object");
    };
    let state = match body.get("presence").and_then(Value::as_str) {
        Some(state @ ("online" | "unavailable" | "offline")) => state.to_owned(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "M_INVALID_PARAM",
                "`presence` must be online, unavailable or offline",
            );
        }
    };
    let status_msg = match body.get("status_msg") {
        None | Some(Value::Null) => None,
        Some(Value::String(message)) => Some(message.clone()),
        Some(_) => return error(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", "`status_msg` must be a string"),
    };
    let Some(writer) = store.presence_writer() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNKNOWN",
            "this process does not write presence; send it to a `presence` writer",
        );
    };
    let presence = PresenceRow { user_id, state, status_msg, last_active_ts: now_ms() };
    match writer.set_presence(&presence).await {
        Ok(_) => (StatusCode::OK, Json(json!({}))),
        Err(err) => store_failure(&err),
    }
}
