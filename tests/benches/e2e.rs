//! `cargo xtask bench e2e`: the client API end to end (release builds).
//!
//! Figures, for each deployment in the same run:
//! - events/s: 4 clients each send 250 messages, spread over 8 rooms and over
//!   every process of the deployment, through `PUT …/send`;
//! - send→sync latency: one client sends a message at a time through one
//!   process while another member waits in `sync` on a different process (on
//!   the monolith, the same one); the time from the send's 200 to the sync
//!   answer that carries it (an answer before the 200 counts as 0), p50 and
//!   p99; and, because the process that takes a send answers only once it has
//!   seen the send replicated back, the time from the start of the send to
//!   the sync answer, the whole trip.
//!
//! Deployments: the monolith on SQLite and on PostgreSQL (the baselines), and
//! four processes (master, two event writers, a sync worker) over Redis.
//!
//! And, over TCP replication (master, one event writer, a follower): the
//! median time of a send through the master, which forwards it to the writer
//! and answers once it has seen the write come back over replication, against
//! a send through the writer itself (the baseline). A master that ignored its
//! TCP clients' rows would wait out its 5 s read-your-writes timeout on each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::client::{self, Client, register};
use tests::deployment::{Deployment, Transport, base_urls};
use tests::process::{Binary, Server};

const SENDERS: usize = 4;
const EVENTS_PER_SENDER: usize = 250;
const ROOMS: usize = 8;
const PROBES: usize = 200;
/// Sends timed through each process over TCP.
const TCP_SENDS: usize = 20;

struct Figures {
    events_per_second: f64,
    /// From the send's 200.
    latencies_ms: Vec<f64>,
    /// From the start of the send.
    trips_ms: Vec<f64>,
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Runs both measurements on processes at `urls`; the latency probe sends
/// through `urls[send]` and syncs on `urls[sync]`.
fn measure(urls: &[String], send: usize, sync: usize) -> Figures {
    let senders: Vec<Client> =
        (0..SENDERS).map(|n| register(&urls[n % urls.len()], &format!("sender{n}"))).collect();
    let rooms: Vec<String> = (0..ROOMS).map(|n| senders[0].on(&urls[n % urls.len()]).create_room()).collect();
    for (n, sender) in senders.iter().enumerate().skip(1) {
        for room in &rooms {
            sender.on(&urls[n % urls.len()]).join(room);
        }
    }

    let started = Instant::now();
    let threads: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(n, sender)| {
            let (sender, urls, rooms) = (sender.clone(), urls.to_vec(), rooms.clone());
            std::thread::spawn(move || {
                for i in 0..EVENTS_PER_SENDER {
                    let through = sender.on(&urls[(n + i) % urls.len()]);
                    through.send(&rooms[(n + i) % rooms.len()], &format!("load-{n}-{i}"), "load");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a sending thread");
    }
    let events_per_second = (SENDERS * EVENTS_PER_SENDER) as f64 / started.elapsed().as_secs_f64();

    // Latency: a receiver long-polls; the probe waits for each message to arrive.
    let receiver = register(&urls[sync], "receiver");
    let probe_room = senders[0].on(&urls[send]).create_room();
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
    let prober = senders[0].on(&urls[send]);
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
    Figures { events_per_second, latencies_ms, trips_ms }
}

fn monolith(database_url: Option<&str>) -> Figures {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // Registration is open by default only on SQLite: the clients register.
    let config = dir.path().join("master.toml");
    std::fs::write(&config, "server_name = \"localhost\"\nenable_registration = true\n")
        .expect("write a config");
    let config = config.display().to_string();
    let mut args = vec!["--config", config.as_str(), "--http-listen", "127.0.0.1:0"];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    let server = Server::start(Binary::Master, &args, dir.path());
    measure(std::slice::from_ref(&server.base_url), 0, 0)
}

fn four_processes() -> Figures {
    let deployment = Deployment::for_clients();
    let servers = deployment.start_all();
    // Send through writer1, wait in sync on the sync worker.
    measure(&base_urls(&servers), 1, 3)
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
fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let postgres = runtime
        .block_on(store_test_support::TestDb::new_empty(store_core::Engine::Postgres))
        .expect("a database");
    let sqlite = monolith(None);
    let monolith_postgres = monolith(Some(&postgres.url));
    let deployment = four_processes();
    let (through_master, through_writer) = sends_over_tcp();
    println!(
        "e2e/client API: {SENDERS} clients x {EVENTS_PER_SENDER} sends over {ROOMS} rooms; {PROBES} probes send→sync on another process"
    );
    for (label, figures) in [
        ("monolith, SQLite", &sqlite),
        ("monolith, PostgreSQL (baseline)", &monolith_postgres),
        ("4 processes, PostgreSQL + Redis", &deployment),
    ] {
        println!(
            "  {label:<32} {:>7.0} events/s   200→sync p50 {:.2} ms, p99 {:.2} ms   send start→sync p50 {:.2} ms, p99 {:.2} ms",
            figures.events_per_second,
            percentile(&figures.latencies_ms, 0.5),
            percentile(&figures.latencies_ms, 0.99),
            percentile(&figures.trips_ms, 0.5),
            percentile(&figures.trips_ms, 0.99),
        );
    }
    for (label, figures) in [("monolith SQLite", &sqlite), ("4 processes", &deployment)] {
        println!(
            "  ratio {label} / monolith PostgreSQL: throughput {:.3}, 200→sync p50 {:.3}, p99 {:.3}, send start→sync p50 {:.3}, p99 {:.3}",
            figures.events_per_second / monolith_postgres.events_per_second,
            percentile(&figures.latencies_ms, 0.5) / percentile(&monolith_postgres.latencies_ms, 0.5),
            percentile(&figures.latencies_ms, 0.99) / percentile(&monolith_postgres.latencies_ms, 0.99),
            percentile(&figures.trips_ms, 0.5) / percentile(&monolith_postgres.trips_ms, 0.5),
            percentile(&figures.trips_ms, 0.99) / percentile(&monolith_postgres.trips_ms, 0.99),
        );
    }
    println!("e2e/sends over TCP replication: {TCP_SENDS} sends through each process, one at a time");
    println!("  {:<32} send p50 {through_writer:.2} ms", "through the writer (baseline)");
    println!("  {:<32} send p50 {through_master:.2} ms", "through the master");
    println!("  ratio master / writer: send p50 {:.3}", through_master / through_writer);
}
