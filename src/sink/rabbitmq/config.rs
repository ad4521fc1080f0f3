//! What the RabbitMQ sink needs to know before it opens a socket.
//!
//! The broker URL carries the password, so it is kept private and only ever
//! shown through [`RabbitConfig::redacted_url`].

use crate::secret::redact_url;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::AMQPUri;

/// Default exchange name from the design contract.
pub const DEFAULT_EXCHANGE: &str = "odoo.cdc";

/// How to connect to RabbitMQ and which topology to set up.
#[derive(Clone)]
pub struct RabbitConfig {
    /// `amqp://user:pass@host:port/vhost` or `amqps://...`; private so that it
    /// can only leave this type redacted.
    url: String,
    /// Topic exchange every event is published to.
    pub exchange: String,
    /// Declare the exchange (durable, topic) on connect. Off (`--no-declare`)
    /// for brokers where we lack the configure permission: the exchange is then
    /// only checked for existence, which needs no permission.
    pub declare_exchange: bool,
    /// Optional quick-start queue declared and bound to the exchange on connect.
    pub queue: Option<QueueSpec>,
    /// Upper bound from publish to the broker's confirm, including any time the
    /// broker keeps the connection blocked (memory or disk alarm).
    pub confirm_timeout: Duration,
    /// Upper bound for each step of [`super::RabbitSink::connect`] (TCP/TLS and
    /// AMQP handshake, channel open, each declare and bind).
    pub connect_timeout: Duration,
    /// What to do when the broker returns a message no queue is bound for.
    pub unroutable: UnroutablePolicy,
    /// Shown in the broker's management UI and `rabbitmqctl list_connections`,
    /// so operators can tell which connection is the connector.
    pub connection_name: String,
}

impl RabbitConfig {
    /// A configuration with the defaults of the design contract for `url`.
    ///
    /// The URL is parsed here (scheme, credentials, vhost from the path) so a
    /// typo is a configuration error before anything touches the network.
    pub fn new(url: impl Into<String>) -> Result<Self, InvalidAmqpUrl> {
        let url = url.into();
        parse_url(&url)?;
        Ok(RabbitConfig {
            url,
            exchange: DEFAULT_EXCHANGE.to_owned(),
            declare_exchange: true,
            queue: None,
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            unroutable: UnroutablePolicy::Fail,
            connection_name: "odoo-cdc".to_owned(),
        })
    }

    /// The URL with its password replaced by `***`, safe for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    pub(crate) fn amqp_uri(&self) -> Result<AMQPUri, InvalidAmqpUrl> {
        parse_url(&self.url)
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url())
            .field("exchange", &self.exchange)
            .field("declare_exchange", &self.declare_exchange)
            .field("queue", &self.queue)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("unroutable", &self.unroutable)
            .field("connection_name", &self.connection_name)
            .finish()
    }
}

/// The AMQP URL could not be parsed. Carries the URL only in redacted form.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid AMQP URL {url}: {reason} (expected amqp://user:password@host:port/vhost or amqps://...)"
)]
pub struct InvalidAmqpUrl {
    pub url: String,
    pub reason: String,
}

fn parse_url(url: &str) -> Result<AMQPUri, InvalidAmqpUrl> {
    url.parse::<AMQPUri>().map_err(|reason| {
        let redacted = redact_url(url);
        InvalidAmqpUrl {
            // The parser may quote the whole input, password included.
            reason: reason.replace(url, &redacted),
            url: redacted,
        }
    })
}

/// The kind of the optional quick-start queue (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
    Stream,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            "stream" => Ok(QueueType::Stream),
            other => Err(format!(
                "unknown queue type {other:?} (expected classic, quorum or stream)"
            )),
        }
    }
}

/// A durable queue declared and bound on connect, for a quick start without
/// a separate topology step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub queue_type: QueueType,
    /// Topic patterns the queue is bound with; `#` receives every event.
    pub binding_keys: Vec<String>,
}

impl QueueSpec {
    /// A classic queue bound with `#`.
    pub fn new(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            queue_type: QueueType::Classic,
            binding_keys: vec!["#".to_owned()],
        }
    }
}

/// What to do with a message the broker returns as unroutable (mandatory
/// publish, no queue bound for its routing key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnroutablePolicy {
    /// A returned message is a delivery failure: the session stops before the
    /// slot moves past the event. Safe default, since a missing binding would
    /// otherwise lose events silently.
    #[default]
    Fail,
    /// Count it, log a warning, and treat it as delivered: for deployments
    /// where only some tables have consumers, on purpose.
    Drop,
}

impl FromStr for UnroutablePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fail" => Ok(UnroutablePolicy::Fail),
            "drop" => Ok(UnroutablePolicy::Drop),
            other => Err(format!(
                "unknown unroutable policy {other:?} (expected fail or drop)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://svc:p%40ss@broker.example:5671/odoo"),
            "amqps://svc:***@broker.example:5671/odoo"
        );
        // An unescaped '@' or '/' in the password must not leak its tail.
        let r = redact_url("amqp://u:a/b@c@host/vh");
        assert!(!r.contains("a/b"), "{r}");
        assert!(!r.contains("b@c"), "{r}");
        assert_eq!(redact_url("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
        assert_eq!(redact_url("amqp://user@host/%2f"), "amqp://user@host/%2f");
        assert_eq!(redact_url("guest:pw"), "***");
    }

    #[test]
    fn debug_and_errors_never_show_the_password() {
        let cfg = RabbitConfig::new("amqp://guest:hunter2@localhost:5672/%2f").unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(cfg.redacted_url().contains("guest:***@localhost"));

        let err = RabbitConfig::new("http://guest:hunter2@localhost/").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("scheme"), "{err}");
    }

    #[test]
    fn defaults_follow_the_contract() {
        let cfg = RabbitConfig::new("amqp://localhost").unwrap();
        assert_eq!(cfg.exchange, "odoo.cdc");
        assert!(cfg.declare_exchange);
        assert_eq!(cfg.confirm_timeout, Duration::from_secs(30));
        assert_eq!(cfg.connect_timeout, Duration::from_secs(10));
        assert_eq!(cfg.unroutable, UnroutablePolicy::Fail);
        assert_eq!(QueueSpec::new("q").binding_keys, vec!["#".to_owned()]);
    }

    #[test]
    fn parses_names() {
        for t in [QueueType::Classic, QueueType::Quorum, QueueType::Stream] {
            assert_eq!(t.as_str().parse::<QueueType>(), Ok(t));
        }
        assert!("lazy".parse::<QueueType>().is_err());
        assert_eq!("drop".parse(), Ok(UnroutablePolicy::Drop));
        assert!("ignore".parse::<UnroutablePolicy>().is_err());
    }
}
