//! `GET /metrics`: the process's counters in Prometheus text format, read from
//! where they already live (generators, hub, caches, database) at scrape time,
//! so no hot path pays for metrics it would not otherwise keep.
//!
//! Beyond Synapse's: per stream, how far the slowest writer trails the fastest
//! (`homeserver_stream_writer_spread`), the age of this process's oldest
//! in-flight write (`homeserver_stream_oldest_in_flight_seconds`), how long each
//! replication peer has been silent, and the catch-up backlog.

use std::fmt::Write as _;

use store_core::GroupCommitStats;
use store_events::EVENTS_STREAM;
use store_receipts::RECEIPTS_STREAM;

use crate::http::AppState;

/// Prometheus text, one family at a time.
#[derive(Debug, Default)]
struct Text {
    out: String,
}

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (index, (label, text)) in labels.iter().enumerate() {
                if index > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape(text));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Label values escape backslash, quote and newline.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub(crate) fn render(state: &AppState) -> String {
    let mut text = Text::default();
    streams(state, &mut text);
    group_commits(state, &mut text);
    replication(state, &mut text);
    caches(state, &mut text);
    database(state, &mut text);
    elastic_writers(state, &mut text);
    text.out
}

fn elastic_writers(state: &AppState, text: &mut Text) {
    let elastic = &state.elastic;
    let streams: Vec<(&str, &crate::elastic::ElasticCounters)> =
        elastic.stream_names().filter_map(|name| Some((name, elastic.counters(name)?))).collect();
    let epoch =
        |name: &str| state.store.context().deployment_writers().current(name).map_or(0, |set| set.epoch);
    text.family(
        "homeserver_stream_writers_epoch",
        "gauge",
        "The epoch of the stream's writers this process goes by.",
    );
    for (name, _) in &streams {
        text.sample("homeserver_stream_writers_epoch", &[("stream", name)], epoch(name));
    }
    type Field = fn(&crate::elastic::ElasticCounters) -> &std::sync::atomic::AtomicU64;
    let counter = |value: &std::sync::atomic::AtomicU64| value.load(std::sync::atomic::Ordering::Relaxed);
    let families: [(&str, &str, Field); 5] = [
        ("homeserver_stream_writer_moves_total", "Changes of the stream's writers applied here.", |c| {
            &c.epochs
        }),
        (
            "homeserver_stream_writer_moved_retries_total",
            "Writes that came back moved and were sent to the new writer.",
            |c| &c.moved_retries,
        ),
        (
            "homeserver_stream_writer_handovers_total",
            "Handovers this process applied (one per change).",
            |c| &c.epochs,
        ),
        (
            "homeserver_stream_writer_handover_micros_total",
            "Time from each change of writers until this process routed by it, summed (µs).",
            |c| &c.handover_micros,
        ),
        ("homeserver_stream_writer_handover_max_micros", "The longest of those times (µs).", |c| {
            &c.handover_max_micros
        }),
    ];
    for (family, help, field) in families {
        let kind = if family.ends_with("_total") { "counter" } else { "gauge" };
        text.family(family, kind, help);
        for (name, counters) in &streams {
            text.sample(family, &[("stream", name)], counter(field(counters)));
        }
    }
}

fn streams(state: &AppState, text: &mut Text) {
    let streams: Vec<_> = state.hub.inbound().streams().iter().cloned().collect();
    text.family("homeserver_stream_current_token", "gauge", "The stream's current token in this process.");
    for stream in &streams {
        text.sample(
            "homeserver_stream_current_token",
            &[("stream", stream.name())],
            stream.current_stream_token(),
        );
    }
    text.family(
        "homeserver_stream_writer_position",
        "gauge",
        "Each writer's position as this process knows it.",
    );
    for stream in &streams {
        for (writer, position) in stream.writer_positions() {
            text.sample(
                "homeserver_stream_writer_position",
                &[("stream", stream.name()), ("writer", &writer)],
                position,
            );
        }
    }
    // (stream, fastest writer, slowest writer, current token), for the streams
    // with writer positions; each family's samples must stay together.
    let spans: Vec<(&str, i64, i64, i64)> = streams
        .iter()
        .filter_map(|stream| {
            let positions: Vec<i64> =
                stream.writer_positions().into_iter().map(|(_, position)| position).collect();
            let (fastest, slowest) = (*positions.iter().max()?, *positions.iter().min()?);
            Some((stream.name(), fastest, slowest, stream.current_stream_token()))
        })
        .collect();
    text.family(
        "homeserver_stream_lag",
        "gauge",
        "How far this process's current token trails the fastest writer it knows of.",
    );
    for (stream, fastest, _, current) in &spans {
        text.sample("homeserver_stream_lag", &[("stream", stream)], (fastest - current).max(0));
    }
    text.family(
        "homeserver_stream_writer_spread",
        "gauge",
        "How far the slowest writer trails the fastest: a stuck or idle writer holding the stream back.",
    );
    for (stream, fastest, slowest, _) in &spans {
        text.sample("homeserver_stream_writer_spread", &[("stream", stream)], fastest - slowest);
    }
    text.family(
        "homeserver_stream_oldest_in_flight_seconds",
        "gauge",
        "Age of this process's oldest unfinished write on the stream (0 when none).",
    );
    let instance = state.config.instance_name.as_str();
    for stream in &streams {
        if let (Some(generator), Some(_)) = (stream.generator(), state.hub.source(stream.name())) {
            let age = generator.oldest_in_flight_age().map_or(0.0, |age| age.as_secs_f64());
            text.sample(
                "homeserver_stream_oldest_in_flight_seconds",
                &[("stream", stream.name()), ("writer", instance)],
                age,
            );
        }
    }
}

/// A metric family read off a value: its name, kind, help and reading.
type Family<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// How the writers of this process grouped their writes into commits.
fn group_commits(state: &AppState, text: &mut Text) {
    let queues: Vec<(&str, GroupCommitStats)> = [
        state.store.events_writer().map(|writer| (EVENTS_STREAM, writer.group_stats())),
        state.store.receipts_writer().map(|writer| (RECEIPTS_STREAM, writer.group_stats())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let families: [Family<GroupCommitStats>; 3] = [
        ("homeserver_group_commits_total", "counter", "Commits of the stream's writes here.", |stats| {
            stats.commits
        }),
        (
            "homeserver_group_committed_writes_total",
            "counter",
            "Writes those commits took: above the commits when writes shared them.",
            |stats| stats.jobs,
        ),
        ("homeserver_group_commit_largest", "gauge", "The most writes one commit took.", |stats| {
            stats.largest
        }),
    ];
    for (name, kind, help, value) in families {
        text.family(name, kind, help);
        for (stream, stats) in &queues {
            text.sample(name, &[("stream", stream)], value(stats));
        }
    }
}

fn replication(state: &AppState, text: &mut Text) {
    let hub = &state.hub;
    let (received, sent) = hub.command_counts();
    text.family(
        "homeserver_replication_commands_received_total",
        "counter",
        "Valid replication commands received.",
    );
    for (command, count) in received {
        text.sample(
            "homeserver_replication_commands_received_total",
            &[("command", command.as_str())],
            count,
        );
    }
    text.family(
        "homeserver_replication_commands_sent_total",
        "counter",
        "Replication commands queued for sending.",
    );
    for (command, count) in sent {
        text.sample("homeserver_replication_commands_sent_total", &[("command", command.as_str())], count);
    }
    text.family("homeserver_replication_connections", "gauge", "Replication connections up.");
    text.sample("homeserver_replication_connections", &[], hub.connections());
    text.family(
        "homeserver_replication_reconnects_total",
        "counter",
        "Replication connections lost and retried.",
    );
    text.sample("homeserver_replication_reconnects_total", &[], hub.reconnects());
    text.family(
        "homeserver_replication_catch_up_fetches_total",
        "counter",
        "Queries run to read missed rows from the database.",
    );
    text.sample("homeserver_replication_catch_up_fetches_total", &[], hub.inbound().catch_up_fetches());
    text.family(
        "homeserver_replication_catch_up_failures_total",
        "counter",
        "Catch-up attempts that failed; each is retried with backoff until it succeeds.",
    );
    text.sample("homeserver_replication_catch_up_failures_total", &[], hub.inbound().catch_up_failures());
    text.family(
        "homeserver_replication_catch_ups_retrying",
        "gauge",
        "Catch-ups waiting to try again after a failure.",
    );
    text.sample("homeserver_replication_catch_ups_retrying", &[], hub.inbound().catch_ups_retrying());
    text.family(
        "homeserver_replication_refused_total",
        "counter",
        "Replication commands and connections refused, by transport and reason.",
    );
    for ((transport, reason), count) in hub.refusals() {
        text.sample(
            "homeserver_replication_refused_total",
            &[("transport", transport), ("reason", reason.as_str())],
            count,
        );
    }
    text.family(
        "homeserver_replication_catch_up_backlog",
        "gauge",
        "Positions the catch-ups in progress still have to read.",
    );
    for (stream, backlog) in hub.inbound().catch_up_backlog() {
        text.sample("homeserver_replication_catch_up_backlog", &[("stream", &stream)], backlog);
    }
    text.family(
        "homeserver_replication_peer_silence_seconds",
        "gauge",
        "Time since each replication peer last sent a valid command.",
    );
    for (connection, peer, silence) in hub.peer_silences() {
        let connection = connection.to_string();
        text.sample(
            "homeserver_replication_peer_silence_seconds",
            &[("connection", &connection), ("peer", &peer)],
            silence.as_secs_f64(),
        );
    }
}

/// One counter of a cache's stats.
type CacheCounter = fn(&store_core::CacheStats) -> u64;

fn caches(state: &AppState, text: &mut Text) {
    let stats = state.store.context().caches().registry().stats();
    let families: [(&str, &str, CacheCounter); 6] = [
        ("homeserver_cache_hits_total", "Reads answered from the cache.", |s| s.hits),
        ("homeserver_cache_misses_total", "Reads that loaded from the database.", |s| s.misses),
        ("homeserver_cache_evictions_total", "Entries dropped for the size or budget.", |s| s.evictions),
        ("homeserver_cache_weight_evictions_total", "Evictions forced by the budget.", |s| {
            s.weight_evictions
        }),
        ("homeserver_cache_oversized_total", "Values too big for the budget, not cached.", |s| s.oversized),
        ("homeserver_cache_invalidations_total", "Invalidations applied.", |s| s.invalidations),
    ];
    for (family, help, field) in families {
        text.family(family, "counter", help);
        for (cache, (counters, _)) in &stats {
            text.sample(family, &[("cache", cache)], field(counters));
        }
    }
    text.family("homeserver_cache_size", "gauge", "Entries in the cache.");
    for (cache, (_, size)) in &stats {
        text.sample("homeserver_cache_size", &[("cache", cache)], size);
    }
}

fn database(state: &AppState, text: &mut Text) {
    let stats = state.store.database().interaction_stats();
    text.family("homeserver_db_interactions_total", "counter", "Database interactions finished, by name.");
    for (name, stats) in &stats {
        text.sample("homeserver_db_interactions_total", &[("name", name)], stats.count);
    }
    text.family("homeserver_db_interaction_failures_total", "counter", "Database interactions that failed.");
    for (name, stats) in &stats {
        text.sample("homeserver_db_interaction_failures_total", &[("name", name)], stats.failures);
    }
    text.family("homeserver_db_interaction_retries_total", "counter", "Attempts retried after a conflict.");
    for (name, stats) in &stats {
        text.sample("homeserver_db_interaction_retries_total", &[("name", name)], stats.retries);
    }
    text.family("homeserver_db_interaction_seconds_total", "counter", "Time spent in database interactions.");
    for (name, stats) in &stats {
        text.sample(
            "homeserver_db_interaction_seconds_total",
            &[("name", name)],
            stats.total_time.as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Text, escape};

    #[test]
    fn samples_are_prometheus_text_with_escaped_labels() {
        let mut text = Text::default();
        text.family("x_total", "counter", "Things.");
        text.sample("x_total", &[("name", "a\"b\\c\nd"), ("k", "v")], 3);
        text.sample("x_total", &[], 1.5);
        assert_eq!(
            text.out,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{name=\"a\\\"b\\\\c\\nd\",k=\"v\"} 3\nx_total 1.5\n"
        );
        assert_eq!(escape("plain"), "plain");
    }
}
