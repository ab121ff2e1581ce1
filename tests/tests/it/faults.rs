//! Replication that cannot be stalled: real faults between real processes,
//! and everything written during them still reaches every process's sync,
//! exactly once, with no restart.
//!
//! The faults: a writer's replication connection cut (by a proxy in front of
//! Redis, or of the master's listener) while it writes; a follower's catch-up
//! failing in the database (its role loses `SELECT` on `events`) until the
//! privilege comes back.

use std::time::{Duration, Instant};

use serde_json::Value;

use tests::client::{Client, register};
use tests::db_role::DbRole;
use tests::deployment::{Deployment, Transport, eventually, metric_with};
use tests::process::Server;
use tests::proxy::Proxy;

/// How long a follower may take to deliver what it missed once the fault is
/// over: reconnecting backs off up to 5 s, catching up is a few queries.
const RECOVERY: Duration = Duration::from_secs(30);

/// The event IDs of the messages whose body starts with `prefix`, in every
/// joined room of `sync`, in the order given.
fn messages(sync: &Value, prefix: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for (_, room) in sync["rooms"]["join"].as_object().into_iter().flatten() {
        assert_ne!(room["timeline"]["limited"], Value::Bool(true), "a gap in a timeline: {room}");
        for event in room["timeline"]["events"].as_array().into_iter().flatten() {
            if event["content"]["body"].as_str().is_some_and(|body| body.starts_with(prefix)) {
                ids.extend(event["event_id"].as_str().map(str::to_owned));
            }
        }
    }
    ids
}

/// Syncs `client` from `since` until every one of `expected` arrived (or
/// `within` passed), then once more; every message of `prefix` delivered, in
/// the order delivered, repeats included.
fn delivered(
    client: &Client,
    since: &str,
    prefix: &str,
    expected: &[String],
    within: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    let (mut seen, mut since) = (Vec::new(), since.to_owned());
    let mut sync_once = |seen: &mut Vec<String>, timeout: Duration| {
        let (status, sync) = client.try_sync(Some(&since), timeout, 1_000);
        assert_eq!(status, 200, "sync on {}: {sync}", client.base_url);
        seen.extend(messages(&sync, prefix));
        since = sync["next_batch"].as_str().expect("a next_batch").to_owned();
    };
    while !expected.iter().all(|id| seen.contains(id)) && Instant::now() < deadline {
        sync_once(&mut seen, Duration::from_millis(500));
    }
    // A repeat would come after the last one expected.
    sync_once(&mut seen, Duration::from_millis(200));
    seen
}

/// Asserts that `name` delivered exactly `expected`, each once.
fn assert_exactly_once(name: &str, delivered: &[String], expected: &[String]) {
    let missing: Vec<&String> = expected.iter().filter(|id| !delivered.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{name}'s sync delivered {} of the {} messages; missing {missing:?}",
        expected.len() - missing.len(),
        expected.len()
    );
    let mut sorted = delivered.to_vec();
    sorted.sort();
    let before = sorted.len();
    sorted.dedup();
    assert_eq!(before, sorted.len(), "{name}'s sync delivered some messages twice: {delivered:?}");
    assert_eq!(sorted.len(), expected.len(), "{name}'s sync delivered messages nobody sent: {delivered:?}");
}

/// The token a sync of `client` on `server` starts from now.
fn now_token(client: &Client, server: &Server) -> String {
    let sync = client.on(&server.base_url).sync(None, Duration::ZERO);
    sync["next_batch"].as_str().expect("a next_batch").to_owned()
}

fn a_writer_cut_off_from_replication_delivers_everything_after_reconnecting(transport: Transport) {
    let mut deployment = Deployment::new(transport, &["persister1", "follower1"], &["persister1"]);
    let target = match transport {
        Transport::Redis => deployment.redis_address(),
        Transport::Tcp => deployment.replication_listener(),
    };
    let proxy = Proxy::start(&target);
    deployment.replicate_via("persister1", proxy.address());
    let master = deployment.start("master");
    let persister = deployment.start("persister1");
    let follower = deployment.start("follower1");

    let alice = register(&persister.base_url, "alice");
    let rooms: Vec<String> = (0..4).map(|_| alice.create_room()).collect();
    // follower1 first: over TCP it hears persister1 only through the master's
    // relay, so it shows what the reconnection lost apart from what the master
    // itself ignores.
    let followers = [("follower1", &follower), ("master", &master)];
    let since: Vec<String> = followers.iter().map(|(_, server)| now_token(&alice, server)).collect();
    eventually("persister1 to replicate through the proxy", Duration::from_secs(10), || {
        if proxy.connections() > 0 { Ok(()) } else { Err("no connection through the proxy".to_owned()) }
    });

    proxy.cut();
    // Through the writer's own listener: no other process is waited for.
    let sent: Vec<String> = (0..100)
        .map(|n| alice.send(&rooms[n % rooms.len()], &format!("cut-{n}"), &format!("cut-{n}")))
        .collect();
    // The writer knows it lost the connection: it has tried to reconnect.
    eventually("persister1 to try to reconnect through the cut", Duration::from_secs(10), || {
        if proxy.refused() > 0 { Ok(()) } else { Err("no attempt to reconnect".to_owned()) }
    });
    proxy.restore();

    for ((name, server), since) in followers.iter().zip(&since) {
        let got = delivered(&alice.on(&server.base_url), since, "cut-", &sent, RECOVERY);
        assert_exactly_once(name, &got, &sent);
    }
}

#[test]
fn a_writer_cut_off_from_redis_delivers_everything_after_reconnecting() {
    a_writer_cut_off_from_replication_delivers_everything_after_reconnecting(Transport::Redis);
}

#[test]
fn a_writer_cut_off_from_the_master_over_tcp_delivers_everything_after_reconnecting() {
    a_writer_cut_off_from_replication_delivers_everything_after_reconnecting(Transport::Tcp);
}

#[test]
fn a_catch_up_that_fails_in_the_database_recovers_by_itself() {
    let mut deployment = Deployment::new(Transport::Redis, &["persister1", "follower1"], &["persister1"]);
    let proxy = Proxy::start(&deployment.redis_address());
    deployment.replicate_via("follower1", proxy.address());
    // The superuser master creates the tables the role is then granted.
    let _master = deployment.start("master");
    let role = DbRole::create(&deployment.db.url);
    deployment.set_database_url("follower1", &role.url());
    let persister = deployment.start("persister1");
    let follower = deployment.start("follower1");

    let alice = register(&persister.base_url, "alice");
    let room = alice.create_room();
    let since = now_token(&alice, &follower);
    let first = vec![alice.send(&room, "first", "fault-first")];
    let got = delivered(&alice.on(&follower.base_url), &since, "fault-", &first, RECOVERY);
    assert_exactly_once("follower1, before the fault,", &got, &first);
    eventually("follower1 to replicate through the proxy", Duration::from_secs(10), || {
        if proxy.connections() > 0 { Ok(()) } else { Err("no connection through the proxy".to_owned()) }
    });

    // Rows the follower misses, so that it must catch up on reconnecting...
    proxy.cut();
    let mut sent = first;
    sent.extend((0..20).map(|n| alice.send(&room, &format!("missed-{n}"), &format!("fault-missed-{n}"))));
    // ...with a query the database now refuses.
    role.as_superuser(&format!("REVOKE SELECT ON events FROM {}", role.name()));
    proxy.restore();
    eventually("follower1's catch-up to fail in the database", RECOVERY, || {
        let metrics = follower.get("/metrics").1;
        let failures = metric_with(
            &metrics,
            "homeserver_db_interaction_failures_total",
            &[("name", "get_events_updates")],
        );
        if failures >= 1.0 {
            Ok(())
        } else {
            Err(format!("no failed get_events_updates counted:\n{metrics}"))
        }
    });
    // A couple of seconds of failing: any retry in that time fails too.
    std::thread::sleep(Duration::from_secs(2));
    role.as_superuser(&format!("GRANT SELECT ON events TO {}", role.name()));

    // Few enough to travel as RDATA alone: no POSITION comes to help.
    sent.extend((0..5).map(|n| alice.send(&room, &format!("after-{n}"), &format!("fault-after-{n}"))));
    let got = delivered(&alice.on(&follower.base_url), &since, "fault-", &sent, RECOVERY);
    assert_exactly_once("follower1", &got, &sent);
}
