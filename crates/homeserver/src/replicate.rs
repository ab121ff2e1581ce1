//! Wiring one process's replication: the streams it follows (every stream of
//! its stores, plus the in-memory ones), the streams it writes, the hub, and
//! the transports `[replication]` asks for.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use replication::http::HttpFetcher;
use replication::typing::{TYPING_STREAM, TypingFollower, TypingWriter};
use replication::{Hub, Inbound, Outbound, Settings, Stream, TypingStream};
use server_config::ServerConfig;
use tokio::task::JoinHandle;

/// How often expired typing notifications are cleared on the typing writer.
const TYPING_EXPIRY_INTERVAL: Duration = Duration::from_secs(5);

/// A process's running replication.
#[derive(Debug)]
pub(crate) struct Replication {
    pub(crate) hub: Arc<Hub>,
    /// Who types where: the handler on the typing writer, a follower elsewhere.
    pub(crate) typing: Arc<TypingStream>,
    /// Whether this process is a worker, which says goodbye with `CLEAR_USER_SYNC`.
    is_worker: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl Replication {
    /// Builds the hub over `store`'s streams and starts the streamer and the
    /// transports.
    pub(crate) async fn start(
        config: &ServerConfig,
        store: &dyn crate::ServerStore,
    ) -> anyhow::Result<Replication> {
        let mut followed = store.replication_streams();
        let mut written = store.written_streams();
        // The deployment's typing writer, as recorded (the config only seeds it).
        let settings = store.context().settings();
        let typing_writer = if settings.is_writer_for(TYPING_STREAM) {
            let writer = TypingWriter::new(&config.instance_name);
            writer.expire_forever(TYPING_EXPIRY_INTERVAL);
            Some(writer)
        } else {
            None
        };
        let typing = if let Some(writer) = &typing_writer {
            let typing = Arc::new(TypingStream::Writer(Arc::clone(writer)));
            let stream: Arc<dyn Stream> = Arc::clone(&typing) as Arc<dyn Stream>;
            followed.register(Arc::clone(&stream));
            written.push(stream);
            typing
        } else {
            // Missed typing rows live only in the writer's memory: fetch them over
            // HTTP when the deployment has a secret to ask with.
            // `check_stream_writers` made sure typing has exactly one writer.
            let writer = settings.writers_for(TYPING_STREAM).into_iter().next().unwrap_or_default();
            let follower = match &config.worker_replication_secret {
                Some(secret) => TypingFollower::fetching_from(
                    &writer,
                    HttpFetcher::new(config.instance_map.clone(), secret),
                ),
                None => TypingFollower::new(&writer),
            };
            let typing = Arc::new(TypingStream::Follower(follower));
            followed.register(Arc::clone(&typing) as Arc<dyn Stream>);
            typing
        };

        let generators: Vec<_> = written.iter().filter_map(|stream| stream.generator().cloned()).collect();
        let hub = Hub::new(
            &config.instance_name,
            &config.server_name,
            Settings::from_config(&config.replication),
            Inbound::new(&config.instance_name, followed),
            Outbound::new(&config.instance_name, written),
            // The TCP server relays between its clients, so writers reach each other.
            config.replication.listen.is_some(),
            config.worker_replication_secret.as_deref(),
        );
        for generator in generators {
            hub.wake_on(generator.subscribe());
        }
        if let Some(writer) = &typing_writer {
            hub.wake_on(writer.subscribe());
        }
        let mut tasks = vec![tokio::spawn(Arc::clone(&hub).run_streamer())];
        tasks.extend(
            replication::transports::start(&hub, &config.replication)
                .await
                .map_err(anyhow::Error::msg)
                .context("start replication")?,
        );
        if store.context().caches().is_recording() {
            tasks.push(store.context().caches().prune_forever());
        }
        let is_worker = config.instance_name != server_config::MASTER_INSTANCE;
        Ok(Replication { hub, typing, is_worker, tasks })
    }

    /// Sends what is left (the final positions, then `CLEAR_USER_SYNC`) and
    /// closes the connections.
    pub(crate) async fn shut_down(self) {
        const DRAIN: Duration = Duration::from_secs(2);
        self.hub.notify_local_write();
        let caught_up = async {
            while !self.hub.is_caught_up() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(DRAIN, caught_up).await.is_err() {
            tracing::warn!("the last positions were not all sent before shutdown");
        }
        self.hub.shut_down(self.is_worker, DRAIN).await;
        for task in self.tasks {
            task.abort();
        }
    }
}
