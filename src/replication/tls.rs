//! TLS for both connection kinds, with rustls and libpq's `sslmode` semantics.
//!
//! Every config is built with an explicit aws-lc-rs provider, so nothing depends
//! on a process-wide default provider having been installed.

use std::fs::File;
use std::future::Future;
use std::io::{self, BufReader};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::config::{PgConfig, SslMode};
use super::error::ReplicationError;

/// The rustls client config for `cfg.sslmode`, or `None` for `disable`.
///
/// Reads `sslrootcert` now, so a missing or empty file is reported before any
/// connection attempt.
pub(crate) fn client_config(cfg: &PgConfig) -> Result<Option<Arc<ClientConfig>>, ReplicationError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match cfg.sslmode {
        SslMode::Disable => return Ok(None),
        // libpq: `require` with a root certificate file behaves like `verify-ca`.
        SslMode::Require if cfg.sslrootcert.is_some() => {
            Arc::new(ChainOnly(webpki_verifier(cfg, &provider)?))
        }
        SslMode::Prefer | SslMode::Require => Arc::new(AnyCertificate(provider.clone())),
        SslMode::VerifyCa => Arc::new(ChainOnly(webpki_verifier(cfg, &provider)?)),
        SslMode::VerifyFull => webpki_verifier(cfg, &provider)?,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplicationError::TlsConfig(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What libpq 17 sends; servers before 17 ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The name the certificate must carry: `cfg.host`, a DNS name or an IP address.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, ReplicationError> {
    ServerName::try_from(host.to_string()).map_err(|_| {
        ReplicationError::TlsConfig(format!(
            "host {host:?} is neither a valid DNS name nor an IP address"
        ))
    })
}

fn root_store(cfg: &PgConfig) -> Result<RootCertStore, ReplicationError> {
    let Some(path) = &cfg.sslrootcert else {
        return Ok(webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect());
    };
    pem_roots(path, "sslrootcert").map_err(ReplicationError::TlsConfig)
}

/// The PEM certificates of the file that `setting` (`sslrootcert`, the stream
/// URL's `cacertfile`) names, as trust roots. Errors name the setting and the
/// file: cannot open or read it, a bad certificate, no certificate at all.
pub(crate) fn pem_roots(path: &std::path::Path, setting: &str) -> Result<RootCertStore, String> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| format!("cannot open {setting} {shown}: {e}"))?;
    let mut store = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
        let cert = cert.map_err(|e| format!("cannot read {setting} {shown}: {e}"))?;
        store
            .add(cert)
            .map_err(|e| format!("bad certificate in {setting} {shown}: {e}"))?;
    }
    if store.is_empty() {
        return Err(format!("{setting} {shown} holds no PEM certificate"));
    }
    Ok(store)
}

fn webpki_verifier(
    cfg: &PgConfig,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, ReplicationError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(cfg)?), provider.clone())
        .build()
        .map_err(|e| ReplicationError::TlsConfig(e.to_string()))
}

/// `verify-ca`: the chain must lead to a trusted root, the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means the
        // chain was fine.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require`: encryption without authentication of the server, as libpq
/// does. The handshake signature is still checked, so the peer holds the key of
/// the certificate it presented.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `tokio_postgres::tls::MakeTlsConnect` over tokio-rustls, so SQL connections use
/// the same TLS policy as the replication connection.
#[derive(Clone)]
pub(crate) struct MakeRustlsConnect {
    config: Arc<ClientConfig>,
}

impl MakeRustlsConnect {
    pub(crate) fn new(config: Arc<ClientConfig>) -> Self {
        MakeRustlsConnect { config }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = ReplicationError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, ReplicationError> {
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name: server_name(domain)?,
        })
    }
}

pub(crate) struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

type ConnectFuture<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = ConnectFuture<S>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// A TLS stream for tokio-postgres. Channel binding is not offered: SCRAM then
/// runs without it, as our replication connection does.
pub(crate) struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> PgConfig {
        url.parse().unwrap()
    }

    #[test]
    fn disable_builds_nothing_and_others_build_a_config() {
        assert!(
            client_config(&cfg("postgres://u@h/d?sslmode=disable"))
                .unwrap()
                .is_none()
        );
        for mode in ["prefer", "require", "verify-ca", "verify-full"] {
            let c = client_config(&cfg(&format!("postgres://u@h/d?sslmode={mode}"))).unwrap();
            assert!(c.is_some(), "{mode}");
        }
    }

    #[test]
    fn unreadable_root_cert_is_a_config_error() {
        let err = client_config(&cfg(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ))
        .unwrap_err();
        assert!(matches!(err, ReplicationError::TlsConfig(_)), "{err}");
        assert!(!err.is_retryable());

        let empty = tempfile::NamedTempFile::new().unwrap();
        let url = format!(
            "postgres://u@h/d?sslmode=verify-ca&sslrootcert={}",
            empty.path().display()
        );
        let err = client_config(&cfg(&url)).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn server_names() {
        assert!(server_name("localhost").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("::1").is_ok());
        assert!(server_name("bad name").is_err());
    }
}
