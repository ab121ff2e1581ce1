//! Accounts and sign-in, as Matrix clients drive them: registration with a
//! password through user-interactive auth (the `m.login.dummy` stage), password
//! login onto a device, logout of one device or all, the devices list, and what
//! a client asks before anything else (`/versions`, `/capabilities`).
//!
//! Passwords are kept only as Argon2id hashes, made and checked on a few
//! threads of their own (they cost tens of milliseconds of CPU and 19 MiB
//! each); failed logins are slowed
//! down per account and per address ([`LoginThrottle`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version, password_hash};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha1::Sha1;

use super::{ClientError, authenticate, bearer, parse_body, random_string};
use crate::http::AppState;

/// The Matrix versions whose client API shapes these endpoints follow.
const VERSIONS: [&str; 7] = ["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6"];

/// The longest password taken, in bytes: hashing is costly, and no one types more.
const MAX_PASSWORD_BYTES: usize = 512;

/// The routes of this module.
pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/versions", get(versions))
        .route("/_matrix/client/v3/register", post(register))
        .route("/_matrix/client/v3/login", get(login_flows).post(login))
        .route("/_matrix/client/v3/logout", post(logout))
        .route("/_matrix/client/v3/logout/all", post(logout_all))
        .route("/_matrix/client/v3/account/whoami", get(whoami))
        .route("/_matrix/client/v3/devices", get(devices))
        .route("/_matrix/client/v3/capabilities", get(capabilities))
        .route("/.well-known/matrix/client", get(well_known))
        .route("/_synapse/admin/v1/register", get(admin_register_nonce).post(admin_register))
}

/// `GET /.well-known/matrix/client`: where clients find this server, when
/// `[http] public_baseurl` says.
async fn well_known(State(state): State<AppState>) -> Result<Json<Value>, ClientError> {
    let Some(base_url) = &state.config.http.public_baseurl else {
        return Err(ClientError::not_found("No .well-known configured"));
    };
    Ok(Json(json!({"m.homeserver": {"base_url": base_url}})))
}

/// How long a nonce of the admin registration endpoint stays usable.
const NONCE_LIFETIME: Duration = Duration::from_secs(60);

/// The nonces the admin registration endpoint handed out, per process (a
/// client asks for one and registers through the same process).
#[derive(Debug, Default)]
pub(crate) struct RegistrationNonces {
    issued: Mutex<HashMap<String, Instant>>,
}

impl RegistrationNonces {
    const MAX_NONCES: usize = 10_000;

    fn issue(&self) -> String {
        let nonce = random_string(32);
        let now = Instant::now();
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        issued.retain(|_, at| now.duration_since(*at) < NONCE_LIFETIME);
        if issued.len() < Self::MAX_NONCES {
            issued.insert(nonce.clone(), now);
        }
        nonce
    }

    /// Whether `nonce` was handed out and is still fresh; it is spent either way.
    fn spend(&self, nonce: &str) -> bool {
        let issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner).remove(nonce);
        issued.is_some_and(|at| at.elapsed() < NONCE_LIFETIME)
    }
}

/// `GET /_synapse/admin/v1/register` → `{"nonce"}`, as Synapse's.
async fn admin_register_nonce(State(state): State<AppState>) -> Result<Json<Value>, ClientError> {
    shared_secret(&state)?;
    Ok(Json(json!({"nonce": state.registration_nonces.issue()})))
}

fn shared_secret(state: &AppState) -> Result<&str, ClientError> {
    state.config.registration_shared_secret.as_deref().ok_or_else(|| {
        ClientError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "Shared secret registration is not enabled")
    })
}

#[derive(Debug, Deserialize)]
struct AdminRegistration {
    nonce: String,
    username: String,
    password: String,
    #[serde(default)]
    admin: bool,
    displayname: Option<String>,
    mac: String,
}

/// `POST /_synapse/admin/v1/register`: an account an operator creates with the
/// shared secret, whatever `enable_registration` says. `mac` is the hex
/// HMAC-SHA1, keyed with `registration_shared_secret`, of
/// `nonce NUL username NUL password NUL (admin|notadmin)`, as Synapse's
/// `register_new_matrix_user` computes it.
async fn admin_register(State(state): State<AppState>, body: Bytes) -> Result<Json<Value>, ClientError> {
    let secret = shared_secret(&state)?;
    let request: AdminRegistration = parse_body(&body)?;
    if !state.registration_nonces.spend(&request.nonce) {
        return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "unrecognised nonce"));
    }
    let expected = admin_mac(secret, &request)?;
    if decode_hex(&request.mac).is_none_or(|mac| expected.verify_slice(&mac).is_err()) {
        return Err(ClientError::forbidden("HMAC incorrect"));
    }
    let user_id = format!("@{}:{}", request.username, state.config.server_name);
    if !valid_localpart(&request.username) || user_id.len() > 255 {
        return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", "invalid username"));
    }
    check_password_length(&request.password)?;
    let hash = hash_password(request.password).await?;
    let displayname = request.displayname.as_deref().unwrap_or(&request.username);
    if !state.store.users().register_account(&user_id, Some(&hash), Some(displayname)).await? {
        return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken."));
    }
    sign_in(&state, &user_id, None, None).await
}

/// The MAC a request with the shared secret carries.
fn admin_mac(secret: &str, request: &AdminRegistration) -> Result<Hmac<Sha1>, ClientError> {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes())
        .map_err(|err| ClientError::internal("the shared secret is not an HMAC key", err))?;
    for (part, last) in [
        (request.nonce.as_bytes(), false),
        (request.username.as_bytes(), false),
        (request.password.as_bytes(), false),
        (if request.admin { b"admin".as_slice() } else { b"notadmin".as_slice() }, true),
    ] {
        mac.update(part);
        if !last {
            mac.update(b"\x00");
        }
    }
    Ok(mac)
}

/// Lowercase or uppercase hex to bytes; `None` for anything else.
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// `GET /_matrix/client/versions`: what clients check first.
async fn versions() -> Json<Value> {
    Json(json!({"versions": VERSIONS, "unstable_features": {}}))
}

/// `GET /_matrix/client/v3/capabilities`: what this server lets a user change.
async fn capabilities(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ClientError> {
    authenticate(&state, &headers).await?;
    Ok(Json(json!({"capabilities": {
        "m.change_password": {"enabled": false},
        "m.set_displayname": {"enabled": false},
        "m.set_avatar_url": {"enabled": false},
        "m.3pid_changes": {"enabled": false},
        "m.room_versions": {"default": "10", "available": {"10": "stable"}},
    }})))
}

#[derive(Debug, Deserialize)]
struct Registration {
    username: Option<String>,
    password: Option<String>,
    auth: Option<AuthData>,
    #[serde(default)]
    inhibit_login: bool,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

/// A stage of user-interactive auth, as the client completes it.
#[derive(Debug, Deserialize)]
struct AuthData {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// A user ID's localpart: what Matrix allows in new user IDs.
pub(super) fn valid_localpart(localpart: &str) -> bool {
    !localpart.is_empty()
        && localpart
            .bytes()
            .all(|byte| matches!(byte, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
}

/// `POST /_matrix/client/v3/register`: `{"username", "password", "auth"}` →
/// `{"user_id", "access_token", "device_id", "home_server"}`. The first request
/// of a client comes without `auth` and is answered 401 with the one flow this
/// server offers (`m.login.dummy`) and a session to complete it in.
async fn register(State(state): State<AppState>, body: Bytes) -> Result<Json<Value>, ClientError> {
    let request: Registration = parse_body(&body)?;
    if !state.config.enable_registration {
        return Err(ClientError::forbidden("Registration has been disabled"));
    }
    let Some(username) = request.username else {
        return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", "a `username` is needed"));
    };
    let user_id = format!("@{username}:{}", state.config.server_name);
    if !valid_localpart(&username) || user_id.len() > 255 {
        return Err(ClientError::new(
            StatusCode::BAD_REQUEST,
            "M_INVALID_USERNAME",
            "a username is 1 or more of a-z, 0-9 and ._=-/+, and the user ID at most 255 bytes",
        ));
    }
    if let Some(password) = &request.password {
        check_password_length(password)?;
    }
    let users = state.store.users();
    // Before the auth stage, as Synapse does: a client learns a name is taken
    // without completing a flow first.
    if users.user_exists(&user_id).await? {
        return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken."));
    }
    match request.auth.as_ref().and_then(|auth| auth.kind.as_deref()) {
        Some("m.login.dummy") => {}
        None => return Err(auth_flows()),
        Some(other) => {
            return Err(ClientError::new(
                StatusCode::BAD_REQUEST,
                "M_UNRECOGNIZED",
                format!("`{other}` is not an auth stage of this server; use m.login.dummy"),
            ));
        }
    }
    let password_hash = match request.password {
        Some(password) => Some(hash_password(password).await?),
        None => None,
    };
    // Synapse's default display name: the localpart.
    if !users.register_account(&user_id, password_hash.as_deref(), Some(&username)).await? {
        return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken."));
    }
    let home_server = &state.config.server_name;
    if request.inhibit_login {
        return Ok(Json(json!({"user_id": user_id, "home_server": home_server})));
    }
    sign_in(&state, &user_id, request.device_id, request.initial_device_display_name.as_deref()).await
}

/// Signs `user_id` in on `device_id` (a new device when `None`) and answers as
/// registration and login do: `{"user_id", "access_token", "device_id",
/// "home_server"}`.
async fn sign_in(
    state: &AppState,
    user_id: &str,
    device_id: Option<String>,
    display_name: Option<&str>,
) -> Result<Json<Value>, ClientError> {
    let device_id = device_id.unwrap_or_else(new_device_id);
    let access_token = state.store.users().create_device_token(user_id, &device_id, display_name).await?;
    Ok(Json(json!({
        "user_id": user_id,
        "access_token": access_token,
        "device_id": device_id,
        "home_server": state.config.server_name,
    })))
}

/// The 401 that starts user-interactive auth: the flows, and a session.
fn auth_flows() -> ClientError {
    ClientError::with_body(
        StatusCode::UNAUTHORIZED,
        json!({"flows": [{"stages": ["m.login.dummy"]}], "params": {}, "session": random_string(24)}),
    )
}

fn check_password_length(password: &str) -> Result<(), ClientError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ClientError::invalid_param(format!("a password is at most {MAX_PASSWORD_BYTES} bytes")));
    }
    Ok(())
}

/// A job for a password thread.
type PasswordJob = Box<dyn FnOnce() + Send>;

/// The queue of the threads that hash and check passwords.
///
/// Argon2id takes 19 MiB and tens of milliseconds of CPU a hash. On Tokio's
/// blocking threads, which come and go, the allocator kept the 19 MiB of each
/// thread that had hashed (the resident memory grew by that much with every
/// registration); a few threads of our own reuse theirs. They also bound the
/// work: a flood of logins waits in the queue instead of taking a thread and
/// 19 MiB each.
static PASSWORD_THREADS: LazyLock<std::sync::mpsc::Sender<PasswordJob>> = LazyLock::new(|| {
    let (queue, jobs) = std::sync::mpsc::channel::<PasswordJob>();
    let jobs = Arc::new(Mutex::new(jobs));
    let threads = std::thread::available_parallelism().map_or(2, |cores| cores.get().clamp(1, 4));
    for n in 0..threads {
        let jobs = Arc::clone(&jobs);
        let spawned = std::thread::Builder::new().name(format!("passwords-{n}")).spawn(move || {
            loop {
                // The lock is held only to take the next job.
                let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            }
        });
        if let Err(err) = spawned {
            tracing::error!("cannot start a password thread: {err}");
        }
    }
    queue
});

/// Runs `work` on a password thread; `None` if none could take it.
async fn on_password_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    let job: PasswordJob = Box::new(move || {
        // The request may have gone; the work is done all the same.
        let _gone = answer.send(work());
    });
    PASSWORD_THREADS.send(job).ok()?;
    answered.await.ok()
}

thread_local! {
    /// A password thread's Argon2 memory, allocated once and reused: the
    /// crate's own allocation (aligned and zeroed) is one the allocator kept
    /// after every hash.
    static ARGON2_MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// `password` hashed with `salt` by `argon2` into `out`, on this thread's
/// memory.
fn argon2_into(
    argon2: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    ARGON2_MEMORY.with_borrow_mut(|memory| {
        let needed = argon2.params().block_count();
        if memory.len() < needed {
            memory.resize(needed, Block::default());
        }
        argon2.hash_password_into_with_memory(password, salt, out, &mut memory[..needed])
    })
}

/// An Argon2id PHC string of `password` (the crate's default parameters),
/// with a fresh salt. Runs on a password thread.
fn hash_on_this_thread(password: &[u8]) -> Result<String, String> {
    let salt = password_hash::try_generate_salt().map_err(|err| err.to_string())?;
    let argon2 = Argon2::default();
    let mut out = [0_u8; Params::DEFAULT_OUTPUT_LEN];
    argon2_into(&argon2, password, &salt, &mut out).map_err(|err| err.to_string())?;
    let hash = PasswordHash {
        algorithm: Algorithm::default().ident(),
        version: Some(Version::default().into()),
        params: ParamsString::try_from(argon2.params()).map_err(|err| err.to_string())?,
        salt: Some(Salt::new(&salt).map_err(|err| err.to_string())?),
        hash: Some(Output::new(&out).map_err(|err| err.to_string())?),
    };
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `hash`, under the algorithm,
/// version and parameters it names. Runs on a password thread.
fn matches_on_this_thread(password: &[u8], hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else { return false };
    let argon2 = match (
        Algorithm::try_from(parsed.algorithm.as_str()),
        parsed.version.map_or(Ok(Version::default()), Version::try_from),
        Params::try_from(&parsed),
    ) {
        (Ok(algorithm), Ok(version), Ok(params)) => Argon2::new(algorithm, version, params),
        _ => return false,
    };
    let mut out = vec![0_u8; expected.len()];
    argon2_into(&argon2, password, salt, &mut out).is_ok()
        // `Output`'s comparison takes the same time wherever the bytes differ.
        && Output::new(&out).is_ok_and(|computed| computed == *expected)
}

/// An Argon2id PHC string of `password`, with a fresh salt.
async fn hash_password(password: String) -> Result<String, ClientError> {
    on_password_thread(move || hash_on_this_thread(password.as_bytes()))
        .await
        .ok_or_else(|| ClientError::internal("hashing the password failed", "no password thread"))?
        .map_err(|err| ClientError::internal("hashing the password failed", err))
}

/// Whether `password` matches the PHC string `hash`. A hash that does not
/// parse matches nothing.
async fn password_matches(password: String, hash: String) -> Result<bool, ClientError> {
    on_password_thread(move || matches_on_this_thread(password.as_bytes(), &hash))
        .await
        .ok_or_else(|| ClientError::internal("checking the password failed", "no password thread"))
}

/// A device ID as Synapse makes them: ten capital letters.
fn new_device_id() -> String {
    random_string(10).to_ascii_uppercase().chars().map(|c| if c.is_ascii_digit() { 'X' } else { c }).collect()
}

/// `GET /_matrix/client/v3/login`: the ways to log in here.
async fn login_flows() -> Json<Value> {
    Json(json!({"flows": [{"type": "m.login.password"}]}))
}

#[derive(Debug, Deserialize)]
struct Login {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Identifier>,
    /// The form before `identifier` (r0), which clients still send.
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

/// `POST /_matrix/client/v3/login` with `m.login.password`: a new access token
/// on the device named (or a new one).
async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Json<Value>, ClientError> {
    let request: Login = parse_body(&body)?;
    if request.kind != "m.login.password" {
        return Err(ClientError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            format!("`{}` is not a login type of this server; use m.login.password", request.kind),
        ));
    }
    let user = match (&request.identifier, &request.user) {
        (Some(Identifier { kind, user: Some(user) }), _) if kind == "m.id.user" => user.clone(),
        (Some(Identifier { kind, .. }), _) if kind != "m.id.user" => {
            return Err(ClientError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                format!("`{kind}` is not an identifier type of this server; use m.id.user"),
            ));
        }
        (_, Some(user)) => user.clone(),
        _ => return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", "a `user` is needed")),
    };
    let Some(password) = request.password else {
        return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", "a `password` is needed"));
    };
    check_password_length(&password)?;
    let server_name = &state.config.server_name;
    let user_id = if user.starts_with('@') { user } else { format!("@{user}:{server_name}") };
    let keys = [ThrottleKey::Account(user_id.clone()), ThrottleKey::Address(peer.ip())];
    state.login_throttle.check(&keys)?;
    let hash = state.store.users().password_hash(&user_id).await?;
    // An unknown account costs a hash too, so timing does not tell which names exist.
    let matches = match hash {
        Some(hash) => password_matches(password, hash).await?,
        None => {
            hash_password(password).await?;
            false
        }
    };
    if !matches {
        state.login_throttle.failed(&keys);
        return Err(ClientError::forbidden("Invalid username or password"));
    }
    state.login_throttle.succeeded(&keys[0]);
    sign_in(&state, &user_id, request.device_id, request.initial_device_display_name.as_deref()).await
}

/// `POST /_matrix/client/v3/logout`: the device and its token end on every process.
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ClientError> {
    authenticate(&state, &headers).await?;
    state.store.users().log_out(bearer(&headers).unwrap_or_default()).await?;
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/logout/all`: every device of the user ends.
async fn logout_all(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ClientError> {
    let user_id = authenticate(&state, &headers).await?;
    state.store.users().log_out_everywhere(&user_id).await?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/account/whoami`.
async fn whoami(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ClientError> {
    let user_id = authenticate(&state, &headers).await?;
    let mut answer = json!({"user_id": user_id, "is_guest": false});
    if let Some(device_id) = state.store.users().device_of_token(bearer(&headers).unwrap_or_default()).await?
    {
        answer["device_id"] = json!(device_id);
    }
    Ok(Json(answer))
}

/// `GET /_matrix/client/v3/devices`: the user's devices.
async fn devices(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ClientError> {
    let user_id = authenticate(&state, &headers).await?;
    let devices: Vec<Value> = state
        .store
        .users()
        .devices(&user_id)
        .await?
        .into_iter()
        .map(|device| {
            // `last_seen_ip` is not kept; clients (matrix-nio) want the key.
            json!({
                "device_id": device.device_id,
                "display_name": device.display_name,
                "last_seen_ip": null,
                "last_seen_ts": device.last_seen_ts,
            })
        })
        .collect();
    Ok(Json(json!({"devices": devices})))
}

/// Slows failed logins down, per account and per address, in this process:
/// past a key's free failures in a row (3 for an account; 10 for an address,
/// which many people may share behind one NAT) it must wait, one second after
/// the first failure over and twice as long after each further one, up to a
/// minute; a success clears its account. Bounded: past
/// [`LoginThrottle::MAX_KEYS`] keys, the ones whose wait is over are forgotten.
#[derive(Debug, Default)]
pub(crate) struct LoginThrottle {
    failures: Mutex<HashMap<ThrottleKey, Failures>>,
}

/// What failed logins are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ThrottleKey {
    Account(String),
    Address(std::net::IpAddr),
}

impl ThrottleKey {
    fn free_failures(&self) -> u32 {
        match self {
            ThrottleKey::Account(_) => 3,
            ThrottleKey::Address(_) => 10,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// No attempt before this.
    until: Instant,
}

impl LoginThrottle {
    const MAX_WAIT: Duration = Duration::from_secs(60);
    const MAX_KEYS: usize = 10_000;

    /// Refuses with 429 while any of `keys` must still wait.
    fn check(&self, keys: &[ThrottleKey]) -> Result<(), ClientError> {
        let now = Instant::now();
        let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = keys
            .iter()
            .filter_map(|key| failures.get(key))
            .map(|failure| failure.until.saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() {
            return Ok(());
        }
        let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        Err(ClientError::with_body(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too many failed logins", "retry_after_ms": retry_after_ms}),
        ))
    }

    fn failed(&self, keys: &[ThrottleKey]) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.len() >= Self::MAX_KEYS {
            failures.retain(|_, failure| failure.until > now);
        }
        for key in keys {
            let entry = failures.entry(key.clone()).or_insert(Failures { count: 0, until: now });
            entry.count = entry.count.saturating_add(1);
            entry.until = now + Self::wait_after(entry.count, key.free_failures());
        }
    }

    fn succeeded(&self, key: &ThrottleKey) {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
    }

    /// How long a key with `free` free failures waits after its `count`th
    /// failure in a row.
    fn wait_after(count: u32, free: u32) -> Duration {
        let Some(over) = count.checked_sub(free.saturating_add(1)) else { return Duration::ZERO };
        Duration::from_secs(1u64.checked_shl(over).unwrap_or(u64::MAX)).min(Self::MAX_WAIT)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use argon2::Argon2;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    use super::{
        LoginThrottle, ThrottleKey, hash_on_this_thread, matches_on_this_thread, new_device_id,
        valid_localpart,
    };

    #[test]
    fn password_hashes_read_both_ways_with_the_crates_own() {
        let ours = hash_on_this_thread(b"correct horse").unwrap();
        assert!(ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{ours}");
        assert!(matches_on_this_thread(b"correct horse", &ours));
        assert!(!matches_on_this_thread(b"correct horsf", &ours));
        assert_ne!(ours, hash_on_this_thread(b"correct horse").unwrap(), "a fresh salt each time");
        // Hashes stored before, made by the crate, and the crate reading ours.
        let theirs = Argon2::default().hash_password(b"battery staple").unwrap().to_string();
        assert!(matches_on_this_thread(b"battery staple", &theirs));
        assert!(!matches_on_this_thread(b"battery stapler", &theirs));
        Argon2::default().verify_password(b"correct horse", ours.as_str()).expect("the crate reads ours");
        for broken in ["", "$argon2id$", "plain text", &ours.replace("m=19456", "m=1")] {
            assert!(!matches_on_this_thread(b"correct horse", broken), "{broken}");
        }
    }

    #[test]
    fn localparts_follow_the_matrix_grammar() {
        for good in ["alice", "a.b_c=d-e/f+g", "0"] {
            assert!(valid_localpart(good), "{good}");
        }
        for bad in ["", "Alice", "a b", "a:b", "@a", "é"] {
            assert!(!valid_localpart(bad), "{bad}");
        }
    }

    #[test]
    fn failures_wait_longer_and_longer_up_to_a_minute() {
        let waits: Vec<Duration> = (0..12).map(|count| LoginThrottle::wait_after(count, 3)).collect();
        assert_eq!(&waits[..4], [Duration::ZERO; 4]);
        assert_eq!(waits[4], Duration::from_secs(1));
        assert_eq!(waits[5], Duration::from_secs(2));
        assert!(waits.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(waits[11], Duration::from_secs(60));
        assert_eq!(LoginThrottle::wait_after(u32::MAX, 3), Duration::from_secs(60));
        assert_eq!(LoginThrottle::wait_after(10, 10), Duration::ZERO);
    }

    #[test]
    fn a_throttled_key_is_refused_until_it_succeeds() {
        let throttle = LoginThrottle::default();
        let address = ThrottleKey::Address(std::net::IpAddr::from([127, 0, 0, 1]));
        let keys = [ThrottleKey::Account("@a:x".to_owned()), address.clone()];
        for _ in 0..3 {
            assert!(throttle.check(&keys).is_ok());
            throttle.failed(&keys);
        }
        assert!(throttle.check(&keys).is_ok(), "three failures are free");
        throttle.failed(&keys);
        assert!(throttle.check(&keys).is_err(), "the account's fourth makes it wait");
        assert!(throttle.check(std::slice::from_ref(&address)).is_ok(), "an address has more free failures");
        for n in 0..7 {
            throttle.failed(&[ThrottleKey::Account(format!("@other{n}:x")), address.clone()]);
        }
        assert!(
            throttle.check(std::slice::from_ref(&address)).is_err(),
            "the address's eleventh makes it wait"
        );
        throttle.succeeded(&keys[0]);
        assert!(throttle.check(&keys[..1]).is_ok());
    }

    #[test]
    fn hex_decodes_pairs_of_digits_only() {
        assert_eq!(super::decode_hex("00aBff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(super::decode_hex("abc"), None);
        assert_eq!(super::decode_hex("zz"), None);
        assert_eq!(super::decode_hex("é0"), None);
    }

    #[test]
    fn device_ids_are_ten_capital_letters() {
        let id = new_device_id();
        assert_eq!(id.len(), 10);
        assert!(id.bytes().all(|byte| byte.is_ascii_uppercase()), "{id}");
    }
}
