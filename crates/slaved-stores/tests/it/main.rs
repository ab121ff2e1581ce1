//! The compositions against real PostgreSQL and SQLite: a process writes
//! exactly its streams, a follower applies what it is sent, and the processes of
//! a deployment agree on who writes what.

use std::collections::BTreeSet;

use replication::{Inbound, Link};
use server_config::{Overrides, Role, ServerConfig};
use slaved_stores::prelude::*;
use slaved_stores::{DataStore, WorkerStore};
use store_core::{Engine, Store, StoreError, build_store};
use store_events::NewEvent;
use store_receipts::ReceiptRow;
use store_test_support::{TestDb, TestResult, engine_tests};

mod conformance;

const ROOM: &str = "!room:test";

fn single_process(url: &str) -> Result<ServerConfig, Box<dyn std::error::Error>> {
    let overrides = Overrides { database_url: Some(url.to_owned()), ..Overrides::default() };
    Ok(ServerConfig::defaults(Role::Master, &overrides)?)
}

fn join(user: &str) -> NewEvent {
    NewEvent {
        event_id: format!("$join-{user}"),
        event_type: "m.room.member".to_owned(),
        state_key: Some(user.to_owned()),
        sender: user.to_owned(),
        origin_server_ts: 1,
        content: r#"{"membership":"join"}"#.to_owned(),
    }
}

/// Moves `follower` to everything `master` wrote, the way a `POSITION` past a
/// gap does: reading the rows from the database.
async fn follow(follower: &WorkerStore, master: &DataStore) -> TestResult {
    let inbound = Inbound::new("worker1", follower.replication_streams());
    let mut link = Link::default();
    for stream in master.written_streams() {
        let position = stream.current_token("master");
        let followed = inbound.streams().get(stream.name()).ok_or("the follower follows every stream")?;
        inbound.on_position(&mut link, followed.as_ref(), "master", position, position).await?;
    }
    Ok(())
}

engine_tests!(a_process_writes_exactly_its_streams_and_a_follower_applies_them);

async fn a_process_writes_exactly_its_streams_and_a_follower_applies_them(test_db: TestDb) -> TestResult {
    let config = single_process(&test_db.url)?;
    let master: DataStore = build_store(&test_db.db, &config.store_settings()).await?;
    let written: BTreeSet<&str> = master.written_streams().iter().map(|stream| stream.name()).collect();
    assert_eq!(written, BTreeSet::from(["account_data", "backfill", "caches", "events", "receipts"]));

    // Same deployment, another instance: it follows every stream, writes none.
    let mut follower_config = config.clone();
    follower_config.instance_name = "worker1".to_owned();
    let follower_data: DataStore =
        build_store(&test_db.reconnect().await?, &follower_config.store_settings()).await?;
    assert!(follower_data.events_writer().is_none() && follower_data.receipts_writer().is_none());
    assert!(follower_data.account_data_writer().is_none());
    let written: Vec<&str> = follower_data.written_streams().iter().map(|stream| stream.name()).collect();
    assert_eq!(written, ["caches"], "every process writes only cache invalidations unless configured");
    let followed: BTreeSet<&str> =
        follower_data.replication_streams().iter().map(|stream| stream.name()).collect();
    assert_eq!(followed, BTreeSet::from(["account_data", "backfill", "caches", "events", "receipts"]));
    let follower: &WorkerStore = follower_data.worker();

    // Cached before the writes: following must make them fresh.
    assert!(follower.events().get_users_in_room(ROOM).await?.is_empty());
    assert!(follower.account_data().get_global_account_data_for_user("@a:test").await?.is_empty());

    let events = master.events_writer().ok_or("the master writes events")?;
    events.persist_events(ROOM, &[join("@a:test"), join("@b:test")]).await?;
    let receipts = master.receipts_writer().ok_or("the master writes receipts")?;
    receipts
        .insert_receipt(&ReceiptRow {
            room_id: ROOM.to_owned(),
            receipt_type: "m.read".to_owned(),
            user_id: "@a:test".to_owned(),
            event_id: "$join-@b:test".to_owned(),
            thread_id: None,
            data: serde_json::json!({"ts": 1}),
        })
        .await?;
    let account_data = master.account_data_writer().ok_or("the master writes account data")?;
    account_data.add_account_data("@a:test", None, "m.push_rules", &serde_json::json!({"rules": 1})).await?;

    follow(follower, &master).await?;
    assert_eq!(*follower.events().get_users_in_room(ROOM).await?, ["@a:test", "@b:test"]);
    let global = follower.account_data().get_global_account_data_for_user("@a:test").await?;
    assert_eq!(global.get("m.push_rules"), Some(&serde_json::json!({"rules": 1})));
    let last_read = follower.receipts().get_last_receipt_event_id_for_user("@a:test", ROOM, "m.read").await?;
    assert_eq!(last_read.as_deref(), Some("$join-@b:test"));
    let followed = follower.replication_streams();
    for stream in master.written_streams() {
        let known = followed.get(stream.name()).map(|followed| followed.current_token("master"));
        assert_eq!(
            known,
            Some(stream.current_token("master")),
            "the follower knows the master's position on `{}`",
            stream.name()
        );
    }
    Ok(())
}

fn deployment_config(
    url: &str,
    instance: &str,
    event_writers: &[&str],
) -> Result<ServerConfig, Box<dyn std::error::Error>> {
    let role = if instance == "master" { Role::Master } else { Role::Worker };
    let writers: Vec<String> = event_writers.iter().map(|writer| format!("\"{writer}\"")).collect();
    Ok(ServerConfig::from_toml_str(
        &format!(
            "server_name = \"test\"\ninstance_name = \"{instance}\"\n[database]\nurl = \"{url}\"\n\
             [replication]\nredis = \"redis://127.0.0.1:6379\"\n[stream_writers]\nevents = [{}]\n\
             [instance_map]\nmaster = \"127.0.0.1:1\"\np1 = \"127.0.0.1:2\"\np2 = \"127.0.0.1:3\"\n",
            writers.join(", ")
        ),
        role,
    )?)
}

fn expect_conflict(result: Result<DataStore, StoreError>, expected: &str) -> TestResult {
    match result {
        Err(StoreError::Misconfigured(message)) if message.contains(expected) => Ok(()),
        Err(other) => Err(format!("expected a conflict naming {expected:?}, got: {other}").into()),
        Ok(_) => Err(format!("expected a conflict naming {expected:?}, but the store was built").into()),
    }
}

/// The events writers `store` goes by.
fn events_writers(store: &DataStore) -> Vec<String> {
    store.context().deployment_writers().writers_of("events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_decides_the_writers_and_a_config_only_seeds_it() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let url = test_db.url.clone();
    // Before the master has recorded anything, a worker cannot know whether its
    // writers are right, and its generators would delete others' positions.
    expect_conflict(
        build_store(&test_db.db, &deployment_config(&url, "p1", &["p1", "p2"])?.store_settings()).await,
        "the master has not recorded the deployment's writers of `events` in this database yet; start the master first",
    )?;

    // The master seeds the record from its config.
    let master: DataStore =
        build_store(&test_db.db, &deployment_config(&url, "master", &["p1", "p2"])?.store_settings()).await?;
    assert_eq!(events_writers(&master), ["p1", "p2"]);
    assert_eq!(master.context().deployment_writers().current("events").map(|set| set.epoch), Some(1));
    let p1: DataStore =
        build_store(&test_db.db, &deployment_config(&url, "p1", &["p1", "p2"])?.store_settings()).await?;
    assert!(p1.events_writer().is_some() && p1.context().settings().is_writer_for("events"));
    // A config listing others (even the same in another order, which shards
    // differently) adopts the record.
    let p2: DataStore =
        build_store(&test_db.db, &deployment_config(&url, "p2", &["p2", "p1"])?.store_settings()).await?;
    assert_eq!(events_writers(&p2), ["p1", "p2"]);
    assert_eq!(p2.context().settings().writers_for("events"), ["p1", "p2"]);

    // So does a master restarted with a new config: the record stays.
    let master: DataStore =
        build_store(&test_db.db, &deployment_config(&url, "master", &["p1"])?.store_settings()).await?;
    assert_eq!(events_writers(&master), ["p1", "p2"]);
    let p3: DataStore =
        build_store(&test_db.db, &deployment_config(&url, "p3", &["p3"])?.store_settings()).await?;
    assert_eq!(events_writers(&p3), ["p1", "p2"]);
    // Not a writer, but it may become one: its write half is built, and its
    // generator refuses to allocate until it joins.
    let writer = p3.events_writer().ok_or("every worker of a deployment can join the events writers")?;
    assert!(!writer.reader().events_stream().is_allocating());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_on_a_recorded_deployment_all_start() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let url = test_db.url.clone();
    let _master: DataStore =
        build_store(&test_db.db, &deployment_config(&url, "master", &["p1", "p2"])?.store_settings()).await?;
    let mut starts = tokio::task::JoinSet::new();
    for instance in ["master", "p1", "p2", "p1", "p2"] {
        let (db, config) = (test_db.reconnect().await?, deployment_config(&url, instance, &["p1", "p2"])?);
        starts.spawn(async move { build_store::<DataStore>(&db, &config.store_settings()).await.map(drop) });
    }
    while let Some(started) = starts.join_next().await {
        started??;
    }
    Ok(())
}

/// Every process has the users store, over the one database; a logout on one
/// process reaches another's token cache when it follows the `caches` stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_one_process_reaches_the_others_through_replication() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let url = test_db.url.clone();
    let master: DataStore =
        build_store(&test_db.db, &deployment_config(&url, "master", &["master"])?.store_settings()).await?;
    let follower: DataStore = build_store(
        &test_db.reconnect().await?,
        &deployment_config(&url, "p1", &["master"])?.store_settings(),
    )
    .await?;
    assert!(master.users().register("@a:test").await?);
    assert!(!follower.users().register("@a:test").await?, "one database, one namespace of users");
    let token = follower.users().create_access_token("@a:test").await?;
    assert_eq!(follower.users().get_user_by_access_token(&token).await?.as_deref(), Some("@a:test"));

    assert!(master.users().delete_access_token(&token).await?);
    assert_eq!(
        follower.users().get_user_by_access_token(&token).await?.as_deref(),
        Some("@a:test"),
        "the follower's cache answers until it follows the master"
    );
    follow(follower.worker(), &master).await?;
    assert_eq!(follower.users().get_user_by_access_token(&token).await?, None);
    Ok(())
}

#[test]
fn unknown_streams_and_several_typing_writers_are_refused() -> TestResult {
    use store_core::check_stream_writers;
    let config = |writers: &str| {
        ServerConfig::from_toml_str(
            &format!(
                "server_name = \"test\"\n[stream_writers]\n{writers}\n[instance_map]\nmaster = \"127.0.0.1:1\"\nw = \"127.0.0.1:2\"\n"
            ),
            Role::Master,
        )
    };
    let error =
        check_stream_writers(&config("evnts = [\"master\"]")?.store_settings(), &DataStore::stream_specs())
            .err()
            .ok_or("evnts is refused")?;
    assert!(error.contains("`[stream_writers] evnts`: no such stream; the streams with configurable writers are events, receipts, account_data, typing"), "{error}");
    let error = check_stream_writers(
        &config("typing = [\"master\", \"w\"]")?.store_settings(),
        &DataStore::stream_specs(),
    )
    .err()
    .ok_or("two typing writers")?;
    assert!(error.contains("typing has exactly one"), "{error}");
    check_stream_writers(
        &config("events = [\"master\", \"w\"]\ntyping = [\"w\"]")?.store_settings(),
        &DataStore::stream_specs(),
    )?;
    Ok(())
}

/// The example configs agree on their writers and name only known streams, so
/// that a deployment started from them starts.
#[test]
fn the_example_configs_form_one_deployment() -> TestResult {
    use store_core::check_stream_writers;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
    let mut writers = Vec::new();
    for (file, role) in
        [("master.toml", Role::Master), ("persister.toml", Role::Worker), ("worker.toml", Role::Worker)]
    {
        let config = ServerConfig::load(&examples.join(file), role, &Overrides::default())?;
        check_stream_writers(&config.store_settings(), &DataStore::stream_specs())
            .map_err(|err| format!("docs/examples/{file}: {err}"))?;
        writers.push((file, config.stream_writers));
    }
    for (file, stream_writers) in &writers[1..] {
        assert_eq!(
            stream_writers, &writers[0].1,
            "docs/examples/{file} lists other writers than master.toml"
        );
    }
    Ok(())
}
