//! A room's turn on its writer, and the writes it has queued but not yet
//! committed.
//!
//! The events writer commits in groups: a write is checked under its room's
//! turn, queued, and the turn passes to the next write of the room before the
//! first is committed. So that the next write is checked against the state
//! the queued ones will produce, the state events and client transactions of
//! queued writes are kept here until their commit is known, and the checks
//! read them before the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use store_events::{ClientTxn, NewEvent};
use tokio::sync::{OwnedMutexGuard, watch};

/// (event type, state key).
type StateKey = (String, String);

/// (user ID, transaction ID).
type TxnKey = (String, String);

/// One turn per room on the room's writer: the checks of one write and its
/// queueing happen with no other write of the room between them.
#[derive(Debug, Default)]
pub(crate) struct RoomLocks {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
}

#[derive(Debug, Default)]
struct Room {
    turn: Arc<tokio::sync::Mutex<()>>,
    queued: Mutex<Queued>,
}

/// What a room's queued writes will change once committed.
#[derive(Debug, Default)]
struct Queued {
    /// The last queued event of each state key.
    state: HashMap<StateKey, NewEvent>,
    /// Each queued client transaction: its receiver says when the commit is
    /// known (its sender is dropped then).
    txns: HashMap<TxnKey, watch::Receiver<()>>,
}

impl Room {
    fn queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RoomLocks {
    /// Waits for `room_id`'s turn.
    pub(crate) async fn lock(&self, room_id: &str) -> RoomTurn {
        let room = {
            let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
            // Rooms nobody writes to any more give their entry back.
            if rooms.len() > 10_000 {
                rooms.retain(|_, room| Arc::strong_count(room) > 1);
            }
            Arc::clone(rooms.entry(room_id.to_owned()).or_default())
        };
        let turn = Arc::clone(&room.turn).lock_owned().await;
        RoomTurn { room, _turn: turn }
    }
}

/// A room's turn: held while a write is checked and queued.
#[derive(Debug)]
pub(crate) struct RoomTurn {
    room: Arc<Room>,
    _turn: OwnedMutexGuard<()>,
}

impl RoomTurn {
    /// The state events queued and not yet committed, by state key. Taken
    /// before the checks read the database: an event queued now and committed
    /// by the time the database is read is then found in one or the other.
    pub(crate) fn queued_state(&self) -> HashMap<StateKey, NewEvent> {
        self.room.queued().state.clone()
    }

    /// Whether any state event is queued and not yet committed.
    pub(crate) fn has_queued_state(&self) -> bool {
        !self.room.queued().state.is_empty()
    }

    /// Resolves once the commit of a queued write with client transaction
    /// `txn` is known (at once when there is none).
    pub(crate) fn queued_txn(&self, txn: &ClientTxn) -> impl Future<Output = ()> + use<> {
        let queued = self.room.queued().txns.get(&(txn.user_id.clone(), txn.txn_id.clone())).cloned();
        async move {
            if let Some(mut committed) = queued {
                // Only ever closed, never sent to.
                let _closed = committed.changed().await;
            }
        }
    }

    /// Records `events` (of client transaction `txn`) as queued, until the
    /// returned guard is dropped, once their commit is known.
    pub(crate) fn queue(&self, events: &[NewEvent], txn: Option<&ClientTxn>) -> QueuedWrite {
        let mut queued = self.room.queued();
        let mut state = Vec::new();
        for event in events {
            if let Some(state_key) = &event.state_key {
                let key = (event.event_type.clone(), state_key.clone());
                queued.state.insert(key.clone(), event.clone());
                state.push((key, event.event_id.clone()));
            }
        }
        let txn = txn.map(|txn| {
            let key = (txn.user_id.clone(), txn.txn_id.clone());
            let (committed, waiting) = watch::channel(());
            queued.txns.insert(key.clone(), waiting);
            (key, committed)
        });
        QueuedWrite { room: Arc::clone(&self.room), state, txn }
    }
}

/// A queued write's entries in its room's [`Queued`], removed when dropped.
#[derive(Debug)]
pub(crate) struct QueuedWrite {
    room: Arc<Room>,
    /// Its state keys, each with the event it queued there.
    state: Vec<(StateKey, String)>,
    /// Its client transaction; dropping the sender wakes those waiting on it,
    /// after the entries are gone.
    txn: Option<(TxnKey, watch::Sender<()>)>,
}

impl Drop for QueuedWrite {
    fn drop(&mut self) {
        let mut queued = self.room.queued();
        for (key, event_id) in &self.state {
            // A later write of the room may have queued the key again.
            if queued.state.get(key).is_some_and(|event| event.event_id == *event_id) {
                queued.state.remove(key);
            }
        }
        if let Some((key, _)) = &self.txn {
            queued.txns.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, user: &str, membership: &str) -> NewEvent {
        NewEvent {
            event_id: id.to_owned(),
            event_type: "m.room.member".to_owned(),
            state_key: Some(user.to_owned()),
            sender: user.to_owned(),
            origin_server_ts: 0,
            content: format!(r#"{{"membership":"{membership}"}}"#),
        }
    }

    fn key(user: &str) -> StateKey {
        ("m.room.member".to_owned(), user.to_owned())
    }

    #[tokio::test]
    async fn queued_state_lasts_until_its_commit_is_known_and_keeps_the_latest() {
        let locks = RoomLocks::default();
        let turn = locks.lock("!r").await;
        let join = turn.queue(&[member("$join", "@a", "join")], None);
        let leave = turn.queue(&[member("$leave", "@a", "leave")], None);
        assert_eq!(turn.queued_state()[&key("@a")].event_id, "$leave");
        drop(join);
        assert_eq!(turn.queued_state()[&key("@a")].event_id, "$leave", "the join's commit leaves the leave");
        drop(leave);
        assert!(turn.queued_state().is_empty());
    }

    #[tokio::test]
    async fn a_retry_waits_for_the_queued_attempt_of_its_transaction() {
        let locks = RoomLocks::default();
        let txn = ClientTxn { user_id: "@a".to_owned(), txn_id: "t".to_owned() };
        let turn = locks.lock("!r").await;
        let first = turn.queue(&[], Some(&txn));
        let retry = turn.queued_txn(&txn);
        tokio::pin!(retry);
        let early = tokio::time::timeout(std::time::Duration::from_millis(20), retry.as_mut()).await;
        assert!(early.is_err(), "the retry waits while its first attempt is queued");
        drop(first);
        retry.await;
        // Nothing queued: at once.
        turn.queued_txn(&txn).await;
    }

    #[tokio::test]
    async fn a_room_has_one_turn_at_a_time() {
        let locks = Arc::new(RoomLocks::default());
        let turn = locks.lock("!r").await;
        let other_room = locks.lock("!s").await;
        let waiting = tokio::spawn({
            let locks = Arc::clone(&locks);
            async move { locks.lock("!r").await.queued_state().len() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop((turn, other_room));
        assert_eq!(waiting.await.unwrap(), 0);
    }
}
