//! [`Inbound`]: applying what other processes send — `RDATA` rows and `POSITION`s
//! — catching up from the database whenever a gap shows.
//!
//! What one connection has told this process lives in its [`Link`]: the
//! writers it is *in sequence* with (a `POSITION` from the writer was applied
//! on this connection, so the writer's later commands on it follow what this
//! process has), and the rows held back for a `batch` token. Rows from a writer
//! that is not in sequence are never applied as they are: the process first
//! reads everything up to their token from the database, so no path moves a
//! writer's position past rows this process has not applied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use replication_proto::{Command, RowJson};
use store_core::StoreError;

use crate::CATCH_UP_BATCH;
use crate::lock;
use store_core::{Stream, StreamRegistry};

/// Rows one connection may hold back for `batch` tokens, over all writers.
/// A writer sends at most [`ROWS_PER_POLL`](crate::ROWS_PER_POLL) rows per poll,
/// so a legitimate batch stays far below.
pub const MAX_HELD_ROWS: usize = 1_000;

/// Distinct stream names one connection may name that this process does not
/// know (a newer peer may write streams this one lacks; each is logged once).
pub const MAX_UNKNOWN_STREAMS: usize = 32;

/// The first and the longest pause between attempts of a failed catch-up.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Why an inbound command could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboundError {
    /// A row does not decode as the stream's row type.
    #[error("a row of `{stream}` does not decode: {source}")]
    Row {
        /// The stream.
        stream: String,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The connection passed one of its bounds (held rows, unknown names).
    #[error("{0}")]
    OverBound(String),
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

/// Counts a catch-up that is waiting to retry, for as long as it waits.
struct Retrying<'a>(&'a AtomicUsize);

impl<'a> Retrying<'a> {
    fn new(counter: &'a AtomicUsize) -> Retrying<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        Retrying(counter)
    }
}

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// (stream, writer): the key of everything a connection tracks per writer.
type WriterKey = (&'static str, String);

/// What one connection has told this process; dropped with the connection.
#[derive(Debug, Default)]
pub struct Link {
    /// Writers whose commands on this connection follow what this process has
    /// applied.
    in_sequence: HashSet<WriterKey>,
    /// Rows marked `batch`, per writer, held until the row with a real token.
    batches: HashMap<WriterKey, Vec<RowJson>>,
    held_rows: usize,
    /// Unknown stream names this connection has named.
    unknown_streams: HashSet<String>,
}

impl Link {
    /// Whether `writer`'s commands on this connection follow what this process
    /// has applied of `stream`.
    pub fn is_in_sequence(&self, stream: &str, writer: &str) -> bool {
        self.in_sequence.iter().any(|(name, known)| *name == stream && known == writer)
    }

    /// Holds a `batch` row of `writer` until the row that carries its token.
    pub(crate) fn hold(
        &mut self,
        stream: &'static str,
        writer: &str,
        row: RowJson,
    ) -> Result<(), InboundError> {
        if self.held_rows >= MAX_HELD_ROWS {
            return Err(InboundError::OverBound(format!(
                "more than {MAX_HELD_ROWS} rows held for batch tokens"
            )));
        }
        self.held_rows += 1;
        self.batches.entry((stream, writer.to_owned())).or_default().push(row);
        Ok(())
    }

    /// The rows held for `writer` of `stream` so far.
    pub(crate) fn held(&self, stream: &'static str, writer: &str) -> &[RowJson] {
        self.batches.get(&(stream, writer.to_owned())).map_or(&[], Vec::as_slice)
    }

    /// The rows held for `writer` of `stream`, which end with the next token.
    pub(crate) fn take_batch(&mut self, stream: &'static str, writer: &str) -> Vec<RowJson> {
        let rows = self.batches.remove(&(stream, writer.to_owned())).unwrap_or_default();
        self.held_rows -= rows.len();
        rows
    }

    /// Notes an unknown stream name; fails once the connection has named too
    /// many. Returns whether the name is new on this connection.
    pub(crate) fn note_unknown_stream(&mut self, name: &str) -> Result<bool, InboundError> {
        if self.unknown_streams.contains(name) {
            return Ok(false);
        }
        if self.unknown_streams.len() >= MAX_UNKNOWN_STREAMS {
            return Err(InboundError::OverBound(format!(
                "more than {MAX_UNKNOWN_STREAMS} unknown stream names"
            )));
        }
        self.unknown_streams.insert(name.to_owned());
        Ok(true)
    }

    /// Forgets which writers are in sequence and every held row: commands of
    /// this connection were lost, so the next ones may not follow.
    pub(crate) fn lose_sequence(&mut self) {
        self.in_sequence.clear();
        self.batches.clear();
        self.held_rows = 0;
    }

    fn forget(&mut self, stream: &'static str, writer: &str) {
        self.in_sequence.remove(&(stream, writer.to_owned()));
    }

    fn mark(&mut self, stream: &'static str, writer: &str) {
        self.in_sequence.insert((stream, writer.to_owned()));
    }
}

/// The receiving side of replication for one process.
///
/// Commands of one connection must be handed over one at a time and in order
/// (the transports do); each connection has its own [`Link`].
#[derive(Debug)]
pub struct Inbound {
    instance_name: String,
    streams: StreamRegistry,
    /// Catch-up queries run since start-up.
    catch_up_fetches: AtomicU64,
    /// Catch-up attempts that failed (and were retried) since start-up.
    catch_up_failures: AtomicU64,
    /// Catch-ups waiting to try again right now.
    catch_ups_retrying: AtomicUsize,
    /// Per (stream, writer) being caught up: how far there is still to go.
    backlog: Mutex<BTreeMap<(String, String), i64>>,
}

impl Inbound {
    /// The inbound side of `instance_name`, applying to `streams`.
    pub fn new(instance_name: &str, streams: StreamRegistry) -> Inbound {
        Inbound {
            instance_name: instance_name.to_owned(),
            streams,
            catch_up_fetches: AtomicU64::new(0),
            catch_up_failures: AtomicU64::new(0),
            catch_ups_retrying: AtomicUsize::new(0),
            backlog: Mutex::new(BTreeMap::new()),
        }
    }

    /// How many catch-up queries this process has run since start-up.
    pub fn catch_up_fetches(&self) -> u64 {
        self.catch_up_fetches.load(Ordering::Relaxed)
    }

    /// How many catch-up attempts failed (each is retried until it succeeds).
    pub fn catch_up_failures(&self) -> u64 {
        self.catch_up_failures.load(Ordering::Relaxed)
    }

    /// How many catch-ups are waiting to try again after a failure.
    pub fn catch_ups_retrying(&self) -> usize {
        self.catch_ups_retrying.load(Ordering::Relaxed)
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

    /// This process's instance name: commands for it are its own, echoed.
    pub fn instance_name(&self) -> &str {
        &self.instance_name
    }

    /// Applies `command` if it is `RDATA` or `POSITION`, as `link`'s connection
    /// delivered it: a `batch` row is held until its token; our own instance's
    /// commands (echoed by Redis) and unknown streams are ignored, each unknown
    /// name logged once. Who may say what is the caller's to check first
    /// ([`Hub`](crate::Hub) does).
    pub async fn handle(&self, link: &mut Link, command: Command) -> Result<(), InboundError> {
        let (stream_name, writer) = match &command {
            Command::Rdata { stream, instance, .. } | Command::Position { stream, instance, .. } => {
                (stream.as_str(), instance.as_str())
            }
            _ => return Ok(()),
        };
        if writer == self.instance_name {
            return Ok(());
        }
        let Some(stream) = self.streams.get(stream_name).cloned() else {
            if link.note_unknown_stream(stream_name)? {
                tracing::warn!(
                    stream = stream_name,
                    "ignoring replication of a stream this process does not know"
                );
            }
            return Ok(());
        };
        let name = stream.name();
        match command {
            Command::Rdata { instance, token: None, row, .. } => link.hold(name, &instance, row),
            Command::Rdata { instance, token: Some(token), row, .. } => {
                let mut rows = link.take_batch(name, &instance);
                rows.push(row);
                self.on_rdata(link, stream.as_ref(), &instance, token, rows).await
            }
            Command::Position { instance, prev_token, new_token, .. } => {
                self.on_position(link, stream.as_ref(), &instance, prev_token, new_token).await
            }
            _ => Ok(()),
        }
    }

    /// Rows `writer` wrote up to `token` (the held batch and the row carrying
    /// the token), as one connection delivered them. Applied as they are when
    /// the writer is in sequence on `link` and `token` is news; read from the
    /// database up to `token` when the writer is not in sequence.
    pub async fn on_rdata(
        &self,
        link: &mut Link,
        stream: &dyn Stream,
        writer: &str,
        token: i64,
        rows: Vec<RowJson>,
    ) -> Result<(), InboundError> {
        let name = stream.name();
        if !link.is_in_sequence(name, writer) {
            // Commands of this writer on this connection may not follow what we
            // have (we joined mid-stream, or lost some): read up to the token.
            // A stream whose token can go back (a restarted in-memory writer)
            // catches up on any difference: that is how it resets.
            let current = stream.current_token(writer);
            let behind = if stream.can_discard_position() { current < token } else { current != token };
            if behind {
                self.catch_up(stream, writer, current, token).await?;
                // The writer had persisted everything up to the token it sent.
                stream.advance(writer, token);
            }
            link.mark(name, writer);
            return Ok(());
        }
        if token <= stream.current_token(writer) {
            // Already applied (a catch-up got there first).
            tracing::trace!(stream = name, writer, token, "dropping rows this process already has");
            return Ok(());
        }
        stream.apply_rows(writer, token, &rows).map_err(|source| {
            // Nothing was applied: the next rows must not skip these.
            link.forget(name, writer);
            InboundError::Row { stream: name.to_owned(), source }
        })
    }

    /// A position: `writer` went from `prev` to `new` with nothing unsent in
    /// between. If this process is behind `prev`, it missed rows and reads them
    /// from the database, in order, before moving to `new`; from then on the
    /// writer is in sequence on `link`.
    pub async fn on_position(
        &self,
        link: &mut Link,
        stream: &dyn Stream,
        writer: &str,
        prev: i64,
        new: i64,
    ) -> Result<(), InboundError> {
        let name = stream.name();
        // Held batch rows would be fetched again by a catch-up; a POSITION never
        // sits inside a batch.
        link.take_batch(name, writer);
        if link.is_in_sequence(name, writer) && stream.position_is_redundant(writer, new) {
            return Ok(());
        }
        let current = stream.current_token(writer);
        // Behind `prev`, rows were missed; ahead of `new`, the writer's token went
        // back (a restarted in-memory stream) and this process must reset.
        if !(prev <= current && current <= new) {
            self.catch_up(stream, writer, current, new).await?;
        }
        stream.advance(writer, new);
        link.mark(name, writer);
        Ok(())
    }

    /// Reads `writer`'s rows in `(from, to]` from the database (or the writer,
    /// for in-memory streams) and applies them in order; a failure is retried
    /// with backoff until it succeeds, since stopping would stall the stream.
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
        let mut from = from;
        let mut pause = RETRY_FIRST;
        loop {
            match self.catch_up_batches(stream, writer, from, to, &key).await {
                Ok(()) => return Ok(()),
                Err(CatchUpError::Row(source)) => {
                    return Err(InboundError::Row { stream: name.to_owned(), source });
                }
                Err(CatchUpError::Store { reached, source }) => {
                    self.catch_up_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        stream = name,
                        writer,
                        reached,
                        to,
                        "catching up failed; retrying in {pause:?}: {source}"
                    );
                    // What was applied stays applied: go on from there.
                    from = reached;
                    let _retrying = Retrying::new(&self.catch_ups_retrying);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn catch_up_batches(
        &self,
        stream: &dyn Stream,
        writer: &str,
        from: i64,
        to: i64,
        key: &(String, String),
    ) -> Result<(), CatchUpError> {
        let mut from = from;
        loop {
            // Magnitudes: a writer's token goes down when an in-memory stream resets.
            lock(&self.backlog).insert(key.clone(), (to - from).abs());
            self.catch_up_fetches.fetch_add(1, Ordering::Relaxed);
            let updates = stream
                .get_updates_since(writer, from, to, CATCH_UP_BATCH)
                .await
                .map_err(|source| CatchUpError::Store { reached: from, source })?;
            // Rows come ascending by token; apply each token's rows together.
            let mut rows = updates.rows.into_iter().peekable();
            while let Some((token, row)) = rows.next() {
                let mut same_token = vec![row];
                while let Some((_, row)) = rows.next_if(|(next, _)| *next == token) {
                    same_token.push(row);
                }
                stream.apply_rows(writer, token, &same_token).map_err(CatchUpError::Row)?;
            }
            if !updates.limited || updates.token == from {
                return Ok(());
            }
            from = updates.token;
        }
    }
}

enum CatchUpError {
    /// The database (or the writer) failed; everything up to `reached` is applied.
    Store { reached: i64, source: StoreError },
    /// A row from the database does not decode: retrying cannot help.
    Row(serde_json::Error),
}
