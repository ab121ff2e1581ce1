//! End-to-end replication figures, each against a raw loopback baseline
//! measured in the same run (the machine is shared and noisy):
//!
//! - `replication/tcp` and `replication/redis`: rows/s from a writer's finished
//!   writes (receipts, 8 tasks) to a follower's applied rows, and the latency
//!   from `finish` to applied (p50, p99);
//! - the baselines: the same number of lines of the same size through a bare
//!   loopback socket, and through a bare Redis PUBLISH loop.
//!
//! Run with `cargo xtask bench replication`; `REPLICATION_ROWS` shrinks it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication::redis::{RedisAddress, run_forever};
use replication::{Hub, Inbound, Outbound, Settings, StreamRegistry, tcp};

use store_core::{Database, Engine, StoreError, StoreSettings};
use store_receipts::{ReceiptRow, ReceiptsReader, ReceiptsStream, ReceiptsWriter};
use store_test_support::{TestDb, build_alone};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const TASKS: usize = 8;
/// What TCP peers authenticate with.
const SECRET: &str = "bench secret";
/// A line about as long as a receipts RDATA line.
const PAYLOAD: &str =
    r#"["!room:example.com","m.read","@someone:example.com","$event:example.com",null,{"ts":1490197670513}]"#;

struct Figures {
    rows_per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn figures(sent: &BTreeMap<i64, Instant>, arrived: &BTreeMap<i64, Instant>) -> Figures {
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(key, at)| arrived.get(key).map(|arrival| arrival.duration_since(*at)))
        .collect();
    latencies.sort();
    let first = sent.values().min().copied().unwrap_or_else(Instant::now);
    let last = arrived.values().max().copied().unwrap_or_else(Instant::now);
    #[expect(clippy::cast_precision_loss, reason = "row counts are far below 2^52")]
    let rows_per_second = sent.len() as f64 / last.duration_since(first).as_secs_f64();
    Figures { rows_per_second, p50: percentile(&latencies, 0.5), p99: percentile(&latencies, 0.99) }
}

/// Writes `rows` receipts with 8 tasks and measures when the follower applied each.
async fn measure(
    writer: &Arc<ReceiptsWriter>,
    follower: &Arc<ReceiptsReader>,
    rows: usize,
) -> BenchResult<Figures> {
    let finished = Arc::new(Mutex::new(BTreeMap::new()));
    let applied = Arc::new(Mutex::new(BTreeMap::new()));
    let mut changes = follower.stream().subscribe();
    let watcher = {
        let (follower, applied, finished) =
            (Arc::clone(follower), Arc::clone(&applied), Arc::clone(&finished));
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let now = Instant::now();
                let current = follower.stream().get_current_token_for_writer("master");
                let finished: Vec<i64> = finished.lock().expect("not poisoned").keys().copied().collect();
                let mut applied = applied.lock().expect("not poisoned");
                for token in finished.into_iter().filter(|token| *token <= current) {
                    applied.entry(token).or_insert(now);
                }
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (writer, finished) = (Arc::clone(writer), Arc::clone(&finished));
        tasks.spawn(async move {
            for n in 0..rows / TASKS {
                let receipt = ReceiptRow {
                    room_id: format!("!room{task}:example.com"),
                    receipt_type: "m.read".to_owned(),
                    user_id: format!("@user{n}:example.com"),
                    event_id: "$event:example.com".to_owned(),
                    thread_id: None,
                    data: serde_json::json!({"ts": 1}),
                };
                let token = writer.insert_receipt(&receipt).await?;
                finished.lock().expect("not poisoned").insert(token, Instant::now());
            }
            Ok::<(), StoreError>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let last = writer.reader().stream().get_current_token_for_writer("master");
    let deadline = Instant::now() + Duration::from_secs(120);
    while follower.stream().get_current_token_for_writer("master") < last {
        if Instant::now() > deadline {
            return Err("the follower never caught up".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Rows applied by the final advance.
    let now = Instant::now();
    {
        let finished = finished.lock().expect("not poisoned");
        let mut applied = applied.lock().expect("not poisoned");
        for token in finished.keys() {
            applied.entry(*token).or_insert(now);
        }
    }
    watcher.abort();
    let finished = finished.lock().expect("not poisoned").clone();
    let applied = applied.lock().expect("not poisoned").clone();
    Ok(figures(&finished, &applied))
}

/// `rows` lines through a bare loopback socket.
async fn tcp_baseline(rows: usize) -> BenchResult<Figures> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        let mut lines = BufReader::new(stream).lines();
        let mut arrived = BTreeMap::new();
        while let Some(line) = lines.next_line().await? {
            let index: i64 = line.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(-1);
            arrived.insert(index, Instant::now());
            if arrived.len() == rows {
                break;
            }
        }
        Ok::<_, std::io::Error>(arrived)
    });
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mut sent = BTreeMap::new();
    for index in 0..i64::try_from(rows)? {
        sent.insert(index, Instant::now());
        stream.write_all(format!("{index} {PAYLOAD}\n").as_bytes()).await?;
    }
    let arrived = receiver.await??;
    Ok(figures(&sent, &arrived))
}

/// `rows` messages through a bare Redis PUBLISH loop.
async fn redis_baseline(rows: usize) -> BenchResult<Figures> {
    let channel = format!("bench-baseline-{}", std::process::id());
    let mut subscriber = TcpStream::connect("127.0.0.1:6379").await?;
    subscriber
        .write_all(format!("*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n", channel.len()).as_bytes())
        .await?;
    let mut confirmation = [0u8; 256];
    let _ = subscriber.read(&mut confirmation).await?;
    let receiver = tokio::spawn(async move {
        let mut lines = BufReader::new(subscriber).lines();
        let mut arrived = BTreeMap::new();
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("BENCH ") {
                let index: i64 = rest.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(-1);
                arrived.insert(index, Instant::now());
                if arrived.len() == rows {
                    break;
                }
            }
        }
        Ok::<_, std::io::Error>(arrived)
    });
    let (mut replies, mut publisher) = TcpStream::connect("127.0.0.1:6379").await?.into_split();
    tokio::spawn(async move {
        let mut sink = vec![0u8; 4096];
        while matches!(replies.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let mut sent = BTreeMap::new();
    for index in 0..i64::try_from(rows)? {
        let message = format!("BENCH {index} {PAYLOAD}");
        sent.insert(index, Instant::now());
        publisher
            .write_all(
                format!(
                    "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{channel}\r\n${}\r\n{message}\r\n",
                    channel.len(),
                    message.len()
                )
                .as_bytes(),
            )
            .await?;
    }
    let arrived = receiver.await??;
    Ok(figures(&sent, &arrived))
}

fn settings() -> Settings {
    Settings { poll_interval: Duration::from_secs(1), ..Settings::default() }
}

#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
fn report(name: &str, measured: &Figures, baseline: &Figures, baseline_name: &str) {
    println!(
        "replication/{name}: {:.0} rows/s, latency p50 {:.2} ms p99 {:.2} ms; {baseline_name} {:.0} lines/s, p50 {:.3} ms \
         p99 {:.3} ms; throughput ratio {:.4}, p50 ratio {:.1}",
        measured.rows_per_second,
        measured.p50.as_secs_f64() * 1e3,
        measured.p99.as_secs_f64() * 1e3,
        baseline.rows_per_second,
        baseline.p50.as_secs_f64() * 1e3,
        baseline.p99.as_secs_f64() * 1e3,
        measured.rows_per_second / baseline.rows_per_second,
        measured.p50.as_secs_f64() / baseline.p50.as_secs_f64().max(1e-9),
    );
}

/// How often the follower asked the sequence whether a token was handed out:
/// the cost of refusing forged tokens.
#[expect(clippy::print_stdout, reason = "a benchmark's output is its report")]
fn report_sequence_reads(name: &str, follower_db: &Database, rows: usize) {
    let reads = follower_db.interaction_stats().get("read_stream_sequence").map_or(0, |stats| stats.count);
    println!("replication/{name}: the follower read the sequence {reads} times for {rows} rows");
}

fn main() -> BenchResult {
    let rows: usize = std::env::var("REPLICATION_ROWS").ok().and_then(|n| n.parse().ok()).unwrap_or(4_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let test_db = TestDb::new(Engine::Postgres).await?;
        let writer: Arc<ReceiptsWriter> =
            Arc::new(build_alone(&test_db.db, &StoreSettings::in_deployment("master")).await?);

        for transport in ["tcp", "redis"] {
            let worker_db = test_db.reconnect().await?;
            let follower: Arc<ReceiptsReader> =
                Arc::new(build_alone(&worker_db, &StoreSettings::in_deployment("worker1")).await?);
            let mut registry = StreamRegistry::new();
            registry.register(Arc::new(ReceiptsStream(Arc::clone(&follower))));
            let channel = format!("bench-{transport}-{}", std::process::id());
            let master_hub = Hub::new(
                "master",
                &channel,
                settings(),
                Inbound::new("master", StreamRegistry::new()),
                Outbound::new(
                    "master",
                    [Arc::new(ReceiptsStream(writer.shared_reader())) as Arc<dyn replication::Stream>],
                ),
                transport == "tcp",
                Some(SECRET),
            );
            master_hub.wake_on(writer.reader().stream().subscribe());
            let master_task = tokio::spawn(Arc::clone(&master_hub).run_streamer());
            let worker_hub = Hub::new(
                "worker1",
                &channel,
                settings(),
                Inbound::new("worker1", registry),
                Outbound::new("worker1", []),
                false,
                Some(SECRET),
            );
            let mut tasks = Vec::new();
            if transport == "tcp" {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let address = listener.local_addr()?.to_string();
                tasks.push(tokio::spawn(tcp::serve(Arc::clone(&master_hub), listener)));
                tasks.push(tokio::spawn(tcp::connect_forever(Arc::clone(&worker_hub), address)));
            } else {
                let address = RedisAddress::parse("redis://127.0.0.1:6379")?;
                tasks.push(tokio::spawn(run_forever(Arc::clone(&master_hub), address.clone())));
                tasks.push(tokio::spawn(run_forever(Arc::clone(&worker_hub), address)));
            }
            while worker_hub.connections() == 0 || master_hub.connections() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Let the handshake's POSITION connect the stream.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let measured = measure(&writer, &follower, rows).await?;
            let (baseline, baseline_name) = if transport == "tcp" {
                (tcp_baseline(rows).await?, "bare loopback socket")
            } else {
                (redis_baseline(rows).await?, "bare PUBLISH loop")
            };
            report(transport, &measured, &baseline, baseline_name);
            report_sequence_reads(transport, &worker_db, rows);
            master_task.abort();
            for task in tasks {
                task.abort();
            }
        }
        Ok(())
    })
}
