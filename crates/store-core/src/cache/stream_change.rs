//! [`StreamChangeCache`]: which entities (rooms, users) changed after a stream
//! position, so that a reader can skip the database for those that did not.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Remembers, per entity, the last stream position it changed at, for the most
/// recent `max_positions` distinct positions.
///
/// Below the *earliest known position* changes were not recorded, so every
/// question about them is answered "unknown, so assume changed".
///
/// ```
/// use store_core::StreamChangeCache;
///
/// let changes = StreamChangeCache::new("room_events", 10, 100);
/// changes.entity_has_changed("!a:example.com", 12);
/// assert!(changes.has_entity_changed("!a:example.com", 11));
/// assert!(!changes.has_entity_changed("!a:example.com", 12));
/// assert!(!changes.has_entity_changed("!b:example.com", 11), "unknown, but recorded since 10");
/// assert!(changes.has_entity_changed("!b:example.com", 9), "before 10 nothing is known");
/// ```
#[derive(Debug)]
pub struct StreamChangeCache {
    name: &'static str,
    max_positions: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    earliest_known: i64,
    /// Position → entities whose latest change is there.
    by_position: BTreeMap<i64, BTreeSet<String>>,
    /// Entity → its latest change.
    latest: HashMap<String, i64>,
}

impl StreamChangeCache {
    /// A cache that knows every change after `current_position` (nothing yet),
    /// keeping at most `max_positions` distinct positions.
    pub fn new(name: &'static str, current_position: i64, max_positions: usize) -> StreamChangeCache {
        StreamChangeCache {
            name,
            max_positions: max_positions.max(1),
            state: Mutex::new(State {
                earliest_known: current_position,
                by_position: BTreeMap::new(),
                latest: HashMap::new(),
            }),
        }
    }

    /// A cache prefilled from the newest rows of a table, as `(entity, position)`
    /// pairs read in descending position, at most `limit` of them. Everything
    /// after the lowest position read is known; with no rows, everything after
    /// `current_position`.
    pub fn prefilled(
        name: &'static str,
        current_position: i64,
        max_positions: usize,
        rows: &[(String, i64)],
        limit: usize,
    ) -> StreamChangeCache {
        let earliest = match rows.iter().map(|(_, position)| *position).min() {
            // Several rows may share the lowest position and not all were read when
            // the limit cut them: only what lies above it is complete.
            Some(lowest) if rows.len() >= limit => lowest,
            Some(lowest) => lowest - 1,
            None => current_position,
        };
        let cache = StreamChangeCache::new(name, earliest, max_positions);
        for (entity, position) in rows {
            cache.entity_has_changed(entity, *position);
        }
        cache
    }

    /// How many positions the change caches of the store crates remember.
    pub const DEFAULT_POSITIONS: usize = 10_000;

    /// A cache of [`StreamChangeCache::DEFAULT_POSITIONS`] positions, prefilled
    /// (see [`StreamChangeCache::prefilled`]) from the `(entity, position)` rows
    /// `newest_sql` returns in descending position, given `LIMIT $1`. Done on
    /// the start-up connection, so that every cache of a process starts from
    /// one snapshot.
    pub async fn load_newest(
        conn: &mut crate::Transaction,
        name: &'static str,
        newest_sql: &str,
        current_position: i64,
    ) -> Result<StreamChangeCache, crate::StoreError> {
        let positions = StreamChangeCache::DEFAULT_POSITIONS;
        let limit = i64::try_from(positions).unwrap_or(i64::MAX);
        let rows = conn.query(newest_sql, &[&limit]).await?;
        let rows = rows
            .iter()
            .map(|row| Ok((row.get(0)?, row.get(1)?)))
            .collect::<Result<Vec<(String, i64)>, crate::StoreError>>()?;
        Ok(StreamChangeCache::prefilled(name, current_position, positions, &rows, positions))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The bookkeeping cannot panic half-way; a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cache's name, for metrics.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether `entity` may have changed after `position`.
    pub fn has_entity_changed(&self, entity: &str, position: i64) -> bool {
        let state = self.state();
        if position < state.earliest_known {
            return true;
        }
        state.latest.get(entity).is_some_and(|latest| position < *latest)
    }

    /// Those of `entities` that may have changed after `position`: all of them when
    /// nothing is known that far back (or nothing is recorded at all).
    pub fn get_entities_changed<'e>(&self, entities: &[&'e str], position: i64) -> Vec<&'e str> {
        let state = self.state();
        if position < state.earliest_known || state.latest.is_empty() {
            return entities.to_vec();
        }
        entities
            .iter()
            .copied()
            .filter(|entity| state.latest.get(*entity).is_some_and(|latest| position < *latest))
            .collect()
    }

    /// Whether anything may have changed after `position`.
    pub fn has_any_entity_changed(&self, position: i64) -> bool {
        let state = self.state();
        if position < state.earliest_known {
            return true;
        }
        state.by_position.last_key_value().is_some_and(|(latest, _)| position < *latest)
    }

    /// Every entity changed after `position`, oldest change first; `None` when
    /// nothing is known that far back.
    pub fn get_all_entities_changed(&self, position: i64) -> Option<Vec<String>> {
        let state = self.state();
        if position < state.earliest_known {
            return None;
        }
        let changed = state
            .by_position
            .range(position + 1..)
            .flat_map(|(_, entities)| entities.iter().cloned())
            .collect();
        Some(changed)
    }

    /// Records that `entity` changed at `position`.
    pub fn entity_has_changed(&self, entity: &str, position: i64) {
        let mut state = self.state();
        if position <= state.earliest_known {
            return;
        }
        if let Some(&old) = state.latest.get(entity) {
            if old >= position {
                return;
            }
            if let Some(entities) = state.by_position.get_mut(&old) {
                entities.remove(entity);
                if entities.is_empty() {
                    state.by_position.remove(&old);
                }
            }
        }
        state.latest.insert(entity.to_owned(), position);
        state.by_position.entry(position).or_default().insert(entity.to_owned());
        while state.by_position.len() > self.max_positions {
            let Some((evicted, entities)) = state.by_position.pop_first() else { break };
            state.earliest_known = state.earliest_known.max(evicted);
            for entity in entities {
                state.latest.remove(&entity);
            }
        }
    }

    /// Forgets everything: every entity may have changed up to `position`.
    pub fn all_entities_changed(&self, position: i64) {
        let mut state = self.state();
        state.by_position.clear();
        state.latest.clear();
        state.earliest_known = position;
    }

    /// The last position `entity` changed at, if known.
    pub fn get_max_pos_of_last_change(&self, entity: &str) -> Option<i64> {
        self.state().latest.get(entity).copied()
    }

    /// Below this position nothing is known.
    pub fn get_earliest_known_position(&self) -> i64 {
        self.state().earliest_known
    }
}

#[cfg(test)]
mod tests {
    use super::StreamChangeCache;

    #[test]
    fn unknown_below_the_earliest_position_means_changed() {
        let cache = StreamChangeCache::new("test", 10, 100);
        assert!(cache.has_entity_changed("a", 9));
        assert!(!cache.has_entity_changed("a", 10));
        assert!(cache.has_any_entity_changed(9));
        assert!(!cache.has_any_entity_changed(10));
        assert_eq!(cache.get_all_entities_changed(9), None);
        assert_eq!(cache.get_all_entities_changed(10), Some(vec![]));
        // Empty: every entity asked about is returned (the spec's behaviour).
        assert_eq!(cache.get_entities_changed(&["a", "b"], 10), ["a", "b"]);
    }

    #[test]
    fn changes_move_entities_between_positions() {
        let cache = StreamChangeCache::new("test", 1, 100);
        cache.entity_has_changed("a", 2);
        cache.entity_has_changed("b", 3);
        cache.entity_has_changed("a", 4);
        cache.entity_has_changed("b", 3); // not later: ignored
        cache.entity_has_changed("c", 1); // at the earliest known position: ignored
        assert_eq!(cache.get_max_pos_of_last_change("a"), Some(4));
        assert_eq!(cache.get_max_pos_of_last_change("c"), None);
        assert!(cache.has_entity_changed("a", 3));
        assert!(!cache.has_entity_changed("a", 4));
        assert_eq!(cache.get_entities_changed(&["a", "b", "z"], 3), ["a"]);
        assert_eq!(cache.get_entities_changed(&["a", "b", "z"], 2), ["a", "b"]);
        assert_eq!(cache.get_all_entities_changed(1), Some(vec!["b".to_owned(), "a".to_owned()]));
        assert!(cache.has_any_entity_changed(3));
        assert!(!cache.has_any_entity_changed(4));
    }

    #[test]
    fn eviction_moves_the_earliest_known_position_up() {
        let cache = StreamChangeCache::new("test", 0, 2);
        cache.entity_has_changed("a", 1);
        cache.entity_has_changed("b", 2);
        cache.entity_has_changed("c", 3);
        assert_eq!(cache.get_earliest_known_position(), 1);
        assert!(cache.has_entity_changed("a", 0), "below the earliest known: assume changed");
        assert!(!cache.has_entity_changed("a", 1), "a's change at 1 is at or below the earliest known");
        assert_eq!(cache.get_max_pos_of_last_change("a"), None);
        assert!(cache.has_entity_changed("b", 1));
    }

    #[test]
    fn resetting_forgets_everything() {
        let cache = StreamChangeCache::new("test", 0, 10);
        cache.entity_has_changed("a", 5);
        cache.all_entities_changed(7);
        assert_eq!(cache.get_earliest_known_position(), 7);
        assert!(cache.has_entity_changed("a", 6));
        assert!(!cache.has_entity_changed("a", 7));
    }

    #[test]
    fn prefill_knows_everything_above_the_lowest_row_read() {
        let rows = vec![("a".to_owned(), 9), ("b".to_owned(), 8), ("c".to_owned(), 8)];
        let cut = StreamChangeCache::prefilled("test", 9, 100, &rows, 3);
        assert_eq!(cut.get_earliest_known_position(), 8, "the limit cut: position 8 may hold more rows");
        let whole = StreamChangeCache::prefilled("test", 9, 100, &rows, 10);
        assert_eq!(whole.get_earliest_known_position(), 7);
        assert!(whole.has_entity_changed("b", 7));
        assert!(!whole.has_entity_changed("z", 7));
        let empty = StreamChangeCache::prefilled("test", 9, 100, &[], 10);
        assert_eq!(empty.get_earliest_known_position(), 9);
    }
}
