//! Random interleavings of allocations, commits, aborts and replication among
//! four processes while writers join and are retired by the elastic-writers
//! protocol (`crate::writers`): a writer joins only once every process
//! follows it, and is retired, once its writes in flight ended, at its final
//! position, which every process reaches before retiring it.
//!
//! After every step, no process's current token passes an ID still in flight
//! anywhere (readers read what the token covers from the database, so an ID
//! below it must be committed or rolled back), and tokens never go backwards.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::PositionTracker;

const PROCESSES: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    Allocate(usize),
    Commit(usize, usize),
    Abort(usize, usize),
    Replicate(usize, usize),
    Join(usize),
    Retire(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let process = 0..PROCESSES;
    prop_oneof![
        4 => process.clone().prop_map(Op::Allocate),
        4 => (process.clone(), any::<usize>()).prop_map(|(p, pick)| Op::Commit(p, pick)),
        1 => (process.clone(), any::<usize>()).prop_map(|(p, pick)| Op::Abort(p, pick)),
        5 => (process.clone(), process.clone()).prop_map(|(from, to)| Op::Replicate(from, to)),
        1 => process.clone().prop_map(Op::Join),
        1 => process.prop_map(Op::Retire),
    ]
}

fn name(process: usize) -> String {
    format!("p{process}")
}

struct World {
    trackers: Vec<PositionTracker>,
    /// Who may allocate now.
    allocating: BTreeSet<usize>,
    /// Who every process follows (the active writers).
    writers: BTreeSet<usize>,
    next_id: i64,
    /// Per process, its IDs in flight.
    in_flight: Vec<BTreeSet<i64>>,
    /// Committed IDs and their writer.
    committed: BTreeMap<i64, usize>,
    last_token: Vec<i64>,
}

impl World {
    fn new() -> World {
        let trackers = (0..PROCESSES)
            .map(|process| {
                let mut tracker = PositionTracker::new(&name(process));
                tracker.load_position("p0", 1);
                tracker.load_persisted_upto(1);
                tracker.finish_loading(1);
                tracker
            })
            .collect();
        World {
            trackers,
            allocating: BTreeSet::from([0]),
            writers: BTreeSet::from([0]),
            next_id: 2,
            in_flight: vec![BTreeSet::new(); PROCESSES],
            committed: BTreeMap::new(),
            last_token: vec![1; PROCESSES],
        }
    }

    fn pick(set: &BTreeSet<i64>, pick: usize) -> Option<i64> {
        (!set.is_empty()).then(|| *set.iter().nth(pick % set.len()).expect("in range"))
    }

    /// What `from` tells `to`: its position.
    fn replicate(&mut self, from: usize, to: usize) {
        let position = self.trackers[from].position_for_writer(&name(from));
        self.trackers[to].advance(&name(from), position);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Allocate(p) if self.allocating.contains(&p) => {
                let token = self.trackers[p].begin_fetch();
                let id = self.next_id;
                self.next_id += 1;
                self.trackers[p].end_fetch(token, &[id]);
                self.in_flight[p].insert(id);
            }
            Op::Commit(p, pick) | Op::Abort(p, pick) => {
                let Some(id) = World::pick(&self.in_flight[p], pick) else { return };
                self.in_flight[p].remove(&id);
                if matches!(op, Op::Commit(..)) {
                    self.committed.insert(id, p);
                }
                self.trackers[p].mark_finished(&[id]);
            }
            Op::Replicate(from, to) if from != to && self.writers.contains(&from) => self.replicate(from, to),
            Op::Join(p) if !self.writers.contains(&p) => {
                // Every process follows it first (the epoch applied and
                // acknowledged everywhere); then it claims and allocates.
                for tracker in &mut self.trackers {
                    tracker.track(&name(p));
                }
                self.trackers[p].claim_own_position();
                self.writers.insert(p);
                self.allocating.insert(p);
            }
            Op::Retire(p)
                if self.writers.contains(&p) && self.writers.len() > 1 && self.in_flight[p].is_empty() =>
            {
                // The fence: its writes in flight ended. Its final position is
                // what it claims; every process reaches it, then retires it.
                self.allocating.remove(&p);
                self.writers.remove(&p);
                let final_position = self.trackers[p].position_for_writer(&name(p));
                for to in 0..PROCESSES {
                    if to != p {
                        self.replicate(p, to);
                    }
                    self.trackers[to].retire(&name(p), final_position);
                }
            }
            _ => {}
        }
    }

    fn check(&mut self) -> Result<(), TestCaseError> {
        let in_flight: BTreeSet<i64> = self.in_flight.iter().flatten().copied().collect();
        for (process, tracker) in self.trackers.iter().enumerate() {
            let token = tracker.persisted_upto();
            prop_assert!(token >= self.last_token[process], "p{process}'s token went back");
            self.last_token[process] = token;
            if let Some(id) = in_flight.range(..=token).next() {
                prop_assert!(false, "p{process}'s token {token} passes {id}, still in flight");
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn writers_joining_and_retiring_never_let_a_token_pass_a_write_in_flight(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op);
            world.check()?;
        }
    }
}
