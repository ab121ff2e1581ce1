//! `cargo xtask bench e2e`: the client API end to end (release builds),
//! against the database's own limit measured in the same run.
//!
//! Deployments: the monolith on SQLite and on PostgreSQL, and four processes
//! (master, two event writers, a sync worker) over Redis. Each has 8 users in
//! 8 rooms; for 1, 4, 16 and 64 concurrent clients, each client sends
//! messages one after another (`PUT …/send`), to the rooms in turn and
//! through every process of the deployment in turn, over kept-alive
//! connections (a new connection per request would measure the client). Per deployment and
//! concurrency:
//! - events/s and the p50/p99 of a send's time to its 200;
//! - the database's own limit at that concurrency: as many clients doing
//!   one-row `INSERT`s, each its own transaction, for a few seconds (pgbench on
//!   the same PostgreSQL; on SQLite, tasks on a file with our settings), and
//!   our ratio to it;
//! - CPU-ms per 1,000 events of every process, and of PostgreSQL (all its
//!   processes; its background writers included);
//!
//! and, per deployment: send→sync latency (one client sends one message at a
//! time through a process while another member waits in `sync` on another:
//! from the send's 200, and from its start, p50/p99), each process's resident
//! memory idle and under load, and its CPU while idle, in % of a core.
//!
//! Finally, over TCP replication (master, one event writer, a follower): the
//! median time of a send through the master, which forwards it to the writer
//! and answers once it has seen the write come back, against a send through
//! the writer itself (the baseline).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use store_core::{Database, Engine};
use tests::client::{self, Client, register};
use tests::deployment::{Deployment, Transport, base_urls};
use tests::process::{Binary, HttpConnection, Server};

const LEVELS: [usize; 4] = [1, 4, 16, 64];
const USERS: usize = 8;
const ROOMS: usize = 8;
/// Sends per concurrency level: divisible by every level.
const SENDS: usize = 6_400;
const PROBES: usize = 200;
/// How long each raw limit is measured.
const RAW_FOR: Duration = Duration::from_secs(3);
/// How long idle processes are watched.
const IDLE_FOR: Duration = Duration::from_secs(10);
/// Sends timed through each process over TCP.
const TCP_SENDS: usize = 20;

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Clock ticks a second, as `/proc/*/stat` counts CPU time.
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `(command, user + system ticks)` of process `pid`.
fn process_ticks(pid: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let command = head.split_once(" (")?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 of the whole line, utime 14, stime 15.
    let (user, system) = (fields.get(11)?.parse::<u64>().ok()?, fields.get(12)?.parse::<u64>().ok()?);
    Some((command, user + system))
}

/// CPU ticks of each PostgreSQL process, by PID.
fn postgres_ticks() -> HashMap<String, u64> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.to_owned();
            let (command, ticks) = process_ticks(&pid)?;
            (command == "postgres").then_some((pid, ticks))
        })
        .collect()
}

/// PostgreSQL's CPU ticks between two readings: of the processes alive at
/// both, and all of those started since (a backend that ended meanwhile, such
/// as pgbench's, is left out rather than counted negative).
fn postgres_ticks_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after.iter().map(|(pid, ticks)| ticks.saturating_sub(before.get(pid).copied().unwrap_or(0))).sum()
}

/// The processes of a deployment under test, by name.
struct Processes {
    servers: Vec<(String, Server)>,
}

impl Processes {
    fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|(_, server)| server.base_url.clone()).collect()
    }

    /// Each process's CPU ticks, then PostgreSQL's processes'.
    fn ticks(&self) -> (Vec<u64>, HashMap<String, u64>) {
        let each = self
            .servers
            .iter()
            .map(|(_, server)| process_ticks(&server.pid().to_string()).map_or(0, |(_, ticks)| ticks))
            .collect();
        (each, postgres_ticks())
    }

    fn resident_mib(&self) -> Vec<f64> {
        self.servers.iter().map(|(_, server)| server.resident_memory() as f64 / (1024.0 * 1024.0)).collect()
    }
}

/// One concurrency level's figures.
struct Level {
    clients: usize,
    events_per_second: f64,
    /// Sorted.
    send_ms: Vec<f64>,
    /// Per process, then PostgreSQL's.
    cpu_ms_per_thousand: (Vec<f64>, f64),
    raw_per_second: f64,
    /// No-op requests a second at the same concurrency ([`no_op_load`]).
    no_op_per_second: f64,
}

impl Level {
    /// The best ratio to the raw limit a send could reach if it cost only a
    /// no-op request and a raw commit, one after the other: both take the
    /// same cores (or, at 1 client, the same wall-clock), so their times per
    /// event add up.
    fn ceiling(&self) -> f64 {
        let per_event = 1.0 / self.no_op_per_second + 1.0 / self.raw_per_second;
        1.0 / per_event / self.raw_per_second
    }
}

/// A deployment's figures.
struct Figures {
    label: &'static str,
    process_names: Vec<String>,
    levels: Vec<Level>,
    /// From the send's 200, sorted.
    latencies_ms: Vec<f64>,
    /// From the start of the send, sorted.
    trips_ms: Vec<f64>,
    idle_mib: Vec<f64>,
    loaded_mib: Vec<f64>,
    idle_cpu_percent: Vec<f64>,
    /// Per process, over all the levels: database interactions per 1,000
    /// events by name (the most frequent first), and writes per commit.
    interactions: Vec<Vec<(String, f64)>>,
    writes_per_commit: Vec<Option<f64>>,
}

/// Counters of a process's `/metrics` whose names start with `prefix`, by
/// their `name` label (or by the whole sample when it has none).
fn counters(server: &Server, prefix: &str) -> HashMap<String, f64> {
    let (_, metrics) = server.get("/metrics");
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| {
            let (sample, value) = line.rsplit_once(' ')?;
            let key = sample
                .split_once("name=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map_or(sample, |(name, _)| name);
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Events-stream group commits and the writes they took, of one process.
fn group_commits(server: &Server) -> (f64, f64) {
    let (_, metrics) = server.get("/metrics");
    let labels = [("stream", "events")];
    (
        tests::deployment::metric_with(&metrics, "homeserver_group_commits_total", &labels),
        tests::deployment::metric_with(&metrics, "homeserver_group_committed_writes_total", &labels),
    )
}

/// Users in rooms, ready to send.
struct Population {
    users: Vec<Client>,
    rooms: Vec<String>,
}

fn populate(urls: &[String]) -> Population {
    let users: Vec<Client> =
        (0..USERS).map(|n| register(&urls[n % urls.len()], &format!("sender{n}"))).collect();
    let rooms: Vec<String> = (0..ROOMS).map(|n| users[0].on(&urls[n % urls.len()]).create_room()).collect();
    for (n, user) in users.iter().enumerate().skip(1) {
        for (r, room) in rooms.iter().enumerate() {
            user.on(&urls[(n + r) % urls.len()]).join(room);
        }
    }
    Population { users, rooms }
}

/// `clients` clients make `SENDS` requests that do nothing (`GET
/// /_matrix/client/versions`: no authentication, no database) over
/// kept-alive connections, as `load` does: requests/s. What the clients and
/// HTTP cost before any work of the server's, on the same cores.
fn no_op_load(urls: &[String], clients: usize) -> f64 {
    let each = SENDS / clients;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for n in 0..clients {
            scope.spawn(move || {
                let mut connections: Vec<HttpConnection> =
                    urls.iter().map(|url| HttpConnection::open(url).expect("connect")).collect();
                for i in 0..each {
                    let through = &mut connections[(n + i) % urls.len()];
                    let (status, answer) = through
                        .request("GET", "/_matrix/client/versions", None, None)
                        .expect("a versions request");
                    assert_eq!(status, 200, "a versions request: {answer}");
                }
            });
        }
    });
    (each * clients) as f64 / started.elapsed().as_secs_f64()
}

/// `clients` clients send `SENDS` messages in all, each over kept-alive
/// connections (one to each process); events/s and each send's time, sorted.
fn load(urls: &[String], population: &Population, clients: usize, round: usize) -> (f64, Vec<f64>) {
    let each = SENDS / clients;
    let body = r#"{"msgtype":"m.text","body":"load"}"#;
    let started = Instant::now();
    let times: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|n| {
                let user = &population.users[n % USERS];
                scope.spawn(move || {
                    let mut connections: Vec<HttpConnection> =
                        urls.iter().map(|url| HttpConnection::open(url).expect("connect")).collect();
                    (0..each)
                        .map(|i| {
                            let through = &mut connections[(n + i) % urls.len()];
                            let room = client::encode(&population.rooms[(n + i) % ROOMS]);
                            let path =
                                format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/load-{round}-{clients}-{n}-{i}");
                            let sent = Instant::now();
                            let (status, answer) =
                                through.request("PUT", &path, Some(&user.token), Some(body)).expect("a send");
                            assert_eq!(status, 200, "a send: {answer}");
                            sent.elapsed().as_secs_f64() * 1000.0
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        threads.into_iter().map(|thread| thread.join().expect("a sending thread")).collect()
    });
    let events_per_second = (each * clients) as f64 / started.elapsed().as_secs_f64();
    let mut times = times.concat();
    times.sort_by(f64::total_cmp);
    (events_per_second, times)
}

/// Send→sync: a receiver long-polls on `urls[sync]`; each probe, sent through
/// `urls[send]`, waits for its message to arrive. From the 200 and from the
/// start of the send, sorted.
fn probe(urls: &[String], population: &Population, send: usize, sync: usize) -> (Vec<f64>, Vec<f64>) {
    let sender = &population.users[0];
    let receiver = register(&urls[sync], "receiver");
    let probe_room = sender.on(&urls[send]).create_room();
    receiver.join(&probe_room);
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let listening = {
        let (receiver, arrivals, stop, room) =
            (receiver.clone(), Arc::clone(&arrivals), Arc::clone(&stop), probe_room.clone());
        let since = receiver.sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned();
        std::thread::spawn(move || {
            let mut since = since;
            while !stop.load(Ordering::Relaxed) {
                let answer = receiver.sync(Some(&since), Duration::from_secs(5));
                let now = Instant::now();
                let mut arrivals = arrivals.lock().expect("not poisoned");
                for id in client::timeline_ids(&answer, "join", &room) {
                    arrivals.insert(id, now);
                }
                since = answer["next_batch"].as_str().expect("a next_batch").to_owned();
            }
        })
    };
    let prober = sender.on(&urls[send]);
    let (mut latencies_ms, mut trips_ms) = (Vec::new(), Vec::new());
    for probe in 0..PROBES {
        let sent = Instant::now();
        let event_id = prober.send(&probe_room, &format!("probe-{probe}"), "probe");
        let acknowledged = Instant::now();
        let deadline = acknowledged + Duration::from_secs(10);
        loop {
            if let Some(arrived) = arrivals.lock().expect("not poisoned").get(&event_id) {
                latencies_ms.push(arrived.saturating_duration_since(acknowledged).as_secs_f64() * 1000.0);
                trips_ms.push(arrived.saturating_duration_since(sent).as_secs_f64() * 1000.0);
                break;
            }
            assert!(Instant::now() < deadline, "probe {probe} never arrived");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    stop.store(true, Ordering::Relaxed);
    // One more message wakes the listener's long poll.
    prober.send(&probe_room, "wake", "wake");
    listening.join().expect("the listening thread");
    latencies_ms.sort_by(f64::total_cmp);
    trips_ms.sort_by(f64::total_cmp);
    (latencies_ms, trips_ms)
}

/// The database's one-row commits per second with `clients` clients.
type RawLimit<'a> = &'a dyn Fn(usize) -> f64;

/// Measures a running deployment: idle cost, each level, then send→sync.
fn measure(
    label: &'static str,
    processes: &Processes,
    raw_limit: RawLimit<'_>,
    send: usize,
    sync: usize,
) -> Figures {
    let urls = processes.urls();
    let population = populate(&urls);
    let tick_ms = 1000.0 / ticks_per_second();

    // Idle: nothing sent for a while, then watched.
    std::thread::sleep(Duration::from_secs(2));
    let idle_mib = processes.resident_mib();
    let (before, _) = processes.ticks();
    std::thread::sleep(IDLE_FOR);
    let (after, _) = processes.ticks();
    let idle_cpu_percent = before
        .iter()
        .zip(&after)
        .map(|(before, after)| (after - before) as f64 * tick_ms / IDLE_FOR.as_secs_f64() / 10.0)
        .collect();

    let mut loaded_mib = vec![0.0_f64; processes.servers.len()];
    let interactions_before: Vec<HashMap<String, f64>> = processes
        .servers
        .iter()
        .map(|(_, server)| counters(server, "homeserver_db_interactions_total"))
        .collect();
    let commits_before: Vec<(f64, f64)> =
        processes.servers.iter().map(|(_, server)| group_commits(server)).collect();
    let levels = LEVELS
        .iter()
        .enumerate()
        .map(|(round, &clients)| {
            let (before, postgres_before) = processes.ticks();
            let (events_per_second, send_ms) = load(&urls, &population, clients, round);
            let (after, postgres_after) = processes.ticks();
            for (loaded, now) in loaded_mib.iter_mut().zip(processes.resident_mib()) {
                *loaded = loaded.max(now);
            }
            let per_thousand = |ticks: u64| ticks as f64 * tick_ms * 1000.0 / SENDS as f64;
            let each =
                before.iter().zip(&after).map(|(before, after)| per_thousand(after - before)).collect();
            let postgres = per_thousand(postgres_ticks_between(&postgres_before, &postgres_after));
            let raw_per_second = raw_limit(clients);
            let no_op_per_second = no_op_load(&urls, clients);
            Level {
                clients,
                events_per_second,
                send_ms,
                cpu_ms_per_thousand: (each, postgres),
                raw_per_second,
                no_op_per_second,
            }
        })
        .collect::<Vec<Level>>();
    let events = (SENDS * levels.len()) as f64;
    let interactions = processes
        .servers
        .iter()
        .zip(&interactions_before)
        .map(|((_, server), before)| {
            let mut per_thousand: Vec<(String, f64)> = counters(server, "homeserver_db_interactions_total")
                .into_iter()
                .map(|(name, after)| {
                    let count = after - before.get(&name).copied().unwrap_or(0.0);
                    (name, count * 1000.0 / events)
                })
                .filter(|(_, per_thousand)| *per_thousand >= 1.0)
                .collect();
            per_thousand.sort_by(|a, b| b.1.total_cmp(&a.1));
            per_thousand
        })
        .collect();
    let writes_per_commit = processes
        .servers
        .iter()
        .zip(&commits_before)
        .map(|((_, server), (commits_before, writes_before))| {
            let (commits, writes) = group_commits(server);
            (commits > *commits_before).then(|| (writes - writes_before) / (commits - commits_before))
        })
        .collect();
    let (latencies_ms, trips_ms) = probe(&urls, &population, send, sync);
    Figures {
        label,
        process_names: processes.servers.iter().map(|(name, _)| name.clone()).collect(),
        levels,
        latencies_ms,
        trips_ms,
        idle_mib,
        loaded_mib,
        idle_cpu_percent,
        interactions,
        writes_per_commit,
    }
}

fn monolith(database_url: Option<&str>, dir: &std::path::Path) -> Processes {
    // Registration is open by default only on SQLite: the clients register.
    let config = dir.join("master.toml");
    std::fs::write(&config, "server_name = \"localhost\"\nenable_registration = true\n")
        .expect("write a config");
    let config = config.display().to_string();
    let mut args = vec!["--config", config.as_str(), "--http-listen", "127.0.0.1:0"];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    Processes { servers: vec![("master".to_owned(), Server::start(Binary::Master, &args, dir))] }
}

/// pgbench's one-row transactions per second on `url`, `clients` clients.
fn pgbench(url: &str, clients: usize, dir: &std::path::Path) -> f64 {
    let script = dir.join("insert.sql");
    std::fs::write(&script, "INSERT INTO raw_limit (payload) VALUES ('{\"body\":\"load\"}');\n")
        .expect("write the pgbench script");
    let output = std::process::Command::new("pgbench")
        .args(["--no-vacuum", "--client", &clients.to_string(), "--jobs", &clients.min(2).to_string()])
        .args(["--time", &RAW_FOR.as_secs().to_string(), "--file"])
        .arg(&script)
        .arg(url)
        .output()
        .expect("run pgbench");
    let report = String::from_utf8_lossy(&output.stdout);
    report
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| {
            panic!("pgbench gave no tps:\n{report}\n{}", String::from_utf8_lossy(&output.stderr))
        })
}

/// One-row transactions per second on a SQLite file with our settings (our
/// pool: WAL, `synchronous = NORMAL`), from `clients` tasks.
fn sqlite_limit(db: &Database, runtime: &tokio::runtime::Runtime, clients: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + RAW_FOR;
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (db, done) = (db.clone(), Arc::clone(&done));
                tokio::spawn(async move {
                    while tokio::time::Instant::now() < deadline {
                        db.run_autocommit("raw_insert", |txn| {
                            Box::pin(async move {
                                txn.execute(
                                    "INSERT INTO raw_limit (payload) VALUES ('{\"body\":\"load\"}')",
                                    &[],
                                )
                                .await
                            })
                        })
                        .await
                        .expect("a one-row insert");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("an inserting task");
        }
    });
    done.load(Ordering::Relaxed) as f64 / RAW_FOR.as_secs_f64()
}

async fn raw_table(url: &str) -> Database {
    let db = Database::connect(url).await.expect("the raw limit's database");
    db.run_autocommit("raw_table", |txn| {
        Box::pin(async move { txn.execute_batch("CREATE TABLE raw_limit (payload TEXT NOT NULL)").await })
    })
    .await
    .expect("create the raw limit's table");
    db
}

/// Median send times over TCP replication, in ms: through the master, and
/// through the room's writer itself.
fn sends_over_tcp() -> (f64, f64) {
    let deployment = Deployment::new(Transport::Tcp, &["persister1", "follower1"], &["persister1"]);
    let master = deployment.start("master");
    let writer = deployment.start("persister1");
    let _follower = deployment.start("follower1");
    let sender = register(&writer.base_url, "tcp-sender");
    let room = sender.create_room();
    let median_ms = |through: &Client, label: &str| {
        let mut times_ms: Vec<f64> = (0..TCP_SENDS)
            .map(|n| {
                let started = Instant::now();
                through.send(&room, &format!("{label}-{n}"), "timed");
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times_ms.sort_by(f64::total_cmp);
        percentile(&times_ms, 0.5)
    };
    let through_writer = median_ms(&sender, "writer");
    let through_master = median_ms(&sender.on(&master.base_url), "master");
    (through_master, through_writer)
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
fn report(all: &[Figures]) {
    println!(
        "e2e/client API: {USERS} users in {ROOMS} rooms; at each concurrency {SENDS} sends, each client one after another, through every process in turn"
    );
    println!(
        "  raw limit: one-row INSERT transactions at the same concurrency for {} s (pgbench on the same PostgreSQL; SQLite: tasks on a file with our settings)",
        RAW_FOR.as_secs()
    );
    println!(
        "  ceiling: the ratio a send would reach costing only a no-op request (/versions, same clients and connections) plus a raw commit"
    );
    for figures in all {
        println!("  {}", figures.label);
        for level in &figures.levels {
            let (each, postgres) = &level.cpu_ms_per_thousand;
            let cpu: Vec<String> = figures
                .process_names
                .iter()
                .zip(each)
                .map(|(name, ms)| format!("{name} {ms:.0}"))
                .chain(std::iter::once(format!("postgres {postgres:.0}")))
                .collect();
            println!(
                "    {:>2} clients {:>7.0} events/s  send p50 {:>6.2} ms p99 {:>7.2} ms  raw limit {:>7.0}/s  ratio {:.3}  no-op requests {:>6.0}/s, ceiling {:.3}  CPU-ms/1000 ev: {}",
                level.clients,
                level.events_per_second,
                percentile(&level.send_ms, 0.5),
                percentile(&level.send_ms, 0.99),
                level.raw_per_second,
                level.events_per_second / level.raw_per_second,
                level.no_op_per_second,
                level.ceiling(),
                cpu.join(", ")
            );
        }
        println!(
            "    send→sync ({PROBES} probes, on another process where there is one): from the 200 p50 {:.2} ms p99 {:.2} ms; from the send's start p50 {:.2} ms p99 {:.2} ms",
            percentile(&figures.latencies_ms, 0.5),
            percentile(&figures.latencies_ms, 0.99),
            percentile(&figures.trips_ms, 0.5),
            percentile(&figures.trips_ms, 0.99),
        );
        for (index, name) in figures.process_names.iter().enumerate() {
            println!(
                "    {name:<8} resident {:>6.1} MiB idle, {:>6.1} MiB under load; idle CPU {:.3}% of a core",
                figures.idle_mib[index], figures.loaded_mib[index], figures.idle_cpu_percent[index]
            );
            let interactions: Vec<String> = figures.interactions[index]
                .iter()
                .take(5)
                .map(|(name, per_thousand)| format!("{name} {per_thousand:.0}"))
                .collect();
            let grouping = figures.writes_per_commit[index]
                .map_or(String::new(), |writes| format!("; {writes:.1} sends per events commit"));
            println!(
                "    {name:<8} database interactions per 1,000 events: {}{grouping}",
                interactions.join(", ")
            );
        }
    }
    let [sqlite, postgres, four] = all else { return };
    println!("  ratios at each concurrency (1, 4, 16, 64 clients), events/s:");
    for (label, figures) in
        [("monolith SQLite / monolith PostgreSQL", sqlite), ("4 processes / monolith PostgreSQL", four)]
    {
        let ratios: Vec<String> = figures
            .levels
            .iter()
            .zip(&postgres.levels)
            .map(|(ours, baseline)| format!("{:.3}", ours.events_per_second / baseline.events_per_second))
            .collect();
        println!("    {label:<40} {}", ratios.join("  "));
    }
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let postgres_db =
        runtime.block_on(store_test_support::TestDb::new_empty(Engine::Postgres)).expect("a database");
    let raw_postgres_db =
        runtime.block_on(store_test_support::TestDb::new_empty(Engine::Postgres)).expect("a database");
    drop(runtime.block_on(raw_table(&raw_postgres_db.url)));
    let raw_dir = tempfile::tempdir().expect("a temporary directory");
    let raw_sqlite =
        runtime.block_on(raw_table(&format!("sqlite://{}", raw_dir.path().join("raw.db").display())));
    let pg_limit = |clients: usize| pgbench(&raw_postgres_db.url, clients, raw_dir.path());
    let sqlite_limit = |clients: usize| sqlite_limit(&raw_sqlite, &runtime, clients);

    let mut all = Vec::new();
    {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let processes = monolith(None, dir.path());
        all.push(measure("monolith, SQLite", &processes, &sqlite_limit, 0, 0));
    }
    {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let processes = monolith(Some(&postgres_db.url), dir.path());
        all.push(measure("monolith, PostgreSQL", &processes, &pg_limit, 0, 0));
    }
    {
        let deployment = Deployment::for_clients();
        let names = ["master", "writer1", "writer2", "syncer"];
        let servers = deployment.start_all();
        assert_eq!(base_urls(&servers).len(), names.len());
        let processes =
            Processes { servers: names.iter().map(|name| (*name).to_owned()).zip(servers).collect() };
        // Probes send through writer1 and wait in sync on the sync worker.
        all.push(measure("4 processes, PostgreSQL + Redis", &processes, &pg_limit, 1, 3));
    }
    report(&all);

    let (through_master, through_writer) = sends_over_tcp();
    println!("e2e/sends over TCP replication: {TCP_SENDS} sends through each process, one at a time");
    println!("  {:<32} send p50 {through_writer:.2} ms", "through the writer (baseline)");
    println!("  {:<32} send p50 {through_master:.2} ms", "through the master");
    println!("  ratio master / writer: send p50 {:.3}", through_master / through_writer);
}
