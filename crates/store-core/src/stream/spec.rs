//! What a stream is, before any of it is built: its name and who writes it
//! ([`StreamSpec`]); which instances the config may name as its writers, and
//! how the processes of a deployment agree on them through the database.
//!
//! Shared code asks a stream's [`WriterRule`], never its name: a store crate
//! outside this workspace declares its stream's rule and is treated like ours.

use std::collections::BTreeMap;
use std::fmt;

use crate::writers::{WriterSet, load_writer_sets, record_writer_set};
use crate::{MASTER_INSTANCE, StoreError, StoreSettings, Transaction};

/// Who writes a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterRule {
    /// The instances `[stream_writers]` names, any number of them (`master`
    /// when none are named).
    Configured,
    /// The one instance `[stream_writers]` names (`master` when none is):
    /// streams whose state lives in one process's memory.
    Single,
    /// The writers of another stream (backfill follows events); not named in
    /// `[stream_writers]` itself.
    Follows(&'static str),
    /// Every process (cache invalidations); not named in `[stream_writers]`.
    EveryProcess,
    /// The master alone; not named in `[stream_writers]`.
    Master,
}

/// A stream as a composition declares it: its name on the wire, in
/// `stream_positions` and in `[stream_writers]`, and who writes it.
///
/// ```
/// use store_core::{StoreSettings, StreamSpec, WriterRule};
///
/// const NOTES: StreamSpec = StreamSpec::new("notes", WriterRule::Configured);
/// let settings = StoreSettings::single_process().with_writers("notes", &["writer1"]);
/// assert_eq!(NOTES.writers(&settings), ["writer1"]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSpec {
    /// The stream's name.
    pub name: &'static str,
    /// Who writes it.
    pub writers: WriterRule,
    /// Whether its writers may change while the deployment runs (the admin
    /// endpoint): its writer then takes the fence ([`crate::writers::fence`])
    /// in every write and refuses shards it does not own.
    pub elastic: bool,
}

impl StreamSpec {
    /// A stream called `name`, written as `writers` says.
    pub const fn new(name: &'static str, writers: WriterRule) -> StreamSpec {
        StreamSpec { name, writers, elastic: false }
    }

    /// This stream, with writers that may change at runtime.
    pub const fn elastic(mut self) -> StreamSpec {
        self.elastic = true;
        self
    }

    /// Whether `[stream_writers]` may name this stream.
    pub fn is_configurable(&self) -> bool {
        matches!(self.writers, WriterRule::Configured | WriterRule::Single)
    }

    /// The instances that write this stream under `settings`; empty for a
    /// stream every process writes.
    pub fn writers(&self, settings: &StoreSettings) -> Vec<String> {
        match self.writers {
            WriterRule::Configured | WriterRule::Single => settings.writers_for(self.name),
            WriterRule::Follows(stream) => settings.writers_for(stream),
            WriterRule::EveryProcess => Vec::new(),
            WriterRule::Master => vec![MASTER_INSTANCE.to_owned()],
        }
    }
}

impl fmt::Display for StreamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Checks what one process's settings can get wrong about writers on their
/// own, against the streams its stores run: a stream no store runs or whose
/// writers are not configurable, or several writers for a single-writer stream.
pub fn check_stream_writers(settings: &StoreSettings, streams: &[StreamSpec]) -> Result<(), String> {
    for (name, writers) in &settings.stream_writers {
        let Some(stream) = streams.iter().find(|stream| stream.name == name && stream.is_configurable())
        else {
            let configurable: Vec<&str> =
                streams.iter().filter(|stream| stream.is_configurable()).map(|stream| stream.name).collect();
            return Err(format!(
                "`[stream_writers] {name}`: no such stream; the streams with configurable writers are {}",
                configurable.join(", ")
            ));
        };
        if stream.writers == WriterRule::Single && writers.len() > 1 {
            return Err(format!(
                "`[stream_writers] {name}` lists {} writers; {name} has exactly one",
                writers.len()
            ));
        }
    }
    Ok(())
}

/// Adopts the deployment's writers of every configurable stream of
/// `streams`, as recorded in `deployment_stream_writers`, before anything is
/// loaded, and returns them (see [`crate::writers`]).
///
/// The record is the authority; `[stream_writers]` only seeds a fresh
/// database, which the master does. A process whose config lists other writers
/// adopts the record with a warning. A process other than the master refuses
/// to start before the master made the record.
///
/// `build_store` runs it first in the start-up transaction, so a process's
/// generators load by the very record it adopted.
pub async fn agree_on_writers(
    conn: &mut Transaction,
    settings: &StoreSettings,
    streams: &[StreamSpec],
) -> Result<BTreeMap<String, WriterSet>, StoreError> {
    let is_master = settings.instance_name == MASTER_INSTANCE;
    let mut recorded = load_writer_sets(conn).await?;
    let mut adopted = BTreeMap::new();
    for stream in streams.iter().filter(|stream| stream.is_configurable()) {
        let configured = stream.writers(settings);
        let set = match recorded.remove(stream.name) {
            Some(set) => {
                if set.writers() != configured {
                    tracing::warn!(
                        stream = stream.name,
                        configured = ?configured,
                        deployment = ?set.writers(),
                        epoch = set.epoch,
                        "`[stream_writers]` differs from the deployment's writers; going by the deployment's (change them with `master writers set`)"
                    );
                }
                set
            }
            None if is_master => {
                let set = WriterSet::seeded(stream.name, configured);
                record_writer_set(conn, &set).await?;
                set
            }
            None => {
                return Err(StoreError::Misconfigured(format!(
                    "the master has not recorded the deployment's writers of `{}` in this database yet; start the master first",
                    stream.name
                )));
            }
        };
        adopted.insert(stream.name.to_owned(), set);
    }
    Ok(adopted)
}

#[cfg(test)]
mod tests {
    use super::{StreamSpec, WriterRule, check_stream_writers};
    use crate::StoreSettings;

    const STREAMS: [StreamSpec; 4] = [
        StreamSpec::new("events", WriterRule::Configured),
        StreamSpec::new("backfill", WriterRule::Follows("events")),
        StreamSpec::new("typing", WriterRule::Single),
        StreamSpec::new("caches", WriterRule::EveryProcess),
    ];

    #[test]
    fn only_configurable_streams_may_be_named_and_single_ones_once() {
        let check = |settings: StoreSettings| check_stream_writers(&settings, &STREAMS);
        let base = StoreSettings::single_process;
        check(base().with_writers("events", &["master", "w"]).with_writers("typing", &["w"])).unwrap();
        let error = check(base().with_writers("evnts", &["master"])).unwrap_err();
        assert!(error.contains("no such stream") && error.contains("events, typing"), "{error}");
        let error = check(base().with_writers("backfill", &["w"])).unwrap_err();
        assert!(error.contains("no such stream"), "{error}");
        let error = check(base().with_writers("typing", &["master", "w"])).unwrap_err();
        assert!(error.contains("exactly one"), "{error}");
    }

    #[test]
    fn writers_follow_the_rule() {
        let settings = StoreSettings::single_process().with_writers("events", &["w1", "w2"]);
        assert_eq!(STREAMS[1].writers(&settings), ["w1", "w2"]);
        assert_eq!(STREAMS[2].writers(&settings), ["master"]);
        assert!(STREAMS[3].writers(&settings).is_empty());
        assert_eq!(StreamSpec::new("federation", WriterRule::Master).writers(&settings), ["master"]);
    }
}
