//! Replication that cannot be fooled: the master follows the writers among its
//! TCP clients as closely as its Redis peers, and nobody but a writer itself
//! moves the positions of its stream, whether through the TCP listener (with
//! the secret or without) or by publishing on the deployment's Redis channel.
//!
//! What a process knows is read from `/admin/v1/streams`; the writer's own
//! position there is the truth every other process is compared with.

use std::time::Duration;

use serde_json::json;

use tests::client::{Client, register, timeline_ids};
use tests::deployment::{
    Deployment, SECRET, Transport, events_stream, eventually, metric_with, no_position_past_the_writer,
    own_position,
};
use tests::process::Server;
use tests::raw_peer::{Ending, RawPeer};
use tests::redis_server::redis_command;

/// How soon a writer's rows and a worker's cache invalidations reach the
/// master over TCP, as over Redis.
const WITHIN_A_SECOND: Duration = Duration::from_secs(1);

/// A position no sequence of a fresh deployment has handed out.
const FORGED: i64 = 999_999_999;

/// `master`, the one event writer `persister1` and the follower `follower1`,
/// all started.
struct Three {
    deployment: Deployment,
    master: Server,
    persister: Server,
    follower: Server,
}

impl Three {
    fn start(transport: Transport) -> Three {
        let deployment = Deployment::new(transport, &["persister1", "follower1"], &["persister1"]);
        let master = deployment.start("master");
        let persister = deployment.start("persister1");
        let follower = deployment.start("follower1");
        Three { deployment, master, persister, follower }
    }

    fn named(&self) -> [(&'static str, &Server); 3] {
        [("master", &self.master), ("persister1", &self.persister), ("follower1", &self.follower)]
    }

    /// A user registered on the writer with a room there and `count` messages
    /// sent through it (so no other process is waited for).
    fn write_through_the_writer(&self, username: &str, count: usize) -> (Client, String, Vec<String>) {
        let alice = register(&self.persister.base_url, username);
        let room = alice.create_room();
        let sent = (0..count).map(|n| alice.send(&room, &format!("{username}-{n}"), "hello")).collect();
        (alice, room, sent)
    }

    /// Waits until every process knows `persister1` at least where it says it
    /// is, then checks that none knows it further (a position from elsewhere).
    fn positions_are_the_writers_own(&self) {
        let writer_position = own_position(&self.persister);
        for (name, server) in self.named() {
            eventually(&format!("{name} to reach persister1's position"), Duration::from_secs(10), || {
                let known = events_stream(server)["writers"]["persister1"].as_i64();
                if known.is_some_and(|known| known >= writer_position) {
                    Ok(())
                } else {
                    Err(format!("{name} knows persister1 at {known:?}, persister1 is at {writer_position}"))
                }
            });
        }
        if let Err(moved) = no_position_past_the_writer(&self.named(), "persister1", &self.persister) {
            panic!("a position persister1 never reached: {moved}");
        }
    }
}

#[test]
fn a_writers_rows_reach_the_master_over_tcp_within_a_second() {
    let three = Three::start(Transport::Tcp);
    three.write_through_the_writer("alice", 10);
    let writer_position = own_position(&three.persister);
    for (name, server) in [("master", &three.master), ("follower1", &three.follower)] {
        eventually(&format!("{name} to know persister1's position"), WITHIN_A_SECOND, || {
            let known = events_stream(server)["writers"]["persister1"].as_i64();
            if known == Some(writer_position) {
                Ok(())
            } else {
                Err(format!("{name} knows persister1 at {known:?}; persister1 is at {writer_position}"))
            }
        });
    }
}

#[test]
fn a_logout_on_a_worker_is_refused_on_the_master_over_tcp_within_a_second() {
    let three = Three::start(Transport::Tcp);
    let alice = register(&three.follower.base_url, "alice");
    // Every process resolves the token once, so each has it cached: only the
    // invalidation the logout replicates can end it there.
    for (name, server) in three.named() {
        let (status, answer) =
            alice.on(&server.base_url).call("GET", "/_matrix/client/v3/account/whoami", None);
        assert_eq!(status, 200, "whoami on {name}: {answer}");
    }
    let (status, answer) = alice.call("POST", "/_matrix/client/v3/logout", None);
    assert_eq!(status, 200, "logout on follower1: {answer}");
    for (name, server) in three.named() {
        eventually(&format!("the logout on {name}"), WITHIN_A_SECOND, || {
            let (status, answer) =
                alice.on(&server.base_url).call("GET", "/_matrix/client/v3/account/whoami", None);
            if (status, answer["errcode"].as_str()) == (401, Some("M_UNKNOWN_TOKEN")) {
                Ok(())
            } else {
                Err(format!("{name} answers {status} {answer}"))
            }
        });
    }
}

/// An `RDATA` line for persister1 at `token` (or `batch`) carrying an event
/// nobody persisted.
fn forged_rdata(token: &str) -> String {
    let row =
        json!(["ev", ["$forged:e2e", "!forged:e2e", "m.room.message", null, null, null, null, false, false]]);
    format!("RDATA events persister1 {token} {row}")
}

/// What a rogue peer sends for persister1: a position far past anything
/// persister1 wrote, and a row beyond it.
fn forgeries() -> Vec<String> {
    vec![format!("POSITION events persister1 1 {FORGED}"), forged_rdata(&(FORGED + 1).to_string())]
}

/// The rogue peer was answered `ERROR` and closed; and the processes, once
/// they have applied a real write after it, know persister1 no further than
/// persister1 itself.
fn assert_refused(three: &Three, rogue: &mut RawPeer, who: &str) {
    let ending = rogue.read_to_end(Duration::from_secs(5));
    // A real write after the forgeries: once every process has applied it, it
    // has dealt with whatever the rogue sent before.
    three.write_through_the_writer("after", 1);
    three.positions_are_the_writers_own();
    assert!(rogue.got_error(), "{who} got no ERROR; it received {:?}", rogue.received);
    assert_eq!(ending, Ending::Closed, "{who}'s connection stayed open; it received {:?}", rogue.received);
}

#[test]
fn a_tcp_peer_without_the_secret_is_refused_and_moves_no_position() {
    let three = Three::start(Transport::Tcp);
    three.write_through_the_writer("alice", 3);
    let mut rogue = RawPeer::connect(&three.deployment.replication_listener());
    // The listener speaks first, to anyone.
    rogue.wait_for("SERVER", Duration::from_secs(5)).expect("the listener greets every connection");
    let mut lines = vec!["NAME rogue".to_owned()];
    lines.extend(forgeries());
    rogue.send_all(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&three, &mut rogue, "a peer without the secret");
    let metrics = three.master.get("/metrics").1;
    assert!(
        metric_with(&metrics, "homeserver_replication_refused_total", &[("transport", "tcp")]) >= 1.0,
        "the master counts the refusal:\n{metrics}"
    );
}

#[test]
fn a_tcp_peer_with_the_secret_cannot_speak_for_another_writer() {
    let three = Three::start(Transport::Tcp);
    three.write_through_the_writer("alice", 3);
    let mut rogue = RawPeer::connect(&three.deployment.replication_listener());
    rogue.join_as(SECRET, "rogue").unwrap_or_else(|err| panic!("{err}"));
    let lines = forgeries();
    rogue.send_all(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&three, &mut rogue, "a peer with the secret naming itself rogue");
    let metrics = three.master.get("/metrics").1;
    assert!(
        metric_with(&metrics, "homeserver_replication_refused_total", &[("transport", "tcp")]) >= 1.0,
        "the master counts the refusal:\n{metrics}"
    );
}

#[test]
fn a_position_forged_on_the_redis_channel_moves_no_position() {
    let three = Three::start(Transport::Redis);
    let (alice, room, mut sent) = three.write_through_the_writer("alice", 3);
    let since: Vec<String> = three
        .named()
        .iter()
        .map(|(_, server)| {
            let sync = alice.on(&server.base_url).sync(None, Duration::ZERO);
            sync["next_batch"].as_str().expect("a next_batch").to_owned()
        })
        .collect();

    // Anyone who can reach Redis can publish on the channel: the server name.
    let line = format!("POSITION events persister1 1 {FORGED}");
    let reply =
        redis_command(&three.deployment.redis_address(), &["PUBLISH", three.deployment.server_name(), &line])
            .expect("publish on the deployment's channel");
    let receivers: i64 = reply.trim_start_matches(':').parse().unwrap_or(0);
    assert!(receivers >= 3, "every process is subscribed to the channel: PUBLISH answered {reply:?}");

    // Real events after the forgery still reach every process's sync.
    sent.extend((0..5).map(|n| alice.send(&room, &format!("after-{n}"), "after the forgery")));
    three.positions_are_the_writers_own();
    for ((name, server), since) in three.named().iter().zip(&since) {
        let syncing = alice.on(&server.base_url);
        let mut seen: Vec<String> = Vec::new();
        let mut since = since.clone();
        eventually(
            &format!("the messages sent after the forgery in {name}'s sync"),
            Duration::from_secs(10),
            || {
                let sync = syncing.sync(Some(&since), Duration::from_millis(200));
                seen.extend(timeline_ids(&sync, "join", &room));
                since = sync["next_batch"].as_str().expect("a next_batch").to_owned();
                let missing: Vec<&String> = sent[3..].iter().filter(|id| !seen.contains(id)).collect();
                if missing.is_empty() { Ok(()) } else { Err(format!("{name} has not delivered {missing:?}")) }
            },
        );
    }
    // persister1 drops a position of its own as an echo, before any check.
    for (name, server) in [("master", &three.master), ("follower1", &three.follower)] {
        let metrics = server.get("/metrics").1;
        assert!(
            metric_with(&metrics, "homeserver_replication_refused_total", &[("transport", "redis")]) >= 1.0,
            "{name} counts the refused POSITION:\n{metrics}"
        );
    }
}
