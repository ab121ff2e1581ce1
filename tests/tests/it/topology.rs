//! The multi-process topology end to end: a master, event writers and
//! followers as separate processes on one PostgreSQL database, replicating over
//! Redis or TCP.
//!
//! Events are written through the writers' internal endpoint
//! (`POST /_synapse/replication/persist_events`); what each process knows is read
//! from `/admin/v1/streams`, `/metrics` and its cached room state.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use tests::deployment::{
    Deployment, REDIS, Transport, events_stream, eventually, join, joined_members, knows_final_positions,
    metric, own_position, persist, recorded_position,
};

fn users(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|index| format!("@{prefix}{index}:e2e")).collect()
}

fn two_writers_and_a_follower(transport: Transport) {
    let deployment =
        Deployment::new(transport, &["persister1", "persister2", "worker1"], &["persister1", "persister2"]);
    let _master = deployment.start("master");
    let persister1 = deployment.start("persister1");
    let persister2 = deployment.start("persister2");
    let follower = deployment.start("worker1");

    // Filled before the writes: the caches must be invalidated by replication.
    for process in [&follower, &persister1, &persister2] {
        for room in ["!a:e2e", "!b:e2e", "!c:e2e"] {
            assert!(joined_members(process, room).is_empty());
        }
    }
    let (a_users, b_users, c_users) = (users("a", 5), users("b", 5), users("c", 6));
    for (index, user) in a_users.iter().enumerate() {
        persist(&persister1.base_url, "!a:e2e", &[join(user)]).expect("persister1 writes room a");
        persist(&persister2.base_url, "!b:e2e", &[join(&b_users[index])]).expect("persister2 writes room b");
    }
    // One room written by both writers.
    for (index, user) in c_users.iter().enumerate() {
        let writer = if index % 2 == 0 { &persister1 } else { &persister2 };
        persist(&writer.base_url, "!c:e2e", &[join(user)]).expect("both write room c");
    }

    eventually("the follower to reach both writers' final positions", Duration::from_secs(15), || {
        knows_final_positions(&follower, &[("persister1", &persister1), ("persister2", &persister2)])
    });
    let set = |users: &[String]| users.iter().cloned().collect::<BTreeSet<String>>();
    assert_eq!(joined_members(&follower, "!a:e2e"), set(&a_users));
    assert_eq!(joined_members(&follower, "!b:e2e"), set(&b_users));
    assert_eq!(joined_members(&follower, "!c:e2e"), set(&c_users));
    // Each writer follows the other too.
    eventually("each writer to know the other's final position", Duration::from_secs(15), || {
        knows_final_positions(&persister1, &[("persister2", &persister2)])?;
        knows_final_positions(&persister2, &[("persister1", &persister1)])
    });
    assert_eq!(joined_members(&persister2, "!a:e2e"), set(&a_users));
    assert_eq!(joined_members(&persister1, "!b:e2e"), set(&b_users));

    let metrics = follower.get("/metrics").1;
    assert!(
        metrics.contains("homeserver_stream_writer_position{stream=\"events\",writer=\"persister1\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("homeserver_cache_hits_total{cache=\"get_users_in_room\"}"), "{metrics}");
}

#[test]
fn a_follower_follows_two_event_writers_over_redis() {
    two_writers_and_a_follower(Transport::Redis);
}

#[test]
fn a_follower_follows_two_event_writers_over_tcp() {
    two_writers_and_a_follower(Transport::Tcp);
}

#[test]
fn a_late_follower_catches_up_on_10000_events_from_the_database() {
    let deployment = Deployment::new(Transport::Redis, &["persister1", "worker1"], &["persister1"]);
    let _master = deployment.start("master");
    let persister = deployment.start("persister1");
    let mut members = BTreeSet::new();
    for batch in 0..100 {
        let room = format!("!room{}:e2e", batch % 10);
        let events: Vec<Value> = (0..100)
            .map(|index| {
                let user = format!("@u{batch}-{index}:e2e");
                if batch % 10 == 3 {
                    members.insert(user.clone());
                }
                join(&user)
            })
            .collect();
        persist(&persister.base_url, &room, &events).expect("persist a batch");
    }

    let follower = deployment.start("worker1");
    eventually("the late follower to reach the writer", Duration::from_secs(30), || {
        knows_final_positions(&follower, &[("persister1", &persister)])
    });
    assert_eq!(
        events_stream(&follower)["current_token"],
        events_stream(&persister)["current_token"],
        "the follower's token matches the writer's"
    );
    assert_eq!(joined_members(&follower, "!room3:e2e"), members);
    let metrics = follower.get("/metrics").1;
    assert_eq!(
        metric(&metrics, "homeserver_replication_commands_received_total{command=\"RDATA\"}"),
        0.0,
        "no backlog of rows was sent: {metrics}"
    );

    // While it follows: batches bigger than one poll's worth of RDATA arrive as
    // a POSITION past a gap, which the follower reads from the database.
    let cached_before = joined_members(&follower, "!room7:e2e");
    let mut more = Vec::new();
    for batch in 0..5 {
        let events: Vec<Value> = (0..200).map(|index| join(&format!("@late{batch}-{index}:e2e"))).collect();
        more.extend(events.iter().filter_map(|event| event["state_key"].as_str().map(str::to_owned)));
        persist(&persister.base_url, "!room7:e2e", &events).expect("persist a big batch");
    }
    eventually("the follower to catch up on the big batches", Duration::from_secs(30), || {
        knows_final_positions(&follower, &[("persister1", &persister)])
    });
    let metrics = follower.get("/metrics").1;
    assert!(metric(&metrics, "homeserver_replication_catch_up_fetches_total") >= 1.0, "{metrics}");
    let members = joined_members(&follower, "!room7:e2e");
    assert!(more.iter().all(|user| members.contains(user)), "every late join is visible");
    assert_eq!(members.len(), cached_before.len() + more.len());
}

/// Keeps persisting single joins into `room` on `base_url` until `stop`,
/// returning the stream orderings acknowledged and the users they joined.
fn write_until(
    base_url: String,
    room: &'static str,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> Vec<(i64, String)> {
    let mut acknowledged = Vec::new();
    let mut index = 0;
    while !stop.load(Ordering::Relaxed) {
        let user = format!("@{prefix}{index}:e2e");
        index += 1;
        match persist(&base_url, room, &[join(&user)]) {
            Ok(orderings) => {
                acknowledged.extend(orderings.into_iter().map(|ordering| (ordering, user.clone())))
            }
            // Killed under us: what was not acknowledged may or may not exist.
            Err(_) => break,
        }
    }
    acknowledged
}

#[test]
fn a_writer_killed_while_persisting_resumes_without_reusing_ids() {
    let deployment = Deployment::new(Transport::Redis, &["persister1", "worker1"], &["persister1"]);
    let _master = deployment.start("master");
    let persister = deployment.start("persister1");
    let follower = deployment.start("worker1");
    assert!(joined_members(&follower, "!kill:e2e").is_empty(), "cached before the writes");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base_url, stop) = (persister.base_url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || write_until(base_url, "!kill:e2e", "before".to_owned(), stop))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let killed = persister.stop_with("KILL");
    assert!(!killed.status.success(), "kill -9 ends the writer");
    let before = writer.join().expect("the writing thread");
    assert!(before.len() > 10, "the writer persisted a while before the kill: {}", before.len());
    let highest_before = before.iter().map(|(ordering, _)| *ordering).max().unwrap_or(0);

    let persister = deployment.start("persister1");
    assert!(
        own_position(&persister) >= highest_before,
        "the restarted writer resumes at or past every acknowledged write ({highest_before})"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base_url, stop) = (persister.base_url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || write_until(base_url, "!kill:e2e", "after".to_owned(), stop))
    };
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let after = writer.join().expect("the writing thread");
    assert!(!after.is_empty(), "the restarted writer persists");

    let orderings: Vec<i64> = before.iter().chain(&after).map(|(ordering, _)| *ordering).collect();
    let distinct: BTreeSet<i64> = orderings.iter().copied().collect();
    assert_eq!(distinct.len(), orderings.len(), "no stream ordering was handed out twice");
    assert!(
        after.iter().all(|(ordering, _)| *ordering > highest_before),
        "IDs after the restart lie above every ID from before it"
    );

    eventually(
        "the follower to reach the restarted writer's final position",
        Duration::from_secs(15),
        || knows_final_positions(&follower, &[("persister1", &persister)]),
    );
    let members = joined_members(&follower, "!kill:e2e");
    for (_, user) in before.iter().chain(&after) {
        assert!(members.contains(user), "acknowledged join of {user} is visible on the follower");
    }
}

#[test]
fn an_idle_writer_never_holds_the_stream_back() {
    let deployment = Deployment::new(
        Transport::Redis,
        &["persister1", "persister2", "worker1"],
        &["persister1", "persister2"],
    );
    let master = deployment.start("master");
    let busy = deployment.start("persister1");
    let idle = deployment.start("persister2");
    let follower = deployment.start("worker1");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base_url, stop) = (busy.base_url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || write_until(base_url, "!busy:e2e", "busy".to_owned(), stop))
    };
    // (when, the busy writer's position then)
    let mut busy_positions: Vec<(Instant, i64)> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let now = Instant::now();
        busy_positions.push((now, own_position(&busy)));
        for (name, process) in [("master", &master), ("persister2", &idle), ("worker1", &follower)] {
            let token = events_stream(process)["current_token"].as_i64().expect("a current token");
            // The busy writer's position as of one second ago.
            let a_second_ago = busy_positions
                .iter()
                .rev()
                .find(|(when, _)| now.duration_since(*when) >= Duration::from_secs(1))
                .map(|(_, position)| *position);
            if let Some(required) = a_second_ago {
                assert!(
                    token >= required,
                    "{name}'s events token {token} trails the busy writer's position of a second ago, {required}"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    assert!(!writer.join().expect("the writing thread").is_empty(), "the busy writer wrote");
}

#[test]
fn unknown_writers_and_an_unreachable_redis_refuse_to_start_and_other_writers_are_overruled() {
    let deployment =
        Deployment::new(Transport::Redis, &["persister1", "persister2"], &["persister1", "persister2"]);
    let _master = deployment.start("master");

    let one_line = |finished: &tests::process::Finished, expected: &str| {
        assert_eq!(finished.status.code(), Some(1), "stderr:\n{}", finished.stderr);
        let lines: Vec<&str> = finished.stderr.lines().filter(|line| !line.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line on stderr, got:\n{}", finished.stderr);
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(expected),
            "{:?} lacks {expected:?}",
            lines[0]
        );
    };

    // persister1 thinks it writes events alone; the deployment's record says
    // otherwise, and it goes by the record.
    let conflicting = deployment.config_with_writers("persister1", &["persister1".to_owned()]);
    let mut persister1 = deployment.start_with_config("persister1", &conflicting);
    let events = tests::deployment::events_stream(&persister1);
    assert_eq!(events["writer_states"]["persister2"], "active", "{events}");
    assert!(persister1.stderr_tail(10_000).contains("differs from the deployment's writers"));
    drop(persister1);

    let config = deployment.config_with_writers("persister2", &deployment.event_writers);
    let unknown = config.replace("[stream_writers]\n", "[stream_writers]\nevnts = [\"persister2\"]\n");
    one_line(&deployment.fail_to_start("persister2", &unknown), "`[stream_writers] evnts`: no such stream");

    let unreachable = config.replace(REDIS, "redis://127.0.0.1:1");
    one_line(
        &deployment.fail_to_start("persister2", &unreachable),
        "`[replication] redis`: Redis at 127.0.0.1:1",
    );
}

#[test]
fn a_stopped_writer_records_its_final_position_and_says_goodbye() {
    let deployment = Deployment::new(Transport::Redis, &["persister1"], &["persister1"]);
    let master = deployment.start("master");
    let persister = deployment.start("persister1");
    let mut acknowledged = Vec::new();
    for index in 0..20 {
        acknowledged.extend(
            persist(&persister.base_url, "!bye:e2e", &[join(&format!("@u{index}:e2e"))]).expect("persist"),
        );
    }
    let final_position = acknowledged.iter().copied().max().expect("writes were acknowledged");
    // At once after the last write: by its exit the writer has recorded it,
    // whether its background recorder got there first or its shutdown's flush
    // did (store-core's tests show the flush alone suffices).
    let stopped = persister.stop_with("TERM");
    assert!(stopped.status.success(), "a clean exit; stderr:\n{}", stopped.stderr);
    assert_eq!(
        recorded_position(&deployment.db.url, "events", "persister1"),
        Some(final_position),
        "the writer recorded its final position before exiting"
    );
    eventually("the master to hear the goodbye", Duration::from_secs(5), || {
        let metrics = master.get("/metrics").1;
        let goodbyes =
            metric(&metrics, "homeserver_replication_commands_received_total{command=\"CLEAR_USER_SYNC\"}");
        if goodbyes >= 1.0 { Ok(()) } else { Err(format!("no CLEAR_USER_SYNC counted:\n{metrics}")) }
    });
}
