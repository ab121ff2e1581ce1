//! The Redis transport: every process publishes its commands on the channel
//! named after the homeserver and subscribes to it.
//!
//! Redis is a doorbell and the database is the truth: pub/sub delivers at most
//! once and drops slow subscribers, so nothing depends on a message arriving.
//! On every (re)connect a process subscribes *first*, and only once Redis has
//! confirmed the subscription asks the others for their positions (`REPLICATE`)
//! and announces its own; anything missed in between is caught up from the
//! database when the positions arrive. A silent or half-open connection is
//! noticed by pinging and replaced, forever, with backoff.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use replication_proto::{Command, CommandName, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};

use crate::hub::{Hub, Outgoing, Peer};
use crate::resp::{RespDecoder, RespValue, encode};

/// Where Redis is, from a `redis://[[user]:password@]host[:port][/db]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddress {
    /// `host:port`.
    pub host_port: String,
    /// The user for `AUTH`, if any.
    pub username: Option<String>,
    /// The password for `AUTH`, if any.
    pub password: Option<String>,
}

impl RedisAddress {
    /// Parses a `redis://` URL; `rediss://` (TLS) is not supported.
    pub fn parse(url: &str) -> Result<RedisAddress, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| "the URL does not start with redis:// (TLS is not supported)".to_owned())?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((credentials, host_port)) => (Some(credentials), host_port),
            None => (None, authority),
        };
        if host_port.is_empty() {
            return Err("the URL names no host".to_owned());
        }
        let host_port =
            if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:6379") };
        let (username, password) = match credentials.map(|c| c.split_once(':').unwrap_or(("", c))) {
            Some((user, password)) => (
                (!user.is_empty()).then(|| user.to_owned()),
                (!password.is_empty()).then(|| password.to_owned()),
            ),
            None => (None, None),
        };
        Ok(RedisAddress { host_port, username, password })
    }
}

/// The channel `USER_IP` goes on; every other command goes on the server name.
fn user_ip_channel(server_name: &str) -> String {
    format!("{server_name}/USER_IP")
}

/// Keeps `hub` connected to Redis at `address` until the task is dropped.
pub async fn run_forever(hub: Arc<Hub>, address: RedisAddress) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let ended = session(&hub, &address).await;
        if hub.is_shutting_down() {
            return;
        }
        match ended {
            Ok(()) => tracing::warn!(redis = %address.host_port, "Redis connection lost; reconnecting"),
            Err(err) => {
                tracing::warn!(redis = %address.host_port, "Redis replication failed: {err}; reconnecting")
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Checks once that Redis answers at `address` (and accepts our credentials):
/// at start-up, an unreachable Redis is a configuration error to report, not
/// an outage to wait out.
pub async fn check_reachable(address: &RedisAddress) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(5), open(address, "startup-check")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("Redis at {}: {err}", address.host_port)),
        Err(_) => Err(format!("Redis at {}: no answer within 5 s", address.host_port)),
    }
}

/// Opens a connection, authenticates, and names it `name` (visible in Redis's
/// `CLIENT LIST`, which operators use to find a stuck subscriber).
async fn open(address: &RedisAddress, name: &str) -> Result<(TcpStream, RespDecoder), String> {
    let mut stream =
        TcpStream::connect(&address.host_port).await.map_err(|err| format!("cannot connect: {err}"))?;
    let _ = stream.set_nodelay(true);
    let mut decoder = RespDecoder::default();
    if let Some(password) = &address.password {
        let auth = match &address.username {
            Some(user) => encode(&[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => encode(&[b"AUTH", password.as_bytes()]),
        };
        stream.write_all(&auth).await.map_err(|err| err.to_string())?;
        match read_value(&mut stream, &mut decoder).await? {
            RespValue::Simple(_) => {}
            other => return Err(format!("AUTH refused: {other:?}")),
        }
    }
    let name: String = name.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect();
    stream
        .write_all(&encode(&[b"CLIENT", b"SETNAME", name.as_bytes()]))
        .await
        .map_err(|err| err.to_string())?;
    match read_value(&mut stream, &mut decoder).await? {
        RespValue::Simple(_) => {}
        other => return Err(format!("CLIENT SETNAME refused: {other:?}")),
    }
    Ok((stream, decoder))
}

async fn read_value(stream: &mut TcpStream, decoder: &mut RespDecoder) -> Result<RespValue, String> {
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(value) = decoder.next_value() {
            return value.map_err(|err| err.to_string());
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .map_err(|_| "Redis did not answer".to_owned())?
            .map_err(|err| err.to_string())?;
        if n == 0 {
            return Err("Redis closed the connection".to_owned());
        }
        decoder.push(&buffer[..n]);
    }
}

/// Whether `parts` is Redis's confirmation of a subscription to `channel`.
fn is_subscribed_to(parts: &[RespValue], channel: &str) -> bool {
    matches!(parts, [RespValue::Bulk(Some(kind)), RespValue::Bulk(Some(name)), _]
        if kind == b"subscribe" && name == channel.as_bytes())
}

/// One connected session: subscribe, then announce, then follow, until the
/// connection fails.
async fn session(hub: &Arc<Hub>, address: &RedisAddress) -> Result<(), String> {
    let (mut subscriber, mut decoder) =
        open(address, &format!("{}-{}-sub", hub.server_name, hub.instance_name)).await?;
    let base = hub.server_name.clone();
    // The extra channel first, then the base one, whose confirmation ends the
    // wait (Redis confirms in order).
    let user_ip = user_ip_channel(&base);
    subscriber
        .write_all(&encode(&[b"SUBSCRIBE", user_ip.as_bytes(), base.as_bytes()]))
        .await
        .map_err(|err| err.to_string())?;
    // Nothing is announced until the subscription is live: a REPLICATE sent
    // before it could be answered while we were not yet listening.
    loop {
        match read_value(&mut subscriber, &mut decoder).await? {
            RespValue::Array(Some(parts)) if is_subscribed_to(&parts, &base) => break,
            other => tracing::debug!(?other, "waiting for the subscription to be confirmed"),
        }
    }
    let (publisher, _) = open(address, &format!("{}-{}-pub", hub.server_name, hub.instance_name)).await?;

    let (peer, outgoing) = Peer::new(format!("redis {}", address.host_port));
    let id = hub.add_peer(Arc::clone(&peer));
    let failed = Arc::new(Notify::new());
    let publisher_task =
        tokio::spawn(publish(Arc::clone(hub), Arc::clone(&peer), publisher, outgoing, Arc::clone(&failed)));

    hub.send_to(&peer, &Command::Replicate);
    hub.announce_to(&peer);
    let result = follow(hub, id, &mut subscriber, decoder, &failed).await;
    hub.remove_peer(id);
    // A connection that was up is lost; failed attempts are not counted.
    hub.count_reconnect();
    publisher_task.abort();
    result
}

/// Publishes queued commands and drains Redis's replies.
async fn publish(
    hub: Arc<Hub>,
    peer: Arc<Peer>,
    publisher: TcpStream,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    failed: Arc<Notify>,
) {
    let (mut replies, mut writer) = publisher.into_split();
    let user_ip_channel = user_ip_channel(&hub.server_name);
    // Aborted with this function (also when this task itself is aborted), so a
    // half-open connection's reader cannot outlive the session.
    let mut drain = AbortOnDrop(tokio::spawn({
        let failed = Arc::clone(&failed);
        async move {
            let mut buffer = [0u8; 4096];
            let mut decoder = RespDecoder::default();
            loop {
                match replies.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        decoder.push(&buffer[..n]);
                        while let Some(value) = decoder.next_value() {
                            match value {
                                Ok(RespValue::Error(message)) => {
                                    tracing::warn!(message, "Redis refused a publication");
                                }
                                Ok(_) => {}
                                Err(err) => {
                                    tracing::warn!("unreadable reply from Redis: {err}");
                                    failed.notify_one();
                                    return;
                                }
                            }
                        }
                    }
                }
            }
            failed.notify_one();
        }
    }));
    loop {
        tokio::select! {
            command = outgoing.recv() => {
                let Some(command) = command else { break };
                // `USER_IP` has a channel of its own; everything else shares one.
                let channel = if command.name == CommandName::UserIp { &user_ip_channel } else { &hub.server_name };
                let request = encode(&[b"PUBLISH", channel.as_bytes(), command.line.as_bytes()]);
                // A Redis that stopped reading blocks this write: congestion must
                // still end the session.
                tokio::select! {
                    written = writer.write_all(&request) => {
                        if written.is_err() {
                            break;
                        }
                        // Counted as sent once written, so a shutdown that waits
                        // for the queues to drain waits for the writes.
                        peer.pending.fetch_sub(1, Ordering::AcqRel);
                    }
                    () = peer.congested.notified() => {
                        tracing::warn!("Redis stopped taking publications; reconnecting");
                        break;
                    }
                }
            }
            () = peer.close.notified() => {
                // Shutting down: end the connection in order, so that nothing
                // written is lost to a reset, and let Redis answer the rest.
                let _ = writer.shutdown().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut drain.0).await;
                break;
            }
            () = peer.congested.notified() => {
                tracing::warn!("cannot publish fast enough to Redis; reconnecting");
                break;
            }
        }
    }
    failed.notify_one();
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Applies what arrives on the subscription and pings Redis, until the
/// connection fails or goes silent.
async fn follow(
    hub: &Arc<Hub>,
    id: u64,
    subscriber: &mut TcpStream,
    mut decoder: RespDecoder,
    failed: &Notify,
) -> Result<(), String> {
    let (inbox, mut commands) = mpsc::unbounded_channel::<Command>();
    let _processor = AbortOnDrop(tokio::spawn({
        let hub = Arc::clone(hub);
        async move {
            while let Some(command) = commands.recv().await {
                if let Err(reason) = hub.handle(id, Side::Server, command).await {
                    tracing::warn!(reason, "ignoring a replication message");
                }
            }
        }
    }));
    let settings = hub.settings;
    let mut buffer = vec![0u8; 16 * 1024];
    let mut last_received = Instant::now();
    let mut keepalive = tokio::time::interval(settings.ping_interval);
    loop {
        tokio::select! {
            read = subscriber.read(&mut buffer) => {
                let n = read.map_err(|err| err.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                last_received = Instant::now();
                decoder.push(&buffer[..n]);
                while let Some(value) = decoder.next_value() {
                    let value = value.map_err(|err| err.to_string())?;
                    let RespValue::Array(Some(parts)) = value else { continue };
                    let [RespValue::Bulk(Some(kind)), _, RespValue::Bulk(Some(payload))] = parts.as_slice() else { continue };
                    if kind != b"message" {
                        continue;
                    }
                    let Ok(line) = std::str::from_utf8(payload) else {
                        tracing::warn!("ignoring a replication message that is not UTF-8");
                        continue;
                    };
                    match Command::parse(line) {
                        // No sides over Redis: every command is accepted. Applied by
                        // a task of its own, so a long catch-up never stops this loop
                        // from reading and pinging.
                        Ok(command) => {
                            if inbox.send(command).is_err() {
                                return Err("the command processor stopped".to_owned());
                            }
                        }
                        // A bad message affects nobody else: log it and go on.
                        Err(err) => tracing::warn!("ignoring an unparsable replication message: {err}"),
                    }
                }
            }
            _ = keepalive.tick() => {
                if last_received.elapsed() > settings.ping_timeout {
                    return Err("Redis went silent".to_owned());
                }
                // PING is allowed on a subscribed connection; its answer proves the
                // connection is alive even when nobody publishes.
                subscriber.write_all(&encode(&[b"PING"])).await.map_err(|err| err.to_string())?;
            }
            () = failed.notified() => return Err("the publishing connection failed".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RedisAddress;

    #[test]
    fn urls_parse() {
        let parse = |url: &str| RedisAddress::parse(url);
        assert_eq!(parse("redis://127.0.0.1:6379").unwrap().host_port, "127.0.0.1:6379");
        assert_eq!(parse("redis://localhost").unwrap().host_port, "localhost:6379");
        let with_password = parse("redis://:s3cret@db:7000/2").unwrap();
        assert_eq!(
            (with_password.host_port.as_str(), with_password.password.as_deref()),
            ("db:7000", Some("s3cret"))
        );
        assert_eq!(with_password.username, None);
        let with_user = parse("redis://me:pw@db").unwrap();
        assert_eq!((with_user.username.as_deref(), with_user.password.as_deref()), (Some("me"), Some("pw")));
        assert!(parse("rediss://db").is_err());
        assert!(parse("redis://").is_err());
    }
}
