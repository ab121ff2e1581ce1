//! The database-backed streams of the store crates, as [`Stream`]s.

use std::sync::Arc;

use replication_proto::RowJson;
use serde::Serialize;
use store_core::{BoxFuture, CachesRow, CachesStream, MultiWriterIdGenerator, StoreError, StreamUpdates};
use store_events::EventsReader;
use store_events::rows::{BackfillRow, EventsStreamRow};
use store_receipts::{ReceiptRow, ReceiptsReader};

use crate::stream::Stream;

/// Turns typed rows into wire rows.
pub(crate) fn to_wire<R: Serialize>(updates: StreamUpdates<R>) -> Result<StreamUpdates<RowJson>, StoreError> {
    let rows = updates
        .rows
        .into_iter()
        .map(|(token, row)| {
            RowJson::from_row(&row)
                .map(|row| (token, row))
                .map_err(|err| StoreError::Misconfigured(format!("a row cannot be serialised: {err}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StreamUpdates { rows, token: updates.token, limited: updates.limited })
}

/// Every known writer's position on the wire (`sign` −1 for backfill).
fn positions(generator: &MultiWriterIdGenerator, sign: i64) -> Vec<(String, i64)> {
    generator
        .get_positions()
        .into_keys()
        .map(|writer| {
            let position = generator.get_current_token_for_writer(&writer) * sign;
            (writer, position)
        })
        .collect()
}

fn decode<R: serde::de::DeserializeOwned>(rows: &[RowJson]) -> Result<Vec<R>, serde_json::Error> {
    rows.iter().map(RowJson::decode).collect()
}

/// The `events` stream.
#[derive(Debug)]
pub struct EventsStream(pub Arc<EventsReader>);

impl Stream for EventsStream {
    fn name(&self) -> &'static str {
        store_events::EVENTS_STREAM
    }
    fn current_token(&self, writer: &str) -> i64 {
        self.0.events_stream().get_current_token_for_writer(writer)
    }
    fn minimal_local_current_token(&self) -> i64 {
        self.0.events_stream().get_minimal_local_current_token()
    }
    fn get_updates_since<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(async move { to_wire(self.0.get_events_updates(writer, from, to, limit).await?) })
    }
    fn apply_rows(&self, writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error> {
        let rows: Vec<EventsStreamRow> = decode(rows)?;
        self.0.process_events_rows(writer, token, &rows);
        Ok(())
    }
    fn advance(&self, writer: &str, token: i64) {
        self.0.events_stream().advance(writer, token);
    }
    fn writer_positions(&self) -> Vec<(String, i64)> {
        positions(self.0.events_stream(), 1)
    }
}

/// The `backfill` stream, whose wire tokens are the negated stream orderings.
#[derive(Debug)]
pub struct BackfillStream(pub Arc<EventsReader>);

impl Stream for BackfillStream {
    fn name(&self) -> &'static str {
        store_events::BACKFILL_STREAM
    }
    fn current_token(&self, writer: &str) -> i64 {
        -self.0.backfill_stream().get_current_token_for_writer(writer)
    }
    fn minimal_local_current_token(&self) -> i64 {
        -self.0.backfill_stream().get_minimal_local_current_token()
    }
    fn get_updates_since<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(async move { to_wire(self.0.get_backfill_updates(writer, from, to, limit).await?) })
    }
    fn apply_rows(&self, writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error> {
        let rows: Vec<BackfillRow> = decode(rows)?;
        self.0.process_backfill_rows(writer, token, &rows);
        Ok(())
    }
    fn advance(&self, writer: &str, token: i64) {
        self.0.backfill_stream().advance(writer, -token);
    }
    fn writer_positions(&self) -> Vec<(String, i64)> {
        positions(self.0.backfill_stream(), -1)
    }
}

/// The `caches` stream. Its token is 0 on SQLite, where nothing is replicated.
#[derive(Debug)]
pub struct CachesStreamAdapter(pub Arc<CachesStream>);

impl Stream for CachesStreamAdapter {
    fn name(&self) -> &'static str {
        CachesStream::STREAM_NAME
    }
    fn current_token(&self, writer: &str) -> i64 {
        self.0.current_token(writer)
    }
    fn minimal_local_current_token(&self) -> i64 {
        self.0.generator().map_or(0, |generator| generator.get_minimal_local_current_token())
    }
    fn get_updates_since<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(async move { to_wire(self.0.get_updates_since(writer, from, to, limit).await?) })
    }
    fn apply_rows(&self, writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error> {
        let rows: Vec<CachesRow> = decode(rows)?;
        self.0.apply_rows(writer, token, &rows);
        Ok(())
    }
    fn advance(&self, writer: &str, token: i64) {
        if let Some(generator) = self.0.generator() {
            generator.advance(writer, token);
        }
    }
    fn writer_positions(&self) -> Vec<(String, i64)> {
        self.0.generator().map(|generator| positions(generator, 1)).unwrap_or_default()
    }
}

/// The `receipts` stream.
#[derive(Debug)]
pub struct ReceiptsStream(pub Arc<ReceiptsReader>);

impl Stream for ReceiptsStream {
    fn name(&self) -> &'static str {
        store_receipts::RECEIPTS_STREAM
    }
    fn current_token(&self, writer: &str) -> i64 {
        self.0.stream().get_current_token_for_writer(writer)
    }
    fn minimal_local_current_token(&self) -> i64 {
        self.0.stream().get_minimal_local_current_token()
    }
    fn get_updates_since<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(async move { to_wire(self.0.get_receipts_updates(writer, from, to, limit).await?) })
    }
    fn apply_rows(&self, writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error> {
        let rows: Vec<ReceiptRow> = decode(rows)?;
        self.0.process_receipts_rows(writer, token, &rows);
        Ok(())
    }
    fn advance(&self, writer: &str, token: i64) {
        self.0.stream().advance(writer, token);
    }
    fn writer_positions(&self) -> Vec<(String, i64)> {
        positions(self.0.stream(), 1)
    }
}
