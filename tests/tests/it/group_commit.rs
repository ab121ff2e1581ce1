//! Group commit under concurrency, through the client API of a whole
//! deployment (master, two event writers, a sync worker, over Redis): the
//! writers persist the sends that arrive while a commit is in flight together,
//! and every guarantee of one send per commit still holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::tests::client::{Client, register};
use ::tests::deployment::{Deployment, base_urls, eventually, metric_with};
use ::tests::process::Server;

const USERS: usize = 8;
const SENDERS: usize = 64;
const ROOMS: usize = 8;
const SENDS_EACH: usize = 12;
/// Marks the messages of this test in the timelines.
const PREFIX: &str = "gc-";

/// `(event ID → stream ordering)` of every event, and `(room, state key) →
/// ordering` of the last membership event of each, from the deployment's
/// database.
struct Stored {
    orderings: HashMap<String, i64>,
    memberships: HashMap<(String, String), i64>,
}

fn stored(url: &str) -> Stored {
    let rows = ::tests::deployment::read_database(url, "read_events", |txn| {
        Box::pin(async move {
            let rows = txn
                .query("SELECT event_id, stream_ordering, room_id, type, state_key FROM events", &[])
                .await?;
            rows.iter()
                .map(|row| {
                    Ok((
                        row.get::<String>(0)?,
                        row.get::<i64>(1)?,
                        row.get::<String>(2)?,
                        row.get::<String>(3)?,
                        row.get::<Option<String>>(4)?,
                    ))
                })
                .collect::<Result<Vec<_>, store_core::StoreError>>()
        })
    });
    let mut stored = Stored { orderings: HashMap::new(), memberships: HashMap::new() };
    for (event_id, ordering, room, event_type, state_key) in rows {
        if let (Some(state_key), "m.room.member") = (state_key, event_type.as_str()) {
            let last = stored.memberships.entry((room, state_key)).or_insert(ordering);
            *last = (*last).max(ordering);
        }
        stored.orderings.insert(event_id, ordering);
    }
    stored
}

/// Commits and the writes they took, summed over the events writers.
fn events_group_commits(writers: &[&Server]) -> (f64, f64) {
    writers.iter().fold((0.0, 0.0), |(commits, writes), writer| {
        let metrics = writer.get("/metrics").1;
        let labels = [("stream", "events")];
        (
            commits + metric_with(&metrics, "homeserver_group_commits_total", &labels),
            writes + metric_with(&metrics, "homeserver_group_committed_writes_total", &labels),
        )
    })
}

/// A deployment with `USERS` users, all in `ROOMS` rooms.
fn populated() -> (Deployment, Vec<Server>, Vec<String>, Vec<Client>, Vec<String>) {
    let deployment = Deployment::for_clients();
    let servers = deployment.start_all();
    let urls = base_urls(&servers);
    let users: Vec<Client> = (0..USERS).map(|n| register(&urls[n % urls.len()], &format!("gc{n}"))).collect();
    let rooms: Vec<String> = (0..ROOMS).map(|n| users[0].on(&urls[n % urls.len()]).create_room()).collect();
    for (n, user) in users.iter().enumerate().skip(1) {
        for (r, room) in rooms.iter().enumerate() {
            user.on(&urls[(n + r) % urls.len()]).join(room);
        }
    }
    (deployment, servers, urls, users, rooms)
}

/// Every event of this test that `client`'s sync on `url` gives from
/// `since`, per room, in the order it gave them, once `expected` arrived.
fn synced_since(client: &Client, url: &str, since: &str, expected: usize) -> BTreeMap<String, Vec<String>> {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut since = since.to_owned();
    eventually("every acknowledged event in sync", Duration::from_secs(60), || {
        let (status, answer) = client.on(url).try_sync(Some(&since), Duration::from_millis(500), 10_000);
        if status != 200 {
            return Err(format!("sync answered {status}: {answer}"));
        }
        for (room, entry) in answer["rooms"]["join"].as_object().into_iter().flatten() {
            assert_ne!(entry["timeline"]["limited"], serde_json::Value::Bool(true), "a gap in {room}");
            for event in entry["timeline"]["events"].as_array().into_iter().flatten() {
                if event["content"]["body"].as_str().is_some_and(|body| body.starts_with(PREFIX)) {
                    let id = event["event_id"].as_str().expect("an event_id").to_owned();
                    seen.entry(room.clone()).or_default().push(id);
                }
            }
        }
        since = answer["next_batch"].as_str().expect("a next_batch").to_owned();
        let got: usize = seen.values().map(Vec::len).sum();
        if got >= expected { Ok(()) } else { Err(format!("{got} of {expected}")) }
    });
    seen
}

/// 64 senders over 8 rooms, through every process; half of them send each
/// transaction twice at once, through two processes. Every acknowledged
/// event reaches sync once, in per-room stream order; both attempts of a
/// transaction answer the same event; and the writers shared commits.
#[test]
fn sixty_four_senders_share_commits_and_every_event_arrives_once_in_order() {
    let (deployment, servers, urls, users, rooms) = populated();
    // gc1 syncs on the sync worker, gc2 on the master.
    let followers = [(&users[1], &urls[3]), (&users[2], &urls[0])];
    let starts: Vec<String> = followers
        .iter()
        .map(|(user, url)| {
            user.on(url).sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned()
        })
        .collect();
    let before = events_group_commits(&[&servers[1], &servers[2]]);

    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    std::thread::scope(|scope| {
        for sender in 0..SENDERS {
            let (user, urls, rooms, acknowledged) = (&users[sender % USERS], &urls, &rooms, &acknowledged);
            scope.spawn(move || {
                for i in 0..SENDS_EACH {
                    let (room, txn) = (&rooms[(sender + i) % ROOMS], format!("{PREFIX}{sender}-{i}"));
                    let through = |n: usize| user.on(&urls[(sender + i + n) % urls.len()]);
                    let event_id = if sender % 2 == 0 {
                        through(0).send(room, &txn, &txn)
                    } else {
                        // The same transaction through two processes at once.
                        let (first, retry) = std::thread::scope(|both| {
                            let retry = both.spawn(|| through(1).send(room, &txn, &txn));
                            (through(0).send(room, &txn, &txn), retry.join().expect("a retry"))
                        });
                        assert_eq!(first, retry, "{txn}: both attempts answer its one event");
                        first
                    };
                    acknowledged.lock().expect("not poisoned").push((room.clone(), event_id));
                }
            });
        }
    });
    let acknowledged = acknowledged.lock().expect("not poisoned").clone();
    assert_eq!(acknowledged.len(), SENDERS * SENDS_EACH);

    let orderings = stored(&deployment.db.url).orderings;
    let mut by_room: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (room, event_id) in acknowledged {
        by_room.entry(room).or_default().push(event_id);
    }
    for sent in by_room.values_mut() {
        sent.sort_by_key(|event_id| orderings.get(event_id).copied().unwrap_or(i64::MAX));
    }
    for ((user, url), start) in followers.iter().zip(&starts) {
        let seen = synced_since(user, url, start, SENDERS * SENDS_EACH);
        for (room, sent) in &by_room {
            assert_eq!(
                seen.get(room),
                Some(sent),
                "{}'s events of {room}: each once, in stream order",
                user.user_id
            );
        }
    }
    let after = events_group_commits(&[&servers[1], &servers[2]]);
    let (commits, writes) = (after.0 - before.0, after.1 - before.1);
    assert!(writes >= (SENDERS * SENDS_EACH) as f64, "{writes} writes counted");
    assert!(commits < writes, "the writers shared commits: {commits} commits for {writes} writes");
}

/// A send's sender, status and event ID.
type Outcome = (String, u16, Option<String>);

/// A sender who leaves while its messages are queued: each message checked
/// after the leave was queued is refused alone (the state it is checked
/// against is the one the queued leave produces), every message acknowledged
/// precedes the leave, and the others' messages of the same moment commit.
#[test]
fn a_message_queued_after_its_sender_left_fails_alone() {
    let (deployment, servers, urls, users, rooms) = populated();
    let room = &rooms[0];
    let (leaver, others) = (&users[1], &users[2..]);
    let before = events_group_commits(&[&servers[1], &servers[2]]);
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    std::thread::scope(|scope| {
        for (n, sender) in std::iter::repeat_n(leaver, 8).chain(others.iter().cycle().take(24)).enumerate() {
            let (urls, outcomes) = (&urls, &outcomes);
            scope.spawn(move || {
                for i in 0..10 {
                    let txn = format!("{PREFIX}{n}-{i}");
                    let (status, answer) = sender.on(&urls[(n + i) % urls.len()]).try_send(room, &txn, &txn);
                    let event_id = answer["event_id"].as_str().map(str::to_owned);
                    outcomes.lock().expect("not poisoned").push((sender.user_id.clone(), status, event_id));
                }
            });
        }
        // The leave, once the sends are under way.
        std::thread::sleep(Duration::from_millis(100));
        leaver.on(&urls[3]).leave(room);
    });
    let stored = stored(&deployment.db.url);
    let left_at = stored.memberships[&(room.clone(), leaver.user_id.clone())];
    let outcomes = outcomes.lock().expect("not poisoned").clone();
    let mut refused = 0;
    for (sender, status, event_id) in &outcomes {
        match (sender == &leaver.user_id, status) {
            (_, 200) => {
                let ordering = stored.orderings[event_id.as_ref().expect("an event_id")];
                if sender == &leaver.user_id {
                    assert!(
                        ordering < left_at,
                        "{sender}'s message at {ordering} is after its leave at {left_at}"
                    );
                }
            }
            (true, 403) => refused += 1,
            _ => panic!("{sender}'s send answered {status}"),
        }
    }
    assert!(refused > 0, "the leaver's later messages are refused");
    let others_sent = outcomes.iter().filter(|(sender, ..)| sender != &leaver.user_id).count();
    assert_eq!(others_sent, 240);
    let after = events_group_commits(&[&servers[1], &servers[2]]);
    assert!(after.0 - before.0 < after.1 - before.1, "commits were shared: {before:?} then {after:?}");
}
