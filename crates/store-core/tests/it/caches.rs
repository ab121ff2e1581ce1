//! The `caches` stream: local invalidation after commit, rows for other processes
//! (PostgreSQL deployments of several processes only), catch-up, replay on a
//! worker, the batched current-state poke, and pruning; and the caches' own
//! bounds on real reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use store_core::{
    CURRENT_STATE_POKE, Cache, CacheConfig, CacheRegistry, CachesRow, CachesStream, Database, Engine,
    StoreError, StoreSettings, StreamUpdates,
};
use store_test_support::{TestDb, TestResult, engine_tests};

/// A process's caches: a registry with one cache, and its `caches` stream.
struct Process {
    stream: CachesStream,
    users: Arc<Cache<String, u32>>,
}

async fn process(db: &Database, settings: &StoreSettings) -> Result<Process, StoreError> {
    let registry = CacheRegistry::new(settings.caches.clone());
    let users = registry.register::<String, u32>("get_user")?;
    let mut conn = db.begin("build_caches").await?;
    let stream = CachesStream::new(db.clone(), &mut conn, settings, registry).await?;
    conn.commit().await?;
    Ok(Process { stream, users })
}

fn fill(cache: &Cache<String, u32>, key: &str, value: u32) {
    let ticket = cache.begin_fill(&key.to_owned());
    cache.finish_fill(ticket, value);
}

async fn count_rows(db: &Database) -> Result<i64, StoreError> {
    db.run_autocommit("count_cache_rows", |txn| {
        Box::pin(async move {
            txn.query_one("SELECT COUNT(*) FROM cache_invalidation_stream_by_instance", &[]).await?.get(0)
        })
    })
    .await
}

engine_tests!(
    invalidation_applies_after_commit_only,
    a_single_process_records_no_rows,
    heavy_rows_stay_within_the_byte_budget,
    a_key_in_use_outlives_colder_entries_under_either_bound,
    a_row_heavier_than_the_budget_is_read_but_not_cached,
    a_read_across_an_invalidation_fills_nothing_under_a_budget
);

async fn invalidation_applies_after_commit_only(test_db: TestDb) -> TestResult {
    let Process { stream, users } = process(&test_db.db, &StoreSettings::single_process()).await?;
    fill(&users, "@a", 1);
    let stream = Arc::new(stream);
    let users_inside = Arc::clone(&users);
    let seen_inside = test_db
        .db
        .run_interaction("invalidate_then_commit", |txn| {
            let (stream, users) = (Arc::clone(&stream), Arc::clone(&users_inside));
            Box::pin(async move {
                stream.invalidate_in_txn(txn, "get_user", Some(vec!["@a".to_owned()])).await?;
                Ok(users.get(&"@a".to_owned()))
            })
        })
        .await?;
    assert_eq!(seen_inside, Some(1), "nothing is invalidated before the commit");
    assert_eq!(users.get(&"@a".to_owned()), None);

    fill(&users, "@a", 2);
    let result: Result<(), StoreError> = test_db
        .db
        .run_interaction("invalidate_then_fail", |txn| {
            let stream = Arc::clone(&stream);
            Box::pin(async move {
                stream.invalidate_in_txn(txn, "get_user", None).await?;
                Err(StoreError::Misconfigured("the write fails".to_owned()))
            })
        })
        .await;
    assert!(result.is_err());
    assert_eq!(users.get(&"@a".to_owned()), Some(2), "a rolled-back write invalidates nothing");
    Ok(())
}

async fn a_single_process_records_no_rows(test_db: TestDb) -> TestResult {
    let Process { stream, .. } = process(&test_db.db, &StoreSettings::single_process()).await?;
    assert!(!stream.is_recording());
    let stream = Arc::new(stream);
    test_db
        .db
        .run_interaction("invalidate", |txn| {
            let stream = Arc::clone(&stream);
            Box::pin(async move { stream.poke_current_state(txn, "!r", &["@a".to_owned()]).await })
        })
        .await?;
    assert_eq!(count_rows(&test_db.db).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_reach_a_worker_which_invalidates_then_advances() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master = Arc::new(process(&test_db.db, &StoreSettings::in_deployment("master")).await?);
    let worker_db = test_db.reconnect().await?;
    let worker = process(&worker_db, &StoreSettings::in_deployment("worker1")).await?;
    assert!(master.stream.is_recording());
    let before = worker.stream.current_token("master");

    fill(&worker.users, "@a", 1);
    fill(&worker.users, "@b", 2);
    test_db
        .db
        .run_interaction("invalidate_two", |txn| {
            let master = Arc::clone(&master);
            Box::pin(async move {
                master.stream.invalidate_in_txn(txn, "get_user", Some(vec!["@a".to_owned()])).await?;
                master.stream.invalidate_in_txn(txn, "no_cache_on_the_worker", None).await
            })
        })
        .await?;
    let current = master.stream.current_token("master");
    assert!(current > before);

    // The worker catches up from the database, as after a gap in replication.
    let StreamUpdates { rows, token, limited } =
        worker.stream.get_updates_since("master", before, current, 100).await?;
    assert!(!limited);
    assert_eq!(token, current);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].1.cache_func, "get_user");
    assert_eq!(rows[0].1.keys.as_deref(), Some(&["@a".to_owned()][..]));
    assert_eq!(rows[1].1.keys, None);
    let rows: Vec<CachesRow> = rows.into_iter().map(|(_, row)| row).collect();
    worker.stream.apply_rows("master", token, &rows);
    assert_eq!(worker.users.get(&"@a".to_owned()), None);
    assert_eq!(worker.users.get(&"@b".to_owned()), Some(2));
    assert_eq!(worker.stream.current_token("master"), token);

    // A limit cuts the result at the last row returned.
    let StreamUpdates { rows, token, limited } =
        worker.stream.get_updates_since("master", before, current, 1).await?;
    assert!(limited);
    assert_eq!(rows.len(), 1);
    assert_eq!(token, rows[0].0);

    // The caches stream never touches stream_positions.
    let positions: i64 = test_db
        .db
        .run_autocommit("count_positions", |txn| {
            Box::pin(async move {
                txn.query_one("SELECT COUNT(*) FROM stream_positions WHERE stream_name = 'caches'", &[])
                    .await?
                    .get(0)
            })
        })
        .await?;
    assert_eq!(positions, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_knows_what_the_caches_sequence_handed_out() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master = Arc::new(process(&test_db.db, &StoreSettings::in_deployment("master")).await?);
    let worker_db = test_db.reconnect().await?;
    let worker = process(&worker_db, &StoreSettings::in_deployment("worker1")).await?;
    test_db
        .db
        .run_interaction("invalidate", |txn| {
            let master = Arc::clone(&master);
            Box::pin(async move { master.stream.invalidate_in_txn(txn, "get_user", None).await })
        })
        .await?;
    let written = master.stream.current_token("master");
    // The stream has no writers list; its generator still asks the sequence.
    let generator = worker.stream.generator().ok_or("PostgreSQL has a caches generator")?;
    assert!(generator.is_handed_out(written).await?, "the master took {written} from the sequence");
    assert!(!generator.is_handed_out(written + 1).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_state_change_is_one_row_per_fifty_members() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master = Arc::new(process(&test_db.db, &StoreSettings::in_deployment("master")).await?);
    let members: Vec<String> = (0..120).map(|n| format!("@user{n}:example.com")).collect();
    for members_changed in [Vec::new(), members] {
        let before = count_rows(&test_db.db).await?;
        let (master, changed) = (Arc::clone(&master), members_changed.clone());
        test_db
            .db
            .run_interaction("poke", move |txn| {
                let (master, changed) = (Arc::clone(&master), changed.clone());
                Box::pin(
                    async move { master.stream.poke_current_state(txn, "!r:example.com", &changed).await },
                )
            })
            .await?;
        let written = count_rows(&test_db.db).await? - before;
        let expected = members_changed.len().div_ceil(50).max(1);
        assert_eq!(written, i64::try_from(expected)?, "{} members changed", members_changed.len());
    }
    let rows =
        master.stream.get_updates_since("master", 1, master.stream.current_token("master"), 100).await?.rows;
    let keys: Vec<Vec<String>> = rows.into_iter().filter_map(|(_, row)| row.keys).collect();
    assert_eq!(keys[0], ["!r:example.com"]);
    assert_eq!(keys[1].len(), 51);
    assert_eq!(keys[1][0], "!r:example.com");
    assert_eq!(keys[3].len(), 21);
    assert!(rows_are_magic(&keys));
    Ok(())
}

fn rows_are_magic(keys: &[Vec<String>]) -> bool {
    keys.iter().all(|keys| keys.first().is_some_and(|room| room == "!r:example.com"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_rows_are_pruned_oldest_first() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let master = process(&test_db.db, &StoreSettings::in_deployment("master")).await?;
    test_db
        .db
        .run_interaction("old_rows", |txn| {
            Box::pin(async move {
                for (id, ts) in [(100i64, 1_000i64), (101, 2_000), (102, 3_000), (103, 9_000_000_000_000)] {
                    txn.execute(
                        "INSERT INTO cache_invalidation_stream_by_instance \
                         (stream_id, instance_name, cache_func, keys, invalidation_ts) VALUES ($1, 'master', 'c', NULL, $2)",
                        &[&id, &ts],
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .await?;
    assert_eq!(master.stream.prune_before(2_500, 10).await?, 2);
    assert_eq!(master.stream.prune_before(2_500, 10).await?, 0);
    assert_eq!(master.stream.prune(1).await?, 1, "the default retention removes the 1970 row, in batches");
    assert_eq!(count_rows(&test_db.db).await?, 1, "the recent row stays");
    Ok(())
}

#[test]
fn caches_rows_match_the_wire_vectors() {
    let cases = [
        (
            r#"["get_user_by_id",["@a:example.com"],1490197670513]"#,
            "get_user_by_id",
            Some(vec!["@a:example.com"]),
            1_490_197_670_513,
        ),
        (r#"["get_user_by_id",null,1550574873252]"#, "get_user_by_id", None, 1_550_574_873_252),
        (
            r#"["cs_cache_fake",["!r:example.com","@u:example.com"],1550574873253]"#,
            CURRENT_STATE_POKE,
            Some(vec!["!r:example.com", "@u:example.com"]),
            1_550_574_873_253,
        ),
    ];
    for (json, cache_func, keys, ts) in cases {
        let row: CachesRow = serde_json::from_str(json).expect("parses");
        let expected = CachesRow {
            cache_func: cache_func.to_owned(),
            keys: keys.map(|keys| keys.into_iter().map(str::to_owned).collect()),
            invalidation_ts: ts,
        };
        assert_eq!(row, expected);
        assert_eq!(serde_json::to_string(&row).expect("serialises"), json);
    }
    assert!(serde_json::from_str::<CachesRow>(r#"["f",["a"]]"#).is_err());
}

/// A cached read of the database cut off mid-query (the client hung up) gives
/// its ticket back, and nothing fills the cache once the query would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_cancelled_mid_query_leave_nothing_behind() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let cache = Cache::<String, i64>::new("get_slow_value", 100, 1 << 20);
    let read = |key: String, sql: &'static str| {
        let db = test_db.db.clone();
        cache.get_or_load(key, move || async move {
            db.run_autocommit("get_slow_value", move |txn| {
                Box::pin(async move { txn.query_one(sql, &[]).await?.get(0) })
            })
            .await
        })
    };
    for n in 0..20 {
        let slow = read(format!("@user{n}:example.com"), "SELECT 1::BIGINT FROM pg_sleep(0.5)");
        let outcome = tokio::time::timeout(Duration::from_millis(50), slow).await;
        assert!(outcome.is_err(), "the read was cut off before it ended");
    }
    assert_eq!(cache.loads_in_progress(), 0, "every cut-off read gave its ticket back");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(cache.is_empty(), "nothing fills after the queries would have ended");

    // The cache still works: a read that runs to its end is cached.
    assert_eq!(read("@user0:example.com".to_owned(), "SELECT 7::BIGINT").await?, 7);
    assert_eq!(cache.get(&"@user0:example.com".to_owned()), Some(7));
    assert_eq!(cache.loads_in_progress(), 0);
    Ok(())
}

/// The default cache settings, changed by `change`.
fn budgeted(change: impl FnOnce(&mut CacheConfig)) -> CacheConfig {
    let mut caches = CacheConfig::default();
    change(&mut caches);
    caches
}

/// Rows of `blobs`: `key` → a text of `bytes` bytes, as a client could make one.
async fn create_blobs(db: &Database, blobs: &[(String, usize)]) -> Result<(), StoreError> {
    let blobs = blobs.to_vec();
    db.run_interaction("create_blobs", move |txn| {
        let blobs = blobs.clone();
        Box::pin(async move {
            txn.execute_batch("CREATE TABLE blobs (k TEXT PRIMARY KEY, v TEXT NOT NULL)").await?;
            for (key, bytes) in &blobs {
                txn.execute("INSERT INTO blobs (k, v) VALUES ($1, $2)", &[key, &"x".repeat(*bytes)]).await?;
            }
            Ok(())
        })
    })
    .await
}

/// Reads `key` of `blobs` through `cache`, counting the loads in `loads`.
async fn get_blob(
    db: &Database,
    cache: &Cache<String, Arc<String>>,
    loads: &AtomicUsize,
    key: &str,
) -> Result<Arc<String>, StoreError> {
    cache
        .get_or_load(key.to_owned(), || async {
            loads.fetch_add(1, Ordering::SeqCst);
            let key = key.to_owned();
            let text: String = db
                .run_autocommit("get_blob", move |txn| {
                    let key = key.clone();
                    Box::pin(async move {
                        txn.query_one("SELECT v FROM blobs WHERE k = $1", &[&key]).await?.get(0)
                    })
                })
                .await?;
            Ok(Arc::new(text))
        })
        .await
}

async fn heavy_rows_stay_within_the_byte_budget(test_db: TestDb) -> TestResult {
    let budget = 12_000;
    let registry = CacheRegistry::new(budgeted(|caches| {
        caches.max_bytes.insert("get_blob".to_owned(), budget);
    }));
    let cache = registry.register::<String, Arc<String>>("get_blob")?;
    let keys: Vec<String> = (0..40).map(|n| format!("!room{n:02}:example.com")).collect();
    create_blobs(&test_db.db, &keys.iter().map(|key| (key.clone(), 2_000)).collect::<Vec<_>>()).await?;

    let loads = AtomicUsize::new(0);
    for key in &keys {
        assert_eq!(get_blob(&test_db.db, &cache, &loads, key).await?.len(), 2_000);
        assert!(cache.weight() <= budget, "{} bytes cached after reading {key}", cache.weight());
    }
    let kept = cache.len();
    assert!((1..10).contains(&kept), "the budget, not the size of 10000, holds the cache to {kept}");
    let stats = cache.stats();
    assert_eq!(stats.evictions, 40 - u64::try_from(kept)?);
    assert_eq!(stats.weight_evictions, stats.evictions, "every eviction was the budget's");

    // The most recent reads are the ones kept.
    for key in &keys[40 - kept..] {
        get_blob(&test_db.db, &cache, &loads, key).await?;
    }
    assert_eq!(loads.load(Ordering::SeqCst), 40, "the newest {kept} were hits");
    get_blob(&test_db.db, &cache, &loads, &keys[0]).await?;
    assert_eq!(loads.load(Ordering::SeqCst), 41, "the oldest was evicted");
    Ok(())
}

async fn a_key_in_use_outlives_colder_entries_under_either_bound(test_db: TestDb) -> TestResult {
    // Three entries, or 4000 bytes: the hot key and a heavy row fit, a second
    // heavy row breaks the budget, a small row after two heavy ones the size.
    let registry = CacheRegistry::new(budgeted(|caches| {
        caches.sizes.insert("get_blob".to_owned(), 3);
        caches.max_bytes.insert("get_blob".to_owned(), 4000);
    }));
    let cache = registry.register::<String, Arc<String>>("get_blob")?;
    let mut blobs = vec![("hot".to_owned(), 100)];
    blobs.extend((0..30).map(|n| (format!("cold{n}"), if n % 3 == 0 { 10 } else { 2_000 })));
    create_blobs(&test_db.db, &blobs).await?;

    let (hot_loads, cold_loads) = (AtomicUsize::new(0), AtomicUsize::new(0));
    for (key, _) in &blobs[1..] {
        get_blob(&test_db.db, &cache, &hot_loads, "hot").await?;
        get_blob(&test_db.db, &cache, &cold_loads, key).await?;
        assert!(cache.len() <= 3 && cache.weight() <= 4_000);
    }
    assert_eq!(hot_loads.load(Ordering::SeqCst), 1, "the key read between every other stayed cached");
    let stats = cache.stats();
    assert!(stats.weight_evictions > 0, "heavy rows were evicted for the budget: {stats:?}");
    assert!(stats.evictions > stats.weight_evictions, "small rows were evicted for the size: {stats:?}");
    Ok(())
}

async fn a_row_heavier_than_the_budget_is_read_but_not_cached(test_db: TestDb) -> TestResult {
    let registry = CacheRegistry::new(budgeted(|caches| caches.default_max_bytes = 10_000));
    let cache = registry.register::<String, Arc<String>>("get_blob")?;
    create_blobs(&test_db.db, &[("small".to_owned(), 100), ("huge".to_owned(), 20_000)]).await?;

    let loads = AtomicUsize::new(0);
    get_blob(&test_db.db, &cache, &loads, "small").await?;
    for _ in 0..2 {
        assert_eq!(get_blob(&test_db.db, &cache, &loads, "huge").await?.len(), 20_000, "read whole");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 3, "the huge row was read from the database both times");
    assert_eq!(cache.len(), 1);
    get_blob(&test_db.db, &cache, &loads, "small").await?;
    assert_eq!(loads.load(Ordering::SeqCst), 3, "nothing was evicted to make room for it");
    let stats = cache.stats();
    assert_eq!((stats.oversized, stats.evictions), (2, 0));
    Ok(())
}

async fn a_read_across_an_invalidation_fills_nothing_under_a_budget(test_db: TestDb) -> TestResult {
    let registry = CacheRegistry::new(budgeted(|caches| caches.default_max_bytes = 100_000));
    let cache = registry.register::<String, Arc<String>>("get_blob")?;
    let mut conn = test_db.db.begin("build_caches").await?;
    let stream = Arc::new(
        CachesStream::new(test_db.db.clone(), &mut conn, &StoreSettings::single_process(), registry).await?,
    );
    conn.commit().await?;
    create_blobs(&test_db.db, &[("a".to_owned(), 1_000), ("b".to_owned(), 1_000)]).await?;
    let loads = AtomicUsize::new(0);
    get_blob(&test_db.db, &cache, &loads, "b").await?;
    let weight_of_b = cache.weight();

    // A read of `a` is in flight while a write changes it and commits.
    let read = cache.begin_fill(&"a".to_owned());
    let stale = Arc::new("x".repeat(1_000));
    test_db
        .db
        .run_interaction("write_a", |txn| {
            let stream = Arc::clone(&stream);
            Box::pin(async move {
                txn.execute("UPDATE blobs SET v = 'new' WHERE k = 'a'", &[]).await?;
                stream.invalidate_in_txn(txn, "get_blob", Some(vec!["a".to_owned()])).await
            })
        })
        .await?;
    assert!(!cache.finish_fill(read, stale), "the invalidation voided the read's ticket");
    assert_eq!((cache.len(), cache.weight(), cache.loads_in_progress()), (1, weight_of_b, 0));
    assert_eq!(get_blob(&test_db.db, &cache, &loads, "a").await?.as_str(), "new");

    // Dropping the whole cache gives back all its weight, and voids reads too.
    let read = cache.begin_fill(&"b".to_owned());
    test_db
        .db
        .run_interaction("drop_all", |txn| {
            let stream = Arc::clone(&stream);
            Box::pin(async move { stream.invalidate_in_txn(txn, "get_blob", None).await })
        })
        .await?;
    assert!(!cache.finish_fill(read, Arc::new("old".to_owned())));
    assert_eq!((cache.len(), cache.weight(), cache.loads_in_progress()), (0, 0, 0));
    Ok(())
}
