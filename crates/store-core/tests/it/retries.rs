//! PostgreSQL serialization failures and deadlocks are retried; other errors are
//! not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use store_core::{Engine, StoreError};
use store_test_support::{TestDb, TestResult};

use crate::{create_kv_table, get_kv};

/// Raises a server-side error with the given SQLSTATE, as PostgreSQL would.
fn raise(sqlstate: &str) -> String {
    format!("DO $$ BEGIN RAISE EXCEPTION 'forced failure' USING ERRCODE = '{sqlstate}'; END $$")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_serialization_failure_is_retried_then_succeeds() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let db = &test_db.db;
    create_kv_table(db).await?;
    let attempts = Arc::new(AtomicU32::new(0));
    let exceptions = Arc::new(AtomicU32::new(0));
    let afters = Arc::new(AtomicU32::new(0));
    db.run_interaction("fails_once", |txn| {
        let (attempts, exceptions, afters) =
            (Arc::clone(&attempts), Arc::clone(&exceptions), Arc::clone(&afters));
        Box::pin(async move {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            txn.call_on_exception(move || {
                exceptions.fetch_add(1, Ordering::SeqCst);
            });
            txn.call_after(move || {
                afters.fetch_add(1, Ordering::SeqCst);
            });
            txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &i64::from(attempt)]).await?;
            if attempt == 1 {
                txn.execute_batch(&raise("40001")).await?;
            }
            Ok(())
        })
    })
    .await?;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    // Each attempt is its own transaction: the failed one's insert is gone, its
    // exception callback ran, and only the successful attempt's after-callback ran.
    assert_eq!(get_kv(db, "a").await?, Some(2));
    assert_eq!(exceptions.load(Ordering::SeqCst), 1);
    assert_eq!(afters.load(Ordering::SeqCst), 1);
    let stats = &db.interaction_stats()["fails_once"];
    assert_eq!((stats.count, stats.retries, stats.failures), (1, 1, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_concurrent_update_conflict_is_retried() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let db = test_db.db.clone();
    create_kv_table(&db).await?;
    db.run_interaction("seed", |txn| {
        Box::pin(async move { txn.execute("INSERT INTO kv (k, v) VALUES ('counter', 0)", &[]).await })
    })
    .await?;

    // The first attempt takes its snapshot, then waits while another transaction
    // updates the row and commits; its own update must then fail with SQLSTATE
    // 40001 under REPEATABLE READ, and the retry must succeed.
    let (snapshot_taken_tx, snapshot_taken_rx) = tokio::sync::oneshot::channel::<()>();
    let (other_committed_tx, other_committed_rx) = tokio::sync::oneshot::channel::<()>();
    let signals = Arc::new(std::sync::Mutex::new(Some((snapshot_taken_tx, other_committed_rx))));
    let attempts = Arc::new(AtomicU32::new(0));

    let first = {
        let (db, signals, attempts) = (db.clone(), Arc::clone(&signals), Arc::clone(&attempts));
        tokio::spawn(async move {
            db.run_interaction("increment_slowly", |txn| {
                let signals = signals.lock().expect("no test thread panicked holding it").take();
                attempts.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    txn.query_one("SELECT v FROM kv WHERE k = 'counter'", &[]).await?;
                    if let Some((snapshot_taken_tx, other_committed_rx)) = signals {
                        let _ = snapshot_taken_tx.send(());
                        let _ = other_committed_rx.await;
                    }
                    txn.execute("UPDATE kv SET v = v + 1 WHERE k = 'counter'", &[]).await
                })
            })
            .await
        })
    };
    snapshot_taken_rx.await?;
    db.run_interaction("increment_quickly", |txn| {
        Box::pin(async move { txn.execute("UPDATE kv SET v = v + 10 WHERE k = 'counter'", &[]).await })
    })
    .await?;
    other_committed_tx.send(()).map_err(|()| "the slow transaction is gone")?;
    first.await??;

    assert_eq!(attempts.load(Ordering::SeqCst), 2, "the conflicting attempt must be retried once");
    assert_eq!(get_kv(&db, "counter").await?, Some(11));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlocks_are_retried_and_retries_are_bounded() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let db = &test_db.db;
    let attempts = Arc::new(AtomicU32::new(0));
    let err = db
        .run_interaction("always_deadlocks", |txn| {
            let attempts = Arc::clone(&attempts);
            Box::pin(async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                txn.execute_batch(&raise("40P01")).await
            })
        })
        .await
        .expect_err("it never succeeds");
    assert!(err.is_retryable(), "the last error is still the deadlock: {err}");
    assert_eq!(attempts.load(Ordering::SeqCst), 5, "five attempts, then give up");
    assert!(err.to_string().contains("always_deadlocks"), "{err}");
    assert!(err.to_string().contains("40P01"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_errors_surface_at_once() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let db = &test_db.db;
    let attempts = Arc::new(AtomicU32::new(0));
    let err: StoreError = db
        .run_interaction("unique_violation", |txn| {
            let attempts = Arc::clone(&attempts);
            Box::pin(async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                txn.execute_batch(&raise("23505")).await
            })
        })
        .await
        .expect_err("it fails");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert!(err.db_error().is_some_and(|db_err| db_err.is_unique_violation()));
    Ok(())
}
