//! The events this process's writer persisted lately, for its replication
//! streamer: what it would otherwise read back from the database right after
//! each commit to send the rows to the other processes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use crate::Event;

/// How many of the latest events are kept.
const KEPT: usize = 10_000;

/// The latest events one writer (this process) persisted, in stream order.
///
/// They are recorded once their commit is known and before the writer's
/// position moves past them, one commit at a time in the order of the
/// writer's queue, which is the order of their stream orderings. So every
/// event of the writer ordered after `floor` and up to the last one recorded
/// is here: IDs in between that are missing were abandoned, and have no row
/// in the database either. Events of the writer from before the first one
/// recorded (a previous run's, say) were handed out earlier, so they are at
/// or below `floor`.
#[derive(Debug, Default)]
pub(crate) struct RecentEvents {
    kept: Mutex<Option<Kept>>,
}

#[derive(Debug)]
struct Kept {
    writer: String,
    floor: i64,
    events: VecDeque<Arc<Event>>,
}

impl RecentEvents {
    /// Records the events of one commit of `writer`, in stream order.
    pub(crate) fn record(&self, writer: &str, events: Vec<Event>) {
        let Some(first) = events.first() else { return };
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = kept.get_or_insert_with(|| Kept {
            writer: writer.to_owned(),
            floor: first.stream_ordering - 1,
            events: VecDeque::new(),
        });
        if kept.writer != writer {
            return;
        }
        kept.events.extend(events.into_iter().map(Arc::new));
        while kept.events.len() > KEPT {
            if let Some(dropped) = kept.events.pop_front() {
                kept.floor = dropped.stream_ordering;
            }
        }
    }

    /// `writer`'s events ordered in `(from, to]`, at most `limit` of them, if
    /// all of them are kept here; `None` when the database must be asked.
    pub(crate) fn between(&self, writer: &str, from: i64, to: i64, limit: usize) -> Option<Vec<Arc<Event>>> {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = kept.as_ref().filter(|kept| kept.writer == writer && from >= kept.floor)?;
        let last = kept.events.back().map_or(kept.floor, |event| event.stream_ordering);
        if to > last {
            return None;
        }
        let start = kept.events.partition_point(|event| event.stream_ordering <= from);
        Some(
            kept.events
                .range(start..)
                .take_while(|event| event.stream_ordering <= to)
                .take(limit)
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewEvent;

    fn event(ordering: i64) -> Event {
        let new = NewEvent {
            event_id: format!("${ordering}"),
            event_type: "m.room.message".to_owned(),
            state_key: None,
            sender: "@a:b".to_owned(),
            origin_server_ts: 0,
            content: "{}".to_owned(),
        };
        Event::new(ordering, "w1".to_owned(), "!r:b".to_owned(), new)
    }

    fn orderings(events: Option<Vec<Arc<Event>>>) -> Option<Vec<i64>> {
        events.map(|events| events.iter().map(|event| event.stream_ordering).collect())
    }

    #[test]
    fn answers_only_ranges_it_holds_whole() {
        let recent = RecentEvents::default();
        assert_eq!(orderings(recent.between("w1", 0, 5, 10)), None, "nothing recorded yet");
        recent.record("w1", vec![event(5), event(6)]);
        // 7 and 8 went to another writer; 9 was abandoned.
        recent.record("w1", vec![event(10)]);
        assert_eq!(orderings(recent.between("w1", 4, 10, 10)), Some(vec![5, 6, 10]));
        assert_eq!(orderings(recent.between("w1", 5, 9, 10)), Some(vec![6]));
        assert_eq!(orderings(recent.between("w1", 4, 10, 2)), Some(vec![5, 6]), "the limit");
        assert_eq!(orderings(recent.between("w1", 3, 10, 10)), None, "below the first recorded");
        assert_eq!(orderings(recent.between("w1", 6, 11, 10)), None, "beyond the last recorded");
        assert_eq!(orderings(recent.between("w2", 4, 10, 10)), None, "another writer's");
        recent.record("w2", vec![event(11)]);
        assert_eq!(orderings(recent.between("w1", 6, 11, 10)), None, "kept for one writer only");
    }

    #[test]
    fn keeps_the_latest_and_raises_its_floor() {
        let recent = RecentEvents::default();
        for ordering in 1..=(KEPT as i64 + 5) {
            recent.record("w1", vec![event(ordering)]);
        }
        assert_eq!(orderings(recent.between("w1", 4, 6, 10)), None, "dropped");
        assert_eq!(orderings(recent.between("w1", 5, 7, 10)), Some(vec![6, 7]));
    }
}
