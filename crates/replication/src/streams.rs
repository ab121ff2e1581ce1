//! The database-backed streams of the store crates, as [`Stream`]s.

use std::sync::Arc;

use replication_proto::RowJson;
use serde::Serialize;
use store_account_data::{AccountDataReader, AccountDataRow};
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

/// Decodes every wire row of a batch as `R`.
pub(crate) fn decode<R: serde::de::DeserializeOwned>(rows: &[RowJson]) -> Result<Vec<R>, serde_json::Error> {
    rows.iter().map(RowJson::decode).collect()
}

/// A [`Stream`] over a store reader whose stream has a
/// [`MultiWriterIdGenerator`]; `sign` is −1 where wire tokens are the negated
/// stream IDs (backfill), which the reader's fetch takes as they are.
macro_rules! multi_writer_stream {
    (
        $(#[$doc:meta])*
        $adapter:ident($reader:ty) {
            name: $name:expr,
            generator: $generator:ident,
            sign: $sign:literal,
            row: $row:ty,
            fetch: $fetch:ident,
            apply: $apply:ident $(,)?
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $adapter(pub Arc<$reader>);

        impl $adapter {
            const SIGN: i64 = $sign;
        }

        impl Stream for $adapter {
            fn name(&self) -> &'static str {
                $name
            }
            fn current_token(&self, writer: &str) -> i64 {
                Self::SIGN * self.0.$generator().get_current_token_for_writer(writer)
            }
            fn minimal_local_current_token(&self) -> i64 {
                Self::SIGN * self.0.$generator().get_minimal_local_current_token()
            }
            fn current_stream_token(&self) -> i64 {
                Self::SIGN * self.0.$generator().get_current_token()
            }
            fn get_updates_since<'a>(
                &'a self,
                writer: &'a str,
                from: i64,
                to: i64,
                limit: usize,
            ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
                Box::pin(async move { to_wire(self.0.$fetch(writer, from, to, limit).await?) })
            }
            fn apply_rows(&self, writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error> {
                let rows: Vec<$row> = decode(rows)?;
                self.0.$apply(writer, token, &rows);
                Ok(())
            }
            fn advance(&self, writer: &str, token: i64) {
                self.0.$generator().advance(writer, Self::SIGN * token);
            }
            fn writer_positions(&self) -> Vec<(String, i64)> {
                positions(self.0.$generator(), Self::SIGN)
            }
            fn generator(&self) -> Option<&MultiWriterIdGenerator> {
                Some(self.0.$generator())
            }
            fn is_writer(&self, instance: &str) -> bool {
                self.0.$generator().is_writer(instance)
            }
            fn is_handed_out(&self, token: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
                Box::pin(self.0.$generator().is_handed_out(token.saturating_mul(Self::SIGN)))
            }
        }
    };
}

multi_writer_stream! {
    /// The `events` stream.
    EventsStream(EventsReader) {
        name: store_events::EVENTS_STREAM,
        generator: events_stream,
        sign: 1,
        row: EventsStreamRow,
        fetch: get_events_updates,
        apply: process_events_rows,
    }
}

multi_writer_stream! {
    /// The `backfill` stream, whose wire tokens are the negated stream orderings.
    BackfillStream(EventsReader) {
        name: store_events::BACKFILL_STREAM,
        generator: backfill_stream,
        sign: -1,
        row: BackfillRow,
        fetch: get_backfill_updates,
        apply: process_backfill_rows,
    }
}

multi_writer_stream! {
    /// The `receipts` stream.
    ReceiptsStream(ReceiptsReader) {
        name: store_receipts::RECEIPTS_STREAM,
        generator: stream,
        sign: 1,
        row: ReceiptRow,
        fetch: get_receipts_updates,
        apply: process_receipts_rows,
    }
}

multi_writer_stream! {
    /// The `account_data` stream.
    AccountDataStream(AccountDataReader) {
        name: store_account_data::ACCOUNT_DATA_STREAM,
        generator: stream,
        sign: 1,
        row: AccountDataRow,
        fetch: get_account_data_updates,
        apply: process_account_data_rows,
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
