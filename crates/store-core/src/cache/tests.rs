//! The cache's LRU bound, counters, and the invalidation race.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use server_config::CacheConfig;

use super::{Cache, CacheRegistry};

fn key(text: &str) -> String {
    text.to_owned()
}

#[test]
fn the_least_recently_used_entry_goes_first() {
    let cache = Cache::<String, u32>::new("test", 2);
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
    let cache = Cache::<String, &'static str>::new("test", 10);
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
    let cache = Cache::<String, u32>::new("test", 10);
    let first = cache.begin_fill(&key("k"));
    let second = cache.begin_fill(&key("k"));
    assert!(!cache.finish_fill(first, 1));
    assert!(cache.finish_fill(second, 2));
    assert_eq!(cache.get(&key("k")), Some(2));
}

#[tokio::test]
async fn get_or_load_loads_once_then_hits() {
    let cache = Cache::<String, u32>::new("test", 10);
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
    let config =
        CacheConfig { default_size: 5, sizes: [("big".to_owned(), 50)].into(), ..CacheConfig::default() };
    let registry = CacheRegistry::new(config);
    let pairs = registry.register::<(String, String), u32>("pairs").unwrap();
    let big = registry.register::<String, u32>("big").unwrap();
    assert!(registry.register::<String, u32>("big").is_err(), "one cache per name");
    assert_eq!(big.capacity, 50);
    assert_eq!(pairs.capacity, 5);

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
    let cache = Cache::<String, u32>::new("test", 10);
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
    let cache = Cache::<String, u32>::new("test", 10);
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
    let cache = Cache::<String, u32>::new("test", 10);
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
    let issuer = Cache::<String, u32>::new("issuer", 10);
    let other = Cache::<String, u32>::new("other", 10);
    let ticket = issuer.begin_fill(&key("k"));
    assert!(!other.finish_fill(ticket, 1));
    assert!(other.is_empty() && issuer.is_empty());
    assert_eq!(issuer.loads_in_progress(), 0, "the refused ticket was still given back to its issuer");
}
