//! Parse and serialise throughput of the line protocol: every replicated row
//! passes through both, on every process.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use replication_proto::{Command, LineDecoder};

const RDATA: &str = r#"RDATA events event_persister1 6287863 ["ev",["$e1:example.com","!r:example.com","m.room.message",null,null,null,null,false,false]]"#;
const POSITION: &str = "POSITION events event_persister1 1200 1205";

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_rdata", |b| b.iter(|| Command::parse(black_box(RDATA))));
    group.bench_function("parse_position", |b| b.iter(|| Command::parse(black_box(POSITION))));
    let rdata = Command::parse(RDATA).expect("a valid line");
    group.bench_function("serialise_rdata", |b| b.iter(|| black_box(&rdata).to_line()));
    // Framing: one read of a buffer holding 100 lines.
    let mut buffer = String::new();
    for _ in 0..100 {
        buffer.push_str(RDATA);
        buffer.push('\n');
    }
    group.throughput(Throughput::Elements(100));
    group.bench_function("frame_and_parse_100_rdata", |b| {
        b.iter(|| {
            let mut decoder = LineDecoder::default();
            decoder.push(black_box(buffer.as_bytes()));
            let mut n = 0;
            while let Some(Ok(line)) = decoder.next_line() {
                n += usize::from(Command::parse(&line).is_ok());
            }
            n
        });
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
