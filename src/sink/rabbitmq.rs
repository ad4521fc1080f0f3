//! RabbitMQ sink: publishes each event to a durable topic exchange on a
//! channel in publisher-confirm mode, and hands back a future per message that
//! resolves once the broker has taken responsibility for it.
//!
//! Delivery is proven only by a positive `basic.ack` for a message that was
//! not returned: messages are published `mandatory`, so a routing key no queue
//! is bound for comes back (`basic.return`) instead of vanishing. Nacks,
//! returns (unless [`UnroutablePolicy::Drop`]), confirm timeouts and a closed
//! channel or connection are all errors, and the session replays from the
//! slot after reconnecting.
//!
//! Every network await is bounded by a timeout, because lapin futures can hang
//! when the broker goes away (lapin #409, #437, #470). A connection the broker
//! blocks (memory or disk alarm, `connection.blocked`) drops nothing: lapin
//! stops writing, publishes queue up in memory (bounded by the publisher's
//! confirm window) and their confirms wait, up to the confirm timeout.
//!
//! Needs a tokio runtime (lapin's default runtime and our timers).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, Event, ExchangeKind};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Confirm, ConfirmFuture, OutgoingMessage, Sink, SinkError};

mod config;
mod confirm;
mod properties;

pub use config::{
    DEFAULT_EXCHANGE, InvalidAmqpUrl, QueueSpec, QueueType, RabbitConfig, UnroutablePolicy,
};
pub use confirm::SinkStats;

use confirm::{ConfirmCtx, Counters};
use properties::{properties, short};

/// Every event must reach a queue (`mandatory`); `immediate` is not supported
/// by RabbitMQ.
const PUBLISH: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// A connection and a confirm-mode channel to RabbitMQ.
pub struct RabbitSink {
    connection: Connection,
    /// Shared with the confirm futures, which finish the publish (write
    /// completion, then confirm) after [`Sink::publish`] has returned.
    channel: Arc<Channel>,
    exchange: ShortString,
    exchange_name: Arc<str>,
    unroutable: UnroutablePolicy,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    counters: Arc<Counters>,
    redacted_url: String,
    /// Logs blocked/unblocked and connection errors as the broker reports them.
    events: JoinHandle<()>,
    /// The last connection error the broker reported, so that a publish
    /// refused afterwards says why instead of only "invalid channel state".
    last_error: Arc<Mutex<Option<String>>>,
}

impl RabbitSink {
    /// Connects (amqp:// or amqps://, credentials and vhost from the URL), opens
    /// a channel in confirm mode, declares the durable topic exchange (or, with
    /// `declare_exchange` off, checks that it exists) and the optional queue
    /// with its bindings. Each step is bounded by `connect_timeout`.
    pub async fn connect(cfg: RabbitConfig) -> Result<Self, SinkError> {
        let url = cfg.redacted_url();
        let uri = cfg.amqp_uri().map_err(|e| SinkError::Connect {
            url: url.clone(),
            reason: e.reason,
        })?;
        let setup = Setup {
            url: &url,
            password: uri.authority.userinfo.password.clone(),
            timeout: cfg.connect_timeout,
        };
        let props = ConnectionProperties::default()
            .with_connection_name(cfg.connection_name.clone().into());
        let connection = setup
            .step(
                "opening the AMQP connection",
                Connection::connect_uri(uri, props),
            )
            .await?;
        let channel = setup
            .step("opening a channel", connection.create_channel())
            .await?;

        let exchange = setup.short(cfg.exchange.clone(), "exchange name")?;
        if cfg.declare_exchange {
            let options = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            setup
                .step(
                    "declaring the exchange",
                    channel.exchange_declare(
                        exchange.clone(),
                        ExchangeKind::Topic,
                        options,
                        FieldTable::default(),
                    ),
                )
                .await?;
        } else {
            check_exchange_exists(&setup, &channel, &exchange, &connection).await?;
        }
        if let Some(queue) = &cfg.queue {
            declare_queue(&setup, &channel, &exchange, queue).await?;
        }
        setup
            .step(
                "enabling publisher confirms",
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;

        let last_error = Arc::default();
        let events = spawn_event_logger(&connection, url.clone(), Arc::clone(&last_error));
        info!(
            url = %url,
            exchange = %cfg.exchange,
            queue = cfg.queue.as_ref().map(|q| q.name.as_str()),
            "connected to RabbitMQ with publisher confirms"
        );
        Ok(RabbitSink {
            connection,
            channel: Arc::new(channel),
            exchange_name: Arc::from(cfg.exchange.as_str()),
            exchange,
            unroutable: cfg.unroutable,
            confirm_timeout: cfg.confirm_timeout,
            connect_timeout: cfg.connect_timeout,
            counters: Arc::default(),
            redacted_url: url,
            events,
            last_error,
        })
    }

    /// Counters since connect; confirm futures update them as they resolve.
    pub fn stats(&self) -> SinkStats {
        self.counters.snapshot()
    }

    /// Whether the broker currently blocks this connection (resource alarm).
    /// Publishes keep queueing meanwhile; their confirms wait.
    pub fn is_blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    /// The broker URL with the password hidden.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// Closes the connection. Confirms still pending fail with
    /// [`SinkError::Closed`], so await them first for a clean shutdown.
    /// A connection the broker already closed is not an error here.
    pub async fn close(self) -> Result<(), SinkError> {
        self.events.abort();
        if !self.connection.status().connected() {
            return Ok(());
        }
        match tokio::time::timeout(
            self.connect_timeout,
            self.connection.close(200, "odoo-cdc shutting down".into()),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(confirm::from_lapin("connection.close", &e)),
            Err(_) => Err(SinkError::Closed(format!(
                "connection.close: no close-ok within {} ms",
                self.connect_timeout.as_millis()
            ))),
        }
    }

    /// Queues the frames of one message in lapin, in call order, and returns
    /// the future of its confirm without waiting for the socket write.
    ///
    /// lapin's `basic_publish` assigns the delivery tag and queues the frames
    /// synchronously on its first poll, then waits for the I/O thread to write
    /// them. Awaiting that here would cost a thread hand-off per message on the
    /// hot path, so we poll it once (which fixes the publish order) and leave
    /// the rest, write then confirm, to the returned future.
    fn start_publish(&self, msg: OutgoingMessage) -> Result<ConfirmFuture, SinkError> {
        let OutgoingMessage {
            routing_key,
            body,
            message_id,
            content_type,
            timestamp,
            kind,
            headers,
        } = msg;
        let props = properties(&message_id, content_type, timestamp, kind, headers)?;
        let amqp_routing_key = short(routing_key.clone(), "routing key", &message_id)?;
        let ctx = ConfirmCtx {
            message_id,
            routing_key,
            exchange: Arc::clone(&self.exchange_name),
            policy: self.unroutable,
            timeout: self.confirm_timeout,
            counters: Arc::clone(&self.counters),
            connection: self.connection.status().clone(),
        };
        let channel = Arc::clone(&self.channel);
        let exchange = self.exchange.clone();
        // The deadline starts now, not when the caller first polls the future.
        let deadline = Instant::now() + self.confirm_timeout;

        let mut confirm: ConfirmFuture = Box::pin(async move {
            let outcome = tokio::time::timeout_at(deadline, async move {
                let pending = {
                    // lapin copies the payload into its frames; the body is
                    // released once they are written, before the confirm.
                    let body = body;
                    channel
                        .basic_publish(exchange, amqp_routing_key, PUBLISH, &body, props)
                        .await?
                };
                pending.await
            })
            .await;
            ctx.settle(outcome.ok())
        });

        // A no-op waker: the caller polls the future again (with its own waker)
        // when it awaits the confirm; nothing needs waking before that.
        let mut cx = Context::from_waker(Waker::noop());
        match confirm.as_mut().poll(&mut cx) {
            Poll::Pending => {
                self.counters.published.fetch_add(1, Ordering::Relaxed);
                Ok(confirm)
            }
            Poll::Ready(Ok(())) => {
                self.counters.published.fetch_add(1, Ordering::Relaxed);
                Ok(Box::pin(std::future::ready(Ok(()))))
            }
            // Refused before any frame was queued: the channel or connection is gone.
            Poll::Ready(Err(SinkError::Closed(reason))) => {
                let cause = self.last_error.lock().ok().and_then(|e| e.clone());
                Err(SinkError::closed(match cause {
                    Some(cause) if !reason.contains(&cause) => format!("{reason} (after: {cause})"),
                    _ => reason,
                }))
            }
            Poll::Ready(Err(e)) => Err(e),
        }
    }
}

impl Drop for RabbitSink {
    fn drop(&mut self) {
        self.events.abort();
    }
}

impl Sink for RabbitSink {
    async fn publish(&mut self, msg: OutgoingMessage) -> Result<Confirm, SinkError> {
        self.start_publish(msg).map(Confirm::Pending)
    }

    /// Nothing is buffered on our side: durability comes from the confirms.
    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn check(&self) -> Result<bool, SinkError> {
        if !self.connection.status().connected() || !self.channel.status().connected() {
            let cause = self.last_error.lock().ok().and_then(|e| e.clone());
            return Err(SinkError::Closed(match cause {
                Some(cause) => format!("connection lost: {cause}"),
                None => "connection lost".into(),
            }));
        }
        Ok(!self.is_blocked())
    }

    async fn close(self) -> Result<(), SinkError> {
        RabbitSink::close(self).await
    }
}

/// Runs connect-phase steps with a timeout and turns their failures into
/// [`SinkError::Connect`] with the redacted URL.
struct Setup<'a> {
    url: &'a str,
    /// Scrubbed from error texts, in case a lower layer ever echoes it.
    password: String,
    timeout: Duration,
}

impl Setup<'_> {
    async fn step<T>(
        &self,
        what: &str,
        fut: impl Future<Output = lapin::Result<T>>,
    ) -> Result<T, SinkError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.fail(format!("{what}: {e}"))),
            Err(_) => Err(self.fail(format!(
                "{what}: no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    fn short(&self, value: String, what: &str) -> Result<ShortString, SinkError> {
        let len = value.len();
        ShortString::try_new(value).map_err(|_| {
            self.fail(format!(
                "{what} is {len} bytes long; AMQP allows at most 255"
            ))
        })
    }

    fn fail(&self, reason: String) -> SinkError {
        let reason = if self.password.is_empty() {
            reason
        } else {
            reason.replace(&self.password, "***")
        };
        SinkError::Connect {
            url: self.url.to_owned(),
            reason,
        }
    }
}

/// `--no-declare`: a passive declare needs no permission and tells a missing
/// exchange apart from other failures, so the operator gets a precise message
/// at startup instead of a channel error at the first publish.
async fn check_exchange_exists(
    setup: &Setup<'_>,
    channel: &Channel,
    exchange: &ShortString,
    connection: &Connection,
) -> Result<(), SinkError> {
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let check = channel.exchange_declare(
        exchange.clone(),
        ExchangeKind::Topic,
        options,
        FieldTable::default(),
    );
    match tokio::time::timeout(setup.timeout, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if is_not_found(&e) => Err(setup.fail(format!(
            "exchange {:?} does not exist in vhost {:?}; with declaring disabled (--no-declare) \
             it must be created beforehand as a durable topic exchange ({e})",
            exchange.as_str(),
            connection.status().vhost().as_str(),
        ))),
        Ok(Err(e)) => Err(setup.fail(format!("checking that the exchange exists: {e}"))),
        Err(_) => Err(setup.fail(format!(
            "checking that the exchange exists: no answer within {} ms",
            setup.timeout.as_millis()
        ))),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

async fn declare_queue(
    setup: &Setup<'_>,
    channel: &Channel,
    exchange: &ShortString,
    queue: &QueueSpec,
) -> Result<(), SinkError> {
    let name = setup.short(queue.name.clone(), "queue name")?;
    let mut arguments = FieldTable::default();
    // Classic is the broker default; leaving the argument out keeps a queue
    // declared earlier without it equivalent (older brokers compare arguments).
    if queue.queue_type != QueueType::Classic {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue.queue_type.as_str().into()),
        );
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    setup
        .step(
            "declaring the queue",
            channel.queue_declare(name.clone(), options, arguments),
        )
        .await?;
    for key in &queue.binding_keys {
        let key = setup.short(key.clone(), "binding key")?;
        setup
            .step(
                "binding the queue",
                channel.queue_bind(
                    name.clone(),
                    exchange.clone(),
                    key,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
    }
    Ok(())
}

fn spawn_event_logger(
    connection: &Connection,
    url: String,
    last_error: Arc<Mutex<Option<String>>>,
) -> JoinHandle<()> {
    let mut events = Box::pin(connection.events_listener());
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::ConnectionBlocked(reason) => warn!(
                    %url,
                    %reason,
                    "broker blocked the connection (resource alarm); publishes wait until it unblocks"
                ),
                Event::ConnectionUnblocked => info!(%url, "broker unblocked the connection"),
                Event::SendFlow(active) => info!(%url, active, "broker changed channel flow"),
                Event::Error(error) => {
                    warn!(%url, %error, "broker connection failed");
                    if let Ok(mut slot) = last_error.lock() {
                        *slot = Some(error.to_string());
                    }
                }
                other => debug!(%url, event = ?other, "broker connection event"),
            }
        }
    })
}
