//! The database layer every store is built on.
//!
//! - [`Database`]: one API over two engines, PostgreSQL (deadpool-postgres, for
//!   deployments of several processes) and SQLite (rusqlite, the embedded default).
//! - Named interactions: [`Database::run_interaction`] runs a closure in one
//!   [`Transaction`], retries serialization failures and deadlocks, logs and counts
//!   each run by name, and runs `call_after` (invalidations),
//!   `call_after_position` and `call_on_exception` callbacks, reading back the
//!   outcome of a COMMIT whose connection broke before they run.
//! - One SQL dialect: stores write PostgreSQL's `$1` placeholders; SQLite gets them
//!   translated here.
//! - [`Migrations`]: each store crate's schema, applied in order and recorded per
//!   crate ([`Database::migrate`]); `store-core`'s own ([`CORE_MIGRATIONS`]) at connect.
//! - Stream IDs: [`MultiWriterIdGenerator`], with per-writer positions persisted
//!   in `stream_positions`.
//! - Caches: [`Cache`], [`CacheRegistry`], [`StreamChangeCache`], and the
//!   [`CachesStream`] that carries invalidations to other processes.
//! - [`MultiWriterToken`]: a position on a stream of several writers, and
//!   [`MultiWriterIdGenerator::wait_for_token`], the wait before serving a read
//!   at a client's token.
//! - [`Stream`]: what replication needs from every stream, with
//!   [`MultiWriterSource`], from which a store crate gets the [`Stream`] of its
//!   database-backed stream in a few lines, and the [`StreamRegistry`].
//! - [`Store`]: the uniform constructor `new(db, conn, ctx)` every store half
//!   shares, with the [`StoreContext`] built from [`StoreSettings`], the config
//!   as store-core's own types.
//!
//! This crate knows nothing about events, receipts or any other domain.

#![warn(missing_docs)]

mod addresses;
mod cache;
mod config;
mod database;
mod error;
mod group_commit;
mod id_generator;
mod migrate;
mod sql;
mod sqlite;
mod store;
mod stream;
mod token;
mod transaction;
mod value;
pub mod writers;

pub use addresses::{http_address_of, record_http_address};

/// Now, in milliseconds since the Unix epoch: how the `*_ts` columns record
/// time (0 before 1970, saturating far in the future).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}
pub use cache::{
    CURRENT_STATE_POKE, Cache, CacheKey, CacheRegistry, CacheStats, CacheWeight, CachesRow, CachesStream,
    DynCache, Expansion, FillTicket, MEMBERS_PER_POKE_ROW, StreamChangeCache,
};
pub use config::{
    CacheConfig, MASTER_INSTANCE, StoreSettings, is_writer_for, redact_url, writer_for_shard, writers_for,
};
pub use database::{BoxFuture, Database, DatabaseOptions, Engine, InteractionStats};
pub use error::{DbError, StoreError};
pub use group_commit::{GroupCommit, GroupCommitStats};
pub use id_generator::{
    DEFAULT_BACKGROUND_RECORD_DELAY, FetchToken, MultiWriterConfig, MultiWriterIdGenerator, PositionTracker,
    StreamIdGuard, StreamIdsGuard, StreamTable,
};
pub use migrate::{CORE_MIGRATIONS, MigrationId, MigrationReport, Migrations};
pub use store::{Composition, HasDatabase, Store, StoreContext, build_store};
pub use stream::{
    CachesStreamAdapter, MultiWriterSource, Stream, StreamRegistry, StreamSpec, StreamUpdates, WriterRule,
    agree_on_writers, check_stream_writers, decode_rows, to_wire,
};
pub use token::{InstanceIds, MultiWriterToken, RoomToken, TokenError, TokenParseError};
pub use transaction::Transaction;
pub use value::{ColumnIndex, FromSqlValue, Row, SqlValue, ToSqlValue, Value};
pub use writers::{DeploymentWriters, WriterSet, WriterState};
