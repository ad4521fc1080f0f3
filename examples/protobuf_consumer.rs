//! A consumer of odoo-cdc's Protobuf events (`odoo-cdc run --format protobuf`).
//!
//! Messages carry `content_type: application/x-protobuf` and the message type in
//! header `x-protobuf-type`: `odoo_cdc.v1.ChangeEvent` (row granularity) or
//! `odoo_cdc.v1.Transaction` (`--granularity transaction`). The schema is
//! `proto/change_event.proto`; this example uses the Rust types odoo-cdc
//! generates from it (`odoo_cdc::protobuf::pb`). A consumer in another language
//! generates its own from the same file (`protoc --python_out=...`).
//!
//! ```text
//! cargo run --example protobuf_consumer -- --amqp amqp://guest:guest@127.0.0.1:5672/%2f \
//!     --binding 'odoo.public.sale_order.*' --limit 10
//! ```
//!
//! It declares a temporary (exclusive, auto-deleted) queue bound to the exchange,
//! prints each event on one line, and acknowledges a message after printing it.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use odoo_cdc::protobuf::pb;
use odoo_cdc::protobuf::pb::value::Kind;
use prost::Message as _;

const NET_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "Print odoo-cdc Protobuf change events from RabbitMQ")]
struct Args {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    #[arg(long, default_value = "odoo.cdc")]
    exchange: String,
    /// Binding key of the temporary queue (e.g. `odoo.public.#`)
    #[arg(long, default_value = "#")]
    binding: String,
    /// Stop after this many messages (0: until Ctrl-C)
    #[arg(long, default_value_t = 0)]
    limit: u64,
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(NET_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow!("{what}: no answer within {NET_TIMEOUT:?}")),
    }
}

/// One value in a compact, readable form.
fn show_value(v: Option<&pb::Value>) -> String {
    match v.and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::Null(_)) => "null".into(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::IntValue(i)) => i.to_string(),
        Some(Kind::FloatValue(f)) => f.to_string(),
        Some(Kind::StringValue(s)) => format!("{s:?}"),
        Some(Kind::JsonValue(j)) => j.clone(),
        Some(Kind::BytesValue(b)) => format!("<{} bytes>", b.len()),
        Some(Kind::ListValue(l)) => {
            let items: Vec<String> = l.values.iter().map(|v| show_value(Some(v))).collect();
            format!("[{}]", items.join(","))
        }
    }
}

fn show_row(row: &Option<pb::Row>) -> String {
    match row {
        None => "-".into(),
        Some(r) => {
            let fields: Vec<String> = r
                .fields
                .iter()
                .filter(|f| {
                    !matches!(
                        f.value.as_ref().and_then(|v| v.kind.as_ref()),
                        Some(Kind::Null(_)) | None
                    )
                })
                .map(|f| format!("{}={}", f.name, show_value(f.value.as_ref())))
                .collect();
            format!("{{{}}}", fields.join(" "))
        }
    }
}

fn show_event(ev: &pb::ChangeEvent) -> String {
    let (table, commit_lsn, seq) = ev
        .source
        .as_ref()
        .map(|s| {
            (
                format!("{}.{}", s.schema, s.table),
                s.commit_lsn.as_str(),
                s.seq,
            )
        })
        .unwrap_or_default();
    format!(
        "{} {table} commit_lsn={commit_lsn} seq={seq} key={} after={}",
        ev.op,
        show_row(&ev.key),
        show_row(&ev.after)
    )
}

fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    d.properties
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find_map(|(k, v)| {
            (k.as_str() == name).then(|| match v {
                AMQPValue::LongString(s) => s.to_string(),
                AMQPValue::ShortString(s) => s.to_string(),
                other => format!("{other:?}"),
            })
        })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let conn = timed(
        "connecting to RabbitMQ",
        Connection::connect(&args.amqp, ConnectionProperties::default()),
    )
    .await?;
    let ch = timed("opening a channel", conn.create_channel()).await?;
    timed(
        "declaring the exchange",
        ch.exchange_declare(
            args.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    let queue = timed(
        "declaring the queue",
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    timed(
        "binding the queue",
        ch.queue_bind(
            queue.name().clone(),
            args.exchange.as_str().into(),
            args.binding.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    timed(
        "setting the prefetch",
        ch.basic_qos(100, BasicQosOptions::default()),
    )
    .await?;
    let mut consumer = timed(
        "starting the consumer",
        ch.basic_consume(
            queue.name().clone(),
            "protobuf_consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    eprintln!(
        "protobuf_consumer: queue {} bound to {:?} on {}; Ctrl-C to stop",
        queue.name(),
        args.binding,
        args.exchange
    );

    let shutdown = odoo_cdc::app::shutdown_signal();
    tokio::pin!(shutdown);
    let mut seen = 0u64;
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = &mut shutdown => break,
        };
        let d = match delivery {
            Some(d) => d.context("receiving")?,
            None => bail!("the broker cancelled the consumer"),
        };
        let message_id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let content_type = d
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if content_type != "application/x-protobuf" {
            bail!(
                "message {message_id} has content type {content_type:?}: run odoo-cdc with --format protobuf"
            );
        }
        match header(&d, "x-protobuf-type").as_deref() {
            Some("odoo_cdc.v1.ChangeEvent") => {
                let ev = pb::ChangeEvent::decode(d.data.as_slice())
                    .with_context(|| format!("message {message_id} is not a ChangeEvent"))?;
                println!("{message_id} {}", show_event(&ev));
            }
            Some("odoo_cdc.v1.Transaction") => {
                let tx = pb::Transaction::decode(d.data.as_slice())
                    .with_context(|| format!("message {message_id} is not a Transaction"))?;
                println!(
                    "{message_id} transaction xid={} commit_lsn={} part={}{} events={}",
                    tx.xid,
                    tx.commit_lsn,
                    tx.part,
                    if tx.r#final { " (final)" } else { "" },
                    tx.events.len()
                );
                for ev in &tx.events {
                    println!("    {}", show_event(ev));
                }
            }
            other => bail!("message {message_id}: unknown x-protobuf-type {other:?}"),
        }
        timed("acknowledging", d.ack(BasicAckOptions::default())).await?;
        seen += 1;
        if args.limit > 0 && seen >= args.limit {
            break;
        }
    }
    let _ = tokio::time::timeout(NET_TIMEOUT, conn.close(200, "done".into())).await;
    eprintln!("protobuf_consumer: {seen} messages");
    Ok(())
}
