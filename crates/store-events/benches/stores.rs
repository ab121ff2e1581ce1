//! Store-level figures on PostgreSQL, each printed as a ratio against a baseline
//! measured in the same run (the machine is shared and noisy):
//!
//! - `stores/persist`: events/s persisted by 2 writers × 8 tasks through
//!   `EventsWriter`, against raw inserts of the same rows with no store logic.
//! - `stores/caches_rows`: `caches` rows and bytes written per current-state
//!   change in a room of 100 members, against one row per dependent cache.
//! - `stores/cache_hit`: reads/s of a room's current state from the cache,
//!   against reading it from the database.
//!
//! Run with `cargo xtask bench stores`; `STORES_EVENTS` shrinks the workload.

use std::sync::Arc;
use std::time::Instant;

use store_core::{CachesRow, CachesStream, Database, Engine, StoreContext, StoreError, StoreSettings};
use store_events::{CURRENT_STATE_CACHES_BY_MEMBER, CURRENT_STATE_CACHES_BY_ROOM, EventsWriter, NewEvent};
use store_test_support::{TestDb, build_alone};

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const WRITERS: [&str; 2] = ["persister1", "persister2"];
const TASKS_PER_WRITER: usize = 8;

fn config(instance: &str) -> StoreSettings {
    StoreSettings::in_deployment(instance).with_writers("events", &WRITERS)
}

async fn writer(
    db: &Database,
    settings: &StoreSettings,
) -> Result<(Arc<CachesStream>, EventsWriter), StoreError> {
    let (ctx, writer) = build_alone::<(StoreContext, EventsWriter)>(db, settings).await?;
    Ok((Arc::clone(ctx.caches()), writer))
}

fn message(id: String) -> NewEvent {
    NewEvent {
        event_id: id,
        event_type: "m.room.message".to_owned(),
        state_key: None,
        sender: "@bench:example.com".to_owned(),
        origin_server_ts: 1,
        content: r#"{"msgtype":"m.text","body":"a message of an ordinary length for a chat room"}"#
            .to_owned(),
    }
}

fn member(id: String, user: &str, membership: &str) -> NewEvent {
    NewEvent {
        event_id: id,
        event_type: "m.room.member".to_owned(),
        state_key: Some(user.to_owned()),
        sender: user.to_owned(),
        origin_server_ts: 1,
        content: format!(r#"{{"membership":"{membership}"}}"#),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn main() -> BenchResult {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let test_db = TestDb::new(Engine::Postgres).await?;
        persist(&test_db).await?;
        caches_rows(&test_db).await?;
        cache_hit(&test_db).await
    })
}

#[expect(clippy::cast_precision_loss, reason = "event counts are far below 2^52")]
fn per_second(count: usize, started: Instant) -> f64 {
    count as f64 / started.elapsed().as_secs_f64()
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
async fn persist(test_db: &TestDb) -> BenchResult {
    let total = env_usize("STORES_EVENTS", 8_000);
    let per_task = total / (WRITERS.len() * TASKS_PER_WRITER);
    let mut writers = Vec::new();
    for instance in WRITERS {
        let db = test_db.reconnect().await?;
        writers.push((db.clone(), Arc::new(writer(&db, &config(instance)).await?.1)));
    }
    let mut store_rates = Vec::new();
    let mut raw_rates = Vec::new();
    for round in 0..3 {
        // Through the store.
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (w, (_, writer)) in writers.iter().enumerate() {
            for task in 0..TASKS_PER_WRITER {
                let writer = Arc::clone(writer);
                tasks.spawn(async move {
                    let room = format!("!store{round}_{w}_{task}:example.com");
                    for n in 0..per_task {
                        writer.persist_events(&room, &[message(format!("$s{round}_{w}_{task}_{n}"))]).await?;
                    }
                    Ok::<(), StoreError>(())
                });
            }
        }
        while let Some(result) = tasks.join_next().await {
            result??;
        }
        store_rates.push(per_second(per_task * WRITERS.len() * TASKS_PER_WRITER, started));

        // The same rows, raw: a sequence value and an insert per transaction.
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (w, (db, _)) in writers.iter().enumerate() {
            for task in 0..TASKS_PER_WRITER {
                let db = db.clone();
                tasks.spawn(async move {
                    let room = format!("!raw{round}_{w}_{task}:example.com");
                    for n in 0..per_task {
                        let event = message(format!("$r{round}_{w}_{task}_{n}"));
                        let room = room.clone();
                        db.run_interaction("raw_insert_event", move |txn| {
                            let (event, room) = (event.clone(), room.clone());
                            Box::pin(async move {
                                let id: i64 = txn.query_one("SELECT nextval('events_stream_seq')", &[]).await?.get(0)?;
                                txn.execute(
                                    "INSERT INTO events (stream_ordering, instance_name, event_id, room_id, type, \
                                     state_key, sender, origin_server_ts, content) \
                                     VALUES ($1, 'raw', $2, $3, $4, $5, $6, $7, $8)",
                                    &[
                                        &id,
                                        &event.event_id,
                                        &room,
                                        &event.event_type,
                                        &event.state_key,
                                        &event.sender,
                                        &event.origin_server_ts,
                                        &event.content,
                                    ],
                                )
                                .await
                            })
                        })
                        .await?;
                    }
                    Ok::<(), StoreError>(())
                });
            }
        }
        while let Some(result) = tasks.join_next().await {
            result??;
        }
        raw_rates.push(per_second(per_task * WRITERS.len() * TASKS_PER_WRITER, started));
    }
    store_rates.sort_by(f64::total_cmp);
    raw_rates.sort_by(f64::total_cmp);
    let (store, raw) = (store_rates[1], raw_rates[1]);
    println!(
        "stores/persist events={} writers=2 tasks=8x2: EventsWriter {store:.0} events/s vs raw inserts {raw:.0} rows/s \
         (medians of 3), ratio {:.3}",
        per_task * WRITERS.len() * TASKS_PER_WRITER,
        store / raw
    );
    Ok(())
}

fn wire_bytes(rows: &[CachesRow]) -> BenchResult<usize> {
    let mut bytes = 0;
    for row in rows {
        bytes += serde_json::to_string(row)?.len();
    }
    Ok(bytes)
}

/// The rows an unbatched implementation would write: one per dependent cache
/// and key.
fn unbatched_rows(room: &str, members_changed: &[String]) -> Vec<CachesRow> {
    let mut rows = Vec::new();
    for cache in CURRENT_STATE_CACHES_BY_ROOM {
        rows.push(CachesRow {
            cache_func: (*cache).to_owned(),
            keys: Some(vec![room.to_owned()]),
            invalidation_ts: 1,
        });
    }
    for member in members_changed {
        for cache in CURRENT_STATE_CACHES_BY_MEMBER {
            rows.push(CachesRow {
                cache_func: (*cache).to_owned(),
                keys: Some(vec![member.clone()]),
                invalidation_ts: 1,
            });
        }
    }
    rows
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
async fn caches_rows(test_db: &TestDb) -> BenchResult {
    let db = test_db.reconnect().await?;
    let (caches, writer) = writer(&db, &config("persister1")).await?;
    let room = "!hundred:example.com";
    let members: Vec<String> = (0..100).map(|n| format!("@member{n:03}:example.com")).collect();
    let joins: Vec<NewEvent> =
        members.iter().enumerate().map(|(n, user)| member(format!("$join{n}"), user, "join")).collect();

    let scenarios: [(&str, Vec<NewEvent>, Vec<String>); 3] = [
        ("100 members join in one batch", joins, members.clone()),
        (
            "a topic change",
            vec![NewEvent {
                event_id: "$topic".to_owned(),
                event_type: "m.room.topic".to_owned(),
                state_key: Some(String::new()),
                sender: members[0].clone(),
                origin_server_ts: 1,
                content: r#"{"topic":"benchmarks"}"#.to_owned(),
            }],
            Vec::new(),
        ),
        (
            "one member leaves",
            vec![member("$leave".to_owned(), &members[1], "leave")],
            vec![members[1].clone()],
        ),
    ];
    for (name, events, members_changed) in scenarios {
        let before = caches.current_token("persister1");
        writer.persist_events(room, &events).await?;
        let after = caches.current_token("persister1");
        let written: Vec<CachesRow> = caches
            .get_updates_since("persister1", before, after, 10_000)
            .await?
            .rows
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let unbatched = unbatched_rows(room, &members_changed);
        println!(
            "stores/caches_rows {name} (room of 100): {} rows, {} bytes vs unbatched {} rows, {} bytes; rows ratio {:.3}, \
             bytes ratio {:.3}",
            written.len(),
            wire_bytes(&written)?,
            unbatched.len(),
            wire_bytes(&unbatched)?,
            written.len() as f64 / unbatched.len() as f64,
            wire_bytes(&written)? as f64 / wire_bytes(&unbatched)? as f64,
        );
    }
    Ok(())
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
async fn cache_hit(test_db: &TestDb) -> BenchResult {
    let db = test_db.reconnect().await?;
    let (caches, writer) = writer(&db, &config("persister2")).await?;
    let room = "!cached:example.com";
    let joins: Vec<NewEvent> =
        (0..20).map(|n| member(format!("$cj{n}"), &format!("@c{n}:example.com"), "join")).collect();
    writer.persist_events(room, &joins).await?;
    let reader = writer.reader();
    let registry = caches.registry();

    let db_reads = env_usize("STORES_DB_READS", 2_000);
    let started = Instant::now();
    for _ in 0..db_reads {
        registry.invalidate_key("get_current_state_ids", &[room.to_owned()]);
        std::hint::black_box(reader.get_current_state_ids(room).await?);
    }
    let from_db = per_second(db_reads, started);

    let cached_reads = db_reads * 100;
    reader.get_current_state_ids(room).await?;
    let started = Instant::now();
    for _ in 0..cached_reads {
        std::hint::black_box(reader.get_current_state_ids(room).await?);
    }
    let from_cache = per_second(cached_reads, started);
    println!(
        "stores/cache_hit get_current_state_ids (20 entries): cached {from_cache:.0} reads/s vs database \
         {from_db:.0} reads/s, ratio {:.1}",
        from_cache / from_db
    );
    Ok(())
}
