//! The events stream: events, the current state of rooms and room memberships.
//!
//! This crate is laid out now so the dependency graph is fixed from the start; its
//! tables, its `EventsReader` (every process) and `EventsWriter` (the stream's
//! writers) arrive with the stores issue. It depends on `store-core` only, never on
//! another domain crate.

#![warn(missing_docs)]

/// The name of the stream this crate owns, as it appears in `[stream_writers]`,
/// in `stream_positions` and on the wire.
pub const EVENTS_STREAM: &str = "events";
