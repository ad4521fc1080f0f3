//! Throughput of `write_json` on an Odoo-like row mix, and of our JSON checker against
//! serde_json's validation (the alternative the design allowed).
//!
//! `cargo bench --bench value_json`; criterion reports elements/s = values/s (or rows/s).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use odoo_cdc::value::{TypeKind, write_json};

/// One `sale_order`-like row as pgoutput sends it: (type OID, text form).
const ROW: &[(u32, &str)] = &[
    (23, "42"),                              // id
    (1043, "S00042"),                        // name
    (1043, "sale"),                          // state
    (23, "7"),                               // partner_id
    (1700, "1250.00"),                       // amount_total
    (1700, "206.61"),                        // amount_tax
    (1184, "2026-11-21 23:40:01.123456+00"), // date_order
    (1114, "2026-11-21 23:40:01.654321"),    // write_date
    (16, "t"),                               // active
    (
        3802,
        r#"{"en_US": "Office chair, black", "fr_FR": "Chaise de bureau, noire"}"#,
    ), // translated name
    (
        25,
        "Deliver to the \"back\" door\nbefore 10:00, ask for Zoë",
    ), // note
    (20, "1234567890123"),                   // int8 counter
];

fn bench(c: &mut Criterion) {
    let row: Vec<(TypeKind, &[u8])> = ROW
        .iter()
        .map(|&(oid, text)| (TypeKind::from_oid(oid), text.as_bytes()))
        .collect();
    let mut out = Vec::with_capacity(4096);

    let mut g = c.benchmark_group("write_json");
    g.throughput(Throughput::Elements(row.len() as u64));
    g.bench_function("odoo_row_values", |b| {
        b.iter(|| {
            out.clear();
            for (kind, text) in &row {
                write_json(kind, black_box(text), &mut out).unwrap();
                out.push(b',');
            }
            black_box(&out);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("per_kind");
    g.throughput(Throughput::Elements(1));
    for (label, oid, text) in [
        ("int4", 23, "123456"),
        ("numeric", 1700, "1250.00"),
        ("text", 25, "Office chair, black"),
        ("timestamptz", 1184, "2026-11-21 23:40:01.123456+00"),
        (
            "jsonb",
            3802,
            r#"{"en_US": "Office chair, black", "fr_FR": "Chaise de bureau, noire"}"#,
        ),
        ("int4[]", 1007, "{1,2,3,4,5,6,7,8}"),
    ] {
        let kind = TypeKind::from_oid(oid);
        g.bench_function(label, |b| {
            b.iter(|| {
                out.clear();
                write_json(&kind, black_box(text.as_bytes()), &mut out).unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();

    // The design allowed serde_json validation; this is what choosing our checker buys.
    let doc = r#"{"en_US": "Office chair, black", "fr_FR": "Chaise de bureau, noire", "tags": [1, 2, 3], "meta": {"x": null, "y": true, "z": -1.5e3}}"#;
    let mut g = c.benchmark_group("json_validation");
    g.throughput(Throughput::Bytes(doc.len() as u64));
    g.bench_function("ours_write_json", |b| {
        let kind = TypeKind::Json;
        b.iter(|| {
            out.clear();
            write_json(&kind, black_box(doc.as_bytes()), &mut out).unwrap();
            black_box(&out);
        })
    });
    g.bench_function("serde_json_ignored_any", |b| {
        b.iter(|| {
            out.clear();
            let s = std::str::from_utf8(black_box(doc.as_bytes())).unwrap();
            serde_json::from_str::<serde::de::IgnoredAny>(s).unwrap();
            out.extend_from_slice(s.as_bytes());
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
