//! SCRAM-SHA-256 client side without the password: SCRAM pass-through.
//!
//! After a client proved itself to pgswitch against a secret, pgswitch holds
//! that client's ClientKey (see [`super::ScramExchange::client_key`]).
//! With the ClientKey and the secret (StoredKey, ServerKey) pgswitch can log in
//! to a server that stores the *same* secret for the role, as the client could:
//!
//! - ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage), with
//!   StoredKey = SHA-256(ClientKey);
//! - the server proves itself with HMAC(ServerKey, AuthMessage), checked
//!   against the ServerKey of the secret.
//!
//! The salt and iteration count the server sends must be the secret's: a
//! different secret on the server (another salt) means the ClientKey is not
//! the one the server expects, and the login cannot work. That is reported as
//! [`ScramClientError::SecretMismatch`] instead of sending a proof that would
//! only fail.
//!
//! Sans-IO like the server side: [`ScramClient::client_first`] for the
//! SASLInitialResponse, [`ScramClient::server_first`] for
//! AuthenticationSASLContinue (returns the SASLResponse), and
//! [`ScramClient::server_final`] for AuthenticationSASLFinal.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{hmac_sha256, xor, ScramSecret};

/// A client's SCRAM ClientKey: enough to log in as that client wherever the
/// same secret is stored, so it is handled like a password (memory only,
/// never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey(pub [u8; 32]);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

/// What SCRAM pass-through needs: the ClientKey a client proved, and the
/// secret it proved it against.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: ClientKey,
    pub secret: Arc<ScramSecret>,
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramKeys")
            .field("client_key", &self.client_key)
            .field("secret", &self.secret)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramClientError {
    #[error("malformed SCRAM message from the server: {0}")]
    Malformed(&'static str),
    #[error("the server sent an error in its SCRAM final message: {0}")]
    ServerError(String),
    #[error(
        "the server's SCRAM secret for this role is not the one pgswitch holds \
         (different salt or iteration count), so SCRAM pass-through cannot log in; \
         configure server_password, or copy the server's secret into scram_secret"
    )]
    SecretMismatch,
    #[error("the server's SCRAM signature is wrong: it does not know this role's secret")]
    BadServerSignature,
    #[error("SCRAM messages out of order")]
    OutOfOrder,
}

enum State {
    Start,
    AwaitingServerFirst { bare: String, nonce: String },
    AwaitingServerFinal { server_signature: [u8; 32] },
    Done,
}

/// One SCRAM-SHA-256 login to a server from a ClientKey.
pub struct ScramClient {
    keys: ScramKeys,
    state: State,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    pub fn new(keys: ScramKeys) -> ScramClient {
        ScramClient {
            keys,
            state: State::Start,
        }
    }

    /// The client-first-message (gs2 header "n,,": no channel binding; the
    /// user name is empty, as libpq sends it: the server uses the startup one).
    pub fn client_first(&mut self) -> Vec<u8> {
        let mut raw = [0u8; 18];
        OsRng.fill_bytes(&mut raw);
        self.client_first_with_nonce(BASE64.encode(raw))
    }

    fn client_first_with_nonce(&mut self, nonce: String) -> Vec<u8> {
        let bare = format!("n=,r={nonce}");
        let message = format!("n,,{bare}").into_bytes();
        self.state = State::AwaitingServerFirst { bare, nonce };
        message
    }

    /// Handles the server-first-message and returns the client-final-message.
    pub fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramClientError> {
        let State::AwaitingServerFirst { bare, nonce } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramClientError::OutOfOrder);
        };
        let text = std::str::from_utf8(data)
            .map_err(|_| ScramClientError::Malformed("server-first is not UTF-8"))?;
        let mut parts = text.split(',');
        let full_nonce = attribute(parts.next(), 'r')?;
        let salt = attribute(parts.next(), 's')?;
        let iterations = attribute(parts.next(), 'i')?;
        if !full_nonce.starts_with(&nonce) || full_nonce.len() == nonce.len() {
            return Err(ScramClientError::Malformed("server nonce"));
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| ScramClientError::Malformed("salt"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramClientError::Malformed("iteration count"))?;
        let secret = &self.keys.secret;
        if salt != secret.salt || iterations != secret.iterations {
            return Err(ScramClientError::SecretMismatch);
        }

        let without_proof = format!("c=biws,r={full_nonce}");
        let auth_message = format!("{bare},{text},{without_proof}");
        let client_key = &self.keys.client_key.0;
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let client_signature = hmac_sha256(&stored_key, &[auth_message.as_bytes()]);
        let proof = xor(client_key, &client_signature);
        self.state = State::AwaitingServerFinal {
            server_signature: hmac_sha256(&secret.server_key, &[auth_message.as_bytes()]),
        };
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message: the server must prove it holds the
    /// secret's ServerKey.
    pub fn server_final(&mut self, data: &[u8]) -> Result<(), ScramClientError> {
        let State::AwaitingServerFinal { server_signature } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramClientError::OutOfOrder);
        };
        let text = std::str::from_utf8(data)
            .map_err(|_| ScramClientError::Malformed("server-final is not UTF-8"))?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(ScramClientError::ServerError(error.to_owned()));
        }
        let verifier = text
            .split(',')
            .next()
            .and_then(|v| v.strip_prefix("v="))
            .ok_or(ScramClientError::Malformed("missing verifier"))?;
        let verifier = BASE64
            .decode(verifier)
            .map_err(|_| ScramClientError::Malformed("verifier"))?;
        if bool::from(verifier.ct_eq(&server_signature)) {
            Ok(())
        } else {
            Err(ScramClientError::BadServerSignature)
        }
    }
}

fn attribute(part: Option<&str>, name: char) -> Result<&str, ScramClientError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .filter(|v| !v.is_empty())
        .ok_or(ScramClientError::Malformed("unexpected attribute"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scram::{ScramExchange, SCRAM_SHA_256};
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// A ClientKey as the proxy learns it: a password client logs in to our server.
    fn learn_client_key(secret: &ScramSecret, password: &str) -> ClientKey {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut server = ScramExchange::new(secret, false);
        let first = server
            .client_first(SCRAM_SHA_256, client.message())
            .unwrap();
        client.update(&first).unwrap();
        let last = server.client_final(client.message()).unwrap();
        client.finish(&last).unwrap();
        ClientKey(server.client_key().unwrap())
    }

    fn pass_through(keys: ScramKeys, server_secret: &ScramSecret) -> Result<(), ScramClientError> {
        let mut client = ScramClient::new(keys);
        let mut server = ScramExchange::new(server_secret, false);
        let first = server
            .client_first(SCRAM_SHA_256, &client.client_first())
            .unwrap();
        let final_msg = client.server_first(&first)?;
        let last = server
            .client_final(&final_msg)
            .expect("server accepts proof");
        client.server_final(&last)
    }

    #[test]
    fn pass_through_logs_in_without_password() {
        let secret = Arc::new(ScramSecret::from_password("pencil"));
        let client_key = learn_client_key(&secret, "pencil");
        let keys = ScramKeys {
            client_key,
            secret: secret.clone(),
        };
        // Against another exchange on the same secret (the real server).
        pass_through(keys.clone(), &secret).unwrap();
        pass_through(keys, &secret).unwrap();
    }

    #[test]
    fn matches_postgres_protocol_client_proof() {
        // With a fixed nonce, our proof equals the one the password client sends.
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let secret = Arc::new(ScramSecret::from_password_with("pencil", &salt, 4096));
        let client_key = learn_client_key(&secret, "pencil");
        let mut ours = ScramClient::new(ScramKeys {
            client_key,
            secret: secret.clone(),
        });
        ours.client_first_with_nonce("rOprNGfwEbeRWgbNEkqO".into());
        let final_msg = ours
            .server_first(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                  s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            )
            .unwrap();
        // RFC 7677 section 3 (user name "user" there, empty here: different proof),
        // so check the structure and let the server verify it.
        let text = String::from_utf8(final_msg).unwrap();
        assert!(
            text.starts_with("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p="),
            "{text}"
        );
    }

    #[test]
    fn different_salt_on_server_is_a_secret_mismatch() {
        let ours = Arc::new(ScramSecret::from_password("pencil"));
        let client_key = learn_client_key(&ours, "pencil");
        let servers = ScramSecret::from_password("pencil"); // fresh random salt
        let err = pass_through(
            ScramKeys {
                client_key,
                secret: ours,
            },
            &servers,
        )
        .unwrap_err();
        assert_eq!(err, ScramClientError::SecretMismatch);
    }

    #[test]
    fn wrong_server_signature_is_refused() {
        let secret = Arc::new(ScramSecret::from_password("pencil"));
        let client_key = learn_client_key(&secret, "pencil");
        let mut client = ScramClient::new(ScramKeys {
            client_key,
            secret: secret.clone(),
        });
        let mut server = ScramExchange::new(&secret, false);
        let first = server
            .client_first(SCRAM_SHA_256, &client.client_first())
            .unwrap();
        client.server_first(&first).unwrap();
        let forged = format!("v={}", BASE64.encode([7u8; 32]));
        assert_eq!(
            client.server_final(forged.as_bytes()),
            Err(ScramClientError::BadServerSignature)
        );
        assert!(matches!(
            client.server_final(b"v=AAAA"),
            Err(ScramClientError::OutOfOrder)
        ));
    }

    #[test]
    fn malformed_server_messages_are_refused() {
        let secret = Arc::new(ScramSecret::from_password("pencil"));
        let keys = ScramKeys {
            client_key: ClientKey([1; 32]),
            secret,
        };
        for bad in [
            &b""[..],
            b"r=other,s=c2FsdA==,i=4096",
            b"s=c2FsdA==,i=4096",
            b"r=NONCE",
            b"\xff",
        ] {
            let mut client = ScramClient::new(keys.clone());
            client.client_first_with_nonce("NONCE".into());
            assert!(client.server_first(bad).is_err(), "{bad:?}");
        }
        let mut client = ScramClient::new(keys);
        client.client_first_with_nonce("NONCE".into());
        // Nonce not extended by the server.
        assert!(client.server_first(b"r=NONCE,s=c2FsdA==,i=4096").is_err());
    }

    #[test]
    fn debug_redacts_the_client_key() {
        let secret = Arc::new(ScramSecret::from_password("pencil"));
        let client_key = learn_client_key(&secret, "pencil");
        let b64 = BASE64.encode(client_key.0);
        let keys = ScramKeys {
            client_key: client_key.clone(),
            secret,
        };
        for debug in [format!("{keys:?}"), format!("{:?}", ScramClient::new(keys))] {
            assert!(!debug.contains(&b64), "{debug}");
            assert!(!debug.contains(&format!("{:?}", client_key.0)), "{debug}");
        }
    }
}
