//! Load through the client API, and what it must deliver: [`CLIENTS`] users
//! send to [`ROOMS`] rooms through every process ([`Load`]) while each follows
//! its sync through the processes that stay up; [`Outcome::check`] then
//! demands that every event acknowledged with 200 reached each member's sync
//! exactly once, in stream order within its room, and that no sync token went
//! backwards. Shared by the tests that disturb a deployment under load
//! (processes killed, writers changed) and the `elastic` benchmark.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{Client, register, timeline_ids};
use crate::deployment::{eventually, read_database};

/// The users sending and syncing.
pub const CLIENTS: usize = 4;
/// The rooms they send to; every user is in every room.
pub const ROOMS: usize = 20;
/// Marks the messages of the load in the timelines.
pub const PREFIX: &str = "eo-";

/// The users and rooms of a load, made through every process in turn.
#[derive(Debug, Clone)]
pub struct Setup {
    /// `user0` … `user3`.
    pub clients: Vec<Client>,
    /// The rooms, created by `user0` and joined by the others.
    pub rooms: Vec<String>,
}

impl Setup {
    /// Registers the users, makes the rooms, and checks that a message sent
    /// through each process reaches every process's sync.
    pub fn new(urls: &[String]) -> Setup {
        let clients: Vec<Client> =
            (0..CLIENTS).map(|n| register(&urls[n % urls.len()], &format!("user{n}"))).collect();
        let rooms: Vec<String> =
            (0..ROOMS).map(|n| clients[0].on(&urls[n % urls.len()]).create_room()).collect();
        for (n, client) in clients.iter().enumerate().skip(1) {
            for (r, room) in rooms.iter().enumerate() {
                client.on(&urls[(n + r) % urls.len()]).join(room);
            }
        }
        let setup = Setup { clients, rooms };
        setup.replicates_everywhere(urls);
        setup
    }

    /// A message sent through each process reaches every process's sync, so
    /// the deployment replicates at all.
    fn replicates_everywhere(&self, urls: &[String]) {
        let room = &self.rooms[0];
        let warm: Vec<String> = urls
            .iter()
            .enumerate()
            .map(|(n, url)| self.clients[0].on(url).send(room, &format!("warm-{n}"), "warm"))
            .collect();
        for url in urls {
            eventually(
                &format!("the warm-up messages in the sync of {url}"),
                Duration::from_secs(15),
                || {
                    let sync = self.clients[1 % CLIENTS].on(url).sync(None, Duration::ZERO);
                    let timeline = timeline_ids(&sync, "join", room);
                    let missing: Vec<&String> = warm.iter().filter(|id| !timeline.contains(id)).collect();
                    if missing.is_empty() { Ok(()) } else { Err(format!("missing {missing:?}")) }
                },
            );
        }
    }

    /// `user0`'s current sync token, from `url`.
    pub fn token(&self, url: &str) -> String {
        self.clients[0].on(url).sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned()
    }
}

/// A sync token's events part as positions: the stream position and the
/// positions of the instances ahead of it.
pub fn events_positions(token: &str) -> (i64, BTreeMap<i64, i64>) {
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
pub fn never_backwards(earlier: &str, later: &str) -> bool {
    let (earlier_stream, earlier_ahead) = events_positions(earlier);
    let (later_stream, later_ahead) = events_positions(later);
    let position =
        |stream: i64, ahead: &BTreeMap<i64, i64>, id: i64| ahead.get(&id).copied().unwrap_or(stream);
    later_stream >= earlier_stream
        && earlier_ahead.keys().chain(later_ahead.keys()).all(|id| {
            position(later_stream, &later_ahead, *id) >= position(earlier_stream, &earlier_ahead, *id)
        })
}

/// One acknowledged send.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The room.
    pub room: String,
    /// The event the 200 named.
    pub event_id: String,
    /// When the first attempt started.
    pub started: Instant,
    /// Until the 200, retries included.
    pub took: Duration,
    /// The attempts refused before it: status (0: no connection) and answer.
    pub refusals: Vec<(u16, String)>,
}

/// Sends until some process answers 200, retrying the same transaction on the
/// next process while one is down or refuses.
pub fn send_until_acknowledged(client: &Client, urls: &[String], first: usize, room: &str, txn: &str) -> Ack {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut refusals = Vec::new();
    for attempt in 0.. {
        let (status, answer) = client.on(&urls[(first + attempt) % urls.len()]).try_send(room, txn, txn);
        if status == 200 {
            let event_id = answer["event_id"].as_str().expect("an event_id").to_owned();
            return Ack { room: room.to_owned(), event_id, started, took: started.elapsed(), refusals };
        }
        refusals.push((status, answer.to_string()));
        assert!(Instant::now() < deadline, "{txn} was never acknowledged; last answer {status} {answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
    unreachable!("the loop returns or panics")
}

/// One client's sync stream: `(room, event_id)` of the load's messages in the
/// order they arrived, and every token it was given.
#[derive(Debug, Default)]
pub struct Received {
    /// The messages, as they arrived.
    pub events: Vec<(String, String)>,
    /// Every `next_batch`, the starting token first.
    pub tokens: Vec<String>,
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

/// Every event's stream ordering, read from the database at `url`.
pub fn orderings(url: &str) -> HashMap<String, i64> {
    rows_of_events(url).into_iter().map(|(event_id, ordering, _, _)| (event_id, ordering)).collect()
}

/// `(event_id, stream_ordering, room_id, instance_name)` of every event.
pub fn rows_of_events(url: &str) -> Vec<(String, i64, String, String)> {
    read_database(url, "read_events", |txn| {
        Box::pin(async move {
            let rows = txn
                .query("SELECT event_id, stream_ordering, room_id, instance_name FROM events", &[])
                .await?;
            rows.iter()
                .map(|row| Ok((row.get::<String>(0)?, row.get::<i64>(1)?, row.get(2)?, row.get(3)?)))
                .collect()
        })
    })
}

/// A load running: senders through every process, followers through those
/// that stay up.
#[derive(Debug)]
pub struct Load {
    events: usize,
    sent: Arc<AtomicUsize>,
    acknowledged: Arc<Mutex<Vec<Ack>>>,
    senders: Vec<JoinHandle<()>>,
    followers: Vec<JoinHandle<Received>>,
}

/// What a load came to.
#[derive(Debug)]
pub struct Outcome {
    /// Every acknowledged send.
    pub acknowledged: Vec<Ack>,
    /// Each user's sync stream.
    pub received: Vec<Received>,
}

impl Load {
    /// Starts `events` sends, spread over the users, each sent through
    /// `urls` in turn; each user follows its sync through `sync_urls`.
    pub fn start(setup: &Setup, urls: &[String], sync_urls: &[String], events: usize) -> Load {
        let starts: Vec<String> = setup
            .clients
            .iter()
            .map(|client| {
                client.on(&sync_urls[0]).sync(None, Duration::ZERO)["next_batch"]
                    .as_str()
                    .expect("a token")
                    .to_owned()
            })
            .collect();
        let acknowledged = Arc::new(Mutex::new(Vec::<Ack>::new()));
        let expected = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let followers = setup
            .clients
            .iter()
            .zip(starts)
            .map(|(client, since)| {
                let (client, urls) = (client.clone(), sync_urls.to_vec());
                let (expected, done) = (Arc::clone(&expected), Arc::clone(&done));
                std::thread::spawn(move || follow(&client, &urls, since, &expected, &done))
            })
            .collect();
        let sent = Arc::new(AtomicUsize::new(0));
        let senders = setup
            .clients
            .iter()
            .enumerate()
            .map(|(n, client)| {
                let (client, urls, rooms) = (client.clone(), urls.to_vec(), setup.rooms.clone());
                let (acknowledged, expected, done, sent) =
                    (Arc::clone(&acknowledged), Arc::clone(&expected), Arc::clone(&done), Arc::clone(&sent));
                std::thread::spawn(move || {
                    for i in 0..events / CLIENTS {
                        let room = &rooms[(n + i) % rooms.len()];
                        let txn = format!("{PREFIX}{n}-{i}");
                        let ack = send_until_acknowledged(&client, &urls, n + i, room, &txn);
                        acknowledged.lock().expect("not poisoned").push(ack);
                        expected.fetch_add(1, Ordering::SeqCst);
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        Load { events, sent, acknowledged, senders, followers }
    }

    /// Waits until `count` sends were acknowledged.
    pub fn wait_until_sent(&self, count: usize) {
        while self.sent.load(Ordering::SeqCst) < count.min(self.events) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every send and every follower.
    pub fn finish(self) -> Outcome {
        for sender in self.senders {
            sender.join().expect("a sending thread");
        }
        let received = self.followers.into_iter().map(|f| f.join().expect("a syncing thread")).collect();
        let acknowledged = self.acknowledged.lock().expect("not poisoned").clone();
        assert_eq!(acknowledged.len(), self.events, "every send was acknowledged");
        Outcome { acknowledged, received }
    }
}

impl Outcome {
    /// Every acknowledged event reached each user's sync exactly once, in
    /// stream order within its room (orderings from the database at
    /// `db_url`), and no user's token went backwards.
    pub fn check(&self, db_url: &str) {
        let orderings = orderings(db_url);
        let mut by_room: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for ack in &self.acknowledged {
            by_room.entry(ack.room.as_str()).or_default().push(ack.event_id.as_str());
        }
        for (n, stream) in self.received.iter().enumerate() {
            let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (room, event_id) in &stream.events {
                seen.entry(room.as_str()).or_default().push(event_id.as_str());
            }
            for (room, sent) in &by_room {
                let got = seen.get(room).cloned().unwrap_or_default();
                let mut in_order: Vec<&str> = sent.clone();
                in_order.sort_by_key(|event_id| orderings.get(*event_id).copied().unwrap_or(i64::MAX));
                assert_eq!(
                    got.len(),
                    sent.len(),
                    "user{n} got {} of {} events in {room}",
                    got.len(),
                    sent.len()
                );
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
    }
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
