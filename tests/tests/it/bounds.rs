//! Nothing a replication peer sends makes the master hold memory without
//! bound: a peer that floods it with rows held for a `batch` token, or with
//! positions of streams nobody has heard of, is dropped; connections past
//! `[replication] max_connections` are closed at once. The master's resident
//! memory stays flat throughout.
//!
//! The master's config lists `persister1` as the events writer, and no
//! persister1 runs: the flooding peer, authenticated with the secret, speaks
//! as persister1, so what it sends is what a real writer may send.

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use tests::deployment::{Deployment, SECRET, Transport, events_stream, eventually, metric_with};
use tests::process::Server;
use tests::raw_peer::{Ending, RawPeer};

/// How much the master's resident memory may grow while a peer misbehaves.
const FLAT: u64 = 20 * 1024 * 1024;

/// The most a flood sends before the test gives up on the master dropping
/// it: far past any sensible bound, and past `FLAT` many times over.
const FLOOD_CAP: u64 = 256 * 1024 * 1024;

/// A master alone, `[replication]` given `extra` lines.
fn master_alone(extra: &str) -> (Deployment, Server) {
    let deployment = Deployment::new(Transport::Tcp, &["persister1"], &["persister1"]);
    let config = deployment.config("master").replace("[replication]\n", &format!("[replication]\n{extra}"));
    let master = deployment.start_with_config("master", &config);
    (deployment, master)
}

/// Brings the master's memory to its working size before the baseline: a
/// peer that joins, pings a while and leaves.
fn warm_up(deployment: &Deployment, master: &Server) -> u64 {
    let mut peer = RawPeer::connect(&deployment.replication_listener());
    peer.join_as(SECRET, "warmup").unwrap_or_else(|err| panic!("{err}"));
    let pings: Vec<String> = (0..1_000).map(|n| format!("PING {n}")).collect();
    peer.send_all(&pings.iter().map(String::as_str).collect::<Vec<_>>());
    drop(peer);
    let _ = master.get("/metrics");
    master.resident_memory()
}

/// What came of a flood.
#[derive(Debug)]
struct Flood {
    /// The master closed the connection (rather than the test, at the cap).
    dropped: bool,
    got_error: bool,
    received: Vec<String>,
    bytes_sent: u64,
    /// The master's largest resident memory seen during and after the flood.
    peak_memory: u64,
}

/// Joins as persister1, announces persister1 where the master knows it (as
/// a writer does on connecting, so that its rows are taken), and sends
/// `line(n)` for n = 0, 1, … until the master closes the connection or
/// `FLOOD_CAP` bytes went out.
fn flood(deployment: &Deployment, master: &Server, line: impl Fn(u64) -> String) -> Flood {
    let mut peer = RawPeer::connect(&deployment.replication_listener());
    peer.join_as(SECRET, "persister1").unwrap_or_else(|err| panic!("{err}"));
    let known = events_stream(master)["writers"]["persister1"].as_i64().expect("the master knows persister1");
    peer.send(&format!("POSITION events persister1 {known} {known}")).expect("announce persister1");
    let mut writer = peer.writer();
    let reader = std::thread::spawn(move || {
        let ending = peer.read_to_end(Duration::from_secs(600));
        (ending, peer)
    });
    let (mut bytes_sent, mut peak_memory, mut n) = (0u64, master.resident_memory(), 0u64);
    let mut next_sample = 0u64;
    while bytes_sent < FLOOD_CAP && !reader.is_finished() {
        // Many lines per write: the master, not this loop, must be the limit.
        let chunk: String = (0..256).map(|offset| format!("{}\n", line(n + offset))).collect();
        n += 256;
        if writer.write_all(chunk.as_bytes()).is_err() {
            break;
        }
        bytes_sent += chunk.len() as u64;
        if bytes_sent >= next_sample {
            peak_memory = peak_memory.max(master.resident_memory());
            next_sample = bytes_sent + 4 * 1024 * 1024;
        }
    }
    // The master may still be working through what it read when it drops us.
    let grace = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    let dropped = reader.is_finished();
    let _ = writer.shutdown(Shutdown::Both);
    let (ending, peer) = reader.join().expect("the reading thread");
    peak_memory = peak_memory.max(master.resident_memory());
    Flood {
        dropped: dropped && ending == Ending::Closed,
        got_error: peer.got_error(),
        received: peer.received,
        bytes_sent,
        peak_memory,
    }
}

/// The flood was dropped with an `ERROR`, and memory stayed within `FLAT`.
fn assert_dropped_and_flat(what: &str, flood: &Flood, baseline: u64, master: &Server) {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    assert!(
        flood.peak_memory <= baseline + FLAT,
        "the master's memory grew from {:.1} MiB to {:.1} MiB under {what} ({:.1} MiB sent)",
        mib(baseline),
        mib(flood.peak_memory),
        mib(flood.bytes_sent)
    );
    assert!(
        flood.dropped,
        "the master kept reading {what}: {:.1} MiB sent; it sent {:?}",
        mib(flood.bytes_sent),
        flood.received
    );
    assert!(flood.got_error, "the master dropped {what} without an ERROR; it sent {:?}", flood.received);
    assert_eq!(master.get("/health"), (200, "OK".to_owned()), "the master still serves");
}

#[test]
fn a_flood_of_batch_rows_drops_the_peer_and_leaves_memory_flat() {
    let (deployment, master) = master_alone("");
    let baseline = warm_up(&deployment, &master);
    // Rows of one batch that never ends: each is held for the batch's token.
    let padding = "x".repeat(400);
    let flood = flood(&deployment, &master, |n| {
        format!(
            "RDATA events persister1 batch [\"ev\",[\"$flood{n}:e2e\",\"!flood:e2e\",\"m.room.message\",null,null,null,null,false,false],\"{padding}\"]"
        )
    });
    assert_dropped_and_flat("a flood of batch rows", &flood, baseline, &master);
}

#[test]
fn a_flood_of_unknown_stream_names_drops_the_peer_and_leaves_memory_flat() {
    let (deployment, master) = master_alone("");
    let baseline = warm_up(&deployment, &master);
    // Every name fresh, and long: each would be remembered once.
    let padding = "n".repeat(400);
    let flood = flood(&deployment, &master, |n| format!("POSITION unknown{n}{padding} persister1 1 1"));
    assert_dropped_and_flat("a flood of unknown stream names", &flood, baseline, &master);
}

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    const MAX: usize = 8;
    let (deployment, master) = master_alone(&format!("max_connections = {MAX}\n"));
    let baseline = warm_up(&deployment, &master);
    // The warm-up's connection must not take one of the slots.
    eventually("the master to see the warm-up connection go", Duration::from_secs(10), || {
        let metrics = master.get("/metrics").1;
        let open = metric_with(&metrics, "homeserver_replication_connections", &[]);
        if open == 0.0 { Ok(()) } else { Err(format!("{open} connections still open")) }
    });
    let address = deployment.replication_listener();
    let mut members: Vec<RawPeer> = (0..MAX)
        .map(|n| {
            let mut peer = RawPeer::connect(&address);
            peer.join_as(SECRET, &format!("member{n}")).unwrap_or_else(|err| panic!("connection {n}: {err}"));
            peer
        })
        .collect();
    // They pinged when joining, so the master times them out if they fall
    // silent; each check below keeps them talking.
    let keep_alive = |members: &mut Vec<RawPeer>| {
        for (n, member) in members.iter_mut().enumerate() {
            member.send("PING 0").unwrap_or_else(|err| panic!("member {n} was closed: {err}"));
        }
    };

    let mut peak_memory = baseline;
    for extra in 0..200 {
        let mut peer = RawPeer::connect(&address);
        let ending = peer.read_to_end(Duration::from_secs(2));
        assert_eq!(
            ending,
            Ending::Closed,
            "connection {} of {MAX} allowed stayed open; it received {:?}",
            MAX + extra + 1,
            peer.received
        );
        assert!(
            !peer.received.iter().any(|line| line.starts_with("POSITION")),
            "connection {} was served: {:?}",
            MAX + extra + 1,
            peer.received
        );
        if extra % 10 == 0 {
            keep_alive(&mut members);
            peak_memory = peak_memory.max(master.resident_memory());
        }
    }
    peak_memory = peak_memory.max(master.resident_memory());

    // The first ones are still served.
    for (n, member) in members.iter_mut().enumerate() {
        member.send("REPLICATE").unwrap_or_else(|err| panic!("member {n} was closed: {err}"));
        member.wait_for("POSITION", Duration::from_secs(5)).unwrap_or_else(|err| panic!("member {n}: {err}"));
    }
    assert!(
        peak_memory <= baseline + FLAT,
        "the master's memory grew from {baseline} to {peak_memory} bytes under 200 refused connections"
    );

    // A slot freed is taken again.
    drop(members.pop());
    eventually("a connection in the freed slot", Duration::from_secs(10), || {
        keep_alive(&mut members);
        let mut peer = RawPeer::connect(&address);
        peer.join_as(SECRET, "latecomer")
    });
}
