//! Bad URLs and unreachable databases give one clear error each.

use store_core::{Database, StoreError};
use store_test_support::{TestDb, TestResult};

async fn connect_error(url: &str) -> StoreError {
    Database::connect(url).await.expect_err("connecting must fail")
}

fn assert_one_line_containing(err: &StoreError, expected: &str) {
    let message = err.to_string();
    assert!(!message.contains('\n'), "one line: {message:?}");
    assert!(message.contains(expected), "{message:?} lacks {expected:?}");
}

#[tokio::test]
async fn unsupported_schemes_are_named() {
    for url in ["mysql://root@localhost/db", "localhost:5432", ""] {
        let err = connect_error(url).await;
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{url}: {err}");
        assert_one_line_containing(&err, "expected postgres://…, sqlite://PATH or sqlite::memory:");
    }
}

#[tokio::test]
async fn a_malformed_postgres_url_is_refused() {
    let err = connect_error("postgres://user:secret@host:notaport/db").await;
    assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
    assert_one_line_containing(&err, "invalid database URL postgres://user:***@host:notaport/db");
    assert!(!err.to_string().contains("secret"), "the password must not leak: {err}");
}

#[tokio::test]
async fn an_unreachable_server_names_the_address() {
    // Port 1 on loopback: nothing listens there.
    let err = connect_error("postgres://postgres:hunter2@127.0.0.1:1/synapse").await;
    assert!(matches!(err, StoreError::Connect { .. }), "{err}");
    assert_one_line_containing(&err, "cannot connect to PostgreSQL at 127.0.0.1:1/synapse");
    assert!(!err.to_string().contains("hunter2"));
}

#[tokio::test]
async fn a_missing_sqlite_directory_is_named() {
    let err = connect_error("sqlite:///nonexistent-dir/for-sure/homeserver.db").await;
    assert_one_line_containing(&err, "the directory /nonexistent-dir/for-sure does not exist");
}

#[tokio::test]
async fn in_memory_sqlite_works_and_keeps_its_data() -> TestResult {
    let db = Database::connect("sqlite::memory:").await?;
    crate::create_kv_table(&db).await?;
    db.run_interaction("insert", |txn| {
        Box::pin(async move { txn.execute("INSERT INTO kv (k, v) VALUES ('a', 1)", &[]).await })
    })
    .await?;
    // Same pool, possibly another checkout: still the one in-memory database.
    assert_eq!(crate::get_kv(&db, "a").await?, Some(1));
    Ok(())
}

#[tokio::test]
async fn a_wrong_postgres_database_name_is_reported() -> TestResult {
    // The server is reachable but the database does not exist.
    let admin_url = store_test_support::postgres_admin_url();
    let (base, _) = admin_url.rsplit_once('/').ok_or("admin URL has no database")?;
    let err = connect_error(&format!("{base}/no_such_database_here")).await;
    assert_one_line_containing(&err, "no_such_database_here");
    // And the same server works with a database of our own.
    let _test_db = TestDb::new(store_core::Engine::Postgres).await?;
    Ok(())
}

/// A SQLite file runs in WAL mode, synced at checkpoints only (docs/config.md
/// says what that keeps).
#[tokio::test]
async fn a_sqlite_file_has_the_documented_settings() -> TestResult {
    let test_db = TestDb::new(store_core::Engine::Sqlite).await?;
    let pragma = |name: &'static str| {
        let db = test_db.db.clone();
        async move {
            db.run_autocommit("read_pragma", move |txn| {
                Box::pin(async move {
                    let row = txn.query_one(&format!("PRAGMA {name}"), &[]).await?;
                    Ok(match row.values().first() {
                        Some(store_core::Value::Integer(number)) => number.to_string(),
                        _ => row.get::<String>(0)?,
                    })
                })
            })
            .await
        }
    };
    assert_eq!(pragma("journal_mode").await?, "wal");
    // NORMAL is 1.
    assert_eq!(pragma("synchronous").await?, "1");
    Ok(())
}
