//! What stores take from the configuration, as store-core's own types: the
//! config file's crate parses into these, so store-core does not depend on it.
//!
//! - [`StoreSettings`]: this process's name, each stream's writers, cache sizes,
//!   and whether other processes exist.
//! - [`CacheConfig`]: the `[caches]` section.
//! - [`redact_url`]: URLs as messages may show them.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The instance every deployment has, which writes the streams no one else is
/// configured to write.
pub const MASTER_INSTANCE: &str = "master";

/// What the stores of one process need to know about the deployment.
///
/// ```
/// use store_core::StoreSettings;
///
/// let settings = StoreSettings::single_process()
///     .with_instance("writer1")
///     .with_writers("events", &["writer1", "writer2"]);
/// assert!(settings.is_writer_for("events"));
/// assert!(!settings.is_writer_for("receipts"));
/// assert_eq!(settings.writers_for("receipts"), ["master"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// This process's name in the deployment.
    pub instance_name: String,
    /// The writers of each stream that does not have just `master`, in the
    /// order every process lists them.
    pub stream_writers: BTreeMap<String, Vec<String>>,
    /// Cache sizes and byte budgets.
    pub caches: CacheConfig,
    /// Whether the deployment has processes besides this one, which then need
    /// this one's cache invalidations.
    pub has_other_processes: bool,
}

impl StoreSettings {
    /// The master alone: it writes every stream, and no one else needs its
    /// invalidations.
    pub fn single_process() -> StoreSettings {
        StoreSettings {
            instance_name: MASTER_INSTANCE.to_owned(),
            stream_writers: BTreeMap::new(),
            caches: CacheConfig::default(),
            has_other_processes: false,
        }
    }

    /// `instance` in a deployment of several processes, every stream written
    /// by `master` until [`StoreSettings::with_writers`] says otherwise.
    pub fn in_deployment(instance: &str) -> StoreSettings {
        StoreSettings { has_other_processes: true, ..StoreSettings::single_process().with_instance(instance) }
    }

    /// The same deployment, seen from `instance`.
    #[must_use]
    pub fn with_instance(mut self, instance: &str) -> StoreSettings {
        self.instance_name = instance.to_owned();
        self
    }

    /// The same deployment with `stream` written by `writers`; a deployment
    /// with several writers has several processes.
    #[must_use]
    pub fn with_writers(mut self, stream: &str, writers: &[&str]) -> StoreSettings {
        let writers: Vec<String> = writers.iter().map(|writer| (*writer).to_owned()).collect();
        self.has_other_processes |= writers.iter().any(|writer| *writer != self.instance_name);
        self.stream_writers.insert(stream.to_owned(), writers);
        self
    }

    /// The instances that write `stream`; `["master"]` when none are configured.
    pub fn writers_for(&self, stream: &str) -> Vec<String> {
        writers_for(&self.stream_writers, stream)
    }

    /// Whether this process writes `stream`.
    pub fn is_writer_for(&self, stream: &str) -> bool {
        is_writer_for(&self.stream_writers, &self.instance_name, stream)
    }
}

/// The instances `stream_writers` (`[stream_writers]`, stream → writers) gives
/// `stream`: its list, or `["master"]` when it has none. The one rule, for the
/// config file's crate too.
pub fn writers_for(stream_writers: &BTreeMap<String, Vec<String>>, stream: &str) -> Vec<String> {
    stream_writers.get(stream).cloned().unwrap_or_else(|| vec![MASTER_INSTANCE.to_owned()])
}

/// Whether `instance` is one of the writers `stream_writers` gives `stream`.
pub fn is_writer_for(stream_writers: &BTreeMap<String, Vec<String>>, instance: &str, stream: &str) -> bool {
    match stream_writers.get(stream) {
        Some(writers) => writers.iter().any(|writer| writer == instance),
        None => instance == MASTER_INSTANCE,
    }
}

/// The writer of `shard` (a room, say) among a stream's `writers`, by
/// rendezvous hashing: each writer scores the shard, and the highest score
/// wins. Adding a writer to N moves only the shards it now wins, about
/// 1/(N+1) of them, all to itself; removing one moves only its own shards.
/// The list's order does not matter. `None` when `writers` is empty.
///
/// The score is FNV-1a over the writer's name, a 0xff byte (never in UTF-8)
/// and the shard, then murmur3's 64-bit finalizer, so that every byte moves
/// every bit. Every process and every release must agree on it: changing it
/// moves rooms of a running deployment (a unit test pins it).
///
/// ```
/// let writers = ["persister1", "persister2"];
/// let writer = store_core::writer_for_shard("!room:example.com", &writers);
/// assert!(writer.is_some_and(|writer| writers.contains(writer)));
/// ```
pub fn writer_for_shard<'a, W: AsRef<str>>(shard: &str, writers: &'a [W]) -> Option<&'a W> {
    let score = |writer: &W| {
        let hash = fnv1a(fnv1a(fnv1a(FNV_OFFSET, writer.as_ref().as_bytes()), &[0xff]), shard.as_bytes());
        fmix64(hash)
    };
    // Ties (between distinct names, in theory only) go to the first listed.
    writers.iter().rev().max_by_key(|writer| score(writer))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

fn fmix64(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The `[caches]` section: sizes in entries, and budgets in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The size of every cache not named in `sizes`.
    #[serde(default = "default_cache_size")]
    pub default_size: usize,
    /// Cache name → size, overriding `default_size`.
    #[serde(default)]
    pub sizes: BTreeMap<String, usize>,
    /// The most bytes (estimated) each cache not named in `max_bytes` holds.
    /// Default 64 MiB.
    #[serde(default = "default_cache_max_bytes")]
    pub default_max_bytes: usize,
    /// Cache name → byte budget, overriding `default_max_bytes`.
    #[serde(default)]
    pub max_bytes: BTreeMap<String, usize>,
    /// How many days rows of the `caches` stream are kept for processes that
    /// catch up after a disconnect. Default 7.
    #[serde(default = "default_invalidation_retention_days")]
    pub invalidation_retention_days: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            default_size: default_cache_size(),
            sizes: BTreeMap::new(),
            default_max_bytes: default_cache_max_bytes(),
            max_bytes: BTreeMap::new(),
            invalidation_retention_days: default_invalidation_retention_days(),
        }
    }
}

impl CacheConfig {
    /// The configured size of the cache called `name`.
    pub fn size_of(&self, name: &str) -> usize {
        self.sizes.get(name).copied().unwrap_or(self.default_size)
    }

    /// The configured byte budget of the cache called `name`.
    pub fn max_bytes_of(&self, name: &str) -> usize {
        self.max_bytes.get(name).copied().unwrap_or(self.default_max_bytes)
    }
}

fn default_cache_size() -> usize {
    10_000
}

/// Entries of ordinary size stay well under this (an event is about a
/// kilobyte, so the default 10 000 of them about 10 MiB): it bites only on the
/// outsized values a peer or client can make, such as member lists of huge
/// rooms or giant account data. The nine caches of a process at their full
/// budgets come to 576 MiB, about what a busy Synapse worker uses.
fn default_cache_max_bytes() -> usize {
    64 * 1024 * 1024
}

fn default_invalidation_retention_days() -> u32 {
    7
}

/// Hides the passwords of a URL, in its user info and in a `password` query
/// parameter: `postgres://user:secret@host` → `postgres://user:***@host`,
/// `postgres://host/db?password=secret` → `postgres://host/db?password=***`.
///
/// ```
/// assert_eq!(store_core::redact_url("redis://:pw@db:6379/0"), "redis://:***@db:6379/0");
/// assert_eq!(
///     store_core::redact_url("postgres://db/x?user=a&password=b"),
///     "postgres://db/x?user=a&password=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return redact_query(url) };
    // Drivers take the credentials up to the first `@`, even when the password
    // holds `/`, `?` or `#`, so look for it before cutting the path off.
    let rest = match rest.split_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{after}"),
            None => rest.to_owned(),
        },
        None => rest.to_owned(),
    };
    format!("{scheme}://{}", redact_query(&rest))
}

/// Hides the value of every `password=` parameter of a query string.
fn redact_query(text: &str) -> String {
    let Some((before, query)) = text.split_once('?') else { return text.to_owned() };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{before}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::writer_for_shard;

    fn rooms() -> impl Iterator<Item = String> {
        (0..10_000).map(|n| format!("!room{n}:example.com"))
    }

    fn owners<'a>(writers: &[&'a str]) -> Vec<&'a str> {
        rooms().map(|room| *writer_for_shard(&room, writers).expect("writers")).collect()
    }

    #[test]
    fn the_hash_is_fixed_across_releases() {
        // Changing these answers moves rooms of a running deployment.
        let writers = ["w0", "w1", "w2"];
        let picked: Vec<&str> = ["!a:b", "!b:b", "!c:b", "!d:b", "!e:b", "!f:b", "!g:b", "!h:b"]
            .iter()
            .map(|room| *writer_for_shard(room, &writers).expect("writers"))
            .collect();
        assert_eq!(picked, PINNED);
    }

    const PINNED: [&str; 8] = ["w0", "w2", "w2", "w0", "w2", "w0", "w1", "w0"];

    #[test]
    fn rooms_spread_evenly_and_the_order_of_the_list_does_not_matter() {
        let writers = ["w1", "w2", "w3", "w4"];
        let mut counts = BTreeMap::new();
        for owner in owners(&writers) {
            *counts.entry(owner).or_insert(0) += 1;
        }
        assert!(counts.values().all(|count| (2_200..=2_800).contains(count)), "{counts:?}");
        assert_eq!(owners(&writers), owners(&["w3", "w1", "w4", "w2"]));
    }

    #[test]
    fn adding_a_fifth_writer_moves_a_fifth_of_the_rooms_all_to_it() {
        let before = owners(&["w1", "w2", "w3", "w4"]);
        let after = owners(&["w1", "w2", "w3", "w4", "w5"]);
        let moved: Vec<_> = before.iter().zip(&after).filter(|(old, new)| old != new).collect();
        assert!((1_500..=2_500).contains(&moved.len()), "{} of 10,000 moved", moved.len());
        assert!(moved.iter().all(|(_, new)| **new == "w5"));
    }

    #[test]
    fn removing_a_writer_moves_only_its_own_rooms() {
        let before = owners(&["w1", "w2", "w3", "w4"]);
        let after = owners(&["w1", "w2", "w4"]);
        for (old, new) in before.iter().zip(&after) {
            assert!(old == new || *old == "w3", "{old} → {new}");
        }
    }

    #[test]
    fn no_writers_no_owner() {
        assert_eq!(writer_for_shard::<&str>("!a:b", &[]), None);
        assert_eq!(writer_for_shard("!a:b", &["only"]), Some(&"only"));
    }
}
