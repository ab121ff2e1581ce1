//! Exactly-once, in-order delivery through the client API while something
//! dies: 4 clients send 2,000 events to 20 rooms through every process while
//! a victim is stopped and restarted twice. Every event acknowledged with 200
//! must reach each member's sync exactly once, in stream order within its
//! room, and no sync token may go backwards.
//!
//! The victims: one of the two event writers (`kill -9`), the master
//! (`kill -9`), over Redis and over TCP; and, over Redis, the Redis server
//! itself (a dedicated one, killed and started again on its port). Syncs go
//! to the processes that stay up; sends go everywhere, retried on the next
//! process while one is down.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use ::tests::client::{Client, register};
use ::tests::deployment::{Deployment, Transport, base_urls, eventually, knows_final_positions, metric};
use ::tests::redis_server::RedisServer;

const CLIENTS: usize = 4;
const ROOMS: usize = 20;
const EVENTS: usize = 2_000;
/// How long the deployment may take to settle once the load is over.
const SETTLE: Duration = Duration::from_secs(15);
/// Marks the messages of this test in the timelines.
const PREFIX: &str = "eo-";

/// A sync token's events part as positions: the stream position and the
/// positions of the instances ahead of it.
fn events_positions(token: &str) -> (i64, BTreeMap<i64, i64>) {
    let events = token.strip_prefix('s').and_then(|rest| rest.split('_').next()).expect("a sync token");
    let mut parts = events.trim_start_matches('m').split('~');
    let stream = parts.next().and_then(|stream| stream.parse().ok()).expect("a stream position");
    let ahead = parts
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (id, position) = part.split_once('.').expect("id.position");
            (id.parse().expect("an instance id"), position.parse().expect("a position"))
        })
        .collect();
    (stream, ahead)
}

/// Whether every writer's position in `later` is at or past its position in
/// `earlier`.
fn never_backwards(earlier: &str, later: &str) -> bool {
    let (earlier_stream, earlier_ahead) = events_positions(earlier);
    let (later_stream, later_ahead) = events_positions(later);
    let position =
        |stream: i64, ahead: &BTreeMap<i64, i64>, id: i64| ahead.get(&id).copied().unwrap_or(stream);
    later_stream >= earlier_stream
        && earlier_ahead.keys().chain(later_ahead.keys()).all(|id| {
            position(later_stream, &later_ahead, *id) >= position(earlier_stream, &earlier_ahead, *id)
        })
}

/// Sends until some process answers 200, retrying the same transaction on the
/// next process while the room's writer is down.
fn send_until_acknowledged(client: &Client, urls: &[String], first: usize, room: &str, txn: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    for attempt in 0.. {
        let (status, answer) = client.on(&urls[(first + attempt) % urls.len()]).try_send(room, txn, txn);
        if status == 200 {
            return answer["event_id"].as_str().expect("an event_id").to_owned();
        }
        assert!(Instant::now() < deadline, "{txn} was never acknowledged; last answer {status} {answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
    unreachable!("the loop returns or panics")
}

/// One client's sync stream: `(room, event_id)` of this test's messages in
/// the order they arrived, and every token it was given.
#[derive(Debug, Default)]
struct Received {
    events: Vec<(String, String)>,
    tokens: Vec<String>,
}

fn follow(
    client: &Client,
    urls: &[String],
    since: String,
    expected: &AtomicUsize,
    done: &AtomicUsize,
) -> Received {
    let mut received = Received { tokens: vec![since.clone()], ..Received::default() };
    let mut since = since;
    let deadline_after_done = Duration::from_secs(60);
    let mut done_at = None;
    for request in 0.. {
        // Tokens are portable: each sync goes to the next process.
        let syncing = client.on(&urls[request % urls.len()]);
        let (status, answer) = syncing.try_sync(Some(&since), Duration::from_millis(500), 1_000);
        if status != 200 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        for (room, entry) in answer["rooms"]["join"].as_object().into_iter().flatten() {
            assert_ne!(entry["timeline"]["limited"], Value::Bool(true), "a gap in {room}: {entry}");
            for event in entry["timeline"]["events"].as_array().into_iter().flatten() {
                if event["content"]["body"].as_str().is_some_and(|body| body.starts_with(PREFIX)) {
                    let id = event["event_id"].as_str().expect("an event_id").to_owned();
                    received.events.push((room.clone(), id));
                }
            }
        }
        since = answer["next_batch"].as_str().expect("a next_batch").to_owned();
        received.tokens.push(since.clone());
        if done.load(Ordering::SeqCst) == CLIENTS {
            let done_at = *done_at.get_or_insert_with(Instant::now);
            if received.events.len() >= expected.load(Ordering::SeqCst)
                || done_at.elapsed() > deadline_after_done
            {
                return received;
            }
        }
    }
    unreachable!("the loop returns")
}

fn orderings(url: &str) -> HashMap<String, i64> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let db = store_core::Database::connect(url).await.expect("connect to the deployment's database");
        let orderings = db
            .run_autocommit("read_orderings", |txn| {
                Box::pin(async move {
                    let rows = txn.query("SELECT event_id, stream_ordering FROM events", &[]).await?;
                    rows.iter().map(|row| Ok((row.get::<String>(0)?, row.get::<i64>(1)?))).collect()
                })
            })
            .await
            .expect("read the events");
        db.close().await;
        orderings
    })
}

/// What is stopped and restarted twice under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// `writer1`, one of the two event writers.
    EventWriter,
    /// The master.
    Master,
    /// The Redis server every process replicates through.
    Redis,
}

/// Every process's servers index: master, writer1, writer2, syncer.
const MASTER: usize = 0;
const WRITER1: usize = 1;

/// Before the load: a message sent through each process reaches every
/// process's sync, so the deployment replicates at all.
fn replicates_everywhere(clients: &[Client], urls: &[String], room: &str) {
    let warm: Vec<String> = urls
        .iter()
        .enumerate()
        .map(|(n, url)| clients[0].on(url).send(room, &format!("warm-{n}"), "warm"))
        .collect();
    for url in urls {
        eventually(&format!("the warm-up messages in the sync of {url}"), Duration::from_secs(15), || {
            let sync = clients[1].on(url).sync(None, Duration::ZERO);
            let timeline = ::tests::client::timeline_ids(&sync, "join", room);
            let missing: Vec<&String> = warm.iter().filter(|id| !timeline.contains(id)).collect();
            if missing.is_empty() { Ok(()) } else { Err(format!("missing {missing:?}")) }
        });
    }
}

fn every_acknowledged_event_arrives_once_in_order(transport: Transport, victim: Victim) {
    // Declared first, so dropped after the processes that use it.
    let mut redis = (victim == Victim::Redis).then(RedisServer::start);
    let mut deployment = Deployment::for_clients_over(transport);
    if let Some(redis) = &redis {
        deployment.set_redis_url(&redis.url());
    }
    // master, writer1, writer2, syncer.
    let mut servers = deployment.start_all();
    let urls = base_urls(&servers);
    // Syncs go to the processes that stay up; sends go everywhere.
    let staying_up: &[usize] = match victim {
        Victim::EventWriter => &[MASTER, 2, 3],
        Victim::Master => &[WRITER1, 2, 3],
        Victim::Redis => &[MASTER, WRITER1, 2, 3],
    };
    let sync_urls: Vec<String> = staying_up.iter().map(|index| urls[*index].clone()).collect();

    let clients: Vec<Client> = (0..CLIENTS).map(|n| register(&urls[n], &format!("user{n}"))).collect();
    let rooms: Vec<String> = (0..ROOMS).map(|n| clients[0].on(&urls[n % urls.len()]).create_room()).collect();
    for (n, client) in clients.iter().enumerate().skip(1) {
        for (r, room) in rooms.iter().enumerate() {
            client.on(&urls[(n + r) % urls.len()]).join(room);
        }
    }
    replicates_everywhere(&clients, &urls, &rooms[0]);
    let starts: Vec<String> = clients
        .iter()
        .map(|client| {
            client.on(&sync_urls[0]).sync(None, Duration::ZERO)["next_batch"]
                .as_str()
                .expect("a token")
                .to_owned()
        })
        .collect();

    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let expected = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let followers: Vec<_> = clients
        .iter()
        .zip(starts)
        .map(|(client, since)| {
            let (client, urls) = (client.clone(), sync_urls.clone());
            let (expected, done) = (Arc::clone(&expected), Arc::clone(&done));
            std::thread::spawn(move || follow(&client, &urls, since, &expected, &done))
        })
        .collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(n, client)| {
            let (client, urls, rooms) = (client.clone(), urls.clone(), rooms.clone());
            let (acknowledged, expected, done, sent) =
                (Arc::clone(&acknowledged), Arc::clone(&expected), Arc::clone(&done), Arc::clone(&sent));
            std::thread::spawn(move || {
                for i in 0..EVENTS / CLIENTS {
                    let room = &rooms[(n + i) % ROOMS];
                    let txn = format!("{PREFIX}{n}-{i}");
                    let event_id = send_until_acknowledged(&client, &urls, n + i, room, &txn);
                    acknowledged.lock().expect("not poisoned").push((room.clone(), event_id));
                    expected.fetch_add(1, Ordering::SeqCst);
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();

    // Stop the victim twice while the clients send.
    for threshold in [EVENTS / 4, EVENTS * 5 / 8] {
        while sent.load(Ordering::SeqCst) < threshold {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(redis) = redis.as_mut() {
            redis.kill();
            std::thread::sleep(Duration::from_secs(1));
            redis.start_again();
        } else {
            let (index, name) =
                if victim == Victim::Master { (MASTER, "master") } else { (WRITER1, "writer1") };
            let killed = servers.remove(index).stop_with("KILL");
            assert!(!killed.status.success(), "kill -9 ends {name}");
            // Down while the clients send, whether or not one of them happens
            // to try it now (they may all be waiting on writes that the
            // master relays): a send through it is refused.
            let (status, answer) =
                clients[0].on(&urls[index]).try_send(&rooms[0], &format!("{PREFIX}down"), "down");
            assert_eq!(status, 0, "{name} is down and refuses: {answer}");
            std::thread::sleep(Duration::from_millis(500));
            servers.insert(index, deployment.start(name));
        }
    }
    for sender in senders {
        sender.join().expect("a sending thread");
    }
    let received: Vec<Received> =
        followers.into_iter().map(|f| f.join().expect("a syncing thread")).collect();

    if victim == Victim::Redis {
        // Sends wait out the outage instead of being refused; the processes
        // noticed it.
        for server in &servers {
            let metrics = server.get("/metrics").1;
            assert!(
                metric(&metrics, "homeserver_replication_reconnects_total") >= 1.0,
                "{} reconnected to Redis:\n{metrics}",
                server.base_url
            );
        }
    }
    let acknowledged = acknowledged.lock().expect("not poisoned").clone();
    assert_eq!(acknowledged.len(), EVENTS);
    let orderings = orderings(&deployment.db.url);
    let mut by_room: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (room, event_id) in &acknowledged {
        by_room.entry(room.as_str()).or_default().push(event_id.as_str());
    }
    for (n, stream) in received.iter().enumerate() {
        let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (room, event_id) in &stream.events {
            seen.entry(room.as_str()).or_default().push(event_id.as_str());
        }
        for (room, sent) in &by_room {
            let got = seen.get(room).cloned().unwrap_or_default();
            let mut in_order: Vec<&str> = sent.clone();
            in_order.sort_by_key(|event_id| orderings.get(*event_id).copied().unwrap_or(i64::MAX));
            assert_eq!(got.len(), sent.len(), "user{n} got {} of {} events in {room}", got.len(), sent.len());
            assert_eq!(got, in_order, "user{n}'s events of {room}, exactly once, in stream order");
        }
        for pair in stream.tokens.windows(2) {
            assert!(
                never_backwards(&pair[0], &pair[1]),
                "user{n}'s token went backwards: {} then {}",
                pair[0],
                pair[1]
            );
        }
    }
    // And the deployment settles: every process, the restarted victim
    // included, knows each writer where the writer says it is.
    let writers = [("writer1", &servers[WRITER1]), ("writer2", &servers[2])];
    for server in &servers {
        eventually(&format!("{} to know both writers' final positions", server.base_url), SETTLE, || {
            knows_final_positions(server, &writers)
        });
    }
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_a_writer_is_killed_twice() {
    every_acknowledged_event_arrives_once_in_order(Transport::Redis, Victim::EventWriter);
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_a_writer_is_killed_twice_over_tcp() {
    every_acknowledged_event_arrives_once_in_order(Transport::Tcp, Victim::EventWriter);
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_the_master_is_killed_twice() {
    every_acknowledged_event_arrives_once_in_order(Transport::Redis, Victim::Master);
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_the_master_is_killed_twice_over_tcp() {
    every_acknowledged_event_arrives_once_in_order(Transport::Tcp, Victim::Master);
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_redis_restarts_twice() {
    every_acknowledged_event_arrives_once_in_order(Transport::Redis, Victim::Redis);
}

#[cfg(test)]
mod tests {
    use super::never_backwards;

    #[test]
    fn tokens_compare_by_every_writer() {
        assert!(never_backwards("s5_0_0", "s5_0_0"));
        assert!(never_backwards("s5_0_0", "sm5~1.7_0_0"));
        assert!(never_backwards("sm5~1.7_0_0", "s7_0_0"));
        assert!(!never_backwards("sm5~1.7_0_0", "sm6~2.9_0_0"));
        assert!(!never_backwards("s6_0_0", "s5_0_0"));
    }
}
