//! [`Database`]: a pool on one of two engines, and the named interactions every
//! store query runs in.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool as PgPool, RecyclingMethod, Runtime};

use crate::config::redact_url;
use crate::error::{DbError, StoreError};
use crate::migrate::{CORE_MIGRATIONS, MigrationReport};
use crate::sqlite::{self, Location, SqlitePool};
use crate::transaction::{Conn, Transaction};

/// A boxed, `Send` future borrowing from `'a`: what interaction closures return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How many times an interaction runs at most when it keeps hitting serialization
/// failures or deadlocks.
const MAX_ATTEMPTS: u32 = 5;
/// The first retry waits this long; each further retry waits twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// How long a new PostgreSQL connection may take before the attempt fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The database engine behind a [`Database`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    /// PostgreSQL: the engine for deployments of several processes.
    Postgres,
    /// SQLite: the embedded default for a single process.
    Sqlite,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Postgres => "PostgreSQL",
            Engine::Sqlite => "SQLite",
        })
    }
}

/// Settings for [`Database::connect_with`].
#[derive(Debug, Clone)]
pub struct DatabaseOptions {
    /// The most connections to open. A SQLite file has one for transactions
    /// and the rest for autocommit reads (at least one of each); an in-memory
    /// SQLite database always has exactly one, or each connection would see its
    /// own empty database.
    pub pool_size: usize,
    /// Whether to apply `store-core`'s pending migrations while connecting
    /// ([`crate::CORE_MIGRATIONS`]; the store crates' come with `build_store`).
    pub run_migrations: bool,
}

impl Default for DatabaseOptions {
    fn default() -> Self {
        DatabaseOptions { pool_size: 10, run_migrations: true }
    }
}

/// Counters for one interaction name, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InteractionStats {
    /// Interactions that finished, successfully or not.
    pub count: u64,
    /// Interactions that ended in an error.
    pub failures: u64,
    /// Attempts that were retried after a serialization failure or deadlock.
    pub retries: u64,
    /// Time spent, summed over all calls (including retries and waiting for a
    /// connection).
    pub total_time: Duration,
}

/// The isolation of a transaction on PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isolation {
    /// REPEATABLE READ, Synapse's default: one snapshot per transaction,
    /// conflicts reported as serialization failures and retried.
    Snapshot,
    /// READ COMMITTED: each statement sees what is committed when it starts.
    ReadCommitted,
}

/// A handle to the database: cheap to clone, shared by every store of a process.
///
/// ```no_run
/// # async fn example() -> Result<(), store_core::StoreError> {
/// use store_core::Database;
///
/// let db = Database::connect("sqlite::memory:").await?;
/// let n_positions: i64 = db
///     .run_interaction("count_stream_positions", |txn| {
///         Box::pin(async move {
///             let row = txn.query_one("SELECT COUNT(*) FROM stream_positions", &[]).await?;
///             row.get(0)
///         })
///     })
///     .await?;
/// assert_eq!(n_positions, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    pool: EnginePool,
    /// The URL with the password hidden, for messages.
    display_url: String,
    /// Every migration step this handle ran, summed.
    migrations: Mutex<MigrationReport>,
    stats: Mutex<BTreeMap<&'static str, InteractionStats>>,
}

enum EnginePool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("engine", &self.engine())
            .field("url", &self.inner.display_url)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Connects with default options and applies pending migrations.
    ///
    /// Accepts `postgres://…` (or `postgresql://…`), `sqlite://PATH` and
    /// `sqlite::memory:`. Fails with one clear error for a malformed URL, an
    /// unreachable server, a missing directory, or a schema newer than this binary.
    pub async fn connect(url: &str) -> Result<Database, StoreError> {
        Database::connect_with(url, &DatabaseOptions::default()).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(url: &str, options: &DatabaseOptions) -> Result<Database, StoreError> {
        let display_url = redact_url(url);
        let invalid = |reason: String| StoreError::InvalidUrl { url: display_url.clone(), reason };
        if options.pool_size == 0 {
            return Err(invalid("the pool size must be at least 1".to_owned()));
        }
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            connect_postgres(url, &display_url, options).await?
        } else if url.starts_with("sqlite:") {
            connect_sqlite(url, &display_url, options).await?
        } else {
            return Err(invalid("expected postgres://…, sqlite://PATH or sqlite::memory:".to_owned()));
        };
        let db = Database {
            inner: Arc::new(Inner {
                pool,
                display_url,
                migrations: Mutex::new(MigrationReport::default()),
                stats: Mutex::new(BTreeMap::new()),
            }),
        };
        if options.run_migrations {
            db.migrate(&[&CORE_MIGRATIONS]).await?;
        }
        Ok(db)
    }

    /// The engine this database runs on.
    pub fn engine(&self) -> Engine {
        match self.inner.pool {
            EnginePool::Postgres(_) => Engine::Postgres,
            EnginePool::Sqlite(_) => Engine::Sqlite,
        }
    }

    /// The URL this database was opened with, password hidden.
    pub fn display_url(&self) -> &str {
        &self.inner.display_url
    }

    /// What the migration steps run through this handle did (at connect, and
    /// every [`Database::migrate`] since), summed.
    pub fn migrations(&self) -> MigrationReport {
        self.inner.migrations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub(crate) fn record_migrations(&self, report: &MigrationReport) {
        self.inner.migrations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).absorb(report);
    }

    /// Runs `f` in one transaction named `interaction`, and commits.
    ///
    /// On PostgreSQL a serialization failure or deadlock rolls back and runs `f`
    /// again, up to a few times with growing pauses; on SQLite, so does a busy
    /// database. Any other error rolls back and is returned at once. The name is
    /// logged with the duration and counted in [`Database::interaction_stats`].
    ///
    /// A COMMIT whose outcome is in doubt (the connection broke while it ran) is
    /// read back before this returns: committed, the value is returned and `f` is
    /// not run again; rolled back, the error is returned. Once COMMIT is to be
    /// sent, dropping this future no longer stops the commit or its callbacks
    /// (see [`Transaction::commit`]).
    ///
    /// `f` returns a boxed future so it can borrow the transaction: write
    /// `|txn| Box::pin(async move { … })`.
    pub async fn run_interaction<T, F>(&self, interaction: &'static str, f: F) -> Result<T, StoreError>
    where
        F: for<'t> FnMut(&'t mut Transaction) -> BoxFuture<'t, Result<T, StoreError>> + Send,
        T: Send,
    {
        self.run(interaction, Some(Isolation::Snapshot), f).await
    }

    /// Like [`Database::run_interaction`], at PostgreSQL's READ COMMITTED
    /// isolation: for an upsert of one current row per key whose `WHERE` keeps
    /// the later stream ID. Under a snapshot, concurrent writers of one key fail
    /// each other with serialization errors until the retries run out; here the
    /// second waits for the first and then applies its `WHERE` to the committed
    /// row. (SQLite serialises writers anyway.)
    pub async fn run_interaction_read_committed<T, F>(
        &self,
        interaction: &'static str,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: for<'t> FnMut(&'t mut Transaction) -> BoxFuture<'t, Result<T, StoreError>> + Send,
        T: Send,
    {
        self.run(interaction, Some(Isolation::ReadCommitted), f).await
    }

    /// Like [`Database::run_interaction`], but without a transaction: each
    /// statement commits on its own. For single reads, where `BEGIN`/`COMMIT`
    /// would only add round trips.
    pub async fn run_autocommit<T, F>(&self, interaction: &'static str, f: F) -> Result<T, StoreError>
    where
        F: for<'t> FnMut(&'t mut Transaction) -> BoxFuture<'t, Result<T, StoreError>> + Send,
        T: Send,
    {
        self.run(interaction, None, f).await
    }

    async fn run<T, F>(
        &self,
        interaction: &'static str,
        isolation: Option<Isolation>,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: for<'t> FnMut(&'t mut Transaction) -> BoxFuture<'t, Result<T, StoreError>> + Send,
        T: Send,
    {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let result = self.attempt(interaction, isolation, &mut f).await;
            match result {
                Err(err) if err.is_retryable() && attempt < MAX_ATTEMPTS => {
                    let pause = FIRST_BACKOFF * 2u32.pow(attempt - 1);
                    tracing::debug!(interaction, attempt, ?pause, error = %err, "retrying database interaction");
                    self.record(interaction, |stats| stats.retries += 1);
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                result => {
                    let elapsed = started.elapsed();
                    self.record(interaction, |stats| {
                        stats.count += 1;
                        stats.failures += u64::from(result.is_err());
                        stats.total_time += elapsed;
                    });
                    tracing::debug!(
                        interaction,
                        attempts = attempt,
                        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                        ok = result.is_ok(),
                        "database interaction finished"
                    );
                    return result;
                }
            }
        }
    }

    async fn attempt<T, F>(
        &self,
        interaction: &'static str,
        isolation: Option<Isolation>,
        f: &mut F,
    ) -> Result<T, StoreError>
    where
        F: for<'t> FnMut(&'t mut Transaction) -> BoxFuture<'t, Result<T, StoreError>> + Send,
        T: Send,
    {
        let conn = self.acquire(interaction, isolation.is_some()).await?;
        let mut txn = Transaction::start(interaction, conn, isolation).await?;
        match f(&mut txn).await {
            Ok(value) => txn.commit().await.map(|()| value),
            Err(err) => {
                txn.rollback().await;
                Err(err)
            }
        }
    }

    /// Opens a transaction outside any interaction.
    ///
    /// This exists for one job: the start-up connection handed to every store
    /// constructor (`Store::new(db, conn, ctx)`), committed once all stores are
    /// built so they read one consistent snapshot. Everything else goes through
    /// [`Database::run_interaction`], which retries and records metrics.
    pub async fn begin(&self, interaction: &'static str) -> Result<Transaction, StoreError> {
        let conn = self.acquire(interaction, true).await?;
        Transaction::start(interaction, conn, Some(Isolation::Snapshot)).await
    }

    /// A connection, for a transaction or for autocommit statements (which
    /// SQLite gives a reader).
    async fn acquire(&self, interaction: &'static str, transaction: bool) -> Result<Conn, StoreError> {
        match &self.inner.pool {
            EnginePool::Postgres(pool) => pool
                .get()
                .await
                .map(Conn::Postgres)
                .map_err(|err| StoreError::Database { interaction, source: DbError::pool(err) }),
            EnginePool::Sqlite(pool) => {
                let purpose = if transaction { sqlite::Use::Transaction } else { sqlite::Use::Autocommit };
                pool.acquire(purpose)
                    .await
                    .map(Conn::Sqlite)
                    .map_err(|source| StoreError::Database { interaction, source })
            }
        }
    }

    fn record(&self, interaction: &'static str, update: impl FnOnce(&mut InteractionStats)) {
        // A poisoned lock only means a panic elsewhere mid-update of counters;
        // the counters are still usable.
        let mut stats = self.inner.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        update(stats.entry(interaction).or_default());
    }

    /// Counters per interaction name since start-up.
    pub fn interaction_stats(&self) -> BTreeMap<&'static str, InteractionStats> {
        self.inner.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Closes the pool: waits for connections in use to come back, then closes
    /// them. Later interactions fail.
    pub async fn close(&self) {
        match &self.inner.pool {
            EnginePool::Postgres(pool) => pool.close(),
            EnginePool::Sqlite(pool) => pool.close().await,
        }
    }
}

async fn connect_postgres(
    url: &str,
    display_url: &str,
    options: &DatabaseOptions,
) -> Result<EnginePool, StoreError> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|err| StoreError::InvalidUrl { url: display_url.to_owned(), reason: err.to_string() })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("homeserver");
    }
    let target = postgres_target(&config);
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    let pool = PgPool::builder(manager)
        .max_size(options.pool_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|err| StoreError::InvalidUrl { url: display_url.to_owned(), reason: err.to_string() })?;
    // Connect once now, so that a wrong address or password fails start-up with a
    // clear message instead of the first request.
    let conn = pool.get().await.map_err(|err| StoreError::Connect { target, source: DbError::pool(err) })?;
    drop(conn);
    Ok(EnginePool::Postgres(pool))
}

fn postgres_target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            tokio_postgres::config::Host::Tcp(host) => format!("{host}:{port}"),
            tokio_postgres::config::Host::Unix(path) => format!("{}", path.display()),
        })
        .collect();
    let hosts = if hosts.is_empty() { "localhost:5432".to_owned() } else { hosts.join(",") };
    format!("PostgreSQL at {hosts}/{}", config.get_dbname().unwrap_or("(default database)"))
}

async fn connect_sqlite(
    url: &str,
    display_url: &str,
    options: &DatabaseOptions,
) -> Result<EnginePool, StoreError> {
    let invalid = |reason: String| StoreError::InvalidUrl { url: display_url.to_owned(), reason };
    let location = Location::parse(url).map_err(invalid)?;
    if let Some(parent) = sqlite::missing_directory(&location) {
        return Err(invalid(format!("the directory {} does not exist", parent.display())));
    }
    let target = format!("SQLite database {}", location.describe());
    let pool = SqlitePool::open(location, options.pool_size)
        .await
        .map_err(|source| StoreError::Connect { target, source })?;
    Ok(EnginePool::Sqlite(pool))
}
