//! The SQLite engine: rusqlite connections, each owned by a thread of its own,
//! in two lanes.
//!
//! - **The writer**: one connection for every transaction. Writers wait their
//!   turn in a first-come queue here instead of in SQLite's busy handler, which
//!   sleeps between tries and so wastes the lock's idle time under load.
//! - **The readers**: the other connections, for autocommit interactions.
//!   WAL lets them read while the writer writes. A statement of theirs that
//!   may write is run on the writer, in its turn.
//!
//! A database in memory has one connection, which both lanes share: each
//! connection to `:memory:` would be a database of its own.
//!
//! A call hands a closure to the connection's thread and awaits its answer. The
//! closure owns what it needs, so a caller that goes away leaves the call to
//! finish; calls run in the order they were handed over, which is what lets a
//! `ROLLBACK` be queued behind a statement still running.
//!
//! `cargo xtask bench sqlite` sets this engine against sqlx's SQLite driver,
//! the one it replaced, and against rusqlite called directly.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{OpenFlags, ffi};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::DbError;
use crate::value::{Row, Value};

/// How long SQLite waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a transaction waits for the writer before it counts as busy (and
/// is retried like a busy database).
const WRITER_WAIT: Duration = BUSY_TIMEOUT;
/// How long an autocommit interaction waits for a reader.
const READER_WAIT: Duration = Duration::from_secs(30);
/// Prepared statements kept per connection: writes of groups of any size
/// (one statement text per size) fit beside the stores' reads.
const STATEMENT_CACHE: usize = 512;

/// Where a SQLite database lives, parsed from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Memory,
    File { path: PathBuf, read_only: bool, create: bool },
}

impl Location {
    /// Parses `sqlite::memory:`, `sqlite://PATH` or `sqlite:PATH`, with an
    /// optional `?mode=ro|rw|rwc|memory`.
    pub(crate) fn parse(url: &str) -> Result<Location, String> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or("not a sqlite: URL")?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut mode = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("mode", value @ ("ro" | "rw" | "rwc" | "memory"))) => mode = Some(value),
                Some(("mode", value)) => {
                    return Err(format!("unknown mode `{value}`: expected ro, rw, rwc or memory"));
                }
                _ => return Err(format!("unknown parameter `{pair}`: only `mode` is understood")),
            }
        }
        if path == ":memory:" || mode == Some("memory") {
            return Ok(Location::Memory);
        }
        if path.is_empty() {
            return Err("no file named: write sqlite://PATH or sqlite::memory:".to_owned());
        }
        Ok(Location::File {
            path: PathBuf::from(path),
            read_only: mode == Some("ro"),
            create: matches!(mode, None | Some("rwc")),
        })
    }

    /// The file, or `:memory:`, for messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Location::Memory => ":memory:".to_owned(),
            Location::File { path, .. } => path.display().to_string(),
        }
    }
}

/// The connections of one SQLite database.
#[derive(Clone)]
pub(crate) struct SqlitePool {
    shared: Arc<Shared>,
}

struct Shared {
    location: Location,
    writer: Lane,
    /// `None` when the writer's lane serves reads too (in memory, or a pool of one).
    readers: Option<Lane>,
}

/// Connections of one kind, opened when first needed, up to a number.
struct Lane {
    size: usize,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Worker>>,
    wait: Duration,
    kind: &'static str,
}

/// Which lane a connection is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// A transaction: the writer.
    Transaction,
    /// Autocommit statements: a reader.
    Autocommit,
}

impl SqlitePool {
    /// Opens the writer's connection at once, so that a bad path or a file
    /// that is not a database fails start-up rather than the first request.
    pub(crate) async fn open(location: Location, pool_size: usize) -> Result<SqlitePool, DbError> {
        let shared_lane = matches!(location, Location::Memory) || pool_size == 1;
        let shared = Arc::new(Shared {
            writer: Lane::new(1, WRITER_WAIT, "writer"),
            readers: (!shared_lane).then(|| Lane::new(pool_size - 1, READER_WAIT, "reader")),
            location,
        });
        let pool = SqlitePool { shared };
        let first = pool.acquire(Use::Transaction).await?;
        drop(first);
        Ok(pool)
    }

    /// A connection for `purpose`, waiting for one to be free.
    pub(crate) async fn acquire(&self, purpose: Use) -> Result<SqliteConn, DbError> {
        let lane = match (purpose, &self.shared.readers) {
            (Use::Autocommit, Some(readers)) => readers,
            _ => &self.shared.writer,
        };
        let permit = match tokio::time::timeout(lane.wait, Arc::clone(&lane.permits).acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => return Err(DbError::sqlite_pool("the SQLite pool was closed".to_owned())),
            Err(_elapsed) => {
                return Err(DbError::sqlite(busy(format!(
                    "no SQLite {} connection came free within {:?}",
                    lane.kind, lane.wait
                ))));
            }
        };
        let idle = lane.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let worker = match idle {
            Some(worker) => worker,
            None => Worker::open(self.shared.location.clone()).await?,
        };
        Ok(SqliteConn { worker: Some(worker), shared: Arc::clone(&self.shared), purpose, _permit: permit })
    }

    /// Refuses new checkouts, waits for the connections in use to come back,
    /// and closes them all.
    pub(crate) async fn close(&self) {
        for lane in std::iter::once(&self.shared.writer).chain(&self.shared.readers) {
            let size = u32::try_from(lane.size).unwrap_or(u32::MAX);
            let all = lane.permits.acquire_many(size).await;
            lane.permits.close();
            lane.idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
            drop(all);
        }
    }
}

impl Lane {
    fn new(size: usize, wait: Duration, kind: &'static str) -> Lane {
        Lane { size, permits: Arc::new(Semaphore::new(size)), idle: Mutex::new(Vec::new()), wait, kind }
    }
}

/// A busy database, as SQLite itself reports one (so it is retried the
/// same way), with `message` saying why.
fn busy(message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_BUSY), Some(message))
}

type Job = Box<dyn FnOnce(&mut rusqlite::Connection) + Send>;

/// A connection's thread, fed through a queue.
struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    async fn open(location: Location) -> Result<Worker, DbError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (opened, opening) = oneshot::channel();
        std::thread::Builder::new()
            .name("sqlite-conn".to_owned())
            .spawn(move || {
                let mut conn = match open_connection(&location) {
                    Ok(conn) => {
                        let _ = opened.send(Ok(()));
                        conn
                    }
                    Err(err) => {
                        let _ = opened.send(Err(err));
                        return;
                    }
                };
                // Ends when every sender is gone: the connection left the pool.
                while let Ok(job) = queue.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|err| {
                DbError::sqlite_pool(format!("cannot start a SQLite connection's thread: {err}"))
            })?;
        match opening.await {
            Ok(Ok(())) => Ok(Worker { jobs }),
            Ok(Err(err)) => Err(DbError::sqlite(err)),
            Err(_) => {
                Err(DbError::sqlite_pool("a SQLite connection's thread ended while opening".to_owned()))
            }
        }
    }
}

fn open_connection(location: &Location) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = match location {
        Location::Memory => rusqlite::Connection::open_in_memory()?,
        Location::File { path, read_only, create } => {
            let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
            flags |=
                if *read_only { OpenFlags::SQLITE_OPEN_READ_ONLY } else { OpenFlags::SQLITE_OPEN_READ_WRITE };
            if *create {
                flags |= OpenFlags::SQLITE_OPEN_CREATE;
            }
            rusqlite::Connection::open_with_flags(path, flags)?
        }
    };
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // WAL: readers and the writer do not block each other. NORMAL: a commit
    // is not flushed on its own; docs/config.md says what a power loss can
    // take.
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
    Ok(conn)
}

/// A connection checked out of a [`SqlitePool`]; back in the pool when dropped.
pub(crate) struct SqliteConn {
    worker: Option<Worker>,
    shared: Arc<Shared>,
    purpose: Use,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SqliteConn {
    fn drop(&mut self) {
        let lane = match (self.purpose, &self.shared.readers) {
            (Use::Autocommit, Some(readers)) => readers,
            _ => &self.shared.writer,
        };
        // After `close`, the connection is dropped: its thread ends once the
        // calls queued on it have run.
        if let Some(worker) = self.worker.take().filter(|_| !lane.permits.is_closed()) {
            lane.idle.lock().unwrap_or_else(PoisonError::into_inner).push(worker);
        }
    }
}

impl SqliteConn {
    /// Like [`SqliteConn::call`], for an autocommit statement that may write:
    /// on a reader, it runs on the writer instead, in the writer's queue,
    /// rather than in SQLite's busy handler, which sleeps between tries for the
    /// write lock while the writer's transactions hold it back to back.
    pub(crate) async fn call_writing<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, DbError> {
        if self.purpose == Use::Autocommit && self.shared.readers.is_some() {
            let pool = SqlitePool { shared: Arc::clone(&self.shared) };
            return pool.acquire(Use::Transaction).await?.call(work).await;
        }
        self.call(work).await
    }

    /// Runs `work` on the connection's thread and returns its answer. If the
    /// caller goes away, `work` still runs, and before any later call.
    pub(crate) async fn call<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, DbError> {
        let answered = self.hand_over_call(work)?;
        answer_of(answered).await
    }

    /// Hands `work` to the connection's thread and gives the connection back
    /// to the pool at once, then waits for the answer: for a call that is a
    /// whole transaction (it begins it, and commits or rolls it back), behind
    /// which the next user's calls may queue on the thread.
    pub(crate) fn call_then_release<T: Send + 'static>(
        mut self,
        work: impl FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> impl Future<Output = Result<T, DbError>> + Send + 'static {
        let answered = self.hand_over_call(work);
        drop(self);
        async move { answer_of(answered?).await }
    }

    /// Queues `work`, whose answer comes on the returned channel.
    fn hand_over_call<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<Answer<T>, DbError> {
        let (answer, answered) = oneshot::channel();
        self.hand_over(Box::new(move |conn| {
            let _ = answer.send(work(conn));
        }))?;
        Ok(answered)
    }

    /// Queues `ROLLBACK` without waiting for it: for a transaction abandoned
    /// half-way. The next user of the connection finds it done.
    pub(crate) fn rollback_in_background(&mut self) {
        let rollback: Job = Box::new(|conn| {
            // An error means no transaction was left to end.
            if !conn.is_autocommit() && conn.execute_batch("ROLLBACK").is_err() {
                tracing::warn!("failed to roll back an abandoned SQLite transaction");
            }
        });
        if self.hand_over(rollback).is_err() {
            // The thread is gone: do not give the connection back.
            self.worker = None;
        }
    }

    fn hand_over(&mut self, job: Job) -> Result<(), DbError> {
        let sent = self.worker.as_ref().map(|worker| worker.jobs.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => {
                self.worker = None;
                Err(DbError::sqlite_pool("a SQLite connection's thread is gone".to_owned()))
            }
        }
    }
}

/// Where a call's answer comes back.
type Answer<T> = oneshot::Receiver<Result<T, rusqlite::Error>>;

async fn answer_of<T>(answered: Answer<T>) -> Result<T, DbError> {
    match answered.await {
        Ok(result) => result.map_err(DbError::sqlite),
        Err(_) => Err(DbError::sqlite_pool("a SQLite connection's thread ended mid-call".to_owned())),
    }
}

/// Runs one statement with `params` bound to `?1`, `?2`, …, and returns the
/// number of rows it changed. A statement that returns rows (`… RETURNING`)
/// is stepped to its end.
pub(crate) fn execute(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[Value],
) -> Result<u64, rusqlite::Error> {
    let mut statement = conn.prepare_cached(sql)?;
    bind(&mut statement, params)?;
    if statement.column_count() == 0 {
        return statement.raw_execute().map(|changed| changed as u64);
    }
    let read_only = statement.readonly();
    let mut rows = statement.raw_query();
    while rows.next()?.is_some() {}
    drop(rows);
    // `changes()` still holds the last write's count after a read.
    Ok(if read_only { 0 } else { conn.changes() })
}

/// Runs one query with `params` bound and reads all its rows.
pub(crate) fn query(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, rusqlite::Error> {
    let mut statement = conn.prepare_cached(sql)?;
    bind(&mut statement, params)?;
    let columns: Arc<[String]> = statement.column_names().into_iter().map(str::to_owned).collect();
    let mut rows = statement.raw_query();
    let mut read = Vec::new();
    while let Some(row) = rows.next()? {
        let values =
            (0..columns.len()).map(|idx| row.get_ref(idx).and_then(value_of)).collect::<Result<_, _>>()?;
        read.push(Row::new(Arc::clone(&columns), values));
    }
    Ok(read)
}

fn bind(statement: &mut rusqlite::CachedStatement<'_>, params: &[Value]) -> Result<(), rusqlite::Error> {
    let wanted = statement.parameter_count();
    if params.len() != wanted {
        return Err(rusqlite::Error::InvalidParameterCount(params.len(), wanted));
    }
    for (idx, value) in params.iter().enumerate() {
        statement.raw_bind_parameter(idx + 1, Param(value))?;
    }
    Ok(())
}

/// A [`Value`] bound to a SQLite parameter.
struct Param<'a>(&'a Value);

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> Result<ToSqlOutput<'_>, rusqlite::Error> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Integer(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Real(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Value::Blob(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
            Value::Bool(v) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*v))),
            // SQLite has no arrays: the list is stored as its JSON text.
            Value::TextArray(v) => ToSqlOutput::from(
                serde_json::to_string(v)
                    .map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err)))?,
            ),
        })
    }
}

/// A column's value by its own storage class, not the column's declared type:
/// SQLite lets any column hold any class.
fn value_of(raw: ValueRef<'_>) -> Result<Value, rusqlite::Error> {
    Ok(match raw {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(v) => Value::Integer(v),
        ValueRef::Real(v) => Value::Real(v),
        ValueRef::Text(bytes) => {
            Value::Text(std::str::from_utf8(bytes).map_err(rusqlite::Error::Utf8Error)?.to_owned())
        }
        ValueRef::Blob(bytes) => Value::Blob(bytes.to_vec()),
    })
}

/// The directory a database file would be created in, if it must exist first.
pub(crate) fn missing_directory(location: &Location) -> Option<&Path> {
    match location {
        Location::Memory => None,
        Location::File { path, .. } => {
            path.parent().filter(|parent| !parent.as_os_str().is_empty() && !parent.is_dir())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Location;

    #[test]
    fn urls_name_a_file_or_memory() {
        assert_eq!(Location::parse("sqlite::memory:"), Ok(Location::Memory));
        assert_eq!(Location::parse("sqlite://x.db?mode=memory"), Ok(Location::Memory));
        assert_eq!(
            Location::parse("sqlite://data/homeserver.db"),
            Ok(Location::File { path: "data/homeserver.db".into(), read_only: false, create: true })
        );
        assert_eq!(
            Location::parse("sqlite:///srv/hs.db?mode=ro"),
            Ok(Location::File { path: "/srv/hs.db".into(), read_only: true, create: false })
        );
        assert_eq!(
            Location::parse("sqlite:hs.db?mode=rw"),
            Ok(Location::File { path: "hs.db".into(), read_only: false, create: false })
        );
    }

    #[test]
    fn what_cannot_be_understood_is_refused() {
        for (url, expected) in [
            ("sqlite://", "no file named"),
            ("sqlite://x.db?mode=fast", "unknown mode `fast`"),
            ("sqlite://x.db?cache=shared", "unknown parameter `cache=shared`"),
        ] {
            let err = Location::parse(url).expect_err(url);
            assert!(err.contains(expected), "{url}: {err}");
        }
    }
}
