//! The `federation` stream: the outgoing federation queue, kept in memory on the
//! master and followed by the federation-sender worker, which acknowledges what
//! it has handled with `FEDERATION_ACK` so the queue can be trimmed.
//!
//! Like `typing`, the stream is owned by its handlers, so its token is always
//! valid: the master's queue position, or 0 everywhere else (a sender handles
//! rows as they come and acknowledges them).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication_proto::RowJson;
use serde::{Deserialize, Serialize};
use store_core::{BoxFuture, StoreError, StreamUpdates};

use crate::http::RemoteUpdates;
use crate::lock;
use store_core::Stream;

/// The stream's name.
pub const FEDERATION_STREAM: &str = "federation";

/// The `federation` stream: the master's outgoing queue.
pub const FEDERATION: store_core::StreamSpec =
    store_core::StreamSpec::new(FEDERATION_STREAM, store_core::WriterRule::Master);

/// A row: `[type, data]`, type `pd` (presence to destinations), `k` (a keyed
/// EDU, which replaces the previous one of its key) or `e` (a plain EDU).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(String, serde_json::Value)", into = "(String, serde_json::Value)")]
pub struct FederationRow {
    /// `pd`, `k` or `e`.
    pub kind: String,
    /// The payload.
    pub data: serde_json::Value,
}

impl From<(String, serde_json::Value)> for FederationRow {
    fn from((kind, data): (String, serde_json::Value)) -> Self {
        FederationRow { kind, data }
    }
}

impl From<FederationRow> for (String, serde_json::Value) {
    fn from(row: FederationRow) -> Self {
        (row.kind, row.data)
    }
}

#[derive(Debug)]
struct QueueState {
    /// The position the next row gets; the stream's token is one less.
    next: i64,
    rows: BTreeMap<i64, (Instant, FederationRow)>,
    /// (destination, key) → position of its keyed EDU.
    keyed: HashMap<(String, String), i64>,
    /// Sender instance → the last position it acknowledged.
    acks: HashMap<String, i64>,
}

/// The master's outgoing federation queue.
#[derive(Debug)]
pub struct FederationQueue {
    /// The configured federation senders; empty means any acknowledgement trims.
    senders: Vec<String>,
    state: Mutex<QueueState>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl FederationQueue {
    /// An empty queue at position 0, trimmed by the acknowledgements of `senders`.
    pub fn new(senders: &[String]) -> Arc<FederationQueue> {
        Arc::new(FederationQueue {
            senders: senders.to_vec(),
            state: Mutex::new(QueueState {
                next: 1,
                rows: BTreeMap::new(),
                keyed: HashMap::new(),
                acks: HashMap::new(),
            }),
            changes: tokio::sync::watch::channel(0).0,
        })
    }

    /// Sees a change whenever a row is queued.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn push(&self, state: &mut QueueState, row: FederationRow) -> i64 {
        let position = state.next;
        state.next += 1;
        state.rows.insert(position, (Instant::now(), row));
        self.changes.send_modify(|version| *version = version.wrapping_add(1));
        position
    }

    /// Queues an EDU for `destination`; a keyed one replaces the queued EDU of
    /// the same destination and key.
    pub fn send_edu(
        &self,
        destination: &str,
        edu_type: &str,
        content: serde_json::Value,
        key: Option<&str>,
    ) -> i64 {
        let mut state = lock(&self.state);
        let data = serde_json::json!({"destination": destination, "edu_type": edu_type, "content": content, "key": key});
        match key {
            Some(key) => {
                let slot = (destination.to_owned(), key.to_owned());
                if let Some(old) = state.keyed.remove(&slot) {
                    state.rows.remove(&old);
                }
                let position = self.push(&mut state, FederationRow { kind: "k".to_owned(), data });
                state.keyed.insert(slot, position);
                position
            }
            None => self.push(&mut state, FederationRow { kind: "e".to_owned(), data }),
        }
    }

    /// Queues a presence state for `destinations`.
    pub fn send_presence_to_destinations(
        &self,
        destinations: &[String],
        state_json: serde_json::Value,
    ) -> i64 {
        let mut state = lock(&self.state);
        let data = serde_json::json!({"destinations": destinations, "state": state_json});
        self.push(&mut state, FederationRow { kind: "pd".to_owned(), data })
    }

    /// The stream's token.
    pub fn current_token(&self) -> i64 {
        lock(&self.state).next - 1
    }

    /// How many rows are queued.
    pub fn len(&self) -> usize {
        lock(&self.state).rows.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The queued rows with `from < position ≤ to`, never limited. A `from`
    /// beyond the queue (asked by a sender that knew the master before it
    /// restarted) gets everything still queued.
    pub fn get_updates(&self, from: i64, to: i64) -> StreamUpdates<FederationRow> {
        let state = lock(&self.state);
        let from = if from > state.next - 1 { -1 } else { from };
        let rows = state
            .rows
            .range(from + 1..=to.max(from + 1))
            .filter(|(position, _)| **position <= to)
            .map(|(position, (_, row))| (*position, row.clone()))
            .collect();
        StreamUpdates { rows, token: to, limited: false }
    }

    /// Records that `sender` handled everything up to `token`, and drops what
    /// every sender that has acknowledged so far has handled (a sender that
    /// never acknowledged does not hold the queue back).
    pub fn acknowledge(&self, sender: &str, token: i64) {
        let mut state = lock(&self.state);
        if token > state.next - 1 {
            // From before this master restarted: it says nothing about our rows.
            tracing::debug!(sender, token, "ignoring an acknowledgement ahead of the queue");
            return;
        }
        let entry = state.acks.entry(sender.to_owned()).or_insert(token);
        *entry = (*entry).max(token);
        let upto = if self.senders.is_empty() {
            token
        } else {
            let acked: Vec<i64> =
                self.senders.iter().filter_map(|sender| state.acks.get(sender).copied()).collect();
            match acked.iter().min() {
                Some(min) => *min,
                None => return,
            }
        };
        state.rows = state.rows.split_off(&(upto + 1));
        state.keyed.retain(|_, position| *position > upto);
    }

    /// Drops rows queued longer than `age`.
    pub fn purge_older_than(&self, age: Duration) {
        let mut state = lock(&self.state);
        let now = Instant::now();
        state.rows.retain(|_, (queued, _)| now.duration_since(*queued) <= age);
        let QueueState { rows, keyed, .. } = &mut *state;
        keyed.retain(|_, position| rows.contains_key(position));
    }
}

/// What a federation sender does with the rows it follows.
pub type FederationHandler = Arc<dyn Fn(i64, &[FederationRow]) + Send + Sync>;

/// The `federation` stream of a process.
pub enum FederationStream {
    /// On the master: its queue.
    Queue(Arc<FederationQueue>),
    /// On a federation sender: rows go to its handler; the token stays 0, so
    /// every `POSITION` fetches the master's un-acknowledged rows from `remote`.
    Sender {
        /// What handles the rows.
        handler: FederationHandler,
        /// The master's internal HTTP endpoint, if reachable.
        remote: Option<Arc<dyn RemoteUpdates>>,
    },
    /// Everywhere else: token 0, no rows.
    Stub,
}

impl std::fmt::Debug for FederationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FederationStream::Queue(queue) => f.debug_tuple("Queue").field(queue).finish(),
            FederationStream::Sender { .. } => f.write_str("Sender"),
            FederationStream::Stub => f.write_str("Stub"),
        }
    }
}

impl Stream for FederationStream {
    fn spec(&self) -> store_core::StreamSpec {
        FEDERATION
    }

    fn current_token(&self, _writer: &str) -> i64 {
        match self {
            FederationStream::Queue(queue) => queue.current_token(),
            FederationStream::Sender { .. } | FederationStream::Stub => 0,
        }
    }

    fn minimal_local_current_token(&self) -> i64 {
        self.current_token("")
    }

    fn get_updates_since<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        _limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(async move {
            match self {
                FederationStream::Queue(queue) => store_core::to_wire(queue.get_updates(from, to)),
                FederationStream::Sender { remote: Some(remote), .. } => {
                    remote.fetch(FEDERATION_STREAM, writer, from, to).await
                }
                FederationStream::Sender { remote: None, .. } | FederationStream::Stub => {
                    Ok(StreamUpdates::empty(to))
                }
            }
        })
    }

    fn apply_rows(&self, _writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error> {
        let rows: Vec<FederationRow> = store_core::decode_rows(rows)?;
        if let FederationStream::Sender { handler, .. } = self {
            handler(token, &rows);
        }
        Ok(())
    }

    fn advance(&self, _writer: &str, _token: i64) {}

    fn is_writer(&self, instance: &str) -> bool {
        // The queue lives on the master.
        instance == server_config::MASTER_INSTANCE
    }

    fn can_discard_position(&self) -> bool {
        false
    }

    fn acknowledge(&self, sender: &str, token: i64) {
        if let FederationStream::Queue(queue) = self {
            queue.acknowledge(sender, token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FederationQueue, FederationRow};

    #[test]
    fn keyed_edus_replace_their_predecessor() {
        let queue = FederationQueue::new(&[]);
        queue.send_edu("remote", "m.typing", serde_json::json!({"a": 1}), Some("room"));
        queue.send_edu("remote", "m.direct", serde_json::json!({}), None);
        let latest = queue.send_edu("remote", "m.typing", serde_json::json!({"a": 2}), Some("room"));
        assert_eq!(queue.len(), 2);
        let updates = queue.get_updates(0, latest);
        assert_eq!(updates.rows.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [2, 3]);
        assert!(!updates.limited);
    }

    #[test]
    fn acknowledgements_trim_up_to_the_slowest_sender_that_acknowledged() {
        let senders = vec!["sender1".to_owned(), "sender2".to_owned()];
        let queue = FederationQueue::new(&senders);
        for n in 0..5 {
            queue.send_edu(&format!("remote{n}"), "m.x", serde_json::json!({}), None);
        }
        queue.acknowledge("sender1", 3);
        assert_eq!(queue.len(), 2, "sender2 never acknowledged: it does not hold the queue back");
        queue.acknowledge("sender2", 1);
        assert_eq!(queue.len(), 2, "rows 1..=3 are gone; sender2 at 1 keeps nothing extra");
        queue.acknowledge("sender2", 5);
        queue.acknowledge("sender1", 5);
        assert!(queue.is_empty());
    }

    #[test]
    fn an_acknowledgement_from_before_a_restart_trims_nothing() {
        let queue = FederationQueue::new(&[]);
        queue.send_edu("remote", "m.x", serde_json::json!({}), None);
        queue.acknowledge("sender1", 500);
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn a_sender_ahead_of_a_restarted_master_gets_everything_queued() {
        let queue = FederationQueue::new(&[]);
        queue
            .send_presence_to_destinations(&["remote".to_owned()], serde_json::json!({"presence": "online"}));
        let updates = queue.get_updates(40, 1);
        assert_eq!(updates.rows.len(), 1);
    }

    #[test]
    fn rows_match_the_wire_vector() {
        let json = r#"["k",{"key":"value"}]"#;
        let row: FederationRow = serde_json::from_str(json).unwrap();
        assert_eq!(row.kind, "k");
        assert_eq!(serde_json::to_string(&row).unwrap(), json);
    }
}
