//! Random interleavings of allocate / finish / abort / replicate / restart across
//! 2–4 writers on PostgreSQL, checked against a simple model of the stream.
//!
//! The model knows every ID allocated and whether it is still unfinished. After
//! every step, for every generator:
//! - its current token is below every unfinished ID (nothing unfinished is
//!   claimed), and its position for a writer is below that writer's unfinished IDs;
//! - tokens never move backwards, a restarted writer resumes at or above the
//!   position it had recorded, and no ID is ever handed out twice;
//!
//! At the end, once everything is finished and replicated, every generator's
//! token reaches the highest ID the sequence handed out (nothing finished is
//! lost, and abandoned IDs do not hold the stream back).

use std::collections::BTreeSet;

use proptest::prelude::*;
use store_core::{Engine, MultiWriterIdGenerator, StreamIdsGuard};
use store_test_support::TestDb;

use crate::id_generators::Harness;

const WRITERS: [&str; 4] = ["w0", "w1", "w2", "w3"];

#[derive(Debug, Clone)]
enum Op {
    Allocate { writer: usize, n: usize },
    Finish { writer: usize, pick: usize },
    Abort { writer: usize, pick: usize },
    Replicate { writer: usize },
    Restart { writer: usize },
}

fn op_strategy(n_writers: usize) -> impl Strategy<Value = Op> {
    let writer = 0..n_writers;
    prop_oneof![
        3 => (writer.clone(), 1..4usize).prop_map(|(writer, n)| Op::Allocate { writer, n }),
        3 => (writer.clone(), any::<usize>()).prop_map(|(writer, pick)| Op::Finish { writer, pick }),
        1 => (writer.clone(), any::<usize>()).prop_map(|(writer, pick)| Op::Abort { writer, pick }),
        2 => writer.clone().prop_map(|writer| Op::Replicate { writer }),
        1 => writer.prop_map(|writer| Op::Restart { writer }),
    ]
}

fn case_strategy() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (2..=4usize).prop_flat_map(|n_writers| {
        (Just(n_writers), proptest::collection::vec(op_strategy(n_writers), 1..40))
    })
}

/// What one generator has reported so far, to check monotonicity.
#[derive(Debug, Clone)]
struct Seen {
    current: i64,
    per_writer: Vec<i64>,
}

struct World {
    harness: Harness,
    writers: Vec<&'static str>,
    gens: Vec<MultiWriterIdGenerator>,
    open: Vec<Vec<StreamIdsGuard>>,
    /// `(id, writer)` of every unfinished ID.
    unfinished: BTreeSet<(i64, usize)>,
    max_allocated: i64,
    seen: Vec<Seen>,
}

impl World {
    async fn new(test_db: &TestDb, n_writers: usize) -> Result<World, Box<dyn std::error::Error>> {
        let harness = Harness::new(test_db, &["foobar"], true).await?;
        harness.consume_first_id().await?;
        let writers: Vec<&'static str> = WRITERS[..n_writers].to_vec();
        let mut gens = Vec::new();
        for writer in &writers {
            gens.push(harness.generator(writer, &writers).await?);
        }
        let seen = vec![Seen { current: 0, per_writer: vec![0; n_writers] }; n_writers];
        Ok(World {
            harness,
            writers,
            gens,
            open: (0..n_writers).map(|_| Vec::new()).collect(),
            unfinished: BTreeSet::new(),
            max_allocated: 0,
            seen,
        })
    }

    async fn apply(&mut self, op: &Op) -> Result<(), Box<dyn std::error::Error>> {
        match *op {
            Op::Allocate { writer, n } => {
                let guard = self.gens[writer].get_next_mult(n).await?;
                for id in guard.ids() {
                    assert!(*id > self.max_allocated, "ID {id} handed out again, or out of order");
                    self.unfinished.insert((*id, writer));
                    self.max_allocated = self.max_allocated.max(*id);
                }
                self.open[writer].push(guard);
            }
            Op::Finish { writer, pick } | Op::Abort { writer, pick } => {
                if self.open[writer].is_empty() {
                    return Ok(());
                }
                let idx = pick % self.open[writer].len();
                let guard = self.open[writer].remove(idx);
                let ids = guard.ids().to_vec();
                if matches!(op, Op::Finish { .. }) {
                    for id in &ids {
                        self.harness.insert_row("foobar", self.writers[writer], *id, false).await?;
                    }
                    guard.finish().await?;
                } else {
                    drop(guard);
                }
                for id in ids {
                    self.unfinished.remove(&(id, writer));
                }
            }
            Op::Replicate { writer } => self.replicate(writer),
            Op::Restart { writer } => {
                // The process dies: its open writes never commit.
                for guard in self.open[writer].drain(..) {
                    for id in guard.ids() {
                        self.unfinished.remove(&(*id, writer));
                    }
                }
                let name = self.writers[writer];
                let recorded = self.harness.stored_position(name).await?.unwrap_or(0);
                self.gens[writer] = self.harness.generator(name, &self.writers).await?;
                let resumed = self.gens[writer].get_current_token_for_writer(name);
                // The in-memory claim of the old process may have been higher (an idle
                // writer claims IDs it saw others finish); only what was recorded is
                // durable, and new IDs come from the sequence, above everything.
                assert!(resumed >= recorded, "{name} resumed at {resumed}, below its recorded {recorded}");
                self.seen[writer] = Seen { current: 0, per_writer: vec![0; self.writers.len()] };
            }
        }
        Ok(())
    }

    fn replicate(&self, writer: usize) {
        let token = self.gens[writer].get_current_token_for_writer(self.writers[writer]);
        for (other, generator) in self.gens.iter().enumerate() {
            if other != writer {
                generator.advance(self.writers[writer], token);
            }
        }
    }

    fn check(&mut self, step: usize, op: &Op) {
        let lowest_unfinished = self.unfinished.first().map(|(id, _)| *id);
        for (g, generator) in self.gens.iter().enumerate() {
            let current = generator.get_current_token();
            if let Some(lowest) = lowest_unfinished {
                assert!(
                    current < lowest,
                    "step {step} {op:?}: gen {g} token {current} claims unfinished {lowest}"
                );
            }
            assert!(current >= self.seen[g].current, "step {step} {op:?}: gen {g} token went back");
            self.seen[g].current = current;
            for (w, writer) in self.writers.iter().enumerate() {
                let position = generator.get_current_token_for_writer(writer);
                if let Some((lowest, _)) = self.unfinished.iter().find(|(_, owner)| *owner == w) {
                    assert!(
                        position < *lowest,
                        "step {step} {op:?}: gen {g} says {writer} is at {position}, but {lowest} is unfinished"
                    );
                }
                assert!(
                    position >= self.seen[g].per_writer[w],
                    "step {step} {op:?}: gen {g}'s {writer} went back"
                );
                self.seen[g].per_writer[w] = position;
            }
        }
    }

    async fn quiesce(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        for writer in 0..self.writers.len() {
            while !self.open[writer].is_empty() {
                self.apply(&Op::Finish { writer, pick: 0 }).await?;
            }
        }
        for _ in 0..2 {
            for writer in 0..self.writers.len() {
                self.replicate(writer);
            }
        }
        // Everything the sequence handed out is finished, so every token reaches
        // its last value (a restarted writer may have taken one ID for itself).
        let expected = self
            .harness
            .db
            .run_autocommit("sequence_last_value", |txn| {
                Box::pin(async move {
                    txn.query_one("SELECT last_value FROM foobar_seq", &[]).await?.get::<i64>(0)
                })
            })
            .await?;
        assert!(expected >= self.max_allocated);
        for (g, generator) in self.gens.iter().enumerate() {
            assert_eq!(generator.get_current_token(), expected, "gen {g} never caught up: {generator:?}");
        }
        Ok(())
    }
}

fn run_case(n_writers: usize, ops: &[Op]) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let test_db = TestDb::new(Engine::Postgres).await?;
        let mut world = World::new(&test_db, n_writers).await?;
        world.check(0, &Op::Replicate { writer: 0 });
        for (step, op) in ops.iter().enumerate() {
            world.apply(op).await?;
            world.check(step + 1, op);
        }
        world.quiesce().await
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(24),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn positions_follow_the_model((n_writers, ops) in case_strategy()) {
        run_case(n_writers, &ops).map_err(|err| TestCaseError::fail(err.to_string()))?;
    }
}
