//! The broker ceiling: a plain lapin publisher (no CDC) sending persistent,
//! mandatory messages with a window of unconfirmed ones, and checking every
//! confirm is a clean ack. Shared by the end-to-end harness (`benches/e2e.rs`)
//! and `examples/broker_ceiling.rs`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::time::timeout;

/// Bound on each setup, publish or cleanup call, so a vanished broker fails the run.
pub const STEP: Duration = Duration::from_secs(30);

/// Declares a durable topic exchange.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declare = channel.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    );
    timeout(STEP, declare)
        .await
        .context("exchange.declare: timed out")?
        .context("exchange.declare")
}

/// Declares a durable queue of `queue_type` (classic, quorum, stream) the way
/// odoo-cdc does (classic without an `x-queue-type` argument), plus `extra`
/// arguments, and binds it to `exchange` with `#`.
pub async fn declare_queue(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    queue_type: &str,
    extra: FieldTable,
) -> anyhow::Result<()> {
    let mut arguments = extra;
    if queue_type != "classic" {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue_type.into()),
        );
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    timeout(
        STEP,
        channel.queue_declare(queue.into(), options, arguments),
    )
    .await
    .context("queue.declare: timed out")?
    .context("queue.declare")?;
    let bind = channel.queue_bind(
        queue.into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    timeout(STEP, bind)
        .await
        .context("queue.bind: timed out")?
        .context("queue.bind")
}

/// How many messages `queue` holds (passive declare).
pub async fn queue_len(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = timeout(
        STEP,
        channel.queue_declare(queue.into(), passive, FieldTable::default()),
    )
    .await
    .context("queue.declare (passive): timed out")?
    .context("queue.declare (passive)")?;
    Ok(declared.message_count())
}

/// Deletes the queue and the exchange (either may already be gone).
pub async fn delete(channel: &Channel, exchange: &str, queue: &str) -> anyhow::Result<()> {
    timeout(
        STEP,
        channel.queue_delete(queue.into(), QueueDeleteOptions::default()),
    )
    .await
    .context("queue.delete: timed out")?
    .context("queue.delete")?;
    timeout(
        STEP,
        channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()),
    )
    .await
    .context("exchange.delete: timed out")?
    .context("exchange.delete")?;
    Ok(())
}

/// The properties of a change event as odoo-cdc sends them (message id, type,
/// timestamp, content type and five headers), so the broker handles the same
/// bytes per message as with the connector.
pub fn event_properties(i: u64) -> BasicProperties {
    let lsn = 0x16B_3748 + i * 0x60;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-commit-lsn".into(),
        AMQPValue::LongString(format!("0/{:X}", lsn + 0x58).into()),
    );
    headers.insert(
        "x-lsn".into(),
        AMQPValue::LongString(format!("0/{lsn:X}").into()),
    );
    headers.insert("x-op".into(), AMQPValue::LongString("c".into()));
    headers.insert(
        "x-table".into(),
        AMQPValue::LongString("public.sale_order_line".into()),
    );
    headers.insert("x-xid".into(), AMQPValue::LongLongInt(745 + i as i64));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(format!("{:016X}-{:08}", lsn + 0x58, 0).into())
        .with_content_type("application/json".into())
        .with_timestamp(1_790_000_000)
        .with_type("sale.order.line.create".into())
        .with_headers(headers)
}

/// Publishes `messages` bodies of `size` bytes to `exchange` (which must route
/// them to a queue) on `channel`, keeping at most `window` unconfirmed.
/// Returns the seconds from the first publish to the last confirm.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    messages: u64,
    size: usize,
    window: usize,
    properties: impl Fn(u64) -> BasicProperties,
) -> anyhow::Result<f64> {
    if window == 0 {
        bail!("the confirm window must be at least 1");
    }
    timeout(
        STEP,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .context("confirm.select: timed out")?
    .context("confirm.select")?;
    let body = vec![b'x'; size];
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let mut in_flight = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..messages {
        while in_flight.len() >= window {
            check(in_flight.next().await)?;
        }
        let publish = channel.basic_publish(
            exchange.into(),
            "odoo.public.sale_order_line.insert".into(),
            options,
            &body,
            properties(i),
        );
        let confirm = timeout(STEP, publish)
            .await
            .context("basic.publish: timed out")?
            .context("basic.publish")?;
        in_flight.push(async move {
            match timeout(STEP, confirm).await {
                Ok(outcome) => outcome.context("confirm failed"),
                Err(_) => Err(anyhow::anyhow!("no confirm within {STEP:?}")),
            }
        });
    }
    while !in_flight.is_empty() {
        check(in_flight.next().await)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn check(confirm: Option<anyhow::Result<Confirmation>>) -> anyhow::Result<()> {
    match confirm {
        Some(Ok(Confirmation::Ack(None))) | None => Ok(()),
        Some(Ok(other)) => bail!("broker did not cleanly confirm a message: {other:?}"),
        Some(Err(e)) => Err(e),
    }
}
