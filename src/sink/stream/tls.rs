//! TLS for the stream connection (`rabbitmq-stream+tls://`, RabbitMQ's
//! `stream.listeners.ssl`, port 5551 by default).
//!
//! The broker's certificate is always verified, chain and name: against the
//! PEM file of the URL's `cacertfile` parameter when given (a private CA, as
//! most RabbitMQ deployments use), otherwise against the platform's trust
//! store, the same verifier the AMQP sink's `amqps://` uses. There is no
//! "accept any certificate" mode: a connector that sends a database's changes
//! to whoever answers would defeat the point of TLS.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::replication::pem_roots;

/// What `rabbitmq-stream+tls://` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// PEM certificates to trust instead of the platform's store.
    pub cacertfile: Option<PathBuf>,
}

impl Tls {
    /// The rustls config; reads `cacertfile` now, so a missing or empty file
    /// is reported as such rather than as a failed handshake.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match &self.cacertfile {
            Some(path) => WebPkiServerVerifier::builder_with_provider(
                Arc::new(pem_roots(path, "cacertfile")?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("cacertfile {}: {e}", path.display()))?,
            None => Arc::new(
                rustls_platform_verifier::Verifier::new(provider.clone())
                    .map_err(|e| format!("the platform's certificate verifier: {e}"))?,
            ),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The TLS handshake over `tcp`, verifying the certificate names `host`.
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, String> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("host {host:?} is neither a DNS name nor an IP address"))?;
        tokio_rustls::TlsConnector::from(self.client_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let missing = Tls {
            cacertfile: Some("/nonexistent/ca.pem".into()),
        };
        let e = missing.client_config().unwrap_err();
        assert!(
            e.contains("cannot open cacertfile /nonexistent/ca.pem"),
            "{e}"
        );

        let empty = tempfile::NamedTempFile::new().unwrap();
        let e = Tls {
            cacertfile: Some(empty.path().into()),
        }
        .client_config()
        .unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }

    #[test]
    fn without_a_ca_file_the_platform_store_is_used() {
        assert!(Tls { cacertfile: None }.client_config().is_ok());
    }
}
