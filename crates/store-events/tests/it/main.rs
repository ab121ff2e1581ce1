//! store-events against real PostgreSQL and SQLite: persisting and reading back,
//! catch-up queries, cache invalidation on the writer and on a worker, and two
//! writers at once.

use std::sync::Arc;

use store_core::{CachesRow, CachesStream, Database, Engine, StoreContext, StoreError, StoreSettings};
use store_events::rows::EventsStreamRow;
use store_events::{ClientTxn, EventsReader, EventsWriter, NewEvent, Persisted, WriterFilter};
use store_test_support::{TestDb, TestResult, build_alone, engine_tests};

const ROOM: &str = "!room:example.com";

/// A deployment where `writers` write events.
fn deployment(instance: &str, writers: &[&str]) -> StoreSettings {
    StoreSettings::in_deployment(instance).with_writers("events", writers)
}

struct Process {
    caches: Arc<CachesStream>,
    reader: Option<EventsReader>,
    writer: Option<EventsWriter>,
}

impl Process {
    fn reader(&self) -> &EventsReader {
        match (&self.writer, &self.reader) {
            (Some(writer), _) => writer.reader(),
            (None, Some(reader)) => reader,
            (None, None) => unreachable!("a process has one or the other"),
        }
    }
    fn writer(&self) -> &EventsWriter {
        self.writer.as_ref().expect("this process writes events")
    }
}

async fn start(db: &Database, settings: &StoreSettings) -> Result<Process, StoreError> {
    let process = if settings.is_writer_for("events") {
        let (ctx, writer) = build_alone::<(StoreContext, EventsWriter)>(db, settings).await?;
        Process { caches: Arc::clone(ctx.caches()), reader: None, writer: Some(writer) }
    } else {
        let (ctx, reader) = build_alone::<(StoreContext, EventsReader)>(db, settings).await?;
        Process { caches: Arc::clone(ctx.caches()), reader: Some(reader), writer: None }
    };
    Ok(process)
}

fn member(id: &str, user: &str, membership: &str) -> NewEvent {
    NewEvent {
        event_id: id.to_owned(),
        event_type: "m.room.member".to_owned(),
        state_key: Some(user.to_owned()),
        sender: user.to_owned(),
        origin_server_ts: 1,
        content: format!(r#"{{"membership":"{membership}"}}"#),
    }
}

fn message(id: &str, sender: &str) -> NewEvent {
    NewEvent {
        event_id: id.to_owned(),
        event_type: "m.room.message".to_owned(),
        state_key: None,
        sender: sender.to_owned(),
        origin_server_ts: 2,
        content: r#"{"body":"hello"}"#.to_owned(),
    }
}

fn topic(id: &str, text: &str) -> NewEvent {
    NewEvent {
        event_id: id.to_owned(),
        event_type: "m.room.topic".to_owned(),
        state_key: Some(String::new()),
        sender: "@alice:example.com".to_owned(),
        origin_server_ts: 3,
        content: format!(r#"{{"topic":"{text}"}}"#),
    }
}

engine_tests!(
    persisted_events_read_back,
    catch_up_queries_cut_at_the_limit,
    writes_invalidate_the_caches_they_make_stale,
    backfilled_events_count_down,
    client_reads_by_writer_transaction_and_membership,
    room_events_page_from_either_end_and_txn_ids_by_event,
    catch_up_rows_carry_the_membership_the_content_gives,
    batches_queued_together_share_a_commit_in_their_order,
    a_failing_batch_fails_alone,
    the_writer_streams_what_it_persisted_without_reading_it_back,
    a_used_client_transaction_persists_nothing,
);

/// The rows a writer's streamer sends come from what it just persisted, with
/// no query, and are the rows any other process reads from the database;
/// ranges it does not hold whole are read as before.
async fn the_writer_streams_what_it_persisted_without_reading_it_back(test_db: TestDb) -> TestResult {
    let writer_process = start(&test_db.db, &deployment("w1", &["w1"])).await?;
    let other = start(&test_db.db, &deployment("other", &["w1"])).await?;
    let writer = writer_process.writer();
    let before = writer.reader().events_stream().get_current_token();
    writer.persist_events(ROOM, &[member("$join", "@alice:example.com", "join")]).await?;
    writer.persist_events(ROOM, &[message("$m1", "@alice:example.com"), topic("$t", "hi")]).await?;
    let after = writer.reader().events_stream().get_current_token();
    let reads = || test_db.db.interaction_stats().get("get_events_updates").map_or(0, |stats| stats.count);

    let (read_before, kept) = (reads(), writer.reader().get_events_updates("w1", before, after, 100).await?);
    assert_eq!(reads(), read_before, "the writer read nothing back");
    let read = other.reader().get_events_updates("w1", before, after, 100).await?;
    assert_eq!(reads(), read_before + 1);
    assert_eq!(kept, read, "the same rows, memberships and state rows included");
    assert_eq!(kept.rows.len(), 5, "three events, two of them state: {kept:?}");
    let cut = writer.reader().get_events_updates("w1", before, after, 2).await?;
    assert_eq!(
        cut,
        other.reader().get_events_updates("w1", before, after, 2).await?,
        "cut at the same limit"
    );
    // From before the writer's first event here: the database.
    let read_before = reads();
    writer.reader().get_events_updates("w1", before - 1, after, 100).await?;
    assert_eq!(reads(), read_before + 1);
    Ok(())
}

/// Batches queued while a commit is in flight share the next one: every room
/// keeps the order its batches were queued in, state and memberships apply,
/// and a client transaction named in two rooms at once persists once.
async fn batches_queued_together_share_a_commit_in_their_order(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let before = writer.reader().events_stream().get_current_token();
    let rooms = ["!a:example.com", "!b:example.com", "!c:example.com"];
    let alice = "@alice:example.com";
    let mut queued = Vec::new();
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); rooms.len()];
    for n in 0..30 {
        let (index, id) = (n % rooms.len(), format!("$e{n}"));
        let event = if n < rooms.len() { member(&id, alice, "join") } else { message(&id, alice) };
        queued.push(writer.persist_events_for_txn(rooms[index], &[event], None));
        expected[index].push(id);
    }
    let txn = ClientTxn { user_id: alice.to_owned(), txn_id: "twice".to_owned() };
    let first = writer.persist_events_for_txn(rooms[0], &[message("$t0", alice)], Some(&txn));
    let second = writer.persist_events_for_txn(rooms[1], &[message("$t1", alice)], Some(&txn));
    expected[0].push("$t0".to_owned());
    for batch in queued {
        assert!(matches!(batch.await?, Persisted::Events(ids) if ids.len() == 1));
    }
    assert!(matches!(first.await?, Persisted::Events(_)));
    assert_eq!(second.await?, Persisted::TxnAlreadyUsed);

    let reader = writer.reader();
    let last = reader.events_stream().get_current_token();
    let every = WriterFilter::AllBut(Vec::new());
    for (room, expected) in rooms.iter().zip(&expected) {
        let events = reader.get_room_events_of_writers(room, &every, before, last, 100).await?;
        let ids: Vec<String> = events.into_iter().map(|event| event.event.event_id).collect();
        assert_eq!(&ids, expected, "{room} keeps its order");
        assert_eq!(*reader.get_users_in_room(room).await?, [alice], "{room}'s state applied");
    }
    assert_eq!(
        reader.get_event_id_for_txn(alice, "twice").await?,
        Some((rooms[0].to_owned(), "$t0".to_owned()))
    );
    assert_eq!(reader.get_event("$t1").await?, None);
    let stats = writer.group_stats();
    assert_eq!(stats.jobs, 32);
    assert!(stats.commits < stats.jobs && stats.largest > 1, "commits were shared: {stats:?}");
    Ok(())
}

/// A batch that fails inside a group (here an event ID used before) fails
/// alone: the others of its group commit.
async fn a_failing_batch_fails_alone(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let alice = "@alice:example.com";
    writer.persist_events(ROOM, &[message("$used", alice)]).await?;
    let queued = [("!a:example.com", "$a"), ("!b:example.com", "$used"), ("!c:example.com", "$c")]
        .map(|(room, id)| writer.persist_events_for_txn(room, &[message(id, alice)], None));
    let [a, used, c] = queued;
    assert!(matches!(a.await?, Persisted::Events(_)));
    let err = used.await.expect_err("an event ID is used once");
    assert!(err.db_error().is_some_and(|err| err.is_unique_violation()), "{err}");
    assert!(matches!(c.await?, Persisted::Events(_)));
    let reader = writer.reader();
    assert!(reader.get_event("$a").await?.is_some() && reader.get_event("$c").await?.is_some());
    assert_eq!(reader.get_event("$used").await?.map(|event| event.room_id.clone()), Some(ROOM.to_owned()));
    Ok(())
}

/// A client transaction already recorded persists nothing. A commit records
/// transactions with the COMMIT, betting none was used. A
/// retry of one this writer committed is known and checked first, in one
/// run; one it does not know (recorded before it started) loses the bet, and
/// its group runs again, checking first. The stream IDs the lost bet took do
/// not hold the position back.
async fn a_used_client_transaction_persists_nothing(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let alice = "@alice:example.com";
    let runs = || test_db.db.interaction_stats().get("persist_events").map_or(0, |stats| stats.count);
    let txn = ClientTxn { user_id: alice.to_owned(), txn_id: "t1".to_owned() };
    let before = runs();
    assert!(matches!(
        writer.persist_events_for_txn(ROOM, &[message("$first", alice)], Some(&txn)).await?,
        Persisted::Events(_)
    ));
    assert_eq!(runs(), before + 1, "a new transaction: one run");
    let retried = writer.persist_events_for_txn(ROOM, &[message("$retry", alice)], Some(&txn)).await?;
    assert_eq!(retried, Persisted::TxnAlreadyUsed);
    assert_eq!(runs(), before + 2, "a retry of a transaction this writer committed: one run");

    // Recorded before this writer started (by its previous run, say).
    test_db
        .db
        .run_interaction("record_txn", |txn| {
            Box::pin(async move {
                txn.execute(
                    "INSERT INTO event_txn_id (user_id, txn_id, event_id, room_id, inserted_ts) \
                     VALUES ('@alice:example.com', 'earlier', '$first', $1, 0)",
                    &[&ROOM],
                )
                .await
            })
        })
        .await?;
    let earlier = ClientTxn { user_id: alice.to_owned(), txn_id: "earlier".to_owned() };
    let before = runs();
    let retried = writer.persist_events_for_txn(ROOM, &[message("$again", alice)], Some(&earlier)).await?;
    assert_eq!(retried, Persisted::TxnAlreadyUsed);
    assert_eq!(runs(), before + 2, "one run more: the bet was lost");
    let reader = writer.reader();
    assert_eq!(reader.get_event("$retry").await?, None);
    assert_eq!(reader.get_event("$again").await?, None);
    assert_eq!(reader.get_event_id_for_txn(alice, "t1").await?, Some((ROOM.to_owned(), "$first".to_owned())));

    let next = writer.persist_events(ROOM, &[message("$next", alice)]).await?;
    assert_eq!(reader.events_stream().get_current_token(), next[0], "the position passes the IDs given up");
    Ok(())
}

/// What the client API reads: a room's events by writer, a client
/// transaction's event, and a user's membership history.
async fn client_reads_by_writer_transaction_and_membership(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let before = writer.reader().events_stream().get_current_token();
    let txn = ClientTxn { user_id: "@alice:example.com".to_owned(), txn_id: "t1".to_owned() };
    let Persisted::Events(ids) =
        writer.persist_events_for_txn(ROOM, &[message("$m1", "@alice:example.com")], Some(&txn)).await?
    else {
        return Err("a first transaction is persisted".into());
    };
    let more = writer
        .persist_events(
            ROOM,
            &[
                member("$a", "@alice:example.com", "join"),
                message("$m2", "@alice:example.com"),
                member("$l", "@alice:example.com", "leave"),
            ],
        )
        .await?;
    let reader = writer.reader();
    let last = *more.last().ok_or("persisted")?;
    let ids_of =
        |events: Vec<store_events::Event>| events.into_iter().map(|e| e.event.event_id).collect::<Vec<_>>();

    let only_master = WriterFilter::Only("master".to_owned());
    assert_eq!(
        ids_of(reader.get_room_events_of_writers(ROOM, &only_master, before, last, 10).await?),
        ["$m1", "$a", "$m2", "$l"]
    );
    assert_eq!(
        ids_of(reader.get_room_events_of_writers(ROOM, &only_master, before, last, 2).await?),
        ["$m2", "$l"],
        "the newest, oldest first"
    );
    assert_eq!(
        ids_of(reader.get_room_events_of_writers(ROOM, &only_master, ids[0], more[1], 10).await?),
        ["$a", "$m2"]
    );
    let others = WriterFilter::Only("other".to_owned());
    assert!(reader.get_room_events_of_writers(ROOM, &others, before, last, 10).await?.is_empty());
    let all_but_master = WriterFilter::AllBut(vec!["master".to_owned(), "x".to_owned()]);
    assert!(reader.get_room_events_of_writers(ROOM, &all_but_master, before, last, 10).await?.is_empty());
    let all_but_others = WriterFilter::AllBut(vec!["other".to_owned()]);
    assert_eq!(reader.get_room_events_of_writers(ROOM, &all_but_others, before, last, 10).await?.len(), 4);
    assert_eq!(
        reader.get_room_events_of_writers(ROOM, &WriterFilter::AllBut(vec![]), before, last, 10).await?.len(),
        4
    );

    assert_eq!(
        reader.get_event_id_for_txn("@alice:example.com", "t1").await?,
        Some((ROOM.to_owned(), "$m1".to_owned()))
    );
    assert_eq!(reader.get_event_id_for_txn("@alice:example.com", "t2").await?, None);
    assert_eq!(reader.get_event_id_for_txn("@bob:example.com", "t1").await?, None);

    let topics = writer.persist_events(ROOM, &[topic("$t1", "one"), topic("$t2", "two")]).await?;
    let history = reader.get_state_history(ROOM, "m.room.topic", "", 10).await?;
    let orderings: Vec<(&str, i64)> =
        history.iter().map(|e| (e.event.event_id.as_str(), e.stream_ordering)).collect();
    assert_eq!(orderings, [("$t2", topics[1]), ("$t1", topics[0])], "newest first");
    assert_eq!(reader.get_state_history(ROOM, "m.room.topic", "", 1).await?.len(), 1);
    assert!(reader.get_state_history(ROOM, "m.room.topic", "other", 10).await?.is_empty());

    let history = reader.get_membership_history("@alice:example.com").await?;
    let memberships: Vec<(&str, i64)> =
        history.iter().map(|c| (c.membership.as_str(), c.stream_ordering)).collect();
    assert_eq!(memberships, [("join", more[0]), ("leave", more[2])]);
    assert!(history.iter().all(|change| change.instance_name == "master" && change.room_id == ROOM));
    Ok(())
}

/// What history reads: a room's events from the oldest or the newest end of
/// a range, and the transaction IDs of a user's own events.
async fn room_events_page_from_either_end_and_txn_ids_by_event(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let before = writer.reader().events_stream().get_current_token();
    let txn = ClientTxn { user_id: "@alice:example.com".to_owned(), txn_id: "t1".to_owned() };
    writer.persist_events_for_txn(ROOM, &[message("$m1", "@alice:example.com")], Some(&txn)).await?;
    let more = writer
        .persist_events(ROOM, &[message("$m2", "@alice:example.com"), message("$m3", "@bob:example.com")])
        .await?;
    let reader = writer.reader();
    let last = *more.last().ok_or("persisted")?;
    let ids_of =
        |events: Vec<store_events::Event>| events.into_iter().map(|e| e.event.event_id).collect::<Vec<_>>();
    let every = WriterFilter::AllBut(Vec::new());

    assert_eq!(
        ids_of(reader.get_oldest_room_events_of_writers(ROOM, &every, before, last, 2).await?),
        ["$m1", "$m2"],
        "the oldest, oldest first"
    );
    assert_eq!(
        ids_of(reader.get_room_events_of_writers(ROOM, &every, before, last, 2).await?),
        ["$m2", "$m3"]
    );
    assert_eq!(
        ids_of(reader.get_oldest_room_events_of_writers(ROOM, &every, more[0], last, 10).await?),
        ["$m3"]
    );
    let others = WriterFilter::Only("other".to_owned());
    assert!(reader.get_oldest_room_events_of_writers(ROOM, &others, before, last, 10).await?.is_empty());
    assert!(reader.get_oldest_room_events_of_writers(ROOM, &every, last, last, 10).await?.is_empty());

    let txn_ids = reader.get_txn_ids_of_events("@alice:example.com", &["$m1", "$m2", "$m3"]).await?;
    assert_eq!(txn_ids.into_iter().collect::<Vec<_>>(), [("$m1".to_owned(), "t1".to_owned())]);
    assert!(
        reader.get_txn_ids_of_events("@bob:example.com", &["$m1"]).await?.is_empty(),
        "only its sender's"
    );
    assert!(reader.get_txn_ids_of_events("@alice:example.com", &[]).await?.is_empty());
    Ok(())
}

async fn persisted_events_read_back(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let before = writer.reader().events_stream().get_current_token();
    let ids = writer
        .persist_events(
            ROOM,
            &[
                member("$a", "@alice:example.com", "join"),
                message("$m1", "@alice:example.com"),
                topic("$t", "one"),
            ],
        )
        .await?;
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    let reader = writer.reader();
    assert_eq!(reader.events_stream().get_current_token(), ids[2]);

    let event = reader.get_event("$m1").await?.ok_or("persisted")?;
    assert_eq!(
        (event.stream_ordering, event.room_id.as_str(), event.event.sender.as_str()),
        (ids[1], ROOM, "@alice:example.com")
    );
    assert_eq!(reader.get_event("$nope").await?, None);

    let timeline = reader.get_room_events(ROOM, before, ids[2], 10).await?;
    assert_eq!(timeline.iter().map(|e| e.event.event_id.as_str()).collect::<Vec<_>>(), ["$a", "$m1", "$t"]);
    let newest_two = reader.get_room_events(ROOM, before, ids[2], 2).await?;
    assert_eq!(newest_two.iter().map(|e| e.event.event_id.as_str()).collect::<Vec<_>>(), ["$m1", "$t"]);

    let state = reader.get_current_state_ids(ROOM).await?;
    assert_eq!(state.len(), 2);
    assert_eq!(state.get(&("m.room.topic".to_owned(), String::new())).map(String::as_str), Some("$t"));
    assert_eq!(*reader.get_users_in_room(ROOM).await?, ["@alice:example.com"]);
    assert_eq!(*reader.get_rooms_for_user("@alice:example.com").await?, [ROOM]);
    assert!(reader.get_rooms_for_user("@bob:example.com").await?.is_empty());
    Ok(())
}

async fn catch_up_queries_cut_at_the_limit(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let before = writer.reader().events_stream().get_current_token();
    let ids = writer
        .persist_events(
            ROOM,
            &[
                member("$a", "@alice:example.com", "join"),
                message("$m1", "@alice:example.com"),
                message("$m2", "@alice:example.com"),
            ],
        )
        .await?;
    let reader = writer.reader();
    let current = reader.events_stream().get_current_token();

    let all = reader.get_events_updates("master", before, current, 10).await?;
    assert!(!all.limited);
    assert_eq!(all.token, current);
    // The member event yields its `ev` row and its `state` row at one token.
    assert_eq!(all.rows.len(), 4);
    assert_eq!(all.rows[0].0, ids[0]);
    assert!(
        matches!(&all.rows[1].1, EventsStreamRow::State(state) if state.state_key == "@alice:example.com")
    );

    let first = reader.get_events_updates("master", before, current, 2).await?;
    assert!(first.limited);
    assert_eq!(first.token, ids[1]);
    let rest = reader.get_events_updates("master", first.token, current, 2).await?;
    assert!(!rest.limited);
    assert_eq!(rest.rows.iter().map(|(token, _)| *token).collect::<Vec<_>>(), [ids[2]]);
    assert!(reader.get_events_updates("someone_else", before, current, 10).await?.rows.is_empty());
    Ok(())
}

async fn writes_invalidate_the_caches_they_make_stale(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let reader = writer.reader();
    writer.persist_events(ROOM, &[member("$a", "@alice:example.com", "join"), topic("$t1", "one")]).await?;
    // Fill every cache.
    let state = reader.get_current_state_ids(ROOM).await?;
    assert_eq!(*reader.get_users_in_room(ROOM).await?, ["@alice:example.com"]);
    assert!(reader.get_rooms_for_user("@bob:example.com").await?.is_empty());

    writer.persist_events(ROOM, &[member("$b", "@bob:example.com", "join"), topic("$t2", "two")]).await?;
    let fresh = reader.get_current_state_ids(ROOM).await?;
    assert_ne!(fresh, state, "get_current_state_ids was invalidated");
    assert_eq!(fresh.get(&("m.room.topic".to_owned(), String::new())).map(String::as_str), Some("$t2"));
    assert_eq!(*reader.get_users_in_room(ROOM).await?, ["@alice:example.com", "@bob:example.com"]);
    assert_eq!(*reader.get_rooms_for_user("@bob:example.com").await?, [ROOM]);

    writer.persist_events(ROOM, &[member("$c", "@alice:example.com", "leave")]).await?;
    assert_eq!(*reader.get_users_in_room(ROOM).await?, ["@bob:example.com"]);
    assert!(reader.get_rooms_for_user("@alice:example.com").await?.is_empty());

    // A message changes no state: the state caches keep serving hits.
    reader.get_current_state_ids(ROOM).await?;
    let hits_before = process.caches.registry().stats()["get_current_state_ids"].0.hits;
    writer.persist_events(ROOM, &[message("$m", "@bob:example.com")]).await?;
    reader.get_current_state_ids(ROOM).await?;
    assert_eq!(process.caches.registry().stats()["get_current_state_ids"].0.hits, hits_before + 1);
    Ok(())
}

async fn backfilled_events_count_down(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let ids = writer
        .persist_backfilled_events(
            ROOM,
            &[message("$old1", "@x:example.com"), message("$old2", "@x:example.com")],
        )
        .await?;
    assert!(ids.iter().all(|id| *id < 0), "{ids:?}");
    let reader = writer.reader();
    let current = reader.backfill_stream().get_current_token();
    assert_eq!(current, ids[1]);
    // On the wire the backfill stream's tokens are positive.
    let updates = reader.get_backfill_updates("master", 1, -current, 10).await?;
    assert_eq!(
        updates.rows.iter().map(|(token, row)| (*token, row.event_id.as_str())).collect::<Vec<_>>(),
        [(-ids[0], "$old1"), (-ids[1], "$old2")]
    );
    assert_eq!(reader.get_event("$old2").await?.map(|e| e.stream_ordering), Some(ids[1]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_applying_rows_serves_fresh_state() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master = start(&test_db.db, &deployment("master", &["master"])).await?;
    let worker_db = test_db.reconnect().await?;
    let worker = start(&worker_db, &deployment("worker1", &["master"])).await?;
    let writer = master.writer();
    writer.persist_events(ROOM, &[member("$a", "@alice:example.com", "join")]).await?;
    let reader = worker.reader();
    // The worker learns of the first batch by catching up.
    let events_from = reader.events_stream().get_current_token_for_writer("master");
    let caches_from = worker.caches.current_token("master");
    let current = writer.reader().events_stream().get_current_token_for_writer("master");
    let updates = reader.get_events_updates("master", events_from, current, 100).await?;
    for (token, row) in &updates.rows {
        reader.process_events_rows("master", *token, std::slice::from_ref(row));
    }
    assert_eq!(reader.events_stream().get_current_token_for_writer("master"), current);
    // Fill the worker's caches.
    assert_eq!(*reader.get_users_in_room(ROOM).await?, ["@alice:example.com"]);
    assert!(reader.get_rooms_for_user("@bob:example.com").await?.is_empty());
    let state_before = reader.get_current_state_ids(ROOM).await?;

    // Bob joins: one `caches` row, however many caches depend on the state.
    let caches_before = master.caches.current_token("master");
    writer.persist_events(ROOM, &[member("$b", "@bob:example.com", "join")]).await?;
    let caches_now = master.caches.current_token("master");
    let caches_rows =
        worker.caches.get_updates_since("master", caches_from.max(caches_before), caches_now, 100).await?;
    let pokes: Vec<&CachesRow> =
        caches_rows.rows.iter().map(|(_, row)| row).filter(|row| row.cache_func == "cs_cache_fake").collect();
    assert_eq!(pokes.len(), 1, "{caches_rows:?}");
    assert_eq!(pokes[0].keys.as_deref(), Some(&[ROOM.to_owned(), "@bob:example.com".to_owned()][..]));

    // The worker applies the caches rows: state, members and rooms per user are fresh.
    let token = caches_rows.token;
    let rows: Vec<CachesRow> = caches_rows.rows.into_iter().map(|(_, row)| row).collect();
    worker.caches.apply_rows("master", token, &rows);
    assert_ne!(reader.get_current_state_ids(ROOM).await?, state_before);
    assert_eq!(*reader.get_users_in_room(ROOM).await?, ["@alice:example.com", "@bob:example.com"]);
    assert_eq!(*reader.get_rooms_for_user("@bob:example.com").await?, [ROOM]);
    assert!(reader.state_changes().has_entity_changed(ROOM, caches_before));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_persist_into_one_stream_at_once() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let writers = ["persister1", "persister2"];
    let mut processes = Vec::new();
    for writer in writers {
        let db = test_db.reconnect().await?;
        processes.push(Arc::new(start(&db, &deployment(writer, &writers)).await?));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (index, process) in processes.iter().enumerate() {
        for task in 0..4 {
            let process = Arc::clone(process);
            tasks.spawn(async move {
                for n in 0..10 {
                    // Both writers also write into one shared room.
                    let room = if n % 2 == 0 {
                        "!shared:example.com".to_owned()
                    } else {
                        format!("!own{index}:example.com")
                    };
                    let user = format!("@u{index}_{task}_{n}:example.com");
                    process
                        .writer()
                        .persist_events(&room, &[member(&format!("$e{index}_{task}_{n}"), &user, "join")])
                        .await?;
                }
                Ok::<(), StoreError>(())
            });
        }
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let reader = processes[0].reader();
    let members = reader.get_users_in_room("!shared:example.com").await?;
    assert_eq!(members.len(), 40, "every join from both writers is in the room's current state");
    let count: i64 = test_db
        .db
        .run_autocommit("count", |txn| {
            Box::pin(async move {
                txn.query_one("SELECT COUNT(DISTINCT stream_ordering) FROM events", &[]).await?.get(0)
            })
        })
        .await?;
    assert_eq!(count, 80);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_rows_invalidate_the_worker_caches_before_advancing() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master = start(&test_db.db, &deployment("master", &["master"])).await?;
    let worker_db = test_db.reconnect().await?;
    let worker = start(&worker_db, &deployment("worker1", &["master"])).await?;
    let writer = master.writer();
    writer
        .persist_events(
            ROOM,
            &[member("$a", "@alice:example.com", "join"), message("$m", "@alice:example.com")],
        )
        .await?;
    let reader = worker.reader();
    // The worker fills its caches (it reads the database directly).
    reader.get_event("$m").await?.ok_or("persisted")?;
    assert_eq!(*reader.get_users_in_room(ROOM).await?, ["@alice:example.com"]);
    assert!(reader.get_rooms_for_user("@bob:example.com").await?.is_empty());

    let from = reader.events_stream().get_current_token_for_writer("master");
    writer.persist_events(ROOM, &[member("$b", "@bob:example.com", "join")]).await?;
    let to = writer.reader().events_stream().get_current_token_for_writer("master");
    let updates = reader.get_events_updates("master", from, to, 100).await?;
    // Replay the `ev` row of an event the worker has cached too, as a redaction
    // would: the entry must go.
    let mut rows: Vec<EventsStreamRow> = updates.rows.iter().map(|(_, row)| row.clone()).collect();
    if let EventsStreamRow::Event(row) = rows[0].clone() {
        rows.push(EventsStreamRow::Event(store_events::rows::EventRow { event_id: "$m".to_owned(), ..row }));
    }
    let misses = worker.caches.registry().stats()["get_event"].0.misses;
    reader.process_events_rows("master", updates.token, &rows);
    assert_eq!(reader.events_stream().get_current_token_for_writer("master"), to);
    reader.get_event("$m").await?;
    assert_eq!(
        worker.caches.registry().stats()["get_event"].0.misses,
        misses + 1,
        "get_event was invalidated"
    );
    assert_eq!(*reader.get_users_in_room(ROOM).await?, ["@alice:example.com", "@bob:example.com"]);
    assert_eq!(*reader.get_rooms_for_user("@bob:example.com").await?, [ROOM]);
    assert!(reader.membership_changes().has_entity_changed("@bob:example.com", from));
    assert!(reader.room_changes().has_entity_changed(ROOM, from));

    // `state-all` resets what depends on all of a room's state.
    reader.process_events_rows("master", to, &[EventsStreamRow::StateAll { room_id: ROOM.to_owned() }]);
    assert!(reader.membership_changes().has_entity_changed("@anyone:example.com", to - 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_caches_know_rows_above_the_current_token_at_start_up() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let writers = ["persister1", "persister2"];
    let first = start(&test_db.reconnect().await?, &deployment("persister1", &writers)).await?;
    let second = start(&test_db.reconnect().await?, &deployment("persister2", &writers)).await?;
    // persister1 holds an ID in flight; persister2 writes past it.
    let held = first.reader().events_stream().get_next().await?;
    second.writer().persist_events(ROOM, &[member("$b", "@b:example.com", "join")]).await?;

    let worker = start(&test_db.reconnect().await?, &deployment("worker1", &writers)).await?;
    let reader = worker.reader();
    let current = reader.events_stream().get_current_token();
    assert!(current < held.id(), "the stream's token stays below the ID in flight");
    assert!(
        reader.room_changes().has_entity_changed(ROOM, current),
        "the room's row above the token is known"
    );
    assert!(reader.membership_changes().has_entity_changed("@b:example.com", current));
    assert!(reader.state_changes().has_entity_changed(ROOM, current));
    drop(held);
    Ok(())
}

/// The catch-up's `ev` rows carry each event's membership as its content gives
/// it, whether the writer recorded one (a member state event) or not (invalid
/// content, a member event without a state key, other events).
async fn catch_up_rows_carry_the_membership_the_content_gives(test_db: TestDb) -> TestResult {
    let process = start(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = process.writer();
    let before = writer.reader().events_stream().get_current_token();
    let with_content = |id: &str, event_type: &str, state_key: Option<&str>, content: &str| NewEvent {
        event_id: id.to_owned(),
        event_type: event_type.to_owned(),
        state_key: state_key.map(str::to_owned),
        sender: "@alice:example.com".to_owned(),
        origin_server_ts: 4,
        content: content.to_owned(),
    };
    let cases = [
        (member("$join", "@alice:example.com", "join"), Some("join")),
        (member("$invite", "@bob:example.com", "invite"), Some("invite")),
        (member("$ban", "@carol:example.com", "ban"), Some("ban")),
        (member("$leave", "@bob:example.com", "leave"), Some("leave")),
        (with_content("$missing", "m.room.member", Some("@dan:example.com"), "{}"), None),
        (with_content("$invalid", "m.room.member", Some("@erin:example.com"), "{not json"), None),
        (with_content("$number", "m.room.member", Some("@erin:example.com"), r#"{"membership":5}"#), None),
        (with_content("$stateless", "m.room.member", None, r#"{"membership":"join"}"#), Some("join")),
        (with_content("$other", "m.room.topic", Some(""), r#"{"membership":"join"}"#), None),
        (message("$m", "@alice:example.com"), None),
    ];
    let events: Vec<NewEvent> = cases.iter().map(|(event, _)| event.clone()).collect();
    writer.persist_events(ROOM, &events).await?;
    let reader = writer.reader();
    let current = reader.events_stream().get_current_token();

    let updates = reader.get_events_updates("master", before, current, 100).await?;
    let memberships: Vec<(&str, Option<&str>)> = updates
        .rows
        .iter()
        .filter_map(|(_, row)| match row {
            EventsStreamRow::Event(event) => Some((event.event_id.as_str(), event.membership.as_deref())),
            _ => None,
        })
        .collect();
    let expected: Vec<(&str, Option<&str>)> =
        cases.iter().map(|(event, membership)| (event.event_id.as_str(), *membership)).collect();
    assert_eq!(memberships, expected);
    // The same as each event, read back, gives through either reading.
    for (event, membership) in &cases {
        assert_eq!(event.membership().as_deref(), *membership, "{}", event.event_id);
        let read = reader.get_event(&event.event_id).await?.ok_or("persisted")?;
        assert_eq!(read.membership(), *membership, "{}", event.event_id);
        assert_eq!(read.event.membership().as_deref(), *membership, "{}", event.event_id);
    }
    Ok(())
}

/// The fence of elastic writers: a change of the writers of `events` waits for
/// the write in flight (slowed inside its COMMIT), records where its writer
/// stood, and a write the old writer routes by the old epoch afterwards is
/// refused as moved instead of committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_writers_waits_for_the_write_in_flight_and_fences_the_old_epoch() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master: Arc<EventsReader> =
        Arc::new(store_core::build_store::<EventsReader>(&test_db.db, &deployment("master", &["p1"])).await?);
    let p1_db = test_db.reconnect().await?;
    let p1 = store_core::build_store::<EventsWriter>(&p1_db, &deployment("p1", &["p1"])).await?;
    store_core::record_http_address(&test_db.db, "p2", "127.0.0.1:1").await?;
    let alice = "@alice:example.com";
    p1.persist_events_for_txn(ROOM, &[member("$a", alice, "join")], None).await?;

    let faults = store_test_support::CommitFaults::connect(&test_db.url).await?;
    faults.make_commits_slow("events", "INSERT", 1.0).await?;
    let slow = tokio::spawn(p1.persist_events_for_txn(ROOM, &[message("$slow", alice)], None));
    faults.wait_for_sleeping_commit().await?;
    let stream: Arc<dyn store_core::Stream> = Arc::new(store_events::EventsStream(Arc::clone(&master)));
    let epoch =
        store_core::writers::change_stream_writers(&test_db.db, None, stream, vec!["p2".to_owned()]).await?;
    assert_eq!(epoch, 2);
    // The change waited for the write in flight, which committed.
    assert!(slow.is_finished(), "the change returned while a write of the old epoch was in flight");
    let Persisted::Events(orderings) = slow.await?? else { panic!("the slow write persisted nothing") };
    let sets = store_core::writers::read_writer_sets(&test_db.db).await?;
    let set = sets.get("events").ok_or("a record of events")?;
    assert_eq!(set.writers(), ["p2"]);
    assert_eq!(set.draining.get("p1"), Some(&orderings[0]), "p1 drains at its last write: {set:?}");
    assert_eq!(set.handover.get("p1"), Some(&orderings[0]));

    // p1 still goes by epoch 1: its next write is fenced off.
    let refused = p1.persist_events_for_txn(ROOM, &[message("$late", alice)], None).await;
    assert!(refused.as_ref().is_err_and(StoreError::is_moved), "{refused:?}");
    assert!(master.get_event("$late").await?.is_none());
    Ok(())
}

/// Applying an epoch reaches every writer's handover position even when
/// replication brought nothing: the worker reads the rest from the database,
/// applies it (its caches with it), then retires the writer taken out and
/// follows the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_an_epoch_reaches_the_handover_positions_from_the_database() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master: Arc<EventsReader> =
        Arc::new(store_core::build_store::<EventsReader>(&test_db.db, &deployment("master", &["p1"])).await?);
    let p1_db = test_db.reconnect().await?;
    let p1 = store_core::build_store::<EventsWriter>(&p1_db, &deployment("p1", &["p1"])).await?;
    let worker_db = test_db.reconnect().await?;
    let worker =
        Arc::new(store_core::build_store::<EventsReader>(&worker_db, &deployment("w", &["p1"])).await?);
    assert!(worker.get_users_in_room(ROOM).await?.is_empty());
    let alice = "@alice:example.com";
    let orderings = p1.persist_events(ROOM, &[member("$a", alice, "join"), message("$m", alice)]).await?;

    store_core::record_http_address(&test_db.db, "p2", "127.0.0.1:1").await?;
    let stream: Arc<dyn store_core::Stream> = Arc::new(store_events::EventsStream(Arc::clone(&master)));
    store_core::writers::change_stream_writers(&test_db.db, None, stream, vec!["p2".to_owned()]).await?;
    let sets = store_core::writers::read_writer_sets(&test_db.db).await?;
    let set = sets.get("events").ok_or("a record of events")?;

    let followed = store_events::EventsStream(Arc::clone(&worker));
    store_core::writers::apply_epoch("w", set, &followed, &[]).await?;
    let generator = worker.events_stream();
    assert!(generator.get_current_token() >= orderings[1], "{generator:?}");
    assert_eq!(*worker.get_users_in_room(ROOM).await?, [alice.to_owned()]);
    assert!(generator.is_retired("p1") && !generator.is_writer("p1"));
    assert!(generator.is_writer("p2"));
    // A token naming p1 is counted at its final position.
    assert!(generator.get_current_token_for_writer("p1") >= orderings[1]);
    Ok(())
}
