//! The schema each store crate owns: [`Migrations`], applied in order and
//! recorded per crate in `schema_migrations`, so two crates never clash over
//! version numbers.
//!
//! A store crate embeds its `migrations/postgres/` and `migrations/sqlite/`
//! folders with `sqlx::migrate!` (which also computes each file's checksum) and
//! hands them to [`Migrations::new`] under its crate name. `store-core`'s own
//! tables (`stream_positions`, the `caches` stream, …) are [`CORE_MIGRATIONS`],
//! applied by [`Database::connect`]; a composition's other crates are applied by
//! `build_store` through [`Database::migrate`].
//!
//! Each migration runs in a transaction of its own, holding a lock that makes
//! processes starting together apply it once: an advisory lock on PostgreSQL,
//! SQLite's write lock (`BEGIN IMMEDIATE`) there. A recorded migration whose file
//! changed is refused, and so is a database on which a crate has a migration
//! newer than this binary knows.
//!
//! Before migrations were recorded per crate, all lived in one folder and sqlx
//! recorded them by version in `_sqlx_migrations`. A file that recreates one of
//! those says so in a comment line `-- legacy-version: N`: on a database that
//! has legacy version `N`, it is recorded as applied without running.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fmt::Write as _;

use sqlx::migrate::{Migration, Migrator};

use crate::database::Database;
use crate::error::StoreError;
use crate::{Engine, Transaction};

/// The schema of one store crate: its migrations for each engine, recorded
/// under the crate's name.
///
/// ```ignore
/// // In a store crate's lib.rs, with `sqlx` (features "migrate", "macros") as a
/// // dependency and a build script that reruns when `migrations/` changes:
/// pub static MIGRATIONS: store_core::Migrations = store_core::Migrations::new(
///     env!("CARGO_PKG_NAME"),
///     sqlx::migrate!("migrations/postgres"),
///     sqlx::migrate!("migrations/sqlite"),
/// );
/// ```
pub struct Migrations {
    owner: &'static str,
    postgres: Migrator,
    sqlite: Migrator,
}

impl Migrations {
    /// The migrations of the crate `owner`, one folder per engine. Both folders
    /// must hold the same versions (`cargo xtask ci tidy` checks ours).
    pub const fn new(owner: &'static str, postgres: Migrator, sqlite: Migrator) -> Migrations {
        Migrations { owner, postgres, sqlite }
    }

    /// The crate these migrations belong to: their key in `schema_migrations`.
    pub fn owner(&self) -> &'static str {
        self.owner
    }

    /// The newest version this binary carries for `engine`.
    pub fn latest_version(&self, engine: Engine) -> Option<i64> {
        self.for_engine(engine).iter().map(|migration| migration.version).max()
    }

    fn for_engine(&self, engine: Engine) -> &Migrator {
        match engine {
            Engine::Postgres => &self.postgres,
            Engine::Sqlite => &self.sqlite,
        }
    }
}

impl fmt::Debug for Migrations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let versions: Vec<i64> = self.postgres.iter().map(|migration| migration.version).collect();
        f.debug_struct("Migrations").field("owner", &self.owner).field("versions", &versions).finish()
    }
}

/// `store-core`'s own tables: stream positions, the `caches` stream, the
/// deployment's writers, instance IDs and the counters' high-water marks.
pub static CORE_MIGRATIONS: Migrations = Migrations::new(
    env!("CARGO_PKG_NAME"),
    sqlx::migrate!("migrations/postgres"),
    sqlx::migrate!("migrations/sqlite"),
);

/// One migration, as a report names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MigrationId {
    /// The crate that owns it.
    pub owner: &'static str,
    /// Its version within that crate.
    pub version: i64,
}

/// What migrating found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Migrations run now, in the order they ran; empty when the schema was
    /// already current.
    pub applied_now: Vec<MigrationId>,
    /// Migrations recorded now without running, because the database had them
    /// from before migrations were recorded per crate.
    pub adopted_now: Vec<MigrationId>,
    /// Each crate's newest version on the database after the step.
    pub schema_versions: BTreeMap<&'static str, i64>,
}

impl MigrationReport {
    pub(crate) fn absorb(&mut self, other: &MigrationReport) {
        self.applied_now.extend(other.applied_now.iter().cloned());
        self.adopted_now.extend(other.adopted_now.iter().cloned());
        self.schema_versions.extend(&other.schema_versions);
    }
}

/// The PostgreSQL advisory lock every migrating transaction takes, so that
/// processes starting together apply each migration once. Any constant would
/// do; this one spells "schema".
const MIGRATION_LOCK: i64 = 0x7363_6865_6d61;

const CREATE_RECORD_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
    owner TEXT NOT NULL, \
    version BIGINT NOT NULL, \
    description TEXT NOT NULL, \
    checksum TEXT NOT NULL, \
    applied_ts BIGINT NOT NULL, \
    PRIMARY KEY (owner, version))";

impl Database {
    /// Applies the migrations of `sets` that this database lacks, each crate's
    /// in version order, and records them per crate.
    ///
    /// Safe to call from processes starting together and to call again: what
    /// is recorded is skipped. Refuses a recorded migration whose file changed
    /// since ([`StoreError::MigrationChanged`]) and a crate with a migration
    /// newer than this binary knows ([`StoreError::SchemaTooNew`]).
    pub async fn migrate(&self, sets: &[&Migrations]) -> Result<MigrationReport, StoreError> {
        self.run_interaction_read_committed("create_schema_migrations", |txn| {
            Box::pin(async move {
                lock(txn).await?;
                if txn.engine() == Engine::Postgres {
                    // `IF NOT EXISTS` draws a NOTICE on every start once the table
                    // exists, which the driver logs: noise, not news.
                    txn.execute_batch("SET LOCAL client_min_messages = warning").await?;
                }
                txn.execute_batch(CREATE_RECORD_TABLE).await
            })
        })
        .await?;
        let legacy = self.legacy_versions().await?;
        let mut report = MigrationReport::default();
        for set in sets {
            report.absorb(&self.migrate_one(set, &legacy).await?);
        }
        self.record_migrations(&report);
        Ok(report)
    }

    async fn migrate_one(
        &self,
        set: &Migrations,
        legacy: &BTreeSet<i64>,
    ) -> Result<MigrationReport, StoreError> {
        let owner = set.owner;
        let migrator = set.for_engine(self.engine());
        let recorded = self.recorded(owner).await?;
        let binary_version = set.latest_version(self.engine()).unwrap_or(0);
        if let Some((&database_version, _)) =
            recorded.last_key_value().filter(|(version, _)| **version > binary_version)
        {
            return Err(StoreError::SchemaTooNew {
                owner: owner.to_owned(),
                database_version,
                binary_version,
            });
        }
        let mut report = MigrationReport::default();
        for migration in migrator.iter() {
            let checksum = hex(&migration.checksum);
            if let Some(recorded) = recorded.get(&migration.version) {
                check_unchanged(owner, migration, recorded, &checksum)?;
                continue;
            }
            let adopt = legacy_version(&migration.sql).is_some_and(|version| legacy.contains(&version));
            let ran = self.apply(owner, migration, checksum, adopt).await?;
            let id = MigrationId { owner, version: migration.version };
            match ran {
                Applied::Now if adopt => report.adopted_now.push(id),
                Applied::Now => report.applied_now.push(id),
                Applied::ByAnother => {}
            }
        }
        if let Some(version) = migrator.iter().map(|migration| migration.version).max() {
            report.schema_versions.insert(owner, version);
        }
        Ok(report)
    }

    /// Runs one migration (or only records it, when `adopt`) unless another
    /// process did meanwhile.
    async fn apply(
        &self,
        owner: &'static str,
        migration: &Migration,
        checksum: String,
        adopt: bool,
    ) -> Result<Applied, StoreError> {
        let (version, description, sql) =
            (migration.version, migration.description.to_string(), migration.sql.to_string());
        self.run_interaction_read_committed("apply_migration", move |txn| {
            let (description, sql, checksum) = (description.clone(), sql.clone(), checksum.clone());
            Box::pin(async move {
                lock(txn).await?;
                let row = txn
                    .query_opt(
                        "SELECT checksum FROM schema_migrations WHERE owner = $1 AND version = $2",
                        &[&owner, &version],
                    )
                    .await?;
                if let Some(row) = row {
                    let recorded: String = row.get(0)?;
                    if recorded != checksum {
                        return Err(StoreError::MigrationChanged { owner: owner.to_owned(), version });
                    }
                    return Ok(Applied::ByAnother);
                }
                if !adopt {
                    txn.execute_batch(&sql).await?;
                }
                txn.execute(
                    "INSERT INTO schema_migrations (owner, version, description, checksum, applied_ts) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&owner, &version, &description, &checksum, &crate::now_ms()],
                )
                .await?;
                Ok(Applied::Now)
            })
        })
        .await
        .map_err(|err| match err {
            err @ (StoreError::MigrationChanged { .. } | StoreError::SchemaTooNew { .. }) => err,
            err => StoreError::Migration { owner: owner.to_owned(), version, source: Box::new(err) },
        })
    }

    /// The versions and checksums recorded for `owner`.
    async fn recorded(&self, owner: &'static str) -> Result<BTreeMap<i64, String>, StoreError> {
        self.run_autocommit("read_schema_migrations", move |txn| {
            Box::pin(async move {
                let rows = txn
                    .query("SELECT version, checksum FROM schema_migrations WHERE owner = $1", &[&owner])
                    .await?;
                rows.iter().map(|row| Ok((row.get(0)?, row.get(1)?))).collect()
            })
        })
        .await
    }

    /// The versions sqlx recorded before migrations were recorded per crate;
    /// empty on a database that never had them.
    async fn legacy_versions(&self) -> Result<BTreeSet<i64>, StoreError> {
        self.run_autocommit("read_legacy_migrations", |txn| {
            Box::pin(async move {
                let exists = match txn.engine() {
                    Engine::Postgres => {
                        "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema() \
                         AND tablename = '_sqlx_migrations'"
                    }
                    Engine::Sqlite => {
                        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
                    }
                };
                let count: i64 = txn.query_one(exists, &[]).await?.get(0)?;
                if count == 0 {
                    return Ok(BTreeSet::new());
                }
                let rows = txn.query("SELECT version FROM _sqlx_migrations WHERE success", &[]).await?;
                rows.iter().map(|row| row.get(0)).collect()
            })
        })
        .await
    }
}

/// Whether this process applied a migration or found it applied by another.
enum Applied {
    Now,
    ByAnother,
}

async fn lock(txn: &mut Transaction) -> Result<(), StoreError> {
    // SQLite's `BEGIN IMMEDIATE` already holds the database's one write lock.
    if txn.engine() == Engine::Postgres {
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    }
    Ok(())
}

fn check_unchanged(
    owner: &'static str,
    migration: &Migration,
    recorded: &str,
    checksum: &str,
) -> Result<(), StoreError> {
    if recorded == checksum {
        return Ok(());
    }
    Err(StoreError::MigrationChanged { owner: owner.to_owned(), version: migration.version })
}

/// The legacy version a migration recreates, from its `-- legacy-version: N` line.
fn legacy_version(sql: &str) -> Option<i64> {
    sql.lines()
        .map(str::trim)
        .take_while(|line| line.starts_with("--") || line.is_empty())
        .find_map(|line| line.strip_prefix("--")?.trim().strip_prefix("legacy-version:")?.trim().parse().ok())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

#[cfg(test)]
mod tests {
    use super::{hex, legacy_version};

    #[test]
    fn a_legacy_version_is_read_from_the_leading_comments_only() {
        assert_eq!(legacy_version("-- The events.\n-- legacy-version: 3\nCREATE TABLE e (x INT);"), Some(3));
        assert_eq!(legacy_version("--legacy-version:12\n"), Some(12));
        assert_eq!(legacy_version("CREATE TABLE e (x INT);\n-- legacy-version: 3\n"), None);
        assert_eq!(legacy_version("-- legacy-version: three\nCREATE TABLE e (x INT);"), None);
        assert_eq!(legacy_version("-- nothing to adopt\nCREATE TABLE e (x INT);"), None);
    }

    #[test]
    fn checksums_are_lowercase_hex() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
