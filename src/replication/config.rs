//! Connection settings for the source database, parsed from a `postgres://` URL.
//!
//! The same [`PgConfig`] opens both the walsender connection
//! (`ReplicationClient`) and ordinary SQL connections (`replication::sql`), so
//! host, credentials, TLS and session settings cannot drift apart between them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::secret::Secret;

/// How hard to insist on TLS, with libpq's names and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, plain when it answers the SSLRequest with
    /// 'N'; the certificate is not checked (libpq's default). Unlike libpq, a
    /// failed handshake is an error, not a retry in plain text.
    #[default]
    Prefer,
    /// TLS or fail. The certificate is not checked, unless `sslrootcert` is set, in
    /// which case it is checked like `verify-ca` (libpq does the same).
    Require,
    /// TLS, and the server certificate must chain to a trusted root.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host we connected to.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling (`verify-full`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(ConfigError::Invalid {
                part: "sslmode".into(),
                reason: format!(
                    "{other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ),
            }),
        }
    }
}

/// A bad connection URL. The message names the part that is wrong and never
/// contains the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("connection URL must start with postgres:// or postgresql://")]
    Scheme,
    #[error("invalid {part} in connection URL: {reason}")]
    Invalid { part: String, reason: String },
    #[error(
        "unknown connection URL parameter {name:?} (supported: sslmode, sslrootcert, application_name, connect_timeout)"
    )]
    UnknownParameter { name: String },
}

fn invalid(part: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        part: part.to_string(),
        reason: reason.into(),
    }
}

/// Where and how to connect to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// `None`: use `PGPASSWORD` if the server asks for a password.
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// PEM file with the root certificate(s) to trust; the webpki (Mozilla) roots
    /// when unset.
    pub sslrootcert: Option<PathBuf>,
    /// Shown in `pg_stat_activity` / `pg_stat_replication`.
    pub application_name: String,
    /// Bounds TCP connect, TLS handshake, authentication and startup together.
    pub connect_timeout: Duration,
}

impl PgConfig {
    pub const DEFAULT_PORT: u16 = 5432;
    pub const DEFAULT_APPLICATION_NAME: &'static str = "odoo-cdc";
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// The URL with the password replaced by `***`: safe for logs and error messages.
    pub fn redacted(&self) -> String {
        let mut out = String::from("postgres://");
        out.push_str(&percent_encode(&self.user));
        if self.password.is_some() {
            out.push_str(":***");
        }
        out.push('@');
        if self.host.contains(':') {
            out.push('[');
            out.push_str(&self.host);
            out.push(']');
        } else {
            out.push_str(&percent_encode(&self.host));
        }
        out.push(':');
        out.push_str(&self.port.to_string());
        out.push('/');
        out.push_str(&percent_encode(&self.dbname));
        out.push_str("?sslmode=");
        out.push_str(self.sslmode.as_str());
        if let Some(root) = &self.sslrootcert {
            out.push_str("&sslrootcert=");
            out.push_str(&percent_encode(&root.to_string_lossy()));
        }
        out.push_str("&application_name=");
        out.push_str(&percent_encode(&self.application_name));
        out.push_str("&connect_timeout=");
        out.push_str(&self.connect_timeout.as_secs().to_string());
        out
    }

    /// The password to answer an authentication request with: the URL's, else a
    /// non-empty `PGPASSWORD` (read at connect time, as libpq does).
    pub fn password_for_auth(&self) -> Option<Secret> {
        resolve_password(
            self.password.as_ref(),
            std::env::var("PGPASSWORD").ok().as_deref(),
        )
    }
}

fn resolve_password(url: Option<&Secret>, env: Option<&str>) -> Option<Secret> {
    match (url, env) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(e)) if !e.is_empty() => Some(Secret::from(e)),
        _ => None,
    }
}

/// Session settings applied to every connection we open (replication and SQL),
/// so the text form of a value is the same in a snapshot query and in the WAL
/// stream whatever the server's or role's defaults are.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("IntervalStyle", "iso_8601"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// [`SESSION_SETTINGS`] as the startup packet's `options` value:
/// `-c name=value` pairs, with spaces and backslashes in values escaped by a
/// backslash (the server splits `options` on unescaped spaces).
pub fn session_options() -> String {
    let mut out = String::new();
    for (name, value) in SESSION_SETTINGS {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("-c ");
        out.push_str(&escape_option(name));
        out.push('=');
        out.push_str(&escape_option(value));
    }
    out
}

fn escape_option(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == ' ' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl FromStr for PgConfig {
    type Err = ConfigError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or(ConfigError::Scheme)?;
        if rest.contains('#') {
            return Err(invalid("URL", "fragments (#...) are not allowed"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.split_once('/') {
            Some((a, p)) => (a, p),
            None => (before_query, ""),
        };
        // The password may itself contain '@' when not percent-encoded: the host
        // part starts after the last one.
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };

        let (user, password) = match userinfo {
            None => (None, None),
            Some(ui) => {
                let (u, p) = match ui.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (ui, None),
                };
                let user = percent_decode(u, "user name")?;
                let password = p
                    .map(|p| percent_decode(p, "password").map(Secret::from))
                    .transpose()?;
                (Some(user), password)
            }
        };
        let user = user.filter(|u| !u.is_empty()).ok_or_else(|| {
            invalid(
                "user name",
                "the URL names no user (postgres://USER@host/db)",
            )
        })?;

        let (host, port) = parse_hostport(hostport)?;

        let dbname = percent_decode(path, "database name")?;
        if dbname.contains('/') {
            return Err(invalid("database name", "must not contain '/'"));
        }
        let dbname = if dbname.is_empty() {
            user.clone()
        } else {
            dbname
        };

        let mut cfg = PgConfig {
            host,
            port,
            user,
            password,
            dbname,
            sslmode: SslMode::default(),
            sslrootcert: None,
            application_name: Self::DEFAULT_APPLICATION_NAME.to_string(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        };

        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(k, "parameter name")?;
            let value = percent_decode(v, &key)?;
            match key.as_str() {
                "sslmode" => cfg.sslmode = value.parse()?,
                "sslrootcert" => {
                    if value.is_empty() {
                        return Err(invalid("sslrootcert", "empty path"));
                    }
                    cfg.sslrootcert = Some(PathBuf::from(value));
                }
                "application_name" => {
                    if value.contains('\0') {
                        return Err(invalid("application_name", "contains a NUL byte"));
                    }
                    cfg.application_name = value;
                }
                "connect_timeout" => {
                    let secs: u64 = value.parse().map_err(|_| {
                        invalid(
                            "connect_timeout",
                            format!("{value:?} is not a whole number of seconds"),
                        )
                    })?;
                    if secs == 0 {
                        return Err(invalid(
                            "connect_timeout",
                            "must be at least 1 second (waiting forever is not supported)",
                        ));
                    }
                    cfg.connect_timeout = Duration::from_secs(secs);
                }
                _ => return Err(ConfigError::UnknownParameter { name: key }),
            }
        }
        Ok(cfg)
    }
}

fn parse_hostport(hostport: &str) -> Result<(String, u16), ConfigError> {
    if hostport.contains(',') {
        return Err(invalid("host", "several hosts are not supported"));
    }
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("host", "unclosed '[' in IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| invalid("host", "unexpected text after ']'"))?,
            ),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (percent_decode(h, "host")?, Some(p)),
            None => (percent_decode(hostport, "host")?, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(
            "host",
            "the URL names no host (unix-domain sockets are not supported)",
        ));
    }
    if host.starts_with('/') {
        return Err(invalid("host", "unix-domain sockets are not supported"));
    }
    let port = match port {
        None | Some("") => PgConfig::DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(invalid(
                    "port",
                    format!("{p:?} is not a port number (1-65535)"),
                ));
            }
            Ok(n) => n,
        },
    };
    Ok((host, port))
}

/// Decodes `%XX` escapes. The error names `part` but never echoes the text,
/// which may be a password.
fn percent_decode(s: &str, part: &str) -> Result<String, ConfigError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| invalid(part, "bad percent-encoding (expected %XX)"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let s =
        String::from_utf8(out).map_err(|_| invalid(part, "percent-decodes to invalid UTF-8"))?;
    if s.contains('\0') {
        return Err(invalid(part, "contains a NUL byte"));
    }
    Ok(s)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let cfg: PgConfig = "postgresql://odoo:p%40ss%3Aw@db.example.com:6543/odoo_prod?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=cdc%20one&connect_timeout=7"
            .parse()
            .unwrap();
        assert_eq!(cfg.host, "db.example.com");
        assert_eq!(cfg.port, 6543);
        assert_eq!(cfg.user, "odoo");
        assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("p@ss:w"));
        assert_eq!(cfg.dbname, "odoo_prod");
        assert_eq!(cfg.sslmode, SslMode::VerifyFull);
        assert_eq!(cfg.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(cfg.application_name, "cdc one");
        assert_eq!(cfg.connect_timeout, Duration::from_secs(7));
    }

    #[test]
    fn defaults() {
        let cfg: PgConfig = "postgres://postgres@127.0.0.1".parse().unwrap();
        assert_eq!(cfg.port, 5432);
        assert_eq!(cfg.dbname, "postgres");
        assert_eq!(cfg.password, None);
        assert_eq!(cfg.sslmode, SslMode::Prefer);
        assert_eq!(cfg.sslrootcert, None);
        assert_eq!(cfg.application_name, "odoo-cdc");
        assert_eq!(cfg.connect_timeout, Duration::from_secs(10));
        let cfg: PgConfig = "postgres://u@h:5433/".parse().unwrap();
        assert_eq!((cfg.port, cfg.dbname.as_str()), (5433, "u"));
    }

    #[test]
    fn unencoded_at_in_password_and_ipv6_host() {
        let cfg: PgConfig = "postgres://u:a@b@[::1]:5999/d".parse().unwrap();
        assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("a@b"));
        assert_eq!(cfg.host, "::1");
        assert_eq!(cfg.port, 5999);
        let cfg: PgConfig = "postgres://u@[fe80::1]/d".parse().unwrap();
        assert_eq!((cfg.host.as_str(), cfg.port), ("fe80::1", 5432));
    }

    #[test]
    fn errors_name_the_bad_part_and_hide_the_password() {
        let cases = [
            ("mysql://u@h/d", "postgres://"),
            ("postgres://h/d", "user name"),
            ("postgres://u@h:70000/d", "port"),
            ("postgres://u@h:0/d", "port"),
            ("postgres://u@h:x/d", "port"),
            ("postgres://u@/d", "host"),
            ("postgres://u@h1,h2/d", "host"),
            ("postgres://u@h/d?sslmode=allow", "sslmode"),
            ("postgres://u@h/d?connect_timeout=abc", "connect_timeout"),
            ("postgres://u@h/d?connect_timeout=0", "connect_timeout"),
            (
                "postgres://u@h/d?target_session_attrs=any",
                "target_session_attrs",
            ),
            ("postgres://u:sec%zzret@h/d", "password"),
            ("postgres://u@h/d%ff", "database name"),
        ];
        for (url, part) in cases {
            let err = url.parse::<PgConfig>().unwrap_err().to_string();
            assert!(err.contains(part), "{url}: {err:?} should mention {part}");
            assert!(!err.contains("sec%zz"), "{err} leaks the password");
        }
    }

    #[test]
    fn redacted_hides_password_and_round_trips() {
        let cfg: PgConfig = "postgres://odoo:s3cr%2Ft@localhost:5432/my%20db?sslmode=require"
            .parse()
            .unwrap();
        let red = cfg.redacted();
        assert!(!red.contains("s3cr"), "{red}");
        assert!(red.starts_with("postgres://odoo:***@localhost:5432/my%20db?sslmode=require"));
        assert!(!format!("{cfg:?}").contains("s3cr"));
        let back: PgConfig = red.parse().unwrap();
        assert_eq!(back.dbname, "my db");
        assert_eq!(back.sslmode, SslMode::Require);
        assert_eq!(back.application_name, cfg.application_name);
    }

    #[test]
    fn pgpassword_fills_only_a_missing_password() {
        let url = Secret::from("from-url");
        assert_eq!(
            resolve_password(Some(&url), Some("env"))
                .as_ref()
                .map(Secret::expose),
            Some("from-url")
        );
        assert_eq!(
            resolve_password(None, Some("env"))
                .as_ref()
                .map(Secret::expose),
            Some("env")
        );
        assert_eq!(resolve_password(None, Some("")), None);
        assert_eq!(resolve_password(None, None), None);
    }

    #[test]
    fn session_options_are_escaped() {
        assert_eq!(
            session_options(),
            "-c DateStyle=ISO -c IntervalStyle=iso_8601 -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex"
        );
        assert_eq!(escape_option(r"ISO, MDY\x"), r"ISO,\ MDY\\x");
    }
}
