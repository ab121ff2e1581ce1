//! store-core's integration tests, against real PostgreSQL and SQLite.

mod addresses;
mod caches;
mod commit_outcome;
mod connect;
mod handed_out;
mod id_generator_properties;
mod id_generators;
mod id_reuse;
mod interactions;
mod migrations;
mod mixins;
mod retries;
mod sqlite_engine;
mod tokens;

use store_core::{Database, StoreError};

/// A two-column table most tests write to.
async fn create_kv_table(db: &Database) -> Result<(), StoreError> {
    db.run_interaction("create_kv", |txn| {
        Box::pin(
            async move { txn.execute_batch("CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)").await },
        )
    })
    .await
}

/// The value stored under `key`, if any.
async fn get_kv(db: &Database, key: &str) -> Result<Option<i64>, StoreError> {
    let key = key.to_owned();
    db.run_autocommit("get_kv", move |txn| {
        let key = key.clone();
        Box::pin(async move {
            let row = txn.query_opt("SELECT v FROM kv WHERE k = $1", &[&key]).await?;
            row.map(|row| row.get(0)).transpose()
        })
    })
    .await
}
