//! store-account-data against real PostgreSQL and SQLite.

use std::sync::Arc;

use serde_json::json;
use store_account_data::{AccountDataReader, AccountDataRow, AccountDataWriter};
use store_core::{CachesStream, Database, Engine, StoreContext, StoreError, StoreSettings};
use store_test_support::{TestDb, TestResult, build_alone, engine_tests};

/// Another process of the same deployment, which does not write `account_data`.
fn follower() -> StoreSettings {
    StoreSettings::single_process().with_instance("worker1")
}

async fn build_writer(
    db: &Database,
    settings: &StoreSettings,
) -> Result<(Arc<CachesStream>, AccountDataWriter), StoreError> {
    let (ctx, writer) = build_alone::<(StoreContext, AccountDataWriter)>(db, settings).await?;
    Ok((Arc::clone(ctx.caches()), writer))
}

async fn build_reader(
    db: &Database,
    settings: &StoreSettings,
) -> Result<(StoreContext, AccountDataReader), StoreError> {
    build_alone::<(StoreContext, AccountDataReader)>(db, settings).await
}

fn hits(caches: &CachesStream, name: &str) -> u64 {
    caches.registry().stats()[name].0.hits
}

/// Catches `reader` up on everything the master wrote, as replication would.
async fn follow(reader: &AccountDataReader, writer: &AccountDataWriter) -> Result<i64, StoreError> {
    let from = reader.stream().get_current_token_for_writer("master");
    let to = writer.reader().stream().get_current_token_for_writer("master");
    let updates = reader.get_account_data_updates("master", from, to, 100).await?;
    assert!(!updates.limited);
    let rows: Vec<AccountDataRow> = updates.rows.into_iter().map(|(_, row)| row).collect();
    reader.process_account_data_rows("master", updates.token, &rows);
    Ok(to)
}

engine_tests!(
    global_data_is_cached_and_fresh_after_overwrite,
    room_data_is_per_room_and_apart_from_global_data,
    a_follower_applying_rows_serves_fresh_data,
    catch_up_is_cut_at_the_limit,
    a_non_writer_is_refused_and_a_writer_shares_the_processs_reader
);

async fn global_data_is_cached_and_fresh_after_overwrite(test_db: TestDb) -> TestResult {
    let (caches, writer) = build_writer(&test_db.db, &StoreSettings::single_process()).await?;
    let reader = writer.reader();
    let first = writer.add_account_data("@a:x", None, "m.push_rules", &json!({"v": 1})).await?;
    writer.add_account_data("@a:x", None, "m.direct", &json!({"@b:x": ["!r"]})).await?;
    let b_id = writer.add_account_data("@b:x", None, "m.push_rules", &json!({"v": 9})).await?;

    let data = reader.get_global_account_data_for_user("@a:x").await?;
    assert_eq!(data.keys().collect::<Vec<_>>(), ["m.direct", "m.push_rules"]);
    assert_eq!(data["m.push_rules"], json!({"v": 1}));
    let before = hits(&caches, "get_global_account_data_for_user");
    assert_eq!(reader.get_global_account_data_for_user("@a:x").await?, data);
    assert_eq!(hits(&caches, "get_global_account_data_for_user"), before + 1);

    let second = writer.add_account_data("@a:x", None, "m.push_rules", &json!({"v": 2})).await?;
    assert!(second > first);
    assert_eq!(reader.stream().get_current_token(), second);
    let data = reader.get_global_account_data_for_user("@a:x").await?;
    assert_eq!(data["m.push_rules"], json!({"v": 2}));
    assert_eq!(data.len(), 2);
    assert!(reader.user_changes().has_entity_changed("@a:x", b_id));
    assert!(!reader.user_changes().has_entity_changed("@b:x", b_id));
    // Another user's entry was not stale, so it was kept: this read is a hit.
    assert_eq!(reader.get_global_account_data_for_user("@b:x").await?["m.push_rules"], json!({"v": 9}));
    let before = hits(&caches, "get_global_account_data_for_user");
    reader.get_global_account_data_for_user("@b:x").await?;
    assert_eq!(hits(&caches, "get_global_account_data_for_user"), before + 1);
    assert!(reader.get_global_account_data_for_user("@nobody:x").await?.is_empty());
    Ok(())
}

async fn room_data_is_per_room_and_apart_from_global_data(test_db: TestDb) -> TestResult {
    let (caches, writer) = build_writer(&test_db.db, &StoreSettings::single_process()).await?;
    let reader = writer.reader();
    writer.add_account_data("@a:x", Some("!r1"), "m.tag", &json!({"tags": {}})).await?;
    writer.add_account_data("@a:x", Some("!r2"), "m.tag", &json!({"tags": {"u.work": {}}})).await?;
    writer.add_account_data("@a:x", None, "m.tag", &json!({"global": true})).await?;

    assert_eq!(
        *reader.get_room_account_data_for_user("@a:x", "!r1").await?,
        [("m.tag".to_owned(), json!({"tags": {}}))].into()
    );
    let before = hits(&caches, "get_room_account_data_for_user");
    reader.get_room_account_data_for_user("@a:x", "!r1").await?;
    reader.get_room_account_data_for_user("@a:x", "!r2").await?;
    assert_eq!(hits(&caches, "get_room_account_data_for_user"), before + 1);
    assert_eq!(reader.get_global_account_data_for_user("@a:x").await?["m.tag"], json!({"global": true}));

    writer.add_account_data("@a:x", Some("!r1"), "m.tag", &json!({"tags": {"m.favourite": {}}})).await?;
    writer.add_account_data("@a:x", Some("!r1"), "m.fully_read", &json!({"event_id": "$e"})).await?;
    let room = reader.get_room_account_data_for_user("@a:x", "!r1").await?;
    assert_eq!(room["m.tag"], json!({"tags": {"m.favourite": {}}}));
    assert_eq!(room["m.fully_read"], json!({"event_id": "$e"}));
    // Writes in !r1 leave the cached maps of !r2 and of the global scope alone.
    let before = hits(&caches, "get_room_account_data_for_user");
    assert_eq!(
        reader.get_room_account_data_for_user("@a:x", "!r2").await?["m.tag"],
        json!({"tags": {"u.work": {}}})
    );
    assert_eq!(hits(&caches, "get_room_account_data_for_user"), before + 1);
    let before = hits(&caches, "get_global_account_data_for_user");
    assert_eq!(reader.get_global_account_data_for_user("@a:x").await?["m.tag"], json!({"global": true}));
    assert_eq!(hits(&caches, "get_global_account_data_for_user"), before + 1);
    Ok(())
}

async fn a_follower_applying_rows_serves_fresh_data(test_db: TestDb) -> TestResult {
    let (_master_caches, writer) = build_writer(&test_db.db, &StoreSettings::single_process()).await?;
    let worker_db = test_db.reconnect().await?;
    let (_worker_caches, reader) = build_reader(&worker_db, &follower()).await?;
    assert!(matches!(reader.stream().get_next().await, Err(StoreError::NotAWriter { .. })));

    writer.add_account_data("@a:x", None, "m.push_rules", &json!({"v": 1})).await?;
    writer.add_account_data("@a:x", Some("!r"), "m.tag", &json!({"v": 1})).await?;
    follow(&reader, &writer).await?;
    // Fill the follower's caches.
    assert_eq!(reader.get_global_account_data_for_user("@a:x").await?["m.push_rules"], json!({"v": 1}));
    assert_eq!(reader.get_room_account_data_for_user("@a:x", "!r").await?["m.tag"], json!({"v": 1}));

    let before = reader.stream().get_current_token_for_writer("master");
    writer.add_account_data("@a:x", None, "m.push_rules", &json!({"v": 2})).await?;
    writer.add_account_data("@a:x", Some("!r"), "m.tag", &json!({"v": 2})).await?;
    let to = follow(&reader, &writer).await?;
    assert!(to > before);
    assert_eq!(reader.stream().get_current_token_for_writer("master"), to);
    assert!(reader.user_changes().has_entity_changed("@a:x", before));
    assert_eq!(reader.get_global_account_data_for_user("@a:x").await?["m.push_rules"], json!({"v": 2}));
    assert_eq!(reader.get_room_account_data_for_user("@a:x", "!r").await?["m.tag"], json!({"v": 2}));
    Ok(())
}

async fn catch_up_is_cut_at_the_limit(test_db: TestDb) -> TestResult {
    let (_caches, writer) = build_writer(&test_db.db, &StoreSettings::single_process()).await?;
    let reader = writer.reader();
    let start = reader.stream().get_current_token();
    let a = writer.add_account_data("@a:x", None, "m.direct", &json!({})).await?;
    let b = writer.add_account_data("@b:x", Some("!r"), "m.tag", &json!({})).await?;
    let c = writer.add_account_data("@c:x", None, "m.direct", &json!({})).await?;
    let current = reader.stream().get_current_token();
    assert_eq!(current, c);
    // A row of another writer, which `master`'s catch-up must not return.
    test_db
        .db
        .run_interaction("insert_foreign_row", |txn| {
            Box::pin(async move {
                txn.execute(
                    "INSERT INTO account_data (stream_id, instance_name, user_id, room_id, account_data_type, content) \
                     VALUES ($1, 'worker9', '@z:x', NULL, 'm.direct', '{}')",
                    &[&(c - 1_000_000)],
                )
                .await
            })
        })
        .await?;

    let first = reader.get_account_data_updates("master", start - 1_000_001, current, 2).await?;
    assert!(first.limited);
    assert_eq!(first.token, b);
    let ids_and_users = |rows: &[(i64, AccountDataRow)]| -> Vec<(i64, String)> {
        rows.iter().map(|(id, row)| (*id, row.user_id.clone())).collect()
    };
    assert_eq!(ids_and_users(&first.rows), [(a, "@a:x".to_owned()), (b, "@b:x".to_owned())]);
    assert_eq!(first.rows[1].1.room_id.as_deref(), Some("!r"));

    // Exactly `limit` rows left: the page is full, so it counts as cut.
    let second = reader.get_account_data_updates("master", first.token, current, 1).await?;
    assert!(second.limited);
    assert_eq!((second.token, ids_and_users(&second.rows)), (c, vec![(c, "@c:x".to_owned())]));
    let third = reader.get_account_data_updates("master", second.token, current, 1).await?;
    assert!(!third.limited && third.rows.is_empty());
    assert_eq!(third.token, current);

    // Fewer rows than the limit: not cut, and the token reached is `to`.
    let all = reader.get_account_data_updates("master", start, current + 5, 10).await?;
    assert!(!all.limited);
    assert_eq!(all.token, current + 5);
    assert_eq!(all.rows.len(), 3);
    Ok(())
}

async fn a_non_writer_is_refused_and_a_writer_shares_the_processs_reader(test_db: TestDb) -> TestResult {
    let refused = build_writer(&test_db.db, &follower()).await;
    assert!(
        matches!(&refused, Err(StoreError::NotAWriter { stream, instance }) if stream == "account_data" && instance == "worker1"),
        "{refused:?}"
    );

    // The writer allocates from the one reader of the process, the one the
    // context hands every half that asks for it.
    let db = &test_db.db;
    let (ctx, writer) =
        build_alone::<(StoreContext, AccountDataWriter)>(db, &StoreSettings::single_process()).await?;
    let mut conn = db.begin("ask_for_the_reader").await?;
    let reader: Arc<AccountDataReader> = ctx.component(db, &mut conn).await?;
    conn.commit().await?;
    assert!(Arc::ptr_eq(&writer.shared_reader(), &reader));
    let id = writer.add_account_data("@a:x", None, "m.direct", &json!({})).await?;
    assert_eq!(reader.stream().get_current_token(), id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_key_leave_the_latest() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (_caches, writer) = build_writer(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = Arc::new(writer);
    let mut tasks = tokio::task::JoinSet::new();
    // Enough writers of one key that, under a snapshot isolation, some would
    // run out of retries; every one of them must succeed.
    for n in 0..32 {
        let writer = Arc::clone(&writer);
        tasks.spawn(async move {
            let id = writer.add_account_data("@a:x", Some("!r"), "m.tag", &json!({"n": n})).await?;
            Ok::<_, StoreError>((id, n))
        });
    }
    let mut latest = (i64::MIN, -1);
    while let Some(result) = tasks.join_next().await {
        latest = latest.max(result??);
    }
    let room = writer.reader().get_room_account_data_for_user("@a:x", "!r").await?;
    assert_eq!(room["m.tag"], json!({"n": latest.1}), "the highest stream ID ({}) wins", latest.0);
    let all = writer.reader().get_account_data_updates("master", 0, latest.0, 100).await?;
    assert_eq!(all.rows.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [latest.0]);
    Ok(())
}

#[test]
fn account_data_rows_match_the_wire_form() {
    let json = r#"["@u:x",null,"m.push_rules"]"#;
    let row: AccountDataRow = serde_json::from_str(json).unwrap();
    assert_eq!(
        row,
        AccountDataRow { user_id: "@u:x".to_owned(), room_id: None, data_type: "m.push_rules".to_owned() }
    );
    assert_eq!(serde_json::to_string(&row).unwrap(), json);

    let in_room = AccountDataRow {
        user_id: "@u:x".to_owned(),
        room_id: Some("!r:x".to_owned()),
        data_type: "m.tag".to_owned(),
    };
    let text = serde_json::to_string(&in_room).unwrap();
    assert_eq!(text, r#"["@u:x","!r:x","m.tag"]"#);
    assert_eq!(serde_json::from_str::<AccountDataRow>(&text).unwrap(), in_room);
    assert!(serde_json::from_str::<AccountDataRow>(r#"["@u:x",null]"#).is_err());
    assert!(
        serde_json::from_str::<AccountDataRow>(r#"{"user_id":"@u:x","room_id":null,"data_type":"t"}"#)
            .is_err()
    );
}
