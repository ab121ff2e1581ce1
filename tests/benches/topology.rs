//! `cargo xtask bench topology`: a deployment of real processes (release
//! builds, PostgreSQL, Redis) under write load, once with one event writer and
//! once with two, in the same run.
//!
//! Figures: events persisted per second through the writers' internal endpoint
//! by 8 client threads, and how long after a write's 200 a follower process
//! reports the writer at that position (its `/admin/v1/streams`), sampled
//! during the load. The one-writer deployment is the baseline.

use std::time::{Duration, Instant};

use tests::deployment::{Deployment, Transport, events_stream, join, persist};
use tests::process::Server;

const CLIENTS: usize = 8;
const EVENTS_PER_CLIENT: usize = 300;

struct Figures {
    events_per_second: f64,
    latencies_ms: Vec<f64>,
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Writes one event to `writer` and measures how long the follower takes to
/// report the writer at its position.
fn probe(writer: &Server, name: &str, follower: &Server, index: usize) -> Option<f64> {
    let orderings =
        persist(&writer.base_url, "!probe:bench", &[join(&format!("@probe{index}:bench"))]).ok()?;
    let acknowledged = Instant::now();
    let ordering = *orderings.iter().max()?;
    while acknowledged.elapsed() < Duration::from_secs(10) {
        if events_stream(follower)["writers"][name].as_i64().is_some_and(|known| known >= ordering) {
            return Some(acknowledged.elapsed().as_secs_f64() * 1000.0);
        }
    }
    None
}

fn run(writers: &[&str]) -> Figures {
    let mut instances = writers.to_vec();
    instances.push("worker1");
    let deployment = Deployment::new(Transport::Redis, &instances, writers);
    let _master = deployment.start("master");
    let servers: Vec<Server> = writers.iter().map(|writer| deployment.start(writer)).collect();
    let follower = deployment.start("worker1");
    for (index, server) in servers.iter().enumerate() {
        persist(&server.base_url, "!warmup:bench", &[join(&format!("@warm{index}:bench"))]).expect("warm up");
    }

    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let base_url = servers[client % servers.len()].base_url.clone();
            std::thread::spawn(move || {
                for index in 0..EVENTS_PER_CLIENT {
                    let event = join(&format!("@c{client}-{index}:bench"));
                    persist(&base_url, &format!("!room{client}:bench"), &[event])
                        .expect("persist under load");
                }
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    let mut index = 0;
    while clients.iter().any(|client| !client.is_finished()) {
        let writer = index % servers.len();
        if let Some(latency) = probe(&servers[writer], writers[writer], &follower, index) {
            latencies_ms.push(latency);
        }
        index += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    for client in clients {
        client.join().expect("a client thread");
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Figures { events_per_second: (CLIENTS * EVENTS_PER_CLIENT) as f64 / elapsed, latencies_ms }
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
fn main() {
    let one = run(&["persister1"]);
    let two = run(&["persister1", "persister2"]);
    println!(
        "topology/persist over Redis, {CLIENTS} clients x {EVENTS_PER_CLIENT} single-event writes, follower lag sampled under load"
    );
    for (label, figures) in [("1 event writer (baseline)", &one), ("2 event writers", &two)] {
        println!(
            "  {label:<26} {:>8.0} events/s   follower lag p50 {:.2} ms, p99 {:.2} ms ({} samples)",
            figures.events_per_second,
            percentile(&figures.latencies_ms, 0.5),
            percentile(&figures.latencies_ms, 0.99),
            figures.latencies_ms.len()
        );
    }
    println!(
        "  ratio 2 writers / 1 writer: throughput {:.3}, lag p50 {:.3}",
        two.events_per_second / one.events_per_second,
        percentile(&two.latencies_ms, 0.5) / percentile(&one.latencies_ms, 0.5)
    );
}
