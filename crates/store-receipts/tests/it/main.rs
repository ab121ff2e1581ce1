//! store-receipts against real PostgreSQL and SQLite.

use std::sync::Arc;

use store_core::{CachesStream, Database, Engine, StoreContext, StoreError, StoreSettings, build_store};
use store_receipts::{ReceiptRow, ReceiptsReader, ReceiptsWriter};
use store_test_support::{TestDb, TestResult, engine_tests};

async fn writer(
    db: &Database,
    settings: &StoreSettings,
) -> Result<(Arc<CachesStream>, ReceiptsWriter), StoreError> {
    let (ctx, writer) = build_store::<(StoreContext, ReceiptsWriter)>(db, settings).await?;
    Ok((Arc::clone(ctx.caches()), writer))
}

fn receipt(room: &str, user: &str, event: &str, thread: Option<&str>) -> ReceiptRow {
    ReceiptRow {
        room_id: room.to_owned(),
        receipt_type: "m.read".to_owned(),
        user_id: user.to_owned(),
        event_id: event.to_owned(),
        thread_id: thread.map(str::to_owned),
        data: serde_json::json!({"ts": 1}),
    }
}

fn events_of(receipts: &[ReceiptRow]) -> Vec<(&str, &str)> {
    receipts.iter().map(|r| (r.user_id.as_str(), r.event_id.as_str())).collect()
}

engine_tests!(
    one_current_receipt_per_user_type_and_thread,
    writes_invalidate_exactly_the_stale_caches,
    changed_rooms_and_catch_up,
    receipts_queued_together_share_a_commit
);

/// Receipts queued while a commit is in flight share the next one, in their
/// order: of several receipts of one key in a group, the last queued is the
/// one kept.
async fn receipts_queued_together_share_a_commit(test_db: TestDb) -> TestResult {
    let (_caches, writer) = writer(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = Arc::new(writer);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..40 {
        let writer = Arc::clone(&writer);
        // Users @u0..@u3 in rooms !r0..!r4, each key written twice.
        let receipt = receipt(&format!("!r{}", n % 5), &format!("@u{}", (n / 5) % 4), &format!("${n}"), None);
        tasks.spawn(async move { (n, writer.insert_receipt(&receipt).await) });
    }
    let mut ids = std::collections::BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        let (n, id) = result?;
        ids.insert(n, id?);
    }
    let reader = writer.reader();
    for room in 0..5 {
        let kept = reader.get_receipts_for_room(&format!("!r{room}"), "m.read").await?;
        for receipt in kept.iter() {
            // The key's two receipts: the one with the later stream ID stays.
            let user: usize = receipt.user_id[2..].parse()?;
            let candidates: Vec<usize> = (0..40).filter(|n| n % 5 == room && (n / 5) % 4 == user).collect();
            let latest = candidates.iter().max_by_key(|n| ids[n]).ok_or("two receipts")?;
            assert_eq!(receipt.event_id, format!("${latest}"), "{room}: {receipt:?}");
        }
        assert_eq!(kept.len(), 4, "one receipt per user in !r{room}");
    }
    let stats = writer.group_stats();
    assert_eq!(stats.jobs, 40);
    assert!(stats.commits < stats.jobs, "receipts shared commits: {stats:?}");
    Ok(())
}

async fn one_current_receipt_per_user_type_and_thread(test_db: TestDb) -> TestResult {
    let (_caches, writer) = writer(&test_db.db, &StoreSettings::single_process()).await?;
    let first = writer.insert_receipt(&receipt("!r", "@a", "$1", None)).await?;
    let second = writer.insert_receipt(&receipt("!r", "@a", "$2", None)).await?;
    writer.insert_receipt(&receipt("!r", "@a", "$t1", Some("$thread"))).await?;
    writer.insert_receipt(&receipt("!r", "@b", "$1", None)).await?;
    assert!(second > first);
    let reader = writer.reader();
    let receipts = reader.get_receipts_for_room("!r", "m.read").await?;
    assert_eq!(events_of(&receipts), [("@a", "$2"), ("@a", "$t1"), ("@b", "$1")]);
    assert_eq!(reader.get_last_receipt_event_id_for_user("@a", "!r", "m.read").await?.as_deref(), Some("$2"));
    assert_eq!(reader.get_last_receipt_event_id_for_user("@c", "!r", "m.read").await?, None);
    Ok(())
}

async fn writes_invalidate_exactly_the_stale_caches(test_db: TestDb) -> TestResult {
    let (caches, writer) = writer(&test_db.db, &StoreSettings::single_process()).await?;
    let reader = writer.reader();
    writer.insert_receipt(&receipt("!r", "@a", "$1", None)).await?;
    writer.insert_receipt(&receipt("!other", "@a", "$9", None)).await?;
    // Fill the caches.
    reader.get_receipts_for_room("!r", "m.read").await?;
    reader.get_receipts_for_room("!other", "m.read").await?;
    assert_eq!(reader.get_last_receipt_event_id_for_user("@a", "!r", "m.read").await?.as_deref(), Some("$1"));

    writer.insert_receipt(&receipt("!r", "@a", "$2", None)).await?;
    assert_eq!(events_of(&reader.get_receipts_for_room("!r", "m.read").await?), [("@a", "$2")]);
    assert_eq!(reader.get_last_receipt_event_id_for_user("@a", "!r", "m.read").await?.as_deref(), Some("$2"));
    // The other room's entry was not stale, so it was kept: this read is a hit.
    let hits = caches.registry().stats()["get_receipts_for_room"].0.hits;
    reader.get_receipts_for_room("!other", "m.read").await?;
    assert_eq!(caches.registry().stats()["get_receipts_for_room"].0.hits, hits + 1);
    Ok(())
}

async fn changed_rooms_and_catch_up(test_db: TestDb) -> TestResult {
    let (_caches, writer) = writer(&test_db.db, &StoreSettings::single_process()).await?;
    let reader = writer.reader();
    let start = reader.stream().get_current_token();
    let a = writer.insert_receipt(&receipt("!a", "@u", "$1", None)).await?;
    let b = writer.insert_receipt(&receipt("!b", "@u", "$2", None)).await?;
    let current = reader.stream().get_current_token();
    assert_eq!(current, b);
    assert!(!reader.room_changes().has_entity_changed("!a", a));
    let since_a = reader.get_receipts_for_rooms_since(&["!a", "!b", "!c"], a, current).await?;
    assert_eq!(since_a.iter().map(|r| r.room_id.as_str()).collect::<Vec<_>>(), ["!b"]);

    let cut = reader.get_receipts_updates("master", start, current, 1).await?;
    assert!(cut.limited);
    assert_eq!(cut.token, a);
    let rest = reader.get_receipts_updates("master", cut.token, current, 1).await?;
    assert_eq!(rest.rows.iter().map(|(id, r)| (*id, r.room_id.as_str())).collect::<Vec<_>>(), [(b, "!b")]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_applying_rows_serves_fresh_receipts() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (_master_caches, writer) = writer(&test_db.db, &StoreSettings::single_process()).await?;
    let worker_db = test_db.reconnect().await?;
    let reader: ReceiptsReader = build_store(&worker_db, &StoreSettings::in_deployment("worker1")).await?;
    assert!(matches!(reader.stream().get_next().await, Err(StoreError::NotAWriter { .. })));

    writer.insert_receipt(&receipt("!r", "@a", "$1", None)).await?;
    let from = reader.stream().get_current_token_for_writer("master");
    let mut to = writer.reader().stream().get_current_token_for_writer("master");
    let updates = reader.get_receipts_updates("master", from, to, 100).await?;
    let rows: Vec<ReceiptRow> = updates.rows.iter().map(|(_, row)| row.clone()).collect();
    reader.process_receipts_rows("master", updates.token, &rows);
    assert_eq!(reader.get_last_receipt_event_id_for_user("@a", "!r", "m.read").await?.as_deref(), Some("$1"));

    writer.insert_receipt(&receipt("!r", "@a", "$2", None)).await?;
    let from = to;
    to = writer.reader().stream().get_current_token_for_writer("master");
    let updates = reader.get_receipts_updates("master", from, to, 100).await?;
    let rows: Vec<ReceiptRow> = updates.rows.iter().map(|(_, row)| row.clone()).collect();
    reader.process_receipts_rows("master", updates.token, &rows);
    assert_eq!(reader.stream().get_current_token_for_writer("master"), to);
    assert_eq!(reader.get_last_receipt_event_id_for_user("@a", "!r", "m.read").await?.as_deref(), Some("$2"));
    assert_eq!(events_of(&reader.get_receipts_for_room("!r", "m.read").await?), [("@a", "$2")]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_receipts_written_at_once_leave_one_row() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (_caches, writer) = writer(&test_db.db, &StoreSettings::single_process()).await?;
    let writer = Arc::new(writer);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..8 {
        let writer = Arc::clone(&writer);
        tasks.spawn(async move { writer.insert_receipt(&receipt("!r", "@a", &format!("${n}"), None)).await });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let receipts = writer.reader().get_receipts_for_room("!r", "m.read").await?;
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    assert!(writer.reader().get_last_receipt_event_id_for_user("@a", "!r", "m.read").await?.is_some());
    Ok(())
}
