//! The database layer every store is built on.
//!
//! - [`Database`]: one API over two engines, PostgreSQL (deadpool-postgres, for
//!   deployments of several processes) and SQLite (sqlx, the embedded default).
//! - Named interactions: [`Database::run_interaction`] runs a closure in one
//!   [`Transaction`], retries serialization failures and deadlocks, logs and counts
//!   each run by name, and runs `call_after` (invalidations),
//!   `call_after_position` and `call_on_exception` callbacks, reading back the
//!   outcome of a COMMIT whose connection broke before they run.
//! - One SQL dialect: stores write PostgreSQL's `$1` placeholders; SQLite gets them
//!   translated here.
//! - Migrations from `migrations/<engine>/`, applied once at connect.
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
//! - [`Store`]: the uniform constructor `new(db, conn, config)` every store shares.
//!
//! This crate knows nothing about events, receipts or any other domain.

#![warn(missing_docs)]

mod cache;
mod database;
mod error;
mod id_generator;
mod migrate;
mod sql;
mod store;
mod stream;
mod token;
mod transaction;
mod value;

pub use cache::{
    CURRENT_STATE_POKE, Cache, CacheKey, CacheRegistry, CacheStats, CacheWeight, CachesRow, CachesStream,
    DynCache, Expansion, FillTicket, MEMBERS_PER_POKE_ROW, StreamChangeCache,
};
pub use database::{BoxFuture, Database, DatabaseOptions, Engine, InteractionStats};
pub use error::{DbError, StoreError};
pub use id_generator::{
    DEFAULT_BACKGROUND_RECORD_DELAY, FetchToken, MultiWriterConfig, MultiWriterIdGenerator, PositionTracker,
    StreamIdGuard, StreamIdsGuard, StreamTable,
};
pub use migrate::{MigrationReport, latest_version};
pub use store::{HasDatabase, Store, build_store};
pub use stream::{
    CachesStreamAdapter, MultiWriterSource, Stream, StreamRegistry, StreamUpdates, decode_rows, to_wire,
};
pub use token::{InstanceIds, MultiWriterToken, RoomToken, TokenError, TokenParseError};
pub use transaction::Transaction;
pub use value::{ColumnIndex, FromSqlValue, Row, SqlValue, ToSqlValue, Value};

/// The server configuration stores are built with, re-exported so store crates
/// need not depend on `server-config` themselves.
pub use server_config::ServerConfig;
