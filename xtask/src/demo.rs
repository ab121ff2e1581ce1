//! `cargo xtask demo`: a four-process deployment started from nothing, two users
//! talking through it, and what each process saw, so that a newcomer sees the
//! whole system work in one command.
//!
//! The deployment is the one `docs/http.md` describes: the master (which writes
//! receipts and typing), two event writers that rooms are sharded over, and a
//! sync worker that writes nothing, replicating through Redis and sharing a
//! fresh PostgreSQL database. Whatever happens, the processes are stopped and
//! the database is dropped before the demo exits.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, format_err};
use serde_json::{Value, json};
use xshell::{Shell, cmd};

use crate::{POSTGRES_ADDRESS, REDIS_ADDRESS};

/// The processes, in the order they start: the master first, since workers
/// refuse to start before it has recorded the deployment's writers.
const INSTANCES: [&str; 4] = ["master", "writer1", "writer2", "syncer"];
/// The `events` writers, in the order every config lists them: the order the
/// room hash picks from.
const EVENT_WRITERS: [&str; 2] = ["writer1", "writer2"];
const SECRET: &str = "demo shared secret";
/// How long a process may take to start, to stop, or to answer a request.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a change made through one process may take to show on the others;
/// replication usually takes milliseconds.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);
const STDERR_TAIL_LINES: usize = 20;

/// Runs the demo; on failure prints `error: …` and the end of the failing
/// process's stderr, and exits non-zero once everything is cleaned up.
pub(crate) fn run(sh: &Shell) -> anyhow::Result<()> {
    match demo(sh) {
        Ok(()) => Ok(()),
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            if let Some((instance, tail)) = failure.stderr_tail {
                eprintln!("the last lines `{instance}` wrote to stderr:");
                for line in tail.lines() {
                    eprintln!("  {line}");
                }
            }
            std::process::exit(1)
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

#[expect(clippy::print_stdout, reason = "the demo's report is its output")]
fn demo(sh: &Shell) -> Result<(), Failure> {
    crate::services(sh)?;
    eprintln!("xtask: building `master` and `worker` (dev profile: quick to build, fast enough for a demo)");
    cmd!(sh, "cargo build --quiet --bin master --bin worker").run().context("build the binaries")?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::project_root().join("target"), PathBuf::from);
    let binaries = target_dir.join("debug");

    drop_abandoned_databases()?;
    // Dropped last, after the processes using it have stopped.
    let db = DemoDatabase::create()?;
    let dir = TempDir::create()?;
    // The Redis channel is named after the server: one per run.
    let server_name = format!("demo{}", std::process::id());
    let ports = free_ports(INSTANCES.len())?;
    let mut deployment = Deployment { processes: Vec::new(), last_contacted: Cell::new(0) };

    println!(
        "A deployment of four processes sharing PostgreSQL database `{}`, replicating through Redis:",
        db.name
    );
    for instance in INSTANCES {
        let config = config(instance, &server_name, &db.url(), &ports);
        let path = dir.path.join(format!("{instance}.toml"));
        std::fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
        let binary = binaries.join(if instance == "master" { "master" } else { "worker" });
        let process = Process::start(instance, &binary, &path)?;
        println!("  {instance:<8} {}  {}", process.base_url, role(instance));
        deployment.processes.push(process);
    }

    if let Err(error) = converse(&deployment, &server_name) {
        return Err(deployment.blame(error));
    }

    for process in deployment.processes.drain(..).rev() {
        process.stop()?;
    }
    let name = db.name.clone();
    db.drop_now()?;
    println!("\nStopped the four processes with SIGTERM (each exited cleanly) and dropped `{name}`.");
    Ok(())
}

/// What `instance` does in the deployment, in words.
fn role(instance: &str) -> &'static str {
    match instance {
        "master" => "writes receipts and typing, as no worker is listed for them",
        "syncer" => "writes no room data: serves clients from what replication brings",
        _ => "writes events, for the rooms that hash to it",
    }
}

/// The config of `instance`: every process lists the same writers and knows
/// every address, since any of them may forward a client's write to a writer.
fn config(instance: &str, server_name: &str, database_url: &str, ports: &[u16]) -> String {
    let port = INSTANCES.iter().zip(ports).find(|(name, _)| **name == instance).map_or(0, |(_, port)| *port);
    let writers: Vec<String> = EVENT_WRITERS.iter().map(|writer| format!("\"{writer}\"")).collect();
    let map: Vec<String> =
        INSTANCES.iter().zip(ports).map(|(name, port)| format!("{name} = \"127.0.0.1:{port}\"")).collect();
    format!(
        "server_name = \"{server_name}\"\ninstance_name = \"{instance}\"\nworker_replication_secret = \"{SECRET}\"\n\n\
         [database]\nurl = \"{database_url}\"\npool_size = 4\n\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [replication]\nredis = \"redis://{REDIS_ADDRESS}\"\n\n\
         [stream_writers]\nevents = [{}]\n\n\
         [instance_map]\n{}\n",
        writers.join(", "),
        map.join("\n"),
    )
}

/// Ports for the HTTP listeners, below Linux's ephemeral range (32768 and up)
/// where outgoing connections take their local ports, so that a port found free
/// stays free until its process binds it; and below the window the end-to-end
/// tests use (20000 and up), so the demo can run beside them.
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let start = 18_000 + u16::try_from(std::process::id() % 100)? * 20;
    let ports: Vec<u16> =
        (start..20_000).filter(|port| TcpListener::bind(("127.0.0.1", *port)).is_ok()).take(count).collect();
    if ports.len() < count {
        bail!("found only {} free ports between {start} and 20000", ports.len());
    }
    Ok(ports)
}

/// alice and bob, each request through another process, then what every process saw.
#[expect(clippy::print_stdout, reason = "the demo's report is its output")]
fn converse(deployment: &Deployment, server_name: &str) -> anyhow::Result<()> {
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
        Some(&json!({})),
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
fn persist_counts(deployment: &Deployment) -> anyhow::Result<Vec<u64>> {
    const SAMPLE: &str = "homeserver_db_interactions_total{name=\"persist_events\"} ";
    EVENT_WRITERS
        .iter()
        .map(|writer| {
            let metrics = deployment.request(writer, "GET", "/metrics", None, None)?;
            let count = metrics.lines().find_map(|line| line.strip_prefix(SAMPLE)).unwrap_or("0");
            count.trim().parse().with_context(|| format!("{writer}'s /metrics: {SAMPLE}{count}"))
        })
        .collect()
}

/// The events writer of `room_id` among `writers`, computed as every process
/// computes it: FNV-1a of the room ID, modulo the number of writers, in config
/// order. The demo says it before the writers' positions confirm it.
fn writer_for_room<'a>(room_id: &str, writers: &[&'a str]) -> &'a str {
    let hash = room_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let index = usize::try_from(hash % writers.len() as u64).expect("an index below the number of writers");
    writers[index]
}

/// A registered user.
struct User {
    name: &'static str,
    user_id: String,
    token: String,
}

/// The running processes.
struct Deployment {
    processes: Vec<Process>,
    /// The index of the process the last request went to: the one to blame when
    /// a request fails.
    last_contacted: Cell<usize>,
}

impl Deployment {
    fn process(&self, instance: &str) -> anyhow::Result<(usize, &Process)> {
        self.processes
            .iter()
            .enumerate()
            .find(|(_, process)| process.name == instance)
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
        let (idx, process) = self.process(instance)?;
        self.last_contacted.set(idx);
        let body = body.map(Value::to_string);
        let bearer = user.map(|user| user.token.as_str());
        let (status, answer) = http_request(&process.base_url, method, path, bearer, body.as_deref())
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
            Some(&json!({"username": name})),
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
            let exited = self.processes.iter_mut().position(|process| process.exit_status().is_some());
            if exited.is_some() || Instant::now() > deadline {
                break exited;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let idx = exited.unwrap_or(self.last_contacted.get());
        let Some(process) = self.processes.get_mut(idx) else { return Failure::from(error) };
        let error = match process.exit_status() {
            Some(status) => error.context(format!("`{}` exited ({status})", process.name)),
            None => error,
        };
        Failure { error, stderr_tail: Some((process.name.to_owned(), process.stderr_tail())) }
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

/// A running `master` or `worker`; stopped if dropped while running, so that an
/// error anywhere leaves no process behind.
struct Process {
    name: &'static str,
    child: Child,
    /// `http://IP:PORT`, from the start-up line.
    base_url: String,
    /// Everything the process wrote to stderr so far.
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
}

impl Process {
    /// Starts `binary` and waits for its start-up line,
    /// `… listening on http://IP:PORT, data in …`.
    fn start(name: &'static str, binary: &Path, config: &Path) -> Result<Process, Failure> {
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr_pipe = child.stderr.take().expect("stderr is piped");
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_reader = {
            let stderr = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                    let mut lines = stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if lines.len() == STDERR_TAIL_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            })
        };
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = line_tx.send(line);
            }
            // Keep draining, so the process never blocks on a full pipe.
            for _ in lines {}
        });
        let mut process =
            Process { name, child, base_url: String::new(), stderr, stderr_reader: Some(stderr_reader) };
        let startup_line = match line_rx.recv_timeout(PROCESS_TIMEOUT) {
            Ok(line) => line,
            Err(not_printed) => {
                // A closed stdout is a process on its way out: give it a moment to finish.
                let exit_status = match not_printed {
                    mpsc::RecvTimeoutError::Disconnected => process.wait(Duration::from_secs(5)),
                    mpsc::RecvTimeoutError::Timeout => process.exit_status(),
                };
                let error = match exit_status {
                    Some(status) => format_err!("`{name}` exited at start-up ({status})"),
                    None => format_err!("`{name}` printed no start-up line within {PROCESS_TIMEOUT:?}"),
                };
                return Err(process.failure(error));
            }
        };
        match startup_line.split_whitespace().find_map(|word| word.strip_prefix("http://")) {
            Some(address) => process.base_url = format!("http://{}", address.trim_end_matches(',')),
            None => {
                let error =
                    format_err!("`{name}`'s start-up line names no http:// address: {startup_line:?}");
                return Err(process.failure(error));
            }
        }
        Ok(process)
    }

    /// The exit status, once the process has exited.
    fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of stderr; all of them once the process has exited.
    fn stderr_tail(&mut self) -> String {
        if self.exit_status().is_some()
            && let Some(reader) = self.stderr_reader.take()
        {
            let _ = reader.join();
        }
        let lines = self.stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }

    fn failure(&mut self, error: anyhow::Error) -> Failure {
        Failure { error, stderr_tail: Some((self.name.to_owned(), self.stderr_tail())) }
    }

    fn signal_terminate(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as an operator stops it; it must exit cleanly.
    fn stop(mut self) -> Result<(), Failure> {
        self.signal_terminate();
        match self.wait(PROCESS_TIMEOUT) {
            Some(status) if status.success() => Ok(()),
            Some(status) => {
                Err(self.failure(format_err!("`{}` exited with {status} after SIGTERM", self.name)))
            }
            None => Err(self
                .failure(format_err!("`{}` did not exit within {PROCESS_TIMEOUT:?} of SIGTERM", self.name))),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.signal_terminate();
            if self.wait(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// The demo's PostgreSQL database, `demo_<pid>`; dropped if still there when
/// this is dropped.
struct DemoDatabase {
    name: String,
    dropped: bool,
}

impl DemoDatabase {
    fn create() -> anyhow::Result<DemoDatabase> {
        let name = format!("demo_{}", std::process::id());
        psql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        psql(&format!("CREATE DATABASE {name} TEMPLATE template0"))?;
        Ok(DemoDatabase { name, dropped: false })
    }

    fn url(&self) -> String {
        format!("postgres://postgres@{POSTGRES_ADDRESS}/{}", self.name)
    }

    fn drop_now(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        psql(&format!("DROP DATABASE {} WITH (FORCE)", self.name))?;
        Ok(())
    }
}

impl Drop for DemoDatabase {
    fn drop(&mut self) {
        if !self.dropped {
            let _ = psql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// Drops the databases of demos that were killed before they could (their
/// process is gone).
fn drop_abandoned_databases() -> anyhow::Result<()> {
    let names = psql("SELECT datname FROM pg_database WHERE datname ~ '^demo_[0-9]+$'")?;
    for name in names.lines() {
        let pid = name.trim_start_matches("demo_");
        if !Path::new("/proc").join(pid).exists() {
            psql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        }
    }
    Ok(())
}

/// Runs one statement as `postgres` (trust auth, as the tests assume); its
/// output, unaligned.
fn psql(sql: &str) -> anyhow::Result<String> {
    let (host, port) = POSTGRES_ADDRESS.split_once(':').expect("the address is IP:PORT");
    let output = Command::new("psql")
        .args(["-h", host, "-p", port, "-U", "postgres", "-d", "postgres", "-X", "-q", "-A", "-t"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .context("run psql (is the PostgreSQL client installed?)")?;
    if !output.status.success() {
        bail!("psql -c {sql:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A directory for the configs, removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create() -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("homeserver-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A minimal HTTP/1.1 request with an optional bearer token and JSON body: the
/// status and the body. The server's answers carry a `Content-Length`, and
/// `Connection: close` makes the end of the stream the end of the answer.
fn http_request(
    base_url: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let authority = base_url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(authority).with_context(|| format!("connect to {authority}"))?;
    stream.set_read_timeout(Some(PROCESS_TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = json.unwrap_or("");
    if json.is_some() {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format_err!("not an HTTP response: {response:?}"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Percent-encodes a path segment or query value (room and event IDs hold `!`,
/// `$` and `:`).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::writer_for_room;

    #[test]
    fn rooms_hash_to_the_writer_the_server_picks() {
        // The same rooms and answers as the server's `the_hash_is_fixed_across_releases`.
        let writers = ["w0", "w1", "w2"];
        let picked: Vec<&str> =
            ["!a:b", "!b:b", "!c:b", "!d:b"].iter().map(|room| writer_for_room(room, &writers)).collect();
        assert_eq!(picked, ["w2", "w1", "w2", "w0"]);
    }
}
