//! Elastic writers: event and receipt writers added, drained and removed, and
//! added back while 4 clients send to 20 rooms through every process; only
//! the writer added or removed restarts (`tests::elastic` runs the scenario).
//! Every acknowledged event reaches every member's sync exactly once, in
//! stream order; tokens never go backwards, and a token from before each
//! change still works after it; no room is persisted by two writers at once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use ::tests::client::encode;
use ::tests::deployment::{Deployment, Transport, base_urls, eventually};
use ::tests::elastic::{
    Run, add_drain_and_readd, room_written_by, set_writers, try_set_writers, wait_settled, writers_status,
};
use ::tests::load::{CLIENTS, ROOMS, Setup, rows_of_events};

const EVENTS: usize = 2_000;

/// What every run must show besides exactly-once delivery.
fn changes_kept_every_promise(run: &Run) {
    run.outcome.check(&run.deployment.db.url);
    let urls = base_urls(&run.servers);
    // A token from before each change still works, on every process.
    for change in &run.changes {
        for url in &urls {
            let (status, answer) =
                run.setup.clients[0].on(url).try_sync(Some(&change.token_before), Duration::ZERO, 10);
            assert_eq!(status, 200, "a token from before `{}` on {url}: {answer}", change.label);
        }
    }
    // Each room changed writers at most once per change: never two at once.
    let mut writers_by_room: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for (_, ordering, room, writer) in rows_of_events(&run.deployment.db.url) {
        writers_by_room.entry(room).or_default().push((ordering, writer));
    }
    for (room, mut writers) in writers_by_room {
        writers.sort();
        let runs = 1 + writers.windows(2).filter(|pair| pair[0].1 != pair[1].1).count();
        assert!(
            runs <= run.changes.len() + 1,
            "{room} went between writers {runs} times in {} changes: {writers:?}",
            run.changes.len()
        );
    }
    // The deployment ends settled with both writers active, in order.
    let status = writers_status(&urls[0], "events");
    assert_eq!(status["settled"], Value::Bool(true), "{status}");
    let writers: Vec<&str> = status["writers"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, state)| *state == "active")
        .map(|(writer, _)| writer.as_str())
        .collect();
    assert_eq!(writers.len(), 2, "{status}");
}

#[test]
fn events_writers_are_added_drained_and_added_back_under_load() {
    events_writers_change_under_load(Transport::Redis);
}

#[test]
fn events_writers_are_added_drained_and_added_back_under_load_over_tcp() {
    events_writers_change_under_load(Transport::Tcp);
}

fn events_writers_change_under_load(transport: Transport) {
    let run = add_drain_and_readd(transport, EVENTS, false);
    changes_kept_every_promise(&run);
    // No client saw an error from a running process: a moved write was sent
    // again, not refused (a status 0 is a process stopped for the change).
    let refused: Vec<(u16, String)> = run
        .outcome
        .acknowledged
        .iter()
        .flat_map(|ack| ack.refusals.clone())
        .filter(|(status, _)| *status != 0)
        .collect();
    if !refused.is_empty() {
        let mut run = run;
        let logs: Vec<String> = run
            .servers
            .iter_mut()
            .flat_map(|server| {
                server
                    .stderr_tail(100_000)
                    .lines()
                    .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let stopped: Vec<&str> =
            run.stopped_logs.lines().filter(|line| line.contains("WARN") || line.contains("ERROR")).collect();
        panic!("refusals seen by clients: {refused:?}\n{}\n{}", logs.join("\n"), stopped.join("\n"));
    }
    // The processes counted the changes they applied.
    for server in &run.servers {
        let metrics = server.get("/metrics").1;
        assert!(
            ::tests::deployment::metric(&metrics, "homeserver_stream_writer_moves_total{stream=\"events\"}")
                >= 1.0,
            "{} counted the changes:\n{metrics}",
            server.base_url
        );
    }
}

#[test]
fn a_writer_killed_in_the_middle_of_its_handover_loses_nothing() {
    let run = add_drain_and_readd(Transport::Redis, EVENTS, true);
    changes_kept_every_promise(&run);
}

#[test]
fn the_admin_endpoint_refuses_what_cannot_be_a_stream_s_writers() {
    let deployment = Deployment::new(Transport::Redis, &["writer1"], &["writer1"]);
    let servers = deployment.start_all();
    let master = &servers[0].base_url;
    let refused = |stream: &str, writers: &[&str], why: &str| {
        let (status, answer) = try_set_writers(master, stream, writers);
        assert_eq!(status, 400, "{stream} {writers:?}: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{stream} {writers:?}: {message}");
    };
    refused("events", &[], "at least one writer");
    refused("events", &["writer1", "writer1"], "listed twice");
    refused("events", &["writer1", "nobody"], "`nobody` never started");
    refused("evnts", &["writer1"], "no such stream");
    refused("typing", &["master", "writer1"], "exactly one writer");
    // Without the secret, nothing.
    let (status, _) = ::tests::process::http_request(
        master,
        "PUT",
        "/admin/v1/stream_writers/events",
        Some("wrong"),
        Some(r#"{"writers": ["master"]}"#),
    )
    .expect("an answer");
    assert_eq!(status, 401);
    // A list equal to the current one changes nothing.
    assert_eq!(set_writers(master, "events", &["writer1"]), 1);
    let status = writers_status(master, "events");
    assert_eq!(status["epoch"], 1, "{status}");
    assert_eq!(status["writers"]["writer1"], "active", "{status}");
    // The operator's commands call the same endpoint.
    let shown = deployment.run_command("master", &["writers", "show", "events"]);
    assert!(shown.status.success(), "{}", shown.stderr);
    let shown: Value = serde_json::from_str(shown.stdout.trim()).expect("the answer as JSON");
    assert_eq!(shown["writers"]["writer1"], "active", "{shown}");
    let set = deployment.run_command("master", &["writers", "set", "events", "writer1", "master"]);
    assert!(set.status.success(), "{}", set.stderr);
    assert_eq!(set.stdout.trim(), r#"{"epoch":2}"#);
    wait_settled(master, "events", 2);
    let refused = deployment.run_command("master", &["writers", "set", "events", "ghost"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stderr.contains("`ghost` never started"), "{}", refused.stderr);
    // Only the master takes changes.
    let (status, answer) = try_set_writers(&servers[1].base_url, "events", &["master"]);
    assert_eq!(status, 400, "{answer}");
}

#[test]
fn receipts_writers_are_added_drained_and_added_back_under_load() {
    let deployment = Deployment::new(Transport::Redis, &["writer1", "writer2", "syncer"], &["writer1"]);
    let servers = deployment.start_all();
    let urls = base_urls(&servers);
    let setup = Setup::new(&urls);
    let targets: Vec<String> = setup
        .rooms
        .iter()
        .enumerate()
        .map(|(n, room)| setup.clients[0].on(&urls[3]).send(room, &format!("target-{n}"), "target"))
        .collect();
    let rooms = setup.rooms.clone();
    let receipts_targets = targets.clone();
    let sent = writes_while_writers_change(
        &setup,
        &urls,
        "receipts",
        &[&["master", "writer1"], &["writer1"], &["writer1", "writer2", "master"]],
        move |client, i| {
            let (room, target) = (&rooms[i % rooms.len()], &receipts_targets[i % rooms.len()]);
            let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", encode(room), encode(target));
            client.call("POST", &path, Some(&serde_json::json!({})))
        },
    );
    let total: usize = sent.iter().sum();
    assert!(sent.iter().all(|sent| *sent >= setup.rooms.len()), "the load ran: {sent:?} receipts");
    assert!(total > CLIENTS * setup.rooms.len());
    // Every process shows every user's receipt in every room.
    for url in &urls {
        eventually(&format!("every receipt in the sync of {url}"), Duration::from_secs(15), || {
            let sync = setup.clients[0].on(url).sync(None, Duration::ZERO);
            for (room, target) in setup.rooms.iter().zip(&targets) {
                let ephemeral = &sync["rooms"]["join"][room]["ephemeral"]["events"];
                let readers = ephemeral
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|event| event["content"][target]["m.read"].as_object())
                    .map(serde_json::Map::len)
                    .sum::<usize>();
                if readers != CLIENTS {
                    return Err(format!("{room}: {readers} readers of {target}: {ephemeral}"));
                }
            }
            Ok(())
        });
    }
    let status = writers_status(&urls[0], "receipts");
    assert_eq!(status["writers"]["writer1"], "active", "{status}");
    assert_eq!(status["writers"]["master"], "active", "{status}");
}

/// A room that moves keeps its checks and its client transactions: a
/// transaction the old writer persisted is answered with its event by the new
/// one, the new writer refuses a sender who is not in the room, and later
/// events follow the earlier ones.
#[test]
fn a_moved_room_keeps_its_transactions_and_its_checks() {
    let deployment = Deployment::new(Transport::Redis, &["writer1", "writer2"], &["writer1"]);
    let servers: Vec<::tests::process::Server> = ["master", "writer1", "writer2"]
        .iter()
        .map(|name| match *name {
            "writer2" => deployment.start_with_config(name, &deployment.minimal_config(name)),
            other => deployment.start(other),
        })
        .collect();
    let master = servers[0].base_url.clone();
    let ada = ::tests::client::register(&master, "ada");
    let eve = ::tests::client::register(&master, "eve");
    let room = room_written_by(&ada, &["writer1", "writer2"], "writer2");
    let first = ada.send(&room, "t1", "before the move");
    let epoch = set_writers(&master, "events", &["writer1", "writer2"]);
    wait_settled(&master, "events", epoch);

    // The same transaction, now on the new writer: the old writer's event.
    for url in base_urls(&servers) {
        let (status, answer) = ada.on(&url).try_send(&room, "t1", "before the move");
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["event_id"].as_str(), Some(first.as_str()), "through {url}");
    }
    // The new writer knows who is in the room.
    let (status, answer) = eve.try_send(&room, "e1", "not a member");
    assert_eq!(status, 403, "{answer}");
    let second = ada.send(&room, "t2", "after the move");
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10", encode(&room));
    let (status, page) = ada.call("GET", &path, None);
    assert_eq!(status, 200, "{page}");
    let ids: Vec<&str> =
        page["chunk"].as_array().into_iter().flatten().filter_map(|e| e["event_id"].as_str()).collect();
    let (at_second, at_first) =
        (ids.iter().position(|id| *id == second), ids.iter().position(|id| *id == first));
    assert!(matches!((at_second, at_first), (Some(s), Some(f)) if s < f), "newest first: {ids:?}");
    assert_eq!(ids.iter().filter(|id| **id == first).count(), 1, "{ids:?}");
}

/// A process that is alive but cannot record that it applied a change holds a
/// new writer back only until `[replication] handover_timeout_ms`; the
/// deployment is not settled until it records it, which it does once it can.
#[test]
fn a_process_that_cannot_record_a_change_holds_a_new_writer_back_only_until_the_timeout() {
    let mut deployment = Deployment::new(Transport::Redis, &["writer1", "writer2", "stuck"], &["writer1"]);
    let master = deployment.start("master");
    let role = ::tests::db_role::DbRole::create(&deployment.db.url);
    deployment.set_database_url("stuck", &role.url());
    let _writer1 = deployment.start("writer1");
    let _stuck = deployment.start("stuck");
    let quick = deployment
        .minimal_config("writer2")
        .replace("[replication]\n", "[replication]\nhandover_timeout_ms = 2000\n");
    let _writer2 = deployment.start_with_config("writer2", &quick);
    role.as_superuser(&format!("REVOKE INSERT, UPDATE ON stream_writer_acks FROM {}", role.name()));

    let started = std::time::Instant::now();
    let epoch = set_writers(&master.base_url, "events", &["writer1", "writer2"]);
    eventually("writer2 to join without `stuck`", Duration::from_secs(20), || {
        let status = writers_status(&master.base_url, "events");
        let joined = status["joining"].as_array().is_some_and(Vec::is_empty);
        if joined && status["behind"] == serde_json::json!(["stuck"]) {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
    assert!(started.elapsed() >= Duration::from_secs(2), "writer2 waited for `stuck` until the timeout");
    assert_eq!(writers_status(&master.base_url, "events")["settled"], false);
    let ada = ::tests::client::register(&master.base_url, "ada");
    let room = room_written_by(&ada, &["writer1", "writer2"], "writer2");
    ada.send(&room, "t1", "on the new writer");

    role.as_superuser(&format!("GRANT INSERT, UPDATE ON stream_writer_acks TO {}", role.name()));
    wait_settled(&master.base_url, "events", epoch);
}

/// Every user writes with `write(client, i)` in a loop, through each process
/// in turn, while the writers of `stream` go through `lists` (each change
/// settled before the next); every write must be answered 200. How many each
/// user made.
fn writes_while_writers_change(
    setup: &Setup,
    urls: &[String],
    stream: &str,
    lists: &[&[&str]],
    write: impl Fn(&::tests::client::Client, usize) -> (u16, Value) + Clone + Send + 'static,
) -> Vec<usize> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = setup
        .clients
        .iter()
        .enumerate()
        .map(|(n, client)| {
            let (client, urls, stop, write) =
                (client.clone(), urls.to_vec(), std::sync::Arc::clone(&stop), write.clone());
            std::thread::spawn(move || {
                let mut refused = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || i < ROOMS {
                    let (status, answer) = write(&client.on(&urls[(n + i) % urls.len()]), i);
                    if status != 200 {
                        refused.push((status, answer));
                    }
                    i += 1;
                }
                (refused, i)
            })
        })
        .collect();
    for list in lists {
        std::thread::sleep(Duration::from_millis(500));
        let epoch = set_writers(&urls[0], stream, list);
        wait_settled(&urls[0], stream, epoch);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writers
        .into_iter()
        .map(|writer| {
            let (refused, sent) = writer.join().expect("a writing thread");
            assert!(refused.is_empty(), "{stream} writes refused under the changes: {refused:?}");
            sent
        })
        .collect()
}

#[test]
fn account_data_writers_are_added_drained_and_added_back_under_load() {
    let deployment = Deployment::new(Transport::Redis, &["writer1", "writer2", "syncer"], &["writer1"]);
    let servers = deployment.start_all();
    let urls = base_urls(&servers);
    let setup = Setup::new(&urls);
    let sent = writes_while_writers_change(
        &setup,
        &urls,
        "account_data",
        &[&["master", "writer1"], &["writer1"], &["writer2", "writer1", "master"]],
        |client, i| {
            let path =
                format!("/_matrix/client/v3/user/{}/account_data/org.example.count", encode(&client.user_id));
            client.call("PUT", &path, Some(&serde_json::json!({ "count": i })))
        },
    );
    // Every process shows each user's last value.
    for url in &urls {
        for (client, sent) in setup.clients.iter().zip(&sent) {
            eventually(&format!("{}'s last value on {url}", client.user_id), Duration::from_secs(15), || {
                let sync = client.on(url).sync(None, Duration::ZERO);
                let count = sync["account_data"]["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|event| event["type"] == "org.example.count")
                    .map(|event| event["content"]["count"].clone());
                if count == Some(serde_json::json!(sent - 1)) { Ok(()) } else { Err(format!("{count:?}")) }
            });
        }
    }
}
