//! Where the instances of a deployment answer HTTP: each process records its
//! own address at start-up (`instance_addresses`), and a process that must
//! reach an instance its config does not name reads the address from there.
//! So a new writer needs only the shared database, the secret and the
//! master's address to be found.

use crate::{Database, StoreError};

/// Records that `instance` answers HTTP at `address` (`HOST:PORT`), replacing
/// what it recorded before (a restart on another port, say).
///
/// ```no_run
/// # async fn example(db: &store_core::Database) -> Result<(), store_core::StoreError> {
/// store_core::record_http_address(db, "persister1", "10.0.0.7:8008").await?;
/// assert_eq!(store_core::http_address_of(db, "persister1").await?.as_deref(), Some("10.0.0.7:8008"));
/// # Ok(())
/// # }
/// ```
pub async fn record_http_address(db: &Database, instance: &str, address: &str) -> Result<(), StoreError> {
    let (instance, address) = (instance.to_owned(), address.to_owned());
    let now = crate::now_ms();
    db.run_autocommit("record_http_address", move |txn| {
        let (instance, address) = (instance.clone(), address.clone());
        Box::pin(async move {
            txn.execute(
                "INSERT INTO instance_addresses (instance_name, http_address, recorded_ts) VALUES ($1, $2, $3) \
                 ON CONFLICT (instance_name) DO UPDATE \
                 SET http_address = EXCLUDED.http_address, recorded_ts = EXCLUDED.recorded_ts",
                &[&instance, &address, &now],
            )
            .await
            .map(drop)
        })
    })
    .await
}

/// The HTTP address `instance` recorded, if it ever started.
pub async fn http_address_of(db: &Database, instance: &str) -> Result<Option<String>, StoreError> {
    let instance = instance.to_owned();
    db.run_autocommit("http_address_of", move |txn| {
        let instance = instance.clone();
        Box::pin(async move {
            let row = txn
                .query_opt(
                    "SELECT http_address FROM instance_addresses WHERE instance_name = $1",
                    &[&instance],
                )
                .await?;
            row.map(|row| row.get(0)).transpose()
        })
    })
    .await
}
