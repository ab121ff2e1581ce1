//! Fetching missed rows of in-memory streams from their writer: the internal
//! HTTP endpoint Synapse's followers use, on both ends.
//!
//! A follower of a database-backed stream reads what it missed from the
//! database; a follower of `typing` or `federation` cannot, so it asks the
//! writer: `GET /_synapse/replication/get_repl_stream_updates/<stream>?
//! from_token=…&upto_token=…` answers `{"updates": [[token, row], …],
//! "upto_token": …, "limited": …}`. The endpoint requires the deployment's
//! shared secret (`worker_replication_secret`) as a bearer token and refuses
//! everything when none is configured.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use replication_proto::RowJson;
use serde::Deserialize;
use store_core::{BoxFuture, StoreError, StreamUpdates};

use crate::Hub;

/// The endpoint's path, with `{stream}` for the stream's name.
pub const UPDATES_PATH: &str = "/_synapse/replication/get_repl_stream_updates/{stream}";

/// How many times a fetch is tried before the catch-up fails.
const FETCH_ATTEMPTS: u32 = 5;

/// How many rows one answer carries at most.
const ROWS_PER_ANSWER: usize = 100;

#[derive(Debug, Deserialize)]
struct UpdatesQuery {
    from_token: i64,
    upto_token: i64,
}

#[derive(Clone)]
struct EndpointState {
    hub: Arc<Hub>,
    secret: Option<Arc<str>>,
}

/// The writer's side: a router serving the streams `hub` writes, to merge into
/// the process's HTTP listener.
pub fn router(hub: Arc<Hub>, secret: Option<&str>) -> Router {
    Router::new()
        .route(UPDATES_PATH, get(updates))
        .with_state(EndpointState { hub, secret: secret.map(Arc::from) })
}

fn error(status: StatusCode, errcode: &str, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({"errcode": errcode, "error": message}))).into_response()
}

async fn updates(
    State(state): State<EndpointState>,
    Path(stream): Path<String>,
    Query(query): Query<UpdatesQuery>,
    headers: HeaderMap,
) -> Response {
    if !is_authorised(&headers, state.secret.as_deref()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "the internal endpoints need the shared secret",
        );
    }
    let Some(source) = state.hub.source(&stream) else {
        return error(StatusCode::BAD_REQUEST, "M_UNKNOWN", "this process does not write that stream");
    };
    let instance = state.hub.instance_name.clone();
    match source.get_updates_since(&instance, query.from_token, query.upto_token, ROWS_PER_ANSWER).await {
        Ok(updates) => {
            let rows: Result<Vec<serde_json::Value>, _> = updates
                .rows
                .iter()
                .map(|(token, row)| {
                    serde_json::from_str::<serde_json::Value>(row.as_str())
                        .map(|row| serde_json::json!([token, row]))
                })
                .collect();
            // A row left out would be skipped for good: the token covers it.
            let Ok(rows) = rows else {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "a row cannot be served");
            };
            axum::Json(
                serde_json::json!({"updates": rows, "upto_token": updates.token, "limited": updates.limited}),
            )
            .into_response()
        }
        Err(err) => {
            tracing::warn!(stream, "failed to serve stream updates: {err}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "cannot read the stream")
        }
    }
}

/// Whether a request to an internal endpoint presents the deployment's shared
/// `secret` as its bearer token. With no secret configured, nobody is.
pub fn is_authorised(headers: &HeaderMap, secret: Option<&str>) -> bool {
    let presented = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match (secret, presented) {
        (Some(secret), Some(presented)) => secrets_match(secret.as_bytes(), presented.as_bytes()),
        _ => false,
    }
}

/// Whether `presented` is `secret`, in a time that depends only on the
/// presented length: timing reveals neither where they differ nor how long the
/// secret is.
pub(crate) fn secrets_match(secret: &[u8], presented: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    let mut difference = u8::from(secret.len() != presented.len());
    for (index, byte) in presented.iter().enumerate() {
        difference |= byte ^ secret[index % secret.len()];
    }
    difference == 0
}

/// Where a follower fetches missed rows of in-memory streams.
pub trait RemoteUpdates: Send + Sync + std::fmt::Debug {
    /// `writer`'s rows of `stream` with `from < token ≤ to`.
    fn fetch<'a>(
        &'a self,
        stream: &'a str,
        writer: &'a str,
        from: i64,
        to: i64,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>>;
}

/// Fetches from writers over HTTP, at their `[instance_map]` addresses.
pub struct HttpFetcher {
    addresses: BTreeMap<String, String>,
    secret: String,
    client: InternalClient,
}

impl std::fmt::Debug for HttpFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("HttpFetcher").field("addresses", &self.addresses).finish_non_exhaustive()
    }
}

impl HttpFetcher {
    /// A fetcher for the writers of `addresses` (instance → `HOST:PORT`),
    /// authenticating with the shared `secret`.
    pub fn new(addresses: BTreeMap<String, String>, secret: &str) -> Arc<HttpFetcher> {
        Arc::new(HttpFetcher { addresses, secret: secret.to_owned(), client: InternalClient::new() })
    }

    async fn get(&self, address: &str, path: &str) -> Result<(u16, String), String> {
        self.client.request(address, "GET", path, &self.secret, None).await
    }
}

/// How long connecting to another process may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call may take, from sending to the whole answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an unused connection is kept open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Unused connections kept per process called.
const MAX_IDLE_PER_PROCESS: usize = 32;

/// Calls other processes' internal endpoints over keep-alive connections, kept
/// in a bounded pool (hyper's). A connection the other side closed (a writer
/// that restarted) is noticed before it is used, or the call is retried on a
/// new one when it failed before anything was sent, so a write is never sent
/// twice; past that, a failure is the caller's to handle (forwarded writes
/// carry what makes a retry safe, such as a client's `txn_id`). Cheap to
/// clone; clones share the pool.
#[derive(Clone)]
pub struct InternalClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for InternalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalClient").finish_non_exhaustive()
    }
}

impl Default for InternalClient {
    fn default() -> Self {
        InternalClient::new()
    }
}

impl InternalClient {
    /// An empty pool.
    pub fn new() -> InternalClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_PROCESS)
            .retry_canceled_requests(true)
            .build(connector);
        InternalClient { client }
    }

    /// Calls the internal endpoint `path` of the process at `address`
    /// (`HOST:PORT`) with the shared `secret`, and a JSON `body` when given;
    /// answers the status and the body, or why no answer came.
    pub async fn request(
        &self,
        address: &str,
        method: &str,
        path: &str,
        secret: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{address}{path}"))
            .header(hyper::header::AUTHORIZATION, format!("Bearer {secret}"));
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .map_err(|err| err.to_string())?;
        let call = async {
            let response = self.client.request(request).await.map_err(|err| err.to_string())?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map_err(|err| err.to_string())?.to_bytes();
            let body = String::from_utf8(body.to_vec()).map_err(|_| "the answer is not UTF-8".to_owned())?;
            Ok((status, body))
        };
        tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| "timed out".to_owned())?
    }
}

#[derive(Debug, Deserialize)]
struct UpdatesAnswer {
    updates: Vec<(i64, serde_json::Value)>,
    upto_token: i64,
    limited: bool,
}

impl RemoteUpdates for HttpFetcher {
    fn fetch<'a>(
        &'a self,
        stream: &'a str,
        writer: &'a str,
        from: i64,
        to: i64,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(async move {
            let failed = |why: String| {
                StoreError::Misconfigured(format!("fetching `{stream}` from `{writer}`: {why}"))
            };
            let address =
                self.addresses.get(writer).ok_or_else(|| failed("not in [instance_map]".to_owned()))?;
            let path =
                format!("{}?from_token={from}&upto_token={to}", UPDATES_PATH.replace("{stream}", stream));
            // A writer restarting or briefly overloaded must not leave the stream
            // unfollowed: try a few times, backing off, before giving up.
            let mut attempt = 0;
            let (status, body) = loop {
                attempt += 1;
                let outcome = self.get(address, &path).await;
                match outcome {
                    Ok((status, body)) if status < 500 => break (status, body),
                    Ok((status, _)) if attempt >= FETCH_ATTEMPTS => {
                        return Err(failed(format!("the writer answered {status}")));
                    }
                    Err(why) if attempt >= FETCH_ATTEMPTS => return Err(failed(why)),
                    _ => tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt - 1)).await,
                }
            };
            if status != 200 {
                return Err(failed(format!("the writer answered {status}: {body}")));
            }
            let answer: UpdatesAnswer = serde_json::from_str(&body).map_err(|err| failed(err.to_string()))?;
            let rows = answer
                .updates
                .into_iter()
                .map(|(token, row)| {
                    RowJson::new(&row.to_string())
                        .map(|row| (token, row))
                        .map_err(|err| failed(err.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(StreamUpdates { rows, token: answer.upto_token, limited: answer.limited })
        })
    }
}
