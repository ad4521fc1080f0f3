//! Partitioned streams (a *super stream*): `N` partition streams
//! `<stream>-0` ... `<stream>-<N-1>` behind one name, for consumers that
//! scale out by reading partitions in parallel (`--stream-partitions N`).
//!
//! **Which partition.** A row change goes to partition
//! `murmur3_x86_32(x-partition-key, seed 104729) mod N`, where
//! `x-partition-key` is the application property `routing.rs` builds:
//! `<schema>.<table>` followed by `/<value>` for each key column, the value
//! in PostgreSQL's text output (`public.sale_order/42`). The hash and seed
//! are the ones RabbitMQ's stream clients use for their hash routing strategy
//! (Java, .NET, Go, Rust, Python: MurmurHash3 x86_32, seed 104729, unsigned
//! remainder), so a consumer or another producer can compute a key's
//! partition with its client library, and the function never changes with
//! our version or platform. Every event of one row therefore lands in one
//! partition, in WAL order. A truncate goes to every partition (it empties
//! rows of all of them); logical messages and dead letters, which name no
//! row, go to partition 0. See docs/streams.md, "Partitions".
//!
//! **Topology.** The same as `rabbitmq-streams add_super_stream` makes
//! (3.11+), built so that it also works on 3.10, which has neither that
//! command nor a stream-protocol command for it: the partition streams with
//! the stream protocol's `Create`, and over AMQP 0-9-1 a durable direct
//! exchange `<stream>` (argument `x-super-stream = true`) with partition `i`
//! bound under routing key `i` and the binding argument
//! `x-stream-partition-order = i`, which is how 3.11+ brokers list a super
//! stream's partitions.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::{AMQPAuthority, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use super::super::{HeaderValue, OutgoingMessage, PARTITION_KEY};
use super::wire::Endpoint;

/// At most this many partitions: each takes two producer ids (one byte each)
/// on the sink's connection.
pub const MAX_PARTITIONS: u16 = 128;

/// The seed RabbitMQ's stream clients give MurmurHash3 for hash routing.
pub const HASH_SEED: u32 = 104_729;

/// MurmurHash3 x86_32 of `data`.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mix = |k: u32| k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        h ^= mix(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let k = tail
            .iter()
            .rev()
            .fold(0u32, |k, &byte| (k << 8) | u32::from(byte));
        h ^= mix(k);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The partition of a partition key among `partitions` (at least 1).
pub fn partition_of(key: &str, partitions: usize) -> usize {
    (murmur3_32(key.as_bytes(), HASH_SEED) % partitions.max(1) as u32) as usize
}

/// The name of partition `i` of super stream `name` (also the producer name
/// of partition `i` when `name` is the producer's).
pub fn partition_name(name: &str, i: usize) -> String {
    format!("{name}-{i}")
}

/// Where one message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    One(usize),
    /// Every partition (a truncate).
    All,
}

/// A message's partition: by its `x-partition-key`; a truncate to all of
/// them; anything else (logical messages, dead letters) to partition 0.
pub fn target(msg: &OutgoingMessage, partitions: usize) -> Target {
    match msg.headers.get(PARTITION_KEY) {
        Some(HeaderValue::Str(key)) => Target::One(partition_of(key, partitions)),
        _ if matches!(msg.headers.get("x-op"), Some(HeaderValue::Str(op)) if op == "t") => {
            Target::All
        }
        _ => Target::One(0),
    }
}

/// The AMQP 0-9-1 endpoint of the broker behind a stream URL: same host,
/// credentials and vhost, port 5672 (amqps on 5671 behind a TLS stream URL).
pub fn amqp_uri_for(ep: &Endpoint) -> AMQPUri {
    // A TLS stream URL means a broker reached over TLS: amqps on its port.
    let (scheme, port) = match ep.tls {
        Some(_) => (AMQPScheme::AMQPS, 5671),
        None => (AMQPScheme::AMQP, 5672),
    };
    AMQPUri {
        scheme,
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: ep.user.clone(),
                password: ep.password.clone(),
            },
            host: ep.host.clone(),
            port,
        },
        vhost: ep.vhost.clone(),
        query: Default::default(),
    }
}

/// Where to say an AMQP endpoint is, without its password.
pub fn describe(uri: &AMQPUri) -> String {
    let scheme = match uri.scheme {
        AMQPScheme::AMQP => "amqp",
        AMQPScheme::AMQPS => "amqps",
    };
    let a = &uri.authority;
    format!("{scheme}://{}@{}:{}", a.userinfo.username, a.host, a.port)
}

async fn step<T, E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Err(_) => Err(format!("{what}: no answer within {timeout:?}")),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Ok(Ok(v)) => Ok(v),
    }
}

async fn open(uri: &AMQPUri, timeout: Duration) -> Result<(Connection, lapin::Channel), String> {
    let at = describe(uri);
    let props = ConnectionProperties::default().with_connection_name("odoo-cdc topology".into());
    let conn = step(
        &format!("connecting over AMQP to {at}"),
        timeout,
        Connection::connect_uri(uri.clone(), props),
    )
    .await?;
    let channel = step("opening a channel", timeout, conn.create_channel()).await?;
    Ok((conn, channel))
}

/// Declares the super stream's exchange `name` and binds partition `i`
/// (`<name>-i`, which must exist) under routing key `i`. Idempotent.
pub async fn declare_exchange(
    uri: &AMQPUri,
    name: &str,
    partitions: usize,
    timeout: Duration,
) -> Result<(), String> {
    let (conn, channel) = open(uri, timeout).await?;
    let mut args = FieldTable::default();
    args.insert("x-super-stream".into(), AMQPValue::Boolean(true));
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    step(
        &format!("declaring the super stream's exchange {name:?}"),
        timeout,
        channel.exchange_declare(name.into(), ExchangeKind::Direct, options, args),
    )
    .await?;
    for i in 0..partitions {
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-partition-order".into(),
            AMQPValue::LongInt(i as i32),
        );
        step(
            &format!("binding partition {i} to exchange {name:?}"),
            timeout,
            channel.queue_bind(
                partition_name(name, i).into(),
                name.into(),
                i.to_string().into(),
                QueueBindOptions::default(),
                args,
            ),
        )
        .await?;
    }
    let _ = tokio::time::timeout(timeout, conn.close(200, "topology declared".into())).await;
    Ok(())
}

/// Whether exchange `name` exists (a passive declare; the broker closes the
/// channel with 404 when it does not).
pub async fn exchange_exists(uri: &AMQPUri, name: &str, timeout: Duration) -> Result<bool, String> {
    let (conn, channel) = open(uri, timeout).await?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let r = tokio::time::timeout(
        timeout,
        channel.exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            options,
            FieldTable::default(),
        ),
    )
    .await;
    let _ = tokio::time::timeout(timeout, conn.close(200, "check done".into())).await;
    match r {
        Err(_) => Err(format!(
            "checking exchange {name:?}: no answer within {timeout:?}"
        )),
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) if e.to_string().contains("NOT_FOUND") => Ok(false),
        Ok(Err(e)) => Err(format!("checking exchange {name:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_the_reference_vectors() {
        // MurmurHash3_x86_32 test vectors (SMHasher's reference implementation).
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3_32(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_eq!(murmur3_32(b"a", 0x9747_b28c), 0x7fa0_9ea6);
        assert_eq!(murmur3_32(b"abc", 0x9747_b28c), 0xc84a_62dd);
        assert_eq!(murmur3_32(b"aaaa", 0x9747_b28c), 0x5a97_808a);
        assert_eq!(murmur3_32(b"Hello, world!", 0x9747_b28c), 0x2488_4cba);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = [0usize; 4];
        for id in 1..=4000 {
            counts[partition_of(&format!("public.sale_order/{id}"), 4)] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
        // The example in docs/streams.md.
        assert_eq!(
            murmur3_32(b"public.sale_order/43", HASH_SEED),
            3_124_290_299
        );
        assert_eq!(partition_of("public.sale_order/43", 4), 3);
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_name("odoo.cdc", 3), "odoo.cdc-3");
    }

    #[test]
    fn messages_find_their_partition() {
        let msg = |headers: &[(&str, &str)]| OutgoingMessage {
            routing_key: "k".into(),
            body: bytes::Bytes::new(),
            message_id: "0000000000000000-00000000".into(),
            content_type: "application/json",
            timestamp: 0,
            kind: "k".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), HeaderValue::Str(v.to_string())))
                .collect(),
        };
        let key = "public.sale_order/42";
        assert_eq!(
            target(&msg(&[(PARTITION_KEY, key), ("x-op", "u")]), 7),
            Target::One(partition_of(key, 7))
        );
        assert_eq!(target(&msg(&[("x-op", "t")]), 7), Target::All);
        assert_eq!(target(&msg(&[("x-op", "m")]), 7), Target::One(0));
        assert_eq!(target(&msg(&[]), 7), Target::One(0));
    }
}
