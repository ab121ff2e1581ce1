//! [`Hub`]: one process's replication: its connections, what it sends and what
//! it applies, and who may speak for which writer. Transports (`tcp`, `redis`)
//! only move lines; the hub decides.
//!
//! **Who may speak for a writer.** A process takes `RDATA` and `POSITION` for
//! writer W of stream S only when W is one of S's writers (its configured
//! writers; any instance for `caches`; the single writer of an in-memory
//! stream) and the token lies within what S has handed out. On TCP the master
//! also requires that the connection authenticated (`AUTH <secret>`) and named
//! itself W (`NAME W`); a worker takes what its master sends, since the master
//! relays only what it accepted itself. Anything else is refused: on TCP with
//! `ERROR` and a closed connection, over Redis dropped, logged once per writer
//! name and counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication_proto::{Command, CommandName, Secret, Side};
use tokio::sync::{Notify, mpsc};

use crate::inbound::{InboundError, Link};
use crate::lock;
use crate::{Inbound, Outbound};
use store_core::Stream;

/// Timings and limits of connections, Synapse's by default.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Send a `PING` when nothing was sent for this long.
    pub ping_interval: Duration,
    /// Once the peer has pinged, close the connection when nothing valid
    /// arrived for this long; a connection that never sent a valid command is
    /// closed after it too.
    pub ping_timeout: Duration,
    /// Commands queued for one connection, in either direction, before it
    /// counts as unable to keep up and is closed (it reconnects and catches up
    /// from the database).
    pub max_pending: usize,
    /// Bytes of received commands queued for one connection before it is
    /// closed (TCP) or its commands are dropped (Redis).
    pub max_inbound_bytes: usize,
    /// The most TCP connections the listener keeps open at once.
    pub max_connections: usize,
    /// Poll the streams at least this often, even with no local write (an idle
    /// writer's position moves when others write).
    pub poll_interval: Duration,
}

impl Settings {
    /// The settings `[replication]` asks for.
    pub fn from_config(config: &server_config::ReplicationConfig) -> Settings {
        Settings {
            ping_interval: Duration::from_millis(config.ping_interval_ms),
            ping_timeout: Duration::from_millis(config.ping_timeout_ms),
            max_pending: config.max_pending,
            max_connections: config.max_connections,
            ..Settings::default()
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(25),
            max_pending: 10_000,
            max_inbound_bytes: 16 << 20,
            max_connections: 256,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// A command serialised once, however many connections it is queued for.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) name: CommandName,
    /// The line, without its newline.
    pub(crate) line: Arc<str>,
}

impl Outgoing {
    /// `command` as a line; a command that cannot be one is logged and dropped.
    fn serialise(command: &Command) -> Option<Outgoing> {
        match command.to_line() {
            Ok(line) => Some(Outgoing { name: command.name(), line: line.into() }),
            Err(err) => {
                tracing::error!("failed to send a replication command: {err}");
                None
            }
        }
    }
}

/// The sending end of one connection, as the hub sees it.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) queue: mpsc::UnboundedSender<Outgoing>,
    pub(crate) pending: AtomicUsize,
    pub(crate) congested: Notify,
    pub(crate) name: Mutex<String>,
    /// Set once the peer proved it holds the secret (TCP server side); the
    /// transport closes a connection that stays unauthenticated too long.
    pub(crate) authenticated: AtomicBool,
    /// When the last valid command arrived (or the connection opened).
    last_received: Mutex<Instant>,
    /// Notified to end the connection in order (at shutdown, once drained).
    pub(crate) close: Notify,
}

impl Peer {
    /// A connection's sending end, its queue, and `name` until it says its own.
    pub(crate) fn new(name: String) -> (Arc<Peer>, mpsc::UnboundedReceiver<Outgoing>) {
        let (queue, outgoing) = mpsc::unbounded_channel();
        let peer = Peer {
            queue,
            pending: AtomicUsize::new(0),
            congested: Notify::new(),
            name: Mutex::new(name),
            authenticated: AtomicBool::new(false),
            last_received: Mutex::new(Instant::now()),
            close: Notify::new(),
        };
        (Arc::new(peer), outgoing)
    }
}

/// How a connection reaches this process, which decides what it may say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// A worker connected to this process's listener (the master): it must
    /// authenticate, and speaks only for the instance it named.
    TcpServer {
        /// Where it connects from, to slow down failed authentications.
        address: Option<SocketAddr>,
    },
    /// This process's connection to the master, which relays the others.
    TcpClient,
    /// The Redis channel: every process publishes there.
    Redis,
}

impl Transport {
    /// The label `/metrics` counts refusals under.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Transport::TcpServer { .. } | Transport::TcpClient => "tcp",
            Transport::Redis => "redis",
        }
    }

    /// The side of the line protocol this process is on.
    pub(crate) fn side(self) -> Side {
        match self {
            Transport::TcpServer { .. } => Side::Server,
            Transport::TcpClient | Transport::Redis => Side::Client,
        }
    }
}

/// Why a command was refused, as `/metrics` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum RefusalReason {
    /// A TCP client spoke before authenticating.
    Unauthenticated,
    /// A TCP client presented the wrong secret.
    BadSecret,
    /// The command names an instance that does not write the stream.
    NotAWriter,
    /// A TCP client spoke for an instance other than the one it named.
    Impersonation,
    /// A token past anything the stream has handed out.
    TokenNotHandedOut,
    /// A command that breaks the protocol's rules (a negative token, a
    /// position going backwards, a row that does not decode, a second `NAME`).
    Malformed,
    /// A connection passed one of its bounds (queue, held rows, unknown names,
    /// the listener's connection cap).
    OverBound,
}

impl RefusalReason {
    /// The label `/metrics` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Unauthenticated => "unauthenticated",
            RefusalReason::BadSecret => "bad_secret",
            RefusalReason::NotAWriter => "not_a_writer",
            RefusalReason::Impersonation => "impersonation",
            RefusalReason::TokenNotHandedOut => "token_not_handed_out",
            RefusalReason::Malformed => "malformed",
            RefusalReason::OverBound => "over_bound",
        }
    }
}

/// A refused command: on TCP the connection closes with `ERROR <message>`.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub(crate) reason: RefusalReason,
    pub(crate) message: String,
    /// The writer the command spoke for, to log a Redis refusal once per name.
    pub(crate) writer: Option<String>,
}

impl Refusal {
    pub(crate) fn new(reason: RefusalReason, message: impl Into<String>) -> Refusal {
        Refusal { reason, message: message.into(), writer: None }
    }

    /// A peer sent commands faster than this process applies them.
    pub(crate) fn too_many_waiting() -> Refusal {
        Refusal::new(RefusalReason::OverBound, "too many commands waiting to be applied")
    }

    fn for_writer(reason: RefusalReason, writer: &str, message: impl Into<String>) -> Refusal {
        Refusal { reason, message: message.into(), writer: Some(writer.to_owned()) }
    }
}

/// One connection as the hub tracks it: who the peer is and what it told us.
/// Owned by the task that handles the connection's commands, one at a time.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) transport: Transport,
    pub(crate) peer: Arc<Peer>,
    authenticated: bool,
    /// The instance a TCP client named itself (`NAME`).
    name: Option<String>,
    link: Link,
}

impl Session {
    /// Forgets which writers this connection is in sequence with: some of its
    /// commands were dropped, so the next ones may not follow.
    pub(crate) fn lose_sequence(&mut self) {
        self.link.lose_sequence();
    }
}

/// Received commands waiting for a connection's handler, bounded in number and
/// bytes: a peer that sends faster than this process applies (or floods it)
/// passes the bound instead of growing memory.
pub(crate) fn inbound_queue(settings: &Settings) -> (InboundSender, InboundReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let load = Arc::new(QueueLoad { commands: AtomicUsize::new(0), bytes: AtomicUsize::new(0) });
    let limits = (settings.max_pending, settings.max_inbound_bytes);
    (InboundSender { sender, load: Arc::clone(&load), limits }, InboundReceiver { receiver, load })
}

#[derive(Debug)]
struct QueueLoad {
    commands: AtomicUsize,
    bytes: AtomicUsize,
}

/// The transport's end of an [`inbound_queue`].
#[derive(Debug)]
pub(crate) struct InboundSender {
    sender: mpsc::UnboundedSender<(Command, usize)>,
    load: Arc<QueueLoad>,
    /// (commands, bytes).
    limits: (usize, usize),
}

/// Why a received command was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// The queue is at its bound.
    Full,
    /// The handler has stopped.
    Closed,
}

impl InboundSender {
    /// Queues `command`, which took `size` bytes on the wire.
    pub(crate) fn try_send(&self, command: Command, size: usize) -> Result<(), QueueError> {
        let commands = self.load.commands.load(Ordering::Acquire);
        let bytes = self.load.bytes.load(Ordering::Acquire);
        if commands >= self.limits.0 || bytes.saturating_add(size) > self.limits.1 {
            return Err(QueueError::Full);
        }
        self.load.commands.fetch_add(1, Ordering::AcqRel);
        self.load.bytes.fetch_add(size, Ordering::AcqRel);
        self.sender.send((command, size)).map_err(|_| QueueError::Closed)
    }
}

/// The handler's end of an [`inbound_queue`].
#[derive(Debug)]
pub(crate) struct InboundReceiver {
    receiver: mpsc::UnboundedReceiver<(Command, usize)>,
    load: Arc<QueueLoad>,
}

impl InboundReceiver {
    /// The next command; `None` once the transport has stopped.
    pub(crate) async fn recv(&mut self) -> Option<Command> {
        let (command, size) = self.receiver.recv().await?;
        self.load.commands.fetch_sub(1, Ordering::AcqRel);
        self.load.bytes.fetch_sub(size, Ordering::AcqRel);
        Some(command)
    }
}

/// Commands counted by name, without a lock on the per-command path.
#[derive(Debug, Default)]
struct CommandCounters([AtomicU64; CommandName::ALL.len()]);

impl CommandCounters {
    fn count(&self, name: CommandName) {
        self.0[name as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The names counted at least once.
    fn snapshot(&self) -> BTreeMap<CommandName, u64> {
        CommandName::ALL
            .into_iter()
            .map(|name| (name, self.0[name as usize].load(Ordering::Relaxed)))
            .filter(|(_, count)| *count > 0)
            .collect()
    }
}

/// Writer names whose Redis refusals were logged: each once, up to this many.
const MAX_LOGGED_REFUSALS: usize = 1_000;

/// Addresses whose failed authentications are remembered, to slow them down.
const MAX_AUTH_FAILURE_ADDRESSES: usize = 4_096;

/// How long a failed authentication is remembered.
const AUTH_FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// The first and the longest pause before answering a failed authentication.
const AUTH_PAUSE_FIRST: Duration = Duration::from_millis(250);
const AUTH_PAUSE_MAX: Duration = Duration::from_secs(8);

/// One process's replication.
#[derive(Debug)]
pub struct Hub {
    pub(crate) instance_name: String,
    pub(crate) server_name: String,
    pub(crate) settings: Settings,
    /// What TCP clients must present, and what this process presents to its
    /// master. `None`: a listener refuses every client.
    secret: Option<Secret>,
    inbound: Inbound,
    outbound: Outbound,
    /// Whether commands from one connection are passed on to the others: the
    /// TCP server (the master) relays, so workers that write reach each other.
    relay: bool,
    /// Connections that may receive replication (authenticated ones).
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    /// On the TCP server: which connection speaks for each instance name.
    names: Mutex<HashMap<String, u64>>,
    next_peer: AtomicU64,
    /// Held while the streamer reads and queues what changed, and while a
    /// connection is registered and told this process's positions: so a new
    /// connection's first word from this process is a position, never a row
    /// past one it has not been told.
    sending: tokio::sync::Mutex<()>,
    /// On the relaying server: the token of the last command relayed for each
    /// (stream, writer), which it announces on the writer's behalf, so a
    /// newcomer is in sequence with exactly what follows.
    relayed: Mutex<HashMap<(&'static str, String), i64>>,
    /// Valid commands received and commands queued for sending, by name.
    received: CommandCounters,
    sent: CommandCounters,
    /// Refused commands by transport and reason.
    refused: Mutex<BTreeMap<(&'static str, RefusalReason), u64>>,
    /// Redis refusals already logged, by reason and writer name.
    logged_refusals: Mutex<HashSet<(RefusalReason, String)>>,
    /// Failed authentications by address: how many, and the last.
    auth_failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// Poked when local writes may have finished.
    pub(crate) wake_streamer: Notify,
    /// Connections this process opened again after losing one.
    reconnects: AtomicU64,
    /// Set by [`Hub::shut_down`]: connections end and are not reopened.
    shutting_down: AtomicBool,
}

impl Hub {
    /// The replication of `instance_name` on homeserver `server_name`; TCP
    /// peers authenticate with `secret` (the deployment's
    /// `worker_replication_secret`).
    pub fn new(
        instance_name: &str,
        server_name: &str,
        settings: Settings,
        inbound: Inbound,
        outbound: Outbound,
        relay: bool,
        secret: Option<&str>,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            instance_name: instance_name.to_owned(),
            server_name: server_name.to_owned(),
            settings,
            secret: secret.map(Secret::new),
            inbound,
            outbound,
            relay,
            peers: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            next_peer: AtomicU64::new(0),
            sending: tokio::sync::Mutex::new(()),
            relayed: Mutex::new(HashMap::new()),
            received: CommandCounters::default(),
            sent: CommandCounters::default(),
            refused: Mutex::new(BTreeMap::new()),
            logged_refusals: Mutex::new(HashSet::new()),
            auth_failures: Mutex::new(HashMap::new()),
            wake_streamer: Notify::new(),
            reconnects: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
        })
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Peer>>> {
        lock(&self.peers)
    }

    /// The secret this process presents to its master.
    pub(crate) fn secret(&self) -> Option<&Secret> {
        self.secret.as_ref()
    }

    /// Opens a session for a new connection and queues `hello` on it. A TCP
    /// client of ours (the listener's side) is not registered for replication
    /// until it authenticates; every other connection is registered at once,
    /// and told this process's positions right after `hello`, before any row
    /// the streamer sends: a writer that (re)connects announces itself, since
    /// the others cannot know it did.
    pub(crate) async fn open_session(
        &self,
        transport: Transport,
        peer: Arc<Peer>,
        hello: &[Command],
    ) -> Session {
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        if self.is_shutting_down() {
            // Opened during shutdown: ends at once, like the others.
            peer.close.notify_one();
        }
        let authenticated = !matches!(transport, Transport::TcpServer { .. });
        let session = Session { id, transport, peer, authenticated, name: None, link: Link::default() };
        if authenticated {
            session.peer.authenticated.store(true, Ordering::Release);
            self.register(&session, hello).await;
        } else {
            self.send_all_to(&session.peer, hello);
        }
        session
    }

    /// Adds the session's connection to those that receive replication, and
    /// queues `hello` then this process's positions on it, with no streamed row
    /// in between.
    async fn register(&self, session: &Session, hello: &[Command]) {
        let _sending = self.sending.lock().await;
        self.send_all_to(&session.peer, hello);
        self.announce_to(&session.peer);
        self.peers().insert(session.id, Arc::clone(&session.peer));
    }

    /// Ends session `id`: its connection receives nothing more, and no longer
    /// speaks for the name it took.
    pub(crate) fn close_session(&self, id: u64) {
        self.peers().remove(&id);
        lock(&self.names).retain(|_, speaker| *speaker != id);
    }

    /// Whether [`Hub::shut_down`] has begun: transports stop reconnecting.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The stream called `name`, if this process writes it: what the internal
    /// HTTP endpoint serves to followers of in-memory streams.
    pub fn source(&self, name: &str) -> Option<&Arc<dyn Stream>> {
        self.outbound.source(name)
    }

    /// Whether the streamer has dealt with every local write so far.
    pub fn is_caught_up(&self) -> bool {
        self.outbound.is_caught_up()
    }

    /// How many connections receive replication.
    pub fn connections(&self) -> usize {
        self.peers().len()
    }

    /// The receiving side: the streams this process follows and its catch-ups.
    pub fn inbound(&self) -> &Inbound {
        &self.inbound
    }

    /// This process's instance name.
    pub fn instance_name(&self) -> &str {
        &self.instance_name
    }

    /// Per connection (by its number), the peer's name and how long since it
    /// last sent a valid command: a peer silent for long is stuck or gone.
    pub fn peer_silences(&self) -> Vec<(u64, String, Duration)> {
        let now = Instant::now();
        self.peers()
            .iter()
            .map(|(id, peer)| {
                (*id, lock(&peer.name).clone(), now.saturating_duration_since(*lock(&peer.last_received)))
            })
            .collect()
    }

    /// Counts a connection lost while running (transports call it); the ends of
    /// a shutdown do not count.
    pub(crate) fn count_reconnect(&self) {
        if !self.is_shutting_down() {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connections opened again after one was lost, since start-up.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Commands refused since start-up, by transport (`tcp`, `redis`) and
    /// reason.
    pub fn refusals(&self) -> BTreeMap<(&'static str, RefusalReason), u64> {
        lock(&self.refused).clone()
    }

    /// Counts a refusal; over Redis, also logs it, once per reason and writer.
    pub(crate) fn count_refusal(&self, transport: Transport, refusal: &Refusal) {
        *lock(&self.refused).entry((transport.label(), refusal.reason)).or_insert(0) += 1;
        if transport == Transport::Redis {
            let writer = refusal.writer.clone().unwrap_or_default();
            let mut logged = lock(&self.logged_refusals);
            if logged.len() < MAX_LOGGED_REFUSALS && logged.insert((refusal.reason, writer.clone())) {
                tracing::warn!(
                    reason = refusal.reason.as_str(),
                    writer,
                    "ignoring replication from Redis: {} (logged once per writer)",
                    refusal.message
                );
            }
        }
    }

    /// Says goodbye before the process exits: a worker (`clear_user_sync`)
    /// queues `CLEAR_USER_SYNC`, which tells the others it is going; then this
    /// waits until every connection has written what was queued for it, and
    /// ends each connection in order (so no written line is lost to a reset),
    /// all within `timeout`. The caller then stops the transports.
    pub async fn shut_down(&self, clear_user_sync: bool, timeout: Duration) {
        if clear_user_sync {
            self.broadcast(&Command::ClearUserSync { instance_id: self.instance_name.clone() }, None);
        }
        self.shutting_down.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + timeout;
        let drained = async {
            while self.peers().values().any(|peer| peer.pending.load(Ordering::Acquire) > 0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout_at(deadline, drained).await.is_err() {
            tracing::warn!("replication connections did not drain before shutdown");
        }
        for peer in self.peers().values() {
            peer.close.notify_one();
        }
        let closed = async {
            while self.connections() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            tracing::debug!("replication connections still open at shutdown; dropping them");
        }
    }

    /// Commands received (valid ones) and sent, by name, since start-up.
    pub fn command_counts(&self) -> (BTreeMap<CommandName, u64>, BTreeMap<CommandName, u64>) {
        (self.received.snapshot(), self.sent.snapshot())
    }

    /// Queues `command` for one peer; a peer past the pending limit is told to
    /// close.
    pub(crate) fn send_to(&self, peer: &Peer, command: &Command) {
        if let Some(outgoing) = Outgoing::serialise(command) {
            self.queue(peer, outgoing);
        }
    }

    fn send_all_to(&self, peer: &Peer, commands: &[Command]) {
        for command in commands {
            self.send_to(peer, command);
        }
    }

    fn queue(&self, peer: &Peer, outgoing: Outgoing) {
        self.sent.count(outgoing.name);
        if peer.pending.fetch_add(1, Ordering::AcqRel) >= self.settings.max_pending {
            peer.congested.notify_one();
        }
        if peer.queue.send(outgoing).is_err() {
            // The connection is closing; it drops its queue.
            peer.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Queues `command` for every connection but `except`.
    pub fn broadcast(&self, command: &Command, except: Option<u64>) {
        self.broadcast_all(std::slice::from_ref(command), except);
    }

    /// Queues `commands`, in order, for every connection but `except`,
    /// serialising each once and taking one snapshot of the connections.
    fn broadcast_all(&self, commands: &[Command], except: Option<u64>) {
        let lines: Vec<Outgoing> = commands.iter().filter_map(Outgoing::serialise).collect();
        let peers: Vec<Arc<Peer>> = self
            .peers()
            .iter()
            .filter(|(id, _)| Some(**id) != except)
            .map(|(_, peer)| Arc::clone(peer))
            .collect();
        for peer in peers {
            for outgoing in &lines {
                self.queue(&peer, outgoing.clone());
            }
        }
    }

    /// Queues this process's positions for one peer.
    fn announce_to(&self, peer: &Peer) {
        self.send_all_to(peer, &self.outbound.announce());
    }

    /// Wakes the streamer: a local write may have finished.
    pub fn notify_local_write(&self) {
        self.wake_streamer.notify_one();
    }

    /// Wakes the streamer whenever `changes` (a generator's
    /// [`subscribe`](store_core::MultiWriterIdGenerator::subscribe)) moves, until
    /// the generator or the hub is dropped.
    pub fn wake_on(self: &Arc<Self>, mut changes: tokio::sync::watch::Receiver<u64>) {
        let hub = Arc::downgrade(self);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(hub) = hub.upgrade() else { return };
                hub.notify_local_write();
            }
        });
    }

    /// Handles one command from a session's connection, in order. A refusal
    /// closes a TCP connection; over Redis the transport counts it and goes on.
    pub(crate) async fn handle(&self, session: &mut Session, command: Command) -> Result<(), Refusal> {
        if !session.authenticated {
            return match command {
                Command::Auth { secret } => self.authenticate(session, &secret).await,
                other => Err(Refusal::new(
                    RefusalReason::Unauthenticated,
                    format!(
                        "authentication required: the first line must be AUTH <worker_replication_secret>, not {}",
                        other.name()
                    ),
                )),
            };
        }
        if let Command::Rdata { instance, .. } | Command::Position { instance, .. } = &command
            && *instance == self.instance_name
        {
            // Our own rows, echoed by Redis: neither news nor a sign of the peers' life.
            return Ok(());
        }
        self.received.count(command.name());
        *lock(&session.peer.last_received) = Instant::now();
        match command {
            Command::Auth { .. } => {
                if matches!(session.transport, Transport::TcpServer { .. }) {
                    return Err(Refusal::new(RefusalReason::Malformed, "AUTH sent twice"));
                }
                // Nobody publishes AUTH on Redis; a stray one means nothing.
            }
            Command::Server { server_name } => {
                if session.transport == Transport::TcpClient && server_name != self.server_name {
                    return Err(Refusal::new(RefusalReason::Malformed, "Wrong remote"));
                }
            }
            Command::Name { name } => self.name_session(session, name)?,
            Command::Replicate => self.answer_replicate(session).await,
            command @ (Command::Rdata { .. } | Command::Position { .. }) => {
                self.replicate(session, command).await?;
            }
            Command::FederationAck { instance, token } => {
                self.outbound.acknowledge(crate::federation::FEDERATION_STREAM, &instance, token);
            }
            Command::Error { message } => {
                tracing::warn!(peer = session.id, message, "replication peer reported an error")
            }
            Command::Ping { .. } => {}
            other => {
                // Only what clients may receive is passed on (REMOTE_SERVER_UP,
                // LOCK_RELEASED); the rest is for the server alone.
                if self.relay && other.name().accepted_by(Side::Client) {
                    self.broadcast(&other, Some(session.id));
                }
            }
        }
        Ok(())
    }

    /// `AUTH <secret>` from a TCP client: compared in constant time; a wrong
    /// one is answered only after a pause that grows with the address's
    /// failures, so guessing is slow.
    async fn authenticate(&self, session: &mut Session, presented: &Secret) -> Result<(), Refusal> {
        let address = match session.transport {
            Transport::TcpServer { address } => address.map(|address| address.ip()),
            Transport::TcpClient | Transport::Redis => None,
        };
        let accepted = self.secret.as_ref().is_some_and(|secret| {
            crate::http::secrets_match(secret.expose().as_bytes(), presented.expose().as_bytes())
        });
        if !accepted {
            let pause = self.auth_failure_pause(address);
            tracing::warn!(?address, "a replication client failed to authenticate");
            tokio::time::sleep(pause).await;
            return Err(Refusal::new(RefusalReason::BadSecret, "authentication failed"));
        }
        if let Some(address) = address {
            lock(&self.auth_failures).remove(&address);
        }
        self.received.count(CommandName::Auth);
        *lock(&session.peer.last_received) = Instant::now();
        session.authenticated = true;
        session.peer.authenticated.store(true, Ordering::Release);
        self.register(session, &[]).await;
        Ok(())
    }

    /// Records a failed authentication from `address` and returns how long to
    /// wait before answering it.
    fn auth_failure_pause(&self, address: Option<IpAddr>) -> Duration {
        let Some(address) = address else { return AUTH_PAUSE_MAX };
        let now = Instant::now();
        let mut failures = lock(&self.auth_failures);
        if failures.len() >= MAX_AUTH_FAILURE_ADDRESSES {
            failures.retain(|_, (_, last)| now.duration_since(*last) < AUTH_FAILURE_MEMORY);
            if failures.len() >= MAX_AUTH_FAILURE_ADDRESSES {
                // Too many addresses failing at once: everyone waits the longest.
                return AUTH_PAUSE_MAX;
            }
        }
        let entry = failures.entry(address).or_insert((0, now));
        if now.duration_since(entry.1) >= AUTH_FAILURE_MEMORY {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let doublings = entry.0.saturating_sub(1).min(16);
        AUTH_PAUSE_FIRST.saturating_mul(1 << doublings).min(AUTH_PAUSE_MAX)
    }

    /// `NAME <instance>` from a TCP client: the one instance this connection
    /// may speak for. A newer connection with the same name replaces the older
    /// (a writer that reconnected before its old connection timed out).
    fn name_session(&self, session: &mut Session, name: String) -> Result<(), Refusal> {
        if !matches!(session.transport, Transport::TcpServer { .. }) {
            return Ok(());
        }
        if session.name.is_some() {
            return Err(Refusal::new(RefusalReason::Malformed, "NAME sent twice"));
        }
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Refusal::new(RefusalReason::Malformed, "an instance name holds no spaces"));
        }
        if name == self.instance_name {
            return Err(Refusal::for_writer(
                RefusalReason::Impersonation,
                &name,
                format!("a client cannot be named `{name}`: that is this process"),
            ));
        }
        *lock(&session.peer.name) = name.clone();
        let replaced = lock(&self.names).insert(name.clone(), session.id);
        session.name = Some(name);
        if let Some(old) = replaced.filter(|old| *old != session.id)
            && let Some(peer) = self.peers().remove(&old)
        {
            let message = "replaced by a newer connection with the same name".to_owned();
            self.send_to(&peer, &Command::Error { message });
        }
        Ok(())
    }

    /// Whether a TCP client's session is the connection that speaks for
    /// `writer`: it named itself so, and no newer connection took the name.
    fn speaks_for(&self, session: &Session, writer: &str) -> bool {
        session.name.as_deref() == Some(writer) && lock(&self.names).get(writer) == Some(&session.id)
    }

    /// `REPLICATE`: this process's positions for the streams it writes, and on
    /// the relaying server, those it relays for the other writers.
    async fn answer_replicate(&self, session: &Session) {
        let _sending = self.sending.lock().await;
        self.announce_to(&session.peer);
        if self.relay {
            for position in self.relayed_positions(session.name.as_deref()) {
                self.send_to(&session.peer, &position);
            }
        }
    }

    /// What the relaying server announces for every writer but itself and
    /// `except`: the token of the last command it relayed for the writer,
    /// which what it relays next follows; for a writer it never relayed, the
    /// position it knows (that writer's next connection starts with its own
    /// position).
    fn relayed_positions(&self, except: Option<&str>) -> Vec<Command> {
        let relayed = lock(&self.relayed);
        let mut positions = Vec::new();
        for stream in self.inbound.streams().iter() {
            let mut writers: BTreeMap<String, i64> = stream
                .writer_positions()
                .into_iter()
                .filter(|(writer, _)| stream.is_writer(writer))
                .collect();
            for ((name, writer), token) in relayed.iter() {
                if *name == stream.name() {
                    writers.insert(writer.clone(), *token);
                }
            }
            for (writer, position) in writers {
                if writer == self.instance_name || Some(writer.as_str()) == except {
                    continue;
                }
                positions.push(Command::Position {
                    stream: stream.name().to_owned(),
                    instance: writer,
                    prev_token: position,
                    new_token: position,
                });
            }
        }
        positions
    }

    /// `RDATA` and `POSITION`: checked (see the module docs), relayed when this
    /// process relays, then applied.
    async fn replicate(&self, session: &mut Session, command: Command) -> Result<(), Refusal> {
        let (stream_name, writer) = match &command {
            Command::Rdata { stream, instance, .. } | Command::Position { stream, instance, .. } => {
                (stream.as_str(), instance.as_str())
            }
            _ => return Ok(()),
        };
        let Some(stream) = self.inbound.streams().get(stream_name).cloned() else {
            // Not ours to check; `Inbound` logs it once, within the bound.
            return self
                .inbound
                .handle(&mut session.link, command)
                .await
                .map_err(|err| inbound_refusal(None, err));
        };
        let name = stream.name();
        if !stream.is_writer(writer) && stream.is_retired_writer(writer) {
            // Its last positions, still on their way: everything it wrote was
            // reached when it was retired here.
            return Ok(());
        }
        if !stream.is_writer(writer) {
            return Err(Refusal::for_writer(
                RefusalReason::NotAWriter,
                writer,
                format!("`{writer}` does not write `{name}`"),
            ));
        }
        if matches!(session.transport, Transport::TcpServer { .. }) && !self.speaks_for(session, writer) {
            let named = session.name.as_deref().unwrap_or("unnamed");
            return Err(Refusal::for_writer(
                RefusalReason::Impersonation,
                writer,
                format!("this connection is `{named}` and cannot speak for `{writer}`"),
            ));
        }
        let token = match &command {
            // Held until its token arrives, and checked then.
            Command::Rdata { token: None, .. } => None,
            Command::Rdata { token: Some(token), .. } => Some(*token),
            Command::Position { prev_token, new_token, .. } => {
                check_token(writer, name, *prev_token)?;
                if prev_token > new_token {
                    return Err(Refusal::for_writer(
                        RefusalReason::Malformed,
                        writer,
                        format!("`{writer}`'s `{name}` position goes back from {prev_token} to {new_token}"),
                    ));
                }
                Some(*new_token)
            }
            _ => None,
        };
        let mut relay = None;
        if let Some(token) = token {
            check_token(writer, name, token)?;
            self.check_handed_out(stream.as_ref(), writer, token).await?;
            if self.relay {
                relay = Some((token, self.relayed_run(session, name, writer, &command)));
            }
        }
        let writer = writer.to_owned();
        self.inbound
            .handle(&mut session.link, command)
            .await
            .map_err(|err| inbound_refusal(Some(&writer), err))?;
        // Relayed only once applied here: a peer that learns a writer's token
        // from us can announce it back as its own position, and that must not
        // reach this process before the rows it covers, or this process would
        // take them for applied and drop them.
        if let Some((token, commands)) = relay {
            self.relay_to_others(session.id, name, &writer, token, &commands);
        }
        Ok(())
    }

    /// Asks the stream whether `token` was handed out; a database failure is
    /// retried, since refusing would drop a legitimate peer.
    async fn check_handed_out(&self, stream: &dyn Stream, writer: &str, token: i64) -> Result<(), Refusal> {
        let mut pause = Duration::from_millis(100);
        loop {
            match stream.is_handed_out(token).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    return Err(Refusal::for_writer(
                        RefusalReason::TokenNotHandedOut,
                        writer,
                        format!(
                            "`{writer}`'s `{}` token {token} is past anything the stream has handed out",
                            stream.name()
                        ),
                    ));
                }
                Err(err) => {
                    tracing::warn!(
                        stream = stream.name(),
                        "cannot check a replicated token yet; retrying: {err}"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// What relaying a writer's checked `command` sends: for a row, the batch
    /// held before it and the row, as one run, so a connection that joins never
    /// sees half a batch.
    fn relayed_run(
        &self,
        session: &Session,
        stream: &'static str,
        writer: &str,
        command: &Command,
    ) -> Vec<Command> {
        let mut commands: Vec<Command> = session
            .link
            .held(stream, writer)
            .iter()
            .map(|row| Command::Rdata {
                stream: stream.to_owned(),
                instance: writer.to_owned(),
                token: None,
                row: row.clone(),
            })
            .collect();
        if matches!(command, Command::Position { .. }) {
            // A position ends any batch: the held rows are dropped, not relayed.
            commands.clear();
        }
        commands.push(command.clone());
        commands
    }

    /// Relays a run of commands from connection `from` to the others; only
    /// what this process took itself, so nothing refused is ever relayed.
    fn relay_to_others(
        &self,
        from: u64,
        stream: &'static str,
        writer: &str,
        token: i64,
        commands: &[Command],
    ) {
        // One critical section with `relayed_positions`: what a newcomer is told
        // is exactly what the relayed commands that follow continue from.
        let mut relayed = lock(&self.relayed);
        self.broadcast_all(commands, Some(from));
        relayed.insert((stream, writer.to_owned()), token);
    }

    /// Runs the streamer until the hub is dropped: on every local write (and at
    /// least every `poll_interval`), sends what changed to every connection.
    pub async fn run_streamer(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        drop(self);
        loop {
            let Some(hub) = weak.upgrade() else { return };
            let interval = hub.settings.poll_interval;
            tokio::select! {
                () = hub.wake_streamer.notified() => {}
                () = tokio::time::sleep(interval) => {}
            }
            let _sending = hub.sending.lock().await;
            if hub.connections() == 0 {
                // Nobody to tell: each connection that opens is told the
                // position first, and its followers read the rest from the
                // database.
                hub.outbound.skip_to_current();
                continue;
            }
            match hub.outbound.poll().await {
                Ok(commands) => hub.broadcast_all(&commands, None),
                Err(err) => tracing::warn!("failed to read new rows to replicate: {err}"),
            }
        }
    }
}

/// Tokens on the wire are never negative (backfill's are negated to be
/// positive), and a negative one would corrupt the stream's bookkeeping.
fn check_token(writer: &str, stream: &str, token: i64) -> Result<(), Refusal> {
    if token < 0 {
        return Err(Refusal::for_writer(
            RefusalReason::Malformed,
            writer,
            format!("`{writer}`'s `{stream}` token {token} is negative"),
        ));
    }
    Ok(())
}

fn inbound_refusal(writer: Option<&str>, err: InboundError) -> Refusal {
    let reason = match err {
        InboundError::Row { .. } => RefusalReason::Malformed,
        InboundError::OverBound(_) => RefusalReason::OverBound,
    };
    Refusal { reason, message: err.to_string(), writer: writer.map(str::to_owned) }
}

#[cfg(test)]
mod tests;
