//! The in-memory bookkeeping of a stream's positions, with no database and no
//! locking: what `MultiWriterIdGenerator` keeps under its mutex.
//!
//! All IDs here are internal magnitudes (positive); the generator multiplies by
//! −1 at its boundary for backwards streams.
//!
//! The positions kept:
//! - per writer, the largest ID such that everything that writer wrote at or below
//!   it is finished (committed or rolled back), as far as this process knows;
//! - the *persisted-up-to* position: the largest ID such that everything any
//!   writer wrote at or below it is finished — the stream's current token;
//! - for this process, `max_local`: the best position it can claim for itself,
//!   which runs ahead of its last write when it has nothing in flight, so an idle
//!   writer never holds the others back.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

/// Handed out by [`PositionTracker::begin_fetch`]; returned to
/// [`PositionTracker::end_fetch`] once the sequence has answered (or failed).
///
/// While a fetch is open, this process may be about to receive any ID above the
/// highest one seen so far, so no position of its own may pass that point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "every fetch must be ended, or the stream's positions stop moving"]
pub struct FetchToken(i64);

/// The bookkeeping of one stream's positions, as seen by one process.
#[derive(Debug, Clone)]
pub struct PositionTracker {
    instance_name: String,
    /// Per writer, the position known here.
    positions: BTreeMap<String, i64>,
    /// IDs this process allocated and has not finished.
    unfinished: BTreeSet<i64>,
    /// When each allocation still holding an unfinished ID returned, keyed by
    /// its lowest ID: for the age of the oldest unfinished ID, a health signal.
    /// Kept per allocation, not per ID, so finishing an ID costs nothing more.
    allocated_at: BTreeMap<i64, Instant>,
    /// For each allocation between "asked the sequence" and "recorded the IDs": the
    /// highest ID seen when it started (a multiset: value → count).
    in_flight_fetches: BTreeMap<i64, usize>,
    /// IDs this process finished that lie above an unfinished one.
    finished: BTreeSet<i64>,
    /// The stream's current token.
    persisted_upto: i64,
    /// Finished IDs above `persisted_upto` that may close gaps later (min-heap).
    known_persisted: BinaryHeap<Reverse<i64>>,
    /// The highest ID anyone is known to have allocated.
    max_seen_allocated: i64,
    /// The best position this process can claim for itself.
    max_local: i64,
    /// Writers taken out of the stream, at their final positions.
    retired: BTreeMap<String, i64>,
}

impl PositionTracker {
    /// A tracker for `instance_name` with nothing known: every position is 1,
    /// because ID 1 is always taken as persisted.
    pub fn new(instance_name: &str) -> PositionTracker {
        PositionTracker {
            instance_name: instance_name.to_owned(),
            positions: BTreeMap::new(),
            unfinished: BTreeSet::new(),
            allocated_at: BTreeMap::new(),
            in_flight_fetches: BTreeMap::new(),
            finished: BTreeSet::new(),
            persisted_upto: 1,
            known_persisted: BinaryHeap::new(),
            max_seen_allocated: 1,
            max_local: 1,
            retired: BTreeMap::new(),
        }
    }

    /// The instance this tracker belongs to.
    pub fn instance_name(&self) -> &str {
        &self.instance_name
    }

    // ---- start-up ----

    /// Sets a writer's position as loaded at start-up (may move it down: the
    /// loader decides).
    pub(crate) fn load_position(&mut self, instance: &str, position: i64) {
        self.positions.insert(instance.to_owned(), position);
    }

    pub(crate) fn load_persisted_upto(&mut self, position: i64) {
        self.persisted_upto = position;
    }

    /// Finishes start-up: the highest ID seen is the highest known position (or
    /// `highest_row`, the largest ID found in the tables), and this process,
    /// having nothing in flight, may claim it.
    pub(crate) fn finish_loading(&mut self, highest_row: i64) {
        let highest_position = self.positions.values().copied().max().unwrap_or(1);
        self.max_seen_allocated = highest_position.max(self.persisted_upto).max(highest_row);
        self.max_local = self.max_seen_allocated;
    }

    // ---- allocation and completion ----

    /// Records that an allocation has started. Until [`PositionTracker::end_fetch`],
    /// this process's positions stay at or below the highest ID seen now.
    pub fn begin_fetch(&mut self) -> FetchToken {
        *self.in_flight_fetches.entry(self.max_seen_allocated).or_default() += 1;
        FetchToken(self.max_seen_allocated)
    }

    /// Records the IDs an allocation returned (none if it failed) and closes it.
    pub fn end_fetch(&mut self, token: FetchToken, ids: &[i64]) {
        self.unfinished.extend(ids.iter().copied());
        if let Some(&lowest) = ids.iter().min() {
            self.allocated_at.insert(lowest, Instant::now());
            // Allocations below the one holding the oldest unfinished ID are done.
            if let Some(&oldest) = self.unfinished.first()
                && let Some((&holder, _)) = self.allocated_at.range(..=oldest).next_back()
            {
                while let Some(entry) = self.allocated_at.first_entry()
                    && *entry.key() < holder
                {
                    entry.remove();
                }
            }
        }
        if let Some(&highest) = ids.iter().max() {
            self.max_seen_allocated = self.max_seen_allocated.max(highest);
        }
        match self.in_flight_fetches.get_mut(&token.0) {
            Some(count) if *count > 1 => *count -= 1,
            Some(_) => {
                self.in_flight_fetches.remove(&token.0);
            }
            None => debug_assert!(false, "a fetch token was ended twice"),
        }
        self.settle_own_position();
        if ids.is_empty() && !self.has_outstanding() {
            // A failed or abandoned fetch may have been all that held our position
            // back: let the others' positions through now rather than at the next
            // event.
            self.add_persisted_position(self.persisted_upto);
        }
    }

    /// Whether this process has allocations in progress or IDs unfinished.
    fn has_outstanding(&self) -> bool {
        !self.unfinished.is_empty() || !self.in_flight_fetches.is_empty()
    }

    /// The lowest ID this process may still write: an unfinished one, or anything
    /// above the highest ID seen when a fetch started.
    fn lowest_pending(&self) -> Option<i64> {
        let unfinished = self.unfinished.first().copied();
        let fetching = self.in_flight_fetches.keys().next().map(|guard| guard + 1);
        unfinished.into_iter().chain(fetching).min()
    }

    /// Marks `ids` (allocated here) as finished, committed or rolled back, and
    /// moves the positions as far as that allows.
    pub fn mark_finished(&mut self, ids: &[i64]) {
        for id in ids {
            self.unfinished.remove(id);
            self.finished.insert(*id);
        }
        self.settle_own_position();
        for id in ids {
            self.add_persisted_position(*id);
        }
    }

    /// Moves this process's own position over the finished IDs that nothing
    /// pending holds back any more. Runs when an ID finishes and when a fetch
    /// ends: an ID finished while a fetch that started below it was open waits
    /// for that fetch, and must count once it is over, or the position a
    /// writer's streamer reads its own rows up to lags behind the one it
    /// announces, and the rows in between are never sent.
    fn settle_own_position(&mut self) {
        let new_position = if let Some(lowest_pending) = self.lowest_pending() {
            let below = self.finished.range(..lowest_pending).next_back().copied();
            self.finished = self.finished.split_off(&lowest_pending);
            below
        } else {
            let highest = self.finished.last().copied();
            self.finished.clear();
            highest
        };
        if let Some(new_position) = new_position {
            let old = self.positions.get(&self.instance_name).copied().unwrap_or(0);
            self.positions.insert(self.instance_name.clone(), old.max(new_position));
            self.max_local = self.max_local.max(old).max(new_position);
        }
    }

    /// Records that `id` is finished (here or elsewhere) and moves the
    /// persisted-up-to position as far as the gaps allow.
    pub fn add_persisted_position(&mut self, id: i64) {
        self.known_persisted.push(Reverse(id));
        let ours = self.positions.get(&self.instance_name).copied().unwrap_or(0);
        let others_min = self
            .positions
            .iter()
            .filter(|(instance, _)| **instance != self.instance_name)
            .map(|(_, p)| *p)
            .min();
        let mut min_current = others_min.unwrap_or(ours);
        // With nothing outstanding, our own (possibly lagging) entry must not hold
        // the stream back: anything we write next gets an ID above all seen so far.
        if ours != 0 && self.has_outstanding() {
            min_current = min_current.min(ours);
        }
        self.persisted_upto = self.persisted_upto.max(min_current);
        self.max_local = self.max_local.max(self.persisted_upto);
        if !self.has_outstanding() {
            self.max_local = self.max_local.max(self.max_seen_allocated);
        }
        // Never close a gap over an ID of ours that is still pending, whatever
        // others claim: the position must stay below it.
        let own_pending = self.lowest_pending().unwrap_or(i64::MAX);
        while let Some(&Reverse(lowest)) = self.known_persisted.peek() {
            if lowest <= self.persisted_upto {
                self.known_persisted.pop();
            } else if lowest == self.persisted_upto + 1 && lowest < own_pending {
                self.known_persisted.pop();
                self.persisted_upto += 1;
            } else {
                break;
            }
        }
    }

    /// Another writer's position, learned from replication. Never moves a
    /// position backwards.
    pub fn advance(&mut self, instance: &str, position: i64) {
        let entry = self.positions.entry(instance.to_owned()).or_insert(position);
        *entry = (*entry).max(position);
        self.max_seen_allocated = self.max_seen_allocated.max(position);
        self.add_persisted_position(position);
    }

    // ---- the writers changing ----

    /// Follows `writer` from now on; one new here starts at the stream's
    /// position, as one without a recorded position does at start-up.
    pub(crate) fn track(&mut self, writer: &str) {
        self.retired.remove(writer);
        if !self.positions.contains_key(writer) && writer != self.instance_name {
            self.positions.insert(writer.to_owned(), self.persisted_upto);
        }
    }

    /// Stops following `writer`, at `final_position`: it no longer holds the
    /// stream's position back.
    pub(crate) fn retire(&mut self, writer: &str, final_position: i64) {
        self.positions.remove(writer);
        self.retired.insert(writer.to_owned(), final_position);
        self.add_persisted_position(self.persisted_upto);
    }

    /// This process, joining the writers: its position starts at the best it
    /// can claim (everything at or below it is finished).
    pub(crate) fn claim_own_position(&mut self) {
        self.retired.remove(&self.instance_name);
        let entry = self.positions.entry(self.instance_name.clone()).or_insert(self.persisted_upto);
        *entry = (*entry).max(self.persisted_upto);
    }

    /// The final position of a retired writer.
    pub fn retired_position(&self, writer: &str) -> Option<i64> {
        self.retired.get(writer).copied()
    }

    // ---- reading ----

    /// The stream's current token: everything at or below it is finished.
    pub fn persisted_upto(&self) -> i64 {
        self.persisted_upto
    }

    /// The position of `writer` as known here; for this process, the best it can
    /// claim. Never below the persisted-up-to position.
    pub fn position_for_writer(&self, writer: &str) -> i64 {
        if writer == self.instance_name {
            self.max_local
        } else if let Some(final_position) = self.retired.get(writer) {
            (*final_position).max(self.persisted_upto)
        } else {
            self.positions.get(writer).copied().unwrap_or(self.persisted_upto).max(self.persisted_upto)
        }
    }

    /// The position of this process's own last finished write: what another
    /// process should wait for.
    pub fn minimal_local(&self) -> i64 {
        self.positions.get(&self.instance_name).copied().unwrap_or(self.persisted_upto)
    }

    /// Every writer's position as known here.
    pub fn positions(&self) -> &BTreeMap<String, i64> {
        &self.positions
    }

    /// The highest ID anyone is known to have allocated.
    pub fn max_seen_allocated(&self) -> i64 {
        self.max_seen_allocated
    }

    /// How many IDs this process has allocated and not yet finished.
    pub fn unfinished_count(&self) -> usize {
        self.unfinished.len()
    }

    /// How long the oldest ID this process allocated and has not finished has
    /// been in flight at `now`; `None` with nothing in flight. A write stuck for
    /// long holds every reader of the stream back. (When concurrent allocations
    /// interleave their IDs, the age may be that of a later allocation: a lower
    /// bound.)
    pub fn oldest_unfinished_age(&self, now: Instant) -> Option<Duration> {
        let oldest = self.unfinished.first()?;
        let (_, since) = self.allocated_at.range(..=oldest).next_back()?;
        Some(now.saturating_duration_since(*since))
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod elastic_properties;
