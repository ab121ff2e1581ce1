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
//!
//! The client is the `redis` crate (redis-rs): it parses `redis://` and
//! `rediss://` URLs (ACL user and password, database number), authenticates,
//! and speaks TLS with the system's roots. Reconnecting stays ours, because a
//! new subscription must be followed by this process's positions, in order.
//!
//! Redis access is replication access, as in Synapse: whoever can publish on
//! the channel can say anything a process may say. A process still refuses
//! what no process may say (a writer that does not write the stream, a token
//! past what the stream handed out): such messages are dropped, logged once per
//! writer and counted.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use replication_proto::{Command, CommandName};
use tokio::sync::{Notify, mpsc};

use crate::hub::{Hub, Outgoing, Peer, QueueError, Refusal, Session, Transport, inbound_queue};

/// How long connecting, subscribing and each publication may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands published in one pipelined round trip at most.
const PUBLISH_BATCH: usize = 256;

/// Where Redis is, from a `redis://` or `rediss://` URL with optional
/// `user:password@` and database number. Neither its `Debug` nor any message
/// built from it shows the password.
#[derive(Clone)]
pub struct RedisAddress {
    client: redis::Client,
    /// `host:port`, for logs.
    host_port: String,
}

impl fmt::Debug for RedisAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAddress").field("host_port", &self.host_port).finish_non_exhaustive()
    }
}

impl fmt::Display for RedisAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.host_port)
    }
}

impl RedisAddress {
    /// Parses a `redis://` or `rediss://` URL.
    pub fn parse(url: &str) -> Result<RedisAddress, String> {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err("the URL does not start with redis:// or rediss://".to_owned());
        }
        // redis-rs's messages may quote the URL: say what is wrong in our words.
        let client = redis::Client::open(url).map_err(|_| "the URL is not a valid Redis URL".to_owned())?;
        let host_port = client.get_connection_info().addr().to_string();
        Ok(RedisAddress { client, host_port })
    }

    /// `host:port`.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    fn connection_config() -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
    }

    /// A connection for commands, named `name` (visible in Redis's `CLIENT
    /// LIST`, which operators use to find a connection).
    async fn command_connection(&self, name: &str) -> Result<MultiplexedConnection, String> {
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&RedisAddress::connection_config())
            .await
            .map_err(|err| describe(&err))?;
        let name: String = name.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect();
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .query_async::<()>(&mut connection)
            .await
            .map_err(|err| format!("CLIENT SETNAME refused: {}", describe(&err)))?;
        Ok(connection)
    }

    /// A subscription to `channels`, confirmed by Redis.
    async fn subscription(&self, channels: &[&str]) -> Result<(PubSubSink, PubSubStream), String> {
        let open = async {
            let pubsub = self.client.get_async_pubsub().await.map_err(|err| describe(&err))?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(channels).await.map_err(|err| format!("SUBSCRIBE failed: {}", describe(&err)))?;
            Ok((sink, stream))
        };
        tokio::time::timeout(REDIS_TIMEOUT, open).await.map_err(|_| "no answer within 10 s".to_owned())?
    }
}

/// What went wrong talking to Redis, without anything from the URL.
fn describe(err: &redis::RedisError) -> String {
    match err.kind() {
        redis::ErrorKind::AuthenticationFailed => "authentication refused".to_owned(),
        _ if err.is_timeout() => "no answer in time".to_owned(),
        _ if err.is_io_error() => format!("cannot connect: {}", err.category()),
        kind => format!("{kind:?}: {}", err.detail().unwrap_or_else(|| err.category())),
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
            Ok(()) => tracing::warn!(redis = %address, "Redis connection lost; reconnecting"),
            Err(err) => tracing::warn!(redis = %address, "Redis replication failed: {err}; reconnecting"),
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
    let check = async {
        let mut connection = address.command_connection("startup-check").await?;
        redis::cmd("PING").query_async::<()>(&mut connection).await.map_err(|err| describe(&err))
    };
    match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("Redis at {address}: {err}")),
        Err(_) => Err(format!("Redis at {address}: no answer within 5 s")),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connected session: subscribe, then announce, then follow, until the
/// connection fails.
async fn session(hub: &Arc<Hub>, address: &RedisAddress) -> Result<(), String> {
    let base = hub.server_name.clone();
    let user_ip = user_ip_channel(&base);
    // Nothing is announced until the subscription is live: a REPLICATE sent
    // before it could be answered while we were not yet listening.
    let (sink, messages) = address.subscription(&[user_ip.as_str(), base.as_str()]).await?;
    let publisher = address.command_connection(&format!("{base}-{}-pub", hub.instance_name)).await?;

    let (peer, outgoing) = Peer::new(format!("redis {address}"));
    let failed = Arc::new(Notify::new());
    let _publisher = AbortOnDrop(tokio::spawn(publish(
        Arc::clone(hub),
        Arc::clone(&peer),
        publisher,
        outgoing,
        Arc::clone(&failed),
    )));
    let _pinger = AbortOnDrop(tokio::spawn(ping(hub.settings, sink, Arc::clone(&failed))));

    let session = hub.open_session(Transport::Redis, peer, &[Command::Replicate]).await;
    let id = session.id;
    let result = follow(hub, session, messages, &failed).await;
    hub.close_session(id);
    // A connection that was up is lost; failed attempts are not counted.
    hub.count_reconnect();
    result
}

/// Pings Redis on the subscription every ping interval: its answer, within the
/// ping timeout, proves the connection is alive even when nobody publishes.
async fn ping(settings: crate::Settings, mut sink: PubSubSink, failed: Arc<Notify>) {
    loop {
        tokio::time::sleep(settings.ping_interval).await;
        match tokio::time::timeout(settings.ping_timeout, sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!("Redis did not answer a PING: {}", describe(&err));
                break;
            }
            Err(_) => {
                tracing::warn!("Redis went silent");
                break;
            }
        }
    }
    failed.notify_one();
}

/// Publishes queued commands, as many as are waiting in one pipelined round
/// trip, in order.
async fn publish(
    hub: Arc<Hub>,
    peer: Arc<Peer>,
    mut connection: MultiplexedConnection,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    failed: Arc<Notify>,
) {
    let user_ip_channel = user_ip_channel(&hub.server_name);
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        tokio::select! {
            count = outgoing.recv_many(&mut batch, PUBLISH_BATCH) => {
                if count == 0 {
                    break;
                }
                let mut pipeline = redis::pipe();
                for command in &batch {
                    // `USER_IP` has a channel of its own; everything else shares one.
                    let channel =
                        if command.name == CommandName::UserIp { &user_ip_channel } else { &hub.server_name };
                    pipeline.cmd("PUBLISH").arg(channel).arg(command.line.as_bytes()).ignore();
                }
                // A Redis that stopped answering blocks this round trip:
                // congestion must still end the session.
                tokio::select! {
                    published = pipeline.query_async::<()>(&mut connection) => {
                        if let Err(err) = published {
                            tracing::warn!("cannot publish to Redis: {}", describe(&err));
                            break;
                        }
                        // Counted as sent once Redis took them, so a shutdown that
                        // waits for the queues to drain waits for the publications.
                        peer.pending.fetch_sub(batch.len(), Ordering::AcqRel);
                        batch.clear();
                    }
                    () = peer.congested.notified() => {
                        tracing::warn!("Redis stopped taking publications; reconnecting");
                        break;
                    }
                }
            }
            // Shutting down, with everything queued already published.
            () = peer.close.notified() => break,
            () = peer.congested.notified() => {
                tracing::warn!("cannot publish fast enough to Redis; reconnecting");
                break;
            }
        }
    }
    failed.notify_one();
}

/// Applies what arrives on the subscription, until the connection fails or
/// goes silent.
async fn follow(
    hub: &Arc<Hub>,
    mut session: Session,
    mut messages: PubSubStream,
    failed: &Notify,
) -> Result<(), String> {
    let (inbox, mut commands) = inbound_queue(&hub.settings);
    // Set when a message had to be dropped because the handler fell behind.
    let lost = Arc::new(AtomicBool::new(false));
    let _processor = AbortOnDrop(tokio::spawn({
        let (hub, lost) = (Arc::clone(hub), Arc::clone(&lost));
        async move {
            while let Some(command) = commands.recv().await {
                if lost.swap(false, Ordering::AcqRel) {
                    // Commands of some writers were dropped: the next ones may not
                    // follow, so catch up from the database and ask everyone again.
                    session.lose_sequence();
                    hub.send_to(&session.peer, &Command::Replicate);
                }
                if let Err(refusal) = hub.handle(&mut session, command).await {
                    hub.count_refusal(Transport::Redis, &refusal);
                }
            }
        }
    }));
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return Ok(()) };
                let Ok(line) = std::str::from_utf8(message.get_payload_bytes()) else {
                    tracing::warn!("ignoring a replication message that is not UTF-8");
                    continue;
                };
                match Command::parse(line) {
                    // No sides over Redis: every command is accepted. Applied by a
                    // task of its own, so a long catch-up never stops this loop
                    // from reading.
                    Ok(command) => match inbox.try_send(command, line.len()) {
                        Ok(()) => {}
                        Err(QueueError::Full) => {
                            hub.count_refusal(Transport::Redis, &Refusal::too_many_waiting());
                            lost.store(true, Ordering::Release);
                        }
                        Err(QueueError::Closed) => return Err("the command processor stopped".to_owned()),
                    },
                    // A bad message affects nobody else: log it and go on.
                    Err(err) => tracing::warn!("ignoring an unparsable replication message: {err}"),
                }
            }
            () = failed.notified() => return Err("the Redis connection failed".to_owned()),
        }
    }
}
