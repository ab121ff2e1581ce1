//! The stream ID generator scenarios of the spec (section A.7 and the acceptance
//! list), on PostgreSQL and, where they apply, on SQLite.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use store_core::{
    Database, Engine, MultiWriterConfig, MultiWriterIdGenerator, MultiWriterToken, StoreError, StreamTable,
};
use store_test_support::{TestDb, TestResult, engine_tests};

/// The spec's harness: table(s) `foobar…` with a sequence on PostgreSQL, and a
/// generator factory for stream `test_stream`.
pub(crate) struct Harness {
    pub(crate) db: Database,
    tables: Vec<String>,
    /// SQLite has no sequence: the harness numbers its own rows.
    sqlite_ids: AtomicI64,
    positive: bool,
}

impl Harness {
    pub(crate) async fn new(
        test_db: &TestDb,
        tables: &[&str],
        positive: bool,
    ) -> Result<Harness, StoreError> {
        let db = test_db.db.clone();
        let mut ddl = String::new();
        for table in tables {
            ddl.push_str(&format!(
                "CREATE TABLE {table} (stream_id BIGINT NOT NULL, instance_name TEXT NOT NULL, data TEXT);\
                 CREATE INDEX {table}_stream_id ON {table} (stream_id);"
            ));
        }
        if db.engine() == Engine::Postgres {
            ddl.push_str("CREATE SEQUENCE foobar_seq;");
        }
        db.run_interaction("create_harness", move |txn| {
            let ddl = ddl.clone();
            Box::pin(async move { txn.execute_batch(&ddl).await })
        })
        .await?;
        Ok(Harness {
            db,
            tables: tables.iter().map(|t| (*t).to_owned()).collect(),
            sqlite_ids: AtomicI64::new(0),
            positive,
        })
    }

    /// Consumes ID 1, as every real stream's migration does: readers take 1 as
    /// already persisted, so the first real ID must be 2.
    pub(crate) async fn consume_first_id(&self) -> Result<(), StoreError> {
        self.next_harness_id().await.map(|_| ())
    }

    pub(crate) fn config(&self, instance: &str, writers: &[&str]) -> MultiWriterConfig {
        MultiWriterConfig {
            stream_name: "test_stream".to_owned(),
            instance_name: instance.to_owned(),
            tables: self.tables.iter().map(|t| StreamTable::new(t, "instance_name", "stream_id")).collect(),
            sequence_name: "foobar_seq".to_owned(),
            writers: writers.iter().map(|w| (*w).to_owned()).collect(),
            positive: self.positive,
            ..MultiWriterConfig::default()
        }
    }

    pub(crate) async fn generator(
        &self,
        instance: &str,
        writers: &[&str],
    ) -> Result<MultiWriterIdGenerator, StoreError> {
        MultiWriterIdGenerator::new(&self.db, self.config(instance, writers)).await
    }

    async fn next_harness_id(&self) -> Result<i64, StoreError> {
        match self.db.engine() {
            Engine::Sqlite => Ok(self.sqlite_ids.fetch_add(1, Ordering::SeqCst) + 1),
            Engine::Postgres => {
                self.db
                    .run_autocommit("harness_nextval", |txn| {
                        Box::pin(
                            async move { txn.query_one("SELECT nextval('foobar_seq')", &[]).await?.get(0) },
                        )
                    })
                    .await
            }
        }
    }

    /// Appends `n` rows for `instance` to `table` with the next harness IDs, and
    /// (if asked) sets `stream_positions(instance)` to the last one.
    pub(crate) async fn insert_rows_into(
        &self,
        table: &str,
        instance: &str,
        n: usize,
        update_positions: bool,
    ) -> Result<(), StoreError> {
        for _ in 0..n {
            let id = self.next_harness_id().await?;
            self.insert_row(table, instance, id, update_positions).await?;
        }
        Ok(())
    }

    pub(crate) async fn insert_rows(&self, instance: &str, n: usize) -> Result<(), StoreError> {
        let table = self.tables[0].clone();
        self.insert_rows_into(&table, instance, n, true).await
    }

    /// Inserts one row with `id`, optionally recording it as `instance`'s position.
    pub(crate) async fn insert_row(
        &self,
        table: &str,
        instance: &str,
        id: i64,
        update_positions: bool,
    ) -> Result<(), StoreError> {
        let insert = format!("INSERT INTO {table} (stream_id, instance_name, data) VALUES ($1, $2, 'x')");
        let instance = instance.to_owned();
        self.db
            .run_interaction("harness_insert_row", move |txn| {
                let (insert, instance) = (insert.clone(), instance.clone());
                Box::pin(async move {
                    txn.execute(&insert, &[&id, &instance]).await?;
                    if update_positions {
                        set_stored_position(txn, &instance, id).await?;
                    }
                    Ok(())
                })
            })
            .await
    }

    /// PostgreSQL: a row with `id`, the sequence moved to it, and the position set.
    pub(crate) async fn insert_row_with_id(&self, instance: &str, id: i64) -> Result<(), StoreError> {
        let table = self.tables[0].clone();
        self.insert_row(&table, instance, id, true).await?;
        self.set_sequence(id).await
    }

    /// PostgreSQL: moves the sequence so that its next value is `id + 1`.
    pub(crate) async fn set_sequence(&self, id: i64) -> Result<(), StoreError> {
        self.db
            .run_autocommit("harness_setval", move |txn| {
                Box::pin(async move {
                    txn.execute("SELECT setval('foobar_seq', $1)", &[&id]).await?;
                    Ok(())
                })
            })
            .await
    }

    pub(crate) async fn stored_position(&self, instance: &str) -> Result<Option<i64>, StoreError> {
        let instance = instance.to_owned();
        self.db
            .run_autocommit("harness_stored_position", move |txn| {
                let instance = instance.clone();
                Box::pin(async move {
                    let row = txn
                        .query_opt(
                            "SELECT stream_id FROM stream_positions WHERE stream_name = 'test_stream' AND instance_name = $1",
                            &[&instance],
                        )
                        .await?;
                    row.map(|row| row.get(0)).transpose()
                })
            })
            .await
    }

    pub(crate) async fn stored_positions(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        self.db
            .run_autocommit("harness_stored_positions", |txn| {
                Box::pin(async move {
                    let rows = txn
                        .query(
                            "SELECT instance_name, stream_id FROM stream_positions WHERE stream_name = 'test_stream'",
                            &[],
                        )
                        .await?;
                    rows.iter().map(|row| Ok((row.get(0)?, row.get(1)?))).collect()
                })
            })
            .await
    }

    /// Waits for a background upsert to store `expected` for `instance`.
    pub(crate) async fn wait_for_stored(&self, instance: &str, expected: i64) -> TestResult {
        for _ in 0..200 {
            if self.stored_position(instance).await? == Some(expected) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!(
            "stream_positions({instance}) never reached {expected}: {:?}",
            self.stored_position(instance).await?
        )
        .into())
    }
}

/// Unconditionally overwrites the stored position, as the spec's harness does.
async fn set_stored_position(
    txn: &mut store_core::Transaction,
    instance: &str,
    id: i64,
) -> Result<(), StoreError> {
    txn.execute(
        "DELETE FROM stream_positions WHERE stream_name = 'test_stream' AND instance_name = $1",
        &[&instance],
    )
    .await?;
    txn.execute(
        "INSERT INTO stream_positions (stream_name, instance_name, stream_id) VALUES ('test_stream', $1, $2)",
        &[&instance, &id],
    )
    .await?;
    Ok(())
}

/// Waits for `generator`'s positions to be `expected`: IDs abandoned on SQLite
/// finish once their high-water mark is written, in the background.
async fn wait_for_positions(
    generator: &MultiWriterIdGenerator,
    expected: &BTreeMap<String, i64>,
) -> TestResult {
    for _ in 0..200 {
        if generator.get_positions() == *expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(generator.get_positions(), *expected);
    Ok(())
}

fn positions(entries: &[(&str, i64)]) -> BTreeMap<String, i64> {
    entries.iter().map(|(writer, position)| ((*writer).to_owned(), *position)).collect()
}

/// Every generator but `name` learns `name`'s position, as replication would tell it.
fn replicate(gens: &[(&str, &MultiWriterIdGenerator)], name: &str) {
    let (_, source) = gens.iter().find(|(n, _)| *n == name).expect("a generator of that name");
    let token = source.get_current_token_for_writer(name);
    for (other, generator) in gens {
        if *other != name {
            generator.advance(name, token);
        }
    }
}

fn replicate_all(gens: &[(&str, &MultiWriterIdGenerator)]) {
    for (name, _) in gens {
        replicate(gens, name);
    }
}

// ---- both engines ----

engine_tests!(
    empty_stream_starts_at_one,
    single_writer_allocates_after_its_rows,
    out_of_order_finishes,
    transactional_allocation,
    a_failed_write_finishes_without_recording,
    restart_during_out_of_order_persistence,
    stale_writers_are_forgotten,
    only_writers_may_allocate,
    a_stream_without_writers_never_touches_stream_positions,
    a_burst_of_finishes_shares_its_upserts,
    a_restart_never_moves_a_position_backwards,
    flush_records_what_the_background_has_not_yet,
);

async fn flush_records_what_the_background_has_not_yet(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let config = MultiWriterConfig {
        // Longer than the test: only the flush can record the write.
        background_record_delay: Duration::from_secs(3600),
        ..harness.config("master", &["master"])
    };
    let generator = MultiWriterIdGenerator::new(&harness.db, config).await?;
    let recorded_at_start = harness.stored_position("master").await?;
    harness
        .db
        .run_interaction("write_in_txn", |txn| {
            let generator = generator.clone();
            Box::pin(async move {
                let id = generator.get_next_txn(txn).await?;
                txn.execute("INSERT INTO foobar (stream_id, instance_name) VALUES ($1, 'master')", &[&id])
                    .await?;
                Ok(())
            })
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(harness.stored_position("master").await?, recorded_at_start, "not recorded yet");
    generator.flush().await?;
    assert_eq!(harness.stored_position("master").await?, Some(8));
    Ok(())
}

async fn empty_stream_starts_at_one(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    let generator = harness.generator("master", &["master"]).await?;
    assert_eq!(generator.get_positions(), positions(&[("master", 1)]));
    assert_eq!(generator.get_current_token(), 1);
    let guard = generator.get_next().await?;
    // A fresh sequence hands out 1; the SQLite counter starts above the assumed
    // position 1.
    let expected = if test_db.db.engine() == Engine::Postgres { 1 } else { 2 };
    assert_eq!(guard.id(), expected);
    guard.finish().await?;
    Ok(())
}

async fn single_writer_allocates_after_its_rows(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;
    assert_eq!(generator.get_positions(), positions(&[("master", 7)]));
    assert_eq!(generator.get_current_token_for_writer("master"), 7);
    let guard = generator.get_next().await?;
    assert_eq!(guard.id(), 8);
    assert_eq!(generator.get_positions(), positions(&[("master", 7)]));
    assert_eq!(generator.get_current_token_for_writer("master"), 7);
    guard.finish().await?;
    assert_eq!(generator.get_positions(), positions(&[("master", 8)]));
    assert_eq!(generator.get_current_token_for_writer("master"), 8);
    assert_eq!(harness.stored_position("master").await?, Some(8));
    Ok(())
}

async fn out_of_order_finishes(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let mut guards = BTreeMap::new();
    for _ in 0..4 {
        let guard = generator.get_next().await?;
        guards.insert(guard.id(), guard);
    }
    assert_eq!(guards.keys().copied().collect::<Vec<_>>(), [8, 9, 10, 11]);
    assert_eq!(generator.get_positions(), positions(&[("master", 7)]));
    for (id, expected) in [(9, 7), (8, 9), (11, 9), (10, 11)] {
        guards.remove(&id).ok_or("allocated")?.finish().await?;
        assert_eq!(generator.get_positions(), positions(&[("master", expected)]), "after finishing {id}");
        assert_eq!(generator.get_current_token(), expected);
        assert_eq!(harness.stored_position("master").await?, Some(expected), "stored after finishing {id}");
    }
    Ok(())
}

async fn transactional_allocation(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;

    let observed = harness
        .db
        .run_interaction("write_in_txn", |txn| {
            let generator = generator.clone();
            Box::pin(async move {
                let id = generator.get_next_txn(txn).await?;
                txn.execute("INSERT INTO foobar (stream_id, instance_name) VALUES ($1, 'master')", &[&id])
                    .await?;
                Ok((id, generator.get_current_token()))
            })
        })
        .await?;
    assert_eq!(observed, (8, 7), "the position waits for the commit");
    assert_eq!(generator.get_positions(), positions(&[("master", 8)]));
    harness.wait_for_stored("master", 8).await?;

    // A rolled-back ID is finished too, but nothing is recorded for it.
    let result: Result<(), StoreError> = harness
        .db
        .run_interaction("write_in_txn_then_fail", |txn| {
            let generator = generator.clone();
            Box::pin(async move {
                let id = generator.get_next_txn(txn).await?;
                assert_eq!(id, 9);
                Err(StoreError::Misconfigured("the write fails".to_owned()))
            })
        })
        .await;
    assert!(result.is_err());
    // From SQLite's counter, once the high-water mark covers it, which the
    // rollback writes in the background.
    wait_for_positions(&generator, &positions(&[("master", 9)])).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(harness.stored_position("master").await?, Some(8));
    Ok(())
}

async fn a_failed_write_finishes_without_recording(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let guard = generator.get_next().await?;
    assert_eq!(guard.id(), 8);
    drop(guard);
    wait_for_positions(&generator, &positions(&[("master", 8)])).await?;
    assert_eq!(harness.stored_position("master").await?, Some(7));
    Ok(())
}

async fn restart_during_out_of_order_persistence(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let eight = generator.get_next().await?;
    let nine = generator.get_next().await?;
    assert_eq!((eight.id(), nine.id()), (8, 9));
    nine.finish().await?;
    assert_eq!(harness.stored_position("master").await?, Some(7));

    let reader = harness.generator("worker", &["master"]).await?;
    assert_eq!(reader.get_positions(), positions(&[("master", 7)]));
    assert_eq!(reader.get_current_token_for_writer("master"), 7);

    eight.finish().await?;
    assert_eq!(generator.get_positions(), positions(&[("master", 9)]));
    reader.advance("master", 9);
    assert_eq!(reader.get_positions(), positions(&[("master", 9)]));
    Ok(())
}

async fn stale_writers_are_forgotten(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    for (instance, id) in [("a", 3), ("b", 4), ("z", 5)] {
        harness.insert_row("foobar", instance, id, true).await?;
    }
    let _reader = harness.generator("x", &["a", "b"]).await?;
    assert_eq!(harness.stored_positions().await?, positions(&[("a", 3), ("b", 4)]));
    Ok(())
}

async fn only_writers_may_allocate(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    let reader = harness.generator("reader", &["a"]).await?;
    let err = reader.get_next().await.expect_err("not a writer");
    assert!(
        matches!(&err, StoreError::NotAWriter { stream, instance } if stream == "test_stream" && instance == "reader")
    );
    assert!(reader.get_next_mult(2).await.is_err());
    let result = harness
        .db
        .run_interaction("allocate_in_txn", |txn| {
            let reader = reader.clone();
            Box::pin(async move { reader.get_next_txn(txn).await })
        })
        .await;
    assert!(matches!(result, Err(StoreError::NotAWriter { .. })));

    let anyone = harness.generator("anyone", &[]).await?;
    anyone.get_next().await?.finish().await?;
    Ok(())
}

async fn a_stream_without_writers_never_touches_stream_positions(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_row("foobar", "p", 40, false).await?;
    if test_db.db.engine() == Engine::Postgres {
        harness.set_sequence(40).await?;
    }
    let generator = harness.generator("p", &[]).await?;
    assert_eq!(generator.get_current_token(), 40);
    assert_eq!(generator.get_positions(), positions(&[("p", 40)]));
    let guards = generator.get_next_mult(3).await?;
    assert_eq!(guards.ids(), [41, 42, 43]);
    guards.finish().await?;
    assert_eq!(generator.get_current_token(), 43);
    assert!(harness.stored_positions().await?.is_empty());
    assert_eq!(generator.stream_positions_writes(), 0);
    Ok(())
}

async fn a_burst_of_finishes_shares_its_upserts(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    let generator = harness.generator("master", &["master"]).await?;
    // Construction recorded the writer's row, so the burst below can be held on it.
    assert_eq!(harness.stored_position("master").await?, Some(1));
    let mut guards = Vec::new();
    for _ in 0..200 {
        guards.push(generator.get_next().await?);
    }
    // SQLite's guards may only finish once the counter's high-water mark covers
    // them; an ID committed after them records it, so that below only the
    // position's upsert is held.
    let last = harness
        .db
        .run_interaction("allocate_after_the_burst", |txn| {
            let generator = generator.clone();
            Box::pin(async move { generator.get_next_txn(txn).await })
        })
        .await?;
    assert_eq!(last, guards.last().ok_or("allocated")?.id() + 1);

    // Hold the position row (PostgreSQL) or the write lock (SQLite) so the first
    // upsert of the burst stays in flight while every other finish arrives.
    let mut blocker = harness.db.begin("block_stream_positions").await?;
    if test_db.db.engine() == Engine::Postgres {
        blocker
            .query("SELECT stream_id FROM stream_positions WHERE stream_name = 'test_stream' FOR UPDATE", &[])
            .await?;
    } else {
        // `BEGIN IMMEDIATE` goes with the first statement.
        blocker.query("SELECT 1", &[]).await?;
    }
    let mut finishes = tokio::task::JoinSet::new();
    for guard in guards {
        finishes.spawn(guard.finish());
    }
    for _ in 0..500 {
        if generator.get_current_token() == last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(generator.get_current_token(), last, "every finish has marked its ID");
    blocker.commit().await?;
    while let Some(result) = finishes.join_next().await {
        result??;
    }
    assert_eq!(harness.stored_position("master").await?, Some(last), "the last position is never lost");
    // The one in flight, then one with the latest position for everyone queued.
    let writes = generator.stream_positions_writes();
    assert!((1..=2).contains(&writes), "200 finishes cost {writes} upserts");
    Ok(())
}

async fn a_restart_never_moves_a_position_backwards(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 5).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let mut last_written = 0;
    for _ in 0..5 {
        let guard = generator.get_next().await?;
        harness.insert_row("foobar", "master", guard.id(), false).await?;
        last_written = guard.id();
        guard.finish().await?;
    }
    // An ID allocated and abandoned: the write failed just before a restart.
    let abandoned = generator.get_next().await?;
    let abandoned_id = abandoned.id();
    drop(abandoned);
    drop(generator);

    let restarted = harness.generator("master", &["master"]).await?;
    assert!(restarted.get_current_token_for_writer("master") >= last_written);
    assert!(restarted.get_current_token() >= last_written);
    let next = restarted.get_next().await?;
    assert!(next.id() > last_written, "no written ID is handed out again");
    if test_db.db.engine() == Engine::Postgres {
        // The sequence remembers even IDs that were never written. (SQLite's
        // counter remembers an abandoned ID once its high-water mark is written
        // in the background, before any token may cover it; the restart here may
        // come first, while handing it out again is still harmless. `id_reuse`
        // waits for the token.)
        assert!(next.id() > abandoned_id, "{} after {abandoned_id}", next.id());
    }
    next.finish().await?;
    Ok(())
}

// ---- PostgreSQL only ----

mod postgres_only {
    use std::sync::Arc;

    use super::*;

    async fn harness(
        tables: &[&str],
        positive: bool,
    ) -> Result<(TestDb, Harness), Box<dyn std::error::Error>> {
        let test_db = TestDb::new(Engine::Postgres).await?;
        let harness = Harness::new(&test_db, tables, positive).await?;
        Ok((test_db, harness))
    }

    #[tokio::test]
    async fn persisted_upto_follows_advances() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_row_with_id("first", 3).await?;
        harness.insert_row_with_id("second", 5).await?;
        let reader = harness.generator("worker", &["first", "second"]).await?;
        assert_eq!(reader.get_positions(), positions(&[("first", 3), ("second", 5)]));
        assert_eq!(reader.get_persisted_upto_position(), 3);
        for ((writer, position), expected) in
            [(("first", 6), 6), (("second", 7), 7), (("second", 9), 7), (("first", 8), 9)]
        {
            reader.advance(writer, position);
            assert_eq!(reader.get_persisted_upto_position(), expected, "after advance({writer}, {position})");
        }
        reader.advance("first", 11);
        reader.advance("second", 15);
        assert_eq!(reader.get_persisted_upto_position(), 11);
        Ok(())
    }

    #[tokio::test]
    async fn a_writer_takes_its_own_position_from_the_sequence() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_row_with_id("first", 3).await?;
        harness.insert_row_with_id("second", 5).await?;
        let first = harness.generator("first", &["first", "second"]).await?;
        assert_eq!(first.get_positions(), positions(&[("first", 5), ("second", 5)]));
        assert_eq!(first.get_persisted_upto_position(), 5);
        let guard = first.get_next().await?;
        assert_eq!(guard.id(), 6);
        assert_eq!(first.get_persisted_upto_position(), 5);
        guard.finish().await?;
        assert_eq!(first.get_persisted_upto_position(), 6);
        Ok(())
    }

    #[tokio::test]
    async fn two_writers() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_rows("first", 3).await?;
        let first = harness.generator("first", &["first", "second"]).await?;
        harness.insert_rows("second", 4).await?;
        let second = harness.generator("second", &["first", "second"]).await?;
        let gens = [("first", &first), ("second", &second)];
        replicate_all(&gens);
        for generator in [&first, &second] {
            assert_eq!(generator.get_positions(), positions(&[("first", 3), ("second", 7)]));
            assert_eq!(generator.get_current_token_for_writer("first"), 7);
            assert_eq!(generator.get_current_token_for_writer("second"), 7);
        }
        assert_eq!(first.get_minimal_local_current_token(), 3);
        assert_eq!(second.get_minimal_local_current_token(), 7);

        let guard = first.get_next().await?;
        assert_eq!(guard.id(), 8);
        assert_eq!(first.get_positions(), positions(&[("first", 3), ("second", 7)]));
        assert_eq!(first.get_persisted_upto_position(), 7);
        guard.finish().await?;
        assert_eq!(first.get_positions(), positions(&[("first", 8), ("second", 7)]));
        assert_eq!(second.get_positions(), positions(&[("first", 3), ("second", 7)]));

        let guard = second.get_next().await?;
        assert_eq!(guard.id(), 9);
        assert_eq!(second.get_positions(), positions(&[("first", 3), ("second", 7)]));
        guard.finish().await?;
        assert_eq!(second.get_positions(), positions(&[("first", 3), ("second", 9)]));
        second.advance("first", 8);
        assert_eq!(second.get_positions(), positions(&[("first", 8), ("second", 9)]));
        Ok(())
    }

    #[tokio::test]
    async fn a_writer_without_rows() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        let writers = ["first", "second", "third"];
        harness.insert_rows("first", 3).await?;
        let first = harness.generator("first", &writers).await?;
        harness.insert_rows("second", 4).await?;
        let second = harness.generator("second", &writers).await?;
        let third = harness.generator("third", &writers).await?;
        let gens = [("first", &first), ("second", &second), ("third", &third)];
        replicate_all(&gens);
        for generator in [&first, &second] {
            assert_eq!(generator.get_positions(), positions(&[("first", 3), ("second", 7), ("third", 7)]));
            for writer in writers {
                assert_eq!(generator.get_current_token_for_writer(writer), 7, "{writer}");
            }
        }
        let guard = third.get_next().await?;
        assert_eq!(guard.id(), 8);
        assert_eq!(third.get_positions(), positions(&[("first", 3), ("second", 7), ("third", 7)]));
        assert_eq!(third.get_persisted_upto_position(), 7);
        guard.finish().await?;
        assert_eq!(third.get_positions(), positions(&[("first", 3), ("second", 7), ("third", 8)]));
        Ok(())
    }

    #[tokio::test]
    async fn writer_config_changes() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_row_with_id("first", 3).await?;
        harness.insert_row_with_id("second", 5).await?;

        let worker = harness.generator("worker", &["first", "second"]).await?;
        assert_eq!(worker.get_persisted_upto_position(), 3);
        assert_eq!(worker.get_current_token_for_writer("first"), 3);
        assert_eq!(worker.get_current_token_for_writer("second"), 5);

        let second = harness.generator("second", &["second"]).await?;
        assert_eq!(second.get_persisted_upto_position(), 5);
        assert_eq!(second.get_current_token_for_writer("second"), 5);

        let third = harness.generator("third", &["third"]).await?;
        assert_eq!(third.get_persisted_upto_position(), 5);
        assert_eq!(third.get_current_token_for_writer("third"), 5);

        let fourth = harness.generator("fourth", &["third"]).await?;
        assert_eq!(fourth.get_persisted_upto_position(), 5);
        assert_eq!(fourth.get_current_token_for_writer("third"), 5);

        let guard = third.get_next().await?;
        assert_eq!(guard.id(), 6);
        guard.finish().await?;
        assert_eq!(third.get_persisted_upto_position(), 6);

        let five = harness.generator("five", &["first", "third"]).await?;
        assert_eq!(five.get_persisted_upto_position(), 6);
        assert_eq!(five.get_current_token_for_writer("first"), 6, "first's stale row is gone, not resumed");
        assert_eq!(five.get_current_token_for_writer("third"), 6);
        Ok(())
    }

    #[tokio::test]
    async fn a_sequence_behind_the_table_is_repaired() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_row_with_id("master", 3).await?;
        // A row the sequence never handed out (a rolled-back software release).
        harness.insert_row("foobar", "master", 26, false).await?;
        let generator = harness.generator("master", &["master"]).await?;
        let guard = generator.get_next().await?;
        assert_eq!(guard.id(), 27);
        guard.finish().await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_sequence_behind_stream_positions_is_repaired() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_row_with_id("master", 10).await?;
        // After a failover the promoted replica's sequence can sit behind what the
        // old primary handed out and recorded.
        harness
            .db
            .run_autocommit("failover", |txn| {
                Box::pin(async move {
                    txn.execute(
                        "UPDATE stream_positions SET stream_id = 50 WHERE stream_name = 'test_stream' AND instance_name = 'master'",
                        &[],
                    )
                    .await
                })
            })
            .await?;
        let log = CapturedLog::default();
        let generator = {
            let _capture = tracing::subscriber::set_default(log.subscriber());
            harness.generator("master", &["master"]).await?
        };
        let guard = generator.get_next().await?;
        assert_eq!(guard.id(), 51, "Synapse refuses to start here; we skip past both");
        guard.finish().await?;
        let warnings: Vec<String> = log.lines().into_iter().filter(|line| line.contains("WARN")).collect();
        assert_eq!(warnings.len(), 1, "one warning line: {warnings:?}");
        for expected in [
            "stream=test_stream",
            "sequence=foobar_seq",
            "sequence_last_value=10",
            "stream_positions_max=50",
            "repaired_to=50",
        ] {
            assert!(warnings[0].contains(expected), "{expected} missing from {}", warnings[0]);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_stale_process_cannot_move_a_backwards_stored_position_back() -> TestResult {
        let (_db, harness) = harness(&["foobar"], false).await?;
        let old = harness.generator("master", &["master"]).await?;
        let new = harness.generator("master", &["master"]).await?;
        let old_guard = old.get_next().await?;
        let new_guard = new.get_next().await?;
        assert_eq!((old_guard.id(), new_guard.id()), (-1, -2));
        new_guard.finish().await?;
        assert_eq!(harness.stored_position("master").await?, Some(-2));
        old_guard.finish().await?;
        assert_eq!(harness.stored_position("master").await?, Some(-2), "the upsert only moves further down");
        Ok(())
    }

    /// Log lines written while its subscriber is the default.
    #[derive(Clone, Default)]
    struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl CapturedLog {
        fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
            let log = self.clone();
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || log.clone()).finish()
        }

        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().expect("not poisoned").clone();
            String::from_utf8_lossy(&bytes).lines().map(str::to_owned).collect()
        }
    }

    impl std::io::Write for CapturedLog {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_idle_writer_jumps_ahead_unless_something_is_in_flight() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        let writers = ["first", "second", "third"];
        harness.insert_rows("first", 3).await?;
        let first = harness.generator("first", &writers).await?;
        harness.insert_rows("second", 4).await?;
        let second = harness.generator("second", &writers).await?;
        let gens = [("first", &first), ("second", &second)];
        replicate_all(&gens);
        let check = |token_first, token_second, current| {
            assert_eq!(
                (
                    second.get_current_token_for_writer("first"),
                    second.get_current_token_for_writer("second"),
                    second.get_current_token()
                ),
                (token_first, token_second, current)
            );
        };
        check(7, 7, 7);

        first.get_next_mult(2).await?.finish().await?;
        second.advance("first", 9);
        check(9, 9, 7);

        first.get_next_mult(2).await?.finish().await?;
        let in_flight = second.get_next().await?;
        assert_eq!(in_flight.id(), 12);
        second.advance("first", 11);
        check(11, 9, 7);
        in_flight.finish().await?;
        check(11, 12, 7);
        Ok(())
    }

    #[tokio::test]
    async fn a_new_writer_does_not_run_ahead_of_its_own_unfinished_id() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        let writers = ["first", "newcomer"];
        harness.insert_rows("first", 3).await?;
        let first = harness.generator("first", &writers).await?;
        let newcomer = harness.generator("newcomer", &writers).await?;
        let held = newcomer.get_next().await?;
        assert_eq!(held.id(), 4);
        let guard = first.get_next().await?;
        guard.finish().await?;
        newcomer.advance("first", first.get_current_token_for_writer("first"));
        assert!(newcomer.get_current_token_for_writer("newcomer") < 4);
        assert!(newcomer.get_current_token() < 4);
        first.advance("newcomer", newcomer.get_current_token_for_writer("newcomer"));
        assert!(first.get_current_token() < 4, "followers must not pass 4 either");
        held.finish().await?;
        assert_eq!(newcomer.get_current_token_for_writer("newcomer"), 5);
        Ok(())
    }

    #[tokio::test]
    async fn a_stale_process_cannot_move_the_stored_position_back() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_rows("master", 7).await?;
        let old = harness.generator("master", &["master"]).await?;
        let new = harness.generator("master", &["master"]).await?;
        let old_guard = old.get_next().await?;
        let new_guard = new.get_next().await?;
        assert_eq!((old_guard.id(), new_guard.id()), (8, 9));
        new_guard.finish().await?;
        assert_eq!(harness.stored_position("master").await?, Some(9));
        old_guard.finish().await?;
        assert_eq!(harness.stored_position("master").await?, Some(9), "the upsert only moves forward");
        Ok(())
    }

    #[tokio::test]
    async fn a_backwards_stream_counts_down() -> TestResult {
        let (_db, harness) = harness(&["foobar"], false).await?;
        let generator = harness.generator("master", &["master"]).await?;
        let guard = generator.get_next().await?;
        assert_eq!(guard.id(), -1);
        harness.insert_row("foobar", "master", -1, false).await?;
        guard.finish().await?;
        assert_eq!(generator.get_positions(), positions(&[("master", -1)]));
        assert_eq!(generator.get_current_token_for_writer("master"), -1);
        assert_eq!(generator.get_persisted_upto_position(), -1);

        let guards = generator.get_next_mult(3).await?;
        assert_eq!(guards.ids(), [-2, -3, -4]);
        for id in guards.ids() {
            harness.insert_row("foobar", "master", *id, false).await?;
        }
        guards.finish().await?;
        assert_eq!(generator.get_positions(), positions(&[("master", -4)]));
        assert_eq!(generator.get_persisted_upto_position(), -4);
        assert_eq!(harness.stored_position("master").await?, Some(-4));

        let reloaded = harness.generator("master", &["master"]).await?;
        assert_eq!(reloaded.get_positions(), positions(&[("master", -4)]));
        assert_eq!(reloaded.get_current_token_for_writer("master"), -4);
        assert_eq!(reloaded.get_persisted_upto_position(), -4);
        Ok(())
    }

    #[tokio::test]
    async fn two_writers_on_a_backwards_stream() -> TestResult {
        let (_db, harness) = harness(&["foobar"], false).await?;
        let first = harness.generator("first", &["first", "second"]).await?;
        let second = harness.generator("second", &["first", "second"]).await?;
        let gens = [("first", &first), ("second", &second)];
        let guard = first.get_next().await?;
        harness.insert_row("foobar", "first", guard.id(), false).await?;
        guard.finish().await?;
        replicate(&gens, "first");
        for generator in [&first, &second] {
            assert_eq!(generator.get_positions(), positions(&[("first", -1), ("second", -1)]));
            assert_eq!(generator.get_persisted_upto_position(), -1);
        }
        let guard = second.get_next().await?;
        harness.insert_row("foobar", "second", guard.id(), false).await?;
        guard.finish().await?;
        replicate(&gens, "second");
        for generator in [&first, &second] {
            assert_eq!(generator.get_positions(), positions(&[("first", -1), ("second", -2)]));
            assert_eq!(generator.get_persisted_upto_position(), -2);
        }
        Ok(())
    }

    #[tokio::test]
    async fn rows_in_several_tables_are_discovered() -> TestResult {
        let (_db, harness) = harness(&["foobar1", "foobar2"], true).await?;
        harness.insert_rows_into("foobar1", "first", 3, true).await?;
        let first = harness.generator("first", &["first", "second"]).await?;
        harness.insert_rows_into("foobar2", "second", 3, true).await?;
        harness.insert_rows_into("foobar2", "second", 1, false).await?;
        let second = harness.generator("second", &["first", "second"]).await?;
        let gens = [("first", &first), ("second", &second)];
        replicate_all(&gens);
        for generator in [&first, &second] {
            assert_eq!(generator.get_positions(), positions(&[("first", 3), ("second", 7)]));
            assert_eq!(generator.get_current_token_for_writer("first"), 7);
            assert_eq!(generator.get_current_token_for_writer("second"), 7);
            assert_eq!(generator.get_persisted_upto_position(), 7);
        }
        Ok(())
    }

    #[tokio::test]
    async fn bad_generator_configs_are_refused() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        let mut config = harness.config("master", &["master"]);
        config.tables[0].table = "foobar; DROP TABLE foobar".to_owned();
        let err = MultiWriterIdGenerator::new(&harness.db, config).await.expect_err("not an identifier");
        assert!(err.to_string().contains("is not a plain SQL identifier"), "{err}");
        let mut config = harness.config("master", &["master"]);
        config.sequence_name = String::new();
        let err = MultiWriterIdGenerator::new(&harness.db, config).await.expect_err("no sequence");
        assert!(err.to_string().contains("needs a sequence name"), "{err}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_tasks_on_several_generators() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        let writers = ["a", "b", "c"];
        let mut gens = Vec::new();
        for writer in writers {
            gens.push((writer, harness.generator(writer, &writers).await?));
        }
        let harness = std::sync::Arc::new(harness);
        let mut tasks = tokio::task::JoinSet::new();
        for (writer, generator) in &gens {
            for _ in 0..4 {
                let (writer, generator, harness) =
                    (*writer, generator.clone(), std::sync::Arc::clone(&harness));
                tasks.spawn(async move {
                    let mut written = Vec::new();
                    for _ in 0..25 {
                        let guard = generator.get_next().await?;
                        harness.insert_row("foobar", writer, guard.id(), false).await?;
                        written.push(guard.id());
                        guard.finish().await?;
                    }
                    Ok::<_, StoreError>((writer, written))
                });
            }
        }
        let mut max_by_writer: BTreeMap<&str, i64> = BTreeMap::new();
        while let Some(result) = tasks.join_next().await {
            let (writer, written) = result??;
            let entry = max_by_writer.entry(writer).or_default();
            *entry = (*entry).max(written.into_iter().max().unwrap_or(0));
        }
        let stored = harness.stored_positions().await?;
        for (writer, max) in &max_by_writer {
            assert_eq!(
                stored.get(*writer),
                Some(max),
                "{writer}'s stored position is the largest ID it wrote"
            );
        }
        let global_max = max_by_writer.values().copied().max().unwrap_or(0);
        let refs: Vec<(&str, &MultiWriterIdGenerator)> = gens.iter().map(|(w, g)| (*w, g)).collect();
        replicate_all(&refs);
        replicate_all(&refs);
        for (_, generator) in &gens {
            assert_eq!(generator.get_current_token(), global_max);
        }
        assert_eq!(global_max, 300);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_position_returns_when_it_is_reached_or_times_out() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_rows("first", 3).await?;
        let reader = Arc::new(harness.generator("reader", &["first"]).await?);
        let before = reader.get_current_token_for_writer("first");
        reader.wait_for("first", before, Duration::from_millis(10)).await?;

        let err =
            reader.wait_for("first", before + 2, Duration::from_millis(50)).await.expect_err("not there yet");
        assert!(
            matches!(&err, StoreError::Timeout { token, reached, .. } if *token == before + 2 && *reached == before),
            "{err}"
        );

        let waiter = {
            let reader = Arc::clone(&reader);
            tokio::spawn(async move { reader.wait_for("first", before + 2, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        reader.advance("first", before + 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one short of the token");
        reader.advance("first", before + 2);
        waiter.await??;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_token_waits_for_every_writer_it_covers() -> TestResult {
        let (_db, harness) = harness(&["foobar"], true).await?;
        harness.insert_rows("first", 3).await?;
        let reader = Arc::new(harness.generator("reader", &["first", "second"]).await?);
        let level = reader.get_current_token();
        // `first` ahead by 2, and `second` (at `level`) must be reached too.
        let token = MultiWriterToken::new(level, BTreeMap::from([("first".to_owned(), level + 2)]))?;
        let waiter = {
            let (reader, token) = (Arc::clone(&reader), token.clone());
            tokio::spawn(async move { reader.wait_for_token(&token, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "`first` is not there yet");
        reader.advance("first", level + 2);
        waiter.await??;

        let ahead = MultiWriterToken::new(level + 2, BTreeMap::new())?;
        let err = reader.wait_for_token(&ahead, Duration::from_millis(50)).await.expect_err("second lags");
        assert!(matches!(&err, StoreError::Timeout { writer, .. } if writer == "second"), "{err}");
        assert_eq!(
            MultiWriterToken::from_generator(&reader),
            MultiWriterToken::new(level, BTreeMap::from([("first".to_owned(), level + 2)]))?
        );
        Ok(())
    }
}
