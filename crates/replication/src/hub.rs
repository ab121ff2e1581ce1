//! [`Hub`]: one process's replication: its connections, what it sends and what
//! it applies. Transports (`tcp`) only move lines; the hub decides.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication_proto::{Command, CommandName, Side};
use tokio::sync::{Notify, mpsc};

use crate::lock;
use crate::{Inbound, Outbound};

/// Timings and limits of connections, Synapse's by default.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Send a `PING` when nothing was sent for this long.
    pub ping_interval: Duration,
    /// Once the peer has sent a `PING`, close the connection when nothing valid
    /// arrived for this long.
    pub ping_timeout: Duration,
    /// Commands queued for one connection before it counts as unable to keep up
    /// and is closed (it reconnects and catches up from the database).
    pub max_pending: usize,
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
    /// Streams whose `POSITION` this connection has fully processed: only their
    /// `RDATA` is applied (before it, a catch-up will fetch the rows anyway).
    pub(crate) connected: Mutex<HashSet<String>>,
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
            connected: Mutex::new(HashSet::new()),
            last_received: Mutex::new(Instant::now()),
            close: Notify::new(),
        };
        (Arc::new(peer), outgoing)
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

/// One process's replication.
#[derive(Debug)]
pub struct Hub {
    pub(crate) instance_name: String,
    pub(crate) server_name: String,
    pub(crate) settings: Settings,
    inbound: Inbound,
    outbound: Outbound,
    /// Whether commands from one connection are passed on to the others: the
    /// TCP server (the master) relays, so workers that write reach each other.
    relay: bool,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    next_peer: AtomicU64,
    /// Valid commands received and commands queued for sending, by name.
    received: CommandCounters,
    sent: CommandCounters,
    /// Poked when local writes may have finished.
    pub(crate) wake_streamer: Notify,
    /// Connections this process opened again after losing one.
    reconnects: AtomicU64,
    /// Set by [`Hub::shut_down`]: connections end and are not reopened.
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Hub {
    /// The replication of `instance_name` on homeserver `server_name`.
    pub fn new(
        instance_name: &str,
        server_name: &str,
        settings: Settings,
        inbound: Inbound,
        outbound: Outbound,
        relay: bool,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            instance_name: instance_name.to_owned(),
            server_name: server_name.to_owned(),
            settings,
            inbound,
            outbound,
            relay,
            peers: Mutex::new(HashMap::new()),
            next_peer: AtomicU64::new(0),
            received: CommandCounters::default(),
            sent: CommandCounters::default(),
            wake_streamer: Notify::new(),
            reconnects: AtomicU64::new(0),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Peer>>> {
        lock(&self.peers)
    }

    pub(crate) fn add_peer(&self, peer: Arc<Peer>) -> u64 {
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        if self.is_shutting_down() {
            // Opened during shutdown: ends at once, like the others.
            peer.close.notify_one();
        }
        self.peers().insert(id, peer);
        id
    }

    /// Whether [`Hub::shut_down`] has begun: transports stop reconnecting.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn remove_peer(&self, id: u64) {
        self.peers().remove(&id);
    }

    /// The stream called `name`, if this process writes it: what the internal
    /// HTTP endpoint serves to followers of in-memory streams.
    pub fn source(&self, name: &str) -> Option<&Arc<dyn crate::Stream>> {
        self.outbound.source(name)
    }

    /// Whether the streamer has dealt with every local write so far.
    pub fn is_caught_up(&self) -> bool {
        self.outbound.is_caught_up()
    }

    /// How many connections are up.
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

    /// Queues this process's positions for one peer: what a process says when
    /// it (re)connects, since the others cannot know it did.
    pub(crate) fn announce_to(&self, peer: &Peer) {
        for position in self.outbound.announce() {
            self.send_to(peer, &position);
        }
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

    /// Handles one valid command from connection `from`. Returns an error text
    /// when the connection must close.
    pub(crate) async fn handle(&self, from: u64, side: Side, command: Command) -> Result<(), String> {
        if let Command::Rdata { instance, .. } | Command::Position { instance, .. } = &command
            && *instance == self.instance_name
        {
            // Our own rows, echoed by Redis: neither news nor a sign of the peers' life.
            return Ok(());
        }
        self.received.count(command.name());
        if let Some(peer) = self.peers().get(&from) {
            *lock(&peer.last_received) = Instant::now();
        }
        match &command {
            Command::Server { server_name } => {
                if side == Side::Client && *server_name != self.server_name {
                    return Err("Wrong remote".to_owned());
                }
            }
            Command::Name { name } => {
                if let Some(peer) = self.peers().get(&from) {
                    *lock(&peer.name) = name.clone();
                }
            }
            Command::Replicate => {
                // Announce what has been sent so far; every writer answers so.
                self.broadcast_all(&self.outbound.announce(), None);
                // Clients cannot receive REPLICATE, so the relaying server answers
                // for the other writers it follows: everything up to the position
                // it knows for each is committed, so the newcomer catches up from
                // the database to there.
                if self.relay
                    && let Some(peer) = self.peers().get(&from).cloned()
                {
                    for stream in self.inbound.streams().iter() {
                        for (writer, position) in stream.writer_positions() {
                            if writer != self.instance_name {
                                let command = Command::Position {
                                    stream: stream.name().to_owned(),
                                    instance: writer,
                                    prev_token: position,
                                    new_token: position,
                                };
                                self.send_to(&peer, &command);
                            }
                        }
                    }
                }
            }
            Command::Rdata { stream, .. } => {
                if self.relay {
                    self.broadcast(&command, Some(from));
                }
                let connected =
                    self.peers().get(&from).is_some_and(|peer| lock(&peer.connected).contains(stream));
                if !connected {
                    // No POSITION yet on this connection: the catch-up it triggers
                    // will read this row from the database.
                    tracing::trace!(stream, "dropping a row of a stream not yet connected");
                } else if let Err(err) = self.inbound.handle(&command).await {
                    // The stream is behind now; the next POSITION catches it up.
                    tracing::warn!("failed to apply replication: {err}");
                }
            }
            Command::Position { stream, instance, new_token, .. } => {
                if self.relay {
                    self.broadcast(&command, Some(from));
                }
                // A redundant POSITION on a connected stream changes nothing; it
                // must not disconnect the stream on the other connections either.
                let connected_here =
                    self.peers().get(&from).is_some_and(|peer| lock(&peer.connected).contains(stream));
                let redundant = self
                    .inbound
                    .streams()
                    .get(stream)
                    .is_some_and(|followed| followed.position_is_redundant(instance, *new_token));
                if connected_here && redundant {
                    return Ok(());
                }
                // Until this catch-up ends, rows arriving on any connection would
                // race it.
                for peer in self.peers().values() {
                    lock(&peer.connected).remove(stream);
                }
                match self.inbound.handle(&command).await {
                    Ok(()) => {
                        if let Some(peer) = self.peers().get(&from) {
                            lock(&peer.connected).insert(stream.clone());
                        }
                    }
                    Err(err) => tracing::warn!("failed to apply replication: {err}"),
                }
            }
            Command::FederationAck { instance, token } => {
                self.outbound.acknowledge(crate::federation::FEDERATION_STREAM, instance, *token);
            }
            Command::Error { message } => {
                tracing::warn!(peer = from, message, "replication peer reported an error")
            }
            Command::Ping { .. } => {}
            _ => {
                // Only what clients may receive is passed on (REMOTE_SERVER_UP,
                // LOCK_RELEASED); the rest is for the server alone.
                if self.relay && command.name().accepted_by(Side::Client) {
                    self.broadcast(&command, Some(from));
                }
            }
        }
        Ok(())
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
            if hub.connections() == 0 {
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
