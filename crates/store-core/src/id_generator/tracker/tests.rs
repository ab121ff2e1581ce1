//! The bookkeeping alone, driven step by step through the spec's traces.

use super::PositionTracker;

/// A tracker for `instance` loaded with `positions` and `persisted_upto`, as the
/// start-up code leaves it.
fn loaded(instance: &str, positions: &[(&str, i64)], persisted_upto: i64) -> PositionTracker {
    let mut tracker = PositionTracker::new(instance);
    for (writer, position) in positions {
        tracker.load_position(writer, *position);
    }
    tracker.load_persisted_upto(persisted_upto);
    tracker.finish_loading(0);
    tracker
}

/// Allocates `ids` as one sequence fetch would return them.
fn allocate(tracker: &mut PositionTracker, ids: &[i64]) {
    let token = tracker.begin_fetch();
    tracker.end_fetch(token, ids);
}

fn check(tracker: &PositionTracker, persisted_upto: i64, positions: &[(&str, i64)]) {
    let expected: Vec<(String, i64)> = positions.iter().map(|(w, p)| ((*w).to_owned(), *p)).collect();
    let actual: Vec<(String, i64)> = tracker.positions().iter().map(|(w, p)| (w.clone(), *p)).collect();
    assert_eq!((tracker.persisted_upto(), actual), (persisted_upto, expected));
}

#[test]
fn out_of_order_finishes_move_the_position_only_over_gapless_runs() {
    // The spec's worked trace (single writer at 7).
    let mut tracker = loaded("master", &[("master", 7)], 7);
    allocate(&mut tracker, &[8, 9, 10, 11]);
    check(&tracker, 7, &[("master", 7)]);
    tracker.mark_finished(&[9]);
    check(&tracker, 7, &[("master", 7)]);
    tracker.mark_finished(&[8]);
    check(&tracker, 9, &[("master", 9)]);
    tracker.mark_finished(&[11]);
    check(&tracker, 9, &[("master", 9)]);
    tracker.mark_finished(&[10]);
    check(&tracker, 11, &[("master", 11)]);
    assert_eq!(tracker.position_for_writer("master"), 11);
}

#[test]
fn advances_fill_gaps_only_when_the_ids_between_are_known() {
    // Scenario 7: a reader of writers `first` (at 3) and `second` (at 5).
    let mut tracker = loaded("worker", &[("first", 3), ("second", 5)], 3);
    tracker.add_persisted_position(3);
    tracker.add_persisted_position(5);
    assert_eq!(tracker.persisted_upto(), 3);
    let steps =
        [(("first", 6), 6), (("second", 7), 7), (("second", 9), 7), (("first", 8), 9), (("first", 11), 9)];
    for ((writer, position), expected) in steps {
        tracker.advance(writer, position);
        assert_eq!(tracker.persisted_upto(), expected, "after advance({writer}, {position})");
    }
    tracker.advance("second", 15);
    assert_eq!(tracker.persisted_upto(), 11, "10 was never seen, but both writers are past it");
}

#[test]
fn an_allocation_in_flight_holds_our_position() {
    // Scenario 16: a remote advance arriving while our sequence fetch is open must
    // not make us look idle.
    let mut tracker = loaded("w", &[("w", 10), ("x", 10)], 10);
    let token = tracker.begin_fetch();
    tracker.advance("x", 12);
    assert_eq!(tracker.persisted_upto(), 10);
    assert_eq!(tracker.position_for_writer("w"), 10);
    tracker.end_fetch(token, &[11]);
    assert_eq!(tracker.position_for_writer("w"), 10, "11 is unfinished");
    tracker.mark_finished(&[11]);
    assert_eq!(tracker.position_for_writer("w"), 12);
    check(&tracker, 12, &[("w", 11), ("x", 12)]);
}

#[test]
fn a_failed_fetch_releases_its_hold() {
    let mut tracker = loaded("w", &[("w", 10), ("x", 10)], 10);
    let token = tracker.begin_fetch();
    tracker.advance("x", 12);
    assert_eq!(tracker.position_for_writer("w"), 10);
    tracker.end_fetch(token, &[]);
    // Nothing of ours is outstanding: the hold goes at once, not at the next event.
    assert_eq!(tracker.position_for_writer("w"), 12);
    assert_eq!(tracker.persisted_upto(), 12);
}

#[test]
fn unknown_writers_sit_at_the_persisted_position() {
    // Scenario 17.
    let mut tracker = loaded("reader", &[("a", 5), ("b", 5)], 5);
    tracker.advance("c", 9);
    assert_eq!(tracker.positions().get("c"), Some(&9));
    assert_eq!(tracker.position_for_writer("c"), 9);
    assert_eq!(tracker.persisted_upto(), 5);
    assert_eq!(tracker.position_for_writer("d"), 5);
}

#[test]
fn positions_never_regress() {
    // Scenario 18.
    let mut tracker = loaded("reader", &[("a", 5), ("b", 5)], 5);
    tracker.advance("a", 4);
    check(&tracker, 5, &[("a", 5), ("b", 5)]);
}

#[test]
fn an_idle_writer_claims_the_highest_id_seen() {
    // Scenario 15's core: with nothing outstanding our claim jumps to the highest
    // ID anyone allocated; with something in flight it does not.
    let mut tracker = loaded("second", &[("first", 7), ("second", 7), ("third", 7)], 7);
    tracker.advance("first", 9);
    assert_eq!(tracker.position_for_writer("first"), 9);
    assert_eq!(tracker.position_for_writer("second"), 9);
    assert_eq!(tracker.persisted_upto(), 7, "third is stuck at 7");

    allocate(&mut tracker, &[12]);
    tracker.advance("first", 11);
    assert_eq!(tracker.position_for_writer("first"), 11);
    assert_eq!(tracker.position_for_writer("second"), 9, "12 is in flight, so no jump");
    tracker.mark_finished(&[12]);
    assert_eq!(tracker.position_for_writer("second"), 12);
    assert_eq!(tracker.persisted_upto(), 7);
    assert_eq!(tracker.minimal_local(), 12);
}

#[test]
fn several_fetches_in_flight_are_counted_separately() {
    let mut tracker = loaded("w", &[("w", 5)], 5);
    let first = tracker.begin_fetch();
    let second = tracker.begin_fetch();
    assert_eq!(first, second, "both started at the same highest-seen ID");
    tracker.end_fetch(first, &[6]);
    tracker.mark_finished(&[6]);
    assert_eq!(tracker.position_for_writer("w"), 5, "the second fetch may still return 6's neighbours");
    tracker.end_fetch(second, &[7]);
    tracker.mark_finished(&[7]);
    assert_eq!(tracker.position_for_writer("w"), 7);
    assert_eq!(tracker.persisted_upto(), 7);
}

#[test]
fn the_oldest_unfinished_id_ages_until_it_finishes() {
    let mut tracker = loaded("first", &[("first", 3)], 3);
    let before = std::time::Instant::now();
    assert_eq!(tracker.oldest_unfinished_age(before), None);
    allocate(&mut tracker, &[4]);
    std::thread::sleep(std::time::Duration::from_millis(5));
    allocate(&mut tracker, &[5]);
    let later = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let age_of_4 = tracker.oldest_unfinished_age(later).expect("4 and 5 are in flight");
    assert!(age_of_4 >= std::time::Duration::from_millis(1005), "the oldest's, ID 4's: {age_of_4:?}");
    tracker.mark_finished(&[4]);
    let age_of_5 = tracker.oldest_unfinished_age(later).expect("5 is in flight");
    assert!(age_of_5 < age_of_4, "now ID 5's age: {age_of_5:?}");
    tracker.mark_finished(&[5]);
    assert_eq!(tracker.oldest_unfinished_age(later), None);
}

#[test]
fn an_id_finished_while_an_earlier_fetch_was_open_counts_once_that_fetch_ends() {
    // Two sends at once: the second fetch starts before the first one's ID is
    // known, so the first ID, finished, waits for the second fetch to end.
    let mut tracker = loaded("writer1", &[("writer1", 7), ("writer2", 7)], 7);
    let second = tracker.begin_fetch();
    allocate(&mut tracker, &[8]);
    tracker.mark_finished(&[8]);
    assert_eq!(tracker.minimal_local(), 7, "the open fetch may still return 8's neighbours");
    tracker.end_fetch(second, &[10]);
    assert_eq!(tracker.minimal_local(), 8, "with the fetch over, nothing holds 8 back");
    assert_eq!(tracker.position_for_writer("writer1"), 8);
    // Another writer's 9 lets the stream through to just below our 10.
    tracker.advance("writer2", 9);
    assert_eq!(tracker.persisted_upto(), 9);
    assert!(tracker.minimal_local() >= 8 && tracker.position_for_writer("writer1") <= 9);
}

#[test]
fn a_writer_added_at_runtime_holds_the_stream_at_its_position_until_it_advances() {
    let mut tracker = loaded("reader", &[("a", 5)], 5);
    tracker.advance("a", 8);
    assert_eq!(tracker.persisted_upto(), 8);
    tracker.track("b");
    check(&tracker, 8, &[("a", 8), ("b", 8)]);
    // `a` moves on; `b`, which may hold an ID in between, holds the stream.
    tracker.advance("a", 12);
    assert_eq!(tracker.persisted_upto(), 8);
    tracker.advance("b", 12);
    assert_eq!(tracker.persisted_upto(), 12);
    // Tracking again never moves a position back.
    tracker.track("b");
    check(&tracker, 12, &[("a", 12), ("b", 12)]);
}

#[test]
fn a_retired_writer_holds_nothing_back_and_tokens_naming_it_count_it_at_its_final_position() {
    let mut tracker = loaded("reader", &[("a", 5), ("b", 5)], 5);
    tracker.advance("a", 10);
    tracker.advance("b", 7);
    assert_eq!(tracker.persisted_upto(), 7);
    tracker.retire("b", 7);
    check(&tracker, 10, &[("a", 10)]);
    assert_eq!(tracker.retired_position("b"), Some(7));
    // A token naming `b` past its final position waits for the stream.
    assert_eq!(tracker.position_for_writer("b"), 10);
    tracker.advance("a", 15);
    assert_eq!(tracker.position_for_writer("b"), 15);
    // Added back, it is followed again from the stream's position.
    tracker.track("b");
    assert_eq!(tracker.retired_position("b"), None);
    check(&tracker, 15, &[("a", 15), ("b", 15)]);
}

#[test]
fn joining_claims_the_stream_position_and_no_more() {
    let mut tracker = loaded("new", &[("a", 5)], 5);
    tracker.advance("a", 9);
    tracker.claim_own_position();
    assert_eq!(tracker.positions().get("new"), Some(&9));
    // An ID of ours allocated afterwards holds the stream at our claim.
    allocate(&mut tracker, &[11]);
    tracker.advance("a", 13);
    assert_eq!(tracker.persisted_upto(), 9);
    tracker.mark_finished(&[11]);
    assert!(tracker.persisted_upto() >= 11);
}
