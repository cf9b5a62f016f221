//! Client authentication: pgswitch plays the server's part of the exchange
//! against secrets derived from proxy.toml, before any server connection is
//! involved.

pub mod md5;
pub mod query;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::client_conn::{ClientConn, ClientError};
use crate::config::{AuthMethod, Config};
use crate::protocol::error::{sqlstate, SqlState};
use crate::protocol::framing::read_cbytes;
use crate::protocol::messages;
use crate::protocol::PgError;
pub use crate::scram::client::{ClientKey, ScramKeys};
use crate::scram::{self, ScramExchange, ScramSecret};

/// Secrets derived from the configured passwords, computed once per load
/// (PBKDF2 is deliberately slow and must not run per login).
pub struct UserSecrets {
    scram: HashMap<String, Arc<ScramSecret>>,
    md5: HashMap<String, String>,
    /// Keys the mock secrets of unknown users, so they are stable per user but
    /// unpredictable from outside.
    mock_key: [u8; 32],
}

impl UserSecrets {
    pub fn derive(config: &Config) -> UserSecrets {
        let mut scram = HashMap::new();
        let mut md5 = HashMap::new();
        for user in &config.users {
            if let Some(password) = &user.password {
                scram.insert(
                    user.name.clone(),
                    Arc::new(ScramSecret::from_password(password)),
                );
                md5.insert(
                    user.name.clone(),
                    md5::md5_password_hash(&user.name, password),
                );
            } else if let Some(secret) = &user.scram {
                scram.insert(user.name.clone(), secret.clone());
            }
        }
        UserSecrets {
            scram,
            md5,
            mock_key: rand::random(),
        }
    }

    /// Whether `[[users]]` lists `user` with a secret.
    pub fn contains(&self, user: &str) -> bool {
        self.scram.contains_key(user) || self.md5.contains_key(user)
    }
}

fn auth_failed(user: &str) -> PgError {
    PgError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
}

/// Runs the configured authentication exchange. On success the client has
/// been sent AuthenticationOk.
///
/// `looked_up` is the secret auth_query found for a user `secrets` does not
/// list. A successful SCRAM exchange returns the client's ClientKey with the
/// secret it matched, for SCRAM pass-through to the servers.
pub async fn authenticate(
    conn: &mut ClientConn,
    method: AuthMethod,
    user: &str,
    secrets: &UserSecrets,
    looked_up: Option<Arc<ScramSecret>>,
) -> Result<Option<ScramKeys>, ClientError> {
    let keys = match method {
        AuthMethod::Trust => None,
        AuthMethod::ScramSha256 => Some(scram_exchange(conn, user, secrets, looked_up).await?),
        AuthMethod::Md5 => {
            md5_exchange(conn, user, secrets).await?;
            None
        }
    };
    let mut out = BytesMut::new();
    messages::authentication(&mut out, messages::AUTH_OK, &[]);
    conn.stream.write_all(&out).await?;
    Ok(keys)
}

async fn scram_exchange(
    conn: &mut ClientConn,
    user: &str,
    secrets: &UserSecrets,
    looked_up: Option<Arc<ScramSecret>>,
) -> Result<ScramKeys, ClientError> {
    // Unknown users run the same exchange against a mock secret and fail at the
    // same step with the same message, so a login attempt can't probe user names.
    let (secret, mock) = match secrets.scram.get(user).cloned().or(looked_up) {
        Some(secret) => (secret, false),
        None => (Arc::new(ScramSecret::mock(user, &secrets.mock_key)), true),
    };
    let mut exchange = ScramExchange::new(&secret, mock);
    let mut out = BytesMut::new();
    messages::authentication(&mut out, messages::AUTH_SASL, scram::mechanisms());
    conn.stream.write_all(&out).await?;

    let initial = conn.read_auth_message().await?;
    let (mechanism, data) = split_sasl_initial(&initial)?;
    let server_first = exchange
        .client_first(mechanism, data)
        .map_err(|e| scram_error(e, user))?;
    out.clear();
    messages::authentication(&mut out, messages::AUTH_SASL_CONTINUE, &server_first);
    conn.stream.write_all(&out).await?;

    let response = conn.read_auth_message().await?;
    let server_final = exchange
        .client_final(&response)
        .map_err(|e| scram_error(e, user))?;
    out.clear();
    messages::authentication(&mut out, messages::AUTH_SASL_FINAL, &server_final);
    conn.stream.write_all(&out).await?;
    // client_final succeeded, so the exchange holds the key; a mock never gets here.
    let client_key = exchange
        .client_key()
        .ok_or_else(|| ClientError::Pg(auth_failed(user)))?;
    Ok(ScramKeys {
        client_key: ClientKey(client_key),
        secret,
    })
}

fn scram_error(e: scram::ScramError, user: &str) -> ClientError {
    tracing::debug!(user, error = %e, "SCRAM exchange failed");
    match SqlState::parse(e.sqlstate()) {
        sqlstate::INVALID_PASSWORD => ClientError::Pg(auth_failed(user)),
        code => ClientError::Pg(PgError::fatal(code, format!("SCRAM authentication: {e}"))),
    }
}

/// SASLInitialResponse: mechanism name, then a length-prefixed payload.
fn split_sasl_initial(body: &[u8]) -> Result<(&str, &[u8]), ClientError> {
    let malformed = || ClientError::Pg(PgError::protocol("malformed SASLInitialResponse message"));
    let mut rest = body;
    let mechanism = read_cbytes(&mut rest).map_err(|_| malformed())?;
    let mechanism = std::str::from_utf8(mechanism).map_err(|_| malformed())?;
    if rest.len() < 4 {
        return Err(malformed());
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(malformed());
    }
    Ok((mechanism, data))
}

async fn md5_exchange(
    conn: &mut ClientConn,
    user: &str,
    secrets: &UserSecrets,
) -> Result<(), ClientError> {
    let salt: [u8; 4] = rand::random();
    let mut out = BytesMut::new();
    messages::authentication(&mut out, messages::AUTH_MD5, &salt);
    conn.stream.write_all(&out).await?;
    let response = conn.read_auth_message().await?;
    // Unknown users are checked against a hash nobody can match, for uniform timing.
    let stored = secrets
        .md5
        .get(user)
        .cloned()
        .unwrap_or_else(|| md5::md5_password_hash(user, &hex(&secrets.mock_key)));
    let known = secrets.md5.contains_key(user);
    if md5::verify_md5_response(&stored, salt, &response) && known {
        Ok(())
    } else {
        Err(ClientError::Pg(auth_failed(user)))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
