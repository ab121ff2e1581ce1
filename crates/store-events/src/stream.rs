//! The `events` and `backfill` streams as replication sees them.

use std::sync::Arc;

use store_core::{
    BoxFuture, MultiWriterIdGenerator, MultiWriterSource, StoreError, StreamSpec, StreamUpdates,
};

use crate::rows::{BackfillRow, EventsStreamRow};
use crate::{BACKFILL, EVENTS, EventsReader};

/// The `events` stream.
#[derive(Debug)]
pub struct EventsStream(pub Arc<EventsReader>);

impl MultiWriterSource for EventsStream {
    type Row = EventsStreamRow;
    const SPEC: StreamSpec = EVENTS;

    fn id_generator(&self) -> &MultiWriterIdGenerator {
        self.0.events_stream()
    }
    fn fetch<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<EventsStreamRow>, StoreError>> {
        Box::pin(self.0.get_events_updates(writer, from, to, limit))
    }
    fn apply(&self, writer: &str, token: i64, rows: &[EventsStreamRow]) {
        self.0.process_events_rows(writer, token, rows);
    }
}

/// The `backfill` stream, whose wire tokens are the negated stream orderings.
#[derive(Debug)]
pub struct BackfillStream(pub Arc<EventsReader>);

impl MultiWriterSource for BackfillStream {
    type Row = BackfillRow;
    const SPEC: StreamSpec = BACKFILL;
    const SIGN: i64 = -1;

    fn id_generator(&self) -> &MultiWriterIdGenerator {
        self.0.backfill_stream()
    }
    fn fetch<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<BackfillRow>, StoreError>> {
        Box::pin(self.0.get_backfill_updates(writer, from, to, limit))
    }
    fn apply(&self, writer: &str, token: i64, rows: &[BackfillRow]) {
        self.0.process_backfill_rows(writer, token, rows);
    }
}
