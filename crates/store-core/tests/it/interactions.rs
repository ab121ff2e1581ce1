//! Transactions commit and roll back, callbacks run on the right outcome, values
//! survive the round trip, and failures name their interaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use store_core::{StoreError, Value};
use store_test_support::{TestDb, TestResult, engine_tests};

use crate::{create_kv_table, get_kv};

engine_tests!(
    committed_writes_are_visible,
    an_error_rolls_back_everything,
    call_after_runs_only_after_commit,
    call_on_exception_runs_only_on_failure,
    a_cancelled_interaction_counts_as_failed,
    values_round_trip,
    placeholders_can_repeat,
    row_count_and_decode_errors_are_errors,
    failures_name_their_interaction,
    interactions_are_counted,
    autocommit_runs_callbacks_too,
    a_handled_error_still_fails_the_transaction,
    statements_queued_for_the_commit_run_in_order_with_it,
    a_queued_statement_that_fails_rolls_everything_back,
    a_queued_statement_that_fails_ahead_of_a_later_one_is_its_error,
);

async fn committed_writes_are_visible(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let changed = db
        .run_interaction("insert_two", |txn| {
            Box::pin(async move {
                let first = txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &1i64]).await?;
                let second = txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"b", &2i64]).await?;
                Ok(first + second)
            })
        })
        .await?;
    assert_eq!(changed, 2);
    // A separate pool sees it: the data is committed, not only in our connection.
    let other = test_db.reconnect().await?;
    assert_eq!(get_kv(&other, "a").await?, Some(1));
    assert_eq!(get_kv(&other, "b").await?, Some(2));
    Ok(())
}

async fn an_error_rolls_back_everything(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let result: Result<(), StoreError> = db
        .run_interaction("insert_then_fail", |txn| {
            Box::pin(async move {
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &1i64]).await?;
                // The primary key rejects the second insert.
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &2i64]).await?;
                Ok(())
            })
        })
        .await;
    let err = result.expect_err("the duplicate key must fail");
    assert!(err.db_error().is_some_and(|db_err| db_err.is_unique_violation()), "{err}");
    assert_eq!(get_kv(db, "a").await?, None);

    // An application error returned by the closure rolls back the same way.
    let result: Result<(), StoreError> = db
        .run_interaction("insert_then_decide_not_to", |txn| {
            Box::pin(async move {
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"b", &1i64]).await?;
                Err(StoreError::RowCount { interaction: "insert_then_decide_not_to", found: 0 })
            })
        })
        .await;
    assert!(result.is_err());
    assert_eq!(get_kv(db, "b").await?, None);
    Ok(())
}

/// Counts callback runs, shareable with `'static` callbacks.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Counter {
    fn bump(&self) -> impl Fn() + Send + 'static {
        let count = Arc::clone(&self.0);
        move || {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

async fn call_after_runs_only_after_commit(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let after = Counter::default();
    let seen_inside = db
        .run_interaction("insert_with_callback", |txn| {
            let after = after.clone();
            Box::pin(async move {
                txn.call_after(after.bump());
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &1i64]).await?;
                // Not yet: the transaction has not committed.
                Ok(after.get())
            })
        })
        .await?;
    assert_eq!(seen_inside, 0);
    assert_eq!(after.get(), 1);

    let failed_after = Counter::default();
    let result: Result<(), StoreError> = db
        .run_interaction("insert_duplicate_with_callback", |txn| {
            let failed_after = failed_after.clone();
            Box::pin(async move {
                txn.call_after(failed_after.bump());
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &2i64]).await?;
                Ok(())
            })
        })
        .await;
    assert!(result.is_err());
    assert_eq!(failed_after.get(), 0, "call_after must not run when the transaction fails");
    Ok(())
}

async fn call_on_exception_runs_only_on_failure(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let on_exception = Counter::default();
    db.run_interaction("insert_ok", |txn| {
        let on_exception = on_exception.clone();
        Box::pin(async move {
            txn.call_on_exception(on_exception.bump());
            txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &1i64]).await?;
            Ok(())
        })
    })
    .await?;
    assert_eq!(on_exception.get(), 0, "call_on_exception must not run after a commit");

    let result: Result<(), StoreError> = db
        .run_interaction("insert_duplicate", |txn| {
            let on_exception = on_exception.clone();
            Box::pin(async move {
                txn.call_on_exception(on_exception.bump());
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &2i64]).await?;
                Ok(())
            })
        })
        .await;
    assert!(result.is_err());
    assert_eq!(on_exception.get(), 1);
    Ok(())
}

async fn a_cancelled_interaction_counts_as_failed(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let on_exception = Counter::default();
    let after = Counter::default();
    let (inserted_tx, inserted_rx) = tokio::sync::oneshot::channel::<()>();
    let inserted_tx = std::sync::Mutex::new(Some(inserted_tx));
    let interaction = db.run_interaction("insert_then_hang", |txn| {
        let (on_exception, after) = (on_exception.clone(), after.clone());
        let inserted_tx = inserted_tx.lock().expect("no test thread panicked holding it").take();
        Box::pin(async move {
            txn.call_on_exception(on_exception.bump());
            txn.call_after(after.bump());
            txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &1i64]).await?;
            if let Some(inserted_tx) = inserted_tx {
                let _ = inserted_tx.send(());
            }
            std::future::pending::<()>().await;
            Ok(())
        })
    });
    // Drive the interaction until the insert is done, then drop it mid-transaction.
    tokio::select! {
        _ = interaction => panic!("the interaction never finishes"),
        _ = inserted_rx => {}
    }
    assert_eq!(on_exception.get(), 1);
    assert_eq!(after.get(), 0);
    // The insert was rolled back and the pool still works.
    assert_eq!(get_kv(db, "a").await?, None);
    db.run_interaction("insert_after_cancel", |txn| {
        Box::pin(async move {
            txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &2i64]).await?;
            Ok(())
        })
    })
    .await?;
    assert_eq!(get_kv(db, "a").await?, Some(2));
    Ok(())
}

async fn values_round_trip(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    // SQLite accepts any type name, so one statement serves both engines.
    db.run_interaction("create_vals", |txn| {
        Box::pin(async move {
            txn.execute_batch(
                "CREATE TABLE vals (i BIGINT, small INTEGER, r DOUBLE PRECISION, t TEXT, b BYTEA, flag BOOLEAN, absent BIGINT)",
            )
            .await
        })
    })
    .await?;
    let row = db
        .run_interaction("round_trip_insert", |txn| {
            Box::pin(async move {
                let blob: &[u8] = &[0, 1, 254, 255];
                txn.execute(
                    "INSERT INTO vals (i, small, r, t, b, flag, absent) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&i64::MIN, &-7i32, &1.5f64, &"héllo ☃", &blob, &true, &None::<i64>],
                )
                .await?;
                txn.query_one("SELECT i, small, r, t, b, flag, absent FROM vals", &[]).await
            })
        })
        .await?;
    assert_eq!(row.get::<i64>("i")?, i64::MIN);
    assert_eq!(row.get::<i32>("small")?, -7);
    assert_eq!(row.get::<f64>("r")?, 1.5);
    assert_eq!(row.get::<String>("t")?, "héllo ☃");
    assert_eq!(row.get::<Vec<u8>>("b")?, vec![0, 1, 254, 255]);
    assert!(row.get::<bool>("flag")?);
    assert_eq!(row.get::<Option<i64>>("absent")?, None);
    assert_eq!(row.get::<Value>(6)?, Value::Null);
    assert_eq!(row.columns().len(), 7);
    Ok(())
}

async fn placeholders_can_repeat(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let rows = db
        .run_interaction("repeat_placeholder", |txn| {
            Box::pin(async move {
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2), ($3, $2)", &[&"a", &5i64, &"b"]).await?;
                txn.query("SELECT k FROM kv WHERE v = $1 AND (k = $2 OR k <> $2) ORDER BY k", &[&5i64, &"a"])
                    .await
            })
        })
        .await?;
    let keys: Vec<String> = rows.iter().map(|row| row.get(0)).collect::<Result<_, _>>()?;
    assert_eq!(keys, ["a", "b"]);
    Ok(())
}

async fn row_count_and_decode_errors_are_errors(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let err = db
        .run_autocommit("expect_one", |txn| {
            Box::pin(async move { txn.query_one("SELECT v FROM kv WHERE k = $1", &[&"missing"]).await })
        })
        .await
        .expect_err("no row");
    assert!(matches!(err, StoreError::RowCount { interaction: "expect_one", found: 0 }), "{err}");

    let row = db
        .run_autocommit("text_row", |txn| {
            Box::pin(async move { txn.query_one("SELECT 'x' AS word", &[]).await })
        })
        .await?;
    let err = row.get::<i64>("word").expect_err("text is not an integer");
    assert!(err.to_string().contains("cannot decode column `word`"), "{err}");
    let err = row.get::<i64>("nope").expect_err("no such column");
    assert!(err.to_string().contains("no such column"), "{err}");
    let err = row.get::<i64>(3).expect_err("no such index");
    assert!(err.to_string().contains("no such column"), "{err}");
    Ok(())
}

async fn failures_name_their_interaction(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    let err = db
        .run_interaction("select_from_nowhere", |txn| {
            Box::pin(async move { txn.query("SELECT * FROM no_such_table", &[]).await })
        })
        .await
        .expect_err("the table does not exist");
    let message = err.to_string();
    assert!(message.starts_with("database error in interaction `select_from_nowhere`:"), "{message}");
    assert!(message.contains("no_such_table"), "the driver's message is kept: {message}");
    assert!(!err.is_retryable());

    let err = db
        .run_interaction("bad_placeholder", |txn| {
            Box::pin(async move { txn.query("SELECT 1 WHERE 1 = ?", &[&1i64]).await })
        })
        .await
        .expect_err("`?` is not our placeholder style");
    assert!(err.to_string().contains("bad_placeholder"), "{err}");
    Ok(())
}

async fn interactions_are_counted(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    for _ in 0..3 {
        get_kv(db, "a").await?;
    }
    let _ = db
        .run_interaction("always_fails", |txn| {
            Box::pin(async move { txn.execute("SELECT * FROM nowhere", &[]).await })
        })
        .await;
    let stats = db.interaction_stats();
    assert_eq!(stats["get_kv"].count, 3);
    assert_eq!(stats["get_kv"].failures, 0);
    assert_eq!(stats["always_fails"].count, 1);
    assert_eq!(stats["always_fails"].failures, 1);
    assert_eq!(stats["always_fails"].retries, 0);
    Ok(())
}

async fn autocommit_runs_callbacks_too(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let (after, on_exception) = (Counter::default(), Counter::default());
    db.run_autocommit("autocommit_insert", |txn| {
        let (after, on_exception) = (after.clone(), on_exception.clone());
        Box::pin(async move {
            txn.call_after(after.bump());
            txn.call_on_exception(on_exception.bump());
            txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &1i64]).await?;
            Ok(())
        })
    })
    .await?;
    assert_eq!((after.get(), on_exception.get()), (1, 0));
    let _ = db
        .run_autocommit("autocommit_duplicate", |txn| {
            let (after, on_exception) = (after.clone(), on_exception.clone());
            Box::pin(async move {
                txn.call_after(after.bump());
                txn.call_on_exception(on_exception.bump());
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &1i64]).await?;
                Ok(())
            })
        })
        .await;
    assert_eq!((after.get(), on_exception.get()), (1, 1));
    Ok(())
}

async fn a_handled_error_still_fails_the_transaction(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let on_exception = Counter::default();
    let result = db
        .run_interaction("swallow_an_error", |txn| {
            let on_exception = on_exception.clone();
            Box::pin(async move {
                txn.call_on_exception(on_exception.bump());
                txn.execute("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]).await?;
                // PostgreSQL aborts the whole transaction here and would answer the
                // COMMIT with a silent rollback; SQLite would keep the first insert.
                let duplicate = txn.execute("INSERT INTO kv (k, v) VALUES ('a', 2)", &[]).await;
                assert!(duplicate.is_err());
                Ok(())
            })
        })
        .await;
    assert!(matches!(result, Err(StoreError::Aborted { interaction: "swallow_an_error" })), "{result:?}");
    assert_eq!(get_kv(db, "a").await?, None, "nothing was committed, on either engine");
    assert_eq!(on_exception.get(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_cancelled_while_waiting_to_begin_leaves_no_lock_behind() -> TestResult {
    let test_db = TestDb::new(store_core::Engine::Sqlite).await?;
    let db = &test_db.db;
    create_kv_table(db).await?;
    // Hold SQLite's write lock so the next BEGIN IMMEDIATE waits on it: the
    // BEGIN goes with the first statement.
    let mut blocker = db.begin("hold_the_write_lock").await?;
    blocker.query("SELECT 1", &[]).await?;
    let waiting = db.run_interaction("waits_to_begin", |txn| {
        Box::pin(async move { txn.execute("INSERT INTO kv (k, v) VALUES ('late', 1)", &[]).await })
    });
    assert!(tokio::time::timeout(std::time::Duration::from_millis(200), waiting).await.is_err());
    blocker.commit().await?;
    // Had the abandoned BEGIN left its connection in a transaction, this write
    // would wait out the busy timeout and fail.
    let started = std::time::Instant::now();
    db.run_interaction("write_after_cancel", |txn| {
        Box::pin(async move { txn.execute("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]).await })
    })
    .await?;
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(get_kv(db, "late").await?, None);
    Ok(())
}

#[tokio::test]
async fn an_in_memory_database_survives_a_cancelled_interaction() -> TestResult {
    let db = store_core::Database::connect("sqlite::memory:").await?;
    create_kv_table(&db).await?;
    db.run_interaction("insert", |txn| {
        Box::pin(async move { txn.execute("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]).await })
    })
    .await?;
    let hanging = db.run_interaction("insert_then_hang", |txn| {
        Box::pin(async move {
            txn.execute("INSERT INTO kv (k, v) VALUES ('b', 2)", &[]).await?;
            std::future::pending::<()>().await;
            Ok(())
        })
    });
    assert!(tokio::time::timeout(std::time::Duration::from_millis(100), hanging).await.is_err());
    assert_eq!(get_kv(&db, "a").await?, Some(1), "the database and its data are still there");
    assert_eq!(get_kv(&db, "b").await?, None);
    Ok(())
}

/// The isolation the statement runs at.
fn isolation(txn: &mut store_core::Transaction) -> store_core::BoxFuture<'_, Result<String, StoreError>> {
    Box::pin(async move {
        txn.query_one("SELECT current_setting('transaction_isolation')", &[]).await?.get::<String>(0)
    })
}

/// On PostgreSQL, `BEGIN` travels with the first statement: that statement
/// already runs inside the transaction, at the interaction's isolation (the
/// server's default is read committed), and a transaction that ran nothing
/// commits nothing.
#[tokio::test]
async fn postgres_begins_with_the_first_statement() -> TestResult {
    let test_db = TestDb::new(store_core::Engine::Postgres).await?;
    let db = &test_db.db;
    assert_eq!(db.run_interaction("isolation", isolation).await?, "repeatable read");
    assert_eq!(db.run_interaction_read_committed("isolation", isolation).await?, "read committed");
    assert_eq!(db.run_autocommit("isolation", isolation).await?, "read committed");
    create_kv_table(db).await?;
    let failed: Result<(), StoreError> = db
        .run_interaction("first_statement_fails", |txn| {
            Box::pin(async move {
                txn.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &"not a number"]).await?;
                Ok(())
            })
        })
        .await;
    assert!(failed.is_err());
    // The connection went back to the pool outside any transaction.
    assert_eq!(db.run_interaction("isolation", isolation).await?, "repeatable read");
    db.run_interaction("nothing", |_txn| Box::pin(async move { Ok(()) })).await?;
    Ok(())
}

async fn statements_queued_for_the_commit_run_in_order_with_it(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    let seen_before_commit = db
        .run_interaction("queued", |txn| {
            Box::pin(async move {
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"a", &1i64]);
                // A statement in between sends what was queued first.
                let seen: Option<i64> = txn
                    .query_opt("SELECT v FROM kv WHERE k = 'a'", &[])
                    .await?
                    .map(|row| row.get(0))
                    .transpose()?;
                txn.execute_at_commit("UPDATE kv SET v = v + $1 WHERE k = $2", &[&10i64, &"a"]);
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"b".to_owned(), &0i64]);
                txn.execute_at_commit("UPDATE kv SET v = 2 WHERE k = 'b'", &[]);
                // Placeholders out of order and repeated.
                txn.execute_at_commit(
                    "INSERT INTO kv (k, v) VALUES ($2, CAST($1 AS BIGINT) * 2 + $1)",
                    &[&5i64, &"e"],
                );
                // A statement ending in a comment, then one ending in `;`.
                txn.execute_at_commit("UPDATE kv SET v = v + 1 WHERE k = 'e' -- one more", &[]);
                txn.execute_at_commit("UPDATE kv SET v = v + 1 WHERE k = 'e';", &[]);
                Ok(seen)
            })
        })
        .await?;
    assert_eq!(seen_before_commit, Some(1));
    let other = test_db.reconnect().await?;
    assert_eq!(get_kv(&other, "a").await?, Some(11), "queued statements run in the order given");
    assert_eq!(get_kv(&other, "b").await?, Some(2));
    assert_eq!(get_kv(&other, "e").await?, Some(17));

    // More parameters than SQLite binds in one call: still all committed.
    let rows = 8_001;
    db.run_interaction("queued_many", move |txn| {
        Box::pin(async move {
            for batch in 0..2 {
                let keys: Vec<String> = (0..rows).map(|n| format!("k{batch}-{n}")).collect();
                let values: Vec<i64> = (0..rows).map(|n| n as i64).collect();
                let mut params: Vec<&dyn store_core::ToSqlValue> = Vec::new();
                let mut placeholders = Vec::new();
                for (n, (key, value)) in keys.iter().zip(&values).enumerate() {
                    params.extend([key as &dyn store_core::ToSqlValue, value]);
                    placeholders.push(format!("(${}, ${})", 2 * n + 1, 2 * n + 2));
                }
                txn.execute_at_commit(
                    format!("INSERT INTO kv (k, v) VALUES {}", placeholders.join(", ")),
                    &params,
                );
            }
            Ok(())
        })
    })
    .await?;
    assert_eq!(get_kv(&other, "k1-8000").await?, Some(8000));

    // Outside a transaction they run too, each on its own.
    db.run_autocommit("queued_autocommit", |txn| {
        Box::pin(async move {
            txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ($1, $2)", &[&"c", &3i64]);
            Ok(())
        })
    })
    .await?;
    assert_eq!(get_kv(&other, "c").await?, Some(3));
    Ok(())
}

async fn a_queued_statement_that_fails_rolls_everything_back(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    db.run_interaction("seed", |txn| {
        Box::pin(async move {
            txn.execute("INSERT INTO kv (k, v) VALUES ('taken', 0)", &[]).await?;
            Ok(())
        })
    })
    .await?;
    let (after, failed) = (Counter::default(), Counter::default());
    let result: Result<(), StoreError> = db
        .run_interaction("queued_duplicate", |txn| {
            let (after, failed) = (after.clone(), failed.clone());
            Box::pin(async move {
                txn.call_after(after.bump());
                txn.call_on_exception(failed.bump());
                txn.execute("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]).await?;
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('b', 2)", &[]);
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('taken', 3)", &[]);
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('c', 4)", &[]);
                Ok(())
            })
        })
        .await;
    let err = result.expect_err("the duplicate key must fail the commit");
    assert!(
        err.db_error().is_some_and(|db_err| db_err.is_unique_violation()),
        "the statement's own error: {err}"
    );
    for key in ["a", "b", "c"] {
        assert_eq!(get_kv(db, key).await?, None, "{key} rolled back");
    }
    assert_eq!(get_kv(db, "taken").await?, Some(0));
    assert_eq!((after.get(), failed.get()), (0, 1), "failed: no invalidation, the exception callback once");
    // Every statement queued: the whole transaction goes in the COMMIT's
    // call (on SQLite the connection is back in the pool before the answer),
    // and its failure still rolls all of it back.
    let result: Result<(), StoreError> = db
        .run_interaction("queued_only_duplicate", |txn| {
            Box::pin(async move {
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('e', 6)", &[]);
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('taken', 7)", &[]);
                Ok(())
            })
        })
        .await;
    let err = result.expect_err("the duplicate key must fail the commit");
    assert!(err.db_error().is_some_and(|db_err| db_err.is_unique_violation()), "{err}");
    assert_eq!(get_kv(db, "e").await?, None, "e rolled back");
    // The pool is still good.
    db.run_interaction("after", |txn| {
        Box::pin(async move {
            txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('d', 5)", &[]);
            Ok(())
        })
    })
    .await?;
    assert_eq!(get_kv(db, "d").await?, Some(5));
    Ok(())
}

/// On PostgreSQL, a transaction whose only statements are queued for the
/// commit sends `BEGIN`, them and `COMMIT` together: they run inside the
/// transaction, at the interaction's isolation.
#[tokio::test]
async fn postgres_sends_queued_statements_inside_the_transaction() -> TestResult {
    let test_db = TestDb::new(store_core::Engine::Postgres).await?;
    let db = &test_db.db;
    create_kv_table(db).await?;
    db.run_interaction("queued_only", |txn| {
        Box::pin(async move {
            txn.execute_at_commit(
                "INSERT INTO kv (k, v) SELECT current_setting('transaction_isolation'), 1",
                &[],
            );
            Ok(())
        })
    })
    .await?;
    assert_eq!(get_kv(db, "repeatable read").await?, Some(1));
    Ok(())
}

/// Statements queued for the COMMIT go ahead of the next statement, in its
/// round trip or call: when one of them fails, that statement answers with
/// the queued one's error, and the transaction rolls back.
async fn a_queued_statement_that_fails_ahead_of_a_later_one_is_its_error(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    create_kv_table(db).await?;
    db.run_interaction("seed", |txn| {
        Box::pin(async move { txn.execute("INSERT INTO kv (k, v) VALUES ('taken', 0)", &[]).await })
    })
    .await?;
    let seen_before_failing = Arc::new(AtomicUsize::new(0));
    let result: Result<i64, StoreError> = db
        .run_interaction("queued_then_read", |txn| {
            let seen = Arc::clone(&seen_before_failing);
            Box::pin(async move {
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]);
                // The queued insert runs first: the read sees it.
                let row = txn.query_one("SELECT COUNT(*) FROM kv", &[]).await?;
                seen.store(usize::try_from(row.get::<i64>(0)?).unwrap_or(0), Ordering::SeqCst);
                txn.execute_at_commit("INSERT INTO kv (k, v) VALUES ('taken', 2)", &[]);
                let row = txn.query_one("SELECT COUNT(*) FROM kv", &[]).await?;
                row.get(0)
            })
        })
        .await;
    assert_eq!(seen_before_failing.load(Ordering::SeqCst), 2, "taken and a");
    let err = result.expect_err("the duplicate fails the read behind it");
    assert!(
        err.db_error().is_some_and(|db_err| db_err.is_unique_violation()),
        "the queued one's error: {err}"
    );
    assert_eq!(get_kv(db, "a").await?, None, "rolled back");
    assert_eq!(get_kv(db, "taken").await?, Some(0));
    Ok(())
}
