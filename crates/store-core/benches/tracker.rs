//! The in-memory bookkeeping of stream positions, the hot path of every write and
//! every replicated position: regressions here show up as slower writes
//! everywhere.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use store_core::PositionTracker;

/// A writer at 1000 among three others, as after start-up.
fn tracker() -> PositionTracker {
    let mut tracker = PositionTracker::new("w0");
    for writer in ["w0", "w1", "w2", "w3"] {
        tracker.advance(writer, 1000);
    }
    tracker
}

fn allocate(tracker: &mut PositionTracker, ids: &[i64]) {
    let token = tracker.begin_fetch();
    tracker.end_fetch(token, ids);
}

fn bookkeeping(c: &mut Criterion) {
    let ids: Vec<i64> = (1001..=2000).collect();

    c.bench_function("tracker/finish_in_order_1000", |b| {
        b.iter_batched(
            || {
                let mut tracker = tracker();
                allocate(&mut tracker, &ids);
                tracker
            },
            |mut tracker| {
                for id in &ids {
                    tracker.mark_finished(&[*id]);
                }
                black_box(tracker.persisted_upto())
            },
            BatchSize::SmallInput,
        );
    });

    c.bench_function("tracker/finish_reversed_1000", |b| {
        b.iter_batched(
            || {
                let mut tracker = tracker();
                allocate(&mut tracker, &ids);
                tracker
            },
            |mut tracker| {
                for id in ids.iter().rev() {
                    tracker.mark_finished(&[*id]);
                }
                black_box(tracker.persisted_upto())
            },
            BatchSize::SmallInput,
        );
    });

    c.bench_function("tracker/allocate_and_finish_one", |b| {
        let mut tracker = tracker();
        let mut next = 1001;
        b.iter(|| {
            allocate(&mut tracker, &[next]);
            tracker.mark_finished(&[next]);
            next += 1;
            black_box(tracker.position_for_writer("w0"))
        });
    });

    c.bench_function("tracker/advance_1000_across_4_writers", |b| {
        b.iter_batched(
            tracker,
            |mut tracker| {
                for step in 0..1000 {
                    let writer = ["w1", "w2", "w3"][step % 3];
                    tracker.advance(writer, 1001 + i64::try_from(step).unwrap_or(0));
                }
                black_box(tracker.persisted_upto())
            },
            BatchSize::SmallInput,
        );
    });
}

criterion_group!(benches, bookkeeping);
criterion_main!(benches);
