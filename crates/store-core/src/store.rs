//! The uniform store constructor, and the accessor every mixin builds on.
//!
//! Every store (a component of one domain, or a composition of components) is
//! built the same way: `Store::new(db, conn, config)`. `conn` is the start-up
//! transaction that all constructors share, so they read one consistent snapshot;
//! the composition root commits it once every store is built. Because the shape
//! never varies, a composition root can build any set of components without
//! knowing what each needs.
//!
//! Mixins are traits: a *read* trait has default methods written against a
//! required accessor ([`HasDatabase::database`], or a component accessor), and a
//! *write* trait adds the writing methods for the processes that write a stream.
//! A master store and a worker store implement the same read traits; only the
//! master (or the stream's writer) implements the write trait. See
//! `docs/ARCHITECTURE.md` and the `mixins` integration test for a worked example.

use std::future::Future;

use server_config::ServerConfig;

use crate::{Database, StoreError, Transaction};

/// A store built with the one constructor shape every store shares.
pub trait Store: Sized + Send + Sync {
    /// Builds the store: keeps `db` for later queries, does its start-up reads
    /// (current stream positions, say) on `conn`, and takes its settings (cache
    /// sizes, which streams this process writes) from `config`.
    ///
    /// `conn` is never stored: the composition root commits it after building
    /// every store.
    fn new(
        db: Database,
        conn: &mut Transaction,
        config: &ServerConfig,
    ) -> impl Future<Output = Result<Self, StoreError>> + Send;
}

/// The accessor the read mixins' default methods are written against.
pub trait HasDatabase: Send + Sync {
    /// The database this store queries.
    fn database(&self) -> &Database;
}

/// Builds a store of type `S` on a fresh start-up transaction and commits it.
///
/// This is the composition root's one call per process: `S` is the master's or a
/// worker's top-level store, whose constructor builds its components on the same
/// `conn`. Like any interaction it is retried on a serialization failure (two
/// processes recording their positions at once), building everything afresh.
pub async fn build_store<S: Store>(db: &Database, config: &ServerConfig) -> Result<S, StoreError> {
    let config = config.clone();
    db.run_interaction("build_stores", move |conn| {
        let (db, config) = (db.clone(), config.clone());
        Box::pin(async move { S::new(db, conn, &config).await })
    })
    .await
}
