//! Replication between processes: the [`Outbound`] logic that tells other processes what this one
//! wrote, and the [`Inbound`] logic that applies what they send (catching up from
//! the database when it sees a gap).
//!
//! Streams implement [`Stream`] (from `store-core`, re-exported here); each store
//! crate brings its own, so this crate knows none of them.
//!
//! A [`Hub`] ties them together for one process; [`tcp`] and [`redis`] move its
//! commands. [`typing`] and [`federation`] are the in-memory streams, owned by
//! their handlers. The wire format itself is `replication-proto`.

#![warn(missing_docs)]

pub mod federation;
pub mod http;
mod hub;
mod inbound;
mod outbound;
pub mod redis;
pub mod tcp;
pub mod transports;
pub mod typing;

pub use federation::FederationStream;
pub use hub::{Hub, RefusalReason, Settings};
pub use inbound::{Inbound, InboundError, Link, MAX_HELD_ROWS, MAX_UNKNOWN_STREAMS};
pub use outbound::{Outbound, ROWS_PER_POLL};
pub use store_core::{Stream, StreamRegistry};
pub use typing::TypingStream;

/// Locks `mutex`, going on past poisoning: the locks of this crate guard only
/// set, map and counter updates that a panic cannot leave half-done.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many rows one catch-up query fetches at most.
pub const CATCH_UP_BATCH: usize = 1000;
