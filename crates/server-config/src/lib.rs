//! The server configuration: one TOML file per process, plus command-line overrides.
//!
//! Every process of a deployment (the `master` and each `worker`) reads the same
//! shape of file. Parsing is strict: an unknown key, a missing required key or an
//! inconsistent topology is refused with a [`ConfigError`] whose `Display` is one
//! line naming the file and the problem, so an operator can fix it without reading
//! a backtrace.
//!
//! ```
//! use server_config::{Role, ServerConfig};
//!
//! let config = ServerConfig::from_toml_str(
//!     r#"
//!     server_name = "example.com"
//!     instance_name = "persister1"
//!     worker_replication_secret = "a long random string"
//!     [database]
//!     url = "postgres://synapse@127.0.0.1/synapse"
//!     [replication]
//!     redis = "redis://127.0.0.1:6379"
//!     [stream_writers]
//!     events = ["persister1"]
//!     [instance_map]
//!     master = "127.0.0.1:8008"
//!     persister1 = "127.0.0.1:8101"
//!     "#,
//!     Role::Worker,
//! )?;
//! assert!(config.is_writer_for("events"));
//! assert_eq!(config.writers_for("receipts"), ["master"]);
//! # Ok::<(), server_config::ConfigError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The instance name of the main process; it writes every stream not listed in
/// `[stream_writers]`.
pub use store_core::MASTER_INSTANCE;

/// The typing stream: in the writer's memory, so its followers fetch what they
/// missed from the writer's `[instance_map]` address.
const TYPING_STREAM_NAME: &str = "typing";

/// Where the master keeps its data when no database is configured.
pub const DEFAULT_SQLITE_URL: &str = "sqlite://data/homeserver.db";

/// The HTTP address the master listens on when none is configured.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8008";

/// Which binary is reading the configuration; a few rules differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The main process: it may run alone on SQLite and writes every stream not
    /// assigned elsewhere.
    Master,
    /// A worker process: it needs PostgreSQL and a way to reach the others.
    Worker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Master => "master",
            Role::Worker => "worker",
        })
    }
}

/// A validated configuration for one process.
///
/// Its `Debug` hides every secret (the shared secret, passwords in URLs), so a
/// config can be logged whole.
#[derive(Clone, PartialEq)]
pub struct ServerConfig {
    /// The public name of the homeserver, e.g. `example.com`.
    pub server_name: String,
    /// This process's name; `master` for the main process.
    pub instance_name: String,
    /// The shared secret guarding the internal HTTP endpoints between processes.
    pub worker_replication_secret: Option<String>,
    /// How to reach the database.
    pub database: DatabaseConfig,
    /// The HTTP listener (client API, internal endpoints, `/health`).
    pub http: HttpConfig,
    /// How this process exchanges replication commands with the others.
    pub replication: ReplicationConfig,
    /// Stream name → the instances allowed to write it. A stream not listed is
    /// written by `master` alone.
    pub stream_writers: BTreeMap<String, Vec<String>>,
    /// Instance name → the `HOST:PORT` of its HTTP listener.
    pub instance_map: BTreeMap<String, String>,
    /// Cache sizes.
    pub caches: CacheConfig,
    /// The secret of the admin registration endpoint
    /// (`/_synapse/admin/v1/register`), with which an operator creates accounts
    /// when open registration is off; without it that endpoint refuses.
    pub registration_shared_secret: Option<String>,
    /// Whether anyone may register an account through the client API:
    /// `enable_registration` as written, or by default only on the embedded
    /// SQLite monolith listening on loopback (someone trying the server out).
    pub enable_registration: bool,
}

/// The `[database]` section.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…`, `sqlite://PATH` or `sqlite::memory:`.
    pub url: String,
    /// The most connections this process opens to PostgreSQL.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

/// The `[http]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// The address the HTTP listener binds.
    pub listen: SocketAddr,
    /// The URL clients reach the server at, announced by
    /// `/.well-known/matrix/client` (absent: that path answers 404).
    pub public_baseurl: Option<String>,
    /// The `HOST:PORT` other processes reach this one's listener at, which it
    /// records in the database at start-up so that they find it without an
    /// `[instance_map]` entry. Absent: `listen`, unless that is a wildcard
    /// address (`0.0.0.0`, `[::]`), which names no one place to reach.
    pub advertise: Option<String>,
}

impl HttpConfig {
    /// The address to record for other processes, if there is one, given the
    /// address the listener bound (which names the port when `listen` asks
    /// for any free one).
    pub fn advertised(&self, bound: SocketAddr) -> Option<String> {
        self.advertise.clone().or_else(|| (!bound.ip().is_unspecified()).then(|| bound.to_string()))
    }
}

/// The `[replication]` section. At most one of `master` and `redis` is set.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// On the master: the TCP address its replication listener binds.
    pub listen: Option<String>,
    /// On a worker using TCP: the master's replication listener.
    pub master: Option<String>,
    /// On every process using Redis pub/sub: the Redis URL.
    pub redis: Option<String>,
    /// Send a `PING` after this many milliseconds without sending anything.
    /// Default 5000.
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// Once the peer has pinged, close a connection silent for this many
    /// milliseconds. Default 25000.
    #[serde(default = "default_ping_timeout_ms")]
    pub ping_timeout_ms: u64,
    /// Commands queued for one connection before it is dropped as unable to
    /// keep up. Default 10000.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// On the master: the most TCP replication connections open at once;
    /// connections beyond it are closed at once. Default 256.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long a writer added to an elastic stream's writers waits for the
    /// processes that have not applied the new epoch before it writes all the
    /// same (a process silent that long is taken for gone). Default 30000.
    #[serde(default = "default_handover_timeout_ms")]
    pub handover_timeout_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            listen: None,
            master: None,
            redis: None,
            ping_interval_ms: default_ping_interval_ms(),
            ping_timeout_ms: default_ping_timeout_ms(),
            max_pending: default_max_pending(),
            max_connections: default_max_connections(),
            handover_timeout_ms: default_handover_timeout_ms(),
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("server_name", &self.server_name)
            .field("instance_name", &self.instance_name)
            .field("worker_replication_secret", &self.worker_replication_secret.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .field("http", &self.http)
            .field("replication", &self.replication)
            .field("stream_writers", &self.stream_writers)
            .field("instance_map", &self.instance_map)
            .field("caches", &self.caches)
            .field("enable_registration", &self.enable_registration)
            .field("registration_shared_secret", &self.registration_shared_secret.as_ref().map(|_| "***"))
            .finish()
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl fmt::Debug for ReplicationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("listen", &self.listen)
            .field("master", &self.master)
            .field("redis", &self.redis.as_deref().map(redact_url))
            .field("ping_interval_ms", &self.ping_interval_ms)
            .field("ping_timeout_ms", &self.ping_timeout_ms)
            .field("max_pending", &self.max_pending)
            .field("max_connections", &self.max_connections)
            .field("handover_timeout_ms", &self.handover_timeout_ms)
            .finish()
    }
}

pub use store_core::redact_url;

fn default_ping_interval_ms() -> u64 {
    5_000
}

fn default_ping_timeout_ms() -> u64 {
    25_000
}

fn default_max_pending() -> usize {
    10_000
}

fn default_max_connections() -> usize {
    256
}

fn default_handover_timeout_ms() -> u64 {
    30_000
}

pub use store_core::CacheConfig;

fn default_pool_size() -> usize {
    10
}

/// Values given on the command line; each one replaces the file's.
#[derive(Clone, Default)]
pub struct Overrides {
    /// `--database-url`.
    pub database_url: Option<String>,
    /// `--instance-name`.
    pub instance_name: Option<String>,
    /// `--http-listen`.
    pub http_listen: Option<String>,
}

impl fmt::Debug for Overrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overrides")
            .field("database_url", &self.database_url.as_deref().map(redact_url))
            .field("instance_name", &self.instance_name)
            .field("http_listen", &self.http_listen)
            .finish()
    }
}

/// Why a configuration was refused. `Display` is a single line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, lacks a required key or has a
    /// value of the wrong type.
    #[error("{location}: {message}")]
    Parse {
        /// `config file PATH`, with line and column where known.
        location: String,
        /// What is wrong there.
        message: String,
    },
    /// The values parse but do not make a working deployment.
    #[error("{origin}: {problem}")]
    Invalid {
        /// `config file PATH`, or `command line` when no file was given.
        origin: String,
        /// What is wrong.
        problem: String,
    },
}

/// The file as written, before defaults and validation. No `Debug`: it holds
/// the secrets unredacted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server_name: String,
    instance_name: Option<String>,
    worker_replication_secret: Option<String>,
    database: Option<DatabaseConfig>,
    #[serde(default)]
    http: RawHttpConfig,
    #[serde(default)]
    replication: ReplicationConfig,
    #[serde(default)]
    stream_writers: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    instance_map: BTreeMap<String, String>,
    #[serde(default)]
    caches: CacheConfig,
    enable_registration: Option<bool>,
    registration_shared_secret: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpConfig {
    listen: Option<String>,
    public_baseurl: Option<String>,
    advertise: Option<String>,
}

impl ServerConfig {
    /// Reads, parses and validates the file at `path`, with `overrides` applied
    /// before validation.
    pub fn load(path: &Path, role: Role, overrides: &Overrides) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let origin = format!("config file {}", path.display());
        let raw = parse_raw(&text, &origin)?;
        ServerConfig::build(raw, role, overrides, &origin)
    }

    /// Parses and validates TOML text; errors name the origin `config`.
    pub fn from_toml_str(text: &str, role: Role) -> Result<ServerConfig, ConfigError> {
        let origin = "config".to_owned();
        let raw = parse_raw(text, &origin)?;
        ServerConfig::build(raw, role, &Overrides::default(), &origin)
    }

    /// The configuration used when no file is given: a master on embedded SQLite
    /// under `./data/`, listening on loopback. Workers always need a file.
    pub fn defaults(role: Role, overrides: &Overrides) -> Result<ServerConfig, ConfigError> {
        let origin = "command line".to_owned();
        if role == Role::Worker {
            return Err(ConfigError::Invalid {
                origin,
                problem: "a worker needs a config file (--config FILE) naming its database and how to reach the other processes".to_owned(),
            });
        }
        let raw = RawConfig {
            server_name: "localhost".to_owned(),
            instance_name: None,
            worker_replication_secret: None,
            database: None,
            http: RawHttpConfig::default(),
            replication: ReplicationConfig::default(),
            stream_writers: BTreeMap::new(),
            instance_map: BTreeMap::new(),
            caches: CacheConfig::default(),
            enable_registration: None,
            registration_shared_secret: None,
        };
        ServerConfig::build(raw, role, overrides, &origin)
    }

    fn build(
        raw: RawConfig,
        role: Role,
        overrides: &Overrides,
        origin: &str,
    ) -> Result<ServerConfig, ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid { origin: origin.to_owned(), problem };

        let instance_name = match (&overrides.instance_name, raw.instance_name, role) {
            (Some(name), _, _) => name.clone(),
            (None, Some(name), _) => name,
            (None, None, Role::Master) => MASTER_INSTANCE.to_owned(),
            (None, None, Role::Worker) => {
                return Err(invalid(
                    "missing `instance_name`: every worker needs a name unique in the deployment".to_owned(),
                ));
            }
        };
        let mut database = raw
            .database
            .unwrap_or_else(|| DatabaseConfig { url: String::new(), pool_size: default_pool_size() });
        if let Some(url) = &overrides.database_url {
            database.url = url.clone();
        }
        if database.url.is_empty() {
            match role {
                Role::Master => database.url = DEFAULT_SQLITE_URL.to_owned(),
                Role::Worker => {
                    return Err(invalid(
                        "missing `[database] url`: a worker shares the master's PostgreSQL database"
                            .to_owned(),
                    ));
                }
            }
        }
        let listen_text = overrides
            .http_listen
            .clone()
            .or(raw.http.listen)
            .unwrap_or_else(|| DEFAULT_HTTP_LISTEN.to_owned());
        let listen = listen_text.parse::<SocketAddr>().map_err(|_| {
            invalid(format!(
                "`[http] listen` = {listen_text:?} is not an IP address and port such as 127.0.0.1:8008"
            ))
        })?;

        let config = ServerConfig {
            server_name: raw.server_name,
            instance_name,
            worker_replication_secret: raw.worker_replication_secret,
            database,
            http: HttpConfig {
                listen,
                public_baseurl: raw.http.public_baseurl.clone(),
                advertise: raw.http.advertise.clone(),
            },
            replication: raw.replication,
            stream_writers: raw.stream_writers,
            instance_map: raw.instance_map,
            caches: raw.caches,
            enable_registration: false,
            registration_shared_secret: raw.registration_shared_secret,
        };
        // Open only where a person is trying the server out on their own
        // machine, unless the file says otherwise.
        let trying_out = config.database.url.starts_with("sqlite:") && config.http.listen.ip().is_loopback();
        let config =
            ServerConfig { enable_registration: raw.enable_registration.unwrap_or(trying_out), ..config };
        config.validate(role).map_err(invalid)?;
        Ok(config)
    }

    fn validate(&self, role: Role) -> Result<(), String> {
        if self.server_name.trim().is_empty() {
            return Err("`server_name` is empty".to_owned());
        }
        if self.registration_shared_secret.as_deref().is_some_and(|secret| secret.trim().is_empty()) {
            return Err(
                "`registration_shared_secret` is empty; remove it or set a long random string".to_owned()
            );
        }
        if let Some(url) = &self.http.public_baseurl
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(format!("`[http] public_baseurl` {url:?} is not an http(s):// URL"));
        }
        if let Some(address) = &self.http.advertise {
            check_host_port(address).map_err(|why| format!("`[http] advertise` = {address:?} {why}"))?;
        }
        check_instance_name(&self.instance_name).map_err(|why| format!("`instance_name` {why}"))?;
        match role {
            Role::Master if self.instance_name != MASTER_INSTANCE => {
                return Err(format!(
                    "the master process must be named `{MASTER_INSTANCE}`, not `{}`",
                    self.instance_name
                ));
            }
            Role::Worker if self.instance_name == MASTER_INSTANCE => {
                return Err(format!(
                    "a worker cannot be named `{MASTER_INSTANCE}`; that name belongs to the main process"
                ));
            }
            _ => {}
        }
        if self.caches.invalidation_retention_days == 0 {
            return Err("`[caches] invalidation_retention_days` must be at least 1".to_owned());
        }
        if self.caches.default_max_bytes == 0 {
            return Err("`[caches] default_max_bytes` must be at least 1".to_owned());
        }
        if let Some((name, _)) = self.caches.max_bytes.iter().find(|(_, bytes)| **bytes == 0) {
            return Err(format!("`[caches] max_bytes.{name}` must be at least 1"));
        }
        if self.database.pool_size == 0 {
            return Err("`[database] pool_size` must be at least 1".to_owned());
        }
        let is_sqlite = self.database.url.starts_with("sqlite:");
        if role == Role::Worker && is_sqlite {
            return Err("workers need PostgreSQL: SQLite serves a single process only".to_owned());
        }

        let replication = &self.replication;
        if replication.master.is_some() && replication.redis.is_some() {
            return Err("`[replication]` sets both `master` and `redis`; choose one transport".to_owned());
        }
        if role == Role::Master && replication.master.is_some() {
            return Err(
                "`[replication] master` is for workers; the master uses `listen` (TCP) or `redis`".to_owned()
            );
        }
        if role == Role::Worker && replication.master.is_none() && replication.redis.is_none() {
            return Err(
                "a worker needs `[replication] master = \"HOST:PORT\"` or `redis = \"redis://…\"`".to_owned()
            );
        }
        for (key, value) in [("listen", &replication.listen), ("master", &replication.master)] {
            if let Some(address) = value {
                check_host_port(address)
                    .map_err(|why| format!("`[replication] {key}` = {address:?} {why}"))?;
            }
        }
        if replication.ping_interval_ms == 0 || replication.ping_timeout_ms <= replication.ping_interval_ms {
            return Err(
                "`[replication] ping_timeout_ms` must be longer than `ping_interval_ms`, and both above 0"
                    .to_owned(),
            );
        }
        if replication.max_pending == 0 {
            return Err("`[replication] max_pending` must be at least 1".to_owned());
        }
        if replication.max_connections == 0 {
            return Err("`[replication] max_connections` must be at least 1".to_owned());
        }
        if let Some(url) = &replication.redis {
            check_redis_url(url).map_err(|why| format!("`[replication] redis` {why}"))?;
        }
        // TCP replication is replication access: whoever speaks it can move every
        // process's positions, so both ends need the shared secret (`AUTH`).
        let tcp_setting = match (&replication.listen, &replication.master) {
            (Some(_), _) => Some("listen"),
            (None, Some(_)) => Some("master"),
            (None, None) => None,
        };
        if let Some(key) = tcp_setting {
            match &self.worker_replication_secret {
                None => {
                    return Err(format!(
                        "`[replication] {key}` needs `worker_replication_secret`: TCP replication peers authenticate with it"
                    ));
                }
                Some(secret) => check_secret(secret)?,
            }
        } else if let Some(secret) = &self.worker_replication_secret {
            check_secret(secret)?;
        }

        for (instance, address) in &self.instance_map {
            check_instance_name(instance)
                .map_err(|why| format!("`[instance_map]` name {instance:?} {why}"))?;
            check_host_port(address)
                .map_err(|why| format!("`[instance_map] {instance}` = {address:?} {why}"))?;
        }
        for (stream, writers) in &self.stream_writers {
            if writers.is_empty() {
                return Err(format!(
                    "`[stream_writers] {stream}` is empty; remove it to let `master` write the stream"
                ));
            }
            let mut seen = Vec::with_capacity(writers.len());
            for writer in writers {
                check_instance_name(writer)
                    .map_err(|why| format!("`[stream_writers] {stream}` name {writer:?} {why}"))?;
                if seen.contains(&writer) {
                    return Err(format!("`[stream_writers] {stream}` lists `{writer}` twice"));
                }
                seen.push(writer);
                // Other writers record their address in the database; the
                // followers of typing fetch its missed rows by the config's.
                if stream == TYPING_STREAM_NAME && !self.instance_map.contains_key(writer) {
                    return Err(format!(
                        "`[stream_writers] {stream}` names `{writer}`, which is not in `[instance_map]`; the other processes fetch typing from it there"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The instances that write `stream`; `["master"]` when the stream is not listed.
    pub fn writers_for(&self, stream: &str) -> Vec<String> {
        store_core::writers_for(&self.stream_writers, stream)
    }

    /// Whether the deployment has processes besides this one, which then need
    /// this one's cache invalidations and stream positions.
    pub fn has_other_processes(&self) -> bool {
        let replication = &self.replication;
        replication.listen.is_some()
            || replication.master.is_some()
            || replication.redis.is_some()
            || self.instance_map.keys().any(|instance| *instance != self.instance_name)
    }

    /// What a process that forwards client writes of `streams` to their
    /// writers needs beyond a valid config (the reference server forwards
    /// `events`, `receipts` and `typing`): when any writer is another instance,
    /// the shared secret, and, when that writer is the master, its
    /// `[instance_map]` address (other writers record theirs in the
    /// database). Libraries that only store and replicate do not ask this.
    pub fn check_client_forwarding(&self, streams: &[&str]) -> Result<(), ConfigError> {
        for stream in streams.iter().copied() {
            for writer in self.writers_for(stream) {
                if writer == self.instance_name {
                    continue;
                }
                let problem = if self.worker_replication_secret.is_none() {
                    format!(
                        "`{writer}` writes `{stream}`, so this process forwards client writes to it, which needs `worker_replication_secret`"
                    )
                } else if writer == MASTER_INSTANCE && !self.instance_map.contains_key(&writer) {
                    format!(
                        "`{writer}` writes `{stream}`, but `[instance_map]` has no address for it to forward client writes to"
                    )
                } else {
                    continue;
                };
                return Err(ConfigError::Invalid { origin: "config".to_owned(), problem });
            }
        }
        Ok(())
    }

    /// Whether this process is one of `stream`'s writers.
    pub fn is_writer_for(&self, stream: &str) -> bool {
        store_core::is_writer_for(&self.stream_writers, &self.instance_name, stream)
    }

    /// What the stores of this process take from the config: the config file
    /// becomes store-core's types here, at the boundary.
    pub fn store_settings(&self) -> store_core::StoreSettings {
        store_core::StoreSettings {
            instance_name: self.instance_name.clone(),
            stream_writers: self.stream_writers.clone(),
            caches: self.caches.clone(),
            has_other_processes: self.has_other_processes(),
        }
    }
}

/// Instance names travel in replication lines, split at spaces: whitespace or
/// a control character would change what a line says.
fn check_instance_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("holds whitespace or a control character, which would break replication lines");
    }
    Ok(())
}

/// The shared secret is sent as a line (`AUTH <secret>`) and a header.
fn check_secret(secret: &str) -> Result<(), String> {
    if secret.trim().is_empty() {
        return Err("`worker_replication_secret` is empty".to_owned());
    }
    if secret.chars().any(char::is_control) {
        return Err("`worker_replication_secret` holds a control character".to_owned());
    }
    Ok(())
}

/// A Redis URL is `redis://` or `rediss://` (TLS); a Redis on another host
/// needs credentials, since Redis access is replication access. The URL may hold
/// a password, so no message quotes it.
fn check_redis_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("rediss://").or_else(|| url.strip_prefix("redis://")) else {
        return Err("is not a redis:// or rediss:// URL".to_owned());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (credentials, host_port) = match rest.split_once('@') {
        // The credentials run up to the first `@`, even when they hold `/`.
        Some((credentials, after)) => {
            (Some(credentials), after.split(['/', '?', '#']).next().unwrap_or_default())
        }
        None => (None, authority),
    };
    let host = match host_port.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host_port.rsplit_once(':').map_or(host_port, |(host, _port)| host),
    };
    if host.is_empty() {
        return Err("names no host".to_owned());
    }
    // `user@` alone names a user with no password, as URLs do.
    let has_password = credentials
        .and_then(|credentials| credentials.split_once(':'))
        .is_some_and(|(_user, password)| !password.is_empty());
    if !has_password && !is_loopback(host) {
        return Err(format!(
            "names {host}, another host, without a password: anyone who can reach that Redis can move every process's positions (use redis://user:password@{host}/ or rediss://)"
        ));
    }
    Ok(())
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|address| address.is_loopback())
}

fn check_host_port(address: &str) -> Result<(), &'static str> {
    let (host, port) = address.rsplit_once(':').ok_or("is not HOST:PORT")?;
    if host.is_empty() {
        return Err("has no host");
    }
    port.parse::<u16>().map(|_| ()).map_err(|_| "has no valid port number")
}

fn parse_raw(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str::<RawConfig>(text).map_err(|err| {
        // toml's own Display spans several lines with a source excerpt; an operator
        // reading a log wants one line with the position.
        let location = match err.span() {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                format!("{origin}, line {line} column {column}")
            }
            None => origin.to_owned(),
        };
        ConfigError::Parse { location, message: err.message().trim().replace('\n', "; ") }
    })
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
