//! SCRAM-SHA-256 (RFC 5802 / RFC 7677), server side, the way PostgreSQL does it.
//!
//! The proxy authenticates its clients itself, so it has to play the server half
//! of the exchange. This module is sans-IO: the caller sends
//! [`mechanisms`] in `AuthenticationSASL`, passes the `SASLInitialResponse`
//! payload to [`ScramExchange::client_first`], sends the returned bytes in
//! `AuthenticationSASLContinue`, passes the `SASLResponse` payload to
//! [`ScramExchange::client_final`] and sends the returned bytes in
//! `AuthenticationSASLFinal`. Any error ends the exchange; [`ScramError::sqlstate`]
//! gives the code for the `ErrorResponse`.
//!
//! Passwords are hashed as raw UTF-8 bytes. PostgreSQL and libpq run SASLprep
//! first, which changes only non-ASCII passwords that are not already in NFKC
//! form (or contain non-ASCII spaces / soft hyphens and the like); such
//! passwords must be configured already normalized.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub mod client;

/// The only mechanism we offer. `-PLUS` (channel binding) needs the TLS
/// certificate hash and is not implemented yet.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// PostgreSQL's default (`scram_iterations`); also what mock secrets use, so
/// an unknown user is indistinguishable from a real one with a default secret.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`.
const SALT_LEN: usize = 16;

/// PostgreSQL's `SCRAM_RAW_NONCE_LEN`: 18 bytes encode to 24 base64 chars
/// without padding.
const SERVER_NONCE_LEN: usize = 18;

const KEY_LEN: usize = 32;

/// Prefix of PostgreSQL's stored SCRAM secret (`pg_authid.rolpassword`).
const SECRET_PREFIX: &str = "SCRAM-SHA-256$";

/// The body of `AuthenticationSASL`: NUL-terminated mechanism names followed
/// by an empty name.
pub fn mechanisms() -> &'static [u8] {
    b"SCRAM-SHA-256\0\0"
}

/// Why an exchange (or parsing a stored secret) failed.
///
/// The variants map to distinct SQLSTATEs so that a broken client and a wrong
/// password produce the same errors as PostgreSQL itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client sent something that is not valid SCRAM, or sent it at the
    /// wrong time.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client picked a mechanism we did not advertise.
    #[error("client selected an invalid SASL authentication mechanism")]
    InvalidMechanism,
    /// The client asked for channel binding ("p=...") under plain SCRAM-SHA-256.
    #[error("client requested SCRAM channel binding, which is not supported")]
    ChannelBindingNotSupported,
    /// A valid but unimplemented SCRAM feature (authzid, mandatory extension).
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    /// Wrong password, unknown user (mock secret), or proof of the wrong key.
    #[error("password authentication failed")]
    AuthenticationFailed,
    /// A stored secret string could not be parsed.
    #[error("invalid SCRAM secret: {0}")]
    InvalidSecret(&'static str),
}

impl ScramError {
    /// The SQLSTATE to report to the client, as PostgreSQL would.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ScramError::Malformed(_)
            | ScramError::InvalidMechanism
            | ScramError::ChannelBindingNotSupported => "08P01", // protocol_violation
            ScramError::Unsupported(_) => "0A000", // feature_not_supported
            // PostgreSQL treats a broken stored secret like an unknown user: the
            // client only learns that authentication failed.
            ScramError::AuthenticationFailed | ScramError::InvalidSecret(_) => "28P01",
        }
    }
}

/// A SCRAM-SHA-256 verifier: what the server stores instead of the password.
///
/// Holding `StoredKey` lets the server check a proof; holding `ServerKey` lets
/// it prove itself to the client. Neither lets anyone log in without the
/// password (or a recovered ClientKey).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramSecret {
    /// Derives a secret with a random salt and the default iteration count.
    ///
    /// This runs 4096 HMAC rounds (milliseconds): call it at config load, not
    /// on the async executor.
    pub fn from_password(password: &str) -> ScramSecret {
        let mut salt = [0; SALT_LEN];
        OsRng.fill_bytes(&mut salt);
        ScramSecret::from_password_with(password, &salt, DEFAULT_ITERATIONS)
    }

    /// Derives a secret from a given salt and iteration count.
    ///
    /// PBKDF2 is undefined for zero iterations; 0 is treated as 1 (and stored
    /// as 1) rather than panicking on a configuration value.
    pub fn from_password_with(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let iterations = iterations.max(1);
        let salted_password = hi(password.as_bytes(), salt, iterations);
        let client_key = hmac_sha256(&salted_password, &[b"Client Key"]);
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted_password, &[b"Server Key"]),
        }
    }

    /// The ClientKey a client with `password` proves against this secret.
    /// Runs PBKDF2: not for the async executor (tests and tools only).
    pub fn client_key_for_password(&self, password: &str) -> [u8; 32] {
        let salted_password = hi(password.as_bytes(), &self.salt, self.iterations);
        hmac_sha256(&salted_password, &[b"Client Key"])
    }

    /// Parses PostgreSQL's stored form
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Result<ScramSecret, ScramError> {
        let invalid = ScramError::InvalidSecret;
        let rest = s
            .strip_prefix(SECRET_PREFIX)
            .ok_or(invalid("missing SCRAM-SHA-256$ prefix"))?;
        let (iter_salt, keys) = rest.split_once('$').ok_or(invalid("missing keys"))?;
        let (iterations, salt) = iter_salt.split_once(':').ok_or(invalid("missing salt"))?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(invalid("missing ServerKey"))?;

        let iterations = iterations
            .parse::<u32>()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(invalid("bad iteration count"))?;
        let salt = BASE64
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(invalid("bad salt"))?;
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key: decode_key(stored_key).ok_or(invalid("bad StoredKey"))?,
            server_key: decode_key(server_key).ok_or(invalid("bad ServerKey"))?,
        })
    }

    /// A stand-in secret for a user that does not exist.
    ///
    /// Like PostgreSQL's `scram_mock_salt`, everything is derived from the user
    /// name and a process-wide secret key, so repeated attempts for the same
    /// unknown user see the same salt and iteration count and cannot tell the
    /// user is missing. Use it with `ScramExchange::new(&secret, true)`.
    pub fn mock(user: &str, nonce_key: &[u8]) -> ScramSecret {
        let derive = |label: &[u8]| hmac_sha256(nonce_key, &[label, b"\0", user.as_bytes()]);
        ScramSecret {
            iterations: DEFAULT_ITERATIONS,
            salt: derive(b"mock salt")[..SALT_LEN].to_vec(),
            stored_key: derive(b"mock stored key"),
            server_key: derive(b"mock server key"),
        }
    }
}

/// Shows only the public parts; the keys would let an attacker impersonate
/// the server (ServerKey) or brute-force the password offline.
impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt", &BASE64.encode(&self.salt))
            .finish_non_exhaustive()
    }
}

/// PostgreSQL's stored form, accepted back by [`ScramSecret::parse`].
impl fmt::Display for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SECRET_PREFIX}{}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

impl FromStr for ScramSecret {
    type Err = ScramError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScramSecret::parse(s)
    }
}

/// The client's `gs2-cbind-flag`, which must be echoed back (base64) in `c=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CbindFlag {
    /// "n": the client does not support channel binding.
    No,
    /// "y": the client supports it but thinks we do not. Only acceptable while
    /// we do not advertise `-PLUS`; once we do, this must be rejected as a
    /// downgrade attempt, as PostgreSQL does.
    ClientOnly,
}

impl CbindFlag {
    /// Expected `c=` value: base64 of the gs2 header ("n,," or "y,,").
    fn expected_channel_binding(self) -> &'static [u8] {
        match self {
            CbindFlag::No => b"biws",
            CbindFlag::ClientOnly => b"eSws",
        }
    }
}

enum State {
    AwaitingClientFirst,
    AwaitingClientFinal {
        cbind: CbindFlag,
        /// Full nonce (client + server part) the client must echo back.
        nonce: String,
        /// "client-first-message-bare,server-first-message," — the first part
        /// of the AuthMessage that both sides sign.
        auth_message_prefix: Vec<u8>,
    },
    Succeeded {
        client_key: [u8; 32],
    },
    Failed,
}

/// One SCRAM-SHA-256 exchange with one client.
pub struct ScramExchange {
    secret: ScramSecret,
    /// Set for unknown users: run every step, then fail like a wrong password.
    mock: bool,
    server_nonce: String,
    state: State,
}

impl ScramExchange {
    /// Starts an exchange against `secret`. With `mock`, the exchange fails at
    /// the proof check no matter what the client sends (see
    /// [`ScramSecret::mock`]).
    pub fn new(secret: &ScramSecret, mock: bool) -> ScramExchange {
        let mut raw = [0; SERVER_NONCE_LEN];
        OsRng.fill_bytes(&mut raw);
        ScramExchange {
            secret: secret.clone(),
            mock,
            server_nonce: BASE64.encode(raw),
            state: State::AwaitingClientFirst,
        }
    }

    /// Test hook: replaces the random server nonce so known vectors can be replayed.
    #[cfg(test)]
    fn set_server_nonce(&mut self, nonce: &str) {
        self.server_nonce = nonce.to_owned();
    }

    /// Handles `SASLInitialResponse` (mechanism name and payload) and returns
    /// the server-first-message for `AuthenticationSASLContinue`.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::AwaitingClientFirst = self.state else {
            return self.fail(ScramError::Malformed("unexpected SASL initial response"));
        };
        if mechanism != SCRAM_SHA_256 {
            return self.fail(ScramError::InvalidMechanism);
        }
        let first = match parse_client_first(data) {
            Ok(first) => first,
            Err(e) => return self.fail(e),
        };

        let nonce = format!("{}{}", first.nonce, self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&self.secret.salt),
            self.secret.iterations
        )
        .into_bytes();

        let mut auth_message_prefix = first.bare.to_vec();
        auth_message_prefix.push(b',');
        auth_message_prefix.extend_from_slice(&server_first);
        auth_message_prefix.push(b',');
        self.state = State::AwaitingClientFinal {
            cbind: first.cbind,
            nonce,
            auth_message_prefix,
        };
        Ok(server_first)
    }

    /// Handles the `SASLResponse` carrying the client-final-message, checks the
    /// proof and returns the server-final-message ("v=...") for
    /// `AuthenticationSASLFinal`.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        // The state is `Failed` until the proof checks out, so every early
        // return below leaves the exchange poisoned.
        let State::AwaitingClientFinal {
            cbind,
            nonce,
            mut auth_message_prefix,
        } = std::mem::replace(&mut self.state, State::Failed)
        else {
            return self.fail(ScramError::Malformed("unexpected SASL response"));
        };
        let message = parse_client_final(data)?;
        if message.channel_binding != cbind.expected_channel_binding() {
            return Err(ScramError::Malformed("channel binding check failed"));
        }
        if message.nonce != nonce.as_bytes() {
            return Err(ScramError::Malformed("nonce does not match"));
        }

        auth_message_prefix.extend_from_slice(message.without_proof);
        let auth_message = auth_message_prefix;
        let client_key = recover_client_key(&self.secret, &auth_message, &message.proof)
            .filter(|_| !self.mock)
            .ok_or(ScramError::AuthenticationFailed)?;

        let server_signature = hmac_sha256(&self.secret.server_key, &[&auth_message]);
        self.state = State::Succeeded { client_key };
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
    }

    /// The client's ClientKey, known only after a successful exchange. With it
    /// the proxy can compute a valid proof for the same user against the real
    /// server (SCRAM pass-through), so treat it like a password.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        match self.state {
            State::Succeeded { client_key } => Some(client_key),
            _ => None,
        }
    }

    /// Poisons the exchange so no later message can resume it.
    fn fail<T>(&mut self, error: ScramError) -> Result<T, ScramError> {
        self.state = State::Failed;
        Err(error)
    }
}

/// Keeps secrets and the recovered key out of logs.
impl fmt::Debug for ScramExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::AwaitingClientFirst => "AwaitingClientFirst",
            State::AwaitingClientFinal { .. } => "AwaitingClientFinal",
            State::Succeeded { .. } => "Succeeded",
            State::Failed => "Failed",
        };
        f.debug_struct("ScramExchange")
            .field("secret", &self.secret)
            .field("mock", &self.mock)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// The parts of a client-first-message the server needs.
#[derive(Debug)]
struct ClientFirst<'a> {
    cbind: CbindFlag,
    /// client-first-message-bare: signed as part of the AuthMessage.
    bare: &'a [u8],
    nonce: &'a str,
}

/// Parses `gs2-header client-first-message-bare`.
///
/// The user name in `n=` is ignored: PostgreSQL takes it from the startup
/// packet, and libpq sends it empty.
fn parse_client_first(data: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    let (cbind, rest) = match data {
        [b'n', b',', rest @ ..] => (CbindFlag::No, rest),
        [b'y', b',', rest @ ..] => (CbindFlag::ClientOnly, rest),
        [b'p', b'=', ..] => return Err(ScramError::ChannelBindingNotSupported),
        _ => return Err(ScramError::Malformed("bad channel binding flag")),
    };
    let bare = match rest {
        [b',', bare @ ..] => bare,
        [b'a', b'=', ..] => return Err(ScramError::Unsupported("SCRAM authorization identity")),
        _ => return Err(ScramError::Malformed("bad gs2 header")),
    };

    let mut attributes = bare.split(|&b| b == b',');
    let first = attributes.next().unwrap_or_default();
    if first.starts_with(b"m=") {
        return Err(ScramError::Unsupported("mandatory SCRAM extension"));
    }
    expect_attribute(Some(first), b'n')?;
    let nonce = expect_attribute(attributes.next(), b'r')?;
    let nonce = std::str::from_utf8(nonce)
        .ok()
        .filter(|n| is_printable_nonce(n))
        .ok_or(ScramError::Malformed("invalid client nonce"))?;
    // Optional extensions: ignored, like PostgreSQL, but must be well-formed.
    for extension in attributes {
        attribute(extension)?;
    }
    Ok(ClientFirst { cbind, bare, nonce })
}

/// The parts of a client-final-message the server needs.
#[derive(Debug)]
struct ClientFinal<'a> {
    channel_binding: &'a [u8],
    nonce: &'a [u8],
    proof: [u8; 32],
    /// client-final-message-without-proof: signed as part of the AuthMessage.
    without_proof: &'a [u8],
}

/// Parses `c=...,r=...[,extensions],p=...`; the proof must come last.
fn parse_client_final(data: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    // Base64 and extension values cannot contain ',', so the last ",p=" is
    // the start of the proof attribute if the message is well-formed.
    let proof_at = data
        .windows(3)
        .rposition(|w| w == b",p=")
        .ok_or(ScramError::Malformed("missing proof"))?;
    let (without_proof, proof) = (&data[..proof_at], &data[proof_at + 3..]);

    let mut attributes = without_proof.split(|&b| b == b',');
    let channel_binding = expect_attribute(attributes.next(), b'c')?;
    let nonce = expect_attribute(attributes.next(), b'r')?;
    for extension in attributes {
        if attribute(extension)?.0 == b'p' {
            return Err(ScramError::Malformed("proof is not the last attribute"));
        }
    }
    let proof = BASE64
        .decode(proof)
        .ok()
        .and_then(|p| <[u8; 32]>::try_from(p).ok())
        .ok_or(ScramError::Malformed("invalid proof"))?;
    Ok(ClientFinal {
        channel_binding,
        nonce,
        proof,
        without_proof,
    })
}

/// Splits `x=value`: a single ASCII letter, '=', and the value.
fn attribute(part: &[u8]) -> Result<(u8, &[u8]), ScramError> {
    match part {
        [name, b'=', value @ ..] if name.is_ascii_alphabetic() => Ok((*name, value)),
        _ => Err(ScramError::Malformed("bad attribute")),
    }
}

/// Returns the value of the attribute that the grammar requires next.
fn expect_attribute(part: Option<&[u8]>, name: u8) -> Result<&[u8], ScramError> {
    match part.map(attribute).transpose()? {
        Some((found, value)) if found == name => Ok(value),
        _ => Err(ScramError::Malformed("unexpected attribute")),
    }
}

/// RFC 5802 `printable`: non-empty, %x21-7E except ','.
fn is_printable_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Checks the client's proof and returns its ClientKey if it is right.
///
/// ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage); the proof is
/// right iff H(ClientKey) == StoredKey, compared in constant time so timing
/// does not reveal how much of StoredKey an attacker has matched.
fn recover_client_key(
    secret: &ScramSecret,
    auth_message: &[u8],
    proof: &[u8; 32],
) -> Option<[u8; 32]> {
    let client_signature = hmac_sha256(&secret.stored_key, &[auth_message]);
    let client_key = xor(proof, &client_signature);
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    bool::from(stored_key.ct_eq(&secret.stored_key)).then_some(client_key)
}

/// `Hi()` from RFC 5802: PBKDF2-HMAC-SHA-256 with one output block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    // Key the HMAC once and clone it per round instead of re-keying.
    let keyed = hmac_keyed(password);
    let mut u: [u8; 32] = keyed
        .clone()
        .chain_update(salt)
        .chain_update(1u32.to_be_bytes())
        .finalize()
        .into_bytes()
        .into();
    let mut result = u;
    for _ in 1..iterations {
        u = keyed.clone().chain_update(u).finalize().into_bytes().into();
        result = xor(&result, &u);
    }
    result
}

/// HMAC-SHA-256 over the concatenation of `parts`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = hmac_keyed(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// An HMAC-SHA-256 instance for a key of any length, without a fallible call.
///
/// `Mac::new_from_slice` never fails for HMAC but returns a `Result`; doing the
/// RFC 2104 key preparation here (hash keys longer than the 64-byte block,
/// zero-pad the rest) lets us use the infallible fixed-size constructor and
/// gives exactly the same MAC.
fn hmac_keyed(key: &[u8]) -> Hmac<Sha256> {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..KEY_LEN].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <Hmac<Sha256> as KeyInit>::new(&block.into())
}

pub(crate) fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn decode_key(s: &str) -> Option<[u8; 32]> {
    BASE64.decode(s).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_mock_key() -> [u8; 32] {
        let mut key = [0; 32];
        OsRng.fill_bytes(&mut key);
        key
    }
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a full exchange between postgres-protocol's client and our server.
    /// Returns the server's result for client-final and the client's verdict
    /// on the server-final message (if any).
    fn run_exchange(
        secret: &ScramSecret,
        mock: bool,
        password: &str,
        binding: ChannelBinding,
    ) -> (ScramExchange, Result<Vec<u8>, ScramError>, Option<bool>) {
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let mut server = ScramExchange::new(secret, mock);
        let server_first = server
            .client_first(SCRAM_SHA_256, client.message())
            .expect("client-first accepted");
        client
            .update(&server_first)
            .expect("client accepts server-first");
        let result = server.client_final(client.message());
        let client_verdict = result.as_ref().ok().map(|f| client.finish(f).is_ok());
        (server, result, client_verdict)
    }

    #[test]
    fn exchange_with_correct_password_succeeds_and_server_verifies() {
        let secret = ScramSecret::from_password("hunter2");
        for binding in [ChannelBinding::unsupported(), ChannelBinding::unrequested()] {
            let (server, result, client_ok) = run_exchange(&secret, false, "hunter2", binding);
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(client_ok, Some(true));
            assert!(server.client_key().is_some());
            // ClientKey is consistent with the stored secret.
            let client_key = server.client_key().expect("client key after success");
            assert_eq!(
                <[u8; 32]>::from(Sha256::digest(client_key)),
                secret.stored_key
            );
        }
    }

    #[test]
    fn client_key_matches_password_derivation() {
        let secret = ScramSecret::from_password_with("pw", b"0123456789abcdef", 4096);
        let (server, _, _) = run_exchange(&secret, false, "pw", ChannelBinding::unsupported());
        let salted = hi(b"pw", b"0123456789abcdef", 4096);
        assert_eq!(
            server.client_key(),
            Some(hmac_sha256(&salted, &[b"Client Key"]))
        );
    }

    #[test]
    fn wrong_password_fails_with_28p01() {
        let secret = ScramSecret::from_password("hunter2");
        let (server, result, _) =
            run_exchange(&secret, false, "hunter3", ChannelBinding::unsupported());
        let err = result.unwrap_err();
        assert_eq!(err, ScramError::AuthenticationFailed);
        assert_eq!(err.sqlstate(), "28P01");
        assert_eq!(server.client_key(), None);
        assert_eq!(server.client_key(), None);
    }

    #[test]
    fn mock_secret_fails_like_wrong_password() {
        let key = random_mock_key();
        let secret = ScramSecret::mock("nobody", &key);
        let (server, result, _) =
            run_exchange(&secret, true, "anything", ChannelBinding::unsupported());
        assert_eq!(result.unwrap_err(), ScramError::AuthenticationFailed);
        assert_eq!(server.client_key(), None);
    }

    #[test]
    fn mock_flag_fails_even_with_right_password() {
        let secret = ScramSecret::from_password("hunter2");
        let (_, result, _) = run_exchange(&secret, true, "hunter2", ChannelBinding::unsupported());
        assert_eq!(result.unwrap_err(), ScramError::AuthenticationFailed);
    }

    #[test]
    fn mock_secret_is_stable_per_user_and_looks_real() {
        let key = random_mock_key();
        let a = ScramSecret::mock("alice", &key);
        assert_eq!(a, ScramSecret::mock("alice", &key));
        assert_ne!(a.salt, ScramSecret::mock("bob", &key).salt);
        assert_ne!(a.salt, ScramSecret::mock("alice", &random_mock_key()).salt);
        assert_eq!(a.iterations, DEFAULT_ITERATIONS);
        assert_eq!(a.salt.len(), SALT_LEN);
        assert_eq!(ScramSecret::parse(&a.to_string()), Ok(a));
    }

    #[test]
    fn server_first_looks_like_postgres() {
        let secret = ScramSecret::from_password_with("x", b"saltsaltsaltsalt", 4096);
        let mut server = ScramExchange::new(&secret, false);
        let first = server
            .client_first("SCRAM-SHA-256", b"n,,n=,r=abc")
            .unwrap();
        let first = String::from_utf8(first).unwrap();
        let rest = first.strip_prefix("r=abc").unwrap();
        let (server_nonce, tail) = rest.split_once(',').unwrap();
        assert_eq!(server_nonce.len(), 24);
        assert_eq!(BASE64.decode(server_nonce).unwrap().len(), SERVER_NONCE_LEN);
        assert_eq!(tail, "s=c2FsdHNhbHRzYWx0c2FsdA==,i=4096");
    }

    /// RFC 7677 section 3 example, replayed byte for byte.
    #[test]
    fn rfc7677_vector() {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let secret = ScramSecret::from_password_with("pencil", &salt, 4096);
        let mut server = ScramExchange::new(&secret, false);
        server.set_server_nonce("%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");

        let server_first = server
            .client_first(SCRAM_SHA_256, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            .unwrap();
        assert_eq!(
            server_first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
              s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let server_final = server
            .client_final(
                b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                  p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            )
            .unwrap();
        assert_eq!(
            server_final,
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn secret_round_trips_through_postgres_form() {
        let secret = ScramSecret::from_password_with("pencil", b"0123456789abcdef", 4096);
        let text = secret.to_string();
        let (head, keys) = text.rsplit_once('$').unwrap();
        assert_eq!(head, "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==");
        let (stored, server) = keys.split_once(':').unwrap();
        assert_eq!(BASE64.decode(stored).unwrap(), secret.stored_key);
        assert_eq!(BASE64.decode(server).unwrap(), secret.server_key);
        assert_eq!(ScramSecret::parse(&text), Ok(secret.clone()));
        assert_eq!(text.parse::<ScramSecret>(), Ok(secret));
    }

    /// A secret as `SELECT rolpassword FROM pg_authid` shows it for password
    /// "pencil" with RFC 7677's salt; the keys are the RFC's derivation.
    #[test]
    fn parses_known_postgres_secret_and_authenticates() {
        let stored = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
                      WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
                      wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
        let secret = ScramSecret::parse(stored).unwrap();
        assert_eq!(secret.to_string(), stored);
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        assert_eq!(
            secret,
            ScramSecret::from_password_with("pencil", &salt, 4096)
        );
        let (_, result, client_ok) =
            run_exchange(&secret, false, "pencil", ChannelBinding::unsupported());
        assert!(result.is_ok());
        assert_eq!(client_ok, Some(true));
    }

    /// Generated by a real PostgreSQL 15.18:
    /// `SET password_encryption = 'scram-sha-256'; CREATE ROLE alice PASSWORD 'pencil';`
    const PG15_ALICE_PENCIL: &str = "SCRAM-SHA-256$4096:MuBTyS1uIa25CyLdYomy5g==$\
        w2L6oGShxwArNyGcZLhprjuDHfmvmSsBgE4mEQ+aFzc=:rD3RN5xMfdPXA3EootwD3R8NBbLqUAbpcst0aUQ+rYA=";

    #[test]
    fn matches_secret_generated_by_postgres() {
        let secret = ScramSecret::parse(PG15_ALICE_PENCIL).unwrap();
        assert_eq!(secret.to_string(), PG15_ALICE_PENCIL);
        let ours = ScramSecret::from_password_with("pencil", &secret.salt, secret.iterations);
        assert_eq!(ours, secret);
        let (_, result, client_ok) =
            run_exchange(&secret, false, "pencil", ChannelBinding::unrequested());
        assert!(result.is_ok());
        assert_eq!(client_ok, Some(true));
    }

    #[test]
    fn parse_rejects_bad_secrets() {
        let good = ScramSecret::from_password("x").to_string();
        let (_, keys) = good.rsplit_once('$').unwrap();
        let bad = [
            "".to_string(),
            "md5abc".to_string(),
            "SCRAM-SHA-256$".to_string(),
            format!("SCRAM-SHA-256$0:c2FsdA==${keys}"),
            format!("SCRAM-SHA-256$-1:c2FsdA==${keys}"),
            format!("SCRAM-SHA-256$4096:!!!!${keys}"),
            format!("SCRAM-SHA-256$4096:${keys}"),
            format!("SCRAM-SHA-256$4096c2FsdA==${keys}"),
            "SCRAM-SHA-256$4096:c2FsdA==$c2FsdA==:c2FsdA==".to_string(),
            good.replace(':', ";"),
            format!("{good}x"),
        ];
        for s in bad {
            let err = ScramSecret::parse(&s).unwrap_err();
            assert!(matches!(err, ScramError::InvalidSecret(_)), "{s}: {err:?}");
        }
    }

    #[test]
    fn debug_does_not_print_keys() {
        let secret = ScramSecret::from_password("hunter2");
        let (server, _, _) = run_exchange(&secret, false, "hunter2", ChannelBinding::unsupported());
        let stored = BASE64.encode(secret.stored_key);
        let server_key = BASE64.encode(secret.server_key);
        for debug in [format!("{secret:?}"), format!("{server:?}")] {
            assert!(!debug.contains(&stored), "{debug}");
            assert!(!debug.contains(&server_key), "{debug}");
            assert!(
                !debug.contains(&format!("{:?}", secret.stored_key)),
                "{debug}"
            );
            assert!(
                !debug.contains(&format!("{:?}", secret.server_key)),
                "{debug}"
            );
            assert!(!debug.contains(&format!("{:?}", server.client_key().unwrap())));
        }
    }

    #[test]
    fn rejects_channel_binding_and_plus() {
        let secret = ScramSecret::from_password("pw");
        let client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![1, 2, 3]));
        let mut server = ScramExchange::new(&secret, false);
        let err = server
            .client_first(SCRAM_SHA_256, client.message())
            .unwrap_err();
        assert_eq!(err, ScramError::ChannelBindingNotSupported);
        assert_eq!(err.sqlstate(), "08P01");

        let mut server = ScramExchange::new(&secret, false);
        let err = server
            .client_first("SCRAM-SHA-256-PLUS", client.message())
            .unwrap_err();
        assert_eq!(err, ScramError::InvalidMechanism);
        assert_eq!(err.sqlstate(), "08P01");
    }

    #[test]
    fn rejects_authzid_and_mandatory_extensions() {
        let secret = ScramSecret::from_password("pw");
        for msg in [&b"n,a=admin,n=,r=abc"[..], b"n,,m=ext,n=,r=abc"] {
            let err = ScramExchange::new(&secret, false)
                .client_first(SCRAM_SHA_256, msg)
                .unwrap_err();
            assert!(matches!(err, ScramError::Unsupported(_)), "{err:?}");
            assert_eq!(err.sqlstate(), "0A000");
        }
    }

    #[test]
    fn accepts_usernames_and_extensions_in_client_first() {
        let secret = ScramSecret::from_password("pw");
        for msg in [
            &b"n,,n=,r=abc"[..],
            b"n,,n=alice,r=abc",
            b"y,,n=*,r=abc,x=ext",
            b"n,,n=\xff\xfe,r=abc",
        ] {
            let mut server = ScramExchange::new(&secret, false);
            assert!(server.client_first(SCRAM_SHA_256, msg).is_ok(), "{msg:?}");
        }
    }

    #[test]
    fn garbage_client_first_is_rejected() {
        let secret = ScramSecret::from_password("pw");
        let cases: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"n,,",
            b"x,,n=,r=abc",
            b"n,x,n=,r=abc",
            b"n,,r=abc",
            b"n,,n=",
            b"n,,n=,r=",
            b"n,,n=,r=ab\x01c",
            b"n,,n=,r=\xff\xfe",
            b"n,,n=,x=abc",
            b"n,,n=,r=abc,",
            b"n,,n=,r=abc,1=x",
            b"n,,n=,r=abc,ext",
            b"\0\0\0\0",
        ];
        for &msg in cases {
            let err = ScramExchange::new(&secret, false)
                .client_first(SCRAM_SHA_256, msg)
                .unwrap_err();
            assert_eq!(err.sqlstate(), "08P01", "{msg:?}: {err:?}");
        }
    }

    /// Sets up an exchange past client-first with client nonce "abc" and a
    /// known server nonce, so client-final messages can be written by hand.
    fn exchange_awaiting_final(gs2: &str) -> ScramExchange {
        let secret = ScramSecret::from_password_with("pw", b"salt", 4096);
        let mut server = ScramExchange::new(&secret, false);
        server.set_server_nonce("SRV");
        server
            .client_first(SCRAM_SHA_256, format!("{gs2}n=,r=abc").as_bytes())
            .unwrap();
        server
    }

    #[test]
    fn garbage_client_final_is_rejected() {
        let proof = BASE64.encode([0u8; 32]);
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"c=biws".to_vec(),
            b"c=biws,r=abcSRV".to_vec(),
            b"c=biws,r=abcSRV,p=".to_vec(),
            b"c=biws,r=abcSRV,p=!!!!".to_vec(),
            b"c=biws,r=abcSRV,p=AAAA".to_vec(),
            format!("c=biws,r=abcSRV,p={}", BASE64.encode([0u8; 33])).into_bytes(),
            format!("c=biws,r=abcSRV,p={}", &proof[..proof.len() - 1]).into_bytes(),
            format!("c=biws,r=abcSRV,p={proof},x=1").into_bytes(),
            format!("c=biws,r=abcSRV,p={proof}\0").into_bytes(),
            format!("c=biws,r=abcSRV,p={proof},p={proof}").into_bytes(),
            format!("c=eSws,r=abcSRV,p={proof}").into_bytes(),
            format!("c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws,r=abcSRV,p={proof}").into_bytes(),
            format!("c=biws,r=abc,p={proof}").into_bytes(),
            format!("c=biws,r=abcSRVx,p={proof}").into_bytes(),
            format!("c=biws,r=xyzSRV,p={proof}").into_bytes(),
            format!("r=abcSRV,c=biws,p={proof}").into_bytes(),
            format!("c=biws,r=abcSRV,,p={proof}").into_bytes(),
            [b"c=biws,r=abc\xffSRV,p=".as_slice(), proof.as_bytes()].concat(),
            [b"c=biws,r=abcSRV,p=".as_slice(), &[0xff; 44]].concat(),
        ];
        for msg in cases {
            let mut server = exchange_awaiting_final("n,,");
            let err = server.client_final(&msg).unwrap_err();
            assert_eq!(
                err.sqlstate(),
                "08P01",
                "{:?}: {err:?}",
                String::from_utf8_lossy(&msg)
            );
            assert_eq!(server.client_key(), None);
        }
    }

    #[test]
    fn well_formed_final_with_bad_proof_is_auth_failure() {
        let proof = BASE64.encode([0u8; 32]);
        for (gs2, cbind) in [("n,,", "biws"), ("y,,", "eSws")] {
            let msg = format!("c={cbind},r=abcSRV,x=ext,p={proof}");
            let err = exchange_awaiting_final(gs2)
                .client_final(msg.as_bytes())
                .unwrap_err();
            assert_eq!(err, ScramError::AuthenticationFailed);
        }
    }

    #[test]
    fn messages_out_of_order_are_rejected() {
        let secret = ScramSecret::from_password("pw");
        let mut server = ScramExchange::new(&secret, false);
        assert_eq!(
            server
                .client_final(b"c=biws,r=abc,p=AAAA")
                .unwrap_err()
                .sqlstate(),
            "08P01"
        );
        // The failed exchange stays failed.
        assert!(server.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").is_err());

        let mut server = ScramExchange::new(&secret, false);
        server.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").unwrap();
        assert!(server.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").is_err());
        // After any error, a correct final message no longer works either.
        assert!(server.client_final(b"c=biws,r=abc,p=AAAA").is_err());
    }

    #[test]
    fn exchange_cannot_be_replayed_after_success() {
        let secret = ScramSecret::from_password("pw");
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let mut server = ScramExchange::new(&secret, false);
        let first = server
            .client_first(SCRAM_SHA_256, client.message())
            .unwrap();
        client.update(&first).unwrap();
        let final_msg = client.message().to_vec();
        server.client_final(&final_msg).unwrap();
        assert!(server.client_final(&final_msg).is_err());
        // A protocol violation after success poisons the exchange.
        assert_eq!(server.client_key(), None);
    }

    #[test]
    fn long_passwords_hash_like_hmac_spec() {
        // Keys longer than the HMAC block go through the hashing branch of
        // hmac_keyed; check it against the library's own key handling.
        let long = "p".repeat(100);
        let expected: [u8; 32] = <Hmac<Sha256> as Mac>::new_from_slice(long.as_bytes())
            .unwrap()
            .chain_update(b"data")
            .finalize()
            .into_bytes()
            .into();
        assert_eq!(hmac_sha256(long.as_bytes(), &[b"data"]), expected);

        let secret = ScramSecret::from_password(&long);
        let (_, result, client_ok) =
            run_exchange(&secret, false, &long, ChannelBinding::unsupported());
        assert!(result.is_ok());
        assert_eq!(client_ok, Some(true));
    }

    #[test]
    fn zero_iterations_is_clamped() {
        let secret = ScramSecret::from_password_with("pw", b"salt", 0);
        assert_eq!(secret.iterations, 1);
        assert_eq!(ScramSecret::parse(&secret.to_string()), Ok(secret));
    }

    #[test]
    fn mechanisms_body() {
        assert_eq!(mechanisms(), b"SCRAM-SHA-256\0\0");
    }
}
