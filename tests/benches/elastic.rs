//! `cargo xtask bench elastic`: the elastic-writers scenario (`tests::elastic`)
//! on release builds, PostgreSQL and Redis: 4 clients send through every
//! process while `writer2` is added to the events writers, `writer1` is
//! drained and removed, then added back.
//!
//! Figures, per run, with the same run's steady state as the baseline:
//! - handover per moved room: from the change's `PUT` until the first send
//!   to the room started after it is acknowledged (p50, p99);
//! - the latency of sends started while a change settled, against the sends
//!   of the rest of the run (p99 and their ratio);
//! - the "moved" retries the processes counted, and how long each change
//!   took to settle (every live process applied it, every writer allocates).

use std::time::Duration;

use tests::deployment::{Transport, metric};
use tests::elastic::{Figures, add_drain_and_readd, quantile};

const EVENTS: usize = 6_000;

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
fn main() {
    for kill in [false, true] {
        let run = add_drain_and_readd(Transport::Redis, EVENTS, kill);
        run.outcome.check(&run.deployment.db.url);
        let mut figures = Figures::of(&run);
        let moved_retries: f64 = run
            .servers
            .iter()
            .map(|server| metric(&server.get("/metrics").1, "homeserver_stream_writer_moved_retries_total"))
            .sum();
        let label = if kill { "with the concerned writer killed mid-handover" } else { "clean" };
        println!("elastic writers, {EVENTS} sends by 4 clients to 20 rooms, {label}:");
        for change in &run.changes {
            println!("  {:<18} settled after {:>7.1} ms", change.label, ms(change.settled_after));
        }
        let (handover_p50, handover_p99) =
            (quantile(&mut figures.handovers, 0.5), quantile(&mut figures.handovers, 0.99));
        println!(
            "  handover per moved room ({} rooms): p50 {:.1} ms, p99 {:.1} ms",
            figures.handovers.len(),
            ms(handover_p50),
            ms(handover_p99)
        );
        let (during, steady) = (quantile(&mut figures.during, 0.99), quantile(&mut figures.steady, 0.99));
        println!(
            "  send latency p99: {:.1} ms during changes ({} sends) vs {:.1} ms steady ({} sends): {:.2}x",
            ms(during),
            figures.during.len(),
            ms(steady),
            figures.steady.len(),
            ms(during) / ms(steady).max(f64::MIN_POSITIVE)
        );
        println!(
            "  ({} sends left out: they first reached a process stopped or killed for the change)",
            figures.through_a_stopped_process
        );
        println!("  moved retries: {moved_retries}");
    }
}
