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
use replication_proto::RowJson;
use serde::Deserialize;
use store_core::{BoxFuture, StoreError, StreamUpdates};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        Arc::new(HttpFetcher { addresses, secret: secret.to_owned() })
    }

    async fn get(&self, address: &str, path: &str) -> Result<(u16, String), String> {
        internal_request(address, "GET", path, &self.secret, None).await
    }
}

/// Calls another process's internal endpoint at `address` (`HOST:PORT`) with
/// the shared `secret`, and a JSON `body` when given; answers the status and
/// the body, or why no answer came. One connection per call: these are the
/// rare paths (catch-up, forwarded writes), and a writer that restarts must
/// not leave pooled connections behind it.
pub async fn internal_request(
    address: &str,
    method: &str,
    path: &str,
    secret: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| "timed out connecting".to_owned())?
        .map_err(|err| err.to_string())?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n"
    );
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).await.map_err(|err| err.to_string())?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .map_err(|_| "timed out reading the answer".to_owned())?
        .map_err(|err| err.to_string())?;
    let response = String::from_utf8(response).map_err(|_| "the answer is not UTF-8".to_owned())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("the answer has no body")?;
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).ok_or("no status")?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        unchunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// Decodes a chunked body.
fn unchunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or("a malformed chunk")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "a malformed chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or("a truncated chunk")?);
        body = rest.get(size + 2..).ok_or("a truncated chunk")?;
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
