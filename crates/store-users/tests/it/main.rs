//! store-users against real PostgreSQL and SQLite: registration, tokens and
//! their cached lookup, and a logout reaching another process's cache through
//! the `caches` stream.

use std::sync::Arc;

use store_core::{
    CachesRow, CachesStream, Database, Engine, StoreContext, StoreError, StoreSettings, build_store,
};
use store_test_support::{CommitFaults, TestDb, TestResult, engine_tests};
use store_users::{USER_BY_ACCESS_TOKEN_CACHE, UsersStore};

async fn build(
    db: &Database,
    settings: &StoreSettings,
) -> Result<(Arc<CachesStream>, UsersStore), StoreError> {
    let (ctx, users) = build_store::<(StoreContext, UsersStore)>(db, settings).await?;
    Ok((Arc::clone(ctx.caches()), users))
}

/// Lookups answered by the token cache so far.
fn hits(caches: &CachesStream) -> u64 {
    caches.registry().stats()[USER_BY_ACCESS_TOKEN_CACHE].0.hits
}

engine_tests!(
    a_name_registers_once,
    tokens_are_distinct_and_resolve_to_their_user,
    an_unknown_token_resolves_to_none_and_is_not_remembered,
    a_deleted_token_no_longer_resolves
);

async fn a_name_registers_once(test_db: TestDb) -> TestResult {
    let (_caches, users) = build(&test_db.db, &StoreSettings::single_process()).await?;
    assert!(!users.user_exists("@a:x").await?);
    assert!(users.register("@a:x").await?);
    assert!(users.user_exists("@a:x").await?);
    assert!(!users.register("@a:x").await?, "a taken name is refused");
    assert!(users.register("@b:x").await?);
    assert!(!users.user_exists("@c:x").await?);
    Ok(())
}

async fn tokens_are_distinct_and_resolve_to_their_user(test_db: TestDb) -> TestResult {
    let (caches, users) = build(&test_db.db, &StoreSettings::single_process()).await?;
    users.register("@a:x").await?;
    users.register("@b:x").await?;
    let a1 = users.create_access_token("@a:x").await?;
    let a2 = users.create_access_token("@a:x").await?;
    let b1 = users.create_access_token("@b:x").await?;
    assert!(a1 != a2 && a1 != b1 && a2 != b1, "{a1} {a2} {b1}");
    for token in [&a1, &a2, &b1] {
        let random = token.strip_prefix("syt_").ok_or("tokens start with syt_")?;
        assert_eq!(random.len(), 32, "{token}");
        assert!(random.chars().all(|c| c.is_ascii_alphanumeric()), "{token}");
    }
    assert_eq!(users.get_user_by_access_token(&a1).await?.as_deref(), Some("@a:x"));
    assert_eq!(users.get_user_by_access_token(&a2).await?.as_deref(), Some("@a:x"));
    assert_eq!(users.get_user_by_access_token(&b1).await?.as_deref(), Some("@b:x"));

    // The second lookup is answered by the cache.
    let before = hits(&caches);
    assert_eq!(users.get_user_by_access_token(&b1).await?.as_deref(), Some("@b:x"));
    assert_eq!(hits(&caches), before + 1);
    Ok(())
}

async fn an_unknown_token_resolves_to_none_and_is_not_remembered(test_db: TestDb) -> TestResult {
    let (_caches, users) = build(&test_db.db, &StoreSettings::single_process()).await?;
    users.register("@a:x").await?;
    assert_eq!(users.get_user_by_access_token("syt_unknown").await?, None);
    assert_eq!(users.get_user_by_access_token("").await?, None);

    // Written behind the store's back: had the miss been cached, the lookup
    // would still answer `None`.
    test_db
        .db
        .run_interaction("insert_token", |txn| {
            Box::pin(async move {
                txn.execute(
                    "INSERT INTO access_tokens (token, user_id, creation_ts) VALUES ('syt_unknown', '@a:x', 0)",
                    &[],
                )
                .await
            })
        })
        .await?;
    assert_eq!(users.get_user_by_access_token("syt_unknown").await?.as_deref(), Some("@a:x"));
    Ok(())
}

async fn a_deleted_token_no_longer_resolves(test_db: TestDb) -> TestResult {
    let (caches, users) = build(&test_db.db, &StoreSettings::single_process()).await?;
    users.register("@a:x").await?;
    let token = users.create_access_token("@a:x").await?;
    let kept = users.create_access_token("@a:x").await?;
    // Cached, so only an invalidation can make the next lookups miss.
    assert_eq!(users.get_user_by_access_token(&token).await?.as_deref(), Some("@a:x"));
    assert_eq!(users.get_user_by_access_token(&kept).await?.as_deref(), Some("@a:x"));
    let before = hits(&caches);
    assert_eq!(users.get_user_by_access_token(&token).await?.as_deref(), Some("@a:x"));
    assert_eq!(hits(&caches), before + 1, "the token is cached");

    assert!(users.delete_access_token(&token).await?);
    assert_eq!(users.get_user_by_access_token(&token).await?, None);
    assert!(!users.delete_access_token(&token).await?, "a token is deleted once");
    // The user's other session stays logged in, and still cached.
    let before = hits(&caches);
    assert_eq!(users.get_user_by_access_token(&kept).await?.as_deref(), Some("@a:x"));
    assert_eq!(hits(&caches), before + 1);
    Ok(())
}

/// Two processes on one PostgreSQL database: a logout on the master reaches the
/// worker's cache only through the `caches` stream's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_reaches_another_process_through_the_caches_stream() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (master_caches, master) = build(&test_db.db, &StoreSettings::in_deployment("master")).await?;
    let worker_db = test_db.reconnect().await?;
    let (worker_caches, worker) = build(&worker_db, &StoreSettings::in_deployment("worker1")).await?;
    assert!(master_caches.is_recording());

    master.register("@a:x").await?;
    let token = master.create_access_token("@a:x").await?;
    let kept = master.create_access_token("@a:x").await?;
    // The worker caches both tokens.
    assert_eq!(worker.get_user_by_access_token(&token).await?.as_deref(), Some("@a:x"));
    assert_eq!(worker.get_user_by_access_token(&kept).await?.as_deref(), Some("@a:x"));
    let from = worker_caches.current_token("master");

    assert!(master.delete_access_token(&token).await?);
    assert_eq!(master.get_user_by_access_token(&token).await?, None);
    // The row is gone, but the worker has not heard yet: its cache answers.
    let before = hits(&worker_caches);
    assert_eq!(worker.get_user_by_access_token(&token).await?.as_deref(), Some("@a:x"));
    assert_eq!(hits(&worker_caches), before + 1);

    // The worker catches up on the caches stream, as after a gap in replication.
    let current = master_caches.current_token("master");
    let updates = worker_caches.get_updates_since("master", from, current, 100).await?;
    assert!(!updates.limited);
    let rows: Vec<CachesRow> = updates.rows.into_iter().map(|(_, row)| row).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].cache_func, USER_BY_ACCESS_TOKEN_CACHE);
    assert_eq!(rows[0].keys.as_deref(), Some(std::slice::from_ref(&token)));
    worker_caches.apply_rows("master", updates.token, &rows);
    assert_eq!(worker.get_user_by_access_token(&token).await?, None);
    // Only the revoked token was dropped.
    let before = hits(&worker_caches);
    assert_eq!(worker.get_user_by_access_token(&kept).await?.as_deref(), Some("@a:x"));
    assert_eq!(hits(&worker_caches), before + 1);
    Ok(())
}

/// A client that hangs up during its logout (axum then drops the handler's
/// future) must not keep the token working on this process: once COMMIT is on
/// the server, the invalidation runs whether or not anyone still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_cancelled_during_its_commit_still_invalidates_the_token() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let (caches, users) = build(&test_db.db, &StoreSettings::in_deployment("master")).await?;
    users.register("@a:x").await?;
    let token = users.create_access_token("@a:x").await?;
    assert_eq!(users.get_user_by_access_token(&token).await?.as_deref(), Some("@a:x"));
    let before = hits(&caches);
    assert_eq!(users.get_user_by_access_token(&token).await?.as_deref(), Some("@a:x"));
    assert_eq!(hits(&caches), before + 1, "the token is cached");
    let from = caches.current_token("master");

    let faults = CommitFaults::connect(&test_db.url).await?;
    faults.make_commits_slow("access_tokens", "DELETE", 0.5).await?;
    tokio::select! {
        result = users.delete_access_token(&token) => {
            return Err(format!("the logout finished while its COMMIT sleeps: {result:?}").into());
        }
        pid = faults.wait_for_sleeping_commit() => { pid?; }
    }

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while users.get_user_by_access_token(&token).await?.is_some() {
        assert!(std::time::Instant::now() < deadline, "the logged-out token still works on this process");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let tokens_left = faults.count("SELECT COUNT(*) FROM access_tokens").await?;
    assert_eq!(tokens_left, 0, "the logout committed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while caches.current_token("master") <= from {
        assert!(std::time::Instant::now() < deadline, "the invalidation's position was never published");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}
