//! [`EventsReader`]: what every process reads about events, and the worker side
//! of the `events` and `backfill` streams.

use std::collections::BTreeMap;
use std::sync::Arc;

use store_core::{
    CURRENT_STATE_POKE, Cache, CacheRegistry, CachesStream, Database, MultiWriterConfig,
    MultiWriterIdGenerator, Row, StoreContext, StoreError, StreamChangeCache, StreamTable, StreamUpdates,
    Transaction,
};

use crate::rows::{BackfillRow, CurrentStateRow, EventRow, EventsStreamRow};
use crate::{Event, NewEvent};

/// Caches keyed by room that depend on the room's current state. With
/// [`CURRENT_STATE_CACHES_BY_MEMBER`], the one list both the writer (after its
/// commit) and every reader (expanding `cs_cache_fake`) invalidate.
pub const CURRENT_STATE_CACHES_BY_ROOM: &[&str] = &["get_current_state_ids", "get_users_in_room"];

/// Caches keyed by user that depend on that user's membership in rooms.
pub const CURRENT_STATE_CACHES_BY_MEMBER: &[&str] = &["get_rooms_for_user"];

/// Which writers' events a read wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterFilter {
    /// Only this writer's.
    Only(String),
    /// Every writer's but these.
    AllBut(Vec<String>),
}

/// Which end of a range of a room's events a read starts from.
#[derive(Debug, Clone, Copy)]
enum RangeEnd {
    /// The newest events, newest first.
    Newest,
    /// The oldest events, oldest first.
    Oldest,
}

/// A change of one user's membership in one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    /// The room.
    pub room_id: String,
    /// `join`, `leave`, …
    pub membership: String,
    /// The membership event's position on the `events` stream.
    pub stream_ordering: i64,
    /// The writer that persisted it.
    pub instance_name: String,
}

/// A room's current state: (type, state key) → event ID.
pub type StateMap = BTreeMap<(String, String), String>;

/// Events, current state and memberships, as every process reads them.
///
/// Holds the caches in front of the hot reads (`get_event`, current state, the
/// members of a room, the rooms of a user) and the change caches that let sync
/// skip rooms and users that did not change. Reads never block writers: they
/// run in autocommit; the caches are filled race-free (`store_core::Cache`).
#[derive(Debug)]
pub struct EventsReader {
    pub(crate) db: Database,
    pub(crate) events_ids: MultiWriterIdGenerator,
    pub(crate) backfill_ids: MultiWriterIdGenerator,
    pub(crate) caches: Arc<CachesStream>,
    event_cache: Arc<Cache<String, Arc<Event>>>,
    current_state_cache: Arc<Cache<String, Arc<StateMap>>>,
    users_in_room_cache: Arc<Cache<String, Arc<Vec<String>>>>,
    rooms_for_user_cache: Arc<Cache<String, Arc<Vec<String>>>>,
    /// Room → last position an event was persisted in it.
    pub(crate) room_changes: Arc<StreamChangeCache>,
    /// User → last position their membership changed.
    pub(crate) membership_changes: Arc<StreamChangeCache>,
    /// Room → last position its current state changed.
    pub(crate) state_changes: Arc<StreamChangeCache>,
    /// What this process's writer persisted lately, for its streamer.
    pub(crate) recent: crate::recent::RecentEvents,
}

/// Both streams' rows live in `events`; backfill's writers are events' (its
/// spec says so) and its IDs count down.
fn generator_config(
    ctx: &StoreContext,
    stream: store_core::StreamSpec,
    sequence: &str,
    positive: bool,
) -> MultiWriterConfig {
    MultiWriterConfig {
        positive,
        ..ctx.generator_config(
            stream,
            vec![StreamTable::new("events", "instance_name", "stream_ordering")],
            sequence,
        )
    }
}

impl EventsReader {
    /// The `events` stream's positions, as this process knows them.
    pub fn events_stream(&self) -> &MultiWriterIdGenerator {
        &self.events_ids
    }

    /// The `backfill` stream's positions.
    pub fn backfill_stream(&self) -> &MultiWriterIdGenerator {
        &self.backfill_ids
    }

    /// Which rooms had events after a position.
    pub fn room_changes(&self) -> &StreamChangeCache {
        &self.room_changes
    }

    /// Whose memberships changed after a position.
    pub fn membership_changes(&self) -> &StreamChangeCache {
        &self.membership_changes
    }

    /// Which rooms' current state changed after a position.
    pub fn state_changes(&self) -> &StreamChangeCache {
        &self.state_changes
    }

    /// The event with ID `event_id`, if persisted (cached).
    pub async fn get_event(&self, event_id: &str) -> Result<Option<Arc<Event>>, StoreError> {
        if let Some(event) = self.event_cache.get(&event_id.to_owned()) {
            return Ok(Some(event));
        }
        let ticket = self.event_cache.begin_fill(&event_id.to_owned());
        let id = event_id.to_owned();
        let event = self
            .db
            .run_autocommit("get_event", move |txn| {
                let id = id.clone();
                Box::pin(async move {
                    let row = txn.query_opt(&format!("{SELECT_EVENT} WHERE event_id = $1"), &[&id]).await?;
                    row.as_ref().map(event_from_row).transpose()
                })
            })
            .await?
            .map(Arc::new);
        match &event {
            Some(event) => {
                self.event_cache.finish_fill(ticket, Arc::clone(event));
            }
            // Nothing to remember: an event that does not exist yet may arrive.
            None => self.event_cache.cancel_fill(ticket),
        }
        Ok(event)
    }

    /// The events of `room_id` with `from < stream_ordering ≤ to`, oldest first,
    /// at most `limit`.
    pub async fn get_room_events(
        &self,
        room_id: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let events = self.get_rooms_events(&[room_id], from, to, limit).await?;
        Ok(events.into_values().next().unwrap_or_default())
    }

    /// For each of `room_ids`, its events with `from < stream_ordering ≤ to`,
    /// oldest first, at most `limit` per room (the newest `limit` when cut).
    pub async fn get_rooms_events(
        &self,
        room_ids: &[&str],
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<BTreeMap<String, Vec<Event>>, StoreError> {
        let every_writer = WriterFilter::AllBut(Vec::new());
        let mut by_room = BTreeMap::new();
        for room_id in room_ids {
            let events = self.get_room_events_of_writers(room_id, &every_writer, from, to, limit).await?;
            by_room.insert((*room_id).to_owned(), events);
        }
        Ok(by_room)
    }

    /// The newest `limit` events of `room_id` with `from < stream_ordering ≤ to`,
    /// oldest first, persisted by the writers `writers` picks: what a reader
    /// that places events by their own writer's position (a multi-writer
    /// token range) asks once per writer, so that the range of a writer far
    /// ahead, or stalled, costs no rows of the others.
    pub async fn get_room_events_of_writers(
        &self,
        room_id: &str,
        writers: &WriterFilter,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut events =
            self.room_events_of_writers(room_id, writers, (from, to), limit, RangeEnd::Newest).await?;
        events.reverse();
        Ok(events)
    }

    /// The oldest `limit` events of `room_id` with `from < stream_ordering ≤
    /// to`, oldest first, persisted by the writers `writers` picks: the
    /// forward counterpart of [`EventsReader::get_room_events_of_writers`],
    /// for paging a room's history towards the present.
    pub async fn get_oldest_room_events_of_writers(
        &self,
        room_id: &str,
        writers: &WriterFilter,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.room_events_of_writers(room_id, writers, (from, to), limit, RangeEnd::Oldest).await
    }

    /// The transaction IDs `user_id` sent the events of `event_ids` with, by
    /// event ID; events sent without one (or by someone else) are absent.
    /// What marks a client's own events as its own when they come back.
    pub async fn get_txn_ids_of_events(
        &self,
        user_id: &str,
        event_ids: &[&str],
    ) -> Result<BTreeMap<String, String>, StoreError> {
        if event_ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let user = user_id.to_owned();
        let ids: Vec<String> = event_ids.iter().map(|id| (*id).to_owned()).collect();
        self.db
            .run_autocommit("get_txn_ids_of_events", move |txn| {
                let (user, ids) = (user.clone(), ids.clone());
                Box::pin(async move {
                    let placeholders: Vec<String> =
                        (0..ids.len()).map(|index| format!("${}", index + 2)).collect();
                    let sql = format!(
                        "SELECT event_id, txn_id FROM event_txn_id WHERE user_id = $1 AND event_id IN ({})",
                        placeholders.join(", ")
                    );
                    let mut params: Vec<&dyn store_core::ToSqlValue> = vec![&user];
                    params.extend(ids.iter().map(|id| id as &dyn store_core::ToSqlValue));
                    let rows = txn.query(&sql, &params).await?;
                    rows.iter().map(|row| Ok((row.get(0)?, row.get(1)?))).collect()
                })
            })
            .await
    }

    /// `limit` events of `room_id` with `from < stream_ordering ≤ to` by the
    /// writers `writers` picks, from the `end` of the range inwards: newest
    /// first, or oldest first.
    async fn room_events_of_writers(
        &self,
        room_id: &str,
        writers: &WriterFilter,
        (from, to): (i64, i64),
        limit: usize,
        end: RangeEnd,
    ) -> Result<Vec<Event>, StoreError> {
        if to <= from || !self.room_changes.has_entity_changed(room_id, from) {
            return Ok(Vec::new());
        }
        let (order, interaction) = match end {
            RangeEnd::Newest => ("DESC", "get_room_events_of_writers"),
            RangeEnd::Oldest => ("ASC", "get_oldest_room_events_of_writers"),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (room, writers) = (room_id.to_owned(), writers.clone());
        self.db
            .run_autocommit(interaction, move |txn| {
                let (room, writers) = (room.clone(), writers.clone());
                Box::pin(async move {
                    let (condition, names) = match &writers {
                        WriterFilter::Only(writer) => ("instance_name = $5".to_owned(), vec![writer.clone()]),
                        WriterFilter::AllBut(excluded) if excluded.is_empty() => ("1 = 1".to_owned(), Vec::new()),
                        WriterFilter::AllBut(excluded) => {
                            let placeholders: Vec<String> =
                                (0..excluded.len()).map(|index| format!("${}", index + 5)).collect();
                            (format!("instance_name NOT IN ({})", placeholders.join(", ")), excluded.clone())
                        }
                    };
                    let sql = format!(
                        "{SELECT_EVENT} WHERE room_id = $1 AND stream_ordering > $2 AND stream_ordering <= $3 \
                         AND {condition} ORDER BY stream_ordering {order} LIMIT $4"
                    );
                    let mut params: Vec<&dyn store_core::ToSqlValue> = vec![&room, &from, &to, &limit];
                    params.extend(names.iter().map(|name| name as &dyn store_core::ToSqlValue));
                    let rows = txn.query(&sql, &params).await?;
                    rows.iter().map(event_from_row).collect::<Result<Vec<_>, _>>()
                })
            })
            .await
    }

    /// The newest `limit` state events of `room_id` for (`event_type`,
    /// `state_key`), newest first: the history of one state entry, for a
    /// reader that needs the entry as of a token the current one is past.
    pub async fn get_state_history(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let key = (room_id.to_owned(), event_type.to_owned(), state_key.to_owned());
        self.db
            .run_autocommit("get_state_history", move |txn| {
                let (room, event_type, state_key) = key.clone();
                Box::pin(async move {
                    let rows = txn
                        .query(
                            &format!(
                                "{SELECT_EVENT} WHERE room_id = $1 AND type = $2 AND state_key = $3 \
                                 AND stream_ordering > 0 ORDER BY stream_ordering DESC LIMIT $4"
                            ),
                            &[&room, &event_type, &state_key, &limit],
                        )
                        .await?;
                    rows.iter().map(event_from_row).collect::<Result<Vec<_>, _>>()
                })
            })
            .await
    }

    /// The current state of `room_id`: (type, state key) → event ID (cached).
    pub async fn get_current_state_ids(&self, room_id: &str) -> Result<Arc<StateMap>, StoreError> {
        let room = room_id.to_owned();
        let db = self.db.clone();
        self.current_state_cache
            .get_or_load(room.clone(), || async move {
                let state = db
                    .run_autocommit("get_current_state_ids", move |txn| {
                        let room = room.clone();
                        Box::pin(async move {
                            let rows = txn
                                .query(
                                    "SELECT type, state_key, event_id FROM current_state_events WHERE room_id = $1",
                                    &[&room],
                                )
                                .await?;
                            rows.iter()
                                .map(|row| Ok(((row.get(0)?, row.get(1)?), row.get(2)?)))
                                .collect::<Result<BTreeMap<_, _>, StoreError>>()
                        })
                    })
                    .await?;
                Ok(Arc::new(state))
            })
            .await
    }

    /// The event a client's transaction produced, if it was persisted:
    /// `(room_id, event_id)`.
    pub async fn get_event_id_for_txn(
        &self,
        user_id: &str,
        txn_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let (user, txn_id) = (user_id.to_owned(), txn_id.to_owned());
        self.db
            .run_autocommit("get_event_id_for_txn", move |txn| {
                let (user, txn_id) = (user.clone(), txn_id.clone());
                Box::pin(async move {
                    let row = txn
                        .query_opt(
                            "SELECT room_id, event_id FROM event_txn_id WHERE user_id = $1 AND txn_id = $2",
                            &[&user, &txn_id],
                        )
                        .await?;
                    row.map(|row| Ok((row.get(0)?, row.get(1)?))).transpose()
                })
            })
            .await
    }

    /// Every membership event of `user_id` in every room, oldest first: what
    /// sync needs to know which rooms the user was in at any token.
    pub async fn get_membership_history(&self, user_id: &str) -> Result<Vec<MembershipChange>, StoreError> {
        let user = user_id.to_owned();
        self.db
            .run_autocommit("get_membership_history", move |txn| {
                let user = user.clone();
                Box::pin(async move {
                    let rows = txn
                        .query(
                            "SELECT m.room_id, m.membership, m.stream_ordering, e.instance_name \
                             FROM room_memberships AS m JOIN events AS e ON e.event_id = m.event_id \
                             WHERE m.user_id = $1 AND m.stream_ordering > 0 ORDER BY m.stream_ordering",
                            &[&user],
                        )
                        .await?;
                    rows.iter()
                        .map(|row| {
                            Ok(MembershipChange {
                                room_id: row.get(0)?,
                                membership: row.get(1)?,
                                stream_ordering: row.get(2)?,
                                instance_name: row.get(3)?,
                            })
                        })
                        .collect()
                })
            })
            .await
    }

    /// Every room this server has state of, sorted: what the writers of the
    /// room-sharded streams divide among them (an operator's count, not a
    /// hot path).
    pub async fn get_all_room_ids(&self) -> Result<Vec<String>, StoreError> {
        self.db
            .run_autocommit("get_all_room_ids", |txn| {
                Box::pin(async move {
                    let rows = txn
                        .query("SELECT DISTINCT room_id FROM current_state_events ORDER BY room_id", &[])
                        .await?;
                    rows.iter().map(|row| row.get(0)).collect()
                })
            })
            .await
    }

    /// The users currently joined to `room_id`, sorted (cached).
    pub async fn get_users_in_room(&self, room_id: &str) -> Result<Arc<Vec<String>>, StoreError> {
        self.cached_names(
            &self.users_in_room_cache,
            room_id,
            "get_users_in_room",
            "SELECT state_key FROM current_state_events \
             WHERE room_id = $1 AND type = 'm.room.member' AND membership = 'join'",
        )
        .await
    }

    /// The rooms `user_id` is currently joined to, sorted (cached).
    pub async fn get_rooms_for_user(&self, user_id: &str) -> Result<Arc<Vec<String>>, StoreError> {
        self.cached_names(
            &self.rooms_for_user_cache,
            user_id,
            "get_rooms_for_user",
            "SELECT room_id FROM current_state_events \
             WHERE type = 'm.room.member' AND state_key = $1 AND membership = 'join'",
        )
        .await
    }

    /// A sorted list of names that `sql` selects for `key`, through `cache`.
    async fn cached_names(
        &self,
        cache: &Cache<String, Arc<Vec<String>>>,
        key: &str,
        interaction: &'static str,
        sql: &'static str,
    ) -> Result<Arc<Vec<String>>, StoreError> {
        let db = self.db.clone();
        let key = key.to_owned();
        cache
            .get_or_load(key.clone(), || async move {
                let names = db
                    .run_autocommit(interaction, move |txn| {
                        let key = key.clone();
                        Box::pin(async move { sorted(&txn.query(sql, &[&key]).await?) })
                    })
                    .await?;
                Ok(Arc::new(names))
            })
            .await
    }

    /// At most `limit` of `writer`'s events selected by `select_sql` (whose rows
    /// `from_row` reads) and matching `range_sql`, a condition (with its
    /// `ORDER BY`) on the bounds bound to `$2` and `$3`.
    async fn writer_events(
        &self,
        interaction: &'static str,
        (select_sql, from_row): (&'static str, EventFromRow),
        range_sql: &'static str,
        writer: &str,
        (bound_2, bound_3): (i64, i64),
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let writer = writer.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db
            .run_autocommit(interaction, move |txn| {
                let writer = writer.clone();
                Box::pin(async move {
                    let sql = format!("{select_sql} WHERE instance_name = $1 AND {range_sql} LIMIT $4");
                    let rows = txn.query(&sql, &[&writer, &bound_2, &bound_3, &limit]).await?;
                    rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()
                })
            })
            .await
    }

    /// Replication catch-up for the `events` stream: `writer`'s rows with
    /// `from < token ≤ to`, at most `limit` events (each state event also yields
    /// its `state` row, at the same token).
    pub async fn get_events_updates(
        &self,
        writer: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<StreamUpdates<EventsStreamRow>, StoreError> {
        if from >= to {
            return Ok(StreamUpdates::empty(to));
        }
        // What this process just persisted, without reading it back.
        if let Some(events) = self.recent.between(writer, from, to, limit) {
            return Ok(events_updates(events.iter().map(|event| &**event), to, limit));
        }
        let events = self
            .writer_events(
                "get_events_updates",
                (SELECT_EVENT_AND_MEMBERSHIP, event_and_membership_from_row),
                "e.stream_ordering > $2 AND e.stream_ordering <= $3 ORDER BY e.stream_ordering",
                writer,
                (from, to),
                limit,
            )
            .await?;
        Ok(events_updates(events.iter(), to, limit))
    }

    /// Replication catch-up for the `backfill` stream, whose wire tokens are the
    /// negated stream orderings: `writer`'s rows with `from < token ≤ to`.
    pub async fn get_backfill_updates(
        &self,
        writer: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<StreamUpdates<BackfillRow>, StoreError> {
        if from >= to {
            return Ok(StreamUpdates::empty(to));
        }
        let events = self
            .writer_events(
                "get_backfill_updates",
                (SELECT_EVENT, event_from_row),
                "stream_ordering < $2 AND stream_ordering >= $3 ORDER BY stream_ordering DESC",
                writer,
                (-from, -to),
                limit,
            )
            .await?;
        let rows = events
            .iter()
            .map(|event| {
                let row = BackfillRow {
                    event_id: event.event.event_id.clone(),
                    room_id: event.room_id.clone(),
                    event_type: event.event.event_type.clone(),
                    state_key: event.event.state_key.clone(),
                    redacts: None,
                    relates_to: None,
                };
                (-event.stream_ordering, row)
            })
            .collect();
        Ok(StreamUpdates::from_page(rows, to, limit))
    }

    /// Worker side of the `events` stream: applies `rows` that `writer` wrote up
    /// to `token`. Every cache the rows make stale is invalidated before the
    /// writer's position moves, so a reader that sees the new position never
    /// reads a stale cache.
    pub fn process_events_rows(&self, writer: &str, token: i64, rows: &[EventsStreamRow]) {
        let registry = self.caches.registry();
        for row in rows {
            match row {
                EventsStreamRow::Event(event) => {
                    self.event_cache.invalidate(&event.event_id);
                    self.room_changes.entity_has_changed(&event.room_id, token);
                    if event.event_type == "m.room.member"
                        && let Some(user) = &event.state_key
                    {
                        self.membership_changes.entity_has_changed(user, token);
                    }
                }
                EventsStreamRow::State(state) => {
                    let members: &[String] = if state.event_type == "m.room.member" {
                        std::slice::from_ref(&state.state_key)
                    } else {
                        &[]
                    };
                    invalidate_current_state(registry, &state.room_id, members);
                    self.state_changes.entity_has_changed(&state.room_id, token);
                    for member in members {
                        self.membership_changes.entity_has_changed(member, token);
                    }
                }
                EventsStreamRow::StateAll { room_id } => {
                    invalidate_current_state(registry, room_id, &[]);
                    for cache in CURRENT_STATE_CACHES_BY_MEMBER {
                        registry.invalidate_all_of(cache);
                    }
                    self.state_changes.entity_has_changed(room_id, token);
                    self.membership_changes.all_entities_changed(token);
                }
            }
        }
        self.events_ids.advance(writer, token);
    }

    /// Worker side of the `backfill` stream (wire tokens are negated orderings).
    pub fn process_backfill_rows(&self, writer: &str, token: i64, rows: &[BackfillRow]) {
        for row in rows {
            self.event_cache.invalidate(&row.event_id);
        }
        self.backfill_ids.advance(writer, -token);
    }
}

/// The first column of `rows`, sorted by bytes. Sorting here rather than in
/// SQL gives one order on both engines: PostgreSQL sorts text by the
/// database's collation, SQLite by bytes.
fn sorted(rows: &[Row]) -> Result<Vec<String>, StoreError> {
    let mut values = rows.iter().map(|row| row.get(0)).collect::<Result<Vec<String>, _>>()?;
    values.sort_unstable();
    Ok(values)
}

/// Invalidates every cache that depends on `room_id`'s current state, and the
/// per-user ones of `members`: the one list ([`CURRENT_STATE_CACHES_BY_ROOM`],
/// [`CURRENT_STATE_CACHES_BY_MEMBER`]) the writer and every reader use.
pub(crate) fn invalidate_current_state(registry: &CacheRegistry, room_id: &str, members: &[String]) {
    let room_key = [room_id.to_owned()];
    for cache in CURRENT_STATE_CACHES_BY_ROOM {
        registry.invalidate_key(cache, &room_key);
    }
    for member in members {
        for cache in CURRENT_STATE_CACHES_BY_MEMBER {
            registry.invalidate_key(cache, std::slice::from_ref(member));
        }
    }
}

pub(crate) const SELECT_EVENT: &str = "SELECT stream_ordering, instance_name, event_id, room_id, type, state_key, sender, \
     origin_server_ts, content FROM events";

pub(crate) fn event_from_row(row: &Row) -> Result<Event, StoreError> {
    Ok(Event::new(
        row.get(0)?,
        row.get(1)?,
        row.get(3)?,
        NewEvent {
            event_id: row.get(2)?,
            event_type: row.get(4)?,
            state_key: row.get(5)?,
            sender: row.get(6)?,
            origin_server_ts: row.get(7)?,
            content: row.get(8)?,
        },
    ))
}

/// Reads an event from a row of the query it goes with.
type EventFromRow = fn(&Row) -> Result<Event, StoreError>;

/// [`SELECT_EVENT`] and the membership the writer recorded for the event in
/// `room_memberships` (`NULL` when it recorded none), for
/// [`event_and_membership_from_row`]. Columns are qualified: both tables have
/// `event_id`, `room_id`, `sender` and `stream_ordering`.
const SELECT_EVENT_AND_MEMBERSHIP: &str = "SELECT e.stream_ordering, e.instance_name, e.event_id, e.room_id, \
     e.type, e.state_key, e.sender, e.origin_server_ts, e.content, m.membership \
     FROM events AS e LEFT JOIN room_memberships AS m ON m.event_id = e.event_id";

/// An event of [`SELECT_EVENT_AND_MEMBERSHIP`], which already knows its
/// membership when the writer recorded one: the writer parsed it from this very
/// content when it persisted the event (`room_memberships.membership` is
/// [`NewEvent::membership`]), so replicating the event does not parse it again.
/// Without one (not a member event, an unreadable membership, a member event
/// without a state key) the event parses its content if asked, as before.
/// The `events` stream's rows of `events` (a writer's, in stream order, at
/// most `limit` of those in a range ending at `to`): an `ev` row each, and a
/// `state` row after each state event.
fn events_updates<'a>(
    events: impl ExactSizeIterator<Item = &'a Event>,
    to: i64,
    limit: usize,
) -> StreamUpdates<EventsStreamRow> {
    let limited = events.len() >= limit;
    let mut rows = Vec::with_capacity(events.len());
    let mut last = None;
    for event in events {
        let position = event.stream_ordering;
        last = Some(position);
        rows.push((position, EventsStreamRow::Event(event_row(event))));
        if let Some(state_key) = &event.event.state_key {
            rows.push((
                position,
                EventsStreamRow::State(CurrentStateRow {
                    room_id: event.room_id.clone(),
                    event_type: event.event.event_type.clone(),
                    state_key: state_key.clone(),
                    event_id: Some(event.event.event_id.clone()),
                }),
            ));
        }
    }
    let token = match last {
        Some(last) if limited => last,
        _ => to,
    };
    StreamUpdates { rows, token, limited }
}

fn event_and_membership_from_row(row: &Row) -> Result<Event, StoreError> {
    let event = event_from_row(row)?;
    if let Some(membership) = row.get::<Option<String>>(9)? {
        event.remember_membership(membership);
    }
    Ok(event)
}

/// The `ev` row of `event`; its membership comes from [`Event::membership`],
/// so an event that already knows it (recorded, or asked before) is not parsed
/// again.
pub(crate) fn event_row(event: &Event) -> EventRow {
    EventRow {
        event_id: event.event.event_id.clone(),
        room_id: event.room_id.clone(),
        event_type: event.event.event_type.clone(),
        state_key: event.event.state_key.clone(),
        redacts: None,
        relates_to: None,
        membership: event.membership().map(str::to_owned),
        rejected: false,
        outlier: false,
    }
}

impl store_core::Store for EventsReader {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        vec![&crate::MIGRATIONS]
    }
    fn stream_specs() -> Vec<store_core::StreamSpec> {
        vec![crate::EVENTS, crate::BACKFILL]
    }
    /// Loads the streams' positions on the start-up connection and registers the
    /// caches (and the `cs_cache_fake` expansion) in the process's registry.
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        let events_ids = MultiWriterIdGenerator::new_in(
            &db,
            conn,
            generator_config(ctx, crate::EVENTS, "events_stream_seq", true),
        )
        .await?;
        let backfill_ids = MultiWriterIdGenerator::new_in(
            &db,
            conn,
            generator_config(ctx, crate::BACKFILL, "events_backfill_stream_seq", false),
        )
        .await?;
        let registry = Arc::clone(ctx.registry());
        let current = events_ids.get_current_token();
        let reader = EventsReader {
            // The change caches are prefilled from the newest rows, which may lie
            // above the current token (another writer's rows past a gap): a cache
            // that started empty would deny changes it never saw.
            event_cache: registry.register("get_event")?,
            current_state_cache: registry.register("get_current_state_ids")?,
            users_in_room_cache: registry.register("get_users_in_room")?,
            rooms_for_user_cache: registry.register("get_rooms_for_user")?,
            room_changes: Arc::new(StreamChangeCache::load_newest(conn, "events_room_changes", "SELECT room_id, stream_ordering FROM events WHERE stream_ordering > 0 ORDER BY stream_ordering DESC LIMIT $1", current).await?),
            membership_changes: Arc::new(StreamChangeCache::load_newest(conn, "membership_changes", "SELECT user_id, stream_ordering FROM room_memberships WHERE stream_ordering > 0 ORDER BY stream_ordering DESC LIMIT $1", current).await?),
            state_changes: Arc::new(StreamChangeCache::load_newest(conn, "current_state_changes", "SELECT room_id, stream_ordering FROM current_state_events WHERE stream_ordering > 0 ORDER BY stream_ordering DESC LIMIT $1", current).await?),
            recent: crate::recent::RecentEvents::default(),
            db,
            events_ids,
            backfill_ids,
            caches: Arc::clone(ctx.caches()),
        };
        let (membership_changes, state_changes) =
            (Arc::clone(&reader.membership_changes), Arc::clone(&reader.state_changes));
        registry.register_expansion(
            CURRENT_STATE_POKE,
            Arc::new(move |registry: &CacheRegistry, keys: &[String], token: Option<i64>| {
                let Some((room_id, members)) = keys.split_first() else { return };
                invalidate_current_state(registry, room_id, members);
                if let Some(token) = token {
                    state_changes.entity_has_changed(room_id, token);
                    for member in members {
                        membership_changes.entity_has_changed(member, token);
                    }
                }
            }),
        )?;
        Ok(reader)
    }
}
