//! What a stream is, before any of it is built: its name and who writes it
//! ([`StreamSpec`]); which instances the config may name as its writers, and
//! how the processes of a deployment agree on them through the database.
//!
//! Shared code asks a stream's [`WriterRule`], never its name: a store crate
//! outside this workspace declares its stream's rule and is treated like ours.

use std::collections::BTreeMap;
use std::fmt;

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
}

impl StreamSpec {
    /// A stream called `name`, written as `writers` says.
    pub const fn new(name: &'static str, writers: WriterRule) -> StreamSpec {
        StreamSpec { name, writers }
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

/// Makes sure this process agrees with the deployment on the writers of every
/// configurable stream of `streams`, as recorded in `deployment_stream_writers`,
/// before anything is loaded: a generator deletes the recorded positions of
/// writers its config does not list, so a misconfigured process must never get
/// that far.
///
/// The master is the authority: it records its lists at every start (a changed
/// list is a warning: the other processes must be restarted with it). Any other
/// process must match the record, and refuses to start before the master has
/// made one.
///
/// `build_store` runs it first in the start-up transaction, so a worker's
/// generators delete positions by the very record it agreed with; the master
/// writes only when its lists changed, so processes starting together on a
/// recorded deployment do not conflict (when they do, `build_store` retries).
pub async fn agree_on_writers(
    conn: &mut Transaction,
    settings: &StoreSettings,
    streams: &[StreamSpec],
) -> Result<(), StoreError> {
    let ours = streams
        .iter()
        .filter(|stream| stream.is_configurable())
        .map(|stream| {
            serde_json::to_string(&stream.writers(settings))
                .map(|writers| (stream.name, writers))
                .map_err(|err| StoreError::Misconfigured(format!("cannot record writers: {err}")))
        })
        .collect::<Result<Vec<(&str, String)>, StoreError>>()?;
    agree(conn, &ours, settings.instance_name == MASTER_INSTANCE).await
}

async fn agree(txn: &mut Transaction, ours: &[(&str, String)], is_master: bool) -> Result<(), StoreError> {
    let rows = txn.query("SELECT stream_name, writers FROM deployment_stream_writers", &[]).await?;
    let recorded = rows
        .iter()
        .map(|row| Ok((row.get(0)?, row.get(1)?)))
        .collect::<Result<BTreeMap<String, String>, StoreError>>()?;
    for (stream, writers) in ours {
        match (recorded.get(*stream), is_master) {
            (Some(recorded), _) if recorded == writers => {}
            (recorded, true) => {
                if let Some(previous) = recorded {
                    tracing::warn!(
                        stream,
                        from = %previous,
                        to = %writers,
                        "the deployment's writers changed; restart every other process with the new config"
                    );
                }
                txn.execute(
                    "INSERT INTO deployment_stream_writers (stream_name, writers, recorded_by) VALUES ($1, $2, $3) \
                     ON CONFLICT (stream_name) DO UPDATE SET writers = EXCLUDED.writers",
                    &[stream, writers, &MASTER_INSTANCE],
                )
                .await?;
            }
            (Some(recorded), false) => {
                return Err(StoreError::Misconfigured(format!(
                    "`[stream_writers] {stream}` is {writers} here but {recorded} for the deployment (as the master recorded it); every process must list the same writers"
                )));
            }
            (None, false) => {
                return Err(StoreError::Misconfigured(format!(
                    "the master has not recorded the deployment's writers of `{stream}` in this database yet; start the master first"
                )));
            }
        }
    }
    Ok(())
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
