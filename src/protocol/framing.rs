//! Framing by header: a message is one tag byte and a big-endian i32 length that
//! counts itself but not the tag. The hot path never decodes bodies; it reads
//! headers to find message boundaries and forwards the bytes untouched.
//!
//! A message longer than [`STREAM_THRESHOLD`] that the proxy does not need
//! whole (a DataRow, a Query, a Bind's parameters) is not waited for: its
//! front is handled as it arrives, and the rest is a [`Passthrough`], moved
//! to the other side (or dropped) piece by piece through bounded buffers.

use bytes::{Buf, BytesMut};

use super::error::PgError;

/// Largest message the proxy accepts. PostgreSQL's own limit is 1 GiB
/// (`PQ_LARGE_MESSAGE_LIMIT`); anything claiming more is a broken or hostile peer.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Messages up to this long are always read whole before they are handled;
/// longer ones may pass through in pieces. Above the size of nearly every
/// message (so the common path is unchanged), small enough that a buffer
/// never needs to hold more.
pub const STREAM_THRESHOLD: usize = 64 * 1024;

/// The rest of a message on its way through in pieces: as its bytes arrive
/// they go to the other side, or are dropped, never gathered whole.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Passthrough {
    remaining: usize,
    forward: bool,
}

impl Passthrough {
    /// The `remaining` bytes of a message whose front was just handled;
    /// `forward`: they go to the other side, else they are dropped.
    pub fn new(remaining: usize, forward: bool) -> Passthrough {
        Passthrough { remaining, forward }
    }

    /// Part of a message is still to come.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.remaining > 0
    }

    /// Moves what `src` holds of the message to `out` (or drops it). True
    /// once all of it is through; what follows it stays in `src`.
    pub fn pass(&mut self, src: &mut BytesMut, out: &mut BytesMut) -> bool {
        let n = self.remaining.min(src.len());
        if n > 0 {
            if !self.forward {
                src.advance(n);
            } else if out.is_empty() && n == src.len() {
                // All of `src` goes: hand over the buffer instead of copying it.
                std::mem::swap(src, out);
            } else {
                out.extend_from_slice(&src[..n]);
                src.advance(n);
            }
            self.remaining -= n;
        }
        self.remaining == 0
    }
}

/// Startup packets are small; PostgreSQL caps them at 10 000 bytes.
pub const MAX_STARTUP_LEN: usize = 10_000;

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Header of one complete message at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub tag: u8,
    /// Total length on the wire: tag + length field + body.
    pub len: usize,
}

impl FrameHeader {
    /// Reads the header at the start of `buf`. `Ok(None)` when fewer than five bytes
    /// are buffered; an error when the length field is impossible.
    #[inline]
    pub fn peek(buf: &[u8]) -> Result<Option<FrameHeader>, PgError> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let declared = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if declared < 4 || declared as usize > MAX_MESSAGE_LEN {
            return Err(PgError::protocol(format!(
                "invalid message length {declared} for message type '{}'",
                buf[0].escape_ascii()
            )));
        }
        Ok(Some(FrameHeader {
            tag: buf[0],
            len: declared as usize + 1,
        }))
    }

    /// The header of the next message if the whole message is buffered.
    #[inline]
    pub fn complete(buf: &[u8]) -> Result<Option<FrameHeader>, PgError> {
        Ok(Self::peek(buf)?.filter(|h| buf.len() >= h.len))
    }
}

/// The first packet of a connection, which has no tag byte.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Startup {
        version: i32,
        /// Key/value pairs in the order the client sent them.
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: u32,
        secret: u32,
    },
}

/// What the first 8 bytes of a connection (or of what follows an answered
/// request) ask for, before any startup packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionRequest {
    /// Fewer than 8 bytes are buffered.
    Incomplete,
    Ssl,
    GssEnc,
    /// Not an encryption request: a startup or cancel packet (or garbage),
    /// read and judged by [`take_startup`].
    None,
}

/// Looks at the front of `buf` for SSLRequest or GSSENCRequest, without
/// consuming it (an answered request is 8 bytes to advance past).
pub fn peek_encryption_request(buf: &[u8]) -> EncryptionRequest {
    let Some(head) = buf.get(..8) else {
        // A length other than 8 already says it is no request.
        return match buf.get(..4) {
            Some(len) if len != 8i32.to_be_bytes() => EncryptionRequest::None,
            _ => EncryptionRequest::Incomplete,
        };
    };
    if head[..4] != 8i32.to_be_bytes() {
        return EncryptionRequest::None;
    }
    match i32::from_be_bytes([head[4], head[5], head[6], head[7]]) {
        SSL_REQUEST_CODE => EncryptionRequest::Ssl,
        GSSENC_REQUEST_CODE => EncryptionRequest::GssEnc,
        _ => EncryptionRequest::None,
    }
}

/// Splits a startup packet off the front of `buf`, if complete.
pub fn take_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, PgError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(PgError::protocol(format!(
            "invalid length of startup packet: {len}"
        )));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = packet.get_i32();
    let parsed = match code {
        SSL_REQUEST_CODE if len == 8 => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE if len == 8 => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE if len == 16 => StartupPacket::Cancel {
            pid: packet.get_u32(),
            secret: packet.get_u32(),
        },
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            return Err(PgError::protocol("invalid length of startup packet"))
        }
        version => StartupPacket::Startup {
            version,
            params: parse_startup_params(&packet)?,
        },
    };
    Ok(Some(parsed))
}

fn parse_startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, PgError> {
    let mut params = Vec::new();
    loop {
        let key = read_cstr(&mut body)?;
        if key.is_empty() {
            break;
        }
        let value = read_cstr(&mut body)?;
        params.push((key.to_owned(), value.to_owned()));
    }
    if !body.is_empty() {
        return Err(PgError::protocol(
            "invalid startup packet layout: expected terminator as last byte",
        ));
    }
    Ok(params)
}

/// Reads a NUL-terminated UTF-8 string and advances past it.
pub fn read_cstr<'a>(buf: &mut &'a [u8]) -> Result<&'a str, PgError> {
    let bytes = read_cbytes(buf)?;
    std::str::from_utf8(bytes).map_err(|_| PgError::protocol("invalid UTF-8 in message string"))
}

/// Reads NUL-terminated bytes and advances past the terminator.
#[inline]
pub fn read_cbytes<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], PgError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| PgError::protocol("missing string terminator in message"))?;
    let (s, rest) = buf.split_at(end);
    *buf = &rest[1..];
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn encryption_requests_are_recognized_by_their_first_eight_bytes() {
        let request = |code: i32| [8i32.to_be_bytes(), code.to_be_bytes()].concat();
        assert_eq!(
            peek_encryption_request(&request(SSL_REQUEST_CODE)),
            EncryptionRequest::Ssl
        );
        assert_eq!(
            peek_encryption_request(&request(GSSENC_REQUEST_CODE)),
            EncryptionRequest::GssEnc
        );
        assert_eq!(
            peek_encryption_request(&request(PROTOCOL_3_0)),
            EncryptionRequest::None
        );
        assert_eq!(
            peek_encryption_request(&request(SSL_REQUEST_CODE)[..5]),
            EncryptionRequest::Incomplete
        );
        assert_eq!(
            peek_encryption_request(&[0, 0, 0, 40, 0]),
            EncryptionRequest::None
        );
        assert_eq!(
            peek_encryption_request(&[0, 0]),
            EncryptionRequest::Incomplete
        );
    }

    fn startup(params: &[(&str, &str)]) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_i32(PROTOCOL_3_0);
        for (k, v) in params {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut out = BytesMut::new();
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(&body);
        out
    }

    #[test]
    fn parses_startup_params_in_order() {
        let mut buf = startup(&[("user", "app"), ("database", "db")]);
        let parsed = take_startup(&mut buf).unwrap().unwrap();
        assert_eq!(
            parsed,
            StartupPacket::Startup {
                version: PROTOCOL_3_0,
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            }
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn waits_for_a_partial_startup() {
        let full = startup(&[("user", "app")]);
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(take_startup(&mut buf).unwrap(), None);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bytes in [
            &[0u8, 0, 0, 2][..],
            &[0xff, 0xff, 0xff, 0xff],
            &[0, 0, 0, 8, 0, 3, 0, 0],
            &[0, 0, 0, 9, 0, 3, 0, 0, b'u'],
            &[0, 0, 0, 12, 4, 0xd2, 0x16, 0x2f, 0, 0, 0, 0],
        ] {
            let mut buf = BytesMut::from(bytes);
            let _ = take_startup(&mut buf);
        }
        let mut bad_len = BytesMut::from(&[0u8, 0, 0, 2][..]);
        assert!(take_startup(&mut bad_len).is_err());
    }

    #[test]
    fn passthrough_moves_the_rest_of_a_message_and_stops_at_its_end() {
        let mut rest = Passthrough::new(10, true);
        let mut src = BytesMut::from(&b"0123"[..]);
        let mut out = BytesMut::new();
        assert!(!rest.pass(&mut src, &mut out));
        assert_eq!((&out[..], src.len()), (&b"0123"[..], 0));
        src.extend_from_slice(b"456789Znext");
        assert!(rest.pass(&mut src, &mut out));
        assert_eq!(&out[..], b"0123456789");
        assert_eq!(&src[..], b"Znext", "what follows the message stays");
        assert!(!rest.is_active());
        assert!(rest.pass(&mut src, &mut out), "done: moves nothing more");
        assert_eq!(&src[..], b"Znext");

        let mut dropped = Passthrough::new(3, false);
        let mut src = BytesMut::from(&b"abcdef"[..]);
        let mut out = BytesMut::new();
        assert!(dropped.pass(&mut src, &mut out));
        assert!(out.is_empty());
        assert_eq!(&src[..], b"def");
    }

    #[test]
    fn frame_header_checks_length() {
        assert_eq!(FrameHeader::peek(b"Z\0\0").unwrap(), None);
        assert_eq!(
            FrameHeader::peek(b"Z\0\0\0\x05I").unwrap(),
            Some(FrameHeader { tag: b'Z', len: 6 })
        );
        assert!(FrameHeader::peek(b"Z\0\0\0\x03").is_err());
        assert!(FrameHeader::peek(b"D\x7f\xff\xff\xff").is_err());
        assert_eq!(FrameHeader::complete(b"Z\0\0\0\x05").unwrap(), None);
    }
}
