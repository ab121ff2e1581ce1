//! No stream ID is handed out twice, even across a restart: an ID allocated and
//! then abandoned (rolled back, committed without a row, a guard dropped) is
//! never handed out again once a token may cover it.
//!
//! On PostgreSQL the sequence has always guaranteed this; these tests pin it. On
//! SQLite IDs come from an in-process counter, whose high-water mark is what makes it true. A restart is
//! simulated by dropping the generator and building a new one on a fresh
//! `Database`, over the same file.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use store_core::{Database, Engine, MultiWriterConfig, MultiWriterIdGenerator, StoreError, StreamIdsGuard};
use store_test_support::{TestDb, TestResult, engine_tests};

use crate::id_generators::Harness;

engine_tests!(
    an_id_rolled_back_is_never_handed_out_again,
    an_id_committed_without_a_row_is_never_handed_out_again,
    a_dropped_guard_is_never_handed_out_again,
    a_backwards_stream_never_hands_out_a_rolled_back_id_again,
    a_later_commit_lets_the_position_pass_ids_given_up_before_it,
);

/// Allocates `n` IDs inside a transaction that then fails; returns them.
async fn roll_back(
    db: &Database,
    generator: &MultiWriterIdGenerator,
    n: usize,
) -> Result<Vec<i64>, StoreError> {
    let allocated = Arc::new(Mutex::new(Vec::new()));
    let result: Result<(), StoreError> = db
        .run_interaction("write_then_fail", |txn| {
            let (generator, allocated) = (generator.clone(), Arc::clone(&allocated));
            Box::pin(async move {
                *lock(&allocated) = generator.get_next_mult_txn(txn, n).await?;
                Err(StoreError::Misconfigured("the write fails".to_owned()))
            })
        })
        .await;
    assert!(result.is_err(), "the transaction was meant to fail");
    Ok(lock(&allocated).clone())
}

fn lock(ids: &Mutex<Vec<i64>>) -> std::sync::MutexGuard<'_, Vec<i64>> {
    ids.lock().expect("no test panicked while holding it")
}

/// Waits until the stream's token covers `id`: from then on a client may hold a
/// token past it, so it must never be handed out again.
async fn wait_for_token(token: impl Fn() -> i64, id: i64) -> TestResult {
    for _ in 0..500 {
        if token().abs() >= id.abs() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(format!("the token never reached {id}: it is at {}", token()).into())
}

/// IDs given up by a failed write (a group commit's lost bet, say) hold the
/// position back only until a later write commits: on SQLite, where they
/// wait for a high-water mark to cover them, the later write's mark does,
/// and the position passes both as its commit's callbacks run, without
/// waiting for a mark of their own.
async fn a_later_commit_lets_the_position_pass_ids_given_up_before_it(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    let generator = harness.generator("master", &["master"]).await?;
    // Holds SQLite's writer, which a mark of the given-up IDs' own would need.
    let mut later = harness.db.begin("later_write").await?;
    let given_up: Result<Vec<i64>, StoreError> = harness
        .db
        .run_autocommit("give_up_ids", |txn| {
            let generator = generator.clone();
            Box::pin(async move {
                // More than a high-water mark runs ahead, so none covers them yet.
                let ids = generator.get_next_mult_txn(txn, 250).await?;
                Err(StoreError::Misconfigured(format!("the write of {ids:?} fails")))
            })
        })
        .await;
    assert!(given_up.is_err());
    let committed = generator.get_next_mult_txn(&mut later, 2).await?;
    let seen_at_commit = Arc::new(Mutex::new(Vec::new()));
    let (reader, seen) = (generator.clone(), Arc::clone(&seen_at_commit));
    later.call_after_position(move || lock(&seen).push(reader.get_current_token()));
    later.commit().await?;
    assert_eq!(*lock(&seen_at_commit), [committed[1]], "the position passed both at once");
    Ok(())
}

/// The same stream's generator in a new process: a new pool on the same database.
async fn restart(test_db: &TestDb, config: MultiWriterConfig) -> Result<MultiWriterIdGenerator, StoreError> {
    let db = test_db.reconnect().await?;
    MultiWriterIdGenerator::new(&db, config).await
}

async fn an_id_rolled_back_is_never_handed_out_again(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let rolled_back = roll_back(&harness.db, &generator, 1).await?;
    assert_eq!(rolled_back, [8]);
    wait_for_token(|| generator.get_current_token(), 8).await?;
    drop(generator);

    let restarted = restart(&test_db, harness.config("master", &["master"])).await?;
    assert!(restarted.get_current_token() >= 8, "a token a client may hold is not taken back");
    let next = restarted.get_next().await?;
    assert!(next.id() > 8, "ID {} handed out again", next.id());
    next.finish().await?;
    Ok(())
}

async fn an_id_committed_without_a_row_is_never_handed_out_again(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let config = MultiWriterConfig {
        // The process dies before it records the position in the background.
        background_record_delay: Duration::from_secs(3600),
        ..harness.config("master", &["master"])
    };
    let generator = MultiWriterIdGenerator::new(&harness.db, config).await?;
    let committed = harness
        .db
        .run_interaction("allocate_without_a_row", |txn| {
            let generator = generator.clone();
            Box::pin(async move { generator.get_next_txn(txn).await })
        })
        .await?;
    assert_eq!(committed, 8);
    assert_eq!(generator.get_current_token(), 8);
    drop(generator);

    let restarted = restart(&test_db, harness.config("master", &["master"])).await?;
    assert!(restarted.get_current_token() >= 8, "a token a client may hold is not taken back");
    let next = restarted.get_next().await?;
    assert!(next.id() > 8, "ID {} handed out again", next.id());
    next.finish().await?;
    Ok(())
}

async fn a_dropped_guard_is_never_handed_out_again(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let single = generator.get_next().await?;
    let several = generator.get_next_mult(3).await?;
    assert_eq!((single.id(), several.ids()), (8, &[9, 10, 11][..]));
    drop(several);
    drop(single);
    wait_for_token(|| generator.get_current_token(), 11).await?;
    drop(generator);

    let restarted = restart(&test_db, harness.config("master", &["master"])).await?;
    assert!(restarted.get_current_token() >= 11, "a token a client may hold is not taken back");
    let next = restarted.get_next().await?;
    assert!(next.id() > 11, "ID {} handed out again", next.id());
    next.finish().await?;
    Ok(())
}

async fn a_backwards_stream_never_hands_out_a_rolled_back_id_again(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], false).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let written = generator.get_next().await?;
    assert_eq!(written.id(), if test_db.db.engine() == Engine::Postgres { -1 } else { -2 });
    harness.insert_row("foobar", "master", written.id(), false).await?;
    let written_id = written.id();
    written.finish().await?;
    let rolled_back = roll_back(&harness.db, &generator, 2).await?;
    assert_eq!(rolled_back, [written_id - 1, written_id - 2]);
    wait_for_token(|| generator.get_current_token(), written_id - 2).await?;
    drop(generator);

    let restarted = restart(&test_db, harness.config("master", &["master"])).await?;
    assert!(restarted.get_current_token() <= written_id - 2, "a token a client may hold is not taken back");
    let next = restarted.get_next().await?;
    assert!(next.id() < written_id - 2, "ID {} handed out again", next.id());
    next.finish().await?;
    Ok(())
}

// ---- random interleavings, SQLite ----

#[derive(Debug, Clone)]
enum Op {
    /// `get_next_mult` outside a transaction; the guard stays open.
    Allocate { n: usize },
    /// Writes the guard's rows (or not) and finishes it.
    Finish { pick: usize, with_rows: bool },
    /// Drops the guard: the write failed.
    Drop { pick: usize },
    /// `get_next_mult_txn` in a transaction that commits with the rows, commits
    /// without them, or rolls back.
    Transaction { n: usize, outcome: Outcome },
    /// Lets background work (recording abandoned IDs) run.
    Settle,
    /// The process dies: open guards are never finished nor dropped.
    Restart,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    CommitWithRows,
    CommitWithoutRows,
    RollBack,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let outcome =
        prop_oneof![Just(Outcome::CommitWithRows), Just(Outcome::CommitWithoutRows), Just(Outcome::RollBack)];
    prop_oneof![
        3 => (1..4usize).prop_map(|n| Op::Allocate { n }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, with_rows)| Op::Finish { pick, with_rows }),
        2 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
        3 => (1..4usize, outcome).prop_map(|(n, outcome)| Op::Transaction { n, outcome }),
        1 => Just(Op::Settle),
        2 => Just(Op::Restart),
    ]
}

/// One process's life: its generator and its open guards.
struct World<'a> {
    test_db: &'a TestDb,
    harness: Harness,
    db: Database,
    generator: MultiWriterIdGenerator,
    open: Vec<StreamIdsGuard>,
    /// Guards of processes that died: kept, never finished nor dropped, until the
    /// case ends (dropping them would let a dead process act).
    dead: Vec<StreamIdsGuard>,
    /// Every ID a row carries.
    with_rows: BTreeSet<i64>,
    /// The highest token a client could have been handed, in any life so far.
    covered: i64,
    /// The highest ID handed out in this life.
    last_this_life: i64,
}

impl World<'_> {
    fn config(&self) -> MultiWriterConfig {
        self.harness.config("master", &["master"])
    }

    /// What clients could be handed now.
    fn observe(&mut self) {
        let token = self.generator.get_current_token();
        let own = self.generator.get_current_token_for_writer("master");
        self.covered = self.covered.max(token).max(own);
    }

    fn take_ids(&mut self, ids: &[i64], step: usize) {
        for id in ids {
            assert!(
                *id > self.covered,
                "step {step}: ID {id} handed out at or below a token of {}",
                self.covered
            );
            assert!(
                !self.with_rows.contains(id),
                "step {step}: ID {id} handed out again, and a row carries it"
            );
            assert!(*id > self.last_this_life, "step {step}: ID {id} handed out twice in one life");
            self.last_this_life = *id;
        }
    }

    async fn insert_rows(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            self.harness.insert_row("foobar", "master", *id, false).await?;
            self.with_rows.insert(*id);
        }
        Ok(())
    }

    async fn apply(&mut self, step: usize, op: &Op) -> Result<(), Box<dyn std::error::Error>> {
        match *op {
            Op::Allocate { n } => {
                let guard = self.generator.get_next_mult(n).await?;
                self.take_ids(guard.ids(), step);
                self.open.push(guard);
            }
            Op::Finish { pick, with_rows } => {
                if self.open.is_empty() {
                    return Ok(());
                }
                let guard = self.open.remove(pick % self.open.len());
                if with_rows {
                    self.insert_rows(guard.ids()).await?;
                }
                guard.finish().await?;
            }
            Op::Drop { pick } => {
                if !self.open.is_empty() {
                    drop(self.open.remove(pick % self.open.len()));
                }
            }
            Op::Transaction { n, outcome } => {
                let generator = self.generator.clone();
                let allocated = Arc::new(Mutex::new(Vec::new()));
                let result: Result<(), StoreError> = self
                    .db
                    .run_interaction("property_write", |txn| {
                        let (generator, allocated) = (generator.clone(), Arc::clone(&allocated));
                        Box::pin(async move {
                            let ids = generator.get_next_mult_txn(txn, n).await?;
                            *lock(&allocated) = ids.clone();
                            if matches!(outcome, Outcome::CommitWithRows) {
                                for id in &ids {
                                    txn.execute(
                                        "INSERT INTO foobar (stream_id, instance_name) VALUES ($1, 'master')",
                                        &[id],
                                    )
                                    .await?;
                                }
                            }
                            match outcome {
                                Outcome::RollBack => Err(StoreError::Misconfigured("rolled back".to_owned())),
                                Outcome::CommitWithRows | Outcome::CommitWithoutRows => Ok(()),
                            }
                        })
                    })
                    .await;
                assert_eq!(result.is_ok(), !matches!(outcome, Outcome::RollBack));
                let ids = lock(&allocated).clone();
                self.take_ids(&ids, step);
                if matches!(outcome, Outcome::CommitWithRows) {
                    self.with_rows.extend(ids.iter().copied());
                }
            }
            Op::Settle => tokio::time::sleep(Duration::from_millis(20)).await,
            Op::Restart => {
                self.observe();
                self.dead.append(&mut self.open);
                self.db = self.test_db.reconnect().await?;
                self.generator = MultiWriterIdGenerator::new(&self.db, self.config()).await?;
                self.last_this_life = 0;
                let resumed = self.generator.get_current_token();
                assert!(
                    resumed >= self.covered,
                    "step {step}: resumed at {resumed}, below a token of {}",
                    self.covered
                );
            }
        }
        Ok(())
    }
}

fn run_case(ops: &[Op]) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let test_db = TestDb::new(Engine::Sqlite).await?;
        let harness = Harness::new(&test_db, &["foobar"], true).await?;
        let db = test_db.reconnect().await?;
        let generator = MultiWriterIdGenerator::new(&db, harness.config("master", &["master"])).await?;
        let mut world = World {
            test_db: &test_db,
            harness,
            db,
            generator,
            open: Vec::new(),
            dead: Vec::new(),
            with_rows: BTreeSet::new(),
            covered: 0,
            last_this_life: 0,
        };
        for (step, op) in ops.iter().enumerate() {
            world.apply(step + 1, op).await?;
            world.observe();
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(32),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    /// Across commits, rollbacks, dropped guards and restarts, no ID is handed
    /// out at or below a token a client could hold, nor again once a row
    /// carries it; and a restarted process never resumes below such a token.
    #[test]
    fn sqlite_never_hands_out_an_id_twice(ops in proptest::collection::vec(op_strategy(), 1..30)) {
        run_case(&ops).map_err(|err| TestCaseError::fail(err.to_string()))?;
    }
}
