//! The client API end to end: the same scenario on the embedded SQLite
//! monolith and on a four-process deployment (master, two event writers, a
//! sync worker), where every step goes through a different process than the
//! one before, so writes are forwarded to the room's writer and read back
//! through replication.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use tests::client::{Client, call, encode, register, timeline_ids};
use tests::deployment::{Deployment, SECRET, base_urls, eventually};
use tests::process::{Binary, Server, http_request};

/// How soon a change made through one process shows on every other.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);

fn joined_set(answer: &Value) -> BTreeSet<String> {
    answer["joined"].as_object().map(|joined| joined.keys().cloned().collect()).unwrap_or_default()
}

/// Syncs from `since` as a client does, gathering the events of `room` under
/// `section`, until there are `count` of them (or panics after a while); the
/// events and the last token.
fn gather(client: &Client, since: &str, section: &str, room: &str, count: usize) -> (Vec<String>, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut events, mut since) = (Vec::new(), since.to_owned());
    while events.len() < count {
        assert!(Instant::now() < deadline, "only {events:?} of {count} events of {room} arrived");
        let sync = client.sync(Some(&since), Duration::from_millis(500));
        events.extend(timeline_ids(&sync, section, room));
        since = sync["next_batch"].as_str().expect("a next_batch").to_owned();
    }
    (events, since)
}

fn errcode(answer: &Value) -> &str {
    answer["errcode"].as_str().unwrap_or("")
}

/// The scenario, over `urls` (one process, or several taken in turn).
fn exercise_the_api(urls: &[String]) {
    let at = |n: usize| urls[n % urls.len()].as_str();

    // Registration and authentication.
    let alice = register(at(0), "alice");
    let bob = register(at(1), "bob");
    let (status, answer) =
        call(at(2), "POST", "/_matrix/client/v3/register", None, Some(&json!({"username": "alice"})));
    assert_eq!((status, errcode(&answer)), (400, "M_USER_IN_USE"), "{answer}");
    let (status, answer) =
        call(at(0), "POST", "/_matrix/client/v3/register", None, Some(&json!({"username": "Not Valid"})));
    assert_eq!((status, errcode(&answer)), (400, "M_INVALID_USERNAME"), "{answer}");
    let (status, answer) = call(at(0), "POST", "/_matrix/client/v3/register", None, Some(&json!([1])));
    assert_eq!((status, errcode(&answer)), (400, "M_BAD_JSON"), "{answer}");
    for url in urls {
        let (status, answer) = call(url, "GET", "/_matrix/client/v3/sync", None, None);
        assert_eq!((status, errcode(&answer)), (401, "M_MISSING_TOKEN"), "{answer}");
        let (status, answer) = call(url, "GET", "/_matrix/client/v3/sync", Some("syt_nonsense"), None);
        assert_eq!((status, errcode(&answer)), (401, "M_UNKNOWN_TOKEN"), "{answer}");
        let (status, answer) = alice.on(url).call("GET", "/_matrix/client/v3/account/whoami", None);
        assert_eq!((status, answer["user_id"].as_str()), (200, Some(alice.user_id.as_str())), "{answer}");
    }

    // What the API does not serve, in Matrix's words.
    let (status, answer) = call(at(0), "GET", "/_matrix/client/v3/nowhere", None, None);
    assert_eq!((status, errcode(&answer)), (404, "M_UNRECOGNIZED"), "{answer}");
    let (status, answer) = call(at(1), "GET", "/_matrix/client/v3/register", None, None);
    assert_eq!((status, errcode(&answer)), (405, "M_UNRECOGNIZED"), "{answer}");
    let (status, answer) = call(at(2), "GET", "/_matrix/client/v3/rooms/%FF%FE/joined_members", None, None);
    assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "a path that is not UTF-8: {answer}");
    let (status, answer) = call(at(3), "GET", "/_matrix/client/v3/sync?timeout=1&timeout=2", None, None);
    assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "a query given twice: {answer}");

    // A room; only members may send or read it.
    let room = alice.create_room();
    let bob_first = bob.on(at(2)).sync(None, Duration::ZERO);
    assert!(bob_first["rooms"]["join"].get(&room).is_none(), "{bob_first}");
    let since_bob = bob_first["next_batch"].as_str().expect("a next_batch").to_owned();
    let (status, answer) = bob.on(at(3)).try_send(&room, "early", "not a member yet");
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (status, answer) = bob.on(at(0)).joined_members(&room);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (status, answer) = bob.call("POST", "/_matrix/client/v3/rooms/!nowhere:nowhere/join", None);
    assert_eq!((status, errcode(&answer)), (404, "M_NOT_FOUND"), "{answer}");

    // A join through one process is visible in every process within a second,
    // in joined_members and in sync.
    let before_join = alice.sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned();
    bob.on(at(1)).join(&room);
    let joined_at = Instant::now();
    let both: BTreeSet<String> = [alice.user_id.clone(), bob.user_id.clone()].into();
    for url in urls {
        eventually("bob's join everywhere", VISIBLE_WITHIN.saturating_sub(joined_at.elapsed()), || {
            let (status, answer) = alice.on(url).joined_members(&room);
            if status != 200 || joined_set(&answer) != both {
                return Err(format!("joined_members: {status} {answer}"));
            }
            let sync = alice.on(url).sync(Some(&before_join), Duration::ZERO);
            let members = sync["rooms"]["join"][&room]["timeline"]["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|event| event["type"] == "m.room.member" && event["state_key"] == json!(bob.user_id))
                .count();
            if members == 1 { Ok(()) } else { Err(format!("sync: {sync}")) }
        });
    }

    // Sends are idempotent per transaction, whichever process takes the retry.
    let hello = alice.on(at(2)).send(&room, "txn1", "hello");
    assert_eq!(alice.on(at(3)).send(&room, "txn1", "hello again"), hello);
    let other = alice.on(at(0)).send(&room, "txn2", "second");
    assert_ne!(other, hello);
    let elsewhere = alice.on(at(1)).create_room();
    let (status, answer) = alice.on(at(2)).try_send(&elsewhere, "txn1", "the same transaction, another room");
    assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "{answer}");
    let (status, answer) = alice.on(at(3)).try_send(&room, "big", &"x".repeat(70_000));
    assert_eq!((status, errcode(&answer)), (413, "M_TOO_LARGE"), "{answer}");
    let (status, answer) =
        alice.on(at(0)).try_send(&room, &"t".repeat(300), "a transaction ID too long to keep");
    assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "{answer}");
    let create_path = format!("/_matrix/client/v3/rooms/{}/send/m.room.create/again", encode(&room));
    let (status, answer) = alice.on(at(1)).call("PUT", &create_path, Some(&json!({})));
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let topic_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", encode(&room));
    let (status, answer) = alice.on(at(1)).call("PUT", &topic_path, Some(&json!({"topic": "tests"})));
    assert_eq!(status, 200, "{answer}");
    let topic = answer["event_id"].as_str().expect("an event_id").to_owned();
    let (status, answer) = alice.on(at(1)).call("PUT", &topic_path, Some(&json!("not an object")));
    assert_eq!((status, errcode(&answer)), (400, "M_BAD_JSON"), "{answer}");
    let state_path = format!("/_matrix/client/v3/rooms/{}/state", encode(&room));
    eventually("the topic in the room's state", VISIBLE_WITHIN, || {
        let (status, answer) = bob.on(at(2)).call("GET", &state_path, None);
        let types: BTreeSet<&str> =
            answer.as_array().into_iter().flatten().filter_map(|event| event["type"].as_str()).collect();
        let expected: BTreeSet<&str> = [
            "m.room.create",
            "m.room.member",
            "m.room.power_levels",
            "m.room.join_rules",
            "m.room.history_visibility",
            "m.room.topic",
        ]
        .into();
        if status == 200 && types == expected { Ok(()) } else { Err(format!("{status} {answer}")) }
    });

    // Bob's sync since before his join: the room, its state, every event once, in order.
    let first = bob.on(at(3)).sync(Some(&since_bob), Duration::from_secs(5));
    let mut timeline = timeline_ids(&first, "join", &room);
    // The state at the timeline's start: nothing the timeline carries again.
    let state_ids: Vec<&str> = first["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|event| event["event_id"].as_str())
        .collect();
    assert!(
        state_ids.iter().all(|id| !timeline.iter().any(|t| t == id)),
        "state repeats the timeline: {first}"
    );
    let since = first["next_batch"].as_str().expect("a next_batch");
    // createRoom writes the create event, the creator's join, the power levels,
    // the join rules and the history visibility.
    let (rest, since_bob) = gather(&bob.on(at(3)), since, "join", &room, 9 - timeline.len());
    timeline.extend(rest);
    assert_eq!(timeline.len(), 9, "createRoom's 5, bob's join, 2 messages, topic: {timeline:?}");
    assert_eq!(&timeline[6..], [hello.clone(), other.clone(), topic.clone()]);
    // Nothing new: an empty answer at once with timeout 0, and the same events never again.
    let again = bob.on(at(0)).sync(Some(&since_bob), Duration::ZERO);
    assert!(again["rooms"]["join"].get(&room).is_none(), "{again}");

    // Receipts and typing reach the other member's sync as ephemeral events.
    let alice_since =
        alice.on(at(1)).sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned();
    let receipt_path =
        format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", encode(&room), encode(&hello));
    let (status, answer) = bob.on(at(0)).call("POST", &receipt_path, Some(&json!({})));
    assert_eq!(status, 200, "{answer}");
    let typing_path = format!("/_matrix/client/v3/rooms/{}/typing/{}", encode(&room), encode(&bob.user_id));
    let (status, answer) =
        bob.on(at(2)).call("PUT", &typing_path, Some(&json!({"typing": true, "timeout": 30000})));
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = alice.on(at(2)).call("PUT", &typing_path, Some(&json!({"typing": true})));
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    eventually("the receipt and the typing in alice's sync", Duration::from_secs(5), || {
        let sync = alice.on(at(3)).sync(Some(&alice_since), Duration::ZERO);
        let ephemeral = &sync["rooms"]["join"][&room]["ephemeral"]["events"];
        let receipt = ephemeral.as_array().into_iter().flatten().find(|e| e["type"] == "m.receipt");
        let typing = ephemeral.as_array().into_iter().flatten().find(|e| e["type"] == "m.typing");
        match (receipt, typing) {
            (Some(receipt), Some(typing))
                if receipt["content"][&hello]["m.read"].get(&bob.user_id).is_some()
                    && typing["content"]["user_ids"] == json!([bob.user_id]) =>
            {
                Ok(())
            }
            _ => Err(sync.to_string()),
        }
    });

    // A private receipt reaches its owner's sync and nobody else's.
    let bob_since =
        bob.on(at(3)).sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned();
    let private_path =
        format!("/_matrix/client/v3/rooms/{}/receipt/m.read.private/{}", encode(&room), encode(&other));
    let (status, answer) = bob.on(at(1)).call("POST", &private_path, Some(&json!({})));
    assert_eq!(status, 200, "{answer}");
    let private_receipt = |sync: &Value| {
        sync["rooms"]["join"][&room]["ephemeral"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|event| event["content"][&other]["m.read.private"].get(&bob.user_id).is_some())
    };
    eventually("bob's private receipt in his own sync", Duration::from_secs(5), || {
        let sync = bob.on(at(3)).sync(Some(&bob_since), Duration::ZERO);
        if private_receipt(&sync) { Ok(()) } else { Err(sync.to_string()) }
    });
    let sync = alice.on(at(3)).sync(Some(&alice_since), Duration::ZERO);
    assert!(!private_receipt(&sync), "alice sees bob's private receipt: {sync}");

    // A waiting sync returns as soon as an event arrives, through another process.
    let since =
        alice.on(at(1)).sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned();
    let waiting = {
        let alice = alice.on(at(1));
        std::thread::spawn(move || {
            let started = Instant::now();
            (alice.sync(Some(&since), Duration::from_secs(20)), started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let late = bob.on(at(2)).send(&room, "late", "are you there?");
    let (woken, waited) = waiting.join().expect("the sync thread");
    assert_eq!(timeline_ids(&woken, "join", &room), [late], "{woken}");
    assert!(waited < Duration::from_secs(10), "the sync waited {waited:?}");

    // Leaving: the room moves to `leave` in the leaver's sync, sends are refused.
    bob.on(at(3)).leave(&room);
    let (left, _) = gather(&bob.on(at(0)), &since_bob, "leave", &room, 2);
    assert_eq!(left.len(), 2, "the late message and the leave: {left:?}");
    let (status, answer) = bob.on(at(1)).try_send(&room, "after", "gone");
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    for url in urls {
        eventually("bob's leave everywhere", VISIBLE_WITHIN, || {
            let (status, answer) = alice.on(url).joined_members(&room);
            let alone: BTreeSet<String> = [alice.user_id.clone()].into();
            if status == 200 && joined_set(&answer) == alone {
                Ok(())
            } else {
                Err(format!("{status} {answer}"))
            }
        });
    }

    // Tokens that are not this server's.
    for bad in ["nonsense", "s1_2", "sm5~999.7_1_0", "s-1_1_0"] {
        let (status, answer) =
            alice.on(at(0)).call("GET", &format!("/_matrix/client/v3/sync?since={}", encode(bad)), None);
        assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "{bad}: {answer}");
    }

    // Logging out on one process ends the token on all of them.
    let (status, _) = alice.on(at(0)).call("POST", "/_matrix/client/v3/logout", None);
    assert_eq!(status, 200);
    for url in urls {
        eventually("the logout everywhere", VISIBLE_WITHIN, || {
            let (status, answer) = alice.on(url).call("GET", "/_matrix/client/v3/account/whoami", None);
            if status == 401 { Ok(()) } else { Err(format!("{status} {answer}")) }
        });
    }

    // The internal endpoints want the shared secret.
    for url in urls {
        let (status, _) =
            http_request(url, "POST", "/_synapse/replication/send_events", Some("wrong"), Some("{}"))
                .expect("the process answers");
        assert_eq!(status, 401);
    }
}

#[test]
fn the_whole_api_on_the_sqlite_monolith() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start(Binary::Master, &["--http-listen", "127.0.0.1:0"], dir.path());
    exercise_the_api(std::slice::from_ref(&server.base_url));

    // A shutdown answers a waiting sync at once instead of waiting out its timeout.
    let waiting = {
        let carol = register(&server.base_url, "carol-waits");
        std::thread::spawn(move || {
            carol.try_sync(None, Duration::ZERO, 10).1["next_batch"].as_str().map(str::to_owned).and_then(
                |since| {
                    let started = Instant::now();
                    let (status, _) = carol.try_sync(Some(&since), Duration::from_secs(120), 10);
                    (status == 200).then(|| started.elapsed())
                },
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // A token past anything this server handed out is not one of its own.
    let carol = register(&server.base_url, "carol");
    let (status, answer) = carol.try_sync(Some("s999999_0_0"), Duration::ZERO, 10);
    assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "{answer}");

    let stopping = Instant::now();
    let finished = server.stop_with("TERM");
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(stopping.elapsed() < Duration::from_secs(10), "the shutdown waited {:?}", stopping.elapsed());
    let waited = waiting.join().expect("the waiting thread");
    assert!(waited.is_some_and(|waited| waited < Duration::from_secs(60)), "the waiting sync got {waited:?}");
}

#[test]
fn the_whole_api_on_four_processes() {
    let deployment = Deployment::for_clients();
    let servers = deployment.start_all();
    exercise_the_api(&base_urls(&servers));

    // Writers elsewhere and no secret to reach them: refused at start-up.
    let config = deployment
        .config_with_writers("syncer", &deployment.event_writers)
        .replace(&format!("worker_replication_secret = \"{SECRET}\"\n"), "");
    let finished = deployment.fail_to_start("syncer", &config);
    assert!(!finished.status.success());
    assert!(finished.stderr.contains("needs `worker_replication_secret`"), "{}", finished.stderr);
}
