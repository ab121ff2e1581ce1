//! One read-conformance suite for every composition: [`reads`] asks a store,
//! through the read mixins only, everything a handler reads about events,
//! current state, memberships, receipts and account data, with their caches
//! and change caches; the scenario writes on the master and asks the master
//! and a worker fed only by replication, which must give the same answers,
//! equal to the expected ones, before and after a later write that the first
//! reads cached.
//!
//! A third process that moves its positions without applying the rows (a
//! follower that skips invalidation) must give other answers: the negative
//! control that shows the comparison can fail.

use std::collections::BTreeMap;

use serde_json::json;
use slaved_stores::prelude::*;
use slaved_stores::{DataStore, WorkerStore};
use store_account_data::AccountDataMap;
use store_core::{StoreError, StoreSettings, build_store};
use store_events::{NewEvent, StateMap};
use store_receipts::ReceiptRow;
use store_test_support::{TestDb, TestResult, engine_tests};

use super::follow;

const ROOM: &str = "!conformance:test";
const OTHER_ROOM: &str = "!other:test";
/// Never written: every change cache must say it did not change.
const QUIET_ROOM: &str = "!quiet:test";
const ROOMS: [&str; 3] = [ROOM, OTHER_ROOM, QUIET_ROOM];

const ALICE: &str = "@alice:test";
const BOB: &str = "@bob:test";
const CAROL: &str = "@carol:test";
/// Never written.
const DAVE: &str = "@dave:test";
const USERS: [&str; 4] = [ALICE, BOB, CAROL, DAVE];

/// Every event the scenario writes, in both phases, and one never written.
const EVENT_IDS: [&str; 13] = [
    "$create",
    "$join-alice",
    "$join-bob",
    "$join-carol",
    "$topic-1",
    "$m1",
    "$other-create",
    "$other-join-alice",
    "$topic-2",
    "$m2",
    "$leave-carol",
    "$m3",
    "$never-written",
];

const RECEIPT_TYPES: [&str; 2] = ["m.read", "m.read.private"];

/// A process's positions on the streams the suite reads: what a client holds
/// as a `since` token, and what each process reads up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tokens {
    events: i64,
    receipts: i64,
    account_data: i64,
}

fn tokens(store: &(impl EventsStore + ReceiptsStore + AccountDataStore + ?Sized)) -> Tokens {
    Tokens {
        events: store.events().events_stream().get_current_token(),
        receipts: store.receipts().stream().get_current_token(),
        account_data: store.account_data().stream().get_current_token(),
    }
}

/// An event as read: its fields, compared whole.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadEvent {
    stream_ordering: i64,
    instance_name: String,
    room_id: String,
    event: NewEvent,
}

/// What one change cache answers about a `since` token.
#[derive(Debug, PartialEq, Eq)]
struct ChangeAnswers {
    /// `get_entities_changed` of the probed rooms or users.
    probed: Vec<String>,
    /// `has_entity_changed` of each probed room or user.
    each: Vec<bool>,
    /// `has_any_entity_changed`.
    any: bool,
    /// `get_all_entities_changed`, oldest change first.
    all: Option<Vec<String>>,
}

/// Everything [`reads`] asks a store.
#[derive(Debug, PartialEq, Eq)]
struct Reads {
    positions: Tokens,
    events: BTreeMap<String, Option<ReadEvent>>,
    /// Per `since`: the IDs of `ROOM`'s events after it, up to the store's own position.
    room_events: Vec<Vec<String>>,
    current_state: BTreeMap<String, StateMap>,
    users_in_room: BTreeMap<String, Vec<String>>,
    rooms_for_user: BTreeMap<String, Vec<String>>,
    /// User → (room, membership, stream ordering), oldest first.
    memberships: BTreeMap<String, Vec<(String, String, i64)>>,
    /// The topic's history in `ROOM`, newest first.
    topic_history: Vec<String>,
    /// Receipt type → `ROOM`'s current receipts of that type.
    receipts: BTreeMap<String, Vec<ReceiptRow>>,
    /// User → the event of their last unthreaded `m.read` in `ROOM`.
    last_read: BTreeMap<String, Option<String>>,
    /// Per `since`: the receipts of every room after it.
    receipts_since: Vec<Vec<ReceiptRow>>,
    global_account_data: BTreeMap<String, AccountDataMap>,
    room_account_data: BTreeMap<(String, String), AccountDataMap>,
    /// Per `since`: change cache name → its answers.
    changes: Vec<BTreeMap<&'static str, ChangeAnswers>>,
}

/// The read suite: asks `store` everything, through the read mixins only, so
/// it cannot tell a master from a worker. Reads up to the store's own
/// positions; `since` are the tokens a client would hold.
async fn reads<S>(store: &S, since: &[Tokens]) -> Result<Reads, StoreError>
where
    S: EventsStore + ReceiptsStore + AccountDataStore + ?Sized,
{
    let (events, receipts, account_data) = (store.events(), store.receipts(), store.account_data());
    let positions = tokens(store);
    let mut read = Reads {
        positions,
        events: BTreeMap::new(),
        room_events: Vec::new(),
        current_state: BTreeMap::new(),
        users_in_room: BTreeMap::new(),
        rooms_for_user: BTreeMap::new(),
        memberships: BTreeMap::new(),
        topic_history: Vec::new(),
        receipts: BTreeMap::new(),
        last_read: BTreeMap::new(),
        receipts_since: Vec::new(),
        global_account_data: BTreeMap::new(),
        room_account_data: BTreeMap::new(),
        changes: Vec::new(),
    };
    for event_id in EVENT_IDS {
        let event = events.get_event(event_id).await?;
        let event = event.map(|event| ReadEvent {
            stream_ordering: event.stream_ordering,
            instance_name: event.instance_name.clone(),
            room_id: event.room_id.clone(),
            event: event.event.clone(),
        });
        read.events.insert(event_id.to_owned(), event);
    }
    for room in ROOMS {
        read.current_state.insert(room.to_owned(), (*events.get_current_state_ids(room).await?).clone());
        read.users_in_room.insert(room.to_owned(), (*events.get_users_in_room(room).await?).clone());
    }
    for user in USERS {
        read.rooms_for_user.insert(user.to_owned(), (*events.get_rooms_for_user(user).await?).clone());
        let history = events.get_membership_history(user).await?;
        let history = history.into_iter().map(|m| (m.room_id, m.membership, m.stream_ordering)).collect();
        read.memberships.insert(user.to_owned(), history);
        read.last_read.insert(
            user.to_owned(),
            receipts.get_last_receipt_event_id_for_user(user, ROOM, "m.read").await?,
        );
        let global = account_data.get_global_account_data_for_user(user).await?;
        read.global_account_data.insert(user.to_owned(), (*global).clone());
        for room in [ROOM, OTHER_ROOM] {
            let in_room = account_data.get_room_account_data_for_user(user, room).await?;
            read.room_account_data.insert((user.to_owned(), room.to_owned()), (*in_room).clone());
        }
    }
    let topics = events.get_state_history(ROOM, "m.room.topic", "", 10).await?;
    read.topic_history = topics.into_iter().map(|event| event.event.event_id).collect();
    for receipt_type in RECEIPT_TYPES {
        let current = receipts.get_receipts_for_room(ROOM, receipt_type).await?;
        read.receipts.insert(receipt_type.to_owned(), (*current).clone());
    }
    for since in since {
        let in_room = events.get_room_events(ROOM, since.events, positions.events, 100).await?;
        read.room_events.push(in_room.into_iter().map(|event| event.event.event_id).collect());
        read.receipts_since
            .push(receipts.get_receipts_for_rooms_since(&ROOMS, since.receipts, positions.receipts).await?);
        read.changes.push(BTreeMap::from([
            ("events_room_changes", answers(events.room_changes(), &ROOMS, since.events)),
            ("current_state_changes", answers(events.state_changes(), &ROOMS, since.events)),
            ("membership_changes", answers(events.membership_changes(), &USERS, since.events)),
            ("receipts_room_changes", answers(receipts.room_changes(), &ROOMS, since.receipts)),
            ("account_data_user_changes", answers(account_data.user_changes(), &USERS, since.account_data)),
        ]));
    }
    Ok(read)
}

fn answers(cache: &store_core::StreamChangeCache, probed: &[&str], since: i64) -> ChangeAnswers {
    ChangeAnswers {
        probed: cache.get_entities_changed(probed, since).into_iter().map(str::to_owned).collect(),
        each: probed.iter().map(|entity| cache.has_entity_changed(entity, since)).collect(),
        any: cache.has_any_entity_changed(since),
        all: cache.get_all_entities_changed(since),
    }
}

/// What the master wrote, to build the expected answers from.
#[derive(Debug, Default)]
struct Written {
    events: Vec<ReadEvent>,
}

impl Written {
    async fn persist(&mut self, master: &DataStore, room: &str, events: Vec<NewEvent>) -> TestResult {
        let writer = master.events_writer().ok_or("the master writes events")?;
        let orderings = writer.persist_events(room, &events).await?;
        for (event, stream_ordering) in events.into_iter().zip(orderings) {
            let room_id = room.to_owned();
            self.events.push(ReadEvent {
                stream_ordering,
                instance_name: "master".to_owned(),
                room_id,
                event,
            });
        }
        Ok(())
    }

    fn ordering(&self, event_id: &str) -> i64 {
        let event = self.events.iter().find(|event| event.event.event_id == event_id);
        event.expect("the scenario wrote it").stream_ordering
    }

    /// The answers of a store that has read everything written so far.
    fn expected(&self, positions: Tokens, facts: Facts<'_>) -> Reads {
        let owned = |names: &[&str]| names.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>();
        let events = EVENT_IDS
            .iter()
            .map(|id| {
                let event = self.events.iter().find(|event| event.event.event_id == *id).cloned();
                ((*id).to_owned(), event)
            })
            .collect();
        let state = |entries: &[(&str, &str, &str)]| -> StateMap {
            entries
                .iter()
                .map(|(ty, key, id)| (((*ty).to_owned(), (*key).to_owned()), (*id).to_owned()))
                .collect()
        };
        let membership = |room: &str, membership: &str, event_id: &str| {
            (room.to_owned(), membership.to_owned(), self.ordering(event_id))
        };
        let mut memberships = BTreeMap::new();
        for user in USERS {
            let history = facts.memberships.iter().filter(|(who, ..)| *who == user);
            let history = history.map(|(_, room, kind, id)| membership(room, kind, id)).collect();
            memberships.insert(user.to_owned(), history);
        }
        Reads {
            positions,
            events,
            room_events: facts.room_events.iter().map(|ids| owned(ids)).collect(),
            current_state: BTreeMap::from([
                (ROOM.to_owned(), state(facts.room_state)),
                (OTHER_ROOM.to_owned(), state(&OTHER_ROOM_STATE)),
                (QUIET_ROOM.to_owned(), StateMap::new()),
            ]),
            users_in_room: BTreeMap::from([
                (ROOM.to_owned(), owned(facts.members)),
                (OTHER_ROOM.to_owned(), owned(&[ALICE])),
                (QUIET_ROOM.to_owned(), Vec::new()),
            ]),
            rooms_for_user: USERS
                .iter()
                .map(|user| {
                    let rooms = facts.rooms_for_user.iter().filter(|(who, _)| who == user);
                    ((*user).to_owned(), rooms.map(|(_, room)| (*room).to_owned()).collect())
                })
                .collect(),
            memberships,
            topic_history: owned(facts.topic_history),
            receipts: RECEIPT_TYPES
                .iter()
                .map(|ty| {
                    let of_type = facts.receipts.iter().filter(|receipt| receipt.receipt_type == *ty);
                    ((*ty).to_owned(), of_type.cloned().collect())
                })
                .collect(),
            last_read: USERS
                .iter()
                .map(|user| {
                    let last = facts.last_read.iter().find(|(who, _)| who == user);
                    ((*user).to_owned(), last.map(|(_, event_id)| (*event_id).to_owned()))
                })
                .collect(),
            receipts_since: facts.receipts_since.to_vec(),
            global_account_data: facts.global_account_data.clone(),
            room_account_data: facts.room_account_data.clone(),
            changes: facts
                .changes
                .iter()
                .map(|by_cache| {
                    by_cache
                        .iter()
                        .map(|(cache, probed, changed, all)| {
                            let answers = ChangeAnswers {
                                probed: owned(changed),
                                each: probed.iter().map(|entity| changed.contains(entity)).collect(),
                                any: !all.is_empty(),
                                all: Some(owned(all)),
                            };
                            (*cache, answers)
                        })
                        .collect()
                })
                .collect(),
        }
    }
}

const OTHER_ROOM_STATE: [(&str, &str, &str); 2] =
    [("m.room.create", "", "$other-create"), ("m.room.member", ALICE, "$other-join-alice")];

/// (cache, probed entities, those changed, every change oldest first).
type ExpectedChange<'a> = (&'static str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);

/// The facts of one phase, as the scenario knows them.
struct Facts<'a> {
    room_state: &'a [(&'a str, &'a str, &'a str)],
    members: &'a [&'a str],
    rooms_for_user: &'a [(&'a str, &'a str)],
    /// (user, room, membership, event ID), oldest first.
    memberships: &'a [(&'a str, &'a str, &'a str, &'a str)],
    topic_history: &'a [&'a str],
    room_events: &'a [&'a [&'a str]],
    /// `ROOM`'s current receipts, sorted by user and thread.
    receipts: &'a [ReceiptRow],
    last_read: &'a [(&'a str, &'a str)],
    receipts_since: &'a [Vec<ReceiptRow>],
    global_account_data: &'a BTreeMap<String, AccountDataMap>,
    room_account_data: &'a BTreeMap<(String, String), AccountDataMap>,
    changes: &'a [Vec<ExpectedChange<'a>>],
}

fn state_event(
    event_id: &str,
    event_type: &str,
    state_key: &str,
    sender: &str,
    content: serde_json::Value,
) -> NewEvent {
    NewEvent {
        event_id: event_id.to_owned(),
        event_type: event_type.to_owned(),
        state_key: Some(state_key.to_owned()),
        sender: sender.to_owned(),
        origin_server_ts: 1,
        content: content.to_string(),
    }
}

fn member(event_id: &str, user: &str, membership: &str) -> NewEvent {
    state_event(event_id, "m.room.member", user, user, json!({"membership": membership}))
}

fn message(event_id: &str, sender: &str, body: &str) -> NewEvent {
    NewEvent {
        event_id: event_id.to_owned(),
        event_type: "m.room.message".to_owned(),
        state_key: None,
        sender: sender.to_owned(),
        origin_server_ts: 2,
        content: json!({"msgtype": "m.text", "body": body}).to_string(),
    }
}

fn receipt(user: &str, receipt_type: &str, thread: Option<&str>, event_id: &str, ts: i64) -> ReceiptRow {
    ReceiptRow {
        room_id: ROOM.to_owned(),
        receipt_type: receipt_type.to_owned(),
        user_id: user.to_owned(),
        event_id: event_id.to_owned(),
        thread_id: thread.map(str::to_owned),
        data: json!({"ts": ts}),
    }
}

async fn write_receipts(master: &DataStore, receipts: &[&ReceiptRow]) -> TestResult {
    let writer = master.receipts_writer().ok_or("the master writes receipts")?;
    for receipt in receipts {
        writer.insert_receipt(receipt).await?;
    }
    Ok(())
}

async fn write_account_data(
    master: &DataStore,
    data: &[(&str, Option<&str>, &str, serde_json::Value)],
) -> TestResult {
    let writer = master.account_data_writer().ok_or("the master writes account data")?;
    for (user, room, data_type, content) in data {
        writer.add_account_data(user, *room, data_type, content).await?;
    }
    Ok(())
}

fn account_data(entries: &[(&str, serde_json::Value)]) -> AccountDataMap {
    entries.iter().map(|(data_type, content)| ((*data_type).to_owned(), content.clone())).collect()
}

/// Moves a process's positions to the master's without applying a row: a
/// follower that skips invalidation, for the negative control.
fn advance_without_applying(lazy: &WorkerStore, master: &DataStore) {
    let followed = lazy.replication_streams();
    for stream in master.written_streams() {
        if let Some(lazy_stream) = followed.get(stream.name()) {
            lazy_stream.advance("master", stream.current_token("master"));
        }
    }
}

engine_tests!(master_and_replicated_worker_read_the_same);

async fn master_and_replicated_worker_read_the_same(test_db: TestDb) -> TestResult {
    // A deployment of several processes, not `single_process()`: a master
    // alone would not record its cache invalidations for the others.
    let master: DataStore = build_store(&test_db.db, &StoreSettings::in_deployment("master")).await?;
    let worker: WorkerStore =
        build_store(&test_db.reconnect().await?, &StoreSettings::in_deployment("worker1")).await?;
    let lazy: WorkerStore =
        build_store(&test_db.reconnect().await?, &StoreSettings::in_deployment("worker2")).await?;
    let t0 = tokens(&master);
    let mut written = Written::default();

    // Phase 1: a room with state and messages, another room, receipts, account data.
    let create = |id: &str| state_event(id, "m.room.create", "", ALICE, json!({"creator": ALICE}));
    let topic = |id: &str, text: &str| state_event(id, "m.room.topic", "", ALICE, json!({"topic": text}));
    written
        .persist(
            &master,
            ROOM,
            vec![
                create("$create"),
                member("$join-alice", ALICE, "join"),
                member("$join-bob", BOB, "join"),
                member("$join-carol", CAROL, "join"),
                topic("$topic-1", "first"),
                message("$m1", ALICE, "hello"),
            ],
        )
        .await?;
    written
        .persist(
            &master,
            OTHER_ROOM,
            vec![create("$other-create"), member("$other-join-alice", ALICE, "join")],
        )
        .await?;
    let alice_read_m1 = receipt(ALICE, "m.read", None, "$m1", 1);
    let bob_read = receipt(BOB, "m.read", None, "$join-carol", 2);
    let bob_thread_m1 = receipt(BOB, "m.read", Some("$m1"), "$m1", 3);
    let carol_private = receipt(CAROL, "m.read.private", None, "$m1", 4);
    write_receipts(&master, &[&alice_read_m1, &bob_read, &bob_thread_m1, &carol_private]).await?;
    write_account_data(
        &master,
        &[
            (ALICE, None, "m.push_rules", json!({"v": 1})),
            (ALICE, None, "m.direct", json!({BOB: [ROOM]})),
            (ALICE, Some(ROOM), "m.tag", json!({"tags": {}})),
            (BOB, None, "m.push_rules", json!({"v": 1})),
        ],
    )
    .await?;
    let t1 = tokens(&master);
    assert!(t1.events > t0.events && t1.receipts > t0.receipts && t1.account_data > t0.account_data);

    let room_state_1 = [
        ("m.room.create", "", "$create"),
        ("m.room.member", ALICE, "$join-alice"),
        ("m.room.member", BOB, "$join-bob"),
        ("m.room.member", CAROL, "$join-carol"),
        ("m.room.topic", "", "$topic-1"),
    ];
    let global_1 = BTreeMap::from([
        (
            ALICE.to_owned(),
            account_data(&[("m.push_rules", json!({"v": 1})), ("m.direct", json!({BOB: [ROOM]}))]),
        ),
        (BOB.to_owned(), account_data(&[("m.push_rules", json!({"v": 1}))])),
        (CAROL.to_owned(), AccountDataMap::new()),
        (DAVE.to_owned(), AccountDataMap::new()),
    ]);
    let mut room_data_1: BTreeMap<(String, String), AccountDataMap> = USERS
        .iter()
        .flat_map(|user| {
            [ROOM, OTHER_ROOM].map(|room| (((*user).to_owned(), room.to_owned()), AccountDataMap::new()))
        })
        .collect();
    room_data_1.insert((ALICE.to_owned(), ROOM.to_owned()), account_data(&[("m.tag", json!({"tags": {}}))]));
    let phase_1_events: &[&str] = &["$create", "$join-alice", "$join-bob", "$join-carol", "$topic-1", "$m1"];
    let expected_1 = written.expected(
        t1,
        Facts {
            room_state: &room_state_1,
            members: &[ALICE, BOB, CAROL],
            rooms_for_user: &[(ALICE, ROOM), (ALICE, OTHER_ROOM), (BOB, ROOM), (CAROL, ROOM)],
            memberships: &[
                (ALICE, ROOM, "join", "$join-alice"),
                (ALICE, OTHER_ROOM, "join", "$other-join-alice"),
                (BOB, ROOM, "join", "$join-bob"),
                (CAROL, ROOM, "join", "$join-carol"),
            ],
            topic_history: &["$topic-1"],
            room_events: &[phase_1_events, &[]],
            receipts: &[
                alice_read_m1.clone(),
                bob_read.clone(),
                bob_thread_m1.clone(),
                carol_private.clone(),
            ],
            last_read: &[(ALICE, "$m1"), (BOB, "$join-carol")],
            receipts_since: &[
                vec![alice_read_m1.clone(), bob_read.clone(), bob_thread_m1.clone(), carol_private.clone()],
                Vec::new(),
            ],
            global_account_data: &global_1,
            room_account_data: &room_data_1,
            changes: &[
                vec![
                    ("events_room_changes", &ROOMS, &[ROOM, OTHER_ROOM], &[ROOM, OTHER_ROOM]),
                    ("current_state_changes", &ROOMS, &[ROOM, OTHER_ROOM], &[ROOM, OTHER_ROOM]),
                    ("membership_changes", &USERS, &[ALICE, BOB, CAROL], &[BOB, CAROL, ALICE]),
                    ("receipts_room_changes", &ROOMS, &[ROOM], &[ROOM]),
                    ("account_data_user_changes", &USERS, &[ALICE, BOB], &[ALICE, BOB]),
                ],
                vec![
                    ("events_room_changes", &ROOMS, &[], &[]),
                    ("current_state_changes", &ROOMS, &[], &[]),
                    ("membership_changes", &USERS, &[], &[]),
                    ("receipts_room_changes", &ROOMS, &[], &[]),
                    ("account_data_user_changes", &USERS, &[], &[]),
                ],
            ],
        },
    );

    follow(&worker, &master).await?;
    advance_without_applying(&lazy, &master);
    // These reads fill every cache of both processes.
    let master_1 = reads(&master, &[t0, t1]).await?;
    let worker_1 = reads(&worker, &[t0, t1]).await?;
    assert_eq!(master_1, expected_1, "the master's answers after phase 1");
    assert_eq!(worker_1, master_1, "the worker answers as the master after phase 1");
    reads(&lazy, &[t0, t1]).await?;

    // Phase 2: the topic changes, a member leaves, receipts and account data
    // are replaced: each makes something the first reads cached stale.
    written
        .persist(
            &master,
            ROOM,
            vec![
                topic("$topic-2", "second"),
                message("$m2", BOB, "again"),
                member("$leave-carol", CAROL, "leave"),
            ],
        )
        .await?;
    written.persist(&master, ROOM, vec![message("$m3", ALICE, "third")]).await?;
    let alice_read_m2 = receipt(ALICE, "m.read", None, "$m2", 5);
    let bob_thread_m3 = receipt(BOB, "m.read", Some("$m1"), "$m3", 6);
    write_receipts(&master, &[&alice_read_m2, &bob_thread_m3]).await?;
    write_account_data(
        &master,
        &[
            (ALICE, None, "m.push_rules", json!({"v": 2})),
            (ALICE, Some(ROOM), "m.tag", json!({"tags": {"u.work": {}}})),
            (ALICE, Some(OTHER_ROOM), "m.fully_read", json!({"event_id": "$other-join-alice"})),
        ],
    )
    .await?;
    let t2 = tokens(&master);

    // Until it follows, the worker's caches answer as before: the reads above
    // did fill them, so what follows tests their invalidation.
    let before_following = reads(&worker, &[t0, t1]).await?;
    assert_eq!(before_following.positions, t1);
    assert_eq!(before_following.current_state, expected_1.current_state);
    assert_eq!(before_following.users_in_room, expected_1.users_in_room);
    assert_eq!(before_following.rooms_for_user, expected_1.rooms_for_user);
    assert_eq!(before_following.receipts, expected_1.receipts);
    assert_eq!(before_following.last_read, expected_1.last_read);
    assert_eq!(before_following.global_account_data, expected_1.global_account_data);
    assert_eq!(before_following.room_account_data, expected_1.room_account_data);

    let room_state_2 = [
        ("m.room.create", "", "$create"),
        ("m.room.member", ALICE, "$join-alice"),
        ("m.room.member", BOB, "$join-bob"),
        ("m.room.member", CAROL, "$leave-carol"),
        ("m.room.topic", "", "$topic-2"),
    ];
    let mut global_2 = global_1.clone();
    global_2.insert(
        ALICE.to_owned(),
        account_data(&[("m.push_rules", json!({"v": 2})), ("m.direct", json!({BOB: [ROOM]}))]),
    );
    let mut room_data_2 = room_data_1.clone();
    room_data_2.insert(
        (ALICE.to_owned(), ROOM.to_owned()),
        account_data(&[("m.tag", json!({"tags": {"u.work": {}}}))]),
    );
    room_data_2.insert(
        (ALICE.to_owned(), OTHER_ROOM.to_owned()),
        account_data(&[("m.fully_read", json!({"event_id": "$other-join-alice"}))]),
    );
    let phase_2_events: &[&str] = &["$topic-2", "$m2", "$leave-carol", "$m3"];
    let every_event: Vec<&str> = phase_1_events.iter().chain(phase_2_events).copied().collect();
    let expected_2 = written.expected(
        t2,
        Facts {
            room_state: &room_state_2,
            members: &[ALICE, BOB],
            rooms_for_user: &[(ALICE, ROOM), (ALICE, OTHER_ROOM), (BOB, ROOM)],
            memberships: &[
                (ALICE, ROOM, "join", "$join-alice"),
                (ALICE, OTHER_ROOM, "join", "$other-join-alice"),
                (BOB, ROOM, "join", "$join-bob"),
                (CAROL, ROOM, "join", "$join-carol"),
                (CAROL, ROOM, "leave", "$leave-carol"),
            ],
            topic_history: &["$topic-2", "$topic-1"],
            room_events: &[&every_event, phase_2_events, &[]],
            receipts: &[
                alice_read_m2.clone(),
                bob_read.clone(),
                bob_thread_m3.clone(),
                carol_private.clone(),
            ],
            last_read: &[(ALICE, "$m2"), (BOB, "$join-carol")],
            receipts_since: &[
                vec![bob_read.clone(), carol_private.clone(), alice_read_m2.clone(), bob_thread_m3.clone()],
                vec![alice_read_m2.clone(), bob_thread_m3.clone()],
                Vec::new(),
            ],
            global_account_data: &global_2,
            room_account_data: &room_data_2,
            changes: &[
                vec![
                    ("events_room_changes", &ROOMS, &[ROOM, OTHER_ROOM], &[OTHER_ROOM, ROOM]),
                    ("current_state_changes", &ROOMS, &[ROOM, OTHER_ROOM], &[OTHER_ROOM, ROOM]),
                    ("membership_changes", &USERS, &[ALICE, BOB, CAROL], &[BOB, ALICE, CAROL]),
                    ("receipts_room_changes", &ROOMS, &[ROOM], &[ROOM]),
                    ("account_data_user_changes", &USERS, &[ALICE, BOB], &[BOB, ALICE]),
                ],
                vec![
                    ("events_room_changes", &ROOMS, &[ROOM], &[ROOM]),
                    ("current_state_changes", &ROOMS, &[ROOM], &[ROOM]),
                    ("membership_changes", &USERS, &[CAROL], &[CAROL]),
                    ("receipts_room_changes", &ROOMS, &[ROOM], &[ROOM]),
                    ("account_data_user_changes", &USERS, &[ALICE], &[ALICE]),
                ],
                vec![
                    ("events_room_changes", &ROOMS, &[], &[]),
                    ("current_state_changes", &ROOMS, &[], &[]),
                    ("membership_changes", &USERS, &[], &[]),
                    ("receipts_room_changes", &ROOMS, &[], &[]),
                    ("account_data_user_changes", &USERS, &[], &[]),
                ],
            ],
        },
    );

    follow(&worker, &master).await?;
    advance_without_applying(&lazy, &master);
    let master_2 = reads(&master, &[t0, t1, t2]).await?;
    let worker_2 = reads(&worker, &[t0, t1, t2]).await?;
    assert_eq!(master_2, expected_2, "the master's answers after phase 2");
    assert_eq!(worker_2, master_2, "the worker answers as the master after phase 2");

    // The negative control: at the same positions, a follower that skipped
    // the rows keeps its stale caches, and the comparison sees it.
    let lazy_2 = reads(&lazy, &[t0, t1, t2]).await?;
    assert_eq!(lazy_2.positions, master_2.positions);
    assert_ne!(lazy_2.current_state, master_2.current_state, "a skipped invalidation is seen");
    assert_ne!(lazy_2.receipts, master_2.receipts);
    assert_ne!(lazy_2.global_account_data, master_2.global_account_data);
    assert_ne!(lazy_2.changes, master_2.changes);
    Ok(())
}
