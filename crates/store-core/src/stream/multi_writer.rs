//! [`MultiWriterSource`]: the few things a store reader says about its stream,
//! from which it gets a whole [`Stream`].

use std::fmt;

use replication_proto::RowJson;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{BoxFuture, MultiWriterIdGenerator, StoreError, Stream, StreamSpec, StreamUpdates};

/// A database-backed stream of several writers, as its store crate describes
/// it: every such type is a [`Stream`].
///
/// A store crate wraps its reader in a type of its own and says where the
/// generator is, how to read rows for a catch-up and how to apply rows that
/// arrive; tokens, positions, the writers' rules and the wire form follow.
///
/// ```no_run
/// use std::sync::Arc;
///
/// use serde::{Deserialize, Serialize};
/// use store_core::{
///     BoxFuture, MultiWriterIdGenerator, MultiWriterSource, StoreError, StreamSpec, StreamUpdates, WriterRule,
/// };
///
/// #[derive(Serialize, Deserialize)]
/// struct NoteRow {
///     user_id: String,
///     note: String,
/// }
///
/// /// A store crate's reader, holding its stream's generator.
/// #[derive(Debug)]
/// struct NotesReader {
///     stream: MultiWriterIdGenerator,
/// }
///
/// /// The stream: a [`Stream`](store_core::Stream) for the registry.
/// #[derive(Debug)]
/// struct NotesStream(Arc<NotesReader>);
///
/// impl MultiWriterSource for NotesStream {
///     type Row = NoteRow;
///     const SPEC: StreamSpec = StreamSpec::new("notes", WriterRule::Configured);
///
///     fn id_generator(&self) -> &MultiWriterIdGenerator {
///         &self.0.stream
///     }
///     fn fetch<'a>(
///         &'a self,
///         _writer: &'a str,
///         _from: i64,
///         to: i64,
///         _limit: usize,
///     ) -> BoxFuture<'a, Result<StreamUpdates<NoteRow>, StoreError>> {
///         // A real reader runs its catch-up query (`StreamUpdates::fetch`).
///         Box::pin(async move { Ok(StreamUpdates::empty(to)) })
///     }
///     fn apply(&self, writer: &str, token: i64, _rows: &[NoteRow]) {
///         // Invalidate what the rows make stale, then move the writer on.
///         self.0.stream.advance(writer, token);
///     }
/// }
/// ```
pub trait MultiWriterSource: Send + Sync + fmt::Debug {
    /// The rows of the stream, in the JSON form they take on the wire.
    type Row: Serialize + DeserializeOwned;

    /// The stream's name on the wire, and who writes it.
    const SPEC: StreamSpec;

    /// −1 where wire tokens are the negated stream IDs (backfill); the fetch
    /// takes wire tokens as they are.
    const SIGN: i64 = 1;

    /// The stream's generator.
    fn id_generator(&self) -> &MultiWriterIdGenerator;

    /// `writer`'s rows with `from < token ≤ to` (wire tokens), at most `limit`.
    fn fetch<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<Self::Row>, StoreError>>;

    /// Applies rows `writer` wrote up to `token` (invalidating what they make
    /// stale), then advances `writer`'s position to it.
    fn apply(&self, writer: &str, token: i64, rows: &[Self::Row]);
}

impl<S: MultiWriterSource> Stream for S {
    fn spec(&self) -> StreamSpec {
        S::SPEC
    }
    fn current_token(&self, writer: &str) -> i64 {
        S::SIGN * self.id_generator().get_current_token_for_writer(writer)
    }
    fn minimal_local_current_token(&self) -> i64 {
        S::SIGN * self.id_generator().get_minimal_local_current_token()
    }
    fn current_stream_token(&self) -> i64 {
        S::SIGN * self.id_generator().get_current_token()
    }
    fn get_updates_since<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(async move { to_wire(self.fetch(writer, from, to, limit).await?) })
    }
    fn apply_rows(&self, writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error> {
        let rows: Vec<S::Row> = decode_rows(rows)?;
        self.apply(writer, token, &rows);
        Ok(())
    }
    fn advance(&self, writer: &str, token: i64) {
        self.id_generator().advance(writer, S::SIGN * token);
    }
    fn writer_positions(&self) -> Vec<(String, i64)> {
        positions(self.id_generator(), S::SIGN)
    }
    fn generator(&self) -> Option<&MultiWriterIdGenerator> {
        Some(self.id_generator())
    }
    fn is_writer(&self, instance: &str) -> bool {
        self.id_generator().is_writer(instance)
    }
    fn is_retired_writer(&self, instance: &str) -> bool {
        self.id_generator().is_retired(instance)
    }
    fn is_handed_out(&self, token: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(self.id_generator().is_handed_out(token.saturating_mul(S::SIGN)))
    }
}

/// Turns typed rows into wire rows.
pub fn to_wire<R: Serialize>(updates: StreamUpdates<R>) -> Result<StreamUpdates<RowJson>, StoreError> {
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

/// Decodes every wire row of a batch as `R`.
pub fn decode_rows<R: DeserializeOwned>(rows: &[RowJson]) -> Result<Vec<R>, serde_json::Error> {
    rows.iter().map(RowJson::decode).collect()
}

/// Every known writer's position on the wire (`sign` −1 for backfill).
pub(crate) fn positions(generator: &MultiWriterIdGenerator, sign: i64) -> Vec<(String, i64)> {
    generator
        .get_positions()
        .into_keys()
        .map(|writer| {
            let position = generator.get_current_token_for_writer(&writer) * sign;
            (writer, position)
        })
        .collect()
}
