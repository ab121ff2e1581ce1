//! Migrations apply once, create `stream_positions`, and a database migrated by a
//! newer release is refused.

use store_core::{Database, StoreError, latest_version};
use store_test_support::{TestDb, TestResult, engine_tests};

engine_tests!(
    migrations_apply_once,
    stream_positions_is_unique_per_stream_and_instance,
    a_newer_schema_is_refused_with_both_versions,
);

async fn migrations_apply_once(test_db: TestDb) -> TestResult {
    let engine = test_db.db.engine();
    let latest = latest_version(engine).ok_or("no migrations compiled in")?;
    // TestDb::new connected once already: the first start applied everything.
    assert_eq!(test_db.db.migrations().applied_now, (1..=latest).collect::<Vec<_>>());
    assert_eq!(test_db.db.migrations().schema_version, Some(latest));
    // A second start applies none.
    let again = test_db.reconnect().await?;
    assert!(again.migrations().applied_now.is_empty(), "{:?}", again.migrations());
    assert_eq!(again.migrations().schema_version, Some(latest));
    Ok(())
}

async fn stream_positions_is_unique_per_stream_and_instance(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    let insert = |instance: &'static str| {
        db.run_interaction("insert_position", move |txn| {
            Box::pin(async move {
                txn.execute(
                    "INSERT INTO stream_positions (stream_name, instance_name, stream_id) VALUES ('events', $1, 5)",
                    &[&instance],
                )
                .await
            })
        })
    };
    insert("master").await?;
    insert("worker1").await?;
    let err = insert("master").await.expect_err("one row per stream and instance");
    assert!(err.db_error().is_some_and(|db_err| db_err.is_unique_violation()), "{err}");
    let err = db
        .run_interaction("insert_null_position", |txn| {
            Box::pin(async move {
                txn.execute(
                    "INSERT INTO stream_positions (stream_name, instance_name, stream_id) VALUES ('events', 'w', NULL)",
                    &[],
                )
                .await
            })
        })
        .await;
    assert!(err.is_err(), "stream_id is NOT NULL");
    Ok(())
}

async fn a_newer_schema_is_refused_with_both_versions(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    let latest = latest_version(db.engine()).ok_or("no migrations compiled in")?;
    let future_version = latest + 100;
    db.run_interaction("pretend_newer_release", move |txn| {
        Box::pin(async move {
            txn.execute(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES ($1, 'from the future', TRUE, $2, 0)",
                &[&future_version, &vec![0u8; 48]],
            )
            .await
        })
    })
    .await?;
    db.close().await;
    let err = Database::connect(&test_db.url).await.expect_err("a newer schema must be refused");
    assert!(
        matches!(err, StoreError::SchemaTooNew { database_version, binary_version }
            if database_version == future_version && binary_version == latest),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("newer than this binary"), "{message}");
    assert!(message.contains(&future_version.to_string()), "{message}");
    Ok(())
}
