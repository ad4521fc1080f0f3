//! The RabbitMQ stream protocol, as much of it as a producer (and the test
//! consumer) needs: frames, the connection handshake and request/response.
//!
//! A frame is a big-endian `u32` size followed by `key u16, version u16` and
//! the command; requests carry a correlation id and their response has the
//! same key with the top bit set. Strings are `i16` length + UTF-8, byte
//! strings `i32` length + bytes, arrays an `i32` count. Only version 1 of each
//! command is used: RabbitMQ 3.9 and 3.10 know nothing newer (they close the
//! connection on `ExchangeCommandVersions`, key 0x1b).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::tls::Tls;

/// The receiving half of a connection, plain TCP or TLS.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The sending half of a connection, plain TCP or TLS.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

pub const DECLARE_PUBLISHER: u16 = 0x0001;
pub const PUBLISH: u16 = 0x0002;
pub const PUBLISH_CONFIRM: u16 = 0x0003;
pub const PUBLISH_ERROR: u16 = 0x0004;
pub const QUERY_PUBLISHER_SEQUENCE: u16 = 0x0005;
pub const SUBSCRIBE: u16 = 0x0007;
pub const DELIVER: u16 = 0x0008;
pub const CREDIT: u16 = 0x0009;
pub const CREATE: u16 = 0x000d;
pub const DELETE: u16 = 0x000e;
pub const METADATA_UPDATE: u16 = 0x0010;
pub const PEER_PROPERTIES: u16 = 0x0011;
pub const SASL_HANDSHAKE: u16 = 0x0012;
pub const SASL_AUTHENTICATE: u16 = 0x0013;
pub const TUNE: u16 = 0x0014;
pub const OPEN: u16 = 0x0015;
pub const CLOSE: u16 = 0x0016;
pub const HEARTBEAT: u16 = 0x0017;
pub const RESPONSE: u16 = 0x8000;

pub const OK: u16 = 0x01;
pub const STREAM_DOES_NOT_EXIST: u16 = 0x02;
pub const STREAM_ALREADY_EXISTS: u16 = 0x05;

/// The largest frame we agree to send: the broker's `stream.frame_max`
/// (1 MiB by default) decides, up to this.
pub const FRAME_MAX: u32 = 64 << 20;

/// Text for a response code, for error messages.
pub fn code_text(code: u16) -> &'static str {
    match code {
        0x01 => "ok",
        0x02 => "stream does not exist",
        0x03 => "subscription id already exists",
        0x04 => "subscription id does not exist",
        0x05 => "stream already exists",
        0x06 => "stream not available",
        0x07 => "SASL mechanism not supported",
        // Named like AMQP's, so the supervisor gives up instead of retrying
        // (`SinkError::is_retryable`): an operator has to fix these.
        0x08 => "ACCESS_REFUSED: authentication failure",
        0x09 => "SASL error",
        0x0a => "SASL challenge",
        0x0b => "ACCESS_REFUSED: SASL authentication failure (loopback)",
        0x0c => "ACCESS_REFUSED: virtual host access failure",
        0x0d => "unknown frame",
        0x0e => "frame too large",
        0x0f => "internal error",
        0x10 => "ACCESS_REFUSED: access refused",
        0x11 => "precondition failed",
        0x12 => "publisher does not exist",
        _ => "unknown response code",
    }
}

/// Builds one frame; [`Frame::finish`] fills in the size.
pub struct Frame(Vec<u8>);

impl Frame {
    pub fn new(key: u16) -> Frame {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&key.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        Frame(b)
    }

    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A protocol string; callers keep names short (checked where configured).
    pub fn str(mut self, v: &str) -> Self {
        let len = i16::try_from(v.len()).unwrap_or(i16::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(&v.as_bytes()[..len as usize]);
        self
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as i32).to_be_bytes());
        self.0.extend_from_slice(v);
        self
    }
    /// A `[key value]` array of strings.
    pub fn props(mut self, props: &[(&str, &str)]) -> Self {
        self = self.u32(props.len() as u32);
        for (k, v) in props {
            self = self.str(k).str(v);
        }
        self
    }
    pub fn finish(mut self) -> Vec<u8> {
        let size = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&size.to_be_bytes());
        self.0
    }
}

/// Reads the fields of a received frame (without its size prefix).
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| {
            format!(
                "truncated frame: wanted {n} bytes at {} of {}",
                self.pos,
                self.buf.len()
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    pub fn str(&mut self) -> Result<String, String> {
        let len = self.u16()? as i16;
        if len < 0 {
            return Ok(String::new());
        }
        Ok(String::from_utf8_lossy(self.take(len as usize)?).into_owned())
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Where to connect, parsed from `rabbitmq-stream://user:pass@host:port/vhost`
/// or `rabbitmq-stream+tls://...[?cacertfile=/path/ca.pem]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
    /// `Some` for `rabbitmq-stream+tls://`.
    pub tls: Option<Tls>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls.is_some() {
            TLS_SCHEME
        } else {
            SCHEME
        };
        write!(
            f,
            "{scheme}{}:***@{}:{}/{}",
            self.user, self.host, self.port, self.vhost
        )
    }
}

pub const SCHEME: &str = "rabbitmq-stream://";
pub const TLS_SCHEME: &str = "rabbitmq-stream+tls://";

impl Endpoint {
    /// Parses a stream URL: user and password default to guest, the port to
    /// 5552 (5551 with TLS), the vhost (percent-encoded path, `%2f` for `/`)
    /// to `/`. The only query parameter is `cacertfile` (TLS only).
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix(SCHEME) {
            (rest, false, 5552)
        } else if let Some(rest) = url.strip_prefix(TLS_SCHEME) {
            (rest, true, 5551)
        } else {
            return Err(format!("expected a {SCHEME} or {TLS_SCHEME} URL"));
        };
        let rest = rest.split('#').next().unwrap_or(rest);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut cacertfile = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "cacertfile" if tls => cacertfile = Some(percent_decode(value)?.into()),
                "cacertfile" => {
                    return Err(format!(
                        "cacertfile is a TLS setting: use a {TLS_SCHEME} URL"
                    ));
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} in the stream URL (known: cacertfile)"
                    ));
                }
            }
        }
        let tls = tls.then_some(Tls { cacertfile });
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (creds, hostport) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (user, password) = match creds {
            Some(c) => {
                let (u, p) = c.split_once(':').unwrap_or((c, ""));
                (percent_decode(u)?, percent_decode(p)?)
            }
            None => ("guest".to_owned(), "guest".to_owned()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("invalid port {p:?} in the stream URL"))?,
            ),
            _ => (hostport, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("the stream URL has no host".into());
        }
        let vhost = if path.is_empty() {
            "/".to_owned()
        } else {
            percent_decode(path)?
        };
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            user,
            password,
            vhost,
            tls,
        })
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// Reads one frame (without its size prefix).
pub async fn read_frame(r: &mut BufReader<ReadHalf>) -> std::io::Result<Vec<u8>> {
    let size = r.read_u32().await?;
    if !(4..=FRAME_MAX).contains(&size) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {size} bytes"),
        ));
    }
    let mut buf = vec![0; size as usize];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// An open, authenticated connection, before its halves go to their tasks.
pub struct Conn {
    pub read: BufReader<ReadHalf>,
    pub write: WriteHalf,
    pub frame_max: u32,
    /// Seconds; 0 = none.
    pub heartbeat: u32,
    correlation: u32,
}

/// A response: its code and the bytes after the code.
pub struct Response {
    pub code: u16,
    pub body: Vec<u8>,
}

impl Conn {
    /// Connects, authenticates (PLAIN) and opens the vhost; `timeout` bounds
    /// each step.
    pub async fn open(ep: &Endpoint, name: &str, timeout: Duration) -> Result<Conn, String> {
        let step = |what: &'static str| move |_| format!("{what}: no answer within {timeout:?}");
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((ep.host.as_str(), ep.port)))
            .await
            .map_err(step("TCP connect"))?
            .map_err(|e| format!("TCP connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (read, write): (ReadHalf, WriteHalf) = match &ep.tls {
            None => {
                let (r, w) = tcp.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(tls) => {
                let stream = tokio::time::timeout(timeout, tls.connect(&ep.host, tcp))
                    .await
                    .map_err(step("TLS handshake"))??;
                let (r, w) = tokio::io::split(stream);
                (Box::new(r), Box::new(w))
            }
        };
        let mut conn = Conn {
            read: BufReader::with_capacity(64 * 1024, read),
            write,
            frame_max: FRAME_MAX,
            heartbeat: 60,
            correlation: 0,
        };
        let version = env!("CARGO_PKG_VERSION");
        let props = [
            ("connection_name", name),
            ("product", "odoo-cdc"),
            ("version", version),
            ("platform", "Rust"),
        ];
        let r = conn
            .call(timeout, "peer properties", |c| {
                Frame::new(PEER_PROPERTIES).u32(c).props(&props)
            })
            .await?;
        expect_ok("peer properties", r.code)?;
        let r = conn
            .call(timeout, "SASL handshake", |c| {
                Frame::new(SASL_HANDSHAKE).u32(c)
            })
            .await?;
        expect_ok("SASL handshake", r.code)?;
        let mut rd = Reader::new(&r.body);
        let n = rd.u32()?;
        let mut mechanisms = Vec::new();
        for _ in 0..n {
            mechanisms.push(rd.str()?);
        }
        if !mechanisms.iter().any(|m| m == "PLAIN") {
            return Err(format!(
                "the broker offers no PLAIN authentication (only {mechanisms:?})"
            ));
        }
        let mut plain = vec![0u8];
        plain.extend_from_slice(ep.user.as_bytes());
        plain.push(0);
        plain.extend_from_slice(ep.password.as_bytes());
        let r = conn
            .call(timeout, "SASL authenticate", |c| {
                Frame::new(SASL_AUTHENTICATE)
                    .u32(c)
                    .str("PLAIN")
                    .bytes(&plain)
            })
            .await?;
        expect_ok("authentication", r.code)?;
        // The broker proposes frame size and heartbeat; we agree, capped.
        let tune = tokio::time::timeout(timeout, read_frame(&mut conn.read))
            .await
            .map_err(step("tune"))?
            .map_err(|e| format!("tune: {e}"))?;
        let mut rd = Reader::new(&tune);
        if rd.u16()? != TUNE {
            return Err("expected a tune frame after authentication".into());
        }
        rd.u16()?;
        let (frame_max, heartbeat) = (rd.u32()?, rd.u32()?);
        conn.frame_max = if frame_max == 0 {
            FRAME_MAX
        } else {
            frame_max.min(FRAME_MAX)
        };
        conn.heartbeat = heartbeat;
        let reply = Frame::new(TUNE).u32(conn.frame_max).u32(heartbeat).finish();
        conn.send(&reply, timeout).await?;
        let r = conn
            .call(timeout, "open", |c| Frame::new(OPEN).u32(c).str(&ep.vhost))
            .await?;
        if r.code != OK {
            return Err(format!(
                "opening vhost {:?}: {}",
                ep.vhost,
                code_text(r.code)
            ));
        }
        Ok(conn)
    }

    pub async fn send(&mut self, frame: &[u8], timeout: Duration) -> Result<(), String> {
        tokio::time::timeout(timeout, self.write.write_all(frame))
            .await
            .map_err(|_| format!("write: no progress within {timeout:?}"))?
            .map_err(|e| format!("write: {e}"))
    }

    /// Sends a request built with the next correlation id and waits for its
    /// response, skipping heartbeats. A close from the broker is an error.
    pub async fn call(
        &mut self,
        timeout: Duration,
        what: &str,
        build: impl FnOnce(u32) -> Frame,
    ) -> Result<Response, String> {
        self.correlation += 1;
        let correlation = self.correlation;
        let frame = build(correlation);
        let mut rd = Reader::new(&frame.0[4..6]);
        let key = rd.u16()?;
        let frame = frame.finish();
        self.send(&frame, timeout).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let buf = tokio::time::timeout_at(deadline, read_frame(&mut self.read))
                .await
                .map_err(|_| format!("{what}: no answer within {timeout:?}"))?
                .map_err(|e| format!("{what}: connection closed ({e})"))?;
            let mut rd = Reader::new(&buf);
            let got = rd.u16()?;
            rd.u16()?;
            if got == key | RESPONSE {
                if rd.u32()? != correlation {
                    continue;
                }
                let code = rd.u16()?;
                let body = buf[buf.len() - rd.remaining()..].to_vec();
                return Ok(Response { code, body });
            }
            if got == CLOSE {
                rd.u32()?;
                let code = rd.u16()?;
                let reason = rd.str()?;
                return Err(format!(
                    "{what}: the broker closed the connection ({}: {reason})",
                    code_text(code)
                ));
            }
            // Heartbeats, metadata updates: nothing to do during setup.
        }
    }
}

impl Conn {
    /// `QueryPublisherSequence`: the producer's last stored publishing id in
    /// the body when the code is OK.
    pub async fn query_publisher_sequence(
        &mut self,
        timeout: Duration,
        producer: &str,
        stream: &str,
    ) -> Result<Response, String> {
        self.call(timeout, "querying the producer's sequence", |c| {
            Frame::new(QUERY_PUBLISHER_SEQUENCE)
                .u32(c)
                .str(producer)
                .str(stream)
        })
        .await
    }

    /// Says goodbye without waiting for the answer (the socket closes on drop).
    pub async fn close(mut self, timeout: Duration, reason: &str) {
        let _ = self.send(&close_frame(reason), timeout).await;
    }
}

/// A `Close` request; its answer is not correlated with anything.
pub fn close_frame(reason: &str) -> Vec<u8> {
    Frame::new(CLOSE).u32(u32::MAX).u16(OK).str(reason).finish()
}

pub fn expect_ok(what: &str, code: u16) -> Result<(), String> {
    if code == OK {
        Ok(())
    } else {
        Err(format!("{what}: {}", code_text(code)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults() {
        let e = Endpoint::parse("rabbitmq-stream://u:p%40ss@h:5553/%2f").unwrap();
        assert_eq!(
            (
                e.host.as_str(),
                e.port,
                e.user.as_str(),
                e.password.as_str()
            ),
            ("h", 5553, "u", "p@ss")
        );
        assert_eq!(e.vhost, "/");
        let e = Endpoint::parse("rabbitmq-stream://localhost").unwrap();
        assert_eq!(
            (e.port, e.vhost.as_str(), e.user.as_str()),
            (5552, "/", "guest")
        );
        let e = Endpoint::parse("rabbitmq-stream://[::1]:6000/prod").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.vhost.as_str()),
            ("::1", 6000, "prod")
        );
        assert!(Endpoint::parse("amqp://h").is_err());
        assert!(e.tls.is_none());
        assert!(Endpoint::parse("rabbitmq-stream://h:x").is_err());
        assert!(!format!("{e:?}").contains("guest:guest"));
    }

    #[test]
    fn tls_urls_default_to_5551_and_take_a_ca_file() {
        let e = Endpoint::parse("rabbitmq-stream+tls://u:p@broker.example/odoo").unwrap();
        assert_eq!((e.port, e.vhost.as_str()), (5551, "odoo"));
        assert_eq!(e.tls, Some(Tls { cacertfile: None }));
        assert!(format!("{e:?}").starts_with("rabbitmq-stream+tls://u:***@"));
        let e = Endpoint::parse(
            "rabbitmq-stream+tls://broker.example:6551/%2f?cacertfile=/etc/ssl/my%20ca.pem",
        )
        .unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.vhost.as_str()),
            ("broker.example", 6551, "/")
        );
        assert_eq!(
            e.tls.unwrap().cacertfile.as_deref(),
            Some(std::path::Path::new("/etc/ssl/my ca.pem"))
        );
        // Errors name what is wrong.
        let e = Endpoint::parse("rabbitmq-stream://h?cacertfile=/ca.pem").unwrap_err();
        assert!(e.contains("rabbitmq-stream+tls://"), "{e}");
        let e = Endpoint::parse("rabbitmq-stream+tls://h?verify=none").unwrap_err();
        assert!(e.contains("\"verify\""), "{e}");
        let e = Endpoint::parse("https://h").unwrap_err();
        assert!(e.contains("rabbitmq-stream+tls://"), "{e}");
    }

    #[test]
    fn frames_carry_their_size() {
        let f = Frame::new(OPEN).u32(7).str("/").finish();
        assert_eq!(f, [0, 0, 0, 11, 0, 0x15, 0, 1, 0, 0, 0, 7, 0, 1, b'/']);
    }
}
