//! PostgreSQL's legacy MD5 password authentication, server side.
//!
//! The stored form is `"md5" + hex(md5(password + user))`; the client answers
//! an `AuthenticationMD5Password` challenge with
//! `"md5" + hex(md5(hex_part_of_stored + salt))`. Kept only for clients and
//! configs that cannot do SCRAM: the stored hash is password-equivalent.

use ::md5::{Digest, Md5};
use subtle::ConstantTimeEq;

const PREFIX: &str = "md5";

/// Length of `"md5"` plus 32 lowercase hex digits.
const HASH_LEN: usize = 35;

/// PostgreSQL's stored MD5 hash for `user` (the user name is the salt).
pub fn md5_password_hash(user: &str, password: &str) -> String {
    md5_hex(&[password.as_bytes(), user.as_bytes()])
}

/// The response a client with the right password sends for `salt`.
///
/// Takes the stored hash with or without the `md5` prefix; a malformed stored
/// hash yields a response no client will match.
pub fn md5_challenge_response(stored_md5: &str, salt: [u8; 4]) -> String {
    let hex = stored_md5.strip_prefix(PREFIX).unwrap_or(stored_md5);
    md5_hex(&[hex.as_bytes(), &salt])
}

/// Checks a `PasswordMessage` payload against the stored hash.
///
/// The wire payload is a C string, so one trailing NUL is ignored. The
/// comparison is constant-time so response timing leaks nothing about the
/// expected value. Returns false if `stored_md5` is not a well-formed
/// `md5...` hash, since then no response can be right.
pub fn verify_md5_response(stored_md5: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    if !is_md5_hash(stored_md5) {
        return false;
    }
    let response = client_response
        .strip_suffix(b"\0")
        .unwrap_or(client_response);
    let expected = md5_challenge_response(stored_md5, salt);
    expected.as_bytes().ct_eq(response).into()
}

/// Whether `s` looks like PostgreSQL's stored MD5 hash.
pub fn is_md5_hash(s: &str) -> bool {
    s.len() == HASH_LEN
        && s.strip_prefix(PREFIX).is_some_and(|hex| {
            hex.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// `"md5"` + lowercase hex of the MD5 of the concatenated parts.
fn md5_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = String::with_capacity(HASH_LEN);
    out.push_str(PREFIX);
    for byte in hasher.finalize() {
        out.push(hex_digit(byte >> 4));
        out.push(hex_digit(byte & 0x0f));
    }
    out
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble & 0x0f)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;

    const SALT: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];

    #[test]
    fn stored_hash_matches_known_value() {
        // SELECT 'md5' || md5('pencil' || 'alice');
        assert_eq!(
            md5_password_hash("alice", "pencil"),
            "md5ee69efad287c7423caf0b3229d71f567"
        );
    }

    #[test]
    fn matches_hash_generated_by_postgres() {
        // PostgreSQL 15.18: SET password_encryption = 'md5';
        // CREATE ROLE bob PASSWORD 'pencil'; SELECT rolpassword ...
        assert_eq!(
            md5_password_hash("bob", "pencil"),
            "md5e4f70fb0b8f2745aa7a69557c80cbd0c"
        );
    }

    #[test]
    fn challenge_response_matches_postgres_protocol_client() {
        for (user, password) in [("alice", "pencil"), ("", ""), ("bøb", "pässwörd")] {
            let stored = md5_password_hash(user, password);
            let client = md5_hash(user.as_bytes(), password.as_bytes(), SALT);
            assert_eq!(md5_challenge_response(&stored, SALT), client);
            // The prefix is optional on the stored side.
            assert_eq!(md5_challenge_response(&stored[3..], SALT), client);
        }
    }

    #[test]
    fn verifies_client_response_with_and_without_nul() {
        let stored = md5_password_hash("alice", "pencil");
        let response = md5_hash(b"alice", b"pencil", SALT);
        assert!(verify_md5_response(&stored, SALT, response.as_bytes()));
        let with_nul = [response.as_bytes(), b"\0"].concat();
        assert!(verify_md5_response(&stored, SALT, &with_nul));
    }

    #[test]
    fn rejects_wrong_responses() {
        let stored = md5_password_hash("alice", "pencil");
        let right = md5_hash(b"alice", b"pencil", SALT);
        let wrong_password = md5_hash(b"alice", b"pencil2", SALT);
        let wrong_salt = md5_hash(b"alice", b"pencil", [0, 0, 0, 0]);
        let double_nul = [right.as_bytes(), b"\0\0"].concat();
        let upper = right.to_uppercase();
        let cases: [&[u8]; 8] = [
            wrong_password.as_bytes(),
            wrong_salt.as_bytes(),
            &double_nul,
            &right.as_bytes()[..34],
            upper.as_bytes(),
            b"",
            b"\0",
            &[0xff; 35],
        ];
        for response in cases {
            assert!(
                !verify_md5_response(&stored, SALT, response),
                "{response:?}"
            );
        }
    }

    #[test]
    fn malformed_stored_hash_never_verifies() {
        for stored in ["", "md5", "pencil", "MD5ae61c3fde3e3bd4e4e57a0b9efd75ee0"] {
            let response = md5_challenge_response(stored, SALT);
            assert!(!verify_md5_response(stored, SALT, response.as_bytes()));
        }
        assert!(is_md5_hash("md5ee69efad287c7423caf0b3229d71f567"));
        assert!(!is_md5_hash("md5EE69EFAD287C7423CAF0B3229D71F567"));
    }
}
