//! The one error type of the database layer, and the driver errors it wraps.

use std::fmt;

/// Everything that can go wrong below a store.
///
/// Database failures inside an interaction carry the interaction's name, so a log
/// line says which store method failed, not only what PostgreSQL or SQLite said.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database URL is malformed or names an engine we do not support.
    #[error("invalid database URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database server or file could not be reached at start-up.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The engine and address, e.g. `PostgreSQL at 127.0.0.1:5432/synapse`.
        target: String,
        /// The driver's explanation.
        #[source]
        source: DbError,
    },
    /// The database was migrated by a newer version of this software.
    #[error(
        "the database schema of `{owner}` is newer than this binary: the database has its migration \
         {database_version}, this binary knows its migrations up to {binary_version}; run the newer \
         release or restore a backup"
    )]
    SchemaTooNew {
        /// The store crate whose tables are newer.
        owner: String,
        /// The newest of its migrations applied to the database.
        database_version: i64,
        /// The newest of its migrations this binary carries.
        binary_version: i64,
    },
    /// A migration recorded as applied no longer matches its file: files are
    /// never edited once released (add a migration instead).
    #[error(
        "migration {version} of `{owner}` was changed after the database applied it; \
         restore the file as it was released and add a new migration instead"
    )]
    MigrationChanged {
        /// The store crate it belongs to.
        owner: String,
        /// Its version.
        version: i64,
    },
    /// Applying a migration failed; nothing of it was applied.
    #[error("cannot apply migration {version} of `{owner}`: {source}")]
    Migration {
        /// The store crate it belongs to.
        owner: String,
        /// Its version.
        version: i64,
        /// Why it failed.
        #[source]
        source: Box<StoreError>,
    },
    /// The database rejected a statement or the connection broke.
    #[error("database error in interaction `{interaction}`: {source}")]
    Database {
        /// The name given to `run_interaction`.
        interaction: &'static str,
        /// The driver's error.
        #[source]
        source: DbError,
    },
    /// A statement failed inside the transaction, and the interaction went on
    /// and asked to commit: nothing was committed. Handle conflicts in SQL (`ON
    /// CONFLICT`) rather than by catching errors inside a transaction.
    #[error(
        "interaction `{interaction}` tried to commit after one of its statements failed; nothing was committed"
    )]
    Aborted {
        /// The name given to `run_interaction`.
        interaction: &'static str,
    },
    /// A query expecting one row found none or several.
    #[error("interaction `{interaction}` expected exactly one row, got {found}")]
    RowCount {
        /// The name given to `run_interaction`.
        interaction: &'static str,
        /// How many rows came back.
        found: usize,
    },
    /// A column's value could not be read as the requested Rust type.
    #[error("cannot decode column `{column}`: {message}")]
    Decode {
        /// The column's name or index.
        column: String,
        /// What was found instead.
        message: String,
    },
    /// A process asked for stream IDs on a stream it is not configured to write.
    #[error("instance `{instance}` tried to allocate a stream ID on `{stream}`, which it does not write")]
    NotAWriter {
        /// The stream.
        stream: String,
        /// The instance that asked.
        instance: String,
    },
    /// A write reached a writer that does not (or no longer, or not yet) write
    /// its shard: the stream's writers changed. The caller asks the writer of
    /// the current epoch instead.
    #[error("`{shard}` of `{stream}` is not written here under epoch {epoch} of its writers")]
    Moved {
        /// The stream.
        stream: String,
        /// The room (or other shard) the write was for.
        shard: String,
        /// The epoch of the stream's writers this process went by.
        epoch: i64,
    },
    /// Waiting for a stream position took longer than allowed.
    #[error("timed out waiting for `{writer}` to reach {token} on `{stream}` (it is at {reached})")]
    Timeout {
        /// The stream.
        stream: String,
        /// The writer waited for.
        writer: String,
        /// The token waited for.
        token: i64,
        /// Where the writer was when the wait gave up.
        reached: i64,
    },
    /// A write was not run, or its outcome never reached its caller: its
    /// writer shut down, or a write it depended on failed.
    #[error("interaction `{interaction}` was abandoned: {reason}")]
    Abandoned {
        /// The name of the writer's queue or interaction.
        interaction: &'static str,
        /// Why.
        reason: String,
    },
    /// A component was set up with values that cannot work.
    #[error("misconfigured: {0}")]
    Misconfigured(String),
    /// The SQL text breaks the placeholder convention (`$1`, `$2`, …).
    #[error("malformed SQL in interaction `{interaction}`: {message}")]
    Sql {
        /// The name given to `run_interaction`.
        interaction: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl StoreError {
    /// Whether running the same interaction again may succeed: a serialization
    /// failure or deadlock on PostgreSQL, a busy database on SQLite.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Database { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// Whether the write went to a writer that does not write its shard under
    /// the stream's current writers (see [`StoreError::Moved`]), here or as
    /// the database's fence found it, or to a process that does not (or no
    /// longer, or not yet) allocate on the stream ([`StoreError::NotAWriter`]):
    /// either way, the write belongs to another writer, and its caller routes
    /// it again.
    pub fn is_moved(&self) -> bool {
        matches!(self, StoreError::Moved { .. } | StoreError::NotAWriter { .. })
            || self.db_error().is_some_and(DbError::is_writers_changed)
    }

    /// The driver's error behind this one, if the database reported it.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            StoreError::Database { source, .. } | StoreError::Connect { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// An error from one of the two drivers, with the SQLSTATE-style code exposed so
/// callers can branch on it without knowing which engine ran.
#[derive(Debug)]
pub struct DbError {
    kind: DbErrorKind,
}

#[derive(Debug)]
enum DbErrorKind {
    Postgres(tokio_postgres::Error),
    Pool(deadpool_postgres::PoolError),
    /// A statement or call failed on SQLite, with its extended result code
    /// as text (what [`DbError::code`] answers).
    Sqlite {
        err: rusqlite::Error,
        code: Option<String>,
    },
    /// The SQLite pool could not give or keep a connection: why.
    SqlitePool(String),
    /// A COMMIT failed in a way that left its outcome open, and the outcome
    /// could not be read back: what happened, in words.
    CommitOutcomeUnknown(String),
    /// A statement queued for the COMMIT that could not be put in the
    /// engine's dialect: why.
    Statement(String),
}

/// SQLSTATE of a PostgreSQL serialization failure.
const SERIALIZATION_FAILURE: &str = "40001";
/// SQLSTATE of a PostgreSQL deadlock.
const DEADLOCK_DETECTED: &str = "40P01";
/// SQLSTATE of a unique violation.
const UNIQUE_VIOLATION: &str = "23505";
/// SQLite result codes meaning "try again": busy, locked, and their extended
/// forms for a recovering WAL and a stale read snapshot.
const SQLITE_BUSY_CODES: &[&str] = &["5", "6", "261", "517"];
/// SQLite extended codes for unique and primary-key violations.
const SQLITE_UNIQUE_CODES: &[&str] = &["2067", "1555"];

impl DbError {
    pub(crate) fn postgres(err: tokio_postgres::Error) -> DbError {
        DbError { kind: DbErrorKind::Postgres(err) }
    }

    pub(crate) fn pool(err: deadpool_postgres::PoolError) -> DbError {
        match err {
            deadpool_postgres::PoolError::Backend(err) => DbError::postgres(err),
            err => DbError { kind: DbErrorKind::Pool(err) },
        }
    }

    pub(crate) fn sqlite(err: rusqlite::Error) -> DbError {
        let code = match &err {
            rusqlite::Error::SqliteFailure(failure, _) => Some(failure.extended_code.to_string()),
            _ => None,
        };
        DbError { kind: DbErrorKind::Sqlite { err, code } }
    }

    pub(crate) fn sqlite_pool(why: String) -> DbError {
        DbError { kind: DbErrorKind::SqlitePool(why) }
    }

    pub(crate) fn statement(why: String) -> DbError {
        DbError { kind: DbErrorKind::Statement(why) }
    }

    pub(crate) fn commit_outcome_unknown(what_happened: String) -> DbError {
        DbError { kind: DbErrorKind::CommitOutcomeUnknown(what_happened) }
    }

    /// Whether a COMMIT that failed with this error may have committed all the
    /// same. On PostgreSQL an ERROR is the server refusing the COMMIT (a
    /// serialization failure, a deferred constraint): the transaction rolled back
    /// and the connection lives on. A broken connection, or a FATAL or PANIC sent
    /// as the server process ends (`pg_terminate_backend`, a crash, a shutdown),
    /// may have come before or after the commit record was written. SQLite works
    /// on a local file and reports a failed COMMIT exactly: never in doubt.
    pub(crate) fn leaves_commit_in_doubt(&self) -> bool {
        match &self.kind {
            DbErrorKind::Postgres(err) => err.as_db_error().is_none_or(|db| !is_plain_error(db)),
            DbErrorKind::Pool(_)
            | DbErrorKind::Sqlite { .. }
            | DbErrorKind::SqlitePool(_)
            | DbErrorKind::CommitOutcomeUnknown(_)
            | DbErrorKind::Statement(_) => false,
        }
    }

    /// Whether this is the pool refusing connections because it was closed.
    pub(crate) fn is_pool_closed(&self) -> bool {
        matches!(self.kind, DbErrorKind::Pool(deadpool_postgres::PoolError::Closed))
    }

    /// The error code the database reported: a SQLSTATE on PostgreSQL, the
    /// (extended) result code on SQLite. `None` for connection-level failures.
    pub fn code(&self) -> Option<&str> {
        match &self.kind {
            DbErrorKind::Postgres(err) => err.code().map(|state| state.code()),
            DbErrorKind::Pool(_) => None,
            DbErrorKind::Sqlite { code, .. } => code.as_deref(),
            DbErrorKind::SqlitePool(_) | DbErrorKind::CommitOutcomeUnknown(_) | DbErrorKind::Statement(_) => {
                None
            }
        }
    }

    /// Whether the same transaction may succeed if run again.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            DbErrorKind::Postgres(_) => {
                matches!(self.code(), Some(SERIALIZATION_FAILURE | DEADLOCK_DETECTED))
            }
            DbErrorKind::Sqlite { .. } => self.code().is_some_and(|code| SQLITE_BUSY_CODES.contains(&code)),
            // Running a write again whose first run may have committed could
            // apply it twice.
            DbErrorKind::Pool(_)
            | DbErrorKind::SqlitePool(_)
            | DbErrorKind::CommitOutcomeUnknown(_)
            | DbErrorKind::Statement(_) => false,
        }
    }

    /// Whether the fence of an elastic stream refused the write: the stream's
    /// writers changed since the writer routed it (`store_core::writers`).
    pub fn is_writers_changed(&self) -> bool {
        self.code() == Some(crate::writers::FENCED)
    }

    /// Whether a unique constraint rejected the statement.
    pub fn is_unique_violation(&self) -> bool {
        match &self.kind {
            DbErrorKind::Postgres(_) => self.code() == Some(UNIQUE_VIOLATION),
            DbErrorKind::Sqlite { .. } => self.code().is_some_and(|code| SQLITE_UNIQUE_CODES.contains(&code)),
            DbErrorKind::Pool(_)
            | DbErrorKind::SqlitePool(_)
            | DbErrorKind::CommitOutcomeUnknown(_)
            | DbErrorKind::Statement(_) => false,
        }
    }
}

/// Whether the server reported `err` at severity ERROR: the statement failed
/// and the session goes on (FATAL and PANIC end it).
fn is_plain_error(err: &tokio_postgres::error::DbError) -> bool {
    match err.parsed_severity() {
        Some(severity) => severity == tokio_postgres::error::Severity::Error,
        // Servers before 9.6 send only the localized severity; English is the
        // best guess there.
        None => err.severity() == "ERROR",
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            // tokio-postgres prints only "db error" for server errors; the server's
            // message (and detail) is what an operator needs.
            DbErrorKind::Postgres(err) => match err.as_db_error() {
                Some(db) => {
                    write!(f, "{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code())?;
                    if let Some(detail) = db.detail() {
                        write!(f, "; {detail}")?;
                    }
                    Ok(())
                }
                None => {
                    write!(f, "{err}")?;
                    let mut source = std::error::Error::source(err);
                    while let Some(cause) = source {
                        write!(f, ": {cause}")?;
                        source = cause.source();
                    }
                    Ok(())
                }
            },
            DbErrorKind::Pool(err) => write!(f, "{err}"),
            DbErrorKind::Sqlite { err, .. } => write!(f, "{err}"),
            DbErrorKind::SqlitePool(why) => f.write_str(why),
            DbErrorKind::CommitOutcomeUnknown(what_happened) => {
                write!(f, "the outcome of COMMIT is unknown: {what_happened}")
            }
            DbErrorKind::Statement(why) => write!(f, "a statement queued for the COMMIT was refused: {why}"),
        }
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            // The Display above already folds the causes in; repeating them as a
            // source would print them twice in `{:#}` chains.
            DbErrorKind::Postgres(_)
            | DbErrorKind::Pool(_)
            | DbErrorKind::CommitOutcomeUnknown(_)
            | DbErrorKind::SqlitePool(_)
            | DbErrorKind::Statement(_) => None,
            DbErrorKind::Sqlite { err, .. } => err.source(),
        }
    }
}
