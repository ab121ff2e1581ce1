//! [`Stream`]: what replication needs from every stream, and the registry of a
//! process's streams. It lives here, below the store crates, so that each store
//! crate brings its own stream and replication needs to know none of them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::{BoxFuture, MultiWriterIdGenerator, StoreError, StreamSpec, StreamUpdates};
use replication_proto::RowJson;

/// A stream as replication sees it: tokens per writer, rows in wire form.
///
/// Each stream answers for itself: there is no separate list of positions to
/// keep in step. Dyn-compatible (`Arc<dyn Stream>`), with the one async method
/// returning a boxed future.
pub trait Stream: Send + Sync + fmt::Debug {
    /// The stream's name and who writes it.
    fn spec(&self) -> StreamSpec;

    /// The stream's name on the wire.
    fn name(&self) -> &'static str {
        self.spec().name
    }

    /// `writer`'s position as this process knows it; always a valid token.
    fn current_token(&self, writer: &str) -> i64;

    /// This process's own last finished write on the stream.
    fn minimal_local_current_token(&self) -> i64;

    /// The stream's current token here: every writer's rows up to it are
    /// applied. For a single-writer stream, its writer's position.
    fn current_stream_token(&self) -> i64 {
        self.minimal_local_current_token()
    }

    /// `writer`'s rows with `from < token ≤ to`, at most `limit`, as
    /// `(token, row)` pairs; the token reached and whether more remain.
    fn get_updates_since<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>>;

    /// Applies rows `writer` wrote up to `token` (all sharing that token), then
    /// advances `writer`'s position to it. A row that does not decode as this
    /// stream's row type is an error and nothing is applied.
    fn apply_rows(&self, writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error>;

    /// Advances `writer`'s position with no rows (a `POSITION` with no gap).
    fn advance(&self, writer: &str, token: i64);

    /// The generator behind a database-backed stream: for waking the streamer
    /// on local writes, recording final positions and reporting in-flight
    /// writes. `None` for in-memory streams.
    fn generator(&self) -> Option<&MultiWriterIdGenerator> {
        None
    }

    /// Every writer's position this process knows, for a relaying server to
    /// announce on their behalf. Empty for streams without per-writer positions.
    fn writer_positions(&self) -> Vec<(String, i64)> {
        Vec::new()
    }

    /// Whether `instance` is one of this stream's writers: a process takes
    /// `RDATA` and `POSITION` for a writer only when this holds (the configured
    /// writers; any instance for `caches`; the one writer of an in-memory
    /// stream).
    fn is_writer(&self, instance: &str) -> bool;

    /// Whether `instance` was taken out of the stream's writers: what it still
    /// says about the stream is stale, and ignored rather than refused.
    fn is_retired_writer(&self, _instance: &str) -> bool {
        false
    }

    /// Whether a peer's `token` (wire form) lies within what the stream has
    /// handed out: a token past the sequence can only be forged, and taking it
    /// would put every later real row below the followers' tokens. In-memory
    /// streams have no sequence to ask and answer yes.
    fn is_handed_out(&self, _token: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(std::future::ready(Ok(true)))
    }

    /// A follower acknowledged handling everything up to `token`
    /// (`FEDERATION_ACK`); only the federation queue cares.
    fn acknowledge(&self, _follower: &str, _token: i64) {}

    /// Whether a `POSITION` at or below the current token can be ignored. True
    /// for streams whose tokens only grow; false for in-memory streams whose
    /// token resets when their writer restarts.
    fn can_discard_position(&self) -> bool {
        true
    }

    /// Whether a `POSITION` moving `writer` to `new_token` changes nothing here.
    fn position_is_redundant(&self, writer: &str, new_token: i64) -> bool {
        self.can_discard_position() && self.current_token(writer) >= new_token
    }

    /// Whether a writer announces a `POSITION` when its token moved with no row
    /// of its own (only other writers wrote). True by default: followers learn
    /// the writer's position; false for streams every process writes, where
    /// each such move would be echoed by every process.
    fn announces_moves_without_rows(&self) -> bool {
        true
    }
}

/// The streams a process knows, by name.
#[derive(Debug, Default, Clone)]
pub struct StreamRegistry {
    streams: BTreeMap<&'static str, Arc<dyn Stream>>,
}

impl StreamRegistry {
    /// An empty registry.
    pub fn new() -> StreamRegistry {
        StreamRegistry::default()
    }

    /// Adds `stream`; a second stream of the same name replaces the first.
    pub fn register(&mut self, stream: Arc<dyn Stream>) {
        self.streams.insert(stream.name(), stream);
    }

    /// The stream called `name`, if this process knows it.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Stream>> {
        self.streams.get(name)
    }

    /// Every stream, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Stream>> {
        self.streams.values()
    }
}
