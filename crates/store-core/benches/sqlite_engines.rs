//! `cargo xtask bench sqlite`: the embedded engine as the server runs it
//! (store-core's `Database`: rusqlite connections on threads of their own, one
//! writer for transactions and readers for autocommit reads) against sqlx's
//! SQLite driver, the engine it replaced, and against rusqlite called
//! directly (a writer thread, reader connections on Tokio's blocking threads),
//! with the same settings (WAL, `synchronous = NORMAL`, a busy timeout) and
//! the same work:
//! - a write is one transaction of an event row and its writer's position
//!   (`BEGIN IMMEDIATE`, an `INSERT`, an upsert, `COMMIT`), as a persist is;
//! - a read is one event by its key, as `get_event` on a cache miss is.
//!
//! Each case runs for a few seconds with tasks doing writes, reads or both,
//! and prints operations per second and the ratios to sqlx. Our writes run
//! twice: a call per statement, and the statements queued for the COMMIT
//! (one call, as the server's writers do). sqlx's write is one call too
//! (`BEGIN`, the statements and `COMMIT` as one statement list, which is how
//! the server used it), and rusqlite's is the whole write in one call to the
//! writer thread: the floor of any async API over SQLite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use store_core::{Database, DatabaseOptions};
use tokio::sync::oneshot;

const RUN_FOR: Duration = Duration::from_secs(3);
const READERS: usize = 4;
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bench_events (id INTEGER PRIMARY KEY, room TEXT NOT NULL, body TEXT NOT NULL); \
     CREATE TABLE IF NOT EXISTS bench_positions (writer TEXT PRIMARY KEY, position INTEGER NOT NULL)";
const INSERT: &str = "INSERT INTO bench_events (id, room, body) VALUES (?1, ?2, ?3)";
const UPSERT: &str = "INSERT INTO bench_positions (writer, position) VALUES ('master', ?1) \
     ON CONFLICT (writer) DO UPDATE SET position = MAX(bench_positions.position, excluded.position)";
const SELECT: &str = "SELECT id, room, body FROM bench_events WHERE id = ?1";
const BODY: &str =
    r#"{"msgtype":"m.text","body":"a message of about the usual size, with some words in it"}"#;

/// Rows each file holds before the cases, read by the readers.
const PRELOADED: i64 = 10_000;

/// One engine under test.
trait Engine: Send + Sync + 'static {
    fn write(&self, id: i64) -> impl Future<Output = ()> + Send;
    fn read(&self, id: i64) -> impl Future<Output = bool> + Send;
}

/// store-core's `Database`, as the server runs it.
struct Ours {
    db: Database,
    /// Whether a write's statements are queued for the COMMIT
    /// ([`store_core::Transaction::execute_at_commit`]), so that `BEGIN`,
    /// them and `COMMIT` are one call on the connection's thread, as the
    /// server's writers do; otherwise each is a call of its own.
    one_call: bool,
}

impl Engine for Ours {
    async fn write(&self, id: i64) {
        let one_call = self.one_call;
        self.db
            .run_interaction("bench_write", move |txn| {
                Box::pin(async move {
                    // Our SQL is written with PostgreSQL's placeholders.
                    let (insert, upsert) = (INSERT.replace('?', "$"), UPSERT.replace('?', "$"));
                    let insert_params: [&dyn store_core::ToSqlValue; 3] = [&id, &"!room:example.com", &BODY];
                    if one_call {
                        txn.execute_at_commit(insert, &insert_params);
                        txn.execute_at_commit(upsert, &[&id]);
                    } else {
                        txn.execute(&insert, &insert_params).await?;
                        txn.execute(&upsert, &[&id]).await?;
                    }
                    Ok(())
                })
            })
            .await
            .expect("a write");
    }

    async fn read(&self, id: i64) -> bool {
        self.db
            .run_autocommit("bench_read", move |txn| {
                Box::pin(async move { txn.query_opt(&SELECT.replace('?', "$"), &[&id]).await })
            })
            .await
            .expect("a read")
            .is_some()
    }
}

/// sqlx's SQLite driver, with the pool and the one-call write the server
/// used before rusqlite.
struct Sqlx {
    pool: sqlx::SqlitePool,
}

/// The write as one statement list: sqlx binds bare `?`s in order across it.
const SQLX_WRITE: &str = "BEGIN IMMEDIATE;\n\
     INSERT INTO bench_events (id, room, body) VALUES (?, ?, ?);\n\
     INSERT INTO bench_positions (writer, position) VALUES ('master', ?) \
     ON CONFLICT (writer) DO UPDATE SET position = MAX(bench_positions.position, excluded.position);\n\
     COMMIT";

impl Sqlx {
    async fn open(path: &std::path::Path) -> Sqlx {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(10)
            .connect_with(options)
            .await
            .expect("open the sqlx file");
        Sqlx { pool }
    }
}

impl Engine for Sqlx {
    fn write(&self, id: i64) -> impl Future<Output = ()> + Send {
        let write = sqlx::query(SQLX_WRITE).bind(id).bind("!room:example.com").bind(BODY).bind(id);
        let pool = self.pool.clone();
        // Boxed: rustc cannot prove sqlx's future `Send` otherwise.
        let write: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(async move { write.execute(&pool).await });
        async move {
            write.await.expect("a write");
        }
    }

    fn read(&self, id: i64) -> impl Future<Output = bool> + Send {
        let pool = self.pool.clone();
        let read: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(async move { sqlx::query(SELECT).bind(id).fetch_optional(&pool).await });
        async move { read.await.expect("a read").is_some() }
    }
}

/// Work for the writer thread: it runs each job on its connection.
type WriteJob = Box<dyn FnOnce(&rusqlite::Connection) + Send>;

struct Rusqlite {
    writes: mpsc::Sender<WriteJob>,
    readers: Vec<Arc<Mutex<rusqlite::Connection>>>,
    next_reader: AtomicU64,
}

fn open(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("open the file");
    conn.pragma_update(None, "journal_mode", "WAL").expect("WAL");
    conn.pragma_update(None, "synchronous", "NORMAL").expect("synchronous");
    conn.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
    conn
}

impl Rusqlite {
    fn new(path: &std::path::Path) -> Rusqlite {
        let (writes, jobs) = mpsc::channel::<WriteJob>();
        let writer = open(path);
        std::thread::spawn(move || {
            for job in jobs {
                job(&writer);
            }
        });
        let readers = (0..READERS).map(|_| Arc::new(Mutex::new(open(path)))).collect();
        Rusqlite { writes, readers, next_reader: AtomicU64::new(0) }
    }

    /// Runs `statement` on the writer thread and waits for it.
    async fn on_writer(
        &self,
        statement: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<()> + Send + 'static,
    ) {
        let (done, finished) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn| {
            let _ = done.send(statement(conn));
        });
        self.writes.send(job).expect("the writer thread");
        finished.await.expect("the writer thread answers").expect("a statement");
    }
}

fn begin(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")
}

fn insert(conn: &rusqlite::Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(INSERT)?.execute(rusqlite::params![id, "!room:example.com", BODY]).map(drop)
}

fn upsert(conn: &rusqlite::Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(UPSERT)?.execute([id]).map(drop)
}

fn commit(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch("COMMIT")
}

impl Engine for Rusqlite {
    async fn write(&self, id: i64) {
        self.on_writer(move |conn| {
            begin(conn)?;
            insert(conn, id)?;
            upsert(conn, id)?;
            commit(conn)
        })
        .await;
    }

    async fn read(&self, id: i64) -> bool {
        let index = self.next_reader.fetch_add(1, Ordering::Relaxed) as usize % self.readers.len();
        let reader = Arc::clone(&self.readers[index]);
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().expect("not poisoned");
            let mut select = conn.prepare_cached(SELECT).expect("prepare");
            select
                .query_row([id], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?))
                })
                .map(|_| true)
                .or_else(|err| if err == rusqlite::Error::QueryReturnedNoRows { Ok(false) } else { Err(err) })
                .expect("a read")
        })
        .await
        .expect("a reading thread")
    }
}

/// Writes and reads per second with `writers` and `readers` tasks; writes
/// take IDs from `next_id`, reads the preloaded rows.
async fn run<E: Engine>(
    engine: Arc<E>,
    next_id: Arc<AtomicU64>,
    writers: usize,
    readers: usize,
) -> (f64, f64) {
    let (written, read) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = tokio::time::Instant::now() + RUN_FOR;
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (engine, written, next_id) = (Arc::clone(&engine), Arc::clone(&written), Arc::clone(&next_id));
        tasks.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                engine.write(next_id.fetch_add(1, Ordering::Relaxed) as i64).await;
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for reader in 0..readers {
        let (engine, read) = (Arc::clone(&engine), Arc::clone(&read));
        tasks.push(tokio::spawn(async move {
            let mut id = reader as i64;
            while tokio::time::Instant::now() < deadline {
                id = (id * 7 + 13) % PRELOADED + 1;
                assert!(engine.read(id).await, "event {id} was preloaded");
                read.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("a task");
    }
    let per_second = |count: &AtomicU64| count.load(Ordering::Relaxed) as f64 / RUN_FOR.as_secs_f64();
    (per_second(&written), per_second(&read))
}

/// Fills `path` with the schema and the rows the readers read.
fn preload(path: &std::path::Path) {
    let mut conn = open(path);
    let txn = conn.transaction().expect("a transaction");
    txn.execute_batch(SCHEMA).expect("the schema");
    for id in 1..=PRELOADED {
        txn.execute(INSERT, rusqlite::params![id, "!room:example.com", BODY]).expect("a row to read");
    }
    txn.commit().expect("the rows to read");
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let paths = ["ours.db", "sqlx.db", "rusqlite.db"].map(|name| dir.path().join(name));
    for path in &paths {
        preload(path);
    }
    let [ours_path, sqlx_path, rusqlite_path] = &paths;
    let ours = runtime.block_on(async {
        let url = format!("sqlite://{}", ours_path.display());
        let db = Database::connect_with(&url, &DatabaseOptions::default()).await.expect("open our file");
        Arc::new(Ours { db, one_call: false })
    });
    let ours_one_call = Arc::new(Ours { db: ours.db.clone(), one_call: true });
    let sqlx = Arc::new(runtime.block_on(Sqlx::open(sqlx_path)));
    let rusqlite = Arc::new(Rusqlite::new(rusqlite_path));

    println!(
        "sqlite/engines: ours (store-core's Database) against sqlx's driver and rusqlite called directly (a writer thread, {READERS} reader connections on blocking threads), WAL, synchronous = NORMAL, {} s a case",
        RUN_FOR.as_secs()
    );
    println!(
        "  (ours: a call per statement; ours/one call: the statements queued for the COMMIT; sqlx: one statement list per write; rusqlite: a whole write in one call to the writer thread)"
    );
    let ids = || Arc::new(AtomicU64::new(PRELOADED as u64 + 1));
    let (ours_ids, sqlx_ids, rusqlite_ids) = (ids(), ids(), ids());
    for (writers, readers) in [(1, 0), (8, 0), (0, 1), (0, 8), (4, 4)] {
        let (ours_writes, ours_reads) =
            runtime.block_on(run(Arc::clone(&ours), Arc::clone(&ours_ids), writers, readers));
        let (one_call_writes, _) = if writers > 0 {
            runtime.block_on(run(Arc::clone(&ours_one_call), Arc::clone(&ours_ids), writers, 0))
        } else {
            (0.0, 0.0)
        };
        let (sqlx_writes, sqlx_reads) =
            runtime.block_on(run(Arc::clone(&sqlx), Arc::clone(&sqlx_ids), writers, readers));
        let (rusqlite_writes, rusqlite_reads) =
            runtime.block_on(run(Arc::clone(&rusqlite), Arc::clone(&rusqlite_ids), writers, readers));
        let ratio = |ours: f64, theirs: f64| if theirs > 0.0 { ours / theirs } else { f64::NAN };
        println!(
            "  {writers} writers, {readers} readers: ours {ours_writes:>6.0} writes/s {ours_reads:>6.0} reads/s | ours/one call {one_call_writes:>6.0} writes/s | sqlx {sqlx_writes:>6.0} writes/s {sqlx_reads:>6.0} reads/s | rusqlite {rusqlite_writes:>6.0} writes/s {rusqlite_reads:>6.0} reads/s | ours/one call / sqlx writes {:.3}, ours / sqlx reads {:.3} | ours/one call / rusqlite writes {:.3}, ours / rusqlite reads {:.3}",
            ratio(one_call_writes, sqlx_writes),
            ratio(ours_reads, sqlx_reads),
            ratio(one_call_writes, rusqlite_writes),
            ratio(ours_reads, rusqlite_reads),
        );
    }
}
