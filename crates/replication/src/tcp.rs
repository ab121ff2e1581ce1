//! The TCP transport: the master listens, workers connect; both ends speak the
//! line protocol with keepalive, congestion control and strict parsing.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replication_proto::{Command, CommandName, LineDecoder, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use crate::hub::{Hub, Peer};
use crate::lock;

fn now_ms() -> String {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis()).to_string()
}

/// Accepts workers on `listener` until the task is dropped.
pub async fn serve(hub: Arc<Hub>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, address)) => {
                tracing::info!(%address, "replication client connected");
                tokio::spawn(drive(Arc::clone(&hub), Side::Server, stream));
            }
            Err(err) => {
                tracing::warn!("failed to accept a replication connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
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
                drive(Arc::clone(&hub), Side::Client, stream).await;
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

/// Runs one connection to its end.
pub(crate) async fn drive(hub: Arc<Hub>, side: Side, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (peer, mut outgoing) = Peer::new(String::new());
    let id = hub.add_peer(Arc::clone(&peer));
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

    let hello: Vec<Command> = match side {
        Side::Server => {
            vec![Command::Server { server_name: hub.server_name.clone() }, Command::Ping { data: now_ms() }]
        }
        Side::Client => vec![
            Command::Name { name: hub.instance_name.clone() },
            Command::Ping { data: now_ms() },
            Command::Replicate,
        ],
    };
    for command in hello {
        hub.send_to(&peer, &command);
    }

    // Commands are applied by a task of their own, in order: a long catch-up
    // must not stop this loop from reading, pinging and noticing a dead peer.
    let (inbox, mut commands) = mpsc::unbounded_channel::<Command>();
    let (close, mut close_requests) = mpsc::unbounded_channel::<String>();
    let processor = {
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            while let Some(command) = commands.recv().await {
                if let Err(reason) = hub.handle(id, side, command).await {
                    let _ = close.send(reason);
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
                    if matches!(command, Command::Ping { .. }) {
                        seen_ping = true;
                    }
                    if inbox.send(command).is_err() {
                        break 'connection None;
                    }
                }
            }
            _ = keepalive.tick() => {
                if seen_ping && last_received.elapsed() > settings.ping_timeout {
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
    hub.remove_peer(id);
    if let Some(reason) = close_reason {
        tracing::warn!(peer = %lock(&peer.name), reason, "closing a replication connection");
        hub.send_to(&peer, &Command::Error { message: reason });
        // The writer sends the ERROR, then stops; give it a moment to flush, and
        // no more: a peer that stopped reading must not keep the socket open.
        let abort = writer_task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), writer_task).await.is_err() {
            abort.abort();
        }
    } else {
        writer_task.abort();
    }
}
