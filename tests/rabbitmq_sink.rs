//! The RabbitMQ sink against the real broker at `$ODOO_CDC_TEST_AMQP`
//! (`eval "$(scripts/services.sh env)"`). Each test uses its own exchange,
//! queue and connection name, so tests run in parallel, and deletes them at
//! the end.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicQosOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use odoo_cdc::sink::rabbitmq::{QueueSpec, QueueType, RabbitConfig, RabbitSink, UnroutablePolicy};
use odoo_cdc::sink::{Confirm, ConfirmFuture, HeaderValue, OutgoingMessage, Sink, SinkError};
use tokio::time::timeout;

/// Generous bound for anything a healthy local broker answers in milliseconds;
/// hitting it means a hang, which is what these tests must catch.
const BOUND: Duration = Duration::from_secs(20);

/// The test broker: `ODOO_CDC_TEST_AMQP`, else the address `scripts/services.sh` uses,
/// like every other integration test.
fn amqp_url() -> String {
    std::env::var("ODOO_CDC_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "odoo-cdc-test-{what}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn config(exchange: &str) -> RabbitConfig {
    let mut cfg = RabbitConfig::new(amqp_url()).expect("ODOO_CDC_TEST_AMQP is a valid AMQP URL");
    cfg.exchange = exchange.to_owned();
    cfg.connection_name = unique("conn");
    cfg.connect_timeout = Duration::from_secs(10);
    cfg
}

fn message(i: u32, routing_key: &str) -> OutgoingMessage {
    let mut headers = BTreeMap::new();
    headers.insert(
        "x-lsn".to_owned(),
        HeaderValue::Str(format!("0/{:X}", 0x16B_3748 + i)),
    );
    headers.insert(
        "x-commit-lsn".to_owned(),
        HeaderValue::Str("0/16B37A0".to_owned()),
    );
    headers.insert("x-xid".to_owned(), HeaderValue::Int(745 + i64::from(i)));
    headers.insert(
        "x-table".to_owned(),
        HeaderValue::Str("public.sale_order".to_owned()),
    );
    headers.insert("x-op".to_owned(), HeaderValue::Str("c".to_owned()));
    headers.insert(
        "x-snapshot".to_owned(),
        HeaderValue::Bool(i.is_multiple_of(2)),
    );
    OutgoingMessage {
        routing_key: routing_key.to_owned(),
        body: Bytes::from(format!(r#"{{"op":"c","key":{{"id":{i}}}}}"#)),
        message_id: format!("00000000016B37A0-{i:08}"),
        content_type: "application/json",
        timestamp: 1_790_000_000 + u64::from(i),
        kind: "sale.order.create".to_owned(),
        headers,
    }
}

async fn publish(sink: &mut RabbitSink, msg: OutgoingMessage) -> Result<ConfirmFuture, SinkError> {
    match timeout(BOUND, sink.publish(msg))
        .await
        .expect("publish hung")?
    {
        Confirm::Pending(f) => Ok(f),
        Confirm::OnFlush => panic!("the RabbitMQ sink must hand back a broker confirm"),
    }
}

/// Awaits confirms concurrently, as the pipeline does, in completion order.
async fn settle(confirms: Vec<ConfirmFuture>) -> Vec<Result<(), SinkError>> {
    let all: FuturesUnordered<ConfirmFuture> = confirms.into_iter().collect();
    timeout(BOUND, all.collect::<Vec<_>>())
        .await
        .expect("confirms did not resolve: the sink hung")
}

/// A separate plain lapin connection to inspect and clean up.
async fn admin() -> (Connection, Channel) {
    let conn = timeout(
        BOUND,
        Connection::connect(&amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("admin connect hung")
    .expect("admin connect");
    let channel = timeout(BOUND, conn.create_channel())
        .await
        .expect("admin channel hung")
        .expect("admin channel");
    (conn, channel)
}

async fn cleanup(channel: &Channel, exchange: &str, queue: Option<&str>) {
    if let Some(q) = queue {
        timeout(
            BOUND,
            channel.queue_delete(q.into(), QueueDeleteOptions::default()),
        )
        .await
        .expect("queue.delete hung")
        .expect("queue.delete");
    }
    timeout(
        BOUND,
        channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()),
    )
    .await
    .expect("exchange.delete hung")
    .expect("exchange.delete");
}

/// Deletes a test's exchange and queue if the test panics before its own
/// cleanup, so failed runs leave nothing on the shared broker.
struct Leftovers {
    exchange: String,
    queue: Option<String>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Some(q) = &self.queue {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_queue", "-q", q])
                .output();
        }
        let erl = format!(
            "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"{}\">>), false, <<\"test\">>).",
            self.exchange
        );
        let _ = Command::new("rabbitmqctl").args(["eval", &erl]).output();
    }
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be on PATH for this test");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_with_all_properties_and_every_confirm_is_ok() {
    let exchange = unique("ex");
    let queue = unique("q");
    let _leftovers = Leftovers {
        exchange: exchange.clone(),
        queue: Some(queue.clone()),
    };
    let mut cfg = config(&exchange);
    cfg.queue = Some(QueueSpec {
        name: queue.clone(),
        queue_type: QueueType::Classic,
        binding_keys: vec!["odoo.public.#".to_owned()],
    });
    let mut sink = RabbitSink::connect(cfg).await.expect("connect");

    const N: u32 = 200;
    let keys = [
        "odoo.public.sale_order.insert",
        "odoo.public.sale_order_line.update",
        "odoo.public.res_partner.delete",
    ];
    let mut confirms = Vec::new();
    for i in 0..N {
        let key = keys[i as usize % keys.len()];
        confirms.push(publish(&mut sink, message(i, key)).await.expect("publish"));
    }
    for outcome in settle(confirms).await {
        outcome.expect("every bound message is confirmed");
    }
    assert!(
        !sink.is_blocked(),
        "a healthy local broker does not block us"
    );
    let stats = sink.stats();
    assert_eq!(stats.published, u64::from(N));
    assert_eq!(stats.confirmed, u64::from(N));
    assert_eq!(
        (stats.nacked, stats.returned, stats.timed_out, stats.failed),
        (0, 0, 0, 0)
    );

    let (_conn, ch) = admin().await;
    for i in 0..N {
        let got = timeout(
            BOUND,
            ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get hung")
        .expect("basic.get")
        .unwrap_or_else(|| panic!("queue holds only {i} of {N} messages"));
        let expected = message(i, keys[i as usize % keys.len()]);
        let d = &got.delivery;
        assert_eq!(d.exchange.as_str(), exchange);
        assert_eq!(d.routing_key.as_str(), expected.routing_key);
        assert_eq!(d.data, expected.body.to_vec());
        let p = &d.properties;
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some(expected.message_id.as_str())
        );
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.timestamp(), Some(expected.timestamp));
        assert_eq!(
            p.kind().as_ref().map(|s| s.as_str()),
            Some("sale.order.create")
        );
        let headers = p.headers().as_ref().expect("headers present").inner();
        assert_eq!(headers.len(), expected.headers.len());
        for (name, value) in &expected.headers {
            let got = headers
                .get(name.as_str())
                .unwrap_or_else(|| panic!("header {name} missing"));
            match (value, got) {
                (HeaderValue::Str(s), AMQPValue::LongString(v)) => {
                    assert_eq!(v.as_bytes(), s.as_bytes())
                }
                (HeaderValue::Int(n), AMQPValue::LongLongInt(v)) => assert_eq!(v, n),
                (HeaderValue::Bool(b), AMQPValue::Boolean(v)) => assert_eq!(v, b),
                (want, got) => panic!("header {name}: sent {want:?}, broker delivered {got:?}"),
            }
        }
    }
    let extra = timeout(
        BOUND,
        ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get hung")
    .expect("basic.get");
    assert!(extra.is_none(), "more messages than published");

    sink.close().await.expect("close");
    cleanup(&ch, &exchange, Some(&queue)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_fail_the_confirm_by_default() {
    let exchange = unique("ex");
    let _leftovers = Leftovers {
        exchange: exchange.clone(),
        queue: None,
    };
    let mut sink = RabbitSink::connect(config(&exchange))
        .await
        .expect("connect");
    let keys: Vec<String> = (0..5).map(|i| format!("odoo.public.t{i}.insert")).collect();
    let mut confirms = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        confirms.push(
            publish(&mut sink, message(i as u32, key))
                .await
                .expect("publish"),
        );
    }
    let mut reported = Vec::new();
    for outcome in settle(confirms).await {
        match outcome {
            Err(SinkError::Unroutable {
                exchange: ex,
                routing_key,
                message_id,
            }) => {
                assert_eq!(ex, exchange);
                assert!(message_id.starts_with("00000000016B37A0-"), "{message_id}");
                reported.push(routing_key);
            }
            other => panic!("expected Unroutable, got {other:?}"),
        }
    }
    reported.sort();
    assert_eq!(
        reported, keys,
        "each returned message is named by its routing key"
    );
    let stats = sink.stats();
    assert_eq!(
        (stats.returned, stats.confirmed, stats.dropped_unroutable),
        (5, 0, 0)
    );

    let err = SinkError::Unroutable {
        message_id: "m".into(),
        exchange: exchange.clone(),
        routing_key: keys[0].clone(),
    };
    assert!(err.to_string().contains(&keys[0]));

    sink.close().await.expect("close");
    let (_conn, ch) = admin().await;
    cleanup(&ch, &exchange, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_are_counted_and_dropped_on_request() {
    let exchange = unique("ex");
    let _leftovers = Leftovers {
        exchange: exchange.clone(),
        queue: None,
    };
    let mut cfg = config(&exchange);
    cfg.unroutable = UnroutablePolicy::Drop;
    let mut sink = RabbitSink::connect(cfg).await.expect("connect");
    const N: u32 = 7;
    let mut confirms = Vec::new();
    for i in 0..N {
        confirms.push(
            publish(&mut sink, message(i, "odoo.public.nobody_listens.update"))
                .await
                .expect("publish"),
        );
    }
    for outcome in settle(confirms).await {
        outcome.expect("a dropped unroutable message is not an error under the drop policy");
    }
    let stats = sink.stats();
    assert_eq!(stats.dropped_unroutable, u64::from(N));
    assert_eq!(stats.returned, u64::from(N));
    assert_eq!(
        stats.confirmed, 0,
        "a returned message is never counted as delivered"
    );

    sink.close().await.expect("close");
    let (_conn, ch) = admin().await;
    cleanup(&ch, &exchange, None).await;
}

/// Declares a queue of `queue_type` through the sink, publishes to it and
/// checks the broker made a queue of that type holding every message.
async fn queue_type_receives_messages(queue_type: QueueType) {
    let exchange = unique("ex");
    let queue = unique(queue_type.as_str());
    let _leftovers = Leftovers {
        exchange: exchange.clone(),
        queue: Some(queue.clone()),
    };
    let mut cfg = config(&exchange);
    let mut spec = QueueSpec::new(queue.clone());
    spec.queue_type = queue_type;
    cfg.queue = Some(spec);
    let mut sink = RabbitSink::connect(cfg).await.expect("connect");
    const N: u32 = 25;
    let mut confirms = Vec::new();
    for i in 0..N {
        confirms.push(
            publish(&mut sink, message(i, "odoo.public.stock_move.insert"))
                .await
                .expect("publish"),
        );
    }
    for outcome in settle(confirms).await {
        outcome.expect("confirm");
    }
    sink.close().await.expect("close");

    let listing = rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "type",
        "durable",
    ]);
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue.as_str()))
        .unwrap_or_else(|| panic!("queue {queue} not listed:\n{listing}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1], queue_type.as_str(), "{line}");
    assert_eq!(cols[2], "true", "queue must be durable: {line}");

    let (_conn, ch) = admin().await;
    let received = if queue_type == QueueType::Stream {
        // A stream is a log, not a queue to drain: read it from its first offset.
        timeout(BOUND, ch.basic_qos(100, BasicQosOptions::default()))
            .await
            .expect("qos hung")
            .expect("qos");
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        let mut consumer = timeout(
            BOUND,
            ch.basic_consume(
                queue.as_str().into(),
                "odoo-cdc-test".into(),
                BasicConsumeOptions::default(),
                args,
            ),
        )
        .await
        .expect("consume hung")
        .expect("consume");
        let mut ids = Vec::new();
        while ids.len() < N as usize {
            let delivery = timeout(BOUND, consumer.next())
                .await
                .expect("stream delivery hung")
                .expect("consumer ended")
                .expect("delivery");
            ids.push(
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            );
            timeout(BOUND, delivery.ack(Default::default()))
                .await
                .expect("ack hung")
                .expect("ack");
        }
        let expected: Vec<String> = (0..N).map(|i| message(i, "").message_id).collect();
        assert_eq!(ids, expected, "the stream holds every message in order");
        ids.len() as u32
    } else {
        timeout(
            BOUND,
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("passive declare hung")
        .expect("passive declare")
        .message_count()
    };
    assert_eq!(received, N);

    // The consumer (stream case) must go before the queue can be deleted cleanly.
    let (_conn2, ch2) = admin().await;
    drop(ch);
    cleanup(&ch2, &exchange, Some(&queue)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queue_is_declared_bound_and_receives() {
    queue_type_receives_messages(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_is_declared_bound_and_receives() {
    queue_type_receives_messages(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_queue_is_declared_bound_and_receives() {
    queue_type_receives_messages(QueueType::Stream).await;
}

/// The broker's Erlang pid of the connection whose client properties carry
/// `connection_name`.
fn connection_pid(connection_name: &str) -> Option<String> {
    // The table format prints pids as close_connection expects them
    // (`<rabbit@host.1.840.0>`); the JSON one does not.
    let table = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    table
        .lines()
        .find(|line| line.contains(connection_name))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_owned)
}

/// `rabbitmqctl close_connection` on this sink's connection only:
/// `close_all_connections` would also kill the connections of tests running
/// in parallel (and of other people's work on the same broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_the_connection_fails_publishes_and_confirms_without_hanging() {
    let exchange = unique("ex");
    let queue = unique("q");
    let _leftovers = Leftovers {
        exchange: exchange.clone(),
        queue: Some(queue.clone()),
    };
    let mut cfg = config(&exchange);
    let connection_name = cfg.connection_name.clone();
    cfg.queue = Some(QueueSpec::new(queue.clone()));
    // Longer than BOUND: a confirm that only ends by timing out fails the test.
    cfg.confirm_timeout = Duration::from_secs(60);
    let mut sink = RabbitSink::connect(cfg).await.expect("connect");

    // A healthy start, so the failure below is the close and nothing else.
    let warmup = vec![
        publish(&mut sink, message(0, "odoo.x"))
            .await
            .expect("publish"),
    ];
    settle(warmup)
        .await
        .remove(0)
        .expect("confirm before the close");

    let pid = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + BOUND;
        loop {
            if let Some(pid) = connection_pid(&connection_name) {
                return pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sink connection not listed"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .expect("lookup task");

    // Publish like the pipeline, with a window of 1000 unconfirmed messages,
    // while the broker closes the connection under us.
    let closer =
        tokio::task::spawn_blocking(move || rabbitmqctl(&["close_connection", &pid, "test"]));
    let mut window = FuturesUnordered::new();
    let mut outcomes = Vec::new();
    let mut sent = 1u32;
    let publish_error = timeout(BOUND, async {
        loop {
            while window.len() >= 1000 {
                if let Some(outcome) = window.next().await {
                    outcomes.push(outcome);
                }
            }
            let msg = message(sent, "odoo.x");
            let id = msg.message_id.clone();
            match publish(&mut sink, msg).await {
                Ok(confirm) => window.push(async move { (id, confirm.await) }),
                Err(e) => return e,
            }
            sent += 1;
        }
    })
    .await
    .expect("publish kept succeeding after the broker closed the connection");
    closer.await.expect("close task");
    assert!(
        matches!(publish_error, SinkError::Closed(_)),
        "expected Closed, got {publish_error:?}"
    );
    outcomes.extend(
        timeout(BOUND, window.collect::<Vec<_>>())
            .await
            .expect("confirms did not resolve after the close: the sink hung"),
    );

    let mut confirmed = std::collections::HashSet::new();
    let mut closed = 0;
    for (id, outcome) in outcomes {
        match outcome {
            Ok(()) => {
                confirmed.insert(id);
            }
            Err(SinkError::Closed(_)) => closed += 1,
            Err(other) => panic!("in-flight confirm: expected Ok or Closed, got {other:?}"),
        }
    }
    println!(
        "{sent} published; {} confirmed, {closed} pending at the close failed as Closed; publish: {publish_error}",
        confirmed.len()
    );

    // And the sink stays failed: the next publish is refused at once.
    let again = publish(&mut sink, message(sent, "odoo.x")).await;
    assert!(
        matches!(again, Err(SinkError::Closed(_))),
        "{:?}",
        again.err()
    );
    let stats = sink.stats();
    assert_eq!(stats.timed_out, 0, "no confirm may end by timing out");
    assert!(stats.failed >= closed as u64);

    // The delivery contract: every Ok confirm is a message the queue holds
    // (unconfirmed ones may be there too; replay makes them duplicates).
    let (_conn, ch) = admin().await;
    let mut consumer = timeout(
        BOUND,
        ch.basic_consume(
            queue.as_str().into(),
            "odoo-cdc-test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume hung")
    .expect("consume");
    let mut missing = confirmed;
    missing.insert(message(0, "").message_id); // the warm-up message
    while !missing.is_empty() {
        let delivery = timeout(BOUND, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} confirmed messages are not in the queue", missing.len()))
            .expect("consumer ended")
            .expect("delivery");
        if let Some(id) = delivery.properties.message_id() {
            missing.remove(id.as_str());
        }
    }
    drop(consumer);
    drop(ch);

    sink.close()
        .await
        .expect("closing an already closed sink is fine");
    let (_conn, ch) = admin().await;
    cleanup(&ch, &exchange, Some(&queue)).await;
}

/// A channel-level close (here: the exchange deleted under a running sink, so
/// the broker closes the channel with 404 on the next publish) fails the
/// confirm as Closed with the broker's reason, and later publishes fail too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_deleted_under_the_sink_closes_the_channel() {
    let exchange = unique("ex");
    let _leftovers = Leftovers {
        exchange: exchange.clone(),
        queue: None,
    };
    let mut sink = RabbitSink::connect(config(&exchange))
        .await
        .expect("connect");
    let (_conn, ch) = admin().await;
    cleanup(&ch, &exchange, None).await;

    let confirm = publish(&mut sink, message(1, "odoo.z"))
        .await
        .expect("the publish itself is queued before the broker objects");
    match settle(vec![confirm]).await.remove(0) {
        Err(SinkError::Closed(reason)) => {
            assert!(reason.contains("NOT_FOUND"), "{reason}");
            assert!(reason.contains(&exchange), "{reason}");
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    let next = publish(&mut sink, message(2, "odoo.z")).await;
    let next = match next {
        Err(e) => Err(e),
        Ok(confirm) => settle(vec![confirm]).await.remove(0),
    };
    assert!(matches!(next, Err(SinkError::Closed(_))), "{next:?}");
    sink.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_declare_requires_an_existing_exchange() {
    let exchange = unique("ex");
    let _leftovers = Leftovers {
        exchange: exchange.clone(),
        queue: None,
    };
    let mut cfg = config(&exchange);
    cfg.declare_exchange = false;
    let err = match RabbitSink::connect(cfg.clone()).await {
        Ok(_) => panic!("connect must fail when the exchange is missing and declaring is off"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(matches!(err, SinkError::Connect { .. }), "{err:?}");
    assert!(text.contains(&exchange), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains("--no-declare"), "{text}");

    // Once someone else declares it, the same configuration works.
    let (_conn, ch) = admin().await;
    timeout(
        BOUND,
        ch.exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare hung")
    .expect("declare");
    cfg.unroutable = UnroutablePolicy::Drop;
    let mut sink = RabbitSink::connect(cfg)
        .await
        .expect("connect to an existing exchange");
    let confirm = publish(&mut sink, message(1, "odoo.y"))
        .await
        .expect("publish");
    settle(vec![confirm]).await.remove(0).expect("confirm");
    sink.close().await.expect("close");
    cleanup(&ch, &exchange, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_a_clear_non_retryable_error_without_the_password() {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let mut cfg =
        RabbitConfig::new(format!("{scheme}://guest:wr0ng-Pa55@{host}")).expect("valid URL");
    cfg.exchange = unique("ex");
    cfg.connection_name = unique("conn");
    let err = match RabbitSink::connect(cfg).await {
        Ok(_) => panic!("connect must fail with a wrong password"),
        Err(e) => e,
    };
    let text = format!("{err} {err:?}");
    assert!(!text.contains("wr0ng-Pa55"), "password leaked: {text}");
    assert!(text.contains("guest:***@"), "{text}");
    assert!(text.contains("ACCESS_REFUSED"), "{text}");
    assert!(
        !err.is_retryable(),
        "bad credentials need an operator: {text}"
    );
}

/// A peer that accepts TCP but never speaks AMQP is where lapin's connect can
/// hang; the connect timeout must turn it into an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_broker_is_a_connect_timeout_not_a_hang() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut cfg =
        RabbitConfig::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f")).expect("valid URL");
    cfg.connect_timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let outcome = timeout(BOUND, RabbitSink::connect(cfg))
        .await
        .expect("connect hung past its own timeout");
    let err = match outcome {
        Ok(_) => panic!("nothing AMQP is listening, connect cannot succeed"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, SinkError::Connect { reason, .. } if reason.contains("no answer within 500 ms")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.is_retryable());
    drop(listener);
}
