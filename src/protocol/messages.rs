//! Builders for the messages pgswitch writes itself, and the few field readers
//! the session needs (statement names in Parse/Bind/Describe/Close).
//!
//! Everything here appends to a caller's buffer so a batch of messages costs one
//! write and no per-message allocation.

use bytes::{BufMut, BytesMut};

use super::error::PgError;
use super::framing::{read_cbytes, CANCEL_REQUEST_CODE, PROTOCOL_3_0};

/// Backend (server → client) message tags the proxy inspects.
pub mod backend {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const DATA_ROW: u8 = b'D';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const EMPTY_QUERY: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NO_DATA: u8 = b'n';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// Frontend (client → server) message tags the proxy inspects.
pub mod frontend {
    pub const BIND: u8 = b'B';
    pub const CLOSE: u8 = b'C';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PARSE: u8 = b'P';
    pub const PASSWORD: u8 = b'p';
    pub const QUERY: u8 = b'Q';
    pub const SYNC: u8 = b'S';
    pub const TERMINATE: u8 = b'X';
}

/// Writes `tag`, a placeholder length, runs `body`, then patches the length.
#[inline]
pub fn write_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

// ---- backend messages the proxy sends to clients ----

pub fn authentication(out: &mut BytesMut, code: i32, data: &[u8]) {
    write_message(out, backend::AUTHENTICATION, |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT: i32 = 3;
pub const AUTH_MD5: i32 = 5;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    write_message(out, backend::PARAMETER_STATUS, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn backend_key_data(out: &mut BytesMut, pid: u32, secret: u32) {
    write_message(out, backend::BACKEND_KEY_DATA, |b| {
        b.put_u32(pid);
        b.put_u32(secret);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    write_message(out, backend::READY_FOR_QUERY, |b| b.put_u8(status));
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    write_message(out, backend::COMMAND_COMPLETE, |b| {
        put_cstr(b, tag.as_bytes())
    });
}

pub const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
pub const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

// ---- frontend messages the proxy sends to servers ----

pub fn startup(out: &mut BytesMut, params: &[(&str, &str)]) {
    let len_at = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(out, k.as_bytes());
        put_cstr(out, v.as_bytes());
    }
    out.put_u8(0);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(pid: u32, secret: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..16].copy_from_slice(&secret.to_be_bytes());
    out
}

pub fn password(out: &mut BytesMut, data: &[u8]) {
    write_message(out, frontend::PASSWORD, |b| b.put_slice(data));
}

pub fn sasl_initial_response(out: &mut BytesMut, mechanism: &str, data: &[u8]) {
    write_message(out, frontend::PASSWORD, |b| {
        put_cstr(b, mechanism.as_bytes());
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

pub fn query(out: &mut BytesMut, sql: &str) {
    write_message(out, frontend::QUERY, |b| put_cstr(b, sql.as_bytes()));
}

pub fn close_statement(out: &mut BytesMut, name: &[u8]) {
    write_message(out, frontend::CLOSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, name);
    });
}

pub const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// The one-byte answers to SSLRequest and GSSENCRequest: go on with TLS, or
/// go on in plaintext.
pub const ENCRYPTION_ACCEPTED: &[u8] = b"S";
pub const ENCRYPTION_REFUSED: &[u8] = b"N";

// ---- field readers ----

/// Splits a message body that starts with a NUL-terminated name.
#[inline]
pub fn split_name(body: &[u8]) -> Result<(&[u8], &[u8]), PgError> {
    let mut rest = body;
    let name = read_cbytes(&mut rest)?;
    Ok((name, rest))
}

/// An Authentication message body: its request code and what follows.
#[inline]
pub fn split_authentication(body: &[u8]) -> Option<(i32, &[u8])> {
    let (code, data) = body.split_first_chunk::<4>()?;
    Some((i32::from_be_bytes(*code), data))
}

/// The parts of a Bind body.
#[derive(Debug, PartialEq, Eq)]
pub struct BindParts<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Formats, values and result formats, untouched.
    pub rest: &'a [u8],
}

#[inline]
pub fn split_bind(body: &[u8]) -> Result<BindParts<'_>, PgError> {
    let (portal, rest) = split_name(body)?;
    let (statement, rest) = split_name(rest)?;
    Ok(BindParts {
        portal,
        statement,
        rest,
    })
}

/// A Describe or Close body: 'S' (statement) or 'P' (portal) and a name.
#[inline]
pub fn split_target(body: &[u8]) -> Result<(u8, &[u8]), PgError> {
    let (&kind, rest) = body
        .split_first()
        .ok_or_else(|| PgError::protocol("empty Describe/Close message"))?;
    let (name, _) = split_name(rest)?;
    Ok((kind, name))
}

/// Writes a Parse message with a new statement name and the original query and types.
pub fn parse_renamed(out: &mut BytesMut, name: &[u8], query_and_types: &[u8]) {
    write_message(out, frontend::PARSE, |b| {
        put_cstr(b, name);
        b.put_slice(query_and_types);
    });
}

/// Writes a Bind message that names another statement. `rest` is what
/// follows the names (formats, values, result formats), or its front when the
/// Bind passes through in pieces: `rest_len` is its whole length.
pub fn bind_renamed(
    out: &mut BytesMut,
    portal: &[u8],
    statement: &[u8],
    rest: &[u8],
    rest_len: usize,
) {
    let len = 4 + portal.len() + 1 + statement.len() + 1 + rest_len;
    out.put_u8(frontend::BIND);
    // Never more than the client's own Bind plus a statement name: its length
    // passed FrameHeader's check, and proxy names are short.
    out.put_i32(len as i32);
    put_cstr(out, portal);
    put_cstr(out, statement);
    out.put_slice(rest);
}

/// Writes Bind of the unnamed statement to the unnamed portal, no
/// parameters, and Execute of it: to run what the last unnamed Parse prepared.
pub fn bind_execute_unnamed(out: &mut BytesMut) {
    write_message(out, frontend::BIND, |b| {
        b.put_slice(b"\0\0");
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    write_message(out, frontend::EXECUTE, |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
}

/// An unnamed Parse, Bind, Execute and Sync of `sql` with text parameters
/// and text results: one query of the proxy's own, in one round trip.
pub fn extended_query(out: &mut BytesMut, sql: &str, params: &[&str]) {
    write_message(out, frontend::PARSE, |b| {
        b.put_u8(0);
        put_cstr(b, sql.as_bytes());
        b.put_i16(0);
    });
    write_message(out, frontend::BIND, |b| {
        b.put_slice(b"\0\0");
        b.put_i16(0);
        b.put_i16(params.len() as i16);
        for p in params {
            b.put_i32(p.len() as i32);
            b.put_slice(p.as_bytes());
        }
        b.put_i16(0);
    });
    write_message(out, frontend::EXECUTE, |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
    write_message(out, frontend::SYNC, |_| {});
}

pub fn flush(out: &mut BytesMut) {
    write_message(out, frontend::FLUSH, |_| {});
}

/// Writes a Describe of a renamed statement.
pub fn describe_statement(out: &mut BytesMut, name: &[u8]) {
    write_message(out, frontend::DESCRIBE, |b| {
        b.put_u8(b'S');
        put_cstr(b, name);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FrameHeader;

    #[test]
    fn bind_rename_keeps_framing() {
        let mut out = BytesMut::new();
        bind_renamed(&mut out, b"", b"pgsw_7", b"\0\0\0\0\0\0", 6);
        let header = FrameHeader::complete(&out).unwrap().unwrap();
        assert_eq!(header.len, out.len());
        let parts = split_bind(&out[5..]).unwrap();
        assert_eq!(
            parts,
            BindParts {
                portal: b"",
                statement: b"pgsw_7",
                rest: b"\0\0\0\0\0\0"
            }
        );
    }

    #[test]
    fn bind_rename_of_a_front_counts_the_whole_message() {
        let mut out = BytesMut::new();
        bind_renamed(&mut out, b"p", b"pgsw_7", b"\0\0", 1000);
        let header = FrameHeader::peek(&out).unwrap().unwrap();
        assert_eq!(header.len, out.len() - 2 + 1000);
    }

    #[test]
    fn readers_reject_truncated_bodies() {
        assert!(split_name(b"abc").is_err());
        assert!(split_bind(b"p\0s").is_err());
        assert!(split_target(b"").is_err());
        assert!(split_target(b"S").is_err());
    }
}
