//! The TCP transport: the master listens, workers connect; both ends speak the
//! line protocol with keepalive, congestion control and strict parsing.
//!
//! A client's first line is `AUTH <worker_replication_secret>` (our extension;
//! Synapse's TCP replication had none): until it authenticates, a connection
//! receives nothing but the server's greeting, and one that does not within the
//! ping timeout, or presents the wrong secret, is closed. The listener keeps at
//! most [`Settings::max_connections`](crate::Settings) connections open.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replication_proto::{Command, CommandName, LineDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::hub::{Hub, Peer, QueueError, Refusal, RefusalReason, Transport, inbound_queue};
use crate::lock;

fn now_ms() -> String {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis()).to_string()
}

/// Accepts workers on `listener` until the task is dropped, keeping at most
/// `max_connections` open: one past the cap is told so and closed at once.
pub async fn serve(hub: Arc<Hub>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(hub.settings.max_connections));
    loop {
        match listener.accept().await {
            Ok((stream, address)) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => {
                    tracing::info!(%address, "replication client connected");
                    let hub = Arc::clone(&hub);
                    tokio::spawn(async move {
                        drive(hub, Transport::TcpServer { address: Some(address) }, stream).await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    let refusal = Refusal::new(RefusalReason::OverBound, "too many replication connections");
                    hub.count_refusal(Transport::TcpServer { address: Some(address) }, &refusal);
                    tracing::warn!(%address, "refusing a replication connection: {}", refusal.message);
                    tokio::spawn(refuse(stream, address, refusal.message));
                }
            },
            Err(err) => {
                tracing::warn!("failed to accept a replication connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Tells a connection past the cap why, and closes it, spending at most a
/// second on a peer that does not read.
async fn refuse(mut stream: TcpStream, address: SocketAddr, message: String) {
    let line = format!("ERROR {message}\n");
    let goodbye = async {
        stream.write_all(line.as_bytes()).await?;
        stream.shutdown().await
    };
    if let Err(err) = tokio::time::timeout(Duration::from_secs(1), goodbye).await.unwrap_or(Ok(())) {
        tracing::debug!(%address, "could not tell a refused connection why: {err}");
    }
}

/// Connects to the master at `address` and reconnects, with backoff up to 5 s,
/// forever (until the task is dropped).
pub async fn connect_forever(hub: Arc<Hub>, address: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match TcpStream::connect(&address).await {
            Ok(stream) => {
                tracing::info!(%address, "connected to the replication server");
                backoff = Duration::from_millis(100);
                drive(Arc::clone(&hub), Transport::TcpClient, stream).await;
                if hub.is_shutting_down() {
                    return;
                }
                tracing::warn!(%address, "replication connection lost; reconnecting");
                hub.count_reconnect();
            }
            Err(err) => tracing::debug!(%address, "cannot reach the replication server: {err}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// What this end says first: the server greets; a client authenticates, names
/// itself and asks for positions (the hub then announces its own).
fn hello(hub: &Hub, transport: Transport) -> Vec<Command> {
    match transport {
        Transport::TcpServer { .. } => {
            vec![Command::Server { server_name: hub.server_name.clone() }, Command::Ping { data: now_ms() }]
        }
        Transport::TcpClient | Transport::Redis => {
            let mut hello = Vec::with_capacity(4);
            if let Some(secret) = hub.secret() {
                hello.push(Command::Auth { secret: secret.clone() });
            }
            hello.extend([
                Command::Name { name: hub.instance_name.clone() },
                Command::Ping { data: now_ms() },
                Command::Replicate,
            ]);
            hello
        }
    }
}

/// Runs one connection to its end.
pub(crate) async fn drive(hub: Arc<Hub>, transport: Transport, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let side = transport.side();
    let (mut reader, mut writer) = stream.into_split();
    let (peer, mut outgoing) = Peer::new(String::new());
    let last_sent = Arc::new(Mutex::new(Instant::now()));
    // Whoever ends the connection first tells the other half.
    let closing = Arc::new(Notify::new());

    let writer_task = {
        let (peer, last_sent, closing) = (Arc::clone(&peer), Arc::clone(&last_sent), Arc::clone(&closing));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    command = outgoing.recv() => {
                        let Some(command) = command else { break };
                        let close_after = command.name == CommandName::Error;
                        // A peer that stopped reading blocks this write: congestion
                        // must still end the connection.
                        let bytes = format!("{}\n", command.line);
                        tokio::select! {
                            written = writer.write_all(bytes.as_bytes()) => {
                                if written.is_err() {
                                    break;
                                }
                                // Counted as sent once written, so a shutdown that
                                // waits for the queues to drain waits for the writes.
                                peer.pending.fetch_sub(1, Ordering::AcqRel);
                            }
                            () = peer.congested.notified() => {
                                tracing::warn!("replication peer stopped reading; closing");
                                break;
                            }
                        }
                        *lock(&last_sent) = Instant::now();
                        if close_after {
                            break;
                        }
                    }
                    // Shutting down, everything queued written: end in order.
                    () = peer.close.notified() => break,
                    () = peer.congested.notified() => {
                        tracing::warn!(peer = %lock(&peer.name), "replication peer cannot keep up; closing");
                        // Bypass the queue: the peer reconnects and catches up.
                        let _ = writer.write_all(b"ERROR Failed to keep up\n").await;
                        break;
                    }
                }
            }
            let _ = writer.shutdown().await;
            closing.notify_one();
        })
    };

    let mut session = hub.open_session(transport, Arc::clone(&peer), &hello(&hub, transport)).await;
    let id = session.id;

    // Commands are applied by a task of their own, in order: a long catch-up
    // must not stop this loop from reading, pinging and noticing a dead peer.
    let (inbox, mut commands) = inbound_queue(&hub.settings);
    let (close, mut close_requests) = mpsc::unbounded_channel::<String>();
    let processor = {
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            while let Some(command) = commands.recv().await {
                if let Err(refusal) = hub.handle(&mut session, command).await {
                    hub.count_refusal(transport, &refusal);
                    let _ = close.send(refusal.message);
                    break;
                }
            }
        })
    };

    let settings = hub.settings;
    let mut decoder = LineDecoder::default();
    let mut buffer = vec![0u8; 8192];
    let mut last_received = Instant::now();
    let mut seen_ping = false;
    let mut received_any = false;
    let mut keepalive = tokio::time::interval(settings.ping_interval.min(settings.ping_timeout) / 2);
    let close_reason = 'connection: loop {
        tokio::select! {
            read = reader.read(&mut buffer) => {
                let n = match read {
                    Ok(0) | Err(_) => break 'connection None,
                    Ok(n) => n,
                };
                decoder.push(&buffer[..n]);
                while let Some(line) = decoder.next_line() {
                    let line = match line {
                        Ok(line) => line,
                        Err(err) => break 'connection Some(err.to_string()),
                    };
                    let command = match Command::parse(&line) {
                        Ok(command) => command,
                        Err(err) => break 'connection Some(format!("failed to parse line: {err}")),
                    };
                    if !command.name().accepted_by(side) {
                        break 'connection Some(format!("invalid command: {}", command.name()));
                    }
                    last_received = Instant::now();
                    received_any = true;
                    if matches!(command, Command::Ping { .. }) {
                        seen_ping = true;
                    }
                    match inbox.try_send(command, line.len()) {
                        Ok(()) => {}
                        Err(QueueError::Full) => {
                            let refusal = Refusal::too_many_waiting();
                            hub.count_refusal(transport, &refusal);
                            break 'connection Some(refusal.message);
                        }
                        // The processor stopped, most likely refusing a command:
                        // its reason goes to the peer.
                        Err(QueueError::Closed) => break 'connection close_requests.try_recv().ok(),
                    }
                }
            }
            _ = keepalive.tick() => {
                // Timeouts arm once the peer pinged (so a person at netcat is not
                // cut off mid-thought), and at once for a peer that has not
                // authenticated or never said anything valid.
                let armed = seen_ping || !received_any || !peer.authenticated.load(Ordering::Acquire);
                if armed && last_received.elapsed() > settings.ping_timeout {
                    break 'connection Some("ping timeout".to_owned());
                }
                let idle = lock(&last_sent).elapsed();
                if idle >= settings.ping_interval {
                    hub.send_to(&peer, &Command::Ping { data: now_ms() });
                }
            }
            () = closing.notified() => {
                if hub.is_shutting_down() {
                    // We ended the connection in order: read what the peer still
                    // sends until it closes too, since closing with unread input
                    // resets the connection, which can discard our last lines.
                    let drain = async { while matches!(reader.read(&mut buffer).await, Ok(n) if n > 0) {} };
                    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                }
                break 'connection None
            }
            reason = close_requests.recv() => break 'connection reason,
        }
    };
    processor.abort();
    hub.close_session(id);
    if let Some(reason) = close_reason {
        tracing::warn!(peer = %lock(&peer.name), reason, "closing a replication connection");
        hub.send_to(&peer, &Command::Error { message: reason });
        // The writer sends the ERROR, then stops; give it a moment to flush, and
        // no more: a peer that stopped reading must not keep the socket open.
        let abort = writer_task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), writer_task).await.is_err() {
            abort.abort();
        }
        // Closing with unread input resets the connection, and a reset can
        // discard the ERROR before the peer reads it: read what a peer still
        // sends (a flood, often) for a moment and throw it away.
        let drain = async { while matches!(reader.read(&mut buffer).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    } else {
        writer_task.abort();
    }
}
