//! Answering the server's authentication request: trust, cleartext, MD5 and
//! SCRAM-SHA-256 (without channel binding).

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;

use super::config::PgConfig;
use super::connection::{AuthRequest, Backend, Connection};
use super::error::ReplicationError;
use crate::secret::Secret;

/// Runs the authentication exchange up to `AuthenticationOk`.
pub(crate) async fn authenticate(
    conn: &mut Connection,
    cfg: &PgConfig,
) -> Result<(), ReplicationError> {
    const CONTEXT: &str = "authenticating";
    let user = &cfg.user;
    let auth_err = |reason: String| ReplicationError::Auth {
        user: user.clone(),
        reason,
    };
    let password = || {
        cfg.password_for_auth()
            .ok_or_else(|| ReplicationError::PasswordRequired { user: user.clone() })
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        let req = match conn.recv(CONTEXT).await? {
            Backend::Auth(req) => req,
            Backend::Error(e) => return Err(ReplicationError::Server(e)),
            other => {
                return Err(ReplicationError::Protocol(format!(
                    "expected an authentication request, got {}",
                    other.describe()
                )));
            }
        };
        match req {
            AuthRequest::Ok => {
                if scram.is_some() {
                    // The server skipped SASLFinal: it never proved it knows the
                    // password, so this could be an impostor.
                    return Err(auth_err(
                        "the server ended SCRAM without sending its signature".into(),
                    ));
                }
                return Ok(());
            }
            AuthRequest::Cleartext => {
                let pw = password()?;
                send_password(conn, pw.expose().as_bytes()).await?;
            }
            AuthRequest::Md5 { salt } => {
                let pw: Secret = password()?;
                let hashed = md5_hash(user.as_bytes(), pw.expose().as_bytes(), salt);
                send_password(conn, hashed.as_bytes()).await?;
            }
            AuthRequest::Sasl { mechanisms } => {
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(auth_err(format!(
                        "the server offers only SASL mechanisms {mechanisms:?}; SCRAM-SHA-256 is required"
                    )));
                }
                let pw = password()?;
                // "n": we do not do channel binding. Saying "y" would make a server
                // that offers SCRAM-SHA-256-PLUS suspect a downgrade and refuse.
                let s = ScramSha256::new(pw.expose().as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), conn.writer.buf())
                    .map_err(|e| auth_err(format!("encoding SASLInitialResponse: {e}")))?;
                conn.writer.flush(CONTEXT).await?;
                scram = Some(s);
            }
            AuthRequest::SaslContinue(data) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| ReplicationError::Protocol("SASLContinue before SASL".into()))?;
                s.update(&data)
                    .map_err(|e| auth_err(format!("SCRAM server-first message: {e}")))?;
                frontend::sasl_response(s.message(), conn.writer.buf())
                    .map_err(|e| auth_err(format!("encoding SASLResponse: {e}")))?;
                conn.writer.flush(CONTEXT).await?;
            }
            AuthRequest::SaslFinal(data) => {
                let mut s = scram
                    .take()
                    .ok_or_else(|| ReplicationError::Protocol("SASLFinal before SASL".into()))?;
                s.finish(&data).map_err(|e| {
                    auth_err(format!("the server's SCRAM signature did not verify: {e}"))
                })?;
            }
            AuthRequest::Unsupported(code) => {
                return Err(auth_err(format!(
                    "the server asks for authentication method {code} ({}), which is not supported (use trust, password, md5 or scram-sha-256)",
                    method_name(code)
                )));
            }
        }
    }
}

async fn send_password(conn: &mut Connection, pw: &[u8]) -> Result<(), ReplicationError> {
    frontend::password_message(pw, conn.writer.buf())
        .map_err(|e| ReplicationError::Protocol(format!("encoding PasswordMessage: {e}")))?;
    conn.writer.flush("sending the password").await
}

fn method_name(code: i32) -> &'static str {
    match code {
        2 => "Kerberos V5",
        6 => "SCM credentials",
        7 | 8 => "GSSAPI",
        9 => "SSPI",
        _ => "unknown",
    }
}
