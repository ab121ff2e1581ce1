//! The `caches` stream as a [`Stream`]: every process writes it.

use std::sync::Arc;

use replication_proto::RowJson;

use super::multi_writer::{decode_rows, positions, to_wire};
use crate::{
    BoxFuture, CachesRow, CachesStream, MultiWriterIdGenerator, StoreError, Stream, StreamSpec, StreamUpdates,
};

/// The `caches` stream. Its token is 0 on SQLite, where nothing is replicated.
#[derive(Debug)]
pub struct CachesStreamAdapter(pub Arc<CachesStream>);

impl Stream for CachesStreamAdapter {
    fn spec(&self) -> StreamSpec {
        CachesStream::SPEC
    }
    fn current_token(&self, writer: &str) -> i64 {
        self.0.current_token(writer)
    }
    fn minimal_local_current_token(&self) -> i64 {
        self.0.generator().map_or(0, |generator| generator.get_minimal_local_current_token())
    }
    fn current_stream_token(&self) -> i64 {
        self.0.generator().map_or(0, |generator| generator.get_current_token())
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
        let rows: Vec<CachesRow> = decode_rows(rows)?;
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
    fn generator(&self) -> Option<&MultiWriterIdGenerator> {
        self.0.generator()
    }
    fn is_writer(&self, _instance: &str) -> bool {
        // Every process invalidates caches.
        true
    }
    fn is_handed_out(&self, token: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        match self.0.generator() {
            Some(generator) => Box::pin(generator.is_handed_out(token)),
            // SQLite serves one process: no other writer sends positions.
            None => Box::pin(std::future::ready(Ok(true))),
        }
    }
    fn announces_moves_without_rows(&self) -> bool {
        // Every process writes `caches`: a move by others alone is not worth an
        // echo from every process.
        false
    }
}
