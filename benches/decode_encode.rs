//! Decoding a recorded pgoutput stream into events and encoding them as JSON and
//! Protobuf: the connector's own per-change CPU cost, without any I/O.
//!
//! The stream is `tests/fixtures/pgoutput/v1_bench.txt`, recorded from a real
//! PostgreSQL 15 (2500 inserts and 500 updates of a 16-column Odoo-like
//! `sale_order_line` in 300 transactions; see scripts/record_pgoutput.sh).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use odoo_cdc::event::{EncodeOptions, encode_json};
use odoo_cdc::transaction::{Assembler, Output};

fn load() -> Vec<(odoo_cdc::lsn::Lsn, bytes::Bytes)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pgoutput/v1_bench.txt"
    ))
    .expect("fixture");
    odoo_cdc::pgoutput::parse_fixture(&text).expect("parse fixture")
}

/// Runs the stream through the assembler; calls `f` for each event.
fn drive(
    stream: &[(odoo_cdc::lsn::Lsn, bytes::Bytes)],
    mut f: impl FnMut(&odoo_cdc::event::ChangeEvent),
) -> usize {
    let mut asm = Assembler::new(64 << 20, None);
    let mut n = 0;
    for (lsn, body) in stream {
        asm.push_plain(*lsn, body).expect("push");
        while let Some(out) = asm.next().expect("next") {
            if let Output::Event(ev) = out {
                f(&ev);
                n += 1;
            }
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let stream = load();
    let changes = drive(&stream, |_| {});
    let bytes: usize = stream.iter().map(|(_, b)| b.len()).sum();
    let opts = EncodeOptions { db: "odoo".into() };

    let mut g = c.benchmark_group("changes");
    g.throughput(Throughput::Elements(changes as u64));
    g.bench_function("decode_only", |b| b.iter(|| drive(&stream, |_| {})));
    g.bench_function("decode_and_json", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            drive(&stream, |ev| {
                out.clear();
                encode_json(ev, &opts, &mut out).expect("encode");
            })
        })
    });
    g.bench_function("decode_and_protobuf", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            drive(&stream, |ev| {
                out.clear();
                odoo_cdc::protobuf::encode_event(ev, &opts, &mut out).expect("encode");
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("wal_bytes");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("decode_and_json", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            drive(&stream, |ev| {
                out.clear();
                encode_json(ev, &opts, &mut out).expect("encode");
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
