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
mod recent;
pub mod rows;
mod stream;
mod writer;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use store_core::{CacheWeight, StreamSpec, WriterRule};

pub use reader::{
    CURRENT_STATE_CACHES_BY_MEMBER, CURRENT_STATE_CACHES_BY_ROOM, EventsReader, MembershipChange, StateMap,
    WriterFilter,
};
pub use stream::{BackfillStream, EventsStream};
pub use writer::{ClientTxn, EventsWriter, Persisted};

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
pub const EVENTS: StreamSpec = StreamSpec::new(EVENTS_STREAM, WriterRule::Configured).elastic();

/// The `backfill` stream: written by the writers of `events`.
pub const BACKFILL: StreamSpec =
    StreamSpec::new(BACKFILL_STREAM, WriterRule::Follows(EVENTS_STREAM)).elastic();

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
    ///
    /// This parses the content on every call: a persisted [`Event`] keeps the
    /// result, so code holding one should ask [`Event::membership`] instead.
    pub fn membership(&self) -> Option<String> {
        parse_membership(&self.event_type, &self.content)
    }
}

/// The one reading of a membership from an event's content: `None` unless the
/// type is `m.room.member` (checked first, so other events are never parsed)
/// and the content is a JSON object whose `membership` is a string. Content
/// that is not JSON is treated as having no membership, never as an error.
fn parse_membership(event_type: &str, content: &str) -> Option<String> {
    if event_type != "m.room.member" {
        return None;
    }
    let content: serde_json::Value = serde_json::from_str(content).ok()?;
    content.get("membership")?.as_str().map(str::to_owned)
}

// Both destructure, so that a new field cannot be left out of the weight.
impl CacheWeight for NewEvent {
    fn weight(&self) -> usize {
        let NewEvent { event_id, event_type, state_key, sender, origin_server_ts: _, content } = self;
        event_id.weight() + event_type.weight() + state_key.weight() + sender.weight() + content.weight()
    }
}

/// A persisted event.
///
/// It remembers its membership ([`Event::membership`]) once parsed, or as the
/// writer recorded it: the event cache hands out the same `Arc<Event>` to every
/// reader, and the replication catch-up needs the membership of every member
/// event it sends, so the content is parsed at most once per loaded event, and
/// only when asked. The memory follows the content as loaded: code that
/// changes `event` of an `Event` must not ask it for its membership after.
#[derive(Clone, Eq)]
pub struct Event {
    /// Its position on the `events` stream (negative when backfilled).
    pub stream_ordering: i64,
    /// The instance that persisted it.
    pub instance_name: String,
    /// Its room.
    pub room_id: String,
    /// The event itself.
    pub event: NewEvent,
    /// [`NewEvent::membership`] of `event`, filled on first use. Derived from
    /// `event`, so equality and `Debug` leave it out.
    membership: OnceLock<Option<String>>,
}

impl Event {
    /// The event as loaded from the database; its membership is parsed later,
    /// if ever asked for.
    pub(crate) fn new(stream_ordering: i64, instance_name: String, room_id: String, event: NewEvent) -> Self {
        Event { stream_ordering, instance_name, room_id, event, membership: OnceLock::new() }
    }

    /// Records `membership`, read elsewhere from this same content (the writer's
    /// `room_memberships` row), so that [`Event::membership`] does not parse it.
    /// Does nothing if the event already knows its membership.
    pub(crate) fn remember_membership(&self, membership: String) {
        // Already set means already read from the same content: same value.
        let _already_known = self.membership.set(Some(membership));
    }

    /// For `m.room.member` events, the membership from the content, as
    /// [`NewEvent::membership`] reads it, parsed on the first call only.
    pub fn membership(&self) -> Option<&str> {
        self.membership
            .get_or_init(|| parse_membership(&self.event.event_type, &self.event.content))
            .as_deref()
    }
}

// By hand, to leave out the remembered membership: two loads of one event are
// equal whether or not either was asked for its membership.
impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        let Event { stream_ordering, instance_name, room_id, event, membership: _ } = self;
        *stream_ordering == other.stream_ordering
            && *instance_name == other.instance_name
            && *room_id == other.room_id
            && *event == other.event
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Event { stream_ordering, instance_name, room_id, event, membership: _ } = self;
        f.debug_struct("Event")
            .field("stream_ordering", stream_ordering)
            .field("instance_name", instance_name)
            .field("room_id", room_id)
            .field("event", event)
            .finish()
    }
}

impl CacheWeight for Event {
    fn weight(&self) -> usize {
        // The membership is at most a short word, filled after the cache
        // weighed the entry: it is left out rather than counted late.
        let Event { stream_ordering: _, instance_name, room_id, event, membership: _ } = self;
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
