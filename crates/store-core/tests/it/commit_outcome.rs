//! What a process does when a COMMIT's outcome is unknown or nobody waits for it
//! any more, on real PostgreSQL: a connection cut while COMMIT runs, a backend
//! killed in the middle of it, a caller dropped after sending it.
//!
//! COMMIT is made slow with a deferred constraint trigger that sleeps, so each
//! test can act while COMMIT is in flight (`store_test_support::CommitFaults`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use store_core::{Cache, Database, DatabaseOptions, Engine, MultiWriterIdGenerator, StoreError};
use store_test_support::{CommitFaults, TcpProxy, TestDb, TestResult};

use crate::id_generators::Harness;
use crate::{create_kv_table, get_kv};

/// What the callbacks of the interaction under test did, in order.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<&'static str>>>);

impl Events {
    fn push(&self, event: &'static str) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(event);
    }

    fn get(&self) -> Vec<&'static str> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits up to `timeout` for `event` to have happened `n` times.
    async fn wait_for(&self, event: &str, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while self.get().iter().filter(|seen| **seen == event).count() < n {
            if Instant::now() > deadline {
                return Err(format!(
                    "waited {timeout:?} for {n} × `{event}`; the callbacks did {:?}",
                    self.get()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

/// Fills `cache` with `value` under `key` as a read would (ticket first).
fn fill(cache: &Cache<String, i64>, key: &str, value: i64) {
    let ticket = cache.begin_fill(&key.to_owned());
    cache.finish_fill(ticket, value);
}

/// The write under test: takes a stream ID in the transaction, inserts `kv`
/// row `a` carrying it, invalidates `a` in `cache`, and logs every callback and
/// attempt in `events`.
async fn insert_tracked(
    db: Database,
    generator: MultiWriterIdGenerator,
    cache: Arc<Cache<String, i64>>,
    events: Events,
) -> Result<i64, StoreError> {
    insert_tracked_as(db, generator, cache, events, Sent::Alone).await
}

/// How the tracked insert is sent.
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// In a round trip of its own, before COMMIT.
    Alone,
    /// With the COMMIT ([`store_core::Transaction::execute_at_commit`]), the
    /// transaction's ID assigned with the stream ID.
    WithCommit,
}

async fn insert_tracked_as(
    db: Database,
    generator: MultiWriterIdGenerator,
    cache: Arc<Cache<String, i64>>,
    events: Events,
    sent: Sent,
) -> Result<i64, StoreError> {
    db.run_interaction("insert_tracked", move |txn| {
        let (generator, cache, events) = (generator.clone(), Arc::clone(&cache), events.clone());
        events.push("attempt");
        Box::pin(async move {
            if matches!(sent, Sent::WithCommit) {
                txn.assign_id();
            }
            let id = generator.get_next_txn(txn).await?;
            let (invalidated, positioned, failed) = (events.clone(), events.clone(), events.clone());
            txn.call_after(move || {
                cache.invalidate(&"a".to_owned());
                invalidated.push("invalidate");
            });
            txn.call_after_position(move || positioned.push("position"));
            txn.call_on_exception(move || failed.push("exception"));
            match sent {
                Sent::Alone => _ = txn.execute("INSERT INTO kv (k, v) VALUES ('a', $1)", &[&id]).await?,
                Sent::WithCommit => txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('a', $1)", &[&id]),
            }
            Ok(id)
        })
    })
    .await
}

/// A kv table, a stream generator of one writer, and a cache holding `a`.
async fn setup(test_db: &TestDb) -> Result<(MultiWriterIdGenerator, Arc<Cache<String, i64>>), StoreError> {
    create_kv_table(&test_db.db).await?;
    let harness = Harness::new(test_db, &["foobar"], true).await?;
    harness.consume_first_id().await?;
    let generator = harness.generator("w1", &["w1"]).await?;
    let cache = Cache::new("kv_by_key", 10, 1024 * 1024);
    fill(&cache, "a", 0);
    Ok((generator, cache))
}

/// A tracked insert whose connection runs through a proxy the test can cut,
/// caught while the server sleeps `commit_seconds` inside its COMMIT.
struct CommitThroughProxy {
    generator: MultiWriterIdGenerator,
    cache: Arc<Cache<String, i64>>,
    proxy: TcpProxy,
    db: Database,
    /// The stream's token before the insert.
    before: i64,
    events: Events,
    interaction: tokio::task::JoinHandle<Result<i64, StoreError>>,
}

async fn commit_through_proxy(
    test_db: &TestDb,
    commit_seconds: f64,
) -> Result<CommitThroughProxy, Box<dyn std::error::Error>> {
    commit_through_proxy_as(test_db, commit_seconds, Sent::Alone).await
}

async fn commit_through_proxy_as(
    test_db: &TestDb,
    commit_seconds: f64,
    sent: Sent,
) -> Result<CommitThroughProxy, Box<dyn std::error::Error>> {
    let (generator, cache) = setup(test_db).await?;
    let faults = CommitFaults::connect(&test_db.url).await?;
    faults.make_commits_slow("kv", "INSERT", commit_seconds).await?;
    let proxy = TcpProxy::start(&test_db.url).await?;
    let options = DatabaseOptions { pool_size: 4, run_migrations: false };
    let db = Database::connect_with(&proxy.url_through(&test_db.url), &options).await?;
    let before = generator.get_current_token();
    let events = Events::default();
    let interaction = tokio::spawn(insert_tracked_as(
        db.clone(),
        generator.clone(),
        Arc::clone(&cache),
        events.clone(),
        sent,
    ));
    faults.wait_for_sleeping_commit().await?;
    Ok(CommitThroughProxy { generator, cache, proxy, db, before, events, interaction })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_off_by_the_network_is_read_back_as_committed() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let CommitThroughProxy { generator, cache, proxy, db: _db, before, events, interaction } =
        commit_through_proxy(&test_db, 1.5).await?;
    // The network fails while the server is inside COMMIT: the server goes on and
    // commits once its trigger wakes up, the client only sees the connection close.
    proxy.sever_all();

    // At once: the write may be visible already, so this process's caches drop
    // what it would have invalidated.
    events.wait_for("invalidate", 1, Duration::from_secs(1)).await?;
    assert_eq!(cache.get(&"a".to_owned()), None);
    assert!(!interaction.is_finished(), "the server still sleeps in COMMIT: the outcome is not known yet");
    assert_eq!(
        generator.get_current_token(),
        before,
        "no position passes the ID while its commit is in doubt"
    );
    assert_eq!(events.get(), ["attempt", "invalidate"]);
    // A read during the wait caches what the write is replacing.
    fill(&cache, "a", 0);

    let id = interaction.await??;
    assert_eq!(
        events.get(),
        ["attempt", "invalidate", "invalidate", "position"],
        "read back as committed: invalidated again, then the position published, once, and never retried"
    );
    assert_eq!(cache.get(&"a".to_owned()), None, "the second invalidation drops what the read cached");
    assert_eq!(generator.get_current_token(), id);
    assert_eq!(get_kv(&test_db.db, "a").await?, Some(id));
    Ok(())
}

/// The same when the insert went in the COMMIT's own round trip: the
/// transaction's ID, assigned with the stream ID, is what it is read back by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_sent_with_its_writes_and_cut_off_is_read_back_as_committed() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let CommitThroughProxy { generator, cache: _, proxy, db: _db, before, events, interaction } =
        commit_through_proxy_as(&test_db, 1.5, Sent::WithCommit).await?;
    proxy.sever_all();
    events.wait_for("invalidate", 1, Duration::from_secs(1)).await?;
    assert_eq!(generator.get_current_token(), before, "no position passes the ID while in doubt");
    let id = interaction.await??;
    assert_eq!(events.get(), ["attempt", "invalidate", "invalidate", "position"]);
    assert_eq!(generator.get_current_token(), id);
    assert_eq!(get_kv(&test_db.db, "a").await?, Some(id));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_killed_on_the_server_is_read_back_as_rolled_back() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (generator, cache) = setup(&test_db).await?;
    let faults = CommitFaults::connect(&test_db.url).await?;
    faults.make_commits_slow("kv", "INSERT", 30.0).await?;
    let before = generator.get_current_token();
    let events = Events::default();

    let interaction = tokio::spawn(insert_tracked(
        test_db.db.clone(),
        generator.clone(),
        Arc::clone(&cache),
        events.clone(),
    ));
    let pid = faults.wait_for_sleeping_commit().await?;
    // The client gets a FATAL as the connection closes: from the client's side the
    // commit may or may not have happened.
    faults.terminate(pid).await?;

    let err = interaction.await?.expect_err("the transaction was rolled back");
    assert!(err.to_string().starts_with("database error in interaction `insert_tracked`:"), "{err}");
    assert_eq!(
        events.get(),
        ["attempt", "invalidate", "exception"],
        "invalidated at once, then read back as rolled back: the ID released, no position published, no retry"
    );
    assert_eq!(cache.get(&"a".to_owned()), None);
    assert_eq!(get_kv(&test_db.db, "a").await?, None);
    assert!(generator.get_current_token() > before, "the released ID no longer holds the stream back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interaction_dropped_during_commit_still_runs_its_callbacks() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (generator, cache) = setup(&test_db).await?;
    let faults = CommitFaults::connect(&test_db.url).await?;
    faults.make_commits_slow("kv", "INSERT", 0.5).await?;
    let events = Events::default();

    let interaction =
        insert_tracked(test_db.db.clone(), generator.clone(), Arc::clone(&cache), events.clone());
    // The caller goes away (a client hanging up) once COMMIT is on the server.
    tokio::select! {
        result = interaction => return Err(format!("finished while COMMIT sleeps: {result:?}").into()),
        pid = faults.wait_for_sleeping_commit() => { pid?; }
    }

    events.wait_for("position", 1, Duration::from_secs(5)).await?;
    assert_eq!(events.get(), ["attempt", "invalidate", "position"]);
    assert_eq!(cache.get(&"a".to_owned()), None);
    let id = get_kv(&test_db.db, "a").await?.ok_or("the write committed")?;
    assert_eq!(generator.get_current_token(), id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_refused_by_the_server_is_a_rollback() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (generator, cache) = setup(&test_db).await?;
    // A deferred check that fails inside COMMIT: the server answers COMMIT with an
    // ERROR, so the transaction certainly rolled back and nothing is invalidated.
    test_db
        .db
        .run_interaction("refuse_commits", |txn| {
            Box::pin(async move {
                txn.execute_batch(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
                     $$ BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '23514'; END $$;\
                     CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON kv \
                     DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse();",
                )
                .await
            })
        })
        .await?;
    let before = generator.get_current_token();
    let events = Events::default();

    let err = insert_tracked(test_db.db.clone(), generator.clone(), Arc::clone(&cache), events.clone())
        .await
        .expect_err("the commit is refused");
    assert!(err.to_string().contains("refused at commit"), "{err}");
    assert_eq!(events.get(), ["attempt", "exception"]);
    assert_eq!(cache.get(&"a".to_owned()), Some(0));
    assert!(generator.get_current_token() > before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_doubt_at_shutdown_leaves_its_ids_unfinished() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let CommitThroughProxy { generator, cache, proxy, db, before, events, interaction } =
        commit_through_proxy(&test_db, 1.0).await?;
    // The process shuts down while the outcome is being read back.
    db.close().await;
    proxy.sever_all();

    let err = interaction.await?.expect_err("the outcome cannot be known");
    let message = err.to_string();
    assert!(message.starts_with("database error in interaction `insert_tracked`:"), "{message}");
    assert!(message.contains("the outcome of COMMIT is unknown"), "{message}");
    assert_eq!(events.get(), ["attempt", "invalidate"], "neither a position nor a release");
    assert_eq!(cache.get(&"a".to_owned()), None);
    // The write did land; had the ID been released, the position could have
    // passed it while it was still committing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(get_kv(&test_db.db, "a").await?.is_some());
    assert_eq!(generator.get_current_token(), before);
    Ok(())
}

/// The transaction's ID as [`store_core::Transaction`]'s `Debug` shows it.
fn xid_of(txn: &store_core::Transaction) -> String {
    let debug = format!("{txn:?}");
    let start = debug.find("xid: ").map_or(0, |idx| idx + 5);
    debug[start..].split([',', ' ']).next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transaction_id_is_learnt_from_the_first_write_that_gets_one() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    create_kv_table(&test_db.db).await?;
    let (before_writing, after_no_op, learnt, actual) = test_db
        .db
        .run_interaction("learn_xid", |txn| {
            Box::pin(async move {
                txn.query("SELECT v FROM kv", &[]).await?;
                let before_writing = xid_of(txn);
                txn.execute("UPDATE kv SET v = 1 WHERE k = 'nobody'", &[]).await?;
                let after_no_op = xid_of(txn);
                txn.execute("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]).await?;
                let learnt = xid_of(txn);
                let actual: i64 =
                    txn.query_one("SELECT pg_current_xact_id()::text::bigint", &[]).await?.get(0)?;
                Ok((before_writing, after_no_op, learnt, actual))
            })
        })
        .await?;
    assert_eq!(before_writing, "None", "reads neither ask nor get an ID");
    assert_eq!(after_no_op, "None", "a write that changed nothing has no ID to learn");
    assert_eq!(learnt, format!("Some({actual})"), "learnt in the round trip of the first write");
    Ok(())
}

/// [`store_core::Transaction::assign_id`]: the next statement's round trip
/// gives the transaction its ID and learns it, though it writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_asked_for_is_learnt_before_any_write() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (learnt, actual) = test_db
        .db
        .run_interaction("assign_xid", |txn| {
            Box::pin(async move {
                txn.assign_id();
                txn.query("SELECT 1", &[]).await?;
                let learnt = xid_of(txn);
                let actual: i64 = txn
                    .query_one("SELECT pg_current_xact_id_if_assigned()::text::bigint", &[])
                    .await?
                    .get(0)?;
                Ok((learnt, actual))
            })
        })
        .await?;
    assert_eq!(learnt, format!("Some({actual})"));
    Ok(())
}

/// A connection that breaks before the COMMIT's round trip is sent (here while
/// the statements queued for it are prepared) fails the interaction: the
/// queued writes never ran, so it must not count as committed, though no
/// statement gave the transaction an ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_before_the_commit_is_sent_is_a_failure() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    create_kv_table(&test_db.db).await?;
    let proxy = Arc::new(TcpProxy::start(&test_db.url).await?);
    let options = DatabaseOptions { pool_size: 1, run_migrations: false };
    let db = Database::connect_with(&proxy.url_through(&test_db.url), &options).await?;
    let result: Result<(), StoreError> = db
        .run_interaction("lost_before_commit", |txn| {
            let proxy = Arc::clone(&proxy);
            Box::pin(async move {
                txn.query("SELECT 1", &[]).await?;
                proxy.sever_all();
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('lost', 1)", &[]);
                Ok(())
            })
        })
        .await;
    assert!(result.is_err(), "a write that never ran was reported as committed");
    assert_eq!(get_kv(&test_db.db, "lost").await?, None);
    Ok(())
}
