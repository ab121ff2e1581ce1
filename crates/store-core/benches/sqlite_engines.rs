//! `cargo xtask bench sqlite`: the embedded engine through sqlx (our pool, as
//! the server runs it) against rusqlite on blocking threads (one writer
//! connection on a thread of its own, a pool of reader connections on Tokio's
//! blocking threads), with the same settings (WAL, `synchronous = NORMAL`, a
//! busy timeout) and the same work:
//! - a write is one transaction of an event row and its writer's position
//!   (`BEGIN IMMEDIATE`, an `INSERT`, an upsert, `COMMIT`), as a persist is;
//! - a read is one event by its key, as `get_event` on a cache miss is.
//!
//! Each case runs for a few seconds with tasks doing writes, reads or both,
//! and prints operations per second and the ratio rusqlite / sqlx. rusqlite's
//! writes are run twice: a whole write in one call to the writer thread, and a
//! call per statement (what an async API that awaits each statement, as
//! `Transaction` does, would cost on that engine), so that the engine and the
//! hops between threads are told apart. sqlx's writes are run twice too: a
//! call per statement, and the statements queued for the COMMIT, which sends
//! `BEGIN`, them and `COMMIT` in one call, as the server's writers now do.

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

/// sqlx through our pool.
struct Sqlx {
    db: Database,
    /// Whether a write's statements are queued for the COMMIT
    /// ([`store_core::Transaction::execute_at_commit`]), so that `BEGIN`,
    /// them and `COMMIT` are one call on the connection's thread, as the
    /// server's writers do; otherwise each is a call of its own.
    one_call: bool,
}

impl Engine for Sqlx {
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

/// Work for the writer thread: it runs each job on its connection.
type WriteJob = Box<dyn FnOnce(&rusqlite::Connection) + Send>;

struct Rusqlite {
    writes: mpsc::Sender<WriteJob>,
    /// Whether a write is one job (the whole transaction in one call to the
    /// writer thread) or a job per statement, as an async API that awaits each
    /// statement would make it.
    job_per_statement: bool,
    /// Held by a write for its statements: the connection's transaction.
    in_transaction: tokio::sync::Mutex<()>,
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
    fn new(path: &std::path::Path, job_per_statement: bool) -> Rusqlite {
        let (writes, jobs) = mpsc::channel::<WriteJob>();
        let writer = open(path);
        std::thread::spawn(move || {
            for job in jobs {
                job(&writer);
            }
        });
        let readers = (0..READERS).map(|_| Arc::new(Mutex::new(open(path)))).collect();
        Rusqlite {
            writes,
            job_per_statement,
            in_transaction: tokio::sync::Mutex::new(()),
            readers,
            next_reader: AtomicU64::new(0),
        }
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
        if self.job_per_statement {
            let _transaction = self.in_transaction.lock().await;
            self.on_writer(begin).await;
            self.on_writer(move |conn| insert(conn, id)).await;
            self.on_writer(move |conn| upsert(conn, id)).await;
            self.on_writer(commit).await;
        } else {
            self.on_writer(move |conn| {
                begin(conn)?;
                insert(conn, id)?;
                upsert(conn, id)?;
                commit(conn)
            })
            .await;
        }
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

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (sqlx_path, rusqlite_path) = (dir.path().join("sqlx.db"), dir.path().join("rusqlite.db"));
    let sqlx = runtime.block_on(async {
        let options = DatabaseOptions::default();
        let db = Database::connect_with(&format!("sqlite://{}", sqlx_path.display()), &options)
            .await
            .expect("open the sqlx file");
        db.run_interaction("preload", |txn| {
            Box::pin(async move {
                txn.execute_batch(SCHEMA).await?;
                for id in 1..=PRELOADED {
                    txn.execute(&INSERT.replace('?', "$"), &[&id, &"!room:example.com", &BODY]).await?;
                }
                Ok(())
            })
        })
        .await
        .expect("the schema and the rows to read");
        Arc::new(Sqlx { db, one_call: false })
    });
    let one_call = Arc::new(Sqlx { db: sqlx.db.clone(), one_call: true });
    {
        let mut conn = open(&rusqlite_path);
        let txn = conn.transaction().expect("a transaction");
        txn.execute_batch(SCHEMA).expect("the schema");
        for id in 1..=PRELOADED {
            txn.execute(INSERT, rusqlite::params![id, "!room:example.com", BODY]).expect("a row to read");
        }
        txn.commit().expect("the rows to read");
    }
    let rusqlite = Arc::new(Rusqlite::new(&rusqlite_path, false));
    let hopping = Arc::new(Rusqlite::new(&rusqlite_path, true));

    println!(
        "sqlite/engines: sqlx (our pool) against rusqlite (a writer thread, {READERS} reader connections on blocking threads), WAL, synchronous = NORMAL, {} s a case",
        RUN_FOR.as_secs()
    );
    let (sqlx_ids, rusqlite_ids) =
        (Arc::new(AtomicU64::new(PRELOADED as u64 + 1)), Arc::new(AtomicU64::new(PRELOADED as u64 + 1)));
    println!(
        "  (sqlx: a call per statement; sqlx/one call: the statements queued for the COMMIT, one call; rusqlite: a whole write in one call to the writer thread; rusqlite/step: a call per statement)"
    );
    for (writers, readers) in [(1, 0), (8, 0), (0, 1), (0, 8), (4, 4)] {
        let (sqlx_writes, sqlx_reads) =
            runtime.block_on(run(Arc::clone(&sqlx), Arc::clone(&sqlx_ids), writers, readers));
        let (rusqlite_writes, rusqlite_reads) =
            runtime.block_on(run(Arc::clone(&rusqlite), Arc::clone(&rusqlite_ids), writers, readers));
        let (step_writes, _) = if writers > 0 {
            runtime.block_on(run(Arc::clone(&hopping), Arc::clone(&rusqlite_ids), writers, 0))
        } else {
            (0.0, 0.0)
        };
        let (one_call_writes, _) = if writers > 0 {
            runtime.block_on(run(Arc::clone(&one_call), Arc::clone(&sqlx_ids), writers, 0))
        } else {
            (0.0, 0.0)
        };
        let ratio = |ours: f64, theirs: f64| if ours > 0.0 { theirs / ours } else { f64::NAN };
        println!(
            "  {writers} writers, {readers} readers: sqlx {sqlx_writes:>6.0} writes/s {sqlx_reads:>6.0} reads/s | sqlx/one call {one_call_writes:>6.0} writes/s | rusqlite {rusqlite_writes:>6.0} writes/s {rusqlite_reads:>6.0} reads/s | rusqlite/step {step_writes:>6.0} writes/s | ratios to sqlx: sqlx/one call writes {:.3}, rusqlite writes {:.3} reads {:.3}, rusqlite/step writes {:.3}; rusqlite / sqlx/one call writes {:.3}",
            ratio(sqlx_writes, one_call_writes),
            ratio(sqlx_writes, rusqlite_writes),
            ratio(sqlx_reads, rusqlite_reads),
            ratio(sqlx_writes, step_writes),
            ratio(one_call_writes, rusqlite_writes),
        );
    }
}
