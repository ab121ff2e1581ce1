//! A deployment of real processes on a fresh PostgreSQL database, and the
//! calls tests and benchmarks make on it: writes through the writers' internal
//! endpoint, positions from `/admin/v1/streams`, counters from `/metrics`.
//! Shared by the end-to-end tests, the `topology` and `e2e` benchmarks and the
//! demo.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use store_core::Engine;
use store_test_support::EmptyDb;

use crate::process::{Binary, Failure, Finished, Server, http_request, run_to_exit};

/// One word, so that `AUTH <secret>` on the replication listener reads the
/// same however its argument is split.
pub const SECRET: &str = "e2e-shared-secret";
/// The shared Redis every test and benchmark replicates through (`cargo xtask
/// services` starts it), one channel per deployment.
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// How the processes of a deployment replicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Through Redis pub/sub, one channel per deployment.
    Redis,
    /// Over TCP to the master's replication listener.
    Tcp,
}

/// The configs of one deployment on a fresh database; processes are started
/// from them by name.
#[derive(Debug)]
pub struct Deployment {
    dir: tempfile::TempDir,
    /// Removed last: the processes, killed on drop, are the callers' locals
    /// and go first.
    pub db: EmptyDb,
    server_name: String,
    transport: Transport,
    replication_port: u16,
    /// Every instance's HTTP port, `master` first.
    instances: Vec<(String, u16)>,
    /// The instances that write `events`, in the order every config lists them.
    pub event_writers: Vec<String>,
    /// The Redis every process uses (with `Transport::Redis`).
    redis_url: String,
    /// Instances whose replication goes to another `HOST:PORT` than the
    /// deployment's Redis or master listener (a fault-injecting proxy).
    replication_via: BTreeMap<String, String>,
    /// Instances that connect to the database with another URL (another role).
    database_urls: BTreeMap<String, String>,
    /// What the master and the other instances run.
    binaries: (Binary, Binary),
}

/// A loopback port nothing listens on, for a process of the deployment (or a
/// server of a test's own) to bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Below Linux's ephemeral range (32768 and up), where outgoing connections
    // take their local ports, so a port found free here stays free until the
    // process under test binds it; each test process (nextest runs one per
    // test) takes its own window, and a port in use is skipped.
    const WINDOW: u16 = 40;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let window = u16::try_from(std::process::id() % 300).unwrap_or(0);
    let base = 20_000 + window * WINDOW;
    for _ in 0..WINDOW {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % WINDOW;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // The whole window taken: any free port, with the small risk that brings.
    TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free port").port()
}

impl Deployment {
    /// A deployment with `instances` besides the master, of which
    /// `event_writers` write events.
    pub fn new(transport: Transport, instances: &[&str], event_writers: &[&str]) -> Deployment {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let db =
            runtime.block_on(store_test_support::TestDb::new_empty(Engine::Postgres)).expect("a database");
        // The Redis channel is named after the server: one per deployment.
        let server_name = format!("e2e{}.{}", std::process::id(), free_port());
        let instances = std::iter::once("master")
            .chain(instances.iter().copied())
            .map(|name| (name.to_owned(), free_port()))
            .collect();
        Deployment {
            dir: tempfile::tempdir().expect("a temporary directory"),
            db,
            server_name,
            transport,
            replication_port: free_port(),
            instances,
            event_writers: event_writers.iter().map(|name| (*name).to_owned()).collect(),
            redis_url: REDIS.to_owned(),
            replication_via: BTreeMap::new(),
            database_urls: BTreeMap::new(),
            binaries: (Binary::Master, Binary::Worker),
        }
    }

    /// The same deployment running `master` for the master and `worker` for
    /// every other instance: a server built on these crates with store crates
    /// of its own.
    #[must_use]
    pub fn running(mut self, master: Binary, worker: Binary) -> Deployment {
        self.binaries = (master, worker);
        self
    }

    /// The client API's reference topology over Redis: `master`, the event
    /// writers `writer1` and `writer2`, and the sync worker `syncer`.
    pub fn for_clients() -> Deployment {
        Deployment::for_clients_over(Transport::Redis)
    }

    /// The client API's reference topology over `transport`.
    pub fn for_clients_over(transport: Transport) -> Deployment {
        Deployment::new(transport, &["writer1", "writer2", "syncer"], &["writer1", "writer2"])
    }

    /// Every process uses the Redis at `url` instead of the shared one (a
    /// dedicated server a test may stop). Set before starting any process.
    pub fn set_redis_url(&mut self, url: &str) {
        url.clone_into(&mut self.redis_url);
    }

    /// Names the homeserver (and so the Redis channel) `name` instead of the
    /// unique name the deployment picked: it must be as unique. Set before
    /// starting any process.
    pub fn set_server_name(&mut self, name: &str) {
        name.clone_into(&mut self.server_name);
    }

    /// `instance` replicates through `address` (`HOST:PORT`, a proxy in front
    /// of the deployment's Redis or of the master's listener) instead of
    /// connecting directly. Not for the master over TCP, which listens.
    pub fn replicate_via(&mut self, instance: &str, address: &str) {
        assert!(
            !(self.transport == Transport::Tcp && instance == "master"),
            "the master listens for TCP replication; it connects nowhere"
        );
        self.replication_via.insert(instance.to_owned(), address.to_owned());
    }

    /// `instance` connects to the database with `url` (another role, say).
    pub fn set_database_url(&mut self, instance: &str, url: &str) {
        self.database_urls.insert(instance.to_owned(), url.to_owned());
    }

    /// The homeserver's name: also the Redis channel of the deployment.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Where the deployment's Redis listens, as `HOST:PORT`.
    pub fn redis_address(&self) -> String {
        self.redis_url.trim_start_matches("redis://").to_owned()
    }

    /// Where the master's TCP replication listener listens, as `HOST:PORT`.
    pub fn replication_listener(&self) -> String {
        format!("127.0.0.1:{}", self.replication_port)
    }

    /// Starts every instance, master first; the servers in that order.
    pub fn start_all(&self) -> Vec<Server> {
        self.instances.iter().map(|(name, _)| self.start(name)).collect()
    }

    /// The config of `instance`, with `events` as its list of event writers.
    pub fn config_with_writers(&self, instance: &str, event_writers: &[String]) -> String {
        let port = self.port(instance);
        let via = self.replication_via.get(instance);
        let replication = match (self.transport, instance) {
            (Transport::Redis, _) => match via {
                Some(address) => format!("redis = \"redis://{address}\""),
                None => format!("redis = \"{}\"", self.redis_url),
            },
            (Transport::Tcp, "master") => format!("listen = \"{}\"", self.replication_listener()),
            (Transport::Tcp, _) => {
                format!("master = \"{}\"", via.cloned().unwrap_or_else(|| self.replication_listener()))
            }
        };
        let database_url = self.database_urls.get(instance).unwrap_or(&self.db.url);
        let writers: Vec<String> = event_writers.iter().map(|writer| format!("\"{writer}\"")).collect();
        let map: Vec<String> =
            self.instances.iter().map(|(name, port)| format!("{name} = \"127.0.0.1:{port}\"")).collect();
        format!(
            "server_name = \"{}\"\ninstance_name = \"{instance}\"\nworker_replication_secret = \"{SECRET}\"\n\
             enable_registration = true\n\
             [database]\nurl = \"{}\"\npool_size = 4\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [replication]\n{replication}\nping_interval_ms = 1000\nping_timeout_ms = 5000\n\
             [stream_writers]\nevents = [{}]\n[instance_map]\n{}\n",
            self.server_name,
            database_url,
            writers.join(", "),
            map.join("\n"),
        )
    }

    fn port(&self, instance: &str) -> u16 {
        self.instances
            .iter()
            .find(|(name, _)| name == instance)
            .map(|(_, port)| *port)
            .unwrap_or_else(|| panic!("`{instance}` is not part of the deployment"))
    }

    /// Writes `config` for `instance` and returns the path.
    pub fn write_config(&self, instance: &str, config: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{instance}.toml"));
        std::fs::write(&path, config).expect("write a config");
        path
    }

    fn binary(&self, instance: &str) -> Binary {
        if instance == "master" { self.binaries.0 } else { self.binaries.1 }
    }

    /// What a new writer is started with: the deployment's config of
    /// `instance` without `[stream_writers]` and with only the master in
    /// `[instance_map]` (its address, the secret and the database).
    pub fn minimal_config(&self, instance: &str) -> String {
        let config = self.config(instance);
        let (head, map) =
            config.split_once("[instance_map]\n").expect("the deployment's configs map instances");
        let (head, _) = head.split_once("[stream_writers]\n").expect("the deployment's configs list writers");
        let master: Vec<&str> = map.lines().filter(|line| line.starts_with("master =")).collect();
        format!("{head}[instance_map]\n{}\n", master.join("\n"))
    }

    /// The deployment's config of `instance`.
    pub fn config(&self, instance: &str) -> String {
        self.config_with_writers(instance, &self.event_writers)
    }

    /// Starts `instance` with the deployment's config.
    pub fn start(&self, instance: &str) -> Server {
        self.start_with_config(instance, &self.config(instance))
    }

    /// Starts `instance` with the deployment's config; why not, if it does not
    /// start.
    pub fn try_start(&self, instance: &str) -> Result<Server, Failure> {
        let path = self.write_config(instance, &self.config(instance)).display().to_string();
        Server::try_start(self.binary(instance), &["--config", &path], self.dir.path())
    }

    /// Starts `instance` with `config` (the deployment's, edited).
    pub fn start_with_config(&self, instance: &str, config: &str) -> Server {
        let path = self.write_config(instance, config).display().to_string();
        Server::start(self.binary(instance), &["--config", &path], self.dir.path())
    }

    /// Runs `instance`'s binary with the deployment's config and `args` (an
    /// operator's command, such as `writers show events`) to its end.
    pub fn run_command(&self, instance: &str, args: &[&str]) -> Finished {
        let path = self.write_config(instance, &self.config(instance)).display().to_string();
        let mut all = vec!["--config", path.as_str()];
        all.extend_from_slice(args);
        run_to_exit(self.binary(instance), &all, self.dir.path())
    }

    /// Runs `instance` with `config`, expecting it to fail at start-up.
    pub fn fail_to_start(&self, instance: &str, config: &str) -> Finished {
        let path = self.write_config(instance, config).display().to_string();
        run_to_exit(self.binary(instance), &["--config", &path], self.dir.path())
    }
}

/// The servers' `http://IP:PORT`s, in order.
pub fn base_urls(servers: &[Server]) -> Vec<String> {
    servers.iter().map(|server| server.base_url.clone()).collect()
}

/// `GET path` as JSON.
pub fn get_json(server: &Server, path: &str) -> Value {
    let (status, body) = http_request(&server.base_url, "GET", path, Some(SECRET), None)
        .unwrap_or_else(|err| panic!("GET {path}: {err}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|err| panic!("GET {path}: {err}: {body}"))
}

/// The `events` stream as `server` reports it.
pub fn events_stream(server: &Server) -> Value {
    get_json(server, "/admin/v1/streams")["streams"]["events"].clone()
}

/// The position `writer` reports for itself on `events`.
pub fn own_position(writer: &Server) -> i64 {
    events_stream(writer)["own_position"].as_i64().expect("a writer reports its own position")
}

/// A join of `user` to a room, as the internal endpoint takes it.
pub fn join(user: &str) -> Value {
    json!({
        "event_id": format!("$join-{user}"),
        "type": "m.room.member",
        "state_key": user,
        "sender": user,
        "origin_server_ts": 1,
        "content": {"membership": "join"},
    })
}

/// Persists `events` of `room` on `base_url`; the stream orderings, or why not.
pub fn persist(base_url: &str, room: &str, events: &[Value]) -> Result<Vec<i64>, String> {
    let body = json!({"room_id": room, "events": events}).to_string();
    let (status, answer) =
        http_request(base_url, "POST", "/_synapse/replication/persist_events", Some(SECRET), Some(&body))
            .map_err(|err| err.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {answer}"));
    }
    let answer: Value = serde_json::from_str(&answer).map_err(|err| err.to_string())?;
    Ok(answer["stream_orderings"].as_array().into_iter().flatten().filter_map(Value::as_i64).collect())
}

/// The joined members of `room` as `server` knows them (its admin endpoint).
pub fn joined_members(server: &Server, room: &str) -> BTreeSet<String> {
    let path = format!("/admin/v1/rooms/{room}/state");
    get_json(server, &path)["joined_members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|member| member.as_str().map(str::to_owned))
        .collect()
}

/// Polls `check` until it holds or `within` passes; the panic shows the last
/// mismatch `check` reported.
pub fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    while let Err(mismatch) = check() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}: {mismatch}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `follower` knows every writer at the position the writer reports.
pub fn knows_final_positions(follower: &Server, writers: &[(&str, &Server)]) -> Result<(), String> {
    let expected: Vec<i64> = writers.iter().map(|(_, writer)| own_position(writer)).collect();
    let known = events_stream(follower);
    let all_known = writers
        .iter()
        .zip(&expected)
        .all(|((name, _), position)| known["writers"][*name].as_i64() == Some(*position));
    if all_known { Ok(()) } else { Err(format!("the writers say {expected:?}; the follower knows {known}")) }
}

/// Reads a counter (summed over its label sets) from Prometheus text.
pub fn metric(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name_and_labels))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
        .sum()
}

/// Reads metric `name` summed over the label sets that include every one of
/// `labels`, in whatever order the exporter writes them.
pub fn metric_with(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let has_all = labels.iter().all(|(label, wanted)| {
                series_labels.split(',').any(|pair| pair == format!("{label}=\"{wanted}\""))
            });
            (series_name == name && has_all).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Whether no process of `servers` (named) reports `writer` past the
/// position the writer itself reports, on `events`: the writer's own word is
/// the truth, and a position past it came from someone else.
pub fn no_position_past_the_writer(
    servers: &[(&str, &Server)],
    writer_name: &str,
    writer: &Server,
) -> Result<(), String> {
    let known: Vec<(&str, Value)> =
        servers.iter().map(|(name, server)| (*name, events_stream(server))).collect();
    // Read last: positions only grow, so one the others reported earlier can
    // only be past this by someone else's word.
    let truth = own_position(writer);
    for (name, known) in known {
        let position = known["writers"][writer_name].as_i64().unwrap_or(i64::MIN);
        let token = known["current_token"].as_i64().unwrap_or(i64::MIN);
        if position > truth || token > truth {
            return Err(format!(
                "{name} has {writer_name} at {position} (events token {token}), past {writer_name}'s own position {truth}"
            ));
        }
    }
    Ok(())
}

/// The events writer of `room_id` among `writers`, computed as every process
/// computes it ([`store_core::writer_for_shard`]). The demo says it before the
/// writers' `/metrics` confirm it.
pub fn writer_for_room<'a>(room_id: &str, writers: &[&'a str]) -> &'a str {
    store_core::writer_for_shard(room_id, writers).expect("at least one writer")
}

/// Runs `read` on the deployment's database at `url` (from a test's thread,
/// on a connection of its own), panicking with `what` if it fails.
pub fn read_database<T, F>(url: &str, what: &'static str, read: F) -> T
where
    F: for<'t> FnMut(
            &'t mut store_core::Transaction,
        ) -> store_core::BoxFuture<'t, Result<T, store_core::StoreError>>
        + Send,
    T: Send,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let db = store_core::Database::connect(url).await.expect("connect to the deployment's database");
        let read = db.run_autocommit(what, read).await.unwrap_or_else(|err| panic!("{what}: {err}"));
        db.close().await;
        read
    })
}

/// `instance`'s recorded position on `stream`, read from `stream_positions`.
pub fn recorded_position(url: &str, stream: &str, instance: &str) -> Option<i64> {
    let (stream, instance) = (stream.to_owned(), instance.to_owned());
    read_database(url, "read_recorded_position", move |txn| {
        let (stream, instance) = (stream.clone(), instance.clone());
        Box::pin(async move {
            let rows = txn
                .query(
                    "SELECT stream_id FROM stream_positions WHERE stream_name = $1 AND instance_name = $2",
                    &[&stream, &instance],
                )
                .await?;
            rows.first().map(|row| row.get::<i64>(0)).transpose()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::writer_for_room;

    #[test]
    fn rooms_hash_to_the_writer_the_server_picks() {
        // The rooms and answers of store-core's `the_hash_is_fixed_across_releases`.
        let writers = ["w0", "w1", "w2"];
        let picked: Vec<&str> =
            ["!a:b", "!b:b", "!c:b", "!d:b"].iter().map(|room| writer_for_room(room, &writers)).collect();
        assert_eq!(picked, ["w0", "w2", "w2", "w0"]);
    }
}
