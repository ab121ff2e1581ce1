//! [`Inbound`]: applying what other processes send — `RDATA` rows and `POSITION`s
//! — catching up from the database whenever a gap shows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use replication_proto::{Command, RowJson};
use store_core::StoreError;

use crate::CATCH_UP_BATCH;
use crate::lock;
use crate::stream::{Stream, StreamRegistry};

/// Why an inbound command could not be applied. The connection goes on: the
/// next `POSITION` for the stream catches up from the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboundError {
    /// Catching up from the database failed.
    #[error("catching up on `{stream}` from the database: {source}")]
    CatchUp {
        /// The stream.
        stream: String,
        /// What the database said.
        #[source]
        source: StoreError,
    },
    /// A row does not decode as the stream's row type.
    #[error("a row of `{stream}` does not decode: {source}")]
    Row {
        /// The stream.
        stream: String,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
}

/// A catch-up's entry in [`Inbound`]'s backlog, removed when dropped.
struct BacklogEntry<'a> {
    backlog: &'a Mutex<BTreeMap<(String, String), i64>>,
    key: (String, String),
}

impl Drop for BacklogEntry<'_> {
    fn drop(&mut self) {
        lock(self.backlog).remove(&self.key);
    }
}

/// The receiving side of replication for one process.
///
/// Commands of one stream must be handed over one at a time and in order (the
/// transports do); different streams are independent.
#[derive(Debug)]
pub struct Inbound {
    instance_name: String,
    streams: StreamRegistry,
    /// Rows marked `batch`, per (stream, writer), held until the row with a real
    /// token arrives.
    pending: Mutex<HashMap<(String, String), Vec<RowJson>>>,
    /// Streams this process does not know, each logged once.
    unknown: Mutex<BTreeSet<String>>,
    /// Catch-up queries run since start-up.
    catch_up_fetches: AtomicU64,
    /// Per (stream, writer) being caught up: how far there is still to go.
    backlog: Mutex<BTreeMap<(String, String), i64>>,
}

impl Inbound {
    /// The inbound side of `instance_name`, applying to `streams`.
    pub fn new(instance_name: &str, streams: StreamRegistry) -> Inbound {
        Inbound {
            instance_name: instance_name.to_owned(),
            streams,
            pending: Mutex::new(HashMap::new()),
            unknown: Mutex::new(BTreeSet::new()),
            catch_up_fetches: AtomicU64::new(0),
            backlog: Mutex::new(BTreeMap::new()),
        }
    }

    /// How many catch-up queries this process has run since start-up.
    pub fn catch_up_fetches(&self) -> u64 {
        self.catch_up_fetches.load(Ordering::Relaxed)
    }

    /// Per stream, how many positions the catch-ups in progress still have to
    /// read (summed over writers); streams not catching up are absent.
    pub fn catch_up_backlog(&self) -> BTreeMap<String, i64> {
        let mut per_stream = BTreeMap::new();
        for ((stream, _), remaining) in lock(&self.backlog).iter() {
            *per_stream.entry(stream.clone()).or_insert(0) += remaining;
        }
        per_stream
    }

    /// The streams this process follows.
    pub fn streams(&self) -> &StreamRegistry {
        &self.streams
    }

    /// Applies `command` if it is `RDATA` or `POSITION`; other commands are the
    /// transport's and the handlers' business.
    pub async fn handle(&self, command: &Command) -> Result<(), InboundError> {
        match command {
            Command::Rdata { stream, instance, token, row } => {
                self.on_rdata(stream, instance, *token, row.clone())
            }
            Command::Position { stream, instance, prev_token, new_token } => {
                self.on_position(stream, instance, *prev_token, *new_token).await
            }
            _ => Ok(()),
        }
    }

    fn stream(&self, name: &str, writer: &str) -> Option<&dyn Stream> {
        if writer == self.instance_name {
            // Our own commands, echoed back by Redis or relayed by the master.
            return None;
        }
        let stream = self.streams.get(name).map(AsRef::as_ref);
        if stream.is_none() {
            let mut unknown = lock(&self.unknown);
            if unknown.insert(name.to_owned()) {
                tracing::warn!(stream = name, "ignoring replication of a stream this process does not know");
            }
        }
        stream
    }

    /// One row: held while it is part of a batch, then applied with its batch
    /// unless this process already has that token.
    pub fn on_rdata(
        &self,
        stream_name: &str,
        writer: &str,
        token: Option<i64>,
        row: RowJson,
    ) -> Result<(), InboundError> {
        let Some(stream) = self.stream(stream_name, writer) else { return Ok(()) };
        let key = (stream_name.to_owned(), writer.to_owned());
        let mut pending = lock(&self.pending);
        let Some(token) = token else {
            pending.entry(key).or_default().push(row);
            return Ok(());
        };
        let mut rows = pending.remove(&key).unwrap_or_default();
        drop(pending);
        rows.push(row);
        if token <= stream.current_token(writer) {
            // Already applied (a catch-up got there first): applying it again
            // would only repeat work.
            tracing::trace!(stream = stream_name, writer, token, "dropping rows this process already has");
            return Ok(());
        }
        stream
            .apply_rows(writer, token, &rows)
            .map_err(|source| InboundError::Row { stream: stream_name.to_owned(), source })
    }

    /// A position: `writer` went from `prev` to `new` with nothing unsent in
    /// between. If this process is behind `prev`, it missed rows and reads them
    /// from the database, in order, before moving to `new`.
    pub async fn on_position(
        &self,
        stream_name: &str,
        writer: &str,
        prev: i64,
        new: i64,
    ) -> Result<(), InboundError> {
        let Some(stream) = self.stream(stream_name, writer) else { return Ok(()) };
        // Held batch rows would be fetched again by a catch-up; a POSITION never
        // sits inside a batch.
        lock(&self.pending).remove(&(stream_name.to_owned(), writer.to_owned()));
        if stream.position_is_redundant(writer, new) {
            return Ok(());
        }
        let current = stream.current_token(writer);
        // Behind `prev`, rows were missed; ahead of `new`, the writer's token went
        // back (a restarted in-memory stream) and this process must reset.
        if !(prev <= current && current <= new) {
            self.catch_up(stream, writer, current, new).await?;
        }
        stream.advance(writer, new);
        Ok(())
    }

    async fn catch_up(
        &self,
        stream: &dyn Stream,
        writer: &str,
        from: i64,
        to: i64,
    ) -> Result<(), InboundError> {
        let name = stream.name();
        tracing::debug!(stream = name, writer, from, to, "catching up from the database");
        let key = (name.to_owned(), writer.to_owned());
        // Removed however the catch-up ends, a cancelled one included.
        let _backlog = BacklogEntry { backlog: &self.backlog, key: key.clone() };
        self.catch_up_batches(stream, writer, from, to, &key).await
    }

    async fn catch_up_batches(
        &self,
        stream: &dyn Stream,
        writer: &str,
        from: i64,
        to: i64,
        key: &(String, String),
    ) -> Result<(), InboundError> {
        let name = stream.name();
        let mut from = from;
        loop {
            // Magnitudes: a writer's token goes down when an in-memory stream resets.
            lock(&self.backlog).insert(key.clone(), (to - from).abs());
            self.catch_up_fetches.fetch_add(1, Ordering::Relaxed);
            let updates = stream
                .get_updates_since(writer, from, to, CATCH_UP_BATCH)
                .await
                .map_err(|source| InboundError::CatchUp { stream: name.to_owned(), source })?;
            // Rows come ascending by token; apply each token's rows together.
            let mut rows = updates.rows.into_iter().peekable();
            while let Some((token, row)) = rows.next() {
                let mut same_token = vec![row];
                while let Some((_, row)) = rows.next_if(|(next, _)| *next == token) {
                    same_token.push(row);
                }
                stream
                    .apply_rows(writer, token, &same_token)
                    .map_err(|source| InboundError::Row { stream: name.to_owned(), source })?;
            }
            if !updates.limited || updates.token == from {
                return Ok(());
            }
            from = updates.token;
        }
    }
}
