//! In-process caches in front of the database, and the machinery that keeps
//! every process's caches right.
//!
//! - [`Cache`]: an LRU map bounded by entries and by bytes ([`CacheWeight`]), with
//!   hit/miss/eviction counters, whose reads cannot race an invalidation (a read
//!   that started before an invalidation never puts its old value into the cache
//!   afterwards).
//! - [`CacheRegistry`]: every cache of a process by name (the name that travels on
//!   the `caches` stream), with sizes and byte budgets from config and the
//!   *expansions* domain
//!   crates register for magic names such as `cs_cache_fake`.
//! - [`StreamChangeCache`]: "has this entity changed since position P?".
//! - [`CachesStream`]: invalidations made in a transaction, applied locally after
//!   commit and recorded as rows of `cache_invalidation_stream_by_instance` for
//!   other processes to replay.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use crate::CacheConfig;

use crate::StoreError;

mod caches_stream;
mod stream_change;
mod weight;

pub use caches_stream::{CURRENT_STATE_POKE, CachesRow, CachesStream, MEMBERS_PER_POKE_ROW};
pub use stream_change::StreamChangeCache;
pub use weight::CacheWeight;

/// A cache key: a tuple of strings, as it travels on the `caches` stream.
pub trait CacheKey: CacheWeight + Clone + Eq + Hash + Send + Sync + fmt::Debug + 'static {
    /// The key's parts, in order.
    fn to_parts(&self) -> Vec<String>;
    /// The key from its parts; `None` if they do not fit this key type.
    fn from_parts(parts: &[String]) -> Option<Self>;
}

impl CacheKey for String {
    fn to_parts(&self) -> Vec<String> {
        vec![self.clone()]
    }
    fn from_parts(parts: &[String]) -> Option<Self> {
        match parts {
            [one] => Some(one.clone()),
            _ => None,
        }
    }
}

impl CacheKey for (String, String) {
    fn to_parts(&self) -> Vec<String> {
        vec![self.0.clone(), self.1.clone()]
    }
    fn from_parts(parts: &[String]) -> Option<Self> {
        match parts {
            [a, b] => Some((a.clone(), b.clone())),
            _ => None,
        }
    }
}

impl CacheKey for (String, String, String) {
    fn to_parts(&self) -> Vec<String> {
        vec![self.0.clone(), self.1.clone(), self.2.clone()]
    }
    fn from_parts(parts: &[String]) -> Option<Self> {
        match parts {
            [a, b, c] => Some((a.clone(), b.clone(), c.clone())),
            _ => None,
        }
    }
}

/// Counters of one cache since start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that had to load.
    pub misses: u64,
    /// Entries dropped to stay within the size or the byte budget.
    pub evictions: u64,
    /// Of `evictions`, those the byte budget forced (the entries were within
    /// the size): many means the budget, not the size, is what limits the cache.
    pub weight_evictions: u64,
    /// Loaded values not cached because each alone weighs more than the byte
    /// budget; their readers got them all the same.
    pub oversized: u64,
    /// Invalidations (of one key, or of everything).
    pub invalidations: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    weight_evictions: AtomicU64,
    oversized: AtomicU64,
    invalidations: AtomicU64,
}

/// An LRU cache from `K` to `V` (clone-cheap values: wrap big ones in `Arc`),
/// bounded by entries and by bytes: values come from the database, where a peer
/// or a client may have made them arbitrarily big, so a count of entries alone
/// does not bound its memory.
///
/// Each entry is weighed once, when it is filled ([`CacheWeight`] of key and
/// value, plus the cache's own bookkeeping); the least recently used entries go
/// until both bounds hold.
///
/// ```
/// # async fn example() -> Result<(), store_core::StoreError> {
/// use store_core::Cache;
///
/// let cache = Cache::<String, u32>::new("get_answer", 100, 1 << 20);
/// let value = cache.get_or_load("q".to_owned(), || async { Ok::<_, store_core::StoreError>(42) }).await?;
/// assert_eq!(value, 42);
/// assert_eq!(cache.get(&"q".to_owned()), Some(42));
/// cache.invalidate(&"q".to_owned());
/// assert_eq!(cache.get(&"q".to_owned()), None);
/// # Ok(())
/// # }
/// ```
pub struct Cache<K, V> {
    name: &'static str,
    capacity: usize,
    max_bytes: usize,
    state: Mutex<State<K, V>>,
    counters: Counters,
}

struct Entry<V> {
    value: V,
    /// When it was last used: its key in `State::order`.
    tick: u64,
    /// Its weight, kept so that removing it needs no second walk of the value.
    weight: usize,
}

/// What the cache keeps for an entry besides its key's and value's own heap:
/// the hash table's control byte and the use-order tree's share of a node, the
/// tick and the weight. An estimate, like every weight.
const ENTRY_OVERHEAD: usize = 48;

/// What an entry of `key` and `value` costs the cache's byte budget.
fn entry_weight<K: CacheWeight, V: CacheWeight>(key: &K, value: &V) -> usize {
    // The key is held twice, in the entries and in the use order.
    2 * (size_of::<K>() + key.weight()) + size_of::<V>() + value.weight() + ENTRY_OVERHEAD
}

struct State<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// Use tick → key, oldest first.
    order: BTreeMap<u64, K>,
    tick: u64,
    /// The sum of the entries' weights.
    bytes: usize,
    /// Loads in progress: key → the ticket that may fill it. An invalidation
    /// removes the key, so a load that started before it cannot fill afterwards.
    pending: HashMap<K, u64>,
    next_ticket: u64,
}

/// A load in progress, from [`Cache::begin_fill`].
///
/// Dropping it abandons the load like [`Cache::cancel_fill`]: a load whose
/// future is dropped half-way (the client hung up) must not leave its ticket in
/// the cache, where one per distinct key would pile up for ever.
#[must_use = "hand the loaded value to Cache::finish_fill"]
pub struct FillTicket<'cache, K: Eq + Hash, V> {
    cache: &'cache Cache<K, V>,
    key: K,
    ticket: u64,
    /// Cleared once the ticket was handed back, so that dropping it does not
    /// take the lock a second time.
    outstanding: bool,
}

impl<K: Eq + Hash + fmt::Debug, V> fmt::Debug for FillTicket<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FillTicket")
            .field("cache", &self.cache.name)
            .field("key", &self.key)
            .field("ticket", &self.ticket)
            .finish()
    }
}

impl<K: Eq + Hash, V> Drop for FillTicket<'_, K, V> {
    fn drop(&mut self) {
        if self.outstanding {
            self.cache.release(&self.key, self.ticket);
        }
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash, V> Cache<K, V> {
    fn state(&self) -> MutexGuard<'_, State<K, V>> {
        // Every critical section is panic-free bookkeeping; a poisoned lock still
        // holds a consistent map.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets `ticket` of `key`, unless an invalidation or a later load already
    /// replaced it.
    fn release(&self, key: &K, ticket: u64) {
        let mut state = self.state();
        if state.pending.get(key) == Some(&ticket) {
            state.pending.remove(key);
        }
    }
}

impl<K: CacheKey, V: CacheWeight + Clone + Send + Sync + 'static> Cache<K, V> {
    /// An empty cache holding at most `capacity` entries (at least one) that
    /// weigh at most `max_bytes` together.
    pub fn new(name: &'static str, capacity: usize, max_bytes: usize) -> Arc<Cache<K, V>> {
        Arc::new(Cache {
            name,
            capacity: capacity.max(1),
            max_bytes,
            state: Mutex::new(State {
                entries: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                bytes: 0,
                pending: HashMap::new(),
                next_ticket: 0,
            }),
            counters: Counters::default(),
        })
    }

    /// The cache's name, as on the `caches` stream.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The cached value, if any (counts a hit or a miss).
    pub fn get(&self, key: &K) -> Option<V> {
        let mut state = self.state();
        let state = &mut *state;
        match state.entries.get_mut(key) {
            Some(entry) => {
                state.tick += 1;
                state.order.remove(&entry.tick);
                entry.tick = state.tick;
                state.order.insert(state.tick, key.clone());
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry.value.clone())
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Starts a load of `key`; only [`Cache::finish_fill`] with this ticket, and
    /// no invalidation of `key` in between, puts the value in. Dropping the
    /// ticket abandons the load.
    pub fn begin_fill(&self, key: &K) -> FillTicket<'_, K, V> {
        let mut state = self.state();
        state.next_ticket += 1;
        let ticket = state.next_ticket;
        state.pending.insert(key.clone(), ticket);
        FillTicket { cache: self, key: key.clone(), ticket, outstanding: true }
    }

    /// Puts a loaded value in, unless the key was invalidated (or loaded again)
    /// since the ticket was taken, the ticket is another cache's, or the value
    /// alone weighs more than the byte budget (then any older entry of the key
    /// goes too, and it is counted in [`CacheStats::oversized`]). Returns whether
    /// it was stored.
    pub fn finish_fill(&self, mut ticket: FillTicket<'_, K, V>, value: V) -> bool {
        if !std::ptr::eq(ticket.cache, self) {
            return false;
        }
        ticket.outstanding = false;
        let mut state = self.state();
        if state.pending.get(&ticket.key) != Some(&ticket.ticket) {
            return false;
        }
        // The map's copy of the key moves into the entry: no clone for the fill.
        let Some((key, _)) = state.pending.remove_entry(&ticket.key) else { return false };
        self.insert_locked(&mut state, key, value)
    }

    /// Abandons a load (it found nothing worth caching, or failed); the same as
    /// dropping the ticket.
    pub fn cancel_fill(&self, ticket: FillTicket<'_, K, V>) {
        drop(ticket);
    }

    fn insert_locked(&self, state: &mut State<K, V>, key: K, value: V) -> bool {
        let weight = entry_weight(&key, &value);
        if weight > self.max_bytes {
            // Room for it would mean evicting everything and still breaking the
            // budget; the reader has the value anyway. An older value of the key
            // is superseded by this one, so it must not stay either.
            Self::remove_locked(state, &key);
            self.counters.oversized.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        state.tick += 1;
        let tick = state.tick;
        if let Some(old) = state.entries.insert(key.clone(), Entry { value, tick, weight }) {
            state.order.remove(&old.tick);
            state.bytes -= old.weight;
        }
        state.bytes += weight;
        state.order.insert(tick, key);
        // The new entry is the most recent and fits the budget on its own, so
        // the loop stops before reaching it.
        while state.entries.len() > self.capacity || state.bytes > self.max_bytes {
            let within_size = state.entries.len() <= self.capacity;
            let Some((_, oldest)) = state.order.pop_first() else { break };
            if let Some(evicted) = state.entries.remove(&oldest) {
                state.bytes -= evicted.weight;
            }
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            if within_size {
                self.counters.weight_evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    fn remove_locked(state: &mut State<K, V>, key: &K) {
        if let Some(entry) = state.entries.remove(key) {
            state.order.remove(&entry.tick);
            state.bytes -= entry.weight;
        }
    }

    /// The cached value, or `load()`'s, which is then cached unless the key was
    /// invalidated while it ran.
    pub async fn get_or_load<F, Fut, E>(&self, key: K, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        if let Some(value) = self.get(&key) {
            return Ok(value);
        }
        let ticket = self.begin_fill(&key);
        match load().await {
            Ok(value) => {
                self.finish_fill(ticket, value.clone());
                Ok(value)
            }
            Err(err) => {
                self.cancel_fill(ticket);
                Err(err)
            }
        }
    }

    /// Drops `key`, and stops any load of it in progress from filling it.
    pub fn invalidate(&self, key: &K) {
        let mut state = self.state();
        state.pending.remove(key);
        Self::remove_locked(&mut state, key);
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops everything, including loads in progress.
    pub fn invalidate_all(&self) {
        let mut state = self.state();
        state.entries.clear();
        state.order.clear();
        state.bytes = 0;
        state.pending.clear();
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// How many entries are cached.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// The estimated bytes the entries hold, at most the byte budget.
    pub fn weight(&self) -> usize {
        self.state().bytes
    }

    /// How many loads have a ticket outstanding (taken by [`Cache::begin_fill`]
    /// and not yet finished, cancelled or voided).
    pub fn loads_in_progress(&self) -> usize {
        self.state().pending.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters since start-up.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            weight_evictions: self.counters.weight_evictions.load(Ordering::Relaxed),
            oversized: self.counters.oversized.load(Ordering::Relaxed),
            invalidations: self.counters.invalidations.load(Ordering::Relaxed),
        }
    }
}

/// A cache seen through its name only: what the `caches` stream needs.
pub trait DynCache: Send + Sync + fmt::Debug {
    /// The cache's name.
    fn name(&self) -> &'static str;
    /// Invalidates the key made of `parts`; parts that do not form a key of this
    /// cache are ignored (and logged).
    fn invalidate_parts(&self, parts: &[String]);
    /// Drops everything.
    fn invalidate_all(&self);
    /// Counters since start-up.
    fn stats(&self) -> CacheStats;
    /// Entries cached.
    fn entries(&self) -> usize;
}

impl<K: CacheKey, V: CacheWeight + Clone + Send + Sync + 'static> DynCache for Cache<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn invalidate_parts(&self, parts: &[String]) {
        match K::from_parts(parts) {
            Some(key) => self.invalidate(&key),
            None => {
                tracing::warn!(cache = self.name, ?parts, "ignoring an invalidation whose key does not fit")
            }
        }
    }
    fn invalidate_all(&self) {
        Cache::invalidate_all(self);
    }
    fn stats(&self) -> CacheStats {
        Cache::stats(self)
    }
    fn entries(&self) -> usize {
        Cache::len(self)
    }
}

/// Expands a magic invalidation (e.g. `cs_cache_fake`) into the invalidations of
/// every cache it stands for. Receives the row's keys, and the stream token of
/// the row when it came from another process (`None` when applied locally, where
/// the writer keeps its own change caches).
pub type Expansion = Arc<dyn Fn(&CacheRegistry, &[String], Option<i64>) + Send + Sync>;

/// Every cache of a process, by name.
pub struct CacheRegistry {
    config: CacheConfig,
    caches: RwLock<BTreeMap<&'static str, Arc<dyn DynCache>>>,
    expansions: RwLock<BTreeMap<&'static str, Expansion>>,
}

impl fmt::Debug for CacheRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.read_caches().keys().copied().collect();
        f.debug_struct("CacheRegistry").field("caches", &names).finish_non_exhaustive()
    }
}

impl CacheRegistry {
    /// An empty registry; caches take their sizes and byte budgets from `config`.
    pub fn new(config: CacheConfig) -> Arc<CacheRegistry> {
        Arc::new(CacheRegistry {
            config,
            caches: RwLock::new(BTreeMap::new()),
            expansions: RwLock::new(BTreeMap::new()),
        })
    }

    fn read_caches(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<&'static str, Arc<dyn DynCache>>> {
        self.caches.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates the cache called `name`, sized and budgeted from config. A name is
    /// registered once per process: two caches answering to one name would leave
    /// one stale.
    pub fn register<K: CacheKey, V: CacheWeight + Clone + Send + Sync + 'static>(
        &self,
        name: &'static str,
    ) -> Result<Arc<Cache<K, V>>, StoreError> {
        let mut caches = self.caches.write().unwrap_or_else(PoisonError::into_inner);
        if caches.contains_key(name) {
            return Err(StoreError::Misconfigured(format!("the cache `{name}` is registered twice")));
        }
        let cache = Cache::<K, V>::new(name, self.config.size_of(name), self.config.max_bytes_of(name));
        caches.insert(name, Arc::clone(&cache) as Arc<dyn DynCache>);
        Ok(cache)
    }

    /// Registers what a magic cache name stands for.
    pub fn register_expansion(&self, name: &'static str, expansion: Expansion) -> Result<(), StoreError> {
        let mut expansions = self.expansions.write().unwrap_or_else(PoisonError::into_inner);
        if expansions.contains_key(name) {
            return Err(StoreError::Misconfigured(format!("the expansion `{name}` is registered twice")));
        }
        expansions.insert(name, expansion);
        Ok(())
    }

    /// Applies one invalidation by name, as the `caches` stream carries it:
    /// `keys` of `None` drops the whole cache; a magic name is expanded; a name
    /// this process has no cache for is ignored (a worker need not have every
    /// cache). Returns whether anything was known by that name.
    pub fn invalidate(&self, name: &str, keys: Option<&[String]>) -> bool {
        self.invalidate_at(name, keys, None)
    }

    /// Like [`CacheRegistry::invalidate`], for a row another process wrote at
    /// stream token `token` (passed to expansions).
    pub fn invalidate_at(&self, name: &str, keys: Option<&[String]>, token: Option<i64>) -> bool {
        let expansion = self.expansions.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned();
        if let Some(expansion) = expansion {
            match keys {
                Some(keys) => expansion(self, keys, token),
                None => tracing::warn!(name, "ignoring a magic invalidation without keys"),
            }
            return true;
        }
        let cache = self.read_caches().get(name).cloned();
        match (cache, keys) {
            (Some(cache), Some(keys)) => {
                cache.invalidate_parts(keys);
                true
            }
            (Some(cache), None) => {
                cache.invalidate_all();
                true
            }
            (None, _) => false,
        }
    }

    /// Invalidates one key of the cache called `name`, if this process has it.
    pub fn invalidate_key(&self, name: &str, parts: &[String]) {
        if let Some(cache) = self.read_caches().get(name).cloned() {
            cache.invalidate_parts(parts);
        }
    }

    /// Drops everything in the cache called `name`, if this process has it.
    pub fn invalidate_all_of(&self, name: &str) {
        if let Some(cache) = self.read_caches().get(name).cloned() {
            cache.invalidate_all();
        }
    }

    /// Every cache's counters and size, by name.
    pub fn stats(&self) -> BTreeMap<&'static str, (CacheStats, usize)> {
        self.read_caches().iter().map(|(name, cache)| (*name, (cache.stats(), cache.entries()))).collect()
    }
}

#[cfg(test)]
mod tests;
