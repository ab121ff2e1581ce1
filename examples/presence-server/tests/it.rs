//! The presence server end to end: its own master and worker processes, built
//! from the reference crates plus `store-presence`, on PostgreSQL over Redis and
//! over TCP, and alone on SQLite. A presence set on the master reaches the
//! worker through replication, the worker's cache answers it and is
//! invalidated by the next change, and both processes report the stream.

use std::time::Duration;

use serde_json::{Value, json};
use tests::client::{Client, register};
use tests::deployment::{Deployment, Transport, eventually, free_port, get_json, metric_with};
use tests::process::{Binary, Server};

const MASTER: Binary = Binary::Named("presence-master");
const WORKER: Binary = Binary::Named("presence-worker");

fn status_path(client: &Client) -> String {
    format!("/_matrix/client/v3/presence/{}/status", tests::client::encode(&client.user_id))
}

fn set(client: &Client, presence: &str, message: &str) {
    let (status, body) =
        client.call("PUT", &status_path(client), Some(&json!({"presence": presence, "status_msg": message})));
    assert_eq!(status, 200, "PUT presence on {}: {body}", client.base_url);
}

/// Until `client`'s process answers `presence` and `message` for the client's
/// own user.
fn sees(client: &Client, presence: &str, message: &str) {
    eventually(&format!("{} sees {presence}", client.base_url), Duration::from_secs(5), || {
        let (status, body) = client.call("GET", &status_path(client), None);
        match (status, body["presence"].as_str(), body["status_msg"].as_str()) {
            (200, Some(seen), Some(seen_message)) if seen == presence && seen_message == message => Ok(()),
            _ => Err(format!("{status} {body}")),
        }
    });
}

fn cache_counter(server: &Server, family: &str) -> f64 {
    metric_with(&server.get("/metrics").1, family, &[("cache", "get_presence")])
}

/// Until `follower` knows the master's position on `presence` to be where the
/// master says it is.
fn applied_the_masters_presence(master: &Server, follower: &Server) {
    let position = get_json(master, "/admin/v1/streams")["streams"]["presence"]["own_position"].clone();
    let position = position.as_i64().expect("the master writes presence");
    eventually("the follower applies the master's presence", Duration::from_secs(5), || {
        let known =
            get_json(follower, "/admin/v1/streams")["streams"]["presence"]["writers"]["master"].clone();
        match known.as_i64() {
            Some(known) if known >= position => Ok(()),
            _ => Err(format!("at {known}, the master at {position}")),
        }
    });
}

/// The stream in `/admin/v1/streams`, with `master` as its writer, and in
/// `/metrics`.
fn reports_the_stream(server: &Server) {
    let streams = get_json(server, "/admin/v1/streams");
    let presence = &streams["streams"]["presence"];
    assert!(presence["writers"]["master"].is_i64(), "{} lists presence: {streams}", server.base_url);
    let metrics = server.get("/metrics").1;
    assert!(
        metrics.lines().any(|line| line.contains("stream=\"presence\"")),
        "{} reports presence in /metrics",
        server.base_url
    );
}

fn presence_reaches_the_worker_and_its_cache(transport: Transport) {
    let deployment = Deployment::new(transport, &["worker1"], &["master"]).running(MASTER, WORKER);
    let master = deployment.start("master");
    let worker = deployment.start("worker1");
    let alice = register(&master.base_url, "alice");
    let alice_on_worker = alice.on(&worker.base_url);

    set(&alice, "online", "at lunch");
    // Once the worker has applied the row, a read fills its cache (before
    // that, a read may fill it with what the row then invalidates).
    applied_the_masters_presence(&master, &worker);
    sees(&alice_on_worker, "online", "at lunch");
    // Read again: answered by the worker's cache.
    let hits = cache_counter(&worker, "homeserver_cache_hits_total");
    sees(&alice_on_worker, "online", "at lunch");
    assert!(cache_counter(&worker, "homeserver_cache_hits_total") > hits, "the worker's cache answered");

    // A change on the master invalidates the worker's cached answer.
    let invalidations = cache_counter(&worker, "homeserver_cache_invalidations_total");
    set(&alice, "unavailable", "back soon");
    sees(&alice_on_worker, "unavailable", "back soon");
    assert!(cache_counter(&worker, "homeserver_cache_invalidations_total") > invalidations);

    // Only the stream's writer takes writes.
    let (status, body) = alice_on_worker.call(
        "PUT",
        &status_path(&alice),
        Some(&json!({"presence": "offline", "status_msg": "gone"})),
    );
    assert_eq!(status, 503, "{body}");
    let (status, _) = tests::client::call(&worker.base_url, "GET", &status_path(&alice), None, None);
    assert_eq!(status, 401, "reads need a signed-in user");

    reports_the_stream(&master);
    reports_the_stream(&worker);
}

#[test]
fn presence_reaches_the_worker_and_its_cache_over_redis() {
    presence_reaches_the_worker_and_its_cache(Transport::Redis);
}

#[test]
fn presence_reaches_the_worker_and_its_cache_over_tcp() {
    presence_reaches_the_worker_and_its_cache(Transport::Tcp);
}

/// The embedded default: the master alone on SQLite, migrating the presence
/// crate's tables with the others'.
#[test]
fn a_lone_master_on_sqlite_serves_presence() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let listen = format!("127.0.0.1:{}", free_port());
    let master = Server::start(MASTER, &["--http-listen", &listen], dir.path());
    assert!(master.startup_line.contains("SQLite"), "{}", master.startup_line);
    let alice = register(&master.base_url, "alice");
    let (status, body) = alice.call("GET", &status_path(&alice), None);
    assert_eq!((status, body["errcode"].clone()), (404, Value::from("M_NOT_FOUND")), "{body}");
    set(&alice, "online", "here");
    sees(&alice, "online", "here");
    let (status, body) = alice.call("PUT", &status_path(&alice), Some(&json!({"presence": "asleep"})));
    assert_eq!(status, 400, "{body}");
    reports_the_stream(&master);
}
