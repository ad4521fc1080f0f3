//! Decoding speed of the pgoutput decoder on streams recorded from a real
//! PostgreSQL 15 server (tests/fixtures/pgoutput, made by
//! scripts/record_pgoutput.sh).
//!
//! `v1_bench`: 2,500 Odoo-like sale_order_line inserts in 10-row transactions
//! and 500 updates (protocol v1, text values). `v2_stream`: large transactions
//! streamed in blocks (protocol v2). Each iteration decodes the whole stream in
//! order, keeping the decode context as a consumer would. One group reports
//! bytes/s, the other messages/s.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use odoo_cdc::pgoutput::{DecodeContext, Message, decode, parse_fixture};

const FIXTURES: [&str; 2] = ["v1_bench", "v2_stream"];

fn load(name: &str) -> Vec<Bytes> {
    let path = format!(
        "{}/tests/fixtures/pgoutput/{name}.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let bodies: Vec<Bytes> = parse_fixture(&text)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    // Fail before measuring if the fixture does not decode.
    decode_all(&bodies);
    bodies
}

/// Decodes every message in order; returns the number of tuple columns seen so
/// the work cannot be optimised away.
fn decode_all(bodies: &[Bytes]) -> usize {
    let mut ctx = DecodeContext::default();
    let mut columns = 0;
    for body in bodies {
        let msg = match decode(body, ctx) {
            Ok(m) => m,
            Err(e) => panic!("fixture does not decode: {e}"),
        };
        ctx.observe(&msg);
        if let Message::Insert { new, .. } | Message::Update { new, .. } = &msg {
            columns += new.columns.len();
        }
        black_box(&msg);
    }
    columns
}

fn bench(c: &mut Criterion) {
    let fixtures: Vec<(&str, Vec<Bytes>)> = FIXTURES.iter().map(|n| (*n, load(n))).collect();

    let mut group = c.benchmark_group("pgoutput_decode_bytes");
    for (name, bodies) in &fixtures {
        let bytes: usize = bodies.iter().map(Bytes::len).sum();
        eprintln!("{name}: {} messages, {bytes} bytes", bodies.len());
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(*name, |b| b.iter(|| decode_all(black_box(bodies))));
    }
    group.finish();

    let mut group = c.benchmark_group("pgoutput_decode_messages");
    for (name, bodies) in &fixtures {
        group.throughput(Throughput::Elements(bodies.len() as u64));
        group.bench_function(*name, |b| b.iter(|| decode_all(black_box(bodies))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
