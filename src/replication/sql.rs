//! Ordinary SQL connections (tokio-postgres) with the same host, credentials, TLS
//! policy and session settings as the replication connection, so a snapshot
//! query renders values exactly as the WAL stream does.

use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::tls::NoTls;

use super::config::{PgConfig, SslMode, session_options};
use super::error::ReplicationError;
use super::tls::{self, MakeRustlsConnect};

/// Opens a SQL connection and spawns its connection task on the current tokio
/// runtime. `cfg.connect_timeout` bounds the whole connect; statements have no
/// timeout of their own (wrap them, or `SET statement_timeout`).
pub async fn connect(cfg: &PgConfig) -> Result<tokio_postgres::Client, ReplicationError> {
    let tls_config = tls::client_config(cfg)?;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.dbname)
        .application_name(&cfg.application_name)
        .options(session_options())
        .connect_timeout(cfg.connect_timeout);
    if let Some(pw) = cfg.password_for_auth() {
        pg.password(pw.expose());
    }
    let client = match tls_config {
        None => {
            pg.ssl_mode(PgSslMode::Disable);
            let (client, connection) = bounded(cfg, pg.connect(NoTls))
                .await?
                .map_err(|e| connect_error(cfg, e))?;
            spawn_connection(connection);
            client
        }
        Some(tls_config) => {
            // tokio-postgres knows only disable/prefer/require; the verify-* checks
            // happen in our certificate verifier.
            pg.ssl_mode(if cfg.sslmode == SslMode::Prefer {
                PgSslMode::Prefer
            } else {
                PgSslMode::Require
            });
            let (client, connection) = bounded(cfg, pg.connect(MakeRustlsConnect::new(tls_config)))
                .await?
                .map_err(|e| connect_error(cfg, e))?;
            spawn_connection(connection);
            client
        }
    };
    Ok(client)
}

/// tokio-postgres says only "error connecting to server: Connection refused";
/// the operator needs to know which server (never the password).
fn connect_error(cfg: &PgConfig, source: tokio_postgres::Error) -> ReplicationError {
    ReplicationError::SqlConnect {
        addr: format!("{}:{}", cfg.host, cfg.port),
        source,
    }
}

/// tokio-postgres' own `connect_timeout` covers only the TCP connect; this bounds
/// TLS and authentication too.
async fn bounded<T>(
    cfg: &PgConfig,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ReplicationError> {
    tokio::time::timeout(cfg.connect_timeout, fut)
        .await
        .map_err(|_| ReplicationError::Timeout {
            what: format!("SQL connection to {}:{}", cfg.host, cfg.port),
            after: cfg.connect_timeout,
        })
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "SQL connection ended with an error");
        }
    });
}
