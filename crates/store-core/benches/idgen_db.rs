//! Database-level figures for stream ID generators, on PostgreSQL, each printed as
//! a ratio against a baseline measured in the same run (the machine is shared and
//! noisy, so only ratios mean anything):
//!
//! - `idgen/persist`: rows/s persisting rows one per transaction, with position
//!   tracking (two writers, `stream_positions` upserts coalesced) against the
//!   same inserts taking plain sequence IDs with no tracking.
//! - `idgen/startup`: time to build a writer's generator over a 5-million-row
//!   table against an empty one.
//!
//! Run with `cargo xtask bench idgen`. `IDGEN_ROWS` and `IDGEN_BIG_ROWS` shrink the
//! workload for a quick look.

use std::sync::Arc;
use std::time::{Duration, Instant};

use store_core::{Database, Engine, MultiWriterConfig, MultiWriterIdGenerator, StoreError, StreamTable};
use store_test_support::TestDb;

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn main() -> BenchResult {
    // `cargo bench` passes `--bench`; this harness takes no other arguments.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        persist().await?;
        startup().await
    })
}

async fn create_stream(db: &Database, table: &str, sequence: &str) -> Result<(), StoreError> {
    let ddl = format!(
        "CREATE TABLE {table} (stream_id BIGINT PRIMARY KEY, instance_name TEXT NOT NULL, data TEXT);\
         CREATE SEQUENCE {sequence}; SELECT nextval('{sequence}');"
    );
    db.run_interaction("bench_create_stream", move |txn| {
        let ddl = ddl.clone();
        Box::pin(async move { txn.execute_batch(&ddl).await })
    })
    .await
}

fn config(instance: &str, table: &str, sequence: &str) -> MultiWriterConfig {
    MultiWriterConfig {
        stream_name: table.to_owned(),
        instance_name: instance.to_owned(),
        tables: vec![StreamTable::new(table, "instance_name", "stream_id")],
        sequence_name: sequence.to_owned(),
        writers: vec!["w1".to_owned(), "w2".to_owned()],
        ..MultiWriterConfig::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `nextval` and the insert in one transaction; nothing tracked.
    Baseline,
    /// `get_next_txn` and the insert in one transaction; the position is recorded
    /// in the background after commit.
    Tracked,
    /// `get_next`, the insert in its own transaction, then `finish().await`, which
    /// waits for the position to be recorded.
    TrackedAwaited,
}

/// Inserts `rows` rows with `tasks` concurrent tasks; returns rows/s and the
/// number of `stream_positions` upserts.
async fn run(db: &Database, mode: Mode, rows: usize, tasks: usize, round: usize) -> BenchResult<(f64, u64)> {
    let table = format!("persist_{mode:?}_{tasks}_{round}").to_lowercase();
    let sequence = format!("{table}_seq");
    create_stream(db, &table, &sequence).await?;
    let gens = match mode {
        Mode::Baseline => Vec::new(),
        Mode::Tracked | Mode::TrackedAwaited => vec![
            MultiWriterIdGenerator::new(db, config("w1", &table, &sequence)).await?,
            MultiWriterIdGenerator::new(db, config("w2", &table, &sequence)).await?,
        ],
    };
    let insert =
        Arc::new(format!("INSERT INTO {table} (stream_id, instance_name, data) VALUES ($1, $2, 'x')"));
    let nextval = Arc::new(format!("SELECT nextval('{sequence}')"));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let per_task = rows / tasks + usize::from(task < rows % tasks);
        let (db, insert, nextval) = (db.clone(), Arc::clone(&insert), Arc::clone(&nextval));
        let generator = gens.get(task % 2).cloned();
        let instance = if task % 2 == 0 { "w1" } else { "w2" };
        set.spawn(async move {
            for _ in 0..per_task {
                match (mode, &generator) {
                    (Mode::Baseline, _) => {
                        let (insert, nextval) = (Arc::clone(&insert), Arc::clone(&nextval));
                        db.run_interaction("bench_insert_plain", move |txn| {
                            let (insert, nextval) = (Arc::clone(&insert), Arc::clone(&nextval));
                            Box::pin(async move {
                                let id: i64 = txn.query_one(&nextval, &[]).await?.get(0)?;
                                txn.execute(&insert, &[&id, &instance]).await
                            })
                        })
                        .await?;
                    }
                    (Mode::Tracked, Some(generator)) => {
                        let insert = Arc::clone(&insert);
                        let generator = generator.clone();
                        db.run_interaction("bench_insert_tracked", move |txn| {
                            let (insert, generator) = (Arc::clone(&insert), generator.clone());
                            Box::pin(async move {
                                let id = generator.get_next_txn(txn).await?;
                                txn.execute(&insert, &[&id, &instance]).await
                            })
                        })
                        .await?;
                    }
                    (Mode::TrackedAwaited, Some(generator)) => {
                        let guard = generator.get_next().await?;
                        let (insert, id) = (Arc::clone(&insert), guard.id());
                        db.run_interaction("bench_insert_awaited", move |txn| {
                            let insert = Arc::clone(&insert);
                            Box::pin(async move { txn.execute(&insert, &[&id, &instance]).await })
                        })
                        .await?;
                        guard.finish().await?;
                    }
                    (_, None) => unreachable!("tracked modes always have generators"),
                }
            }
            Ok::<(), StoreError>(())
        });
    }
    while let Some(result) = set.join_next().await {
        result??;
    }
    let elapsed = started.elapsed();
    let upserts = gens.iter().map(MultiWriterIdGenerator::stream_positions_writes).sum();
    #[expect(clippy::cast_precision_loss, reason = "row counts are far below 2^52")]
    let rate = rows as f64 / elapsed.as_secs_f64();
    Ok((rate, upserts))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
async fn persist() -> BenchResult {
    let rows = env_usize("IDGEN_ROWS", 20_000);
    let rounds = env_usize("IDGEN_ROUNDS", 5);
    let test_db = TestDb::new(Engine::Postgres).await?;
    for tasks in [1, 16] {
        let mut baseline = Vec::new();
        let mut tracked = Vec::new();
        let mut awaited = Vec::new();
        let (mut tracked_upserts, mut awaited_upserts) = (0, 0);
        // Interleave the modes so drift in the machine's load hits them alike.
        for round in 0..rounds {
            baseline.push(run(&test_db.db, Mode::Baseline, rows, tasks, round).await?.0);
            let (rate, upserts) = run(&test_db.db, Mode::Tracked, rows, tasks, round).await?;
            tracked.push(rate);
            tracked_upserts = upserts;
            let (rate, upserts) = run(&test_db.db, Mode::TrackedAwaited, rows, tasks, round).await?;
            awaited.push(rate);
            awaited_upserts = upserts;
        }
        let (baseline, tracked, awaited) =
            (median(&mut baseline), median(&mut tracked), median(&mut awaited));
        println!(
            "idgen/persist rows={rows} tasks={tasks} writers=2: baseline {baseline:.0} rows/s (median of {rounds}); \
             tracked (get_next_txn) {tracked:.0} rows/s, ratio {:.3}, {tracked_upserts} upserts; \
             tracked (get_next + finish().await) {awaited:.0} rows/s, ratio {:.3}, {awaited_upserts} upserts",
            tracked / baseline,
            awaited / baseline,
        );
    }
    Ok(())
}

async fn time_startups(db: &Database, table: &str, sequence: &str, runs: usize) -> BenchResult<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let generator = MultiWriterIdGenerator::new(db, config("w1", table, sequence)).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        drop(generator);
    }
    Ok(median(&mut times))
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
async fn startup() -> BenchResult {
    let big_rows = i64::try_from(env_usize("IDGEN_BIG_ROWS", 5_000_000))?;
    let runs = env_usize("IDGEN_STARTUP_RUNS", 21);
    let test_db = TestDb::new(Engine::Postgres).await?;
    let db = &test_db.db;
    create_stream(db, "startup_empty", "startup_empty_seq").await?;
    create_stream(db, "startup_big", "startup_big_seq").await?;
    let filling = Instant::now();
    db.run_interaction("bench_fill_big", move |txn| {
        Box::pin(async move {
            txn.execute(
                "INSERT INTO startup_big (stream_id, instance_name, data) \
                 SELECT g, CASE WHEN g % 2 = 0 THEN 'w1' ELSE 'w2' END, 'event' FROM generate_series(2, $1) g",
                &[&big_rows],
            )
            .await?;
            txn.execute("SELECT setval('startup_big_seq', $1)", &[&big_rows]).await?;
            // Both writers recorded positions near the top, as after normal running.
            for (writer, position) in [("w1", big_rows - 1), ("w2", big_rows)] {
                txn.execute(
                    "INSERT INTO stream_positions (stream_name, instance_name, stream_id) VALUES ('startup_big', $1, $2)",
                    &[&writer, &position],
                )
                .await?;
            }
            txn.execute_batch("ANALYZE startup_big").await
        })
    })
    .await?;
    let fill_time = filling.elapsed();
    // Warm both, then interleave the measured runs.
    time_startups(db, "startup_empty", "startup_empty_seq", 2).await?;
    time_startups(db, "startup_big", "startup_big_seq", 2).await?;
    let mut empty = Vec::new();
    let mut big = Vec::new();
    for _ in 0..runs {
        empty.push(time_startups(db, "startup_empty", "startup_empty_seq", 1).await?);
        big.push(time_startups(db, "startup_big", "startup_big_seq", 1).await?);
    }
    let (empty, big) = (median(&mut empty), median(&mut big));
    println!(
        "idgen/startup: {big_rows} rows {big:.2} ms vs empty {empty:.2} ms (medians of {runs}), ratio {:.3} \
         (table filled in {:.1}s)",
        big / empty,
        Duration::as_secs_f64(&fill_time)
    );
    Ok(())
}
