//! Elastic writers under load: the scenario the `elastic` end-to-end tests
//! check and the `elastic` benchmark measures. A deployment of `master`,
//! `writer1`, `writer2` and `syncer` starts with `writer1` as the only writer
//! of a stream; while [`crate::load`] sends through every process, the
//! operator adds `writer2`, drains and removes `writer1`, then adds it back,
//! through the master's admin endpoint. Optionally a writer is killed
//! (`kill -9`) right after each change, in the middle of its handover.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::deployment::{Deployment, SECRET, Transport, base_urls, eventually};
use crate::load::{Load, Outcome, Setup};
use crate::process::{Server, http_request};

/// The processes, in the order of [`Deployment::start_all`].
pub const NAMES: [&str; 4] = ["master", "writer1", "writer2", "syncer"];
const MASTER: usize = 0;
const WRITER1: usize = 1;
const WRITER2: usize = 2;

/// How long a change may take to settle.
const SETTLE: Duration = Duration::from_secs(60);

/// `PUT /admin/v1/stream_writers/{stream}` on the master: the status and answer.
pub fn try_set_writers(master: &str, stream: &str, writers: &[&str]) -> (u16, Value) {
    let body = json!({ "writers": writers }).to_string();
    let path = format!("/admin/v1/stream_writers/{stream}");
    let (status, answer) = http_request(master, "PUT", &path, Some(SECRET), Some(&body))
        .unwrap_or_else(|err| panic!("PUT {path}: {err}"));
    (status, serde_json::from_str(&answer).unwrap_or(Value::Null))
}

/// Makes `writers` the stream's writers; the new epoch.
pub fn set_writers(master: &str, stream: &str, writers: &[&str]) -> i64 {
    let (status, answer) = try_set_writers(master, stream, writers);
    assert_eq!(status, 202, "PUT the writers of {stream} {writers:?}: {answer}");
    answer["epoch"].as_i64().expect("an epoch")
}

/// `GET /admin/v1/stream_writers/{stream}` on the master.
pub fn writers_status(master: &str, stream: &str) -> Value {
    let path = format!("/admin/v1/stream_writers/{stream}");
    let (status, answer) = http_request(master, "GET", &path, Some(SECRET), None)
        .unwrap_or_else(|err| panic!("GET {path}: {err}"));
    assert_eq!(status, 200, "GET {path}: {answer}");
    serde_json::from_str(&answer).expect("JSON")
}

/// Waits until the deployment settled on `epoch` of `stream`.
pub fn wait_settled(master: &str, stream: &str, epoch: i64) {
    eventually(&format!("the deployment to settle on epoch {epoch} of {stream}"), SETTLE, || {
        let status = writers_status(master, stream);
        if status["epoch"].as_i64() == Some(epoch) && status["settled"] == Value::Bool(true) {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
}

/// One change of writers during the run.
#[derive(Debug, Clone)]
pub struct Change {
    /// What changed.
    pub label: String,
    /// The active writers before and after.
    pub from: Vec<String>,
    /// After.
    pub to: Vec<String>,
    /// When the `PUT` was sent.
    pub at: Instant,
    /// Until the deployment settled.
    pub settled_after: Duration,
    /// `user0`'s sync token just before the change.
    pub token_before: String,
}

/// A finished run.
#[derive(Debug)]
pub struct Run {
    /// The deployment (its database, for the checks).
    pub deployment: Deployment,
    /// Its processes, all running, in the order of [`NAMES`].
    pub servers: Vec<Server>,
    /// The users and rooms.
    pub setup: Setup,
    /// What the load came to.
    pub outcome: Outcome,
    /// The changes, in order.
    pub changes: Vec<Change>,
    /// What the processes stopped or killed during the run wrote to stderr.
    pub stopped_logs: String,
}

/// Runs the scenario on the `events` stream with `events` sends over
/// `transport`, killing the writer each change concerns right after it when
/// `kill` is set.
pub fn add_drain_and_readd(transport: Transport, events: usize, kill: bool) -> Run {
    let deployment = Deployment::new(transport, &NAMES[1..], &["writer1"]);
    // `writer2` starts as a new writer would: the master's address, the
    // secret and the database, nothing else.
    let start = |name: &str| match name {
        "writer2" => deployment.start_with_config(name, &deployment.minimal_config(name)),
        _ => deployment.start(name),
    };
    let mut servers: Vec<Server> = NAMES.iter().map(|name| start(name)).collect();
    let urls = base_urls(&servers);
    let setup = Setup::new(&urls);
    // Syncs go to the processes that stay up; sends go everywhere, to the
    // next process while one is down.
    let sync_urls = vec![urls[MASTER].clone(), urls[3].clone()];
    let load = Load::start(&setup, &urls, &sync_urls, events);
    let master = urls[MASTER].clone();
    let mut changes = Vec::new();
    let mut stopped_logs = String::new();
    let steps: [(&str, &[&str], &[&str], usize); 3] = [
        ("add writer2", &["writer1"], &["writer1", "writer2"], WRITER2),
        ("drain writer1", &["writer1", "writer2"], &["writer2"], WRITER1),
        ("add writer1 back", &["writer2"], &["writer2", "writer1"], WRITER1),
    ];
    for (step, (label, from, to, concerned)) in steps.into_iter().enumerate() {
        load.wait_until_sent(events * (step + 1) / 5);
        let token_before = setup.token(&master);
        let at = Instant::now();
        let epoch = set_writers(&master, "events", to);
        if kill && step < 2 {
            // In the middle of its handover: the writer joining, then the one draining.
            let killed = servers.remove(concerned).stop_with("KILL");
            assert!(!killed.status.success(), "kill -9 ends {}", NAMES[concerned]);
            stopped_logs.push_str(&killed.stderr);
            std::thread::sleep(Duration::from_millis(300));
            servers.insert(concerned, start(NAMES[concerned]));
        }
        wait_settled(&master, "events", epoch);
        let settled_after = at.elapsed();
        if step == 1 && !kill {
            // Drained: the operator removes it, and it is retired once every
            // process applied its final position.
            let stopped = servers.remove(WRITER1).stop_with("TERM");
            assert!(stopped.status.success(), "writer1 stops cleanly: {}", stopped.stderr);
            stopped_logs.push_str(&stopped.stderr);
            eventually("writer1 to be retired", SETTLE, || {
                let status = writers_status(&master, "events");
                if status["writers"]["writer1"] == "retired" { Ok(()) } else { Err(status.to_string()) }
            });
            servers.insert(WRITER1, deployment.start("writer1"));
        }
        changes.push(Change {
            label: label.to_owned(),
            from: from.iter().map(|w| (*w).to_owned()).collect(),
            to: to.iter().map(|w| (*w).to_owned()).collect(),
            at,
            settled_after,
            token_before,
        });
    }
    let outcome = load.finish();
    Run { deployment, servers, setup, outcome, changes, stopped_logs }
}

/// A room `client` creates that `to` gives to `writer` (one of the first 40
/// it tries: each writer of two gets about half).
pub fn room_written_by(client: &crate::client::Client, to: &[&str], writer: &str) -> String {
    std::iter::repeat_with(|| client.create_room())
        .take(40)
        .find(|room| store_core::writer_for_shard(room, to).copied() == Some(writer))
        .unwrap_or_else(|| panic!("none of 40 rooms is {writer}'s among {to:?}"))
}

/// The rooms whose writer differs between `from` and `to`.
pub fn moved_rooms<'a>(rooms: &'a [String], from: &[String], to: &[String]) -> Vec<&'a String> {
    rooms
        .iter()
        .filter(|room| store_core::writer_for_shard(room, from) != store_core::writer_for_shard(room, to))
        .collect()
}

/// The `q` quantile (0..=1) of `values`, which it sorts.
pub fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index.min(values.len() - 1)]
}

/// What a run's figures are: per moved room, how long after the change the
/// first send to it that started after the change was acknowledged; the
/// latencies of sends started while a change settled, and of the others
/// (both without the sends that first reached a process that was down).
#[derive(Debug, Default)]
pub struct Figures {
    /// Per change and moved room.
    pub handovers: Vec<Duration>,
    /// Sends started while a change was settling.
    pub during: Vec<Duration>,
    /// The other sends.
    pub steady: Vec<Duration>,
    /// Sends left out of both: first sent to a process that was down.
    pub through_a_stopped_process: usize,
}

impl Figures {
    /// The figures of `run`.
    pub fn of(run: &Run) -> Figures {
        let mut figures = Figures::default();
        for change in &run.changes {
            for room in moved_rooms(&run.setup.rooms, &change.from, &change.to) {
                let first = run
                    .outcome
                    .acknowledged
                    .iter()
                    .filter(|ack| &ack.room == room && ack.started >= change.at)
                    .map(|ack| ack.started + ack.took)
                    .min();
                if let Some(done) = first {
                    figures.handovers.push(done - change.at);
                }
            }
        }
        for ack in &run.outcome.acknowledged {
            if ack.refusals.iter().any(|(status, _)| *status == 0) {
                // Sent first to a process stopped or killed: the client's
                // retry elsewhere, not the change, is what it measures.
                figures.through_a_stopped_process += 1;
                continue;
            }
            let changing = run
                .changes
                .iter()
                .any(|change| ack.started >= change.at && ack.started <= change.at + change.settled_after);
            if changing { figures.during.push(ack.took) } else { figures.steady.push(ack.took) }
        }
        figures
    }
}
