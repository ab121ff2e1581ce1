//! The `typing` stream: in memory, owned by its handlers, so its token is always
//! exactly what the process has applied (Synapse's change 2).
//!
//! The writer ([`TypingWriter`]) keeps who is typing in which room, with
//! timeouts, and a serial that counts its changes from 0 at start-up; followers
//! ([`TypingFollower`]) keep what the rows told them. A writer restart sends the
//! serial back to 0: a follower ahead of the writer's token resets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication_proto::RowJson;
use serde::{Deserialize, Serialize};
use store_core::{BoxFuture, StoreError, StreamChangeCache, StreamUpdates};

use crate::http::RemoteUpdates;
use crate::lock;
use store_core::Stream;

/// The stream's name.
pub const TYPING_STREAM: &str = "typing";

/// The `typing` stream: its state lives in one process's memory, so it has
/// exactly one writer.
pub const TYPING: store_core::StreamSpec =
    store_core::StreamSpec::new(TYPING_STREAM, store_core::WriterRule::Single);

/// A row: who is typing in a room now; on the wire `[room_id, [user_id, …]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(String, Vec<String>)", into = "(String, Vec<String>)")]
pub struct TypingRow {
    /// The room.
    pub room_id: String,
    /// Everyone typing in it now, sorted.
    pub user_ids: Vec<String>,
}

impl From<(String, Vec<String>)> for TypingRow {
    fn from((room_id, user_ids): (String, Vec<String>)) -> Self {
        TypingRow { room_id, user_ids }
    }
}

impl From<TypingRow> for (String, Vec<String>) {
    fn from(row: TypingRow) -> Self {
        (row.room_id, row.user_ids)
    }
}

#[derive(Debug, Default)]
struct WriterState {
    latest: i64,
    /// Room → (serial of its last change, user → when their typing expires).
    rooms: HashMap<String, (i64, BTreeMap<String, Instant>)>,
}

/// The typing handler of the instance that writes the stream.
#[derive(Debug)]
pub struct TypingWriter {
    instance_name: String,
    state: Mutex<WriterState>,
    changes: StreamChangeCache,
    notify: tokio::sync::watch::Sender<u64>,
}

impl TypingWriter {
    /// A writer with nobody typing, at serial 0.
    pub fn new(instance_name: &str) -> Arc<TypingWriter> {
        Arc::new(TypingWriter {
            instance_name: instance_name.to_owned(),
            state: Mutex::new(WriterState::default()),
            changes: StreamChangeCache::new("typing_rooms", 0, 10_000),
            notify: tokio::sync::watch::channel(0).0,
        })
    }

    /// Sees a change whenever someone starts or stops typing.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    fn bump(&self, state: &mut WriterState, room_id: &str) {
        // Never wraps to a negative token; 2^63 changes are out of reach anyway.
        state.latest = state.latest.saturating_add(1);
        let serial = state.latest;
        state.rooms.entry(room_id.to_owned()).or_default().0 = serial;
        self.changes.entity_has_changed(room_id, serial);
        self.notify.send_modify(|version| *version = version.wrapping_add(1));
    }

    /// `user_id` is typing in `room_id` for the next `timeout`.
    pub fn started_typing(&self, room_id: &str, user_id: &str, timeout: Duration) {
        let mut state = lock(&self.state);
        let expires = Instant::now() + timeout;
        let users = &mut state.rooms.entry(room_id.to_owned()).or_default().1;
        let was_typing = users.insert(user_id.to_owned(), expires).is_some();
        // Renewing a timeout changes nothing anyone sees.
        if !was_typing {
            self.bump(&mut state, room_id);
        }
    }

    /// `user_id` stopped typing in `room_id`.
    pub fn stopped_typing(&self, room_id: &str, user_id: &str) {
        let mut state = lock(&self.state);
        let removed = state.rooms.get_mut(room_id).is_some_and(|(_, users)| users.remove(user_id).is_some());
        if removed {
            self.bump(&mut state, room_id);
        }
    }

    /// Ends the typing of everyone whose timeout passed; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut state = lock(&self.state);
        let mut expired_rooms = Vec::new();
        let mut expired = 0;
        for (room_id, (_, users)) in &mut state.rooms {
            let before = users.len();
            users.retain(|_, expires| *expires > now);
            if users.len() != before {
                expired += before - users.len();
                expired_rooms.push(room_id.clone());
            }
        }
        for room_id in expired_rooms {
            self.bump(&mut state, &room_id);
        }
        expired
    }

    /// Expires timeouts every `interval` until the writer is dropped.
    pub fn expire_forever(self: &Arc<Self>, interval: Duration) {
        let writer = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(writer) = writer.upgrade() else { return };
                writer.expire(Instant::now());
            }
        });
    }

    /// Who is typing in `room_id`, sorted.
    pub fn typing_in(&self, room_id: &str) -> Vec<String> {
        lock(&self.state)
            .rooms
            .get(room_id)
            .map(|(_, users)| users.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn latest(&self) -> i64 {
        lock(&self.state).latest
    }

    /// The rows for `from < serial ≤ to`, from memory: one per changed room with
    /// everyone typing there now. A `from` older than what the change cache
    /// remembers (or ahead of a restarted writer) gets every room.
    pub fn get_updates(&self, from: i64, to: i64, limit: usize) -> StreamUpdates<TypingRow> {
        if from == to {
            return StreamUpdates::empty(to);
        }
        let state = lock(&self.state);
        // A token ahead of this writer comes from before its restart: everything
        // this writer has is news to that follower.
        let from = if from > state.latest { 0 } else { from };
        let rooms: Vec<String> = match self.changes.get_all_entities_changed(from) {
            Some(rooms) => rooms,
            None => state.rooms.keys().cloned().collect(),
        };
        let mut rows: Vec<(i64, TypingRow)> = rooms
            .into_iter()
            .filter_map(|room_id| {
                let (serial, users) = state.rooms.get(&room_id)?;
                (*serial > from && *serial <= to).then(|| {
                    (
                        *serial,
                        TypingRow { room_id: room_id.clone(), user_ids: users.keys().cloned().collect() },
                    )
                })
            })
            .collect();
        rows.sort_by_key(|(serial, _)| *serial);
        if rows.len() > limit {
            rows.truncate(limit);
            let token = rows.last().map_or(to, |(serial, _)| *serial);
            return StreamUpdates { rows, token, limited: true };
        }
        StreamUpdates { rows, token: to, limited: false }
    }
}

/// The token of a room's last typing change, and who is typing there.
type RoomTyping = (i64, BTreeSet<String>);

/// What a follower knows of typing, only from the rows it applied.
#[derive(Debug, Default)]
pub struct TypingFollower {
    /// The instance that writes typing: the only one whose rows are taken.
    writer: String,
    /// The token of the last rows applied, and room → (token of its last
    /// change, who is typing there).
    state: Mutex<(i64, HashMap<String, RoomTyping>)>,
    notify: tokio::sync::watch::Sender<u64>,
    /// Where rows it missed can be fetched from (the writer's internal HTTP
    /// endpoint); without it, a follower that missed rows starts afresh.
    remote: Option<Arc<dyn RemoteUpdates>>,
}

impl TypingFollower {
    /// A follower of `writer`'s typing that knows nothing yet and cannot fetch
    /// what it misses.
    pub fn new(writer: &str) -> Arc<TypingFollower> {
        Arc::new(TypingFollower { writer: writer.to_owned(), ..TypingFollower::default() })
    }

    /// A follower of `writer`'s typing that fetches what it misses from `remote`.
    pub fn fetching_from(writer: &str, remote: Arc<dyn RemoteUpdates>) -> Arc<TypingFollower> {
        Arc::new(TypingFollower {
            writer: writer.to_owned(),
            remote: Some(remote),
            ..TypingFollower::default()
        })
    }

    /// Who is typing in `room_id`, as last told.
    pub fn typing_in(&self, room_id: &str) -> Vec<String> {
        lock(&self.state).1.get(room_id).map(|(_, users)| users.iter().cloned().collect()).unwrap_or_default()
    }

    /// The token of the last rows applied.
    pub fn latest(&self) -> i64 {
        lock(&self.state).0
    }

    fn apply(&self, token: i64, rows: &[TypingRow]) {
        let mut state = lock(&self.state);
        if state.0 > token {
            // The writer restarted and counts from 0 again: what we knew is void.
            state.1.clear();
        }
        let moved = state.0 != token;
        state.0 = token;
        for row in rows {
            state.1.insert(row.room_id.clone(), (token, row.user_ids.iter().cloned().collect()));
        }
        drop(state);
        if moved || !rows.is_empty() {
            self.notify.send_modify(|version| *version = version.wrapping_add(1));
        }
    }
}

/// The `typing` stream of a process: the writer's handler, or a follower's.
#[derive(Debug)]
pub enum TypingStream {
    /// On the instance that writes typing.
    Writer(Arc<TypingWriter>),
    /// Everywhere else.
    Follower(Arc<TypingFollower>),
}

impl TypingStream {
    /// The stream's token here: the serial of the last change made (writer) or
    /// applied (follower).
    pub fn latest(&self) -> i64 {
        match self {
            TypingStream::Writer(writer) => writer.latest(),
            TypingStream::Follower(follower) => follower.latest(),
        }
    }

    /// Who is typing in `room_id`, sorted.
    pub fn typing_in(&self, room_id: &str) -> Vec<String> {
        match self {
            TypingStream::Writer(writer) => writer.typing_in(room_id),
            TypingStream::Follower(follower) => follower.typing_in(room_id),
        }
    }

    /// Whether who types in `room_id` changed after `token`. A `token` ahead of
    /// the stream (from before the writer restarted) says yes for every room
    /// with someone typing: the client's view may be stale.
    pub fn changed_since(&self, room_id: &str, token: i64) -> bool {
        let (latest, changed_at) = match self {
            TypingStream::Writer(writer) => {
                let state = lock(&writer.state);
                (state.latest, state.rooms.get(room_id).map(|(serial, users)| (*serial, users.is_empty())))
            }
            TypingStream::Follower(follower) => {
                let state = lock(&follower.state);
                (state.0, state.1.get(room_id).map(|(serial, users)| (*serial, users.is_empty())))
            }
        };
        match changed_at {
            None => false,
            Some((_, nobody_typing)) if token > latest => !nobody_typing,
            Some((serial, _)) => serial > token,
        }
    }

    /// Sees a change whenever the stream moves here.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        match self {
            TypingStream::Writer(writer) => writer.subscribe(),
            TypingStream::Follower(follower) => follower.notify.subscribe(),
        }
    }
}

impl Stream for TypingStream {
    fn spec(&self) -> store_core::StreamSpec {
        TYPING
    }

    fn current_token(&self, _writer: &str) -> i64 {
        match self {
            TypingStream::Writer(writer) => writer.latest(),
            TypingStream::Follower(follower) => follower.latest(),
        }
    }

    fn minimal_local_current_token(&self) -> i64 {
        self.current_token("")
    }

    fn can_discard_position(&self) -> bool {
        // The token goes back to 0 when the writer restarts.
        false
    }

    fn is_writer(&self, instance: &str) -> bool {
        match self {
            TypingStream::Writer(writer) => writer.instance_name == instance,
            TypingStream::Follower(follower) => follower.writer == instance,
        }
    }

    fn get_updates_since<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(async move {
            match self {
                TypingStream::Writer(writer) => store_core::to_wire(writer.get_updates(from, to, limit)),
                TypingStream::Follower(follower) => match &follower.remote {
                    // The writer serves what we missed from memory; a restarted
                    // writer's rows carry its token back down, and applying them
                    // resets us.
                    Some(remote) => remote.fetch(TYPING_STREAM, writer, from, to).await,
                    // Without a way to ask, start afresh at `to`: nobody typing
                    // until the next change, whose row carries the room's whole set.
                    None => {
                        *lock(&follower.state) = (to, HashMap::new());
                        follower.notify.send_modify(|version| *version = version.wrapping_add(1));
                        Ok(StreamUpdates::empty(to))
                    }
                },
            }
        })
    }

    fn apply_rows(&self, writer: &str, token: i64, rows: &[RowJson]) -> Result<(), serde_json::Error> {
        let rows: Vec<TypingRow> = store_core::decode_rows(rows)?;
        match self {
            TypingStream::Writer(handler) => {
                tracing::error!(writer, own = %handler.instance_name, "typing rows reached the typing writer; ignoring them");
            }
            TypingStream::Follower(follower) => follower.apply(token, &rows),
        }
        Ok(())
    }

    fn advance(&self, _writer: &str, token: i64) {
        if let TypingStream::Follower(follower) = self {
            follower.apply(token, &[]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{TypingFollower, TypingRow, TypingWriter};

    #[test]
    fn rows_carry_everyone_typing_and_the_serial_counts_changes() {
        let writer = TypingWriter::new("master");
        writer.started_typing("!a", "@u", Duration::from_secs(30));
        writer.started_typing("!a", "@v", Duration::from_secs(30));
        writer.started_typing("!a", "@v", Duration::from_secs(30)); // a renewal: no change
        writer.started_typing("!b", "@w", Duration::from_secs(30));
        writer.stopped_typing("!b", "@w");
        assert_eq!(writer.latest(), 4);
        let updates = writer.get_updates(0, 4, 10);
        assert_eq!(
            updates.rows,
            [
                (2, TypingRow { room_id: "!a".into(), user_ids: vec!["@u".into(), "@v".into()] }),
                (4, TypingRow { room_id: "!b".into(), user_ids: vec![] }),
            ]
        );
        assert_eq!(writer.get_updates(2, 4, 10).rows.len(), 1);
        let cut = writer.get_updates(0, 4, 1);
        assert!(cut.limited);
        assert_eq!(cut.token, 2);
    }

    #[test]
    fn timeouts_end_typing() {
        let writer = TypingWriter::new("master");
        writer.started_typing("!a", "@u", Duration::from_millis(10));
        assert_eq!(writer.expire(Instant::now() + Duration::from_millis(20)), 1);
        assert!(writer.typing_in("!a").is_empty());
        assert_eq!(writer.latest(), 2);
    }

    #[test]
    fn a_token_from_before_a_restart_gets_every_room() {
        let writer = TypingWriter::new("master");
        writer.started_typing("!a", "@u", Duration::from_secs(30));
        writer.started_typing("!b", "@v", Duration::from_secs(30));
        let updates = writer.get_updates(101, 2, 10);
        let rooms: Vec<(i64, &str)> =
            updates.rows.iter().map(|(serial, row)| (*serial, row.room_id.as_str())).collect();
        assert_eq!(rooms, [(1, "!a"), (2, "!b")]);
        assert_eq!(updates.token, 2);
    }

    #[test]
    fn a_follower_resets_when_the_writer_restarts() {
        let follower = TypingFollower::new("master");
        follower.apply(101, &[TypingRow { room_id: "!a".into(), user_ids: vec!["@u".into()] }]);
        assert_eq!(follower.typing_in("!a"), ["@u"]);
        follower.apply(1, &[TypingRow { room_id: "!b".into(), user_ids: vec!["@v".into()] }]);
        assert!(follower.typing_in("!a").is_empty(), "the restarted writer's state replaces ours");
        assert_eq!(follower.typing_in("!b"), ["@v"]);
        assert_eq!(follower.latest(), 1);
    }

    #[test]
    fn rows_match_the_wire_vector() {
        let json = r#"["!r:example.com",["@u:example.com","@v:example.com"]]"#;
        let row: TypingRow = serde_json::from_str(json).unwrap();
        assert_eq!(row.user_ids, ["@u:example.com", "@v:example.com"]);
        assert_eq!(serde_json::to_string(&row).unwrap(), json);
    }

    #[tokio::test]
    async fn a_position_from_a_restarted_writer_resets_the_follower() {
        use std::sync::Arc;

        use replication_proto::Command;

        use crate::{Inbound, Link, StreamRegistry, TypingStream};

        let follower = TypingFollower::new("master");
        let mut registry = StreamRegistry::new();
        registry.register(Arc::new(TypingStream::Follower(Arc::clone(&follower))));
        let inbound = Inbound::new("worker1", registry);
        let row = |room: &str| {
            replication_proto::RowJson::from_row(&TypingRow {
                room_id: room.into(),
                user_ids: vec!["@u".into()],
            })
            .unwrap()
        };
        let position = |token: i64| Command::Position {
            stream: "typing".into(),
            instance: "master".into(),
            prev_token: token,
            new_token: token,
        };
        let rdata = |token: i64, room: &str| Command::Rdata {
            stream: "typing".into(),
            instance: "master".into(),
            token: Some(token),
            row: row(room),
        };
        let mut link = Link::default();
        inbound.handle(&mut link, position(0)).await.unwrap();
        inbound.handle(&mut link, rdata(101, "!a")).await.unwrap();
        assert_eq!(follower.typing_in("!a"), ["@u"]);
        // The writer restarted: its token is 0 again.
        inbound.handle(&mut link, position(0)).await.unwrap();
        assert_eq!(follower.latest(), 0);
        assert!(follower.typing_in("!a").is_empty());
        inbound.handle(&mut link, rdata(1, "!b")).await.unwrap();
        assert_eq!(follower.typing_in("!b"), ["@u"]);
    }
}
