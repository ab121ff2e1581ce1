//! What the `master` and `worker` binaries run: parse the command line and config,
//! connect to the database, build the stores (applying their migrations), start
//! replication, serve HTTP until SIGINT or SIGTERM, then shut down cleanly:
//! finish the requests in flight, record the final positions, send them and
//! `CLEAR_USER_SYNC`, close.
//!
//! Both reference binaries are one call to [`main`] with their [`Role`], on the
//! reference composition `slaved_stores::DataStore`. A server with store crates
//! of its own calls [`main_with`] instead, with its own composition (any
//! [`ServerStore`]) and the routes that serve its crates: every stream of the
//! composition is then replicated, reported and recorded like ours. The role
//! changes only a few config rules (a worker needs PostgreSQL and a replication
//! transport) and the defaults. Which streams a process writes comes from the
//! config, not from the binary.

use slaved_stores::prelude::*;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use server_config::{DEFAULT_SQLITE_URL, Overrides, Role, ServerConfig};
use slaved_stores::DataStore;
use store_core::{Composition, Database, DatabaseOptions, Store, build_store};

mod client;
mod elastic;
mod http;
mod metrics;
mod replicate;
#[cfg(feature = "test-endpoints")]
mod test_endpoints;

/// The command line both binaries accept.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "A homeserver process sharing one database with the others of its deployment.",
    long_about = "A homeserver process sharing one database with the others of its deployment.\n\n\
        The master runs alone on an embedded SQLite database under ./data/ when started without \
        --config; workers always need a config file naming a PostgreSQL database.\n\n\
        Logs go to stderr; set their level with RUST_LOG (e.g. RUST_LOG=debug, or \
        RUST_LOG=store_core=debug,info). The default is info."
)]
pub struct Cli {
    /// The TOML config file (see docs/config.md). Values given by the flags below
    /// replace the file's.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The database: postgres://USER@HOST:PORT/DB, sqlite://PATH or sqlite::memory:.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// This process's name in the deployment; the master is always `master`.
    #[arg(long, value_name = "NAME")]
    pub instance_name: Option<String>,
    /// The HTTP listener's address, IP:PORT (port 0 picks a free one).
    #[arg(long, value_name = "IP:PORT")]
    pub http_listen: Option<String>,
    /// Instead of serving: an operator's command to the running deployment.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The operator's commands, sent to the running master's admin endpoints
/// with the config's `worker_replication_secret`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The writers of an elastic stream (events, receipts).
    Writers {
        /// What to do with them.
        #[command(subcommand)]
        action: WritersAction,
        /// The master's HTTP address, HOST:PORT (default: `[instance_map]
        /// master`, or this config's own HTTP address).
        #[arg(long, value_name = "HOST:PORT", global = true)]
        master: Option<String>,
    },
}

/// `writers set` and `writers show`.
#[derive(Debug, clap::Subcommand)]
pub enum WritersAction {
    /// Makes these instances the stream's writers, in this order (a new epoch).
    Set {
        /// The stream.
        stream: String,
        /// Its writers, in order.
        #[arg(required = true)]
        writers: Vec<String>,
    },
    /// Shows the stream's epoch, each writer's state and whether the
    /// deployment settled on it.
    Show {
        /// The stream.
        stream: String,
    },
}

/// What the reference server needs of a process's top-level store: the streams
/// it runs ([`Composition`]), and the events, receipts, account data and
/// accounts the client API serves. A composition with more store crates than
/// ours is one too.
pub trait ServerStore:
    Composition + EventsWriteStore + ReceiptsWriteStore + AccountDataWriteStore + HasUsers
{
}

impl<S: Composition + EventsWriteStore + ReceiptsWriteStore + AccountDataWriteStore + HasUsers> ServerStore
    for S
{
}

/// Re-exported so that routes added through [`main_with`] are built with the
/// same axum as the listener they join.
pub use axum;

/// Runs a reference process (`slaved_stores::DataStore`) to completion and
/// turns the outcome into an exit code: 0 after a clean shutdown, 1 with one
/// `error: …` line on stderr otherwise.
pub fn main(role: Role) -> ExitCode {
    main_with::<DataStore, _>(role, |_store, _config| axum::Router::new())
}

/// Runs a process on the composition `S` to completion, like [`main`]: `S` is
/// built with `build_store` (its crates' migrations first), every stream it
/// lists is followed, and those this instance writes are announced; `routes`
/// gets the built store and the config and returns what the process serves
/// beyond the reference server's endpoints, merged into the same listener.
///
/// ```no_run
/// use std::process::ExitCode;
///
/// use homeserver::axum::{Router, routing::get};
/// use server_config::Role;
/// use slaved_stores::DataStore;
///
/// fn main() -> ExitCode {
///     homeserver::main_with::<DataStore, _>(Role::Master, |_store, _config| {
///         Router::new().route("/hello", get(|| async { "hello" }))
///     })
/// }
/// ```
pub fn main_with<S, R>(role: Role, routes: R) -> ExitCode
where
    S: Store + ServerStore,
    R: FnOnce(Arc<S>, &ServerConfig) -> axum::Router + Send + 'static,
{
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command {
        Some(Command::Writers { ref action, ref master }) => {
            runtime.block_on(writers_command(role, &cli, action, master.as_deref()))
        }
        None => runtime.block_on(run::<S, R>(role, cli, routes)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` joins the context chain on one line: one clear line per failure.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // stderr, so stdout carries only the start-up line scripts may read.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Loads the config for `role` from the command line.
pub fn load_config(role: Role, cli: &Cli) -> anyhow::Result<ServerConfig> {
    let overrides = Overrides {
        database_url: cli.database_url.clone(),
        instance_name: cli.instance_name.clone(),
        http_listen: cli.http_listen.clone(),
    };
    let config = match &cli.config {
        Some(path) => ServerConfig::load(path, role, &overrides)?,
        None => ServerConfig::defaults(role, &overrides)?,
    };
    Ok(config)
}

async fn run<S, R>(role: Role, cli: Cli, routes: R) -> anyhow::Result<()>
where
    S: Store + ServerStore,
    R: FnOnce(Arc<S>, &ServerConfig) -> axum::Router,
{
    let config = load_config(role, &cli)?;
    // Every process serves the client API, which forwards writes to their writers.
    config.check_client_forwarding(&[
        store_events::EVENTS_STREAM,
        store_receipts::RECEIPTS_STREAM,
        store_account_data::ACCOUNT_DATA_STREAM,
        replication::typing::TYPING_STREAM,
    ])?;
    // Claim the port first: a port in use is the cheapest failure to report, and
    // must not leave a half-migrated database behind it.
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("listen for HTTP on {}", config.http.listen))?;
    if config.database.url == DEFAULT_SQLITE_URL {
        // The embedded default must work on a clean checkout.
        std::fs::create_dir_all("data").context("create the data directory ./data")?;
    }
    tracing::debug!(url = %config.database.url, "connecting to the database");
    let options = DatabaseOptions { pool_size: config.database.pool_size, ..DatabaseOptions::default() };
    let db = Database::connect_with(&config.database.url, &options).await.context("open the database")?;
    let store = Arc::new(build_store::<S>(&db, &config.store_settings()).await.context("build the stores")?);
    let extra_routes = routes(Arc::clone(&store), &config);
    let store: Arc<dyn ServerStore> = store;
    let migrations = db.migrations();
    if !migrations.applied_now.is_empty() || !migrations.adopted_now.is_empty() {
        tracing::info!(
            applied = ?migrations.applied_now,
            adopted = ?migrations.adopted_now,
            "applied database migrations"
        );
    }
    let replication = replicate::Replication::start(&config, store.as_ref()).await?;

    let address = listener.local_addr().context("read the HTTP listener's address")?;
    // So that the others find this process without an `[instance_map]` entry.
    match config.http.advertised(address) {
        Some(advertised) => {
            if let Err(err) = store_core::record_http_address(&db, &config.instance_name, &advertised).await {
                tracing::warn!("failed to record this process's HTTP address ({advertised}): {err}");
            }
        }
        None => tracing::info!(
            "listening on a wildcard address without `[http] advertise`: other processes reach this one only through their `[instance_map]`"
        ),
    }
    let elastic = Arc::new(elastic::ElasticWriters::new(
        db.clone(),
        &config.instance_name,
        Arc::clone(store.context().deployment_writers()),
        &store.replication_streams(),
        store.context().registry(),
        std::time::Duration::from_millis(config.replication.handover_timeout_ms),
        store.context().settings().has_other_processes,
    ));
    let elastic_task = elastic.start().await;
    let signals = listen_for_shutdown()?;
    announce(role, &config, &db, address);

    let config = Arc::new(config);
    let (shutdown_started, shutting_down) = tokio::sync::watch::channel(false);
    let app = http::router(
        http::AppState {
            config: Arc::clone(&config),
            store: Arc::clone(&store),
            hub: Arc::clone(&replication.hub),
            typing: Arc::clone(&replication.typing),
            elastic,
            instance_ids: Arc::new(store_core::InstanceIds::new(db.clone())),
            room_locks: Arc::default(),
            login_throttle: Arc::default(),
            registration_nonces: Arc::default(),
            internal_client: replication::http::InternalClient::new(),
            writer_addresses: Arc::new(client::WriterAddresses::new(db.clone())),
            shutting_down,
        },
        extra_routes,
    );
    // Graceful: requests in flight (writes among them) finish first.
    // With each connection's peer address: failed logins are slowed per address.
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown_signal(signals, shutdown_started))
        .await
        .context("serve HTTP")?;

    tracing::info!("shutting down");
    elastic_task.abort();
    if let Err(err) = store.flush_positions().await {
        tracing::warn!("failed to record the final stream positions: {err}");
    }
    replication.shut_down().await;
    db.close().await;
    Ok(())
}

/// `writers set|show`: one call to the master's admin endpoint; prints its
/// answer.
#[expect(clippy::print_stdout, reason = "the command's answer is its output")]
async fn writers_command(
    role: Role,
    cli: &Cli,
    action: &WritersAction,
    master: Option<&str>,
) -> anyhow::Result<()> {
    let config = load_config(role, cli)?;
    let secret = config
        .worker_replication_secret
        .as_deref()
        .context("the config has no `worker_replication_secret`, which the admin endpoint needs")?;
    let address = match master {
        Some(address) => address.to_owned(),
        None => match config.instance_map.get(server_config::MASTER_INSTANCE) {
            Some(address) => address.clone(),
            None => {
                let listen = config.http.listen;
                config.http.advertised(listen).unwrap_or_else(|| format!("127.0.0.1:{}", listen.port()))
            }
        },
    };
    let client = replication::http::InternalClient::new();
    let (method, stream, body) = match action {
        WritersAction::Set { stream, writers } => {
            ("PUT", stream, Some(serde_json::json!({ "writers": writers }).to_string()))
        }
        WritersAction::Show { stream } => ("GET", stream, None),
    };
    let path = format!("/admin/v1/stream_writers/{stream}");
    let (status, answer) = client
        .request(&address, method, &path, secret, body.as_deref())
        .await
        .map_err(|why| anyhow::anyhow!("the master at {address} did not answer: {why}"))?;
    if !(200..300).contains(&status) {
        anyhow::bail!("the master refused ({status}): {answer}");
    }
    println!("{answer}");
    Ok(())
}

/// Prints the one line a person or script reads to find the process.
#[expect(clippy::print_stdout, reason = "the start-up line is the binary's output, not a log")]
fn announce(role: Role, config: &ServerConfig, db: &Database, address: std::net::SocketAddr) {
    let data = match db.engine() {
        store_core::Engine::Sqlite => {
            let path = db.display_url().trim_start_matches("sqlite://").trim_start_matches("sqlite:");
            format!("SQLite {}", Path::new(path).display())
        }
        store_core::Engine::Postgres => db.display_url().to_owned(),
    };
    println!("{role} `{}` listening on http://{address}, data in {data}", config.instance_name);
    tracing::info!(%address, instance = %config.instance_name, "started");
}

/// SIGTERM and SIGINT, listened for from creation on.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

/// Installs the handlers before the start-up line is printed: a signal sent by
/// whoever read that line must find them, not the default action (exit at once).
fn listen_for_shutdown() -> anyhow::Result<ShutdownSignals> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(ShutdownSignals {
        terminate: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
        interrupt: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
    })
}

async fn shutdown_signal(mut signals: ShutdownSignals, started: tokio::sync::watch::Sender<bool>) {
    tokio::select! {
        _ = signals.terminate.recv() => {}
        _ = signals.interrupt.recv() => {}
    }
    tracing::info!("received a shutdown signal");
    // Waiting syncs answer now; the graceful shutdown then waits only for
    // requests that are working, not for long polls.
    started.send_replace(true);
}
