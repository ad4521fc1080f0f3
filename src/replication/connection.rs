//! One backend connection on the control path: TCP, TLS negotiation, the startup
//! packet, and reading backend messages outside COPY mode.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use bytes::Bytes;
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::config::{PgConfig, SslMode, session_options};
use super::error::{ReplicationError, ServerError};
use super::tls;
use super::wire::{
    FrameReader, FrameWriter, HEADER_LEN, parse_data_row, parse_error_fields, parse_sasl_mechanisms,
};

/// Plain TCP or TLS, behind one type so the rest of the code does not care.
pub(crate) trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncStream for T {}
pub(crate) type BoxStream = Box<dyn AsyncStream>;

/// An authentication request (`R` message).
#[derive(Debug)]
pub(crate) enum AuthRequest {
    Ok,
    Cleartext,
    Md5 { salt: [u8; 4] },
    Sasl { mechanisms: Vec<String> },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    Unsupported(i32),
}

/// A backend message on the control path. `ParameterStatus`, `NoticeResponse`
/// and `BackendKeyData` are handled inside [`Connection::recv`] and never
/// surface here.
#[derive(Debug)]
pub(crate) enum Backend {
    Auth(AuthRequest),
    ReadyForQuery,
    RowDescription,
    DataRow(Vec<Option<String>>),
    CommandComplete,
    EmptyQuery,
    Error(ServerError),
    CopyBothResponse,
    Other(u8),
}

impl Backend {
    /// For "unexpected message" errors.
    pub(crate) fn describe(&self) -> String {
        match self {
            Backend::Auth(r) => format!("authentication request {r:?}"),
            Backend::ReadyForQuery => "ReadyForQuery".into(),
            Backend::RowDescription => "RowDescription".into(),
            Backend::DataRow(_) => "DataRow".into(),
            Backend::CommandComplete => "CommandComplete".into(),
            Backend::EmptyQuery => "EmptyQueryResponse".into(),
            Backend::Error(e) => format!("ErrorResponse ({e})"),
            Backend::CopyBothResponse => "CopyBothResponse".into(),
            Backend::Other(tag) => format!("message type {:?}", char::from(*tag)),
        }
    }
}

pub(crate) struct Connection {
    pub(crate) reader: FrameReader<ReadHalf<BoxStream>>,
    pub(crate) writer: FrameWriter<WriteHalf<BoxStream>>,
    /// The TCP socket under the (possibly TLS) stream, for receive coalescing
    /// once replication starts.
    pub(crate) socket: RawFd,
    /// Latest value of each `ParameterStatus` (`server_version`, ...).
    pub(crate) params: HashMap<String, String>,
}

impl Connection {
    /// TCP connect (each resolved address in turn), then TLS as `cfg.sslmode`
    /// asks. No timeout here: the caller bounds the whole connect sequence.
    pub(crate) async fn open(
        cfg: &PgConfig,
        tls_config: Option<Arc<ClientConfig>>,
    ) -> Result<Self, ReplicationError> {
        let mut tcp = tcp_connect(&cfg.host, cfg.port).await?;
        let socket = tcp.as_raw_fd();
        let stream: BoxStream = match tls_config {
            None => Box::new(tcp),
            Some(tls_config) => {
                let mut req = bytes::BytesMut::new();
                frontend::ssl_request(&mut req);
                tcp.write_all(&req)
                    .await
                    .map_err(|e| ReplicationError::io("sending SSLRequest", e))?;
                // Exactly one byte: anything the server sent after it would be
                // unauthenticated plaintext (CVE-2021-23222), so never buffer ahead.
                let answer = tcp
                    .read_u8()
                    .await
                    .map_err(|e| ReplicationError::io("reading the SSLRequest answer", e))?;
                match answer {
                    b'S' => {
                        let name = tls::server_name(&cfg.host)?;
                        let tls = tokio_rustls::TlsConnector::from(tls_config)
                            .connect(name, tcp)
                            .await
                            .map_err(|source| ReplicationError::TlsHandshake {
                                host: cfg.host.clone(),
                                source,
                            })?;
                        Box::new(tls)
                    }
                    b'N' if cfg.sslmode == SslMode::Prefer => {
                        tracing::debug!(host = %cfg.host, "server declined TLS; continuing unencrypted (sslmode=prefer)");
                        Box::new(tcp)
                    }
                    b'N' => {
                        return Err(ReplicationError::TlsNotOffered {
                            sslmode: cfg.sslmode,
                        });
                    }
                    other => {
                        return Err(ReplicationError::Protocol(format!(
                            "unexpected answer {:?} to SSLRequest",
                            char::from(other)
                        )));
                    }
                }
            }
        };
        let (rd, wr) = tokio::io::split(stream);
        Ok(Connection {
            reader: FrameReader::new(rd),
            writer: FrameWriter::new(wr),
            socket,
            params: HashMap::new(),
        })
    }

    /// Sends the startup packet. `replication` is `Some("database")` for a
    /// walsender connection.
    pub(crate) async fn startup(
        &mut self,
        cfg: &PgConfig,
        replication: Option<&str>,
    ) -> Result<(), ReplicationError> {
        let options = session_options();
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &cfg.user),
            ("database", &cfg.dbname),
            ("application_name", &cfg.application_name),
            // pgoutput converts text values to the client encoding: pin it so the
            // stream is always UTF-8.
            ("client_encoding", "UTF8"),
            ("options", &options),
        ];
        if let Some(r) = replication {
            params.push(("replication", r));
        }
        frontend::startup_message(params, self.writer.buf())
            .map_err(|e| ReplicationError::Protocol(format!("encoding the startup packet: {e}")))?;
        self.writer.flush("sending the startup packet").await
    }

    /// The next control-path message.
    pub(crate) async fn recv(
        &mut self,
        context: &'static str,
    ) -> Result<Backend, ReplicationError> {
        loop {
            let frame = self.reader.read_frame(context).await?.freeze();
            let tag = frame[0];
            let payload = frame.slice(HEADER_LEN..);
            let body: &[u8] = &payload;
            let msg = match tag {
                b'S' => {
                    let (name, value) = parse_parameter_status(body)?;
                    tracing::debug!(%name, %value, "server parameter");
                    self.params.insert(name, value);
                    continue;
                }
                b'N' => {
                    log_notice(&parse_error_fields(body)?);
                    continue;
                }
                // We never cancel queries, so the cancel key is not kept.
                b'K' => continue,
                b'E' => Backend::Error(parse_error_fields(body)?),
                b'Z' => Backend::ReadyForQuery,
                b'T' => Backend::RowDescription,
                b'D' => Backend::DataRow(parse_data_row(body)?),
                b'C' => Backend::CommandComplete,
                b'I' => Backend::EmptyQuery,
                b'W' => Backend::CopyBothResponse,
                b'R' => {
                    if body.len() < 4 {
                        return Err(ReplicationError::Protocol(
                            "authentication request too short".into(),
                        ));
                    }
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let rest = payload.slice(4..);
                    let body = &body[4..];
                    Backend::Auth(match code {
                        0 => AuthRequest::Ok,
                        3 => AuthRequest::Cleartext,
                        5 => {
                            let salt: [u8; 4] = body.try_into().map_err(|_| {
                                ReplicationError::Protocol(
                                    "MD5 request without a 4-byte salt".into(),
                                )
                            })?;
                            AuthRequest::Md5 { salt }
                        }
                        10 => AuthRequest::Sasl {
                            mechanisms: parse_sasl_mechanisms(body)?,
                        },
                        11 => AuthRequest::SaslContinue(rest),
                        12 => AuthRequest::SaslFinal(rest),
                        other => AuthRequest::Unsupported(other),
                    })
                }
                other => Backend::Other(other),
            };
            return Ok(msg);
        }
    }

    /// Asks the server to close the session (best effort).
    pub(crate) async fn terminate(mut self) {
        frontend::terminate(self.writer.buf());
        let _ = self.writer.flush("sending Terminate").await;
        self.writer.shutdown().await;
    }
}

async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, ReplicationError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ReplicationError::Resolve {
            host: host.to_string(),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                // Status updates are tiny and latency-sensitive.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(source) => {
                last = Some(ReplicationError::Connect {
                    addr: addr.to_string(),
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| ReplicationError::Resolve {
        host: host.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
    }))
}

fn cstr(body: &[u8], what: &str) -> Result<String, ReplicationError> {
    let end = body.iter().position(|&b| b == 0).ok_or_else(|| {
        ReplicationError::Protocol(format!("{what}: string is not NUL-terminated"))
    })?;
    Ok(String::from_utf8_lossy(&body[..end]).into_owned())
}

fn parse_parameter_status(body: &[u8]) -> Result<(String, String), ReplicationError> {
    let end = body.iter().position(|&b| b == 0).ok_or_else(|| {
        ReplicationError::Protocol("ParameterStatus: name is not NUL-terminated".into())
    })?;
    let name = String::from_utf8_lossy(&body[..end]).into_owned();
    let value = cstr(&body[end + 1..], "ParameterStatus")?;
    Ok((name, value))
}

pub(crate) fn log_notice(n: &ServerError) {
    tracing::info!(
        severity = %n.severity,
        code = %n.code,
        detail = n.detail.as_deref().unwrap_or(""),
        "postgres notice: {}",
        n.message
    );
}

/// `server_version` as `server_version_num` computes it: `15.19 (Debian ...)`
/// → 150019, `9.6.24` → 90624, `16beta1` → 160000.
pub(crate) fn parse_server_version(v: &str) -> Option<u32> {
    let numeric: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if major >= 10 {
        Some(major * 10000 + minor)
    } else {
        let patch: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(major * 10000 + minor * 100 + patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(parse_server_version("15.19 (Debian 15.19-1)"), Some(150019));
        assert_eq!(parse_server_version("17.0"), Some(170000));
        assert_eq!(parse_server_version("16beta1"), Some(160000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("garbage"), None);
    }

    #[test]
    fn parameter_status() {
        assert_eq!(
            parse_parameter_status(b"TimeZone\0UTC\0").unwrap(),
            ("TimeZone".to_string(), "UTC".to_string())
        );
        assert!(parse_parameter_status(b"TimeZone\0UTC").is_err());
        assert!(parse_parameter_status(b"TimeZone").is_err());
    }
}
