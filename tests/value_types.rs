//! The text → JSON mapping checked against a real PostgreSQL's own text output.
//!
//! `simple_query` returns every value in its text output form, which is exactly what pgoutput
//! sends (we never request binary), produced under the same session settings our replication
//! connections pin. Each value goes through `write_json` with the column's real type OID.
//!
//! Needs `ODOO_CDC_TEST_PG` (see `scripts/services.sh env`).

use odoo_cdc::value::{TypeKind, write_json};
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const SESSION: &str = "SET DateStyle=ISO; SET IntervalStyle=iso_8601; SET TimeZone=UTC; \
     SET extra_float_digits=3; SET bytea_output=hex; SET lc_monetary='C'";

fn pg_url() -> String {
    std::env::var("ODOO_CDC_TEST_PG").expect(
        "ODOO_CDC_TEST_PG is not set: run `eval \"$(scripts/services.sh env)\"` (after `scripts/services.sh up`)",
    )
}

async fn connect(config: &tokio_postgres::Config) -> Client {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection error: {e}");
        }
    });
    client
}

/// A database of its own, so tests can run in parallel; dropped at the end.
struct TestDb {
    admin: Client,
    name: String,
    client: Client,
}

impl TestDb {
    async fn new(tag: &str) -> TestDb {
        let base: tokio_postgres::Config =
            pg_url().parse().expect("ODOO_CDC_TEST_PG is a valid URL");
        let admin = connect(&base).await;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("odoo_cdc_{tag}_{}_{nanos}", std::process::id());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut cfg = base.clone();
        cfg.dbname(&name);
        let client = connect(&cfg).await;
        TestDb {
            admin,
            name,
            client,
        }
    }

    async fn drop(self) {
        drop(self.client);
        self.admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await
            .expect("drop test database");
    }
}

const DDL: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive_int AS int4 CHECK (VALUE > 0);
CREATE TABLE everything (
    id            int4 PRIMARY KEY,
    c_int2        int2,
    c_int4        int4,
    c_int8        int8,
    c_numeric     numeric,
    c_money       money,
    c_float4      float4,
    c_float8      float8,
    c_bool        bool,
    c_text        text,
    c_varchar     varchar(20),
    c_bpchar      bpchar(5),
    c_json        json,
    c_jsonb       jsonb,
    c_date        date,
    c_time        time,
    c_timetz      timetz,
    c_timestamp   timestamp,
    c_timestamptz timestamptz,
    c_interval    interval,
    c_uuid        uuid,
    c_bytea       bytea,
    c_int4_arr    int4[],
    c_text_arr    text[],
    c_numeric_arr numeric[],
    c_jsonb_arr   jsonb[],
    c_mood        mood,
    c_domain      positive_int,
    c_oid         oid,
    c_inet        inet,
    c_bool_arr    bool[],
    c_float8_arr  float8[],
    c_uuid_arr    uuid[],
    c_date_arr    date[],
    c_tstz_arr    timestamptz[],
    c_varchar_arr varchar[],
    c_int8_2d     int8[][]
);
INSERT INTO everything VALUES (
    1, 1, 42, 1234567890123, 1250.00, 1250, 1.1, 1e30, true,
    'héllo "wörld"', 'S00042', 'abcde',
    E'{"a": 1,\n "b": [true, null]}', '{"b": 2, "a": {"c": [1, 2.50]}}',
    '2026-11-21', '23:40:01.123456', '04:05:06.789-08', '2026-11-21 23:40:01.5',
    '2026-11-22 01:40:01.123456+02', '1 year 2 mons 3 days 04:05:06.7',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\xdeadbeef',
    '{1,2,3}', '{"a b",c}', '{1.50,NaN}', ARRAY['{"k": "v"}'::jsonb, '[1, 2]'],
    'happy', 5, 4294967295, '192.168.0.1/24',
    '{t,f,NULL}', '{0.1,-Infinity}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}',
    '{2026-11-21,infinity}', '{"2026-11-21 23:40:01+00"}', '{x,"y z"}', '{{1,2},{3,4}}'
);
INSERT INTO everything VALUES (
    2, -32768, -2147483648, 9223372036854775807, '-0.000123456789012345678901234567890', -3.5,
    'NaN', '-0', false,
    E'q"u\\ote\nnew\u0001line\ttab 日本 🦀', '', 'ab',
    '[1, "x\"y", {"k": null}]', '"just a string"',
    '0044-03-15 BC', '24:00:00', '00:00:00+14', 'infinity',
    '-infinity', '-1 day -1 sec',
    '00000000-0000-0000-0000-000000000000', '\x',
    '[0:2]={1,NULL,3}', '{"NULL",NULL,"a,b","q\"u","b\\s",""}', '{}', '{"{\"a\": [1, 2]}",NULL,"null"}',
    'sad', 1, 0, '::1',
    '{}', '{1e+308,-0,NaN,Infinity}', '{}',
    '{"0001-01-01 BC"}', '{"0044-03-15 12:00:00.5+00 BC",-infinity}', '{"NULL",NULL}', '[0:0][1:2]={{-1,NULL}}'
);
INSERT INTO everything VALUES (
    3, 0, 0, 0, '1e400', 0, '1e-45', '5e-324', NULL,
    NULL, NULL, NULL, NULL, '1e400',
    '5874897-12-31', '00:00:00', NULL, '294276-12-31 23:59:59.999999',
    '4713-11-24 00:00:00+00 BC', 'PT0S',
    NULL, '\x00ff', NULL, NULL, '{1e-20}', NULL,
    NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL
);
"#;

/// Rows of `everything` as JSON objects built by `write_json`, plus the raw JSON text of
/// each value for checks that must be byte-exact (number spelling).
async fn read_rows(client: &Client) -> Vec<(Value, Vec<(String, String)>)> {
    let oids: Vec<(String, u32)> = client
        .query(
            "SELECT attname::text, atttypid::oid FROM pg_attribute \
             WHERE attrelid = 'everything'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await
        .expect("read column types")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let messages = client
        .simple_query("SELECT * FROM everything ORDER BY id")
        .await
        .expect("select rows");
    let mut rows = Vec::new();
    for m in messages {
        let SimpleQueryMessage::Row(row) = m else {
            continue;
        };
        assert_eq!(row.len(), oids.len());
        let mut obj = serde_json::Map::new();
        let mut raw = Vec::new();
        for (i, (name, oid)) in oids.iter().enumerate() {
            let value = match row.get(i) {
                None => Value::Null,
                Some(text) => {
                    let kind = TypeKind::from_oid(*oid);
                    let mut out = Vec::new();
                    write_json(&kind, text.as_bytes(), &mut out)
                        .unwrap_or_else(|e| panic!("column {name} (oid {oid}) text {text:?}: {e}"));
                    let s = String::from_utf8(out).expect("UTF-8 output");
                    serde_json::from_str::<serde::de::IgnoredAny>(&s)
                        .unwrap_or_else(|e| panic!("column {name}: invalid JSON {s}: {e}"));
                    // serde_json's Value cannot hold numbers beyond f64 (jsonb's 1e400 is
                    // valid JSON); such values are compared through their raw text instead.
                    let v = serde_json::from_str(&s)
                        .unwrap_or_else(|_| Value::String(format!("unparsable:{s}")));
                    raw.push((name.clone(), s));
                    v
                }
            };
            obj.insert(name.clone(), value);
        }
        rows.push((Value::Object(obj), raw));
    }
    rows
}

fn raw<'a>(raw: &'a [(String, String)], col: &str) -> &'a str {
    &raw.iter()
        .find(|(n, _)| n == col)
        .unwrap_or_else(|| panic!("no column {col}"))
        .1
}

fn assert_row(actual: &Value, expected: Value) {
    let (Value::Object(a), Value::Object(e)) = (actual, &expected) else {
        unreachable!()
    };
    for (k, want) in e {
        assert_eq!(a.get(k), Some(want), "column {k}");
    }
    let uncovered: Vec<_> = a.keys().filter(|k| !e.contains_key(*k)).collect();
    assert!(
        uncovered.is_empty(),
        "columns without an expectation: {uncovered:?}"
    );
}

#[tokio::test]
async fn postgres_text_forms_map_to_the_documented_json() {
    let db = TestDb::new("value_types").await;
    db.client
        .batch_execute(DDL)
        .await
        .expect("create and fill the table");
    db.client
        .batch_execute(SESSION)
        .await
        .expect("session settings");
    let rows = read_rows(&db.client).await;
    assert_eq!(rows.len(), 3);

    let huge = format!("1{}", "0".repeat(400));
    assert_row(
        &rows[0].0,
        json!({
            "id": 1, "c_int2": 1, "c_int4": 42, "c_int8": 1234567890123i64,
            "c_numeric": "1250.00", "c_money": "$1,250.00",
            "c_float4": 1.1, "c_float8": 1e30, "c_bool": true,
            "c_text": "héllo \"wörld\"", "c_varchar": "S00042", "c_bpchar": "abcde",
            "c_json": {"a": 1, "b": [true, null]},
            "c_jsonb": {"a": {"c": [1, 2.50]}, "b": 2},
            "c_date": "2026-11-21", "c_time": "23:40:01.123456", "c_timetz": "04:05:06.789-08",
            "c_timestamp": "2026-11-21T23:40:01.5",
            "c_timestamptz": "2026-11-21T23:40:01.123456Z",
            "c_interval": "P1Y2M3DT4H5M6.7S",
            "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "c_bytea": "3q2+7w==",
            "c_int4_arr": [1, 2, 3], "c_text_arr": ["a b", "c"], "c_numeric_arr": ["1.50", "NaN"],
            "c_jsonb_arr": [{"k": "v"}, [1, 2]],
            "c_mood": "happy",
            // A domain arrives with its own OID: text form, documented.
            "c_domain": "5",
            "c_oid": 4294967295u32, "c_inet": "192.168.0.1/24",
            "c_bool_arr": [true, false, null], "c_float8_arr": [0.1, "-Infinity"],
            "c_uuid_arr": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
            "c_date_arr": ["2026-11-21", "infinity"], "c_tstz_arr": ["2026-11-21T23:40:01Z"],
            "c_varchar_arr": ["x", "y z"], "c_int8_2d": [[1, 2], [3, 4]],
        }),
    );
    // Exact spellings a Value comparison would hide.
    assert_eq!(raw(&rows[0].1, "c_float8"), "1e+30");
    assert_eq!(
        raw(&rows[0].1, "c_float4"),
        "1.1",
        "shortest exact float4, not 1.10000002"
    );
    assert_eq!(
        raw(&rows[0].1, "c_jsonb"),
        r#"{"a": {"c": [1, 2.50]}, "b": 2}"#
    );
    assert!(
        !raw(&rows[0].1, "c_json").contains('\n'),
        "json newlines become spaces"
    );

    assert_row(
        &rows[1].0,
        json!({
            "id": 2, "c_int2": -32768, "c_int4": -2147483648i64, "c_int8": 9223372036854775807i64,
            "c_numeric": "-0.000123456789012345678901234567890", "c_money": "-$3.50",
            "c_float4": "NaN", "c_float8": -0.0, "c_bool": false,
            "c_text": "q\"u\\ote\nnew\u{1}line\ttab 日本 🦀", "c_varchar": "", "c_bpchar": "ab   ",
            "c_json": [1, "x\"y", {"k": null}], "c_jsonb": "just a string",
            "c_date": "-0043-03-15", "c_time": "24:00:00", "c_timetz": "00:00:00+14",
            "c_timestamp": "infinity", "c_timestamptz": "-infinity", "c_interval": "P-1DT-1S",
            "c_uuid": "00000000-0000-0000-0000-000000000000", "c_bytea": "",
            "c_int4_arr": [1, null, 3],
            "c_text_arr": ["NULL", null, "a,b", "q\"u", "b\\s", ""],
            "c_numeric_arr": [],
            "c_jsonb_arr": [{"a": [1, 2]}, null, null],
            "c_mood": "sad", "c_domain": "1", "c_oid": 0, "c_inet": "::1",
            "c_bool_arr": [], "c_float8_arr": [1e308, -0.0, "NaN", "Infinity"], "c_uuid_arr": [],
            "c_date_arr": ["0000-01-01"], "c_tstz_arr": ["-0043-03-15T12:00:00.5Z", "-infinity"],
            "c_varchar_arr": ["NULL", null], "c_int8_2d": [[-1, null]],
        }),
    );
    assert_eq!(
        raw(&rows[1].1, "c_float8"),
        "-0",
        "negative zero keeps its sign"
    );
    assert_eq!(
        raw(&rows[1].1, "c_float8_arr"),
        r#"[1e+308,-0,"NaN","Infinity"]"#
    );
    // A jsonb 'null' element is JSON null, distinct from SQL NULL only in the source: both
    // are null in JSON, which is the documented mapping.
    assert_eq!(
        raw(&rows[1].1, "c_jsonb_arr"),
        r#"[{"a": [1, 2]},null,null]"#
    );

    assert_row(
        &rows[2].0,
        json!({
            "id": 3, "c_int2": 0, "c_int4": 0, "c_int8": 0,
            "c_numeric": huge, "c_money": "$0.00", "c_float4": serde_json::from_str::<Value>("1e-45").unwrap(), "c_float8": 5e-324,
            "c_bool": null, "c_text": null, "c_varchar": null, "c_bpchar": null, "c_json": null,
            "c_jsonb": format!("unparsable:{huge}"),
            "c_date": "5874897-12-31", "c_time": "00:00:00", "c_timetz": null,
            "c_timestamp": "294276-12-31T23:59:59.999999",
            "c_timestamptz": "-4712-11-24T00:00:00Z", "c_interval": "PT0S",
            "c_uuid": null, "c_bytea": "AP8=", "c_int4_arr": null, "c_text_arr": null,
            "c_numeric_arr": ["0.00000000000000000001"], "c_jsonb_arr": null,
            "c_mood": null, "c_domain": null, "c_oid": null, "c_inet": null,
            "c_bool_arr": null, "c_float8_arr": null, "c_uuid_arr": null, "c_date_arr": null,
            "c_tstz_arr": null, "c_varchar_arr": null, "c_int8_2d": null,
        }),
    );
    assert_eq!(raw(&rows[2].1, "c_float4"), "1e-45");
    assert_eq!(
        raw(&rows[2].1, "c_jsonb"),
        huge,
        "jsonb numbers are embedded digit for digit"
    );

    // The same rows read by a session in another time zone: Postgres prints local times with
    // offsets (+05:30, and LMT +05:21:10 before 1900s standardisation); we must land on the
    // same UTC instants.
    for zone in ["Asia/Kolkata", "America/St_Johns", "Pacific/Kiritimati"] {
        db.client
            .batch_execute(&format!("SET TimeZone='{zone}'"))
            .await
            .expect("set time zone");
        let shifted = read_rows(&db.client).await;
        for (a, b) in rows.iter().zip(&shifted) {
            assert_eq!(a.0["c_timestamptz"], b.0["c_timestamptz"], "zone {zone}");
            assert_eq!(a.0["c_tstz_arr"], b.0["c_tstz_arr"], "zone {zone}");
        }
    }
    db.drop().await;
}

#[tokio::test]
async fn timestamptz_conversion_matches_postgres_across_history() {
    // Postgres itself renders a spread of instants in UTC and in zones with odd historical
    // offsets; converting the local rendering must give Postgres' UTC rendering.
    let db = TestDb::new("value_tz").await;
    db.client
        .batch_execute(SESSION)
        .await
        .expect("session settings");
    let query = "SELECT (TIMESTAMPTZ '1850-01-01 00:00:00+00' + n * INTERVAL '7919 hours 13 min 17.25 sec')::text \
                 FROM generate_series(0, 400) n";
    let collect = |msgs: Vec<SimpleQueryMessage>| -> Vec<String> {
        msgs.into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect()
    };
    let utc = collect(db.client.simple_query(query).await.expect("utc rows"));
    assert_eq!(utc.len(), 401);
    let to_json = |t: &str| {
        let mut out = Vec::new();
        write_json(&TypeKind::TimestampTz, t.as_bytes(), &mut out)
            .unwrap_or_else(|e| panic!("{t}: {e}"));
        String::from_utf8(out).unwrap()
    };
    for zone in [
        "Europe/Amsterdam",
        "Asia/Kathmandu",
        "America/Caracas",
        "Australia/Lord_Howe",
    ] {
        db.client
            .batch_execute(&format!("SET TimeZone='{zone}'"))
            .await
            .expect("set time zone");
        let local = collect(db.client.simple_query(query).await.expect("local rows"));
        for (u, l) in utc.iter().zip(&local) {
            assert_eq!(to_json(l), to_json(u), "{zone}: {l} vs {u}");
        }
    }
    db.drop().await;
}
