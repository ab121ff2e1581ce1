//! The flow of a new client, start to end, on the embedded SQLite monolith and
//! on four processes (each step through another process than the one before):
//! register through the user-interactive dance, log in on another process,
//! create a private room, invite, join, 50 messages, a sync that comes back
//! `limited`, `/messages` from its `prev_batch` back to the room's creation
//! yielding every message exactly once and in order, and logging out
//! everywhere.

use std::time::Duration;

use serde_json::{Value, json};

use tests::client::{Client, PASSWORD, call, encode, register};
use tests::deployment::{Deployment, base_urls, eventually};
use tests::process::{Binary, Server};

const MESSAGES: usize = 50;

fn log_in(base_url: &str, user: &str) -> Client {
    let body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": PASSWORD,
    });
    let (status, answer) = call(base_url, "POST", "/_matrix/client/v3/login", None, Some(&body));
    assert_eq!(status, 200, "login {user} on {base_url}: {answer}");
    assert!(answer["device_id"].is_string(), "{answer}");
    Client {
        base_url: base_url.to_owned(),
        user_id: answer["user_id"].as_str().expect("a user_id").to_owned(),
        token: answer["access_token"].as_str().expect("an access_token").to_owned(),
    }
}

fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .filter_map(|event| event["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

fn the_flow(urls: &[String]) {
    let at = |n: usize| urls[n % urls.len()].as_str();
    // Registration (the dance is the harness's `register`), then a login elsewhere.
    register(at(0), "ann");
    let ben_id = register(at(1), "ben").user_id;
    // By localpart, and by full user ID.
    let ann = log_in(at(2), "ann");
    let ben = log_in(at(3), &ben_id);

    // A private room; ben is invited, and joins through another process.
    let (status, created) =
        ann.on(at(0)).call("POST", "/_matrix/client/v3/createRoom", Some(&json!({"name": "ours"})));
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().expect("a room_id").to_owned();
    let room_path = |rest: &str| format!("/_matrix/client/v3/rooms/{}/{rest}", encode(&room));
    let (status, answer) =
        ann.on(at(1)).call("POST", &room_path("invite"), Some(&json!({"user_id": ben.user_id})));
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = ben.on(at(2)).call("POST", &room_path("join"), None);
    assert_eq!(status, 200, "{answer}");

    // 50 messages, each through the next process.
    let sent: Vec<String> = (0..MESSAGES).map(|n| format!("message {n}")).collect();
    for (n, body) in sent.iter().enumerate() {
        let sender = if n % 2 == 0 { &ann } else { &ben };
        let (status, answer) = sender.on(at(n)).call(
            "PUT",
            &room_path(&format!("send/m.room.message/t{n}")),
            Some(&json!({"body": body})),
        );
        assert_eq!(status, 200, "{answer}");
    }

    // A first sync on yet another process comes back limited, with a prev_batch.
    let filter = encode(&json!({"room": {"timeline": {"limit": 10}}}).to_string());
    let mut sync = Value::Null;
    eventually("ben's sync shows the last message", Duration::from_secs(5), || {
        let (status, answer) =
            ben.on(at(3)).call("GET", &format!("/_matrix/client/v3/sync?filter={filter}&timeout=0"), None);
        sync = answer;
        let timeline =
            sync["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        let last = bodies(&timeline).last().cloned();
        if status == 200 && last.as_deref() == Some(sent[MESSAGES - 1].as_str()) {
            Ok(())
        } else {
            Err(sync.to_string())
        }
    });
    let timeline = &sync["rooms"]["join"][&room]["timeline"];
    assert_eq!(timeline["limited"], json!(true), "{sync}");
    let mut seen = bodies(timeline["events"].as_array().expect("events"));
    let mut from = timeline["prev_batch"].as_str().expect("a prev_batch").to_owned();

    // /messages from the prev_batch back to the room's creation, through every process.
    let mut reached_creation = false;
    for page in 0..100 {
        let query = format!("dir=b&limit=7&from={}", encode(&from));
        let (status, answer) = ann.on(at(page)).call("GET", &room_path(&format!("messages?{query}")), None);
        assert_eq!(status, 200, "page {page}: {answer}");
        let chunk = answer["chunk"].as_array().cloned().unwrap_or_default();
        reached_creation |= chunk.iter().any(|event| event["type"] == "m.room.create");
        // Back: newest first; put them before what was already seen.
        let mut older = bodies(&chunk);
        older.reverse();
        older.extend(seen);
        seen = older;
        match answer["end"].as_str() {
            Some(end) => from = end.to_owned(),
            None => break,
        }
    }
    assert!(reached_creation, "paging back reaches the room's creation");
    assert_eq!(seen, sent, "every message once, in order");

    // Logging out everywhere ends every token, on every process.
    let (status, _) = ann.on(at(1)).call("POST", "/_matrix/client/v3/logout/all", None);
    assert_eq!(status, 200);
    for n in 0..urls.len() {
        eventually("ann's token is refused everywhere", Duration::from_secs(2), || {
            let (status, _) = ann.on(at(n)).call("GET", "/_matrix/client/v3/account/whoami", None);
            if status == 401 { Ok(()) } else { Err(format!("{} still takes it", at(n))) }
        });
    }
}

#[test]
fn a_first_client_on_the_sqlite_monolith() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start(Binary::Master, &["--http-listen", "127.0.0.1:0"], dir.path());
    the_flow(std::slice::from_ref(&server.base_url));
}

#[test]
fn a_first_client_on_four_processes() {
    let deployment = Deployment::for_clients();
    let servers = deployment.start_all();
    the_flow(&base_urls(&servers));
}

/// Writes forwarded over pooled keep-alive connections keep working when the
/// writer they go to restarts: the pool notices the closed connections, and
/// nothing reaches the writer twice.
#[test]
fn forwarded_writes_survive_the_writer_restarting() {
    let deployment = Deployment::for_clients();
    let mut servers = deployment.start_all();
    let urls = base_urls(&servers);
    let syncer = urls[3].clone();
    let ann = register(&syncer, "ann");
    let room = ann.create_room();
    let writer = tests::deployment::writer_for_room(&room, &["writer1", "writer2"]);
    let index = if writer == "writer1" { 1 } else { 2 };
    let send = |txn: &str| {
        ann.call(
            "PUT",
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", encode(&room)),
            Some(&json!({"body": txn})),
        )
    };
    // Several forwarded writes: the syncer now holds connections to the writer.
    for n in 0..5 {
        let (status, answer) = send(&format!("before{n}"));
        assert_eq!(status, 200, "{answer}");
    }
    let stopped = servers.remove(index).stop_with("TERM");
    assert!(stopped.status.success(), "{}", stopped.stderr);
    servers.insert(index, deployment.start(writer));
    for n in 0..5 {
        let (status, answer) = send(&format!("after{n}"));
        assert_eq!(status, 200, "a forwarded write after the restart: {answer}");
    }
    // Each write once: ten messages, each body once.
    let sync = ann.sync(None, Duration::ZERO);
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let mut messages = bodies(&timeline);
    messages.sort();
    let mut expected: Vec<String> =
        (0..5).flat_map(|n| [format!("after{n}"), format!("before{n}")]).collect();
    expected.sort();
    assert_eq!(messages, expected, "{sync}");
}

/// `config` with `[instance_map]` naming the master alone: the other
/// processes must be found through the addresses they record at start-up.
fn only_the_master_mapped(config: &str) -> String {
    let (head, map) = config.split_once("[instance_map]\n").expect("the deployment's configs map instances");
    let master: Vec<&str> = map.lines().filter(|line| line.starts_with("master =")).collect();
    format!("{head}[instance_map]\n{}\n", master.join("\n"))
}

/// Writers named in no one's `[instance_map]` are found by the addresses they
/// record in the database; one that restarts on another port is found there
/// again, and the first write after the move reaches it.
#[test]
fn writers_are_found_through_the_database() {
    let deployment = Deployment::for_clients();
    let names = ["master", "writer1", "writer2", "syncer"];
    let mut servers: Vec<Server> = names
        .iter()
        .map(|name| deployment.start_with_config(name, &only_the_master_mapped(&deployment.config(name))))
        .collect();
    the_flow(&base_urls(&servers));

    let syncer = base_urls(&servers)[3].clone();
    let bo = register(&syncer, "bo");
    let room = bo.create_room();
    let writer = tests::deployment::writer_for_room(&room, &["writer1", "writer2"]);
    let index = names.iter().position(|name| *name == writer).expect("a writer of the deployment");
    let send = |txn: &str| {
        bo.call(
            "PUT",
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", encode(&room)),
            Some(&json!({"body": txn})),
        )
    };
    let (status, answer) = send("before");
    assert_eq!(status, 200, "{answer}");
    let stopped = servers.remove(index).stop_with("TERM");
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let config = only_the_master_mapped(&deployment.config(writer));
    let old_listen =
        config.lines().find(|line| line.starts_with("listen = \"127.0.0.1:")).expect("a listener");
    let moved =
        config.replace(old_listen, &format!("listen = \"127.0.0.1:{}\"", tests::deployment::free_port()));
    servers.insert(index, deployment.start_with_config(writer, &moved));
    let (status, answer) = send("after");
    assert_eq!(status, 200, "the first write after the move: {answer}");
    let sync = bo.sync(None, Duration::ZERO);
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let messages = timeline.iter().filter_map(|event| event["content"]["body"].as_str()).collect::<Vec<_>>();
    assert_eq!(messages, ["before", "after"], "{sync}");
}
