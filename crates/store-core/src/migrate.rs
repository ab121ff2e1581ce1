//! Applying `migrations/<engine>/NNNN_*.sql` at start-up.
//!
//! sqlx's migrator records each applied file (version and checksum) in
//! `_sqlx_migrations` and takes an advisory lock on PostgreSQL, so processes that
//! start together apply each migration once. Before running it we compare the
//! recorded versions with the ones compiled in, to refuse a database that a newer
//! release has already migrated with a message that says so.

use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::{Connection, PgConnection};

use crate::error::{DbError, StoreError};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// What the migration step found and did while connecting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this connect, in order; empty when the schema was
    /// already current.
    pub applied_now: Vec<i64>,
    /// The newest version applied to the database after the step.
    pub schema_version: Option<i64>,
}

/// The newest migration version compiled into this binary for each engine.
pub fn latest_version(engine: crate::Engine) -> Option<i64> {
    let migrator = match engine {
        crate::Engine::Postgres => &POSTGRES_MIGRATIONS,
        crate::Engine::Sqlite => &SQLITE_MIGRATIONS,
    };
    migrator.iter().map(|migration| migration.version).max()
}

pub(crate) async fn run_postgres(url: &str) -> Result<MigrationReport, StoreError> {
    // The migrator needs a sqlx connection; it is used for this step only.
    let connect_error = |err| StoreError::Connect {
        target: format!("PostgreSQL at {}", crate::database::redact_url(url)),
        source: DbError::sqlx(err),
    };
    // The migrator's `CREATE … IF NOT EXISTS` draws a NOTICE whenever the schema
    // exists, which sqlx logs at info on every start-up: noise, not news.
    let options = url.parse::<sqlx::postgres::PgConnectOptions>().map_err(connect_error)?;
    let options = options.options([("client_min_messages", "warning")]);
    let mut conn = PgConnection::connect_with(&options).await.map_err(connect_error)?;
    let migrator = &POSTGRES_MIGRATIONS;
    let before = applied_versions(migrator, &mut conn).await?;
    let result = migrator.run(&mut conn).await;
    let report = report(migrator, before, result, &mut conn).await;
    // Closing politely only saves the server a log line; the result matters more.
    let _ = conn.close().await;
    report
}

pub(crate) async fn run_sqlite(pool: &sqlx::SqlitePool) -> Result<MigrationReport, StoreError> {
    let mut conn = pool.acquire().await.map_err(|err| StoreError::Connect {
        target: "SQLite database".to_owned(),
        source: DbError::sqlx(err),
    })?;
    let migrator = &SQLITE_MIGRATIONS;
    let before = applied_versions(migrator, &mut *conn).await?;
    let result = migrator.run(&mut *conn).await;
    report(migrator, before, result, &mut *conn).await
}

fn binary_version(migrator: &Migrator) -> i64 {
    migrator.iter().map(|migration| migration.version).max().unwrap_or(0)
}

async fn report<C: Migrate>(
    migrator: &Migrator,
    before: Vec<i64>,
    result: Result<(), MigrateError>,
    conn: &mut C,
) -> Result<MigrationReport, StoreError> {
    result.map_err(|err| match err {
        MigrateError::VersionMissing(database_version) => {
            StoreError::SchemaTooNew { database_version, binary_version: binary_version(migrator) }
        }
        err => StoreError::Migration(err),
    })?;
    let after = applied_versions(migrator, conn).await?;
    Ok(MigrationReport {
        applied_now: after.iter().copied().filter(|version| !before.contains(version)).collect(),
        schema_version: after.iter().copied().max(),
    })
}

/// Lists the versions applied so far, refusing a database that a newer release
/// has migrated further than this binary knows.
async fn applied_versions<C: Migrate>(migrator: &Migrator, conn: &mut C) -> Result<Vec<i64>, StoreError> {
    // Hold the migrator's lock while creating its table so that two processes
    // starting together do not race on `CREATE TABLE IF NOT EXISTS`.
    if migrator.locking {
        conn.lock().await.map_err(StoreError::Migration)?;
    }
    let result = async {
        conn.ensure_migrations_table().await?;
        conn.list_applied_migrations().await
    }
    .await;
    if migrator.locking {
        conn.unlock().await.map_err(StoreError::Migration)?;
    }
    let mut versions: Vec<i64> =
        result.map_err(StoreError::Migration)?.into_iter().map(|migration| migration.version).collect();
    versions.sort_unstable();
    let binary_version = binary_version(migrator);
    if let Some(&database_version) = versions.last().filter(|version| **version > binary_version) {
        return Err(StoreError::SchemaTooNew { database_version, binary_version });
    }
    Ok(versions)
}
