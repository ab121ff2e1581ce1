//! `cargo xtask demo`: a four-process deployment started from nothing, two users
//! talking through it, and what each process saw, so that a newcomer sees the
//! whole system work in one command.
//!
//! The deployment is the one `docs/http.md` describes: the master (which writes
//! receipts and typing), two event writers that rooms are sharded over, and a
//! sync worker that writes nothing, replicating through Redis and sharing a
//! fresh PostgreSQL database. It is the end-to-end tests' [`Deployment`] of
//! `e2e-master` and `e2e-worker` (the `master` and `worker` entry points), but
//! driven as a client from outside: over plain HTTP, from what the processes
//! print and serve. Whatever happens, the processes are stopped and the
//! database is dropped before the demo exits.

use std::cell::Cell;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, format_err};
use serde_json::{Value, json};
use tests::client::encode;
use tests::deployment::{Deployment, Transport, metric, writer_for_room};
use tests::process::{self, Server, http_request};

/// The processes, in the order they start: the master first, since workers
/// refuse to start before it has recorded the deployment's writers.
/// The demo users' password.
const PASSWORD: &str = "correct horse battery staple";
const INSTANCES: [&str; 4] = ["master", "writer1", "writer2", "syncer"];
/// The `events` writers, in the order every config lists them: the order the
/// room hash picks from.
const EVENT_WRITERS: [&str; 2] = ["writer1", "writer2"];
/// How long a change made through one process may take to show on the others;
/// replication usually takes milliseconds.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);
const STDERR_TAIL_LINES: usize = 20;

/// Runs the demo; on failure prints `error: …` and the end of the failing
/// process's stderr, and exits non-zero once everything is cleaned up.
fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            if let Some((instance, tail)) = failure.stderr_tail {
                eprintln!("the last lines `{instance}` wrote to stderr:");
                for line in tail.lines() {
                    eprintln!("  {line}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// Why the demo stopped, and which process to look at.
struct Failure {
    error: anyhow::Error,
    /// The instance and the end of its stderr.
    stderr_tail: Option<(String, String)>,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure { error, stderr_tail: None }
    }
}

impl Failure {
    /// `instance` failed to start or stop, for the harness's `reason`.
    fn of_process(instance: &str, failure: process::Failure) -> Failure {
        let lines: Vec<&str> = failure.stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
        // A process that never ran has nothing to show.
        let stderr_tail = (!tail.is_empty()).then(|| (instance.to_owned(), tail));
        Failure { error: format_err!("`{instance}` {}", failure.reason), stderr_tail }
    }
}

#[expect(clippy::print_stdout, reason = "the demo's report is its output")]
fn demo() -> Result<(), Failure> {
    // Dropped last, with its database, after the processes using it have stopped.
    let mut deployment = Deployment::new(Transport::Redis, &INSTANCES[1..], &EVENT_WRITERS);
    // The Redis channel is named after the server: one per run.
    let server_name = format!("demo{}", std::process::id());
    deployment.set_server_name(&server_name);
    let database = database_name(&deployment.db.url).to_owned();
    let mut running = Running { servers: Vec::new(), last_contacted: Cell::new(0) };

    println!(
        "A deployment of four processes sharing PostgreSQL database `{database}`, replicating through Redis:"
    );
    for instance in INSTANCES {
        let server =
            deployment.try_start(instance).map_err(|failure| Failure::of_process(instance, failure))?;
        println!("  {instance:<8} {}  {}", server.base_url, role(instance));
        running.servers.push((instance, server));
    }

    if let Err(error) = converse(&running, &server_name) {
        return Err(running.blame(error));
    }

    while let Some((instance, mut server)) = running.servers.pop() {
        match server.try_stop_with("TERM") {
            Ok(finished) if finished.status.success() => {}
            Ok(finished) => {
                let failure = process::Failure {
                    reason: format!("exited with {} after SIGTERM", finished.status),
                    stderr: finished.stderr,
                };
                return Err(Failure::of_process(instance, failure));
            }
            Err(failure) => return Err(Failure::of_process(instance, failure)),
        }
    }
    drop(deployment);
    println!("\nStopped the four processes with SIGTERM (each exited cleanly) and dropped `{database}`.");
    Ok(())
}

/// The database's name: the last segment of its URL's path.
fn database_name(url: &str) -> &str {
    let path = url.split('?').next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// What `instance` does in the deployment, in words.
fn role(instance: &str) -> &'static str {
    match instance {
        "master" => "writes receipts and typing, as no worker is listed for them",
        "syncer" => "writes no room data: serves clients from what replication brings",
        _ => "writes events, for the rooms that hash to it",
    }
}

/// alice and bob, each request through another process, then what every process saw.
#[expect(clippy::print_stdout, reason = "the demo's report is its output")]
fn converse(deployment: &Running, server_name: &str) -> anyhow::Result<()> {
    println!("\nWhat the clients do, and through which process:");
    let step = |instance: &str, what: &str| println!("  {instance:<8} {what}");

    let alice = deployment.register("master", "alice")?;
    step("master", &format!("alice registers: {}", alice.user_id));
    let bob = deployment.register("writer1", "bob")?;
    step("writer1", &format!("bob registers: {}", bob.user_id));

    let persisted_before = persist_counts(deployment)?;
    let room = deployment.call(
        "master",
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&alice),
        Some(&json!({"preset": "public_chat"})),
    )?["room_id"]
        .as_str()
        .ok_or_else(|| format_err!("createRoom answered no room_id"))?
        .to_owned();
    let room_writer = writer_for_room(&room, &EVENT_WRITERS);
    step(
        "master",
        &format!("alice creates room {room}; its events go to {room_writer} (FNV-1a of the room ID)"),
    );
    let room_path = format!("/_matrix/client/v3/rooms/{}", encode(&room));
    deployment.call("writer2", "POST", &format!("{room_path}/join"), Some(&bob), None)?;
    step("writer2", "bob joins the room");

    let messages = [
        ("writer1", &alice, "Hi Bob, welcome to the room!"),
        ("syncer", &bob, "Thanks Alice. The syncer forwarded this to the room's writer."),
        ("writer2", &alice, "And every process will show both of us the same timeline."),
        ("master", &bob, "Let's check: the demo prints it from each one."),
    ];
    let mut message_ids = Vec::new();
    for (txn, (instance, user, text)) in messages.iter().enumerate() {
        let path = format!("{room_path}/send/m.room.message/demo{txn}");
        let body = json!({"msgtype": "m.text", "body": text});
        let answer = deployment.call(instance, "PUT", &path, Some(user), Some(&body))?;
        let event_id = answer["event_id"].as_str().ok_or_else(|| format_err!("send answered no event_id"))?;
        message_ids.push(event_id.to_owned());
        step(instance, &format!("{}: {text}", user.name));
    }
    let read_up_to = message_ids[2].clone();
    let receipt_path = format!("{room_path}/receipt/m.read/{}", encode(&read_up_to));
    deployment.call("syncer", "POST", &receipt_path, Some(&bob), Some(&json!({})))?;
    step("syncer", "bob marks alice's last message read (the receipt goes to master)");
    let typing_path = format!("{room_path}/typing/{}", encode(&alice.user_id));
    deployment.call(
        "writer2",
        "PUT",
        &typing_path,
        Some(&alice),
        Some(&json!({"typing": true, "timeout": 60_000})),
    )?;
    step("writer2", "alice starts typing (the typing goes to master)");

    println!("\nWhat each process shows, once replication has brought it everything:");
    let expected = Expected { message_ids, read_up_to, typing: alice.user_id.clone() };
    for instance in INSTANCES {
        let view = deployment.wait_for_view(instance, &room, &alice, &bob, &expected)?;
        println!("\n{instance}: {}", role(instance));
        view.print(server_name);
    }

    let persisted: Vec<u64> = persist_counts(deployment)?
        .iter()
        .zip(&persisted_before)
        .map(|(after, before)| after.saturating_sub(*before))
        .collect();
    let counts: Vec<String> = EVENT_WRITERS
        .iter()
        .zip(&persisted)
        .map(|(writer, count)| format!("{writer} committed {count}"))
        .collect();
    // createRoom (two events in one transaction), bob's join and four messages.
    let writes = 2 + messages.len() as u64;
    let expected: Vec<u64> =
        EVENT_WRITERS.iter().map(|writer| if *writer == room_writer { writes } else { 0 }).collect();
    if persisted != expected {
        bail!("the room's {writes} writes should all have gone to {room_writer}, but {}", counts.join(", "));
    }
    println!(
        "\nThe room's events were persisted by {room_writer} alone: of its {writes} writes, {} (`persist_events` transactions in each writer's /metrics).",
        counts.join(", ")
    );
    Ok(())
}

/// What every process must show before the demo prints its view.
struct Expected {
    message_ids: Vec<String>,
    read_up_to: String,
    typing: String,
}

/// The room as one process shows it to alice and bob.
struct View {
    alice_sync: Value,
    bob_sync: Value,
    room: String,
    joined: Vec<String>,
    /// `/admin/v1/streams` of the process.
    streams: Value,
}

impl View {
    fn room_of<'a>(&self, sync: &'a Value) -> &'a Value {
        &sync["rooms"]["join"][&self.room]
    }

    #[expect(clippy::print_stdout, reason = "the demo's report is its output")]
    fn print(&self, server_name: &str) {
        let short = |user_id: &str| {
            user_id.trim_start_matches('@').trim_end_matches(&format!(":{server_name}")).to_owned()
        };
        let alice_room = self.room_of(&self.alice_sync);
        let bob_room = self.room_of(&self.bob_sync);
        let events = alice_room["timeline"]["events"].as_array().cloned().unwrap_or_default();
        let same =
            event_ids(alice_room) == event_ids(bob_room) && alice_room["ephemeral"] == bob_room["ephemeral"];
        println!(
            "  {}: {} timeline events, next_batch {}",
            if same { "alice's and bob's syncs agree" } else { "alice's sync" },
            events.len(),
            self.alice_sync["next_batch"].as_str().unwrap_or("?"),
        );
        for event in &events {
            let sender = short(event["sender"].as_str().unwrap_or("?"));
            let text = match (event["type"].as_str(), event["content"]["membership"].as_str()) {
                (Some("m.room.create"), _) => "(creates the room)".to_owned(),
                (Some("m.room.member"), Some(membership)) => format!("({membership}s)"),
                (Some("m.room.message"), _) => event["content"]["body"].as_str().unwrap_or("").to_owned(),
                (event_type, _) => format!("({})", event_type.unwrap_or("?")),
            };
            println!("    {sender}: {text}");
        }
        for ephemeral in alice_room["ephemeral"]["events"].as_array().into_iter().flatten() {
            match ephemeral["type"].as_str() {
                Some("m.receipt") => {
                    for (event_id, by_type) in ephemeral["content"].as_object().into_iter().flatten() {
                        let body = events
                            .iter()
                            .find(|event| event["event_id"] == event_id.as_str())
                            .and_then(|event| event["content"]["body"].as_str())
                            .unwrap_or(event_id);
                        for user_id in
                            by_type["m.read"].as_object().into_iter().flatten().map(|(user, _)| user)
                        {
                            println!("  m.receipt: {} has read up to \"{body}\"", short(user_id));
                        }
                    }
                }
                Some("m.typing") => {
                    let typing: Vec<String> = ephemeral["content"]["user_ids"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|user_id| user_id.as_str().map(short))
                        .collect();
                    println!(
                        "  m.typing: {}",
                        match typing.len() {
                            0 => "nobody is typing".to_owned(),
                            1 => format!("{} is typing", typing[0]),
                            _ => format!("{} are typing", typing.join(", ")),
                        }
                    );
                }
                other => println!("  {}", other.unwrap_or("?")),
            }
        }
        if !same {
            println!("  bob's sync differs: {bob_room}");
        }
        let joined: Vec<String> = self.joined.iter().map(|user_id| short(user_id)).collect();
        println!("  joined_members: {}", joined.join(", "));
        let streams: Vec<String> = ["events", "receipts", "typing"]
            .iter()
            .map(|stream| {
                let writers: Vec<String> = self.streams["streams"][stream]["writers"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(writer, position)| format!("{writer} at {position}"))
                    .collect();
                format!("{stream}: {}", writers.join(", "))
            })
            .collect();
        println!("  positions here (/admin/v1/streams): {}", streams.join("; "));
    }
}

fn event_ids(room: &Value) -> Vec<&str> {
    room["timeline"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|event| event["event_id"].as_str())
        .collect()
}

/// How many transactions of `persist_events` each event writer has committed,
/// from its `/metrics`. Positions cannot tell who wrote: an idle writer's
/// position moves up with the others' so that it holds nobody back.
fn persist_counts(deployment: &Running) -> anyhow::Result<Vec<u64>> {
    EVENT_WRITERS
        .iter()
        .map(|writer| {
            let metrics = deployment.request(writer, "GET", "/metrics", None, None)?;
            // A count of transactions: a whole number, however Prometheus writes it.
            Ok(metric(&metrics, "homeserver_db_interactions_total{name=\"persist_events\"}") as u64)
        })
        .collect()
}

/// A registered user.
struct User {
    name: &'static str,
    user_id: String,
    token: String,
}

/// The running processes, by instance name; stopped with SIGTERM if dropped
/// (when the demo fails), so that it leaves no process behind.
struct Running {
    servers: Vec<(&'static str, Server)>,
    /// The index of the process the last request went to: the one to blame when
    /// a request fails.
    last_contacted: Cell<usize>,
}

impl Running {
    fn server(&self, instance: &str) -> anyhow::Result<(usize, &Server)> {
        self.servers
            .iter()
            .enumerate()
            .find(|(_, (name, _))| *name == instance)
            .map(|(idx, (_, server))| (idx, server))
            .ok_or_else(|| format_err!("no process `{instance}`"))
    }

    /// A request to `instance` that must answer 200 with JSON.
    fn call(
        &self,
        instance: &str,
        method: &str,
        path: &str,
        user: Option<&User>,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let answer = self.request(instance, method, path, user, body)?;
        serde_json::from_str(&answer)
            .with_context(|| format!("{method} {path} on {instance} answered something not JSON: {answer:?}"))
    }

    /// A request to `instance` that must answer 200: the body.
    fn request(
        &self,
        instance: &str,
        method: &str,
        path: &str,
        user: Option<&User>,
        body: Option<&Value>,
    ) -> anyhow::Result<String> {
        let (idx, server) = self.server(instance)?;
        self.last_contacted.set(idx);
        let body = body.map(Value::to_string);
        let bearer = user.map(|user| user.token.as_str());
        let (status, answer) = http_request(&server.base_url, method, path, bearer, body.as_deref())
            .with_context(|| format!("{method} {path} on {instance}"))?;
        if status != 200 {
            let json: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
            let who = user.map_or(String::new(), |user| format!("{}'s ", user.name));
            let why = match (json["errcode"].as_str(), json["error"].as_str()) {
                (Some(errcode), Some(error)) => format!("{errcode}: {error}"),
                _ if answer.is_empty() => "with no body".to_owned(),
                _ => answer,
            };
            bail!("{who}{method} {path} on {instance} answered {status} {why}");
        }
        Ok(answer)
    }

    fn register(&self, instance: &str, name: &'static str) -> anyhow::Result<User> {
        let answer = self.call(
            instance,
            "POST",
            "/_matrix/client/v3/register",
            None,
            // Registration's one auth stage, completed at once.
            Some(&json!({"username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy"}})),
        )?;
        let field = |key: &str| {
            answer[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format_err!("register answered no {key}: {answer}"))
        };
        Ok(User { name, user_id: field("user_id")?, token: field("access_token")? })
    }

    /// Syncs alice and bob on `instance` until it shows everything `expected`
    /// lists: writes taken by other processes arrive by replication.
    fn wait_for_view(
        &self,
        instance: &str,
        room: &str,
        alice: &User,
        bob: &User,
        expected: &Expected,
    ) -> anyhow::Result<View> {
        let filter = encode(&json!({"room": {"timeline": {"limit": 20}}}).to_string());
        let sync_path = format!("/_matrix/client/v3/sync?timeout=0&filter={filter}");
        let members_path = format!("/_matrix/client/v3/rooms/{}/joined_members", encode(room));
        let deadline = Instant::now() + VISIBLE_WITHIN;
        loop {
            let view = View {
                alice_sync: self.call(instance, "GET", &sync_path, Some(alice), None)?,
                bob_sync: self.call(instance, "GET", &sync_path, Some(bob), None)?,
                room: room.to_owned(),
                joined: self.call(instance, "GET", &members_path, Some(alice), None)?["joined"]
                    .as_object()
                    .map(|joined| joined.keys().cloned().collect())
                    .unwrap_or_default(),
                streams: self.call(instance, "GET", "/admin/v1/streams", None, None)?,
            };
            let missing = view.missing(expected, [&alice.user_id, &bob.user_id]);
            if missing.is_empty() {
                return Ok(view);
            }
            if Instant::now() > deadline {
                bail!("{instance} still lacks {} after {VISIBLE_WITHIN:?}", missing.join(", "));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Attaches to `error` the end of the stderr of the process to blame: one
    /// that exited, or else the one the last request went to.
    fn blame(&mut self, error: anyhow::Error) -> Failure {
        // A process that refused a connection may not have finished exiting yet.
        let deadline = Instant::now() + Duration::from_secs(1);
        let exited = loop {
            let exited = self.servers.iter_mut().position(|(_, server)| server.exit_status().is_some());
            if exited.is_some() || Instant::now() > deadline {
                break exited;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let idx = exited.unwrap_or(self.last_contacted.get());
        let Some((instance, server)) = self.servers.get_mut(idx) else { return Failure::from(error) };
        let error = match server.exit_status() {
            Some(status) => error.context(format!("`{instance}` exited ({status})")),
            None => error,
        };
        Failure { error, stderr_tail: Some(((*instance).to_owned(), server.stderr_tail(STDERR_TAIL_LINES))) }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // An operator's stop, as on success; the harness kills whatever
        // outlives it.
        while let Some((_, mut server)) = self.servers.pop() {
            let _ = server.try_stop_with("TERM");
        }
    }
}

impl View {
    /// What `expected` lists that is not in this view yet, in words.
    fn missing(&self, expected: &Expected, members: [&String; 2]) -> Vec<String> {
        let mut missing = Vec::new();
        for (user, sync) in [("alice", &self.alice_sync), ("bob", &self.bob_sync)] {
            let room = self.room_of(sync);
            let ids = event_ids(room);
            let absent = expected.message_ids.iter().filter(|id| !ids.contains(&id.as_str())).count();
            if absent > 0 {
                missing.push(format!("{absent} message(s) in {user}'s sync"));
            }
            let ephemeral = room["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
            let has_receipt = ephemeral.iter().any(|event| {
                event["type"] == "m.receipt"
                    && event["content"][&expected.read_up_to]["m.read"].get(members[1]).is_some()
            });
            if !has_receipt {
                missing.push(format!("bob's receipt in {user}'s sync"));
            }
            let has_typing = ephemeral.iter().any(|event| {
                event["type"] == "m.typing" && event["content"]["user_ids"] == json!([expected.typing])
            });
            if !has_typing {
                missing.push(format!("alice's typing in {user}'s sync"));
            }
        }
        if !members.iter().all(|member| self.joined.contains(member)) {
            missing.push(format!("both users in joined_members (it has {:?})", self.joined));
        }
        missing
    }
}
