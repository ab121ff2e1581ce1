//! The `events` and `backfill` streams: events, the current state of rooms and
//! room memberships.
//!
//! - [`EventsReader`], used by every process: reads (cached where they are hot),
//!   the replication catch-up queries, and the worker side of the streams
//!   ([`EventsReader::process_events_rows`]).
//! - [`EventsWriter`], built only on the instances configured as the stream's
//!   writers: persisting a room's events in one transaction.
//! - [`rows`]: the streams' rows in their wire form.
//!
//! This crate depends on `store-core` only, never on another domain crate.

#![warn(missing_docs)]

mod reader;
pub mod rows;
mod stream;
mod writer;

use store_core::{CacheWeight, StreamSpec, WriterRule};

pub use reader::{
    CURRENT_STATE_CACHES_BY_MEMBER, CURRENT_STATE_CACHES_BY_ROOM, EventsReader, MembershipChange, StateMap,
    WriterFilter,
};
pub use stream::{BackfillStream, EventsStream};
pub use writer::{ClientTxn, EventsWriter};

/// This crate's tables (`events`, `current_state_events`, `room_memberships`, `event_txn_id` and the two streams' sequences), for both engines: what a
/// composition including this crate lists in `Store::migrations`.
pub static MIGRATIONS: store_core::Migrations = store_core::Migrations::new(
    env!("CARGO_PKG_NAME"),
    sqlx::migrate!("migrations/postgres"),
    sqlx::migrate!("migrations/sqlite"),
);

/// The name of the events stream, as in `[stream_writers]`, `stream_positions`
/// and on the wire.
pub const EVENTS_STREAM: &str = "events";

/// The name of the backfill stream.
pub const BACKFILL_STREAM: &str = "backfill";

/// The `events` stream: written by its configured writers, each room by one.
pub const EVENTS: StreamSpec = StreamSpec::new(EVENTS_STREAM, WriterRule::Configured);

/// The `backfill` stream: written by the writers of `events`.
pub const BACKFILL: StreamSpec = StreamSpec::new(BACKFILL_STREAM, WriterRule::Follows(EVENTS_STREAM));

/// An event to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Its ID.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// Its state key; `Some` makes it a state event.
    pub state_key: Option<String>,
    /// Who sent it.
    pub sender: String,
    /// When the sender's server says it was sent, in milliseconds.
    pub origin_server_ts: i64,
    /// Its content, as JSON text.
    pub content: String,
}

impl NewEvent {
    /// For `m.room.member` events, the membership (`join`, `leave`, …) from the
    /// content; `None` otherwise or when the content has none.
    pub fn membership(&self) -> Option<String> {
        if self.event_type != "m.room.member" {
            return None;
        }
        let content: serde_json::Value = serde_json::from_str(&self.content).ok()?;
        content.get("membership")?.as_str().map(str::to_owned)
    }
}

// Both destructure, so that a new field cannot be left out of the weight.
impl CacheWeight for NewEvent {
    fn weight(&self) -> usize {
        let NewEvent { event_id, event_type, state_key, sender, origin_server_ts: _, content } = self;
        event_id.weight() + event_type.weight() + state_key.weight() + sender.weight() + content.weight()
    }
}

/// A persisted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its position on the `events` stream (negative when backfilled).
    pub stream_ordering: i64,
    /// The instance that persisted it.
    pub instance_name: String,
    /// Its room.
    pub room_id: String,
    /// The event itself.
    pub event: NewEvent,
}

impl CacheWeight for Event {
    fn weight(&self) -> usize {
        let Event { stream_ordering: _, instance_name, room_id, event } = self;
        instance_name.weight() + room_id.weight() + event.weight()
    }
}

/// The events mixin's read side: a composition that reads events, room state and memberships says where
/// its reader is, and handlers written against this trait serve a master's
/// store and a worker's alike.
pub trait EventsStore: Send + Sync {
    /// The read half of events, room state and memberships.
    fn events(&self) -> &std::sync::Arc<EventsReader>;
}

/// The events mixin's write side: `Some` on the stream's writers.
pub trait EventsWriteStore: EventsStore {
    /// The write half, on the instances configured to write the stream.
    fn events_writer(&self) -> Option<&EventsWriter>;
}
