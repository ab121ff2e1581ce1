//! A room's history through `GET /rooms/{roomId}/messages`, from the
//! `prev_batch` a limited sync hands out back to the room's creation and
//! forwards again, and sync as clients parse it (a client's own events carry
//! their transaction ID; every section is present; no state repeated from the
//! timeline). The same scenarios run on the embedded SQLite monolith and on a
//! four-process deployment, where each request goes to another process than
//! the one before, so every token is read by a process that did not hand it
//! out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use tests::client::{Client, call, encode, register, timeline_ids};
use tests::deployment::{Deployment, base_urls, eventually, persist};
use tests::process::{Binary, Server};

/// How many messages the room gets.
const MESSAGES: usize = 50;
/// How many events a page holds.
const PAGE: usize = 7;

fn errcode(answer: &Value) -> &str {
    answer["errcode"].as_str().unwrap_or("")
}

fn event_ids(events: &Value) -> Vec<String> {
    events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|event| event["event_id"].as_str().map(str::to_owned))
        .collect()
}

/// `GET /rooms/{room}/messages?{query}`: the status and the answer.
fn messages(client: &Client, room: &str, query: &str) -> (u16, Value) {
    client.call("GET", &format!("/_matrix/client/v3/rooms/{}/messages?{query}", encode(room)), None)
}

/// Pages through `room` in direction `dir` from `from` (none: the room's
/// end that `dir` starts at), through each of `clients` in turn, until a page
/// has no `end`; every page's events, in the order they came.
fn page_through(clients: &[Client], room: &str, dir: &str, from: Option<&str>) -> Vec<Value> {
    let (mut events, mut from) = (Vec::new(), from.map(str::to_owned));
    for page_idx in 0.. {
        assert!(page_idx < 100, "paging {dir} never ends: {} events so far", events.len());
        let mut query = format!("dir={dir}&limit={PAGE}");
        if let Some(from) = &from {
            query.push_str(&format!("&from={}", encode(from)));
        }
        let client = &clients[page_idx % clients.len()];
        let (status, page) = messages(client, room, &query);
        assert_eq!(status, 200, "page {page_idx} on {}: {page}", client.base_url);
        let chunk = page["chunk"].as_array().expect("a chunk");
        assert!(chunk.len() <= PAGE, "{page}");
        assert!(page["start"].is_string(), "{page}");
        events.extend(chunk.iter().cloned());
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    events
}

/// A room with 50 messages sent through each process in turn, paged back from
/// a limited sync's `prev_batch` to its creation and forward again; and what
/// `messages` refuses.
fn page_back_to_the_creation(urls: &[String]) {
    let at = |n: usize| urls[n % urls.len()].as_str();
    let alice = register(at(0), "alice");
    let bob = register(at(1), "bob");
    let carol = register(at(2), "carol");
    let room = alice.on(at(1)).create_room();
    bob.on(at(2)).join(&room);
    let sent: Vec<String> = (0..MESSAGES)
        .map(|n| {
            let sender = if n % 2 == 0 { &alice } else { &bob };
            sender.on(at(n)).send(&room, &format!("h{n}"), &format!("message {n}"))
        })
        .collect();

    for url in urls {
        eventually("the last message everywhere", Duration::from_secs(10), || {
            let (status, page) = messages(&alice.on(url), &room, "dir=b&limit=1");
            if status == 200 && event_ids(&page["chunk"]).last() == sent.last() {
                Ok(())
            } else {
                Err(format!("{status} {page}"))
            }
        });
    }

    // A sync with a small timeline, once it shows the last message: cut,
    // with the room's latest events and a token before them.
    let reader = alice.on(at(3));
    let mut sync = Value::Null;
    eventually("the last message in a limited sync", Duration::from_secs(10), || {
        let (status, answer) = reader.try_sync(None, Duration::ZERO, 5);
        sync = answer;
        let timeline = timeline_ids(&sync, "join", &room);
        if status == 200 && timeline.last() == sent.last() { Ok(()) } else { Err(format!("{status} {sync}")) }
    });
    let timeline = &sync["rooms"]["join"][&room]["timeline"];
    assert_eq!(timeline["limited"], json!(true), "{sync}");
    assert_eq!(timeline_ids(&sync, "join", &room), sent[MESSAGES - 5..], "{sync}");
    let prev_batch = timeline["prev_batch"].as_str().expect("a prev_batch").to_owned();

    // Back from it, a page on each process in turn: every earlier event once,
    // in order, down to the room's creation.
    let clients: Vec<Client> = (0..urls.len()).map(|n| alice.on(at(n + 1))).collect();
    let mut back = page_through(&clients, &room, "b", Some(&prev_batch));
    back.reverse();
    assert_eq!(
        back.first().map(|event| &event["type"]),
        Some(&json!("m.room.create")),
        "the room's first event"
    );
    let messages_back: Vec<String> = event_ids(&Value::Array(
        back.iter().filter(|event| event["type"] == "m.room.message").cloned().collect(),
    ));
    assert_eq!(messages_back, sent[..MESSAGES - 5], "every message before the timeline, once, in order");
    let back_ids = event_ids(&Value::Array(back));
    let distinct: BTreeSet<&String> = back_ids.iter().collect();
    assert_eq!(distinct.len(), back_ids.len(), "an event twice: {back_ids:?}");

    // Forwards from the creation: the whole room, once, in order.
    let forward = event_ids(&Value::Array(page_through(&clients, &room, "f", None)));
    let whole: Vec<String> = back_ids.iter().cloned().chain(timeline_ids(&sync, "join", &room)).collect();
    assert_eq!(forward, whole);
    // Forwards from the sync's `prev_batch`: the timeline it came with.
    let from_prev = event_ids(&Value::Array(page_through(&clients, &room, "f", Some(&prev_batch))));
    assert_eq!(from_prev, sent[MESSAGES - 5..]);
    // Up to a token (`to`), and with a filter's limit.
    let (status, page) =
        messages(&bob.on(at(0)), &room, &format!("dir=f&limit=100&to={}", encode(&prev_batch)));
    assert_eq!(status, 200, "{page}");
    assert_eq!(event_ids(&page["chunk"]), back_ids, "{page}");
    assert!(page.get("end").is_none(), "nothing further up to `to`: {page}");
    let filter = encode(r#"{"limit":3}"#);
    let (status, page) = messages(&bob.on(at(1)), &room, &format!("dir=b&limit={PAGE}&filter={filter}"));
    assert_eq!(status, 200, "{page}");
    assert_eq!(event_ids(&page["chunk"]), sent.iter().rev().take(3).cloned().collect::<Vec<_>>());
    assert!(page["end"].is_string(), "more lies further: {page}");

    // Refusals.
    for bad in ["nonsense", "s", "s-1", "m5~999.7", "s99999999"] {
        let (status, answer) = messages(&alice.on(at(2)), &room, &format!("dir=b&from={}", encode(bad)));
        assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "{bad}: {answer}");
    }
    let (status, answer) = messages(&alice.on(at(3)), &room, "dir=sideways");
    assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "{answer}");
    let (status, answer) = messages(&carol.on(at(0)), &room, &format!("dir=b&from={}", encode(&prev_batch)));
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "carol never joined: {answer}");
    let (status, answer) = messages(&alice.on(at(1)), "!nowhere:nowhere", "dir=b");
    assert_eq!((status, errcode(&answer)), (404, "M_NOT_FOUND"), "{answer}");
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b", encode(&room));
    let (status, answer) = call(at(2), "GET", &path, None, None);
    assert_eq!((status, errcode(&answer)), (401, "M_MISSING_TOKEN"), "{answer}");
    let (status, answer) = call(at(3), "GET", &path, Some("syt_nonsense"), None);
    assert_eq!((status, errcode(&answer)), (401, "M_UNKNOWN_TOKEN"), "{answer}");

    // A member who left reads the history up to the leave, and nothing after it.
    bob.on(at(0)).leave(&room);
    let after = alice.on(at(1)).send(&room, "after", "after bob left");
    let mut latest = Value::Null;
    eventually("alice's message after the leave", Duration::from_secs(10), || {
        let (status, page) = messages(&alice.on(at(2)), &room, "dir=b&limit=1");
        latest = page;
        if status == 200 && event_ids(&latest["chunk"]) == [after.clone()] {
            Ok(())
        } else {
            Err(latest.to_string())
        }
    });
    let (status, page) = messages(&bob.on(at(2)), &room, "dir=b&limit=2");
    assert_eq!(status, 200, "{page}");
    let chunk = page["chunk"].as_array().expect("a chunk");
    assert_eq!(
        chunk.first().map(|event| (&event["type"], &event["state_key"])),
        Some((&json!("m.room.member"), &json!(bob.user_id))),
        "{page}"
    );
    assert_eq!(event_ids(&page["chunk"])[1], sent[MESSAGES - 1]);
}

/// A client's own events carry their transaction ID in its sync (and its
/// history), another member's do not; every section is present; the state
/// does not repeat what the timeline carries.
fn own_events_carry_their_transaction_id(urls: &[String]) {
    let at = |n: usize| urls[n % urls.len()].as_str();
    let dave = register(at(0), "dave");
    let erin = register(at(1), "erin");
    let room = dave.on(at(2)).create_room();
    erin.on(at(3)).join(&room);
    let topic_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", encode(&room));
    let (status, answer) = dave.on(at(0)).call("PUT", &topic_path, Some(&json!({"topic": "history"})));
    assert_eq!(status, 200, "{answer}");
    let topic = answer["event_id"].as_str().expect("an event_id").to_owned();
    let own = dave.on(at(1)).send(&room, "dave-txn-1", "mine");

    let timeline_event = |sync: &Value| {
        sync["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|event| event["event_id"] == json!(own))
            .cloned()
    };
    for (client, mine) in [(&dave, true), (&erin, false)] {
        for n in 0..urls.len() {
            let client = client.on(at(n));
            let mut sync = Value::Null;
            eventually("the message in the sync", Duration::from_secs(10), || {
                let (status, answer) = client.try_sync(None, Duration::ZERO, 2);
                sync = answer;
                if status == 200 && timeline_event(&sync).is_some() { Ok(()) } else { Err(sync.to_string()) }
            });
            let event = timeline_event(&sync).expect("the message");
            let txn_id = &event["unsigned"]["transaction_id"];
            if mine {
                assert_eq!(txn_id, &json!("dave-txn-1"), "{event}");
            } else {
                assert!(txn_id.is_null(), "another member's event carries its transaction ID: {event}");
            }

            // The sections clients expect, even empty.
            for (section, empty) in [
                ("account_data", json!({"events": []})),
                ("presence", json!({"events": []})),
                ("to_device", json!({"events": []})),
                ("device_lists", json!({"changed": [], "left": []})),
                ("device_one_time_keys_count", json!({})),
            ] {
                assert_eq!(sync[section], empty, "{section}: {sync}");
            }
            for section in ["join", "invite", "leave"] {
                assert!(sync["rooms"][section].is_object(), "rooms.{section}: {sync}");
            }

            // The timeline holds the topic and the message; the state holds
            // what came before them, and nothing the timeline carries.
            let entry = &sync["rooms"]["join"][&room];
            let timeline: BTreeSet<String> = event_ids(&entry["timeline"]["events"]).into_iter().collect();
            assert_eq!(timeline, [topic.clone(), own.clone()].into(), "{entry}");
            assert_eq!(entry["timeline"]["limited"], json!(true), "{entry}");
            let state = event_ids(&entry["state"]["events"]);
            assert!(state.iter().all(|id| !timeline.contains(id)), "state repeats the timeline: {entry}");
            let types: BTreeSet<&str> = entry["state"]["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|event| event["type"].as_str())
                .collect();
            assert!(types.contains("m.room.create") && types.contains("m.room.member"), "{entry}");
            assert!(!types.contains("m.room.topic"), "the topic is in the timeline: {entry}");
        }
    }

    // The same in the history.
    let (status, page) = messages(&dave.on(at(3)), &room, "dir=b&limit=1");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["chunk"][0]["unsigned"]["transaction_id"], json!("dave-txn-1"), "{page}");
    let (status, page) = messages(&erin.on(at(2)), &room, "dir=b&limit=1");
    assert_eq!(status, 200, "{page}");
    assert!(page["chunk"][0]["unsigned"]["transaction_id"].is_null(), "{page}");
}

/// Two writers persisting into one room at once (through the test-only
/// endpoint, as no client write does): paging back from a limited sync's
/// `prev_batch`, through each process in turn, yields every event once, in
/// stream order, however the writers' commits interleaved.
fn two_writers_in_one_room(urls: &[String], writers: [&str; 2]) {
    let grace = register(&urls[0], "grace");
    let room = grace.create_room();
    let threads: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(writer_idx, writer)| {
            let (writer, room, sender) = ((*writer).to_owned(), room.clone(), grace.user_id.clone());
            std::thread::spawn(move || {
                (0..MESSAGES / 2)
                    .map(|n| {
                        let event_id = format!("$w{writer_idx}-{n}");
                        let event = json!({
                            "event_id": event_id, "type": "m.room.message", "sender": sender,
                            "origin_server_ts": 1, "content": {"body": format!("{writer_idx}/{n}")},
                        });
                        let orderings = persist(&writer, &room, &[event]).expect("the writer persists");
                        (event_id, orderings[0])
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut persisted: Vec<(String, i64)> =
        threads.into_iter().flat_map(|thread| thread.join().expect("a writing thread")).collect();
    persisted.sort_by_key(|(_, ordering)| *ordering);
    let ordering_of: BTreeMap<String, i64> = persisted.iter().cloned().collect();

    let reader = grace.on(&urls[3]);
    let mut sync = Value::Null;
    eventually("both writers' events in a sync", Duration::from_secs(10), || {
        let (status, answer) = reader.try_sync(None, Duration::ZERO, 5);
        sync = answer;
        let newest = persisted.last().map(|(event_id, _)| event_id);
        if status == 200 && timeline_ids(&sync, "join", &room).last() == newest {
            Ok(())
        } else {
            Err(format!("{status} {sync}"))
        }
    });
    let timeline = &sync["rooms"]["join"][&room]["timeline"];
    let prev_batch = timeline["prev_batch"].as_str().expect("a prev_batch");
    let clients: Vec<Client> = urls.iter().map(|url| grace.on(url)).collect();
    let mut all = event_ids(&Value::Array(page_through(&clients, &room, "b", Some(prev_batch))));
    all.reverse();
    all.extend(timeline_ids(&sync, "join", &room));
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "an event twice: {all:?}");
    let messages: Vec<&String> = all.iter().filter(|event_id| ordering_of.contains_key(*event_id)).collect();
    let expected: Vec<&String> = persisted.iter().map(|(event_id, _)| event_id).collect();
    assert_eq!(messages, expected, "every persisted event once, in stream order");
    let forward = event_ids(&Value::Array(page_through(&clients, &room, "f", None)));
    assert_eq!(forward, all, "forwards, the same events in the same order");
}

fn monolith() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start(Binary::Master, &["--http-listen", "127.0.0.1:0"], dir.path());
    (dir, server)
}

#[test]
fn history_pages_back_to_the_creation_on_the_sqlite_monolith() {
    let (_dir, server) = monolith();
    page_back_to_the_creation(std::slice::from_ref(&server.base_url));
}

#[test]
fn own_events_carry_their_transaction_id_on_the_sqlite_monolith() {
    let (_dir, server) = monolith();
    own_events_carry_their_transaction_id(std::slice::from_ref(&server.base_url));
}

#[test]
fn history_transaction_ids_and_two_writers_on_four_processes() {
    let deployment = Deployment::for_clients();
    let servers = deployment.start_all();
    let urls = base_urls(&servers);
    page_back_to_the_creation(&urls);
    own_events_carry_their_transaction_id(&urls);
    two_writers_in_one_room(&urls, [&urls[1], &urls[2]]);
}
