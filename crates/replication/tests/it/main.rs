//! The inbound side of replication against a real PostgreSQL: a worker follows
//! a writer through POSITIONs (catching up from the database) and RDATA rows.

use std::sync::Arc;

use replication::{Hub, Inbound, Link, Outbound, Settings, StreamRegistry};
use replication_proto::{Command, RowJson};
use server_config::Role;
use store_core::CachesStreamAdapter;
use store_core::{Database, Engine, StoreContext, StoreError, StoreSettings};
use store_events::EventsStream;
use store_events::{EventsReader, EventsWriter, NewEvent};
use store_receipts::ReceiptsStream;
use store_receipts::{ReceiptRow, ReceiptsReader, ReceiptsWriter};
use store_test_support::{TestDb, TestResult, build_alone};

const ROOM: &str = "!room:example.com";
/// The deployment's `worker_replication_secret`, which TCP peers present.
const SECRET: &str = "replication test secret";

/// A hub that writes nothing and relays nothing: a follower.
fn follower_hub(instance: &str, server: &str, settings: Settings, inbound: Inbound) -> Arc<Hub> {
    Hub::new(instance, server, settings, inbound, Outbound::new(instance, []), false, Some(SECRET))
}

fn config(instance: &str) -> StoreSettings {
    StoreSettings::in_deployment(instance)
}

struct Master {
    events: EventsWriter,
    receipts: ReceiptsWriter,
}

struct Worker {
    events: Arc<EventsReader>,
    receipts: Arc<ReceiptsReader>,
    inbound: Inbound,
    registry: StreamRegistry,
}

async fn master(db: &Database, settings: &StoreSettings) -> Result<Master, StoreError> {
    let (events, receipts) = build_alone::<(EventsWriter, ReceiptsWriter)>(db, settings).await?;
    Ok(Master { events, receipts })
}

async fn worker(db: &Database, config: &StoreSettings) -> Result<Worker, StoreError> {
    let (ctx, events, receipts) =
        build_alone::<(StoreContext, EventsReader, ReceiptsReader)>(db, config).await?;
    let (events, receipts, caches) = (Arc::new(events), Arc::new(receipts), Arc::clone(ctx.caches()));
    let mut registry = StreamRegistry::new();
    registry.register(Arc::new(EventsStream(Arc::clone(&events))));
    registry.register(Arc::new(CachesStreamAdapter(caches)));
    registry.register(Arc::new(ReceiptsStream(Arc::clone(&receipts))));
    let inbound = Inbound::new(&config.instance_name, registry.clone());
    Ok(Worker { events, receipts, inbound, registry })
}

fn member(id: &str, user: &str) -> NewEvent {
    NewEvent {
        event_id: id.to_owned(),
        event_type: "m.room.member".to_owned(),
        state_key: Some(user.to_owned()),
        sender: user.to_owned(),
        origin_server_ts: 1,
        content: r#"{"membership":"join"}"#.to_owned(),
    }
}

async fn setup() -> Result<(TestDb, Master, Worker), Box<dyn std::error::Error>> {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master = master(&test_db.db, &config("master")).await?;
    let worker_db = test_db.reconnect().await?;
    let worker = worker(&worker_db, &config("worker1")).await?;
    Ok((test_db, master, worker))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_past_a_gap_catches_up_from_the_database() -> TestResult {
    let (_db, master, worker) = setup().await?;
    // Fill the worker's cache before anything is replicated.
    assert!(worker.events.get_users_in_room(ROOM).await?.is_empty());
    // Many writes the worker never received as RDATA (more than one catch-up batch).
    for n in 0..1_100 {
        master
            .events
            .persist_events(ROOM, &[member(&format!("$e{n}"), &format!("@u{n}:example.com"))])
            .await?;
    }
    let position = master.events.reader().events_stream().get_current_token_for_writer("master");
    // As in answer to REPLICATE: the writer's last sent position, twice.
    worker
        .inbound
        .handle(
            &mut Link::default(),
            Command::Position {
                stream: "events".into(),
                instance: "master".into(),
                prev_token: position,
                new_token: position,
            },
        )
        .await?;
    let events = worker.registry.get("events").ok_or("registered")?;
    assert_eq!(events.current_token("master"), position);
    assert_eq!(
        worker.events.get_users_in_room(ROOM).await?.len(),
        1_100,
        "the state rows invalidated the cache"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_without_a_gap_only_advances() -> TestResult {
    let (_db, master, worker) = setup().await?;
    let events = worker.registry.get("events").ok_or("registered")?;
    let current = events.current_token("master");
    master.events.persist_events(ROOM, &[member("$a", "@a:example.com")]).await?;
    let position = master.events.reader().events_stream().get_current_token_for_writer("master");
    // prev ≤ current: nothing was missed, so nothing is read.
    worker
        .inbound
        .handle(&mut Link::default(), position_command("events", "master", current, position))
        .await?;
    assert_eq!(events.current_token("master"), position);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_rows_wait_for_their_token_and_old_rows_are_dropped() -> TestResult {
    let (_db, master, worker) = setup().await?;
    let receipts = worker.registry.get("receipts").ok_or("registered")?;
    let from = receipts.current_token("master");
    // The worker has cached the old answer.
    let reader_view = &worker.receipts;
    assert_eq!(reader_view.get_last_receipt_event_id_for_user("@u", ROOM, "m.read").await?, None);
    master.receipts.insert_receipt(&receipt("$1")).await?;
    let to = master.receipts.reader().stream().get_current_token_for_writer("master");
    assert_eq!(
        reader_view.get_last_receipt_event_id_for_user("@u", ROOM, "m.read").await?,
        None,
        "still cached"
    );

    // The writer's streamer would send this row; split it into a batch of two.
    let updates = master.receipts.reader().get_receipts_updates("master", from, to, 10).await?;
    let (token, row) = updates.rows.into_iter().next().ok_or("one row")?;
    let row = RowJson::from_row(&row)?;
    // In sequence with the writer, as after the POSITION a connection starts with.
    let mut link = Link::default();
    worker.inbound.handle(&mut link, position_command("receipts", "master", from, from)).await?;
    worker.inbound.handle(&mut link, rdata("receipts", "master", None, row.clone())).await?;
    assert_eq!(receipts.current_token("master"), from, "a batch row waits for its token");
    worker.inbound.handle(&mut link, rdata("receipts", "master", Some(token), row.clone())).await?;
    assert_eq!(receipts.current_token("master"), token);
    assert_eq!(
        reader_view.get_last_receipt_event_id_for_user("@u", ROOM, "m.read").await?.as_deref(),
        Some("$1")
    );

    // The same row again (say, after a catch-up got there first) is dropped.
    let before = reader_view.get_last_receipt_event_id_for_user("@u", ROOM, "m.read").await?;
    worker.inbound.handle(&mut link, rdata("receipts", "master", Some(token), row)).await?;
    assert_eq!(reader_view.get_last_receipt_event_id_for_user("@u", ROOM, "m.read").await?, before);
    Ok(())
}

fn position_command(stream: &str, instance: &str, prev_token: i64, new_token: i64) -> Command {
    Command::Position { stream: stream.into(), instance: instance.into(), prev_token, new_token }
}

fn rdata(stream: &str, instance: &str, token: Option<i64>, row: RowJson) -> Command {
    Command::Rdata { stream: stream.into(), instance: instance.into(), token, row }
}

fn receipt(event: &str) -> ReceiptRow {
    ReceiptRow {
        room_id: ROOM.to_owned(),
        receipt_type: "m.read".to_owned(),
        user_id: "@u".to_owned(),
        event_id: event.to_owned(),
        thread_id: None,
        data: serde_json::json!({"ts": 1}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_unknown_streams_and_bad_rows() -> TestResult {
    let (_db, _master, worker) = setup().await?;
    let events = worker.registry.get("events").ok_or("registered")?;
    let before = events.current_token("worker1");
    // Our own position, echoed back: ignored.
    let mut link = Link::default();
    worker.inbound.handle(&mut link, position_command("events", "worker1", before + 10, before + 10)).await?;
    assert_eq!(events.current_token("worker1"), before);
    // A stream this process does not know: ignored.
    worker.inbound.handle(&mut link, position_command("device_lists", "master", 5, 9)).await?;
    worker.inbound.handle(&mut link, rdata("device_lists", "master", Some(9), RowJson::new("[1]")?)).await?;
    // A row that is not an events row, from a writer in sequence: an error, and
    // nothing moves.
    let current = events.current_token("master");
    worker.inbound.handle(&mut link, position_command("events", "master", current, current)).await?;
    let token = current + 1;
    assert!(
        worker
            .inbound
            .handle(&mut link, rdata("events", "master", Some(token), RowJson::new(r#"["nope",[]]"#)?))
            .await
            .is_err()
    );
    assert!(events.current_token("master") < token);
    Ok(())
}

mod outbound {
    //! A writer's outbound side feeding a worker's inbound side, through the
    //! wire format.

    use super::*;
    use replication::Outbound;

    /// Sends `commands` as lines, as a transport would, and applies them as
    /// one connection delivered them.
    async fn deliver(worker: &Worker, link: &mut Link, commands: &[Command]) -> TestResult {
        for command in commands {
            let line = command.to_line()?;
            worker.inbound.handle(link, Command::parse(&line)?).await?;
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_rows_go_out_as_rdata_and_reach_the_worker() -> TestResult {
        let (_db, master, worker) = setup().await?;
        let mut link = Link::default();
        // Written before the outbound side started: never sent as RDATA.
        master.events.persist_events(ROOM, &[member("$early", "@early:example.com")]).await?;
        let outbound = Outbound::new(
            "master",
            [Arc::new(EventsStream(master.events.shared_reader())) as Arc<dyn replication::Stream>],
        );
        let announced = outbound.announce();
        assert!(
            matches!(&announced[..], [Command::Position { prev_token, new_token, .. }] if prev_token == new_token)
        );
        // The worker connects: the announcement makes it catch up from the database.
        deliver(&worker, &mut link, &announced).await?;
        assert_eq!(*worker.events.get_users_in_room(ROOM).await?, ["@early:example.com"]);

        master
            .events
            .persist_events(ROOM, &[member("$a", "@a:example.com"), member("$b", "@b:example.com")])
            .await?;
        let commands = outbound.poll().await?;
        // Two events with a state row each: four RDATA, batch-marked within a token.
        let lines: Vec<String> = commands.iter().map(Command::to_line).collect::<Result<_, _>>()?;
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].starts_with("RDATA events master batch [\"ev\""), "{}", lines[0]);
        assert!(lines[1].starts_with("RDATA events master ") && lines[1].contains("[\"state\""));
        assert!(!lines[1].contains(" batch "));
        deliver(&worker, &mut link, &commands).await?;
        let position = master.events.reader().events_stream().get_current_token_for_writer("master");
        assert_eq!(worker.registry.get("events").ok_or("registered")?.current_token("master"), position);
        assert_eq!(
            worker.events.get_users_in_room(ROOM).await?.len(),
            3,
            "the rows invalidated the worker's cache"
        );

        // Nothing new: nothing to say.
        assert!(outbound.poll().await?.is_empty());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_rows_than_one_poll_end_with_a_position() -> TestResult {
        let (_db, master, worker) = setup().await?;
        let mut link = Link::default();
        let outbound = Outbound::new(
            "master",
            [Arc::new(ReceiptsStream(master.receipts.shared_reader())) as Arc<dyn replication::Stream>],
        );
        for n in 0..(replication::ROWS_PER_POLL + 5) {
            master
                .receipts
                .insert_receipt(&ReceiptRow { user_id: format!("@u{n}"), ..receipt("$1") })
                .await?;
        }
        let commands = outbound.poll().await?;
        let position = master.receipts.reader().stream().get_current_token_for_writer("master");
        // At most ROWS_PER_POLL rows as RDATA, then a POSITION starting past the
        // follower: it reads the rest from the database itself.
        assert_eq!(commands.len(), replication::ROWS_PER_POLL + 1);
        assert_eq!(
            commands.last(),
            Some(&Command::Position {
                stream: "receipts".into(),
                instance: "master".into(),
                prev_token: position,
                new_token: position
            })
        );
        deliver(&worker, &mut link, &commands).await?;
        assert!(outbound.poll().await?.is_empty(), "nothing left to stream");
        assert_eq!(worker.registry.get("receipts").ok_or("registered")?.current_token("master"), position);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_too_long_for_a_line_is_read_from_the_database() -> TestResult {
        let (_db, master, worker) = setup().await?;
        let mut link = Link::default();
        let outbound = Outbound::new(
            "master",
            [Arc::new(ReceiptsStream(master.receipts.shared_reader())) as Arc<dyn replication::Stream>],
        );
        deliver(&worker, &mut link, &outbound.announce()).await?;
        let huge = ReceiptRow { data: serde_json::json!({ "note": "x".repeat(20_000) }), ..receipt("$big") };
        master.receipts.insert_receipt(&huge).await?;
        let commands = outbound.poll().await?;
        let target = master.receipts.reader().stream().get_current_token_for_writer("master");
        assert_eq!(
            commands,
            [Command::Position {
                stream: "receipts".into(),
                instance: "master".into(),
                prev_token: target,
                new_token: target
            }]
        );
        deliver(&worker, &mut link, &commands).await?;
        assert_eq!(worker.registry.get("receipts").ok_or("registered")?.current_token("master"), target);
        assert_eq!(
            worker.receipts.get_last_receipt_event_id_for_user("@u", ROOM, "m.read").await?.as_deref(),
            Some("$big")
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_writer_announces_positions_moved_by_others() -> TestResult {
        let (_db, master, _worker) = setup().await?;
        let events = master.events.shared_reader();
        let outbound = Outbound::new(
            "master",
            [Arc::new(EventsStream(Arc::clone(&events))) as Arc<dyn replication::Stream>],
        );
        // Another writer's position reaches this one: its own claim jumps with it.
        let before = events.events_stream().get_current_token_for_writer("master");
        events.events_stream().advance("other_writer", before + 5);
        let commands = outbound.poll().await?;
        assert_eq!(
            commands,
            [Command::Position {
                stream: "events".into(),
                instance: "master".into(),
                prev_token: before,
                new_token: before + 5
            }]
        );
        Ok(())
    }
}

mod tcp {
    //! Two hubs over real TCP, and raw sockets misbehaving.

    use std::time::Duration;

    use replication::{Hub, Outbound, RefusalReason, Settings, tcp};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn quick() -> Settings {
        Settings {
            ping_interval: Duration::from_millis(100),
            ping_timeout: Duration::from_millis(400),
            max_pending: 100,
            // Longer than the test waits: only the generators' changes wake the
            // streamer in time.
            poll_interval: Duration::from_secs(30),
            ..Settings::default()
        }
    }

    async fn master_hub(
        master: &Master,
        settings: Settings,
    ) -> Result<(Arc<Hub>, String), Box<dyn std::error::Error>> {
        let sources: Vec<Arc<dyn replication::Stream>> = vec![
            Arc::new(EventsStream(master.events.shared_reader())),
            Arc::new(ReceiptsStream(master.receipts.shared_reader())),
        ];
        let hub = Hub::new(
            "master",
            "test",
            settings,
            Inbound::new("master", StreamRegistry::new()),
            Outbound::new("master", sources),
            true,
            Some(SECRET),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(tcp::serve(Arc::clone(&hub), listener));
        tokio::spawn(Arc::clone(&hub).run_streamer());
        hub.wake_on(master.events.reader().events_stream().subscribe());
        hub.wake_on(master.receipts.reader().stream().subscribe());
        Ok((hub, address))
    }

    /// A master that follows typing, written by `persister1`, and listens.
    async fn master_hub_following(
        _master: &Master,
        settings: Settings,
    ) -> Result<(Arc<Hub>, String), Box<dyn std::error::Error>> {
        let mut followed = StreamRegistry::new();
        followed.register(Arc::new(replication::TypingStream::Follower(
            replication::typing::TypingFollower::new("persister1"),
        )));
        let hub = Hub::new(
            "master",
            "test",
            settings,
            Inbound::new("master", followed),
            Outbound::new("master", []),
            true,
            Some(SECRET),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(tcp::serve(Arc::clone(&hub), listener));
        Ok((hub, address))
    }

    async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) -> TestResult {
        // 20 s: generous for a 2-core machine running other tests' processes.
        for _ in 0..1000 {
            if check().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("timed out waiting for {what}").into())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_follows_the_master_over_tcp() -> TestResult {
        let (_db, master, worker) = setup().await?;
        // Written before the worker connects: it catches up from the database.
        master.events.persist_events(ROOM, &[member("$early", "@early:example.com")]).await?;
        let (master_hub, address) = master_hub(&master, quick()).await?;
        let worker_hub = follower_hub("worker1", "test", quick(), worker.inbound);
        tokio::spawn(tcp::connect_forever(Arc::clone(&worker_hub), address));
        let events = worker.registry.get("events").ok_or("registered")?.clone();
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        eventually("the worker to catch up", async || events.current_token("master") >= target).await?;
        assert_eq!(*worker.events.get_users_in_room(ROOM).await?, ["@early:example.com"]);

        // Written while connected: arrives as RDATA.
        // The generator's change wakes the streamer; no poll interval needed.
        master.events.persist_events(ROOM, &[member("$late", "@late:example.com")]).await?;
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        eventually("the worker to apply the new rows", async || events.current_token("master") >= target)
            .await?;
        assert_eq!(
            *worker.events.get_users_in_room(ROOM).await?,
            ["@early:example.com", "@late:example.com"]
        );
        assert_eq!(master_hub.connections(), 1);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_stay_connected_and_both_follow() -> TestResult {
        let (test_db, master, first) = setup().await?;
        let second_db = test_db.reconnect().await?;
        let second = worker(&second_db, &config("worker2")).await?;
        let (master_hub, address) = master_hub(&master, quick()).await?;
        let mut hubs = Vec::new();
        for (name, worker) in [("worker1", first), ("worker2", second)] {
            let events = worker.registry.get("events").ok_or("registered")?.clone();
            let hub =
                Hub::new(name, "test", quick(), worker.inbound, Outbound::new(name, []), false, Some(SECRET));
            tokio::spawn(tcp::connect_forever(Arc::clone(&hub), address.clone()));
            hubs.push((hub, events));
        }
        eventually("both connections", async || master_hub.connections() == 2).await?;
        master.events.persist_events(ROOM, &[member("$a", "@a:example.com")]).await?;
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        for (_, events) in &hubs {
            eventually("each worker to follow", async || events.current_token("master") >= target).await?;
        }
        // Each worker's REPLICATE reached only the master: nobody was knocked off.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (hub, _) in &hubs {
            let (received, _) = hub.command_counts();
            assert_eq!(received.get(&replication_proto::CommandName::Error), None, "{received:?}");
            assert_eq!(
                received.get(&replication_proto::CommandName::Server),
                Some(&1),
                "connected once: {received:?}"
            );
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_that_falls_behind_is_dropped_then_catches_up_with_nothing_lost() -> TestResult {
        let (_db, master, worker) = setup().await?;
        // The production poll interval: what is checked here is that nothing is
        // lost across the drop, not how fast a wake-up travels.
        let settings = Settings { poll_interval: Duration::from_secs(1), ..quick() };
        let (master_hub, address) = master_hub(&master, settings).await?;
        let worker_hub = follower_hub("worker1", "test", quick(), worker.inbound);
        tokio::spawn(tcp::connect_forever(Arc::clone(&worker_hub), address));
        eventually("the connection", async || master_hub.connections() == 1).await?;
        // Far more than the queue limit at once: the master drops the worker.
        let bulk = Command::Ping { data: "x".repeat(8_000) };
        for _ in 0..5_000 {
            master_hub.broadcast(&bulk, None);
        }
        // Rows written meanwhile must not be lost.
        for n in 0..20 {
            master
                .events
                .persist_events(ROOM, &[member(&format!("$m{n}"), &format!("@m{n}:example.com"))])
                .await?;
        }
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        let events = worker.registry.get("events").ok_or("registered")?.clone();
        eventually("the worker to reconnect and catch up", async || {
            worker_hub
                .command_counts()
                .0
                .get(&replication_proto::CommandName::Server)
                .is_some_and(|n| *n >= 2)
                && events.current_token("master") >= target
        })
        .await?;
        assert_eq!(worker.events.get_users_in_room(ROOM).await?.len(), 20);
        Ok(())
    }

    /// Connects a raw socket to `address` and returns its lines reader and writer.
    async fn raw(
        address: &str,
    ) -> Result<
        (tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>, tokio::net::tcp::OwnedWriteHalf),
        std::io::Error,
    > {
        let (read, write) = TcpStream::connect(address).await?.into_split();
        Ok((BufReader::new(read).lines(), write))
    }

    /// Reads lines until the peer closes, for at most 10 s; returns them.
    async fn until_closed(
        lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    ) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) => seen.push(line),
                Ok(Ok(None) | Err(_)) => return Ok(seen),
                Err(_) => return Err(format!("still open after 10 s, having sent {seen:?}").into()),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_and_wrong_direction_get_an_error_and_a_close() -> TestResult {
        let (_db, master, _worker) = setup().await?;
        let (hub, address) = master_hub(&master, quick()).await?;
        for (input, expected) in [
            ("FOO bar\n", "ERROR failed to parse line: unknown command FOO"),
            ("SERVER test\n", "ERROR invalid command: SERVER"),
            ("POSITION events master x 5\n", "ERROR failed to parse line"),
        ] {
            let (mut lines, mut write) = raw(&address).await?;
            assert_eq!(lines.next_line().await?.as_deref(), Some("SERVER test"));
            write.write_all(input.as_bytes()).await?;
            let seen = until_closed(&mut lines).await?;
            assert!(seen.iter().any(|line| line.starts_with(expected)), "{input:?} got {seen:?}");
        }
        eventually("the connections to go", async || hub.connections() == 0).await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_peer_is_timed_out_after_its_first_ping() -> TestResult {
        let (_db, master, _worker) = setup().await?;
        let (_hub, address) = master_hub(&master, quick()).await?;
        let (mut lines, mut write) = raw(&address).await?;
        write.write_all(format!("AUTH {SECRET}\nNAME silent\nPING 1\n").as_bytes()).await?;
        let started = std::time::Instant::now();
        let seen = until_closed(&mut lines).await?;
        assert!(seen.iter().any(|line| line == "ERROR ping timeout"), "{seen:?}");
        assert!(
            seen.iter().any(|line| line.starts_with("PING ")),
            "the server pings an idle connection: {seen:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_never_says_anything_valid_is_closed_after_the_ping_timeout() -> TestResult {
        let (_db, master, _worker) = setup().await?;
        let (hub, address) = master_hub(&master, quick()).await?;
        let (mut lines, _write) = raw(&address).await?;
        let started = std::time::Instant::now();
        let seen = until_closed(&mut lines).await?;
        assert!(seen.iter().any(|line| line == "ERROR ping timeout"), "{seen:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(hub.connections(), 0, "never registered");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_without_the_secret_gets_nothing_and_moves_nothing() -> TestResult {
        let (_db, master, worker) = setup().await?;
        // A real worker follows, so a forged position would show on it.
        let (hub, address) = master_hub(&master, quick()).await?;
        let events = worker.registry.get("events").ok_or("registered")?.clone();
        let worker_hub = follower_hub("worker1", "test", quick(), worker.inbound);
        tokio::spawn(tcp::connect_forever(Arc::clone(&worker_hub), address.clone()));
        eventually("the worker to connect", async || hub.connections() == 1).await?;
        let before = events.current_token("master");
        master.events.persist_events(ROOM, &[member("$a", "@a:example.com")]).await?;
        let forged = "POSITION events master 1 999999999\nRDATA events master 999999999 [\"ev\",[]]\n";
        for hello in [String::new(), "AUTH wrong secret\n".to_owned(), "NAME rogue\n".to_owned()] {
            let (mut lines, mut write) = raw(&address).await?;
            write.write_all(format!("{hello}{forged}").as_bytes()).await?;
            let seen = until_closed(&mut lines).await?;
            assert_eq!(seen.first().map(String::as_str), Some("SERVER test"), "{seen:?}");
            assert!(seen.iter().any(|line| line.starts_with("ERROR ")), "{hello:?} got {seen:?}");
            assert!(
                !seen.iter().any(|line| line.starts_with("RDATA") || line.starts_with("POSITION")),
                "an unauthenticated peer is told nothing: {seen:?}"
            );
        }
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        eventually("the worker to follow the real writer", async || events.current_token("master") == target)
            .await?;
        assert!(target > before && target < 999_999_999);
        let refused = hub.refusals();
        assert!(refused.contains_key(&("tcp", RefusalReason::Unauthenticated)), "{refused:?}");
        assert!(refused.contains_key(&("tcp", RefusalReason::BadSecret)), "{refused:?}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_with_the_secret_speaks_only_for_the_writer_it_named() -> TestResult {
        let (_db, master, _worker) = setup().await?;
        let (hub, address) = master_hub_following(&master, quick()).await?;
        let cases = [
            // The master's own name is taken.
            ("master", "PING 1", RefusalReason::Impersonation),
            // A real writer, but not this connection.
            ("rogue", "POSITION typing persister1 1 2", RefusalReason::Impersonation),
            // This connection, but not a writer of the stream.
            ("rogue", "POSITION typing rogue 1 2", RefusalReason::NotAWriter),
        ];
        for (name, said, reason) in cases {
            let (mut lines, mut write) = raw(&address).await?;
            write.write_all(format!("AUTH {SECRET}\nNAME {name}\n{said}\n").as_bytes()).await?;
            let seen = until_closed(&mut lines).await?;
            assert!(seen.iter().any(|line| line.starts_with("ERROR ")), "{name}: {seen:?}");
            assert!(hub.refusals().contains_key(&("tcp", reason)), "{name} {said}: {:?}", hub.refusals());
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_cap_are_closed_at_once() -> TestResult {
        let (_db, master, _worker) = setup().await?;
        let (hub, address) = master_hub(&master, Settings { max_connections: 2, ..quick() }).await?;
        let mut kept = Vec::new();
        for name in ["a", "b"] {
            let (mut lines, mut write) = raw(&address).await?;
            write.write_all(format!("AUTH {SECRET}\nNAME {name}\n").as_bytes()).await?;
            assert_eq!(lines.next_line().await?.as_deref(), Some("SERVER test"));
            kept.push((lines, write));
        }
        let (mut lines, _write) = raw(&address).await?;
        let seen = until_closed(&mut lines).await?;
        assert_eq!(seen, ["ERROR too many replication connections"]);
        // The first ones still work.
        for (_, write) in &mut kept {
            write.write_all(b"PING 1\n").await?;
        }
        // Each counts once its AUTH is applied, which may be after its SERVER.
        eventually("both to be connected", async || hub.connections() == 2).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(hub.connections(), 2);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_batch_rows_or_unknown_streams_is_dropped() -> TestResult {
        let (_db, master, _worker) = setup().await?;
        let (hub, address) = master_hub_following(&master, quick()).await?;
        let row = r#"["!r",["@u"]]"#;
        let floods = [
            (0..replication::MAX_HELD_ROWS + 1)
                .map(|_| format!("RDATA typing persister1 batch {row}\n"))
                .collect::<String>(),
            (0..replication::MAX_UNKNOWN_STREAMS + 1)
                .map(|n| format!("POSITION s{n} persister1 1 1\n"))
                .collect(),
        ];
        for flood in floods {
            let (mut lines, mut write) = raw(&address).await?;
            write.write_all(format!("AUTH {SECRET}\nNAME persister1\n").as_bytes()).await?;
            // The peer may be gone before it has written everything.
            let _ = write.write_all(flood.as_bytes()).await;
            let seen = until_closed(&mut lines).await?;
            assert!(seen.iter().any(|line| line.starts_with("ERROR ")), "{seen:?}");
        }
        assert!(hub.refusals().get(&("tcp", RefusalReason::OverBound)).is_some_and(|n| *n >= 2));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_cannot_keep_up_is_disconnected() -> TestResult {
        let (_db, master, _worker) = setup().await?;
        let (hub, address) = master_hub(&master, quick()).await?;
        // Authenticates, then never reads.
        let mut stalled = TcpStream::connect(&address).await?;
        stalled.write_all(format!("AUTH {SECRET}\nNAME stalled\nPING 1\n").as_bytes()).await?;
        eventually("the connection", async || hub.connections() == 1).await?;
        let bulk = Command::Ping { data: "x".repeat(8_000) };
        for _ in 0..5_000 {
            hub.broadcast(&bulk, None);
        }
        eventually("the stalled connection to be dropped", async || hub.connections() == 0).await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_refuses_the_wrong_server() -> TestResult {
        let (_db, _master, worker) = setup().await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let worker_hub = follower_hub("worker1", "test", quick(), worker.inbound);
        tokio::spawn(tcp::connect_forever(worker_hub, address));
        let (stream, _) = listener.accept().await?;
        let (read, mut write) = stream.into_split();
        write.write_all(b"SERVER someone.else\n").await?;
        let mut lines = BufReader::new(read).lines();
        let seen = until_closed(&mut lines).await?;
        assert_eq!(
            &seen[..4],
            [format!("AUTH {SECRET}"), "NAME worker1".to_owned(), seen[2].clone(), "REPLICATE ".to_owned()]
        );
        assert!(seen[2].starts_with("PING "));
        assert!(seen.iter().any(|line| line == "ERROR Wrong remote"), "{seen:?}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_of_a_writer_not_in_sequence_are_read_from_the_database() -> TestResult {
        let (_db, master, worker) = setup().await?;
        let receipts = worker.registry.get("receipts").ok_or("registered")?.clone();
        let from = receipts.current_token("master");
        master.receipts.insert_receipt(&receipt("$1")).await?;
        let to = master.receipts.reader().stream().get_current_token_for_writer("master");
        let updates = master.receipts.reader().get_receipts_updates("master", from, to, 10).await?;
        let (token, _row) = updates.rows.into_iter().next().ok_or("one row")?;
        // The row as this connection delivers it differs from what the database
        // holds: taken as it is, it would show.
        let rdata = Command::Rdata {
            stream: "receipts".into(),
            instance: "master".into(),
            token: Some(token),
            row: RowJson::from_row(&receipt("$not-what-was-written"))?,
        };

        // A fake server: the worker connects to it.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let worker_hub = follower_hub("worker1", "test", quick(), worker.inbound);
        tokio::spawn(tcp::connect_forever(worker_hub, address));
        let (stream, _) = listener.accept().await?;
        let (_read, mut write) = stream.into_split();
        write.write_all(b"SERVER test\n").await?;
        // No POSITION first on this connection: the writer is not in sequence, so
        // the worker reads up to the token from the database instead.
        write.write_all(format!("{}\n", rdata.to_line()?).as_bytes()).await?;
        eventually("the catch-up", async || receipts.current_token("master") == token).await?;
        assert_eq!(
            worker.receipts.get_last_receipt_event_id_for_user("@u", ROOM, "m.read").await?.as_deref(),
            Some("$1")
        );
        Ok(())
    }
}

mod redis {
    //! Two hubs over the real Redis.

    use std::time::Duration;

    use replication::redis::{RedisAddress, run_forever};
    use replication::{Hub, Outbound, Settings};

    use super::*;

    fn settings() -> Settings {
        Settings {
            ping_interval: Duration::from_millis(200),
            ping_timeout: Duration::from_secs(2),
            max_pending: 10_000,
            poll_interval: Duration::from_secs(30),
            ..Settings::default()
        }
    }

    async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) -> TestResult {
        for _ in 0..500 {
            if check().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("timed out waiting for {what}").into())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_follows_the_master_over_redis_and_survives_a_lost_subscription() -> TestResult {
        let (_db, master, worker) = setup().await?;
        // One channel per test run: Redis is shared with other tests.
        let channel = format!("hs-test-{}", std::process::id());
        let address = RedisAddress::parse("redis://127.0.0.1:6379").map_err(|err| err.to_string())?;
        master.events.persist_events(ROOM, &[member("$early", "@early:example.com")]).await?;

        let sources: Vec<Arc<dyn replication::Stream>> =
            vec![Arc::new(EventsStream(master.events.shared_reader()))];
        let master_hub = Hub::new(
            "master",
            &channel,
            settings(),
            Inbound::new("master", StreamRegistry::new()),
            Outbound::new("master", sources),
            false,
            Some(SECRET),
        );
        tokio::spawn(Arc::clone(&master_hub).run_streamer());
        master_hub.wake_on(master.events.reader().events_stream().subscribe());
        tokio::spawn(run_forever(Arc::clone(&master_hub), address.clone()));
        // The worker reaches Redis through a proxy the test can cut.
        let proxy = crate::proxy::Proxy::start("127.0.0.1:6379").await?;
        let through_proxy =
            RedisAddress::parse(&format!("redis://{}", proxy.address())).map_err(|err| err.to_string())?;
        let worker_hub = follower_hub("worker1", &channel, settings(), worker.inbound);
        tokio::spawn(run_forever(Arc::clone(&worker_hub), through_proxy));
        drop(address);

        let events = worker.registry.get("events").ok_or("registered")?.clone();
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        eventually("the worker to catch up", async || events.current_token("master") >= target).await?;
        assert_eq!(*worker.events.get_users_in_room(ROOM).await?, ["@early:example.com"]);

        master.events.persist_events(ROOM, &[member("$late", "@late:example.com")]).await?;
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        eventually("the RDATA", async || events.current_token("master") >= target).await?;

        // Redis drops the worker's connections (a timeout, a restart): it must
        // notice, resubscribe, and catch up on what it missed meanwhile.
        proxy.cut();
        master.events.persist_events(ROOM, &[member("$after", "@after:example.com")]).await?;
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        eventually("the worker to recover", async || events.current_token("master") >= target).await?;
        assert_eq!(worker.events.get_users_in_room(ROOM).await?.len(), 3);
        Ok(())
    }
}

mod proxy {
    //! A TCP proxy a test can cut: every connection through it closes at once,
    //! as when a network path or a server drops them; new ones go through.

    use std::sync::{Arc, Mutex};

    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    pub(crate) struct Proxy {
        address: String,
        connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
        accept: JoinHandle<()>,
    }

    impl Proxy {
        /// Listens on a free port and forwards each connection to `target`.
        pub(crate) async fn start(target: &str) -> Result<Proxy, std::io::Error> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let address = listener.local_addr()?.to_string();
            let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
            let target = target.to_owned();
            let accept = tokio::spawn({
                let connections = Arc::clone(&connections);
                async move {
                    while let Ok((mut inbound, _)) = listener.accept().await {
                        let target = target.clone();
                        let forward = tokio::spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(&target).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                        connections.lock().expect("not poisoned").push(forward);
                    }
                }
            });
            Ok(Proxy { address, connections, accept })
        }

        pub(crate) fn address(&self) -> &str {
            &self.address
        }

        /// Closes every connection open through the proxy.
        pub(crate) fn cut(&self) {
            for connection in self.connections.lock().expect("not poisoned").drain(..) {
                connection.abort();
            }
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.accept.abort();
            self.cut();
        }
    }
}

mod backlog {
    //! A worker that connects late gets positions, never a backlog of rows.

    use std::time::Duration;

    use replication::{Hub, Outbound, Settings, tcp};
    use replication_proto::CommandName;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_connecting_after_10000_rows_gets_none_as_rdata_and_applies_them_all() -> TestResult {
        let (_db, master, worker) = setup().await?;
        let settings = Settings { poll_interval: Duration::from_millis(50), ..Settings::default() };
        let sources: Vec<Arc<dyn replication::Stream>> =
            vec![Arc::new(ReceiptsStream(master.receipts.shared_reader()))];
        let master_hub = Hub::new(
            "master",
            "test",
            settings,
            Inbound::new("master", StreamRegistry::new()),
            Outbound::new("master", sources),
            true,
            Some(SECRET),
        );
        master_hub.wake_on(master.receipts.reader().stream().subscribe());
        tokio::spawn(Arc::clone(&master_hub).run_streamer());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(tcp::serve(Arc::clone(&master_hub), listener));

        // 10,000 rows written while no worker is connected (8 writers at once).
        let writer = Arc::new(master.receipts);
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..8 {
            let writer = Arc::clone(&writer);
            tasks.spawn(async move {
                for n in 0..1_250 {
                    writer
                        .insert_receipt(&ReceiptRow { user_id: format!("@u{task}_{n}"), ..receipt("$1") })
                        .await?;
                }
                Ok::<(), StoreError>(())
            });
        }
        while let Some(result) = tasks.join_next().await {
            result??;
        }
        let target = writer.reader().stream().get_current_token_for_writer("master");
        // "Before the connection" means before the streamer dealt with them; a row
        // finishing as a worker connects is rightly sent as RDATA after the
        // POSITION the worker gets.
        for _ in 0..500 {
            if master_hub.is_caught_up() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(master_hub.is_caught_up());

        let worker_hub = follower_hub("worker1", "test", settings, worker.inbound);
        tokio::spawn(tcp::connect_forever(Arc::clone(&worker_hub), address));
        let receipts = worker.registry.get("receipts").ok_or("registered")?.clone();
        for _ in 0..1_000 {
            if receipts.current_token("master") >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(receipts.current_token("master"), target, "every row applied");
        let (received, _) = worker_hub.command_counts();
        assert_eq!(received.get(&CommandName::Rdata), None, "no backlog as RDATA: {received:?}");
        assert!(received.get(&CommandName::Position).is_some_and(|n| *n >= 1));
        let read = worker.receipts.get_receipts_for_room(ROOM, "m.read").await?;
        assert_eq!(read.len(), 10_000);
        Ok(())
    }
}

mod every_stream {
    //! Every advance of every stream a process writes is announced.

    use std::time::Duration;

    use replication::typing::TypingWriter;
    use replication::{Outbound, TypingStream};
    use store_events::BackfillStream;

    use super::*;

    /// The token the commands announce for `stream`: the last RDATA token or the
    /// new token of a POSITION.
    fn announced(commands: &[Command], stream: &str) -> Option<i64> {
        commands.iter().rev().find_map(|command| match command {
            Command::Rdata { stream: s, token: Some(token), .. } if s == stream => Some(*token),
            Command::Position { stream: s, new_token, .. } if s == stream => Some(*new_token),
            _ => None,
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_stream_announces_its_advances() -> TestResult {
        let test_db = TestDb::new(Engine::Postgres).await?;
        let (ctx, events, receipts) = build_alone::<(StoreContext, EventsWriter, ReceiptsWriter)>(
            &test_db.db,
            &StoreSettings::in_deployment("master"),
        )
        .await?;
        let typing = TypingWriter::new("master");
        let streams: Vec<Arc<dyn replication::Stream>> = vec![
            Arc::new(EventsStream(events.shared_reader())),
            Arc::new(BackfillStream(events.shared_reader())),
            Arc::new(CachesStreamAdapter(Arc::clone(ctx.caches()))),
            Arc::new(ReceiptsStream(receipts.shared_reader())),
            Arc::new(TypingStream::Writer(Arc::clone(&typing))),
        ];
        let outbound = Outbound::new("master", streams.clone());

        // One write to each stream (a membership change also writes `caches`).
        events.persist_events(ROOM, &[member("$a", "@a:example.com")]).await?;
        events
            .persist_backfilled_events(
                ROOM,
                &[NewEvent {
                    state_key: None,
                    event_type: "m.room.message".into(),
                    ..member("$old", "@a:example.com")
                }],
            )
            .await?;
        receipts.insert_receipt(&receipt("$a")).await?;
        typing.started_typing(ROOM, "@a:example.com", Duration::from_secs(30));

        let commands = outbound.poll().await?;
        for stream in &streams {
            let current = stream.current_token("master");
            assert_eq!(
                announced(&commands, stream.name()),
                Some(current),
                "{} announced {commands:#?}",
                stream.name()
            );
        }
        // Backfill travels with positive tokens.
        assert!(announced(&commands, "backfill").is_some_and(|token| token > 0));
        Ok(())
    }
}

mod federation {
    //! The federation queue on the master, followed by a sender over TCP that
    //! acknowledges what it handled.

    use std::time::Duration;

    use replication::federation::{FederationQueue, FederationRow};
    use replication::{FederationStream, Hub, Outbound, Settings, tcp};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sender_follows_the_queue_and_its_acks_trim_it() -> TestResult {
        let settings = Settings { poll_interval: Duration::from_millis(20), ..Settings::default() };
        let queue = FederationQueue::new(&["sender1".to_owned()]);
        let master_hub = Hub::new(
            "master",
            "test",
            settings,
            Inbound::new("master", StreamRegistry::new()),
            Outbound::new(
                "master",
                [Arc::new(FederationStream::Queue(Arc::clone(&queue))) as Arc<dyn replication::Stream>],
            ),
            true,
            Some(SECRET),
        );
        master_hub.wake_on(queue.subscribe());
        tokio::spawn(Arc::clone(&master_hub).run_streamer());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(tcp::serve(Arc::clone(&master_hub), listener));

        let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel::<(i64, Vec<FederationRow>)>();
        let handler: replication::federation::FederationHandler =
            Arc::new(move |token, rows: &[FederationRow]| {
                let _ = handled_tx.send((token, rows.to_vec()));
            });
        let mut registry = StreamRegistry::new();
        registry.register(Arc::new(FederationStream::Sender { handler, remote: None }));
        let sender_hub = follower_hub("sender1", "test", settings, Inbound::new("sender1", registry));
        tokio::spawn(tcp::connect_forever(Arc::clone(&sender_hub), address));
        while master_hub.connections() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        queue.send_edu("remote.example.org", "m.presence", serde_json::json!({"p": 1}), None);
        queue.send_edu("remote.example.org", "m.receipt", serde_json::json!({"r": 1}), Some("!room"));
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let (token, rows) =
                tokio::time::timeout(Duration::from_secs(5), handled.recv()).await?.ok_or("sender gone")?;
            seen.extend(rows.into_iter().map(|row| (token, row.kind)));
        }
        assert_eq!(seen, [(1, "e".to_owned()), (2, "k".to_owned())]);
        assert_eq!(queue.len(), 2);

        // The sender handled both: its acknowledgement empties the queue.
        sender_hub.broadcast(&Command::FederationAck { instance: "sender1".into(), token: 2 }, None);
        for _ in 0..250 {
            if queue.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(queue.is_empty());
        Ok(())
    }
}

mod redis_faults {
    //! The Redis transport against a fake Redis that misbehaves, and against
    //! garbage published on the real one.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use replication::redis::{RedisAddress, run_forever};
    use replication::{Hub, Outbound, RefusalReason, Settings};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fault {
        /// Confirms subscriptions, then never answers a PING.
        Silent,
        /// Never reads what the publishing connection sends.
        StopsReading,
    }

    /// Reads one RESP array of bulk strings (all our client sends).
    async fn read_command(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Vec<String>> {
        loop {
            if let Some((command, used)) = parse(buffer) {
                buffer.drain(..used);
                return Some(command);
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
    }

    fn parse(buffer: &[u8]) -> Option<(Vec<String>, usize)> {
        let text = std::str::from_utf8(buffer).ok()?;
        let mut offset = 0;
        let mut next_line = || {
            let end = text[offset..].find("\r\n")? + offset;
            let line = &text[offset..end];
            offset = end + 2;
            Some(line)
        };
        let count: usize = next_line()?.strip_prefix('*')?.parse().ok()?;
        let mut parts = Vec::new();
        for _ in 0..count {
            next_line()?;
            parts.push(next_line()?.to_owned());
        }
        Some((parts, offset))
    }

    /// A fake Redis; returns its address and how many subscriptions it saw.
    async fn fake_redis(fault: Fault) -> Result<(String, Arc<AtomicUsize>), std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let subscriptions = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&subscriptions);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    while let Some(command) = read_command(&mut stream, &mut buffer).await {
                        match command.first().map(String::as_str) {
                            Some("CLIENT") => {
                                let _ = stream.write_all(b"+OK\r\n").await;
                                if fault == Fault::StopsReading
                                    && command.last().is_some_and(|name| name.ends_with("-pub"))
                                {
                                    std::future::pending::<()>().await;
                                }
                            }
                            Some("SUBSCRIBE") => {
                                counter.fetch_add(1, Ordering::SeqCst);
                                for (n, channel) in command[1..].iter().enumerate() {
                                    let reply = format!(
                                        "*3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:{}\r\n",
                                        channel.len(),
                                        n + 1
                                    );
                                    let _ = stream.write_all(reply.as_bytes()).await;
                                }
                            }
                            // Only the silent Redis leaves PINGs unanswered, so the other
                            // fault can only be noticed through its publications.
                            Some("PING") if fault == Fault::StopsReading => {
                                let _ = stream.write_all(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n").await;
                            }
                            // Publications are swallowed.
                            _ => {}
                        }
                    }
                });
            }
        });
        Ok((address, subscriptions))
    }

    fn settings() -> Settings {
        Settings {
            ping_interval: Duration::from_millis(100),
            ping_timeout: Duration::from_millis(400),
            max_pending: 50,
            poll_interval: Duration::from_secs(30),
            ..Settings::default()
        }
    }

    fn idle_hub() -> Arc<Hub> {
        follower_hub("worker1", "fake", settings(), Inbound::new("worker1", StreamRegistry::new()))
    }

    async fn wait_for(subscriptions: &AtomicUsize, at_least: usize) -> TestResult {
        for _ in 0..250 {
            if subscriptions.load(Ordering::SeqCst) >= at_least {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("only {} subscriptions", subscriptions.load(Ordering::SeqCst)).into())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_redis_is_noticed_and_replaced() -> TestResult {
        let (address, subscriptions) = fake_redis(Fault::Silent).await?;
        let address = RedisAddress::parse(&format!("redis://{address}")).map_err(|err| err.to_string())?;
        tokio::spawn(run_forever(idle_hub(), address));
        wait_for(&subscriptions, 1).await?;
        // No answer to its PINGs: the process must give up on the connection and
        // subscribe again, however long it takes.
        wait_for(&subscriptions, 3).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_that_stops_taking_publications_is_replaced() -> TestResult {
        let (address, subscriptions) = fake_redis(Fault::StopsReading).await?;
        let address = RedisAddress::parse(&format!("redis://{address}")).map_err(|err| err.to_string())?;
        let hub = idle_hub();
        tokio::spawn(run_forever(Arc::clone(&hub), address));
        wait_for(&subscriptions, 1).await?;
        while hub.connections() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Far more than the socket can hold: the queue passes its limit.
        let bulk = Command::Ping { data: "x".repeat(8_000) };
        for _ in 0..2_000 {
            hub.broadcast(&bulk, None);
        }
        wait_for(&subscriptions, 2).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_on_the_channel_harms_nobody() -> TestResult {
        let (_db, master, worker) = setup().await?;
        let channel = format!("hs-garbage-{}", std::process::id());
        let address = RedisAddress::parse("redis://127.0.0.1:6379").map_err(|err| err.to_string())?;
        let sources: Vec<Arc<dyn replication::Stream>> =
            vec![Arc::new(EventsStream(master.events.shared_reader()))];
        let master_hub = Hub::new(
            "master",
            &channel,
            settings(),
            Inbound::new("master", StreamRegistry::new()),
            Outbound::new("master", sources),
            false,
            Some(SECRET),
        );
        tokio::spawn(Arc::clone(&master_hub).run_streamer());
        master_hub.wake_on(master.events.reader().events_stream().subscribe());
        tokio::spawn(run_forever(Arc::clone(&master_hub), address.clone()));
        let worker_hub = follower_hub("worker1", &channel, settings(), worker.inbound);
        tokio::spawn(run_forever(Arc::clone(&worker_hub), address));
        while master_hub.connections() == 0 || worker_hub.connections() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut raw = TcpStream::connect("127.0.0.1:6379").await?;
        for garbage in [
            "FOO bar",
            "RDATA events master notanumber [1]",
            "POSITION events",
            "RDATA events master 5 [NaN]",
        ] {
            let request = format!(
                "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{channel}\r\n${}\r\n{garbage}\r\n",
                channel.len(),
                garbage.len()
            );
            raw.write_all(request.as_bytes()).await?;
        }
        master.events.persist_events(ROOM, &[member("$a", "@a:example.com")]).await?;
        let events = worker.registry.get("events").ok_or("registered")?.clone();
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        for _ in 0..250 {
            if events.current_token("master") >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(events.current_token("master"), target, "the worker still follows");
        assert_eq!(worker_hub.connections(), 1, "and kept its connection");

        // Anyone who can publish on the channel can name a real writer; a token
        // past anything the sequence handed out can only be forged, and taking
        // it would put every later real event below the clients' tokens.
        let before = events.current_token("master");
        for forged in [
            "POSITION events master 1 999999999".to_owned(),
            "RDATA events master 999999998 [\"ev\",[]]".to_owned(),
        ] {
            let request = format!(
                "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{channel}\r\n${}\r\n{forged}\r\n",
                channel.len(),
                forged.len()
            );
            raw.write_all(request.as_bytes()).await?;
        }
        let refused = async || {
            worker_hub.refusals().get(&("redis", RefusalReason::TokenNotHandedOut)).copied().unwrap_or(0)
        };
        for _ in 0..250 {
            if refused().await >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(refused().await, 2, "both forgeries are refused and counted");
        assert_eq!(events.current_token("master"), before, "no position moved");
        master.events.persist_events(ROOM, &[member("$b", "@b:example.com")]).await?;
        let target = master.events.reader().events_stream().get_current_token_for_writer("master");
        for _ in 0..250 {
            if events.current_token("master") >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(events.current_token("master"), target, "real events still arrive");
        assert_eq!(worker.events.get_users_in_room(ROOM).await?.len(), 2);
        Ok(())
    }
}

mod configured {
    //! Transports chosen by `[replication]`.

    use std::time::Duration;

    use replication::{Hub, Outbound, Settings, transports};
    use server_config::ServerConfig;

    use super::*;

    fn hub(name: &str, server: &str) -> Arc<Hub> {
        Hub::new(
            name,
            server,
            Settings::default(),
            Inbound::new(name, StreamRegistry::new()),
            Outbound::new(name, []),
            name == "master",
            Some(SECRET),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_config_picks_the_transports() -> TestResult {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let master = ServerConfig::from_toml_str(
            &format!(
                "server_name = \"cfg\"\nworker_replication_secret = \"{SECRET}\"\n[replication]\nlisten = \"127.0.0.1:{port}\"\n"
            ),
            Role::Master,
        )?;
        let worker = ServerConfig::from_toml_str(
            &format!(
                "server_name = \"cfg\"\ninstance_name = \"w\"\nworker_replication_secret = \"{SECRET}\"\n\
                 [database]\nurl = \"postgres://x\"\n[replication]\nmaster = \"127.0.0.1:{port}\"\n"
            ),
            Role::Worker,
        )?;
        let redis_worker = ServerConfig::from_toml_str(
            &format!(
                "server_name = \"cfg-{}\"\ninstance_name = \"r\"\n[database]\nurl = \"postgres://x\"\n\
                 [replication]\nredis = \"redis://127.0.0.1:6379\"\n",
                std::process::id()
            ),
            Role::Worker,
        )?;
        let (master_hub, worker_hub, redis_hub) =
            (hub("master", "cfg"), hub("w", "cfg"), hub("r", &redis_worker.server_name));
        let _tasks = [
            transports::start(&master_hub, &master.replication).await?,
            transports::start(&worker_hub, &worker.replication).await?,
            transports::start(&redis_hub, &redis_worker.replication).await?,
        ];
        for _ in 0..250 {
            if master_hub.connections() == 1 && worker_hub.connections() == 1 && redis_hub.connections() == 1
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("the configured transports did not connect".into())
    }

    #[test]
    fn keepalive_and_congestion_come_from_the_config() -> TestResult {
        let config = ServerConfig::from_toml_str(
            "server_name = \"cfg\"\n[replication]\nping_interval_ms = 1000\nping_timeout_ms = 9000\nmax_pending = 7\n",
            Role::Master,
        )?;
        let settings = Settings::from_config(&config.replication);
        assert_eq!(
            (settings.ping_interval, settings.ping_timeout, settings.max_pending),
            (Duration::from_secs(1), Duration::from_secs(9), 7)
        );
        let defaults = Settings::from_config(
            &ServerConfig::from_toml_str("server_name = \"cfg\"", Role::Master)?.replication,
        );
        assert_eq!(
            (defaults.ping_interval, defaults.ping_timeout, defaults.max_pending),
            (Duration::from_secs(5), Duration::from_secs(25), 10_000)
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_listen_address_in_use_is_named() -> TestResult {
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = taken.local_addr()?.to_string();
        let config = ServerConfig::from_toml_str(
            &format!(
                "server_name = \"cfg\"\nworker_replication_secret = \"{SECRET}\"\n[replication]\nlisten = \"{address}\"\n"
            ),
            Role::Master,
        )?;
        let err = transports::start(&hub("master", "cfg"), &config.replication).await.expect_err("in use");
        assert!(err.contains("cannot listen"), "{err}");
        Ok(())
    }
}

mod http_catch_up {
    //! Followers of in-memory streams fetch what they missed from the writer's
    //! internal HTTP endpoint.

    use std::collections::BTreeMap;
    use std::time::Duration;

    use replication::federation::{FederationHandler, FederationQueue, FederationRow};
    use replication::http::{HttpFetcher, router};
    use replication::typing::{TypingFollower, TypingWriter};
    use replication::{FederationStream, Hub, Outbound, Settings, TypingStream, tcp};
    use tokio::net::TcpListener;

    use super::*;

    async fn serve_http(hub: &Arc<Hub>, secret: Option<&str>) -> Result<String, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(axum::serve(listener, router(Arc::clone(hub), secret)).into_future());
        Ok(address)
    }

    fn master_hub(typing: &Arc<TypingWriter>, queue: &Arc<FederationQueue>) -> Arc<Hub> {
        let sources: Vec<Arc<dyn replication::Stream>> = vec![
            Arc::new(TypingStream::Writer(Arc::clone(typing))),
            Arc::new(FederationStream::Queue(Arc::clone(queue))),
        ];
        Hub::new(
            "master",
            "test",
            Settings::default(),
            Inbound::new("master", StreamRegistry::new()),
            Outbound::new("master", sources),
            true,
            Some(SECRET),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missed_typing_and_federation_rows_are_fetched_from_the_writer() -> TestResult {
        let typing = TypingWriter::new("master");
        let queue = FederationQueue::new(&["worker1".to_owned()]);
        let hub = master_hub(&typing, &queue);
        let http = serve_http(&hub, Some(SECRET)).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let replication_address = listener.local_addr()?.to_string();
        tokio::spawn(tcp::serve(Arc::clone(&hub), listener));
        tokio::spawn(Arc::clone(&hub).run_streamer());

        // Before the follower connects.
        typing.started_typing("!r", "@u:example.com", Duration::from_secs(60));
        queue.send_edu("remote.example.org", "m.direct_to_device", serde_json::json!({"x": 1}), None);
        // ...and before the streamer would send them as RDATA to anyone.
        for _ in 0..300 {
            if hub.is_caught_up() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(hub.is_caught_up());

        let fetcher = HttpFetcher::new(BTreeMap::from([("master".to_owned(), http)]), SECRET);
        let follower = TypingFollower::fetching_from("master", fetcher.clone());
        let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel::<Vec<FederationRow>>();
        let handler: FederationHandler = Arc::new(move |_, rows: &[FederationRow]| {
            let _ = handled_tx.send(rows.to_vec());
        });
        let mut registry = StreamRegistry::new();
        registry.register(Arc::new(TypingStream::Follower(Arc::clone(&follower))));
        registry.register(Arc::new(FederationStream::Sender { handler, remote: Some(fetcher) }));
        let worker = follower_hub("worker1", "test", Settings::default(), Inbound::new("worker1", registry));
        tokio::spawn(tcp::connect_forever(Arc::clone(&worker), replication_address));

        let rows =
            tokio::time::timeout(Duration::from_secs(5), handled.recv()).await?.ok_or("sender gone")?;
        assert_eq!(rows.len(), 1, "the queued EDU reached the sender: {rows:?}");
        for _ in 0..250 {
            if follower.typing_in("!r") == ["@u:example.com"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            follower.typing_in("!r"),
            ["@u:example.com"],
            "typing written before the connection was fetched"
        );
        assert_eq!(
            worker.command_counts().0.get(&replication_proto::CommandName::Rdata),
            None,
            "nothing came as RDATA"
        );
        Ok(())
    }

    async fn status_of(
        address: &str,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<u16, Box<dyn std::error::Error>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let auth = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response.split_whitespace().nth(1).ok_or("no status")?.parse()?)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_endpoint_needs_the_shared_secret() -> TestResult {
        let hub = master_hub(&TypingWriter::new("master"), &FederationQueue::new(&[]));
        let path = "/_synapse/replication/get_repl_stream_updates/typing?from_token=0&upto_token=0";
        let guarded = serve_http(&hub, Some(SECRET)).await?;
        assert_eq!(status_of(&guarded, path, Some(SECRET)).await?, 200);
        assert_eq!(status_of(&guarded, path, None).await?, 401);
        assert_eq!(status_of(&guarded, path, Some("wrong")).await?, 401);
        assert_eq!(
            status_of(
                &guarded,
                "/_synapse/replication/get_repl_stream_updates/events?from_token=0&upto_token=1",
                Some(SECRET)
            )
            .await?,
            400
        );
        let unguarded = serve_http(&hub, None).await?;
        assert_eq!(
            status_of(&unguarded, path, Some(SECRET)).await?,
            401,
            "no secret configured: refuse everyone"
        );
        Ok(())
    }
}
