//! The receipts stream: read receipts per room and user.
//!
//! This crate is laid out now so the dependency graph is fixed from the start; its
//! tables, `ReceiptsReader` and `ReceiptsWriter` arrive with the stores issue. It
//! depends on `store-core` only, never on another domain crate.

#![warn(missing_docs)]

/// The name of the stream this crate owns, as it appears in `[stream_writers]`,
/// in `stream_positions` and on the wire.
pub const RECEIPTS_STREAM: &str = "receipts";
