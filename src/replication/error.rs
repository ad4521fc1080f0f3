//! Errors of the replication layer, and the one place that decides which of them
//! a reconnect can fix.

use std::fmt;
use std::io;
use std::time::Duration;

use super::config::{ConfigError, SslMode};

/// An `ErrorResponse` from the server, with the fields a person needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC` (the non-localized form when the server sends it).
    pub severity: String,
    /// SQLSTATE, e.g. `42704`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (DETAIL: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (HINT: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Everything that can go wrong talking to PostgreSQL. [`ReplicationError::is_retryable`]
/// tells a caller whether reconnecting may help.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("invalid replication slot name {name:?}: {reason}")]
    InvalidSlotName { name: String, reason: &'static str },

    #[error("invalid START_REPLICATION option name {name:?}: {reason}")]
    InvalidOption { name: String, reason: &'static str },

    #[error("could not resolve host {host:?}: {source}")]
    Resolve { host: String, source: io::Error },

    #[error("could not connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },

    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },

    #[error("I/O error while {context}: {source}")]
    Io {
        context: &'static str,
        source: io::Error,
    },

    #[error("the server closed the connection while {context}")]
    Closed { context: &'static str },

    #[error("the server does not accept TLS connections, but sslmode={sslmode} requires TLS")]
    TlsNotOffered { sslmode: SslMode },

    #[error("TLS configuration: {0}")]
    TlsConfig(String),

    #[error("TLS handshake with {host:?} failed: {source}")]
    TlsHandshake { host: String, source: io::Error },

    #[error(
        "the server asked for a password for user {user:?}, but none was given (put it in the URL or in PGPASSWORD)"
    )]
    PasswordRequired { user: String },

    #[error("authentication of user {user:?} failed: {reason}")]
    Auth { user: String, reason: String },

    #[error("server error: {0}")]
    Server(ServerError),

    #[error("protocol error: {0}")]
    Protocol(String),

    #[error(
        "the connection is unusable after an earlier error or timeout in the middle of a command"
    )]
    Broken,

    #[error("SQL connection: {}", error_chain(.0))]
    Sql(#[from] tokio_postgres::Error),

    /// Opening a SQL connection failed: names the server (never the password).
    #[error("could not open a SQL connection to {addr}: {}", error_chain(.source))]
    SqlConnect {
        /// `host:port`
        addr: String,
        source: tokio_postgres::Error,
    },
}

/// tokio-postgres' own message is only the error kind ("db error"); the useful
/// part is in its sources.
fn error_chain(e: &tokio_postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl From<ServerError> for ReplicationError {
    fn from(e: ServerError) -> Self {
        ReplicationError::Server(e)
    }
}

impl ReplicationError {
    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        ReplicationError::Io { context, source }
    }

    /// Whether reconnecting (after a pause) may succeed. Bad configuration, bad
    /// credentials, a missing slot or publication and certificate failures will not
    /// fix themselves; network trouble, timeouts and a server that is shutting down
    /// or overloaded may.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Config(_)
            | ReplicationError::InvalidSlotName { .. }
            | ReplicationError::InvalidOption { .. }
            | ReplicationError::TlsNotOffered { .. }
            | ReplicationError::TlsConfig(_)
            | ReplicationError::PasswordRequired { .. }
            | ReplicationError::Auth { .. } => false,
            ReplicationError::Resolve { .. }
            | ReplicationError::Connect { .. }
            | ReplicationError::Timeout { .. }
            | ReplicationError::Io { .. }
            | ReplicationError::Closed { .. }
            | ReplicationError::Protocol(_)
            | ReplicationError::Broken => true,
            ReplicationError::TlsHandshake { source, .. } => !is_certificate_error(source),
            ReplicationError::Server(e) => sqlstate_is_retryable(&e.code),
            ReplicationError::Sql(e) | ReplicationError::SqlConnect { source: e, .. } => {
                sql_error_is_retryable(e)
            }
        }
    }

    /// The server's SQLSTATE, when the error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            ReplicationError::Sql(e) | ReplicationError::SqlConnect { source: e, .. } => {
                e.code().map(|c| c.code())
            }
            _ => None,
        }
    }

    /// The server could not be reached at all (refused, unresolvable, timed
    /// out, reset before the session was up): a database that is not up yet
    /// looks like this.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ReplicationError::Resolve { .. } | ReplicationError::Connect { .. } => true,
            // Connect timeouts name what they bound: "connecting to h:p",
            // "SQL connection to h:p".
            ReplicationError::Timeout { what, .. } => {
                what.starts_with("connecting to") || what.starts_with("SQL connection to")
            }
            ReplicationError::SqlConnect { source, .. } => source.as_db_error().is_none(),
            _ => false,
        }
    }

    /// The server's error, when there is one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ReplicationError::Server(e) => Some(e),
            _ => None,
        }
    }
}

/// SQLSTATEs that describe a passing condition. Everything else (bad credentials
/// 28xxx, undefined object 42704, prerequisite state 55000 such as `wal_level`
/// not logical, privileges 42501, ...) needs a person.
pub fn sqlstate_is_retryable(code: &str) -> bool {
    matches!(
        code,
        // a replication slot or lock held by another (possibly dying) session
        "55006" | "55P03"
    ) || ["08", "40", "53", "57", "58", "XX"]
        .iter()
        .any(|class| code.starts_with(class))
}

fn sql_error_is_retryable(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        return sqlstate_is_retryable(db.code().code());
    }
    let mut source = std::error::Error::source(e);
    let mut saw_io = false;
    while let Some(s) = source {
        if s.downcast_ref::<rustls::Error>()
            .is_some_and(is_rustls_certificate_error)
        {
            return false;
        }
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if is_certificate_error(io) {
                return false;
            }
            saw_io = true;
        }
        source = s.source();
    }
    saw_io || e.is_closed()
}

fn is_rustls_certificate_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
    )
}

fn is_certificate_error(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(is_rustls_certificate_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        })
    }

    #[test]
    fn classifies_sqlstates() {
        for code in [
            "28P01", "28000", "42704", "55000", "42501", "0A000", "42601",
        ] {
            assert!(!server(code).is_retryable(), "{code}");
        }
        for code in [
            "57P01", "57P03", "53300", "08006", "40001", "XX000", "55006", "58030",
        ] {
            assert!(server(code).is_retryable(), "{code}");
        }
        assert_eq!(server("42704").sqlstate(), Some("42704"));
    }

    #[test]
    fn classifies_local_errors() {
        let cert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(
            !ReplicationError::TlsHandshake {
                host: "h".into(),
                source: cert
            }
            .is_retryable()
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(
            ReplicationError::TlsHandshake {
                host: "h".into(),
                source: reset
            }
            .is_retryable()
        );
        assert!(!ReplicationError::PasswordRequired { user: "u".into() }.is_retryable());
        assert!(ReplicationError::Closed { context: "x" }.is_retryable());
        assert_eq!(ReplicationError::Closed { context: "x" }.sqlstate(), None);
    }

    #[test]
    fn display_includes_detail_and_hint() {
        let e = ServerError {
            severity: "ERROR".into(),
            code: "42704".into(),
            message: "replication slot \"x\" does not exist".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        };
        assert_eq!(
            e.to_string(),
            "ERROR 42704: replication slot \"x\" does not exist (DETAIL: d) (HINT: h)"
        );
    }
}
