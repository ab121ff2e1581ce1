//! The cache's LRU bounds (entries and bytes), counters, the invalidation race,
//! and loads that are cancelled.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::CacheConfig;

use super::{Cache, CacheRegistry, CacheWeight, entry_weight};

/// A byte budget no test of the entry bound reaches.
const MIB: usize = 1 << 20;

fn key(text: &str) -> String {
    text.to_owned()
}

/// Fills `key` as a load that ran to its end would; returns whether it was kept.
fn fill<V: CacheWeight + Clone + Send + Sync + 'static>(
    cache: &Cache<String, V>,
    name: &str,
    value: V,
) -> bool {
    let ticket = cache.begin_fill(&key(name));
    cache.finish_fill(ticket, value)
}

/// The bookkeeping agrees with itself: every entry is in the use order once,
/// and the weight is the sum of the entries'.
fn assert_consistent<V>(cache: &Cache<String, V>) {
    let state = cache.state();
    assert_eq!(state.order.len(), state.entries.len());
    for (tick, key) in &state.order {
        assert_eq!(state.entries.get(key).map(|entry| entry.tick), Some(*tick));
    }
    assert_eq!(state.bytes, state.entries.values().map(|entry| entry.weight).sum::<usize>());
}

/// A value of `value_bytes` on the heap.
fn heavy(value_bytes: usize) -> String {
    "x".repeat(value_bytes)
}

#[test]
fn the_least_recently_used_entry_goes_first() {
    let cache = Cache::<String, u32>::new("test", 2, MIB);
    for (name, value) in [("a", 1), ("b", 2)] {
        let ticket = cache.begin_fill(&key(name));
        assert!(cache.finish_fill(ticket, value));
    }
    assert_eq!(cache.get(&key("a")), Some(1)); // a is now the most recent
    let ticket = cache.begin_fill(&key("c"));
    cache.finish_fill(ticket, 3);
    assert_eq!(cache.get(&key("b")), None, "b was the least recently used");
    assert_eq!(cache.get(&key("a")), Some(1));
    assert_eq!(cache.get(&key("c")), Some(3));
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.evictions), (3, 1, 1));
}

#[test]
fn a_load_that_started_before_an_invalidation_cannot_fill_afterwards() {
    let cache = Cache::<String, &'static str>::new("test", 10, MIB);
    let stale_load = cache.begin_fill(&key("room"));
    // The database changes and the key is invalidated while the load runs.
    cache.invalidate(&key("room"));
    assert!(!cache.finish_fill(stale_load, "old"), "the stale value must be refused");
    assert_eq!(cache.get(&key("room")), None);

    let everything = cache.begin_fill(&key("room"));
    cache.invalidate_all();
    assert!(!cache.finish_fill(everything, "old"));

    // A load that starts after the invalidation fills as usual.
    let fresh = cache.begin_fill(&key("room"));
    assert!(cache.finish_fill(fresh, "new"));
    assert_eq!(cache.get(&key("room")), Some("new"));
}

#[test]
fn of_two_overlapping_loads_only_the_later_fills() {
    let cache = Cache::<String, u32>::new("test", 10, MIB);
    let first = cache.begin_fill(&key("k"));
    let second = cache.begin_fill(&key("k"));
    assert!(!cache.finish_fill(first, 1));
    assert!(cache.finish_fill(second, 2));
    assert_eq!(cache.get(&key("k")), Some(2));
}

#[tokio::test]
async fn get_or_load_loads_once_then_hits() {
    let cache = Cache::<String, u32>::new("test", 10, MIB);
    let loads = AtomicUsize::new(0);
    for _ in 0..3 {
        let value = cache
            .get_or_load(key("k"), || async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(7)
            })
            .await
            .unwrap();
        assert_eq!(value, 7);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

#[test]
fn the_registry_routes_invalidations_by_name() {
    let config = CacheConfig {
        default_size: 5,
        sizes: [("big".to_owned(), 50)].into(),
        default_max_bytes: 3_000,
        max_bytes: [("big".to_owned(), 7_000)].into(),
        ..CacheConfig::default()
    };
    let registry = CacheRegistry::new(config);
    let pairs = registry.register::<(String, String), u32>("pairs").unwrap();
    let big = registry.register::<String, u32>("big").unwrap();
    assert!(registry.register::<String, u32>("big").is_err(), "one cache per name");
    assert_eq!(big.capacity, 50);
    assert_eq!(pairs.capacity, 5);
    assert_eq!((big.max_bytes, pairs.max_bytes), (7_000, 3_000));

    let fill = |key: (String, String), value| {
        let ticket = pairs.begin_fill(&key);
        pairs.finish_fill(ticket, value);
    };
    fill((key("!r"), key("@a")), 1);
    fill((key("!r"), key("@b")), 2);
    assert!(registry.invalidate("pairs", Some(&[key("!r"), key("@a")])));
    assert_eq!(pairs.get(&(key("!r"), key("@a"))), None);
    assert_eq!(pairs.get(&(key("!r"), key("@b"))), Some(2));
    // A key of the wrong shape is ignored, not a panic.
    assert!(registry.invalidate("pairs", Some(&[key("!r")])));
    assert_eq!(pairs.get(&(key("!r"), key("@b"))), Some(2));
    // Null keys clear the whole cache.
    assert!(registry.invalidate("pairs", None));
    assert!(pairs.is_empty());
    // Unknown names are ignored: a worker need not have every cache.
    assert!(!registry.invalidate("no_such_cache", None));
}

#[test]
fn magic_names_expand_into_their_caches() {
    let registry = CacheRegistry::new(CacheConfig::default());
    let by_room = registry.register::<String, u32>("by_room").unwrap();
    let by_user = registry.register::<String, u32>("by_user").unwrap();
    let seen_token = Arc::new(std::sync::Mutex::new(None));
    let seen = Arc::clone(&seen_token);
    registry
        .register_expansion(
            "cs_cache_fake",
            Arc::new(move |registry, keys, token| {
                *seen.lock().unwrap() = token;
                registry.invalidate_key("by_room", &keys[..1]);
                for member in &keys[1..] {
                    registry.invalidate_key("by_user", std::slice::from_ref(member));
                }
            }),
        )
        .unwrap();
    for (cache, name) in [(&by_room, "!r"), (&by_user, "@a"), (&by_user, "@b")] {
        let ticket = cache.begin_fill(&key(name));
        cache.finish_fill(ticket, 1);
    }
    registry.invalidate_at("cs_cache_fake", Some(&[key("!r"), key("@a")]), Some(9));
    assert_eq!(by_room.get(&key("!r")), None);
    assert_eq!(by_user.get(&key("@a")), None);
    assert_eq!(by_user.get(&key("@b")), Some(1));
    assert_eq!(*seen_token.lock().unwrap(), Some(9));
    assert!(registry.register_expansion("cs_cache_fake", Arc::new(|_, _, _| {})).is_err());
}

#[tokio::test]
async fn cancelled_loads_leave_nothing_behind() {
    let cache = Cache::<String, u32>::new("test", 10, MIB);
    for n in 0..1_000 {
        // A client hangs up while the load waits on the database.
        let load = cache.get_or_load(format!("!room{n}"), std::future::pending::<Result<u32, Infallible>>);
        let outcome = tokio::time::timeout(Duration::from_millis(0), load).await;
        assert!(outcome.is_err(), "the load never finishes");
    }
    assert_eq!(cache.loads_in_progress(), 0, "every cancelled load gave its ticket back");
    assert!(cache.is_empty());
}

#[tokio::test]
async fn a_load_dropped_in_a_select_leaves_nothing_behind() {
    let cache = Cache::<String, u32>::new("test", 10, MIB);
    for n in 0..100 {
        let load = cache.get_or_load(format!("@user{n}"), std::future::pending::<Result<u32, Infallible>>);
        tokio::select! {
            _ = load => unreachable!("the load never finishes"),
            () = tokio::task::yield_now() => {}
        }
    }
    assert_eq!(cache.loads_in_progress(), 0);
}

#[test]
fn dropping_a_superseded_ticket_leaves_the_newer_load_alone() {
    let cache = Cache::<String, u32>::new("test", 10, MIB);
    let older = cache.begin_fill(&key("k"));
    let newer = cache.begin_fill(&key("k"));
    drop(older);
    assert_eq!(cache.loads_in_progress(), 1);
    assert!(cache.finish_fill(newer, 2), "the older load's cancellation must not void the newer one");
    assert_eq!(cache.loads_in_progress(), 0);
    assert_eq!(cache.get(&key("k")), Some(2));
}

#[test]
fn a_ticket_fills_only_the_cache_that_issued_it() {
    let issuer = Cache::<String, u32>::new("issuer", 10, MIB);
    let other = Cache::<String, u32>::new("other", 10, MIB);
    let ticket = issuer.begin_fill(&key("k"));
    assert!(!other.finish_fill(ticket, 1));
    assert!(other.is_empty() && issuer.is_empty());
    assert_eq!(issuer.loads_in_progress(), 0, "the refused ticket was still given back to its issuer");
}

#[test]
fn heavy_values_stay_within_the_byte_budget() {
    let per_entry = entry_weight(&key("k00"), &heavy(1_000));
    let budget = 10 * per_entry + per_entry / 2;
    let cache = Cache::<String, String>::new("test", 1_000, budget);
    for n in 0..100 {
        assert!(fill(&cache, &format!("k{n:02}"), heavy(1_000)));
        assert!(cache.weight() <= budget, "{} bytes after {n} fills", cache.weight());
        assert_consistent(&cache);
    }
    assert_eq!(cache.len(), 10, "as many as the budget holds, far fewer than the size");
    assert_eq!(cache.weight(), 10 * per_entry);
    for n in 90..100 {
        assert!(cache.get(&format!("k{n:02}")).is_some(), "the ten most recent stay");
    }
    let stats = cache.stats();
    assert_eq!((stats.evictions, stats.weight_evictions, stats.oversized), (90, 90, 0));
}

#[test]
fn the_least_recently_used_goes_first_under_either_bound() {
    let light = entry_weight(&key("a"), &String::new());
    let cache = Cache::<String, String>::new("test", 3, 4 * light);
    for name in ["a", "b", "c"] {
        assert!(fill(&cache, name, String::new()));
    }
    assert!(cache.get(&key("a")).is_some());
    // Four entries break the size: b, the least recently used, goes.
    assert!(fill(&cache, "d", String::new()));
    assert_eq!(cache.get(&key("b")), None);
    assert_eq!((cache.stats().evictions, cache.stats().weight_evictions), (1, 0));

    // An entry of more than two light ones' weight breaks both bounds: c (the
    // order of use is c, a, d) goes for the size, then a for the budget, and d
    // stays.
    let heavy_value = heavy(light * 3 / 2);
    let heavy_weight = entry_weight(&key("h"), &heavy_value);
    assert!(2 * light < heavy_weight && heavy_weight <= 3 * light);
    assert!(fill(&cache, "h", heavy_value));
    assert_eq!(cache.get(&key("c")), None);
    assert_eq!(cache.get(&key("a")), None);
    assert!(cache.get(&key("d")).is_some());
    assert_eq!((cache.stats().evictions, cache.stats().weight_evictions), (3, 1));

    // d was used after h was filled, so h is now the least recently used and
    // goes for e's weight (three entries are within the size), although it came
    // in after d.
    assert!(fill(&cache, "e", String::new()));
    assert_eq!(cache.get(&key("h")), None);
    assert!(cache.get(&key("d")).is_some());
    assert!(cache.get(&key("e")).is_some());
    assert_eq!((cache.stats().evictions, cache.stats().weight_evictions), (4, 2));
    assert_consistent(&cache);
}

#[tokio::test]
async fn a_value_heavier_than_the_budget_is_returned_but_not_cached() {
    let budget = 4_000;
    let cache = Cache::<String, String>::new("test", 10, budget);
    assert!(fill(&cache, "small", key("value")));
    assert!(fill(&cache, "room", key("old members")));

    // The room's members changed and the new list is huge.
    cache.invalidate(&key("room"));
    let loads = AtomicUsize::new(0);
    for _ in 0..2 {
        let value = cache
            .get_or_load(key("room"), || async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(heavy(budget))
            })
            .await
            .unwrap();
        assert_eq!(value.len(), budget, "the reader gets the whole value");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 2, "it was not cached, so it loaded twice");
    assert_eq!(cache.get(&key("small")), Some(key("value")), "nothing was evicted to make room");
    assert_eq!(cache.weight(), entry_weight(&key("small"), &key("value")));
    assert_eq!((cache.stats().oversized, cache.stats().evictions), (2, 0));

    // Filled over an older entry of its key, it takes the older one away: that
    // entry is stale now.
    assert!(fill(&cache, "room", key("old members")));
    assert!(!fill(&cache, "room", heavy(budget)));
    assert_eq!(cache.get(&key("room")), None);
    assert_consistent(&cache);
}

#[test]
fn invalidation_voids_tickets_and_gives_back_the_weight() {
    let cache = Cache::<String, String>::new("test", 10, 10_000);
    assert!(fill(&cache, "a", heavy(1_000)));
    assert!(fill(&cache, "b", heavy(1_000)));
    let loading = cache.begin_fill(&key("a"));
    cache.invalidate(&key("a"));
    assert_eq!(cache.weight(), entry_weight(&key("b"), &heavy(1_000)));
    assert!(!cache.finish_fill(loading, heavy(10)), "the invalidation voided the ticket");
    assert_eq!(cache.get(&key("a")), None);

    let loading = cache.begin_fill(&key("c"));
    cache.invalidate_all();
    assert_eq!((cache.weight(), cache.len(), cache.loads_in_progress()), (0, 0, 0));
    assert!(!cache.finish_fill(loading, heavy(10)));
    assert_consistent(&cache);
}

#[test]
fn weights_follow_what_values_hold() {
    let text = heavy(1_000);
    assert_eq!(text.weight(), 1_000);
    assert_eq!(Some(text.clone()).weight(), 1_000);
    assert_eq!(None::<String>.weight(), 0);
    assert_eq!((text.clone(), heavy(10)).weight(), 1_010);
    let members: Vec<String> = (0..100).map(|_| heavy(100)).collect();
    assert!(members.weight() >= 100 * (100 + std::mem::size_of::<String>()));
    let shared = Arc::new(members.clone());
    assert!(shared.weight() > members.weight(), "the Arc's allocation holds the Vec itself too");
    let state: std::collections::BTreeMap<(String, String), String> =
        (0..50).map(|n| ((format!("m.room.member{n}"), heavy(20)), heavy(30))).collect();
    assert!(state.weight() >= 50 * (15 + 20 + 30));
    // Account data and receipts hold JSON a client wrote: nested, and big.
    let json = serde_json::json!({ "a": [heavy(500), { "b": heavy(500) }], "n": 1, "t": true, "z": null });
    assert!(json.weight() >= 1_000, "nested strings count: {}", json.weight());
    assert!(json.weight() < 2_000, "an estimate, not a multiple: {}", json.weight());
}
