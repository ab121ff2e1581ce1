//! Migrations apply once and are recorded per crate, so two crates never clash
//! over a version; a database migrated by a newer release, or a released file
//! changed since, is refused; a database migrated before migrations were
//! recorded per crate is adopted without running anything twice.

use store_core::{CORE_MIGRATIONS, Database, Migrations, StoreError};
use store_test_support::{TestDb, TestResult, engine_tests};

engine_tests!(
    migrations_apply_once,
    stream_positions_is_unique_per_stream_and_instance,
    two_crates_with_the_same_versions_do_not_clash,
    a_newer_schema_is_refused_with_both_versions,
    a_changed_migration_is_refused,
    a_database_of_the_single_folder_era_is_adopted,
);

/// A crate of its own, whose versions (1 and 2) are also store-core's.
static NOTES: Migrations = Migrations::new(
    "notes",
    sqlx::migrate!("tests/it/notes/postgres"),
    sqlx::migrate!("tests/it/notes/sqlite"),
);

async fn migrations_apply_once(test_db: TestDb) -> TestResult {
    let engine = test_db.db.engine();
    let latest = CORE_MIGRATIONS.latest_version(engine).ok_or("no migrations compiled in")?;
    // TestDb::new connected once already: the first start applied everything.
    let versions: Vec<i64> = test_db.db.migrations().applied_now.iter().map(|id| id.version).collect();
    assert_eq!(versions, (1..=latest).collect::<Vec<_>>());
    assert!(test_db.db.migrations().applied_now.iter().all(|id| id.owner == "store-core"));
    assert_eq!(test_db.db.migrations().schema_versions.get("store-core"), Some(&latest));
    // A second start applies none.
    let again = test_db.reconnect().await?;
    assert!(again.migrations().applied_now.is_empty(), "{:?}", again.migrations());
    assert_eq!(again.migrations().schema_versions.get("store-core"), Some(&latest));
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

async fn count(db: &Database, sql: &'static str) -> Result<i64, StoreError> {
    db.run_autocommit("count", move |txn| Box::pin(async move { txn.query_one(sql, &[]).await?.get(0) }))
        .await
}

async fn two_crates_with_the_same_versions_do_not_clash(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    let report = db.migrate(&[&CORE_MIGRATIONS, &NOTES]).await?;
    let applied: Vec<(&str, i64)> = report.applied_now.iter().map(|id| (id.owner, id.version)).collect();
    assert_eq!(applied, [("notes", 1), ("notes", 2)]);
    assert_eq!(count(db, "SELECT COUNT(*) FROM notes").await?, 0);
    assert_eq!(count(db, "SELECT COUNT(*) FROM schema_migrations WHERE owner = 'notes'").await?, 2);
    // Applied once, however often asked.
    assert!(db.migrate(&[&NOTES]).await?.applied_now.is_empty());
    Ok(())
}

async fn a_newer_schema_is_refused_with_both_versions(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    let latest = CORE_MIGRATIONS.latest_version(db.engine()).ok_or("no migrations compiled in")?;
    let future_version = latest + 100;
    db.run_interaction("pretend_newer_release", move |txn| {
        Box::pin(async move {
            txn.execute(
                "INSERT INTO schema_migrations (owner, version, description, checksum, applied_ts) \
                 VALUES ('store-core', $1, 'from the future', '00', 0)",
                &[&future_version],
            )
            .await
        })
    })
    .await?;
    db.close().await;
    let err = Database::connect(&test_db.url).await.expect_err("a newer schema must be refused");
    assert!(
        matches!(&err, StoreError::SchemaTooNew { owner, database_version, binary_version }
            if owner == "store-core" && *database_version == future_version && *binary_version == latest),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("newer than this binary"), "{message}");
    assert!(message.contains(&future_version.to_string()), "{message}");
    Ok(())
}

async fn a_changed_migration_is_refused(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    db.run_interaction("edit_a_released_file", |txn| {
        Box::pin(async move {
            txn.execute(
                "UPDATE schema_migrations SET checksum = 'ff' WHERE owner = 'store-core' AND version = 2",
                &[],
            )
            .await
        })
    })
    .await?;
    let err = db.migrate(&[&CORE_MIGRATIONS]).await.expect_err("a changed file must be refused");
    assert!(
        matches!(&err, StoreError::MigrationChanged { owner, version: 2 } if owner == "store-core"),
        "{err}"
    );
    Ok(())
}

/// A database whose tables were made when every migration lived in one folder
/// and sqlx recorded them in `_sqlx_migrations`: nothing runs twice.
async fn a_database_of_the_single_folder_era_is_adopted(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    db.run_interaction("pretend_single_folder_era", |txn| {
        Box::pin(async move {
            if txn.engine() == store_core::Engine::Postgres {
                txn.execute_batch("DROP FUNCTION stream_writers_fence(TEXT, BIGINT)").await?;
            }
            txn.execute_batch(
                "DROP TABLE schema_migrations; \
                 DROP TABLE instance_addresses; \
                 DROP TABLE stream_writer_acks; \
                 DROP TABLE deployment_stream_writers; \
                 CREATE TABLE deployment_stream_writers (stream_name TEXT NOT NULL PRIMARY KEY, \
                 writers TEXT NOT NULL, recorded_by TEXT NOT NULL); \
                 CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
                 installed_on TEXT, success BOOLEAN NOT NULL, checksum TEXT NOT NULL, execution_time BIGINT NOT NULL); \
                 INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES (1, 'stream positions', TRUE, '', 0), (2, 'cache invalidation stream', TRUE, '', 0), \
                 (6, 'deployment stream writers', TRUE, '', 0), (7, 'instance map', TRUE, '', 0), \
                 (9, 'stream id high water', TRUE, '', 0)",
            )
            .await
        })
    })
    .await?;
    // Running one of that era's migrations again would fail: its tables
    // exist already. What was added since is made.
    let report = db.migrate(&[&CORE_MIGRATIONS]).await?;
    let applied: Vec<i64> = report.applied_now.iter().map(|id| id.version).collect();
    assert_eq!(applied, [6, 7], "{report:?}");
    let adopted: Vec<i64> = report.adopted_now.iter().map(|id| id.version).collect();
    assert_eq!(adopted, [1, 2, 3, 4, 5]);
    assert!(db.migrate(&[&CORE_MIGRATIONS]).await?.adopted_now.is_empty());
    Ok(())
}
