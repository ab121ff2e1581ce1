//! The SQLite engine's own shape: transactions take turns on one writer
//! connection while autocommit reads run beside them, and what SQLite hands
//! back that our values cannot hold is an error, never a panic.

use std::time::Duration;

use store_core::{Engine, StoreError, ToSqlValue};
use store_test_support::{TestDb, TestResult, engine_tests};

use crate::{create_kv_table, get_kv};

engine_tests!(a_wrong_number_of_parameters_is_an_error);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_while_a_transaction_writes() -> TestResult {
    let test_db = TestDb::new(Engine::Sqlite).await?;
    let db = &test_db.db;
    create_kv_table(db).await?;
    let mut writing = db.begin("write_and_wait").await?;
    writing.execute("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]).await?;
    // The writer is taken and holds SQLite's write lock: a read that had to
    // wait for either would time out here.
    let read = tokio::time::timeout(Duration::from_secs(2), get_kv(db, "a")).await?;
    assert_eq!(read?, None, "the uncommitted row is not seen");
    writing.commit().await?;
    assert_eq!(get_kv(db, "a").await?, Some(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_take_turns_without_retries() -> TestResult {
    let test_db = TestDb::new(Engine::Sqlite).await?;
    let db = &test_db.db;
    create_kv_table(db).await?;
    db.run_interaction("seed", |txn| {
        Box::pin(async move { txn.execute("INSERT INTO kv (k, v) VALUES ('n', 0)", &[]).await })
    })
    .await?;
    let bumps = (0..32).map(|_| {
        let db = db.clone();
        tokio::spawn(async move {
            db.run_interaction("bump", |txn| {
                Box::pin(async move {
                    // Read, yield, write: overlapping transactions would lose
                    // increments or fail each other.
                    let n: i64 = txn.query_one("SELECT v FROM kv WHERE k = 'n'", &[]).await?.get(0)?;
                    tokio::task::yield_now().await;
                    txn.execute("UPDATE kv SET v = $1 WHERE k = 'n'", &[&(n + 1)]).await
                })
            })
            .await
        })
    });
    for bump in bumps.collect::<Vec<_>>() {
        bump.await??;
    }
    assert_eq!(get_kv(db, "n").await?, Some(32));
    let stats = db.interaction_stats()["bump"];
    assert_eq!((stats.count, stats.failures, stats.retries), (32, 0, 0));
    Ok(())
}

#[tokio::test]
async fn text_that_is_not_utf8_is_an_error() -> TestResult {
    let db = store_core::Database::connect("sqlite::memory:").await?;
    let read = db
        .run_autocommit("read_bad_text", |txn| {
            Box::pin(async move { txn.query("SELECT CAST(x'ff' AS TEXT)", &[]).await })
        })
        .await;
    assert!(matches!(read, Err(StoreError::Database { interaction: "read_bad_text", .. })), "{read:?}");
    // The connection is still good.
    let ok: i64 = db
        .run_autocommit("read_good", |txn| {
            Box::pin(async move { txn.query_one("SELECT 7", &[]).await?.get(0) })
        })
        .await?;
    assert_eq!(ok, 7);
    Ok(())
}

#[tokio::test]
async fn a_closed_database_refuses_interactions_clearly() -> TestResult {
    let test_db = TestDb::new(Engine::Sqlite).await?;
    let db = &test_db.db;
    create_kv_table(db).await?;
    db.close().await;
    let read = get_kv(db, "a").await.expect_err("closed");
    assert!(read.to_string().contains("closed"), "{read}");
    let write = db
        .run_interaction("write_after_close", |txn| {
            Box::pin(async move { txn.execute("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]).await })
        })
        .await
        .expect_err("closed");
    assert!(write.to_string().contains("closed"), "{write}");
    Ok(())
}

async fn a_wrong_number_of_parameters_is_an_error(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let too_few: &[&dyn ToSqlValue] = &[&"a"];
    let too_many: &[&dyn ToSqlValue] = &[&"a", &2i64];
    for (sql, params) in [
        ("INSERT INTO kv (k, v) VALUES ($1, $2)", too_few),
        ("INSERT INTO kv (k, v) VALUES ($1, 1)", too_many),
    ] {
        let result = db
            .run_interaction("wrong_parameters", |txn| {
                Box::pin(async move { txn.execute(sql, params).await })
            })
            .await;
        assert!(matches!(result, Err(StoreError::Database { .. })), "{sql}: {result:?}");
    }
    assert_eq!(get_kv(db, "a").await?, None);
    Ok(())
}
