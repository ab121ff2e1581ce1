//! A fresh, migrated database per test, on either engine, and [`engine_tests!`] to
//! run one test body on both.
//!
//! PostgreSQL tests create a database of their own on the server named by
//! `TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and drop it afterwards; SQLite tests use a file in a temporary directory, so
//! several connections and WAL behave as in production. A PostgreSQL test fails,
//! rather than being skipped, when the server is not reachable: `cargo xtask ci`
//! starts it.
//!
//! [`CommitFaults`] and [`TcpProxy`] make real failures around a PostgreSQL
//! COMMIT: a commit that sleeps, a backend killed mid-commit, a connection cut.
//!
//! ```ignore
//! async fn commits_are_visible(test_db: TestDb) -> TestResult { /* … */ Ok(()) }
//! store_test_support::engine_tests!(commits_are_visible);
//! // → postgres::commits_are_visible and sqlite::commits_are_visible
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use store_core::{Database, Engine, Store, StoreContext, StoreError, StoreSettings};

mod faults;

pub use faults::{CommitFaults, TcpProxy};

/// What test functions return, so they can use `?`.
pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Where PostgreSQL tests create their databases.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The prefix of every database this harness creates, followed by the creating
/// process's id, so that databases left by a killed run can be recognised.
const DATABASE_PREFIX: &str = "hs_test_";

/// A database for one test, removed when dropped.
#[derive(Debug)]
pub struct TestDb {
    /// The connected, migrated database.
    pub db: Database,
    /// The URL, for a second connection (a "restart") or a child process.
    pub url: String,
    cleanup: Cleanup,
}

#[derive(Debug)]
enum Cleanup {
    Postgres { database_name: String },
    Sqlite { _dir: tempfile::TempDir },
}

impl TestDb {
    /// A fresh database on `engine`, with migrations applied.
    pub async fn new(engine: Engine) -> Result<TestDb, Box<dyn std::error::Error>> {
        let (url, cleanup) = TestDb::create_empty(engine).await?;
        let db = Database::connect(&url).await?;
        Ok(TestDb { db, url, cleanup })
    }

    /// A fresh database on `engine` with nothing in it, not even migrations:
    /// returns its URL and the guard that removes it.
    pub async fn new_empty(engine: Engine) -> Result<EmptyDb, Box<dyn std::error::Error>> {
        let (url, cleanup) = TestDb::create_empty(engine).await?;
        Ok(EmptyDb { url, cleanup })
    }

    async fn create_empty(engine: Engine) -> Result<(String, Cleanup), Box<dyn std::error::Error>> {
        match engine {
            Engine::Postgres => {
                let admin_url = postgres_admin_url();
                let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                    .await
                    .map_err(|err| format!("cannot reach the test PostgreSQL at {admin_url}: {err}; start it with `cargo xtask services`"))?;
                tokio::spawn(connection);
                drop_abandoned_databases(&client).await;
                let database_name = unique_database_name();
                client.batch_execute(&format!("CREATE DATABASE {database_name} TEMPLATE template0")).await?;
                let url = database_url(&admin_url, &database_name);
                Ok((url, Cleanup::Postgres { database_name }))
            }
            Engine::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("homeserver.db").display());
                Ok((url, Cleanup::Sqlite { _dir: dir }))
            }
        }
    }

    /// Opens a second, independent connection pool: what a restarted process (or
    /// another process) would see.
    pub async fn reconnect(&self) -> Result<Database, store_core::StoreError> {
        Database::connect(&self.url).await
    }
}

/// Builds `S` as `store_core::build_store` does (its migrations, then one
/// start-up transaction and context), without checking the settings' writers
/// or agreeing on them with the deployment: for tests of one half seen from an
/// instance the master has not recorded.
pub async fn build_alone<S: Store>(db: &Database, settings: &StoreSettings) -> Result<S, StoreError> {
    db.migrate(&S::migrations()).await?;
    let mut conn = db.begin("build_stores").await?;
    let ctx = StoreContext::new(db, &mut conn, settings.clone()).await?;
    let store = S::new(db.clone(), &mut conn, &ctx).await?;
    conn.commit().await?;
    Ok(store)
}

/// An empty database (no migrations applied), removed when dropped.
#[derive(Debug)]
pub struct EmptyDb {
    /// Its URL.
    pub url: String,
    cleanup: Cleanup,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.cleanup.run();
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        self.cleanup.run();
    }
}

impl Cleanup {
    fn run(&self) {
        let Cleanup::Postgres { database_name } = self else { return };
        let database_name = database_name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on; a
        // thread with a runtime of its own can.
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&postgres_admin_url(), tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {database_name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        });
        // A database left behind is removed by the next run; nothing to report.
        let _ = dropper.join();
    }
}

fn unique_database_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.subsec_nanos());
    format!("{DATABASE_PREFIX}{}_{}_{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Replaces the database name (the URL's path) of `admin_url`.
fn database_url(admin_url: &str, database_name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority_start = base.find("://").map_or(0, |idx| idx + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database_name}?{query}"),
        None => format!("{base}/{database_name}"),
    }
}

/// Drops test databases whose creating process no longer runs (a test killed
/// before its cleanup).
async fn drop_abandoned_databases(client: &tokio_postgres::Client) {
    let Ok(rows) = client
        .query("SELECT datname FROM pg_database WHERE datname LIKE $1", &[&format!("{DATABASE_PREFIX}%")])
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let pid = name
            .trim_start_matches(DATABASE_PREFIX)
            .split('_')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        let alive = pid.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            // Another test process may be dropping it at the same time; either wins.
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
    }
}

/// Stamps out one `#[tokio::test]` per engine for each named test function.
///
/// Each function takes a [`TestDb`] and returns [`TestResult`]; the macro creates
/// modules `postgres` and `sqlite` holding the wrappers.
#[macro_export]
macro_rules! engine_tests {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> $crate::TestResult {
                    let test_db = $crate::TestDb::new(::store_core::Engine::Postgres).await?;
                    super::$name(test_db).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> $crate::TestResult {
                    let test_db = $crate::TestDb::new(::store_core::Engine::Sqlite).await?;
                    super::$name(test_db).await
                }
            )*
        }
    };
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn database_name_replaces_the_path_only() {
        assert_eq!(database_url("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
        assert_eq!(database_url("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            database_url("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
