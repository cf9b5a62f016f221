//! Messages longer than `STREAM_THRESHOLD`: which ones the session may
//! handle from their front and pass on in pieces, which it must hold whole
//! (and refuse over `max_message_size`), and the errors for those.

use super::translate::may_be_statement_command;
use crate::data_plane::DataPlane;
use crate::protocol::error::sqlstate;
use crate::protocol::framing::STREAM_THRESHOLD;
use crate::protocol::messages::{backend, frontend};
use crate::protocol::{FrameHeader, PgError};

/// What to do with a message longer than `STREAM_THRESHOLD` that is not all
/// here yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Front {
    /// Wait for more: all of it (it is held whole), or enough of its front.
    Wait,
    /// Handle its front now and pass the rest on in pieces.
    Stream,
    /// It would be held whole and is over `max_message_size`.
    TooLarge,
}

/// How much of a long Query's text tells whether it may be a statement
/// command the proxy answers itself.
const QUERY_HEAD: usize = 64;

/// The most a Bind's portal and statement names may take together.
pub(super) const BIND_NAMES_MAX: usize = STREAM_THRESHOLD;

/// How much of a long ErrorResponse holds its severity and code (PostgreSQL
/// sends them first).
const ERROR_HEAD: usize = 4096;

pub(super) fn max_message_size(data: &DataPlane) -> usize {
    data.config().proxy.max_message_size.bytes()
}

/// The verdict for a message that must be held whole: wait for all of it,
/// unless it is over `limit`.
pub(super) fn held_whole(h: FrameHeader, limit: usize) -> Front {
    if h.len - 1 <= limit {
        Front::Wait
    } else {
        Front::TooLarge
    }
}

/// How to take a long client message of which `buffered` (from its header
/// on) is here. Session mode forwards everything unchanged; transaction mode
/// holds whole what it must read or keep (a named Parse, which it interns;
/// Describe, Close, Execute; a Query that may be a statement command) and
/// needs a Bind's front up to its statement name, which it renames.
pub(super) fn client_front(
    transaction_mode: bool,
    h: FrameHeader,
    buffered: &[u8],
    limit: usize,
) -> Front {
    if matches!(
        h.tag,
        frontend::SYNC | frontend::FLUSH | frontend::TERMINATE
    ) {
        return held_whole(h, limit);
    }
    if !transaction_mode {
        return Front::Stream;
    }
    let body = &buffered[5..];
    match h.tag {
        frontend::PARSE => match body.first() {
            None => Front::Wait,
            Some(0) => Front::Stream,
            Some(_) => held_whole(h, limit),
        },
        frontend::BIND => {
            // Its portal and statement names, which no driver makes long.
            let names = &body[..body.len().min(BIND_NAMES_MAX)];
            if names.iter().filter(|&&b| b == 0).nth(1).is_some() {
                Front::Stream
            } else if names.len() == BIND_NAMES_MAX {
                Front::TooLarge
            } else {
                Front::Wait
            }
        }
        frontend::QUERY => match body.get(..QUERY_HEAD) {
            None => Front::Wait,
            Some(head) if may_be_statement_command(head) => held_whole(h, limit),
            Some(_) => Front::Stream,
        },
        frontend::DESCRIBE | frontend::CLOSE | frontend::EXECUTE => held_whole(h, limit),
        _ => Front::Stream,
    }
}

/// How to take a long server message of which `buffered` is here: what the
/// session reads (ReadyForQuery, ParameterStatus, a RowDescription the
/// pipeline may compare) is held whole; of an ErrorResponse, its front.
pub(super) fn server_front(h: FrameHeader, buffered: &[u8], limit: usize) -> Front {
    match h.tag {
        backend::READY_FOR_QUERY | backend::PARAMETER_STATUS | backend::ROW_DESCRIPTION => {
            held_whole(h, limit)
        }
        backend::ERROR_RESPONSE if buffered.len() < 5 + ERROR_HEAD => Front::Wait,
        _ => Front::Stream,
    }
}

/// A message session mode would hold whole over `max_message_size`: only
/// Sync, Flush and Terminate are (and they are tiny unless malformed).
pub(super) fn session_too_large(h: FrameHeader, limit: usize) -> PgError {
    PgError::fatal(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!(
            "pgswitch: message type '{}' of {} bytes exceeds max_message_size ({limit} bytes)",
            h.tag.escape_ascii(),
            h.len - 1
        ),
    )
}

/// A server message the session must read whole (ReadyForQuery,
/// ParameterStatus, RowDescription) over `max_message_size`: the session
/// ends, and the server connection is closed with it.
pub(super) fn server_too_large(h: FrameHeader, limit: usize) -> PgError {
    PgError::fatal(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!(
            "pgswitch: the server sent a message of type '{}' of {} bytes, over max_message_size \
             ({limit} bytes)",
            h.tag.escape_ascii(),
            h.len - 1
        ),
    )
    .with_hint("Raise max_message_size in proxy.toml.")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header and the first bytes of a message of `len` bytes on the wire.
    fn front(tag: u8, len: usize, body: &[u8]) -> (FrameHeader, Vec<u8>) {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&((len - 1) as i32).to_be_bytes());
        bytes.extend_from_slice(body);
        let h = FrameHeader::peek(&bytes).unwrap().unwrap();
        (h, bytes)
    }

    const LONG: usize = 10 * STREAM_THRESHOLD;
    const LIMIT: usize = 2 * STREAM_THRESHOLD;

    fn client(transaction_mode: bool, tag: u8, len: usize, body: &[u8]) -> Front {
        let (h, bytes) = front(tag, len, body);
        client_front(transaction_mode, h, &bytes, LIMIT)
    }

    #[test]
    fn what_transaction_mode_streams_holds_or_refuses() {
        use frontend::*;
        // A named Parse is held whole, up to the limit; an unnamed one streams.
        assert_eq!(client(true, PARSE, LIMIT, b"s1\0select"), Front::Wait);
        assert_eq!(client(true, PARSE, LONG, b"s1\0select"), Front::TooLarge);
        assert_eq!(client(true, PARSE, LONG, b"\0select"), Front::Stream);
        assert_eq!(client(true, PARSE, LONG, b""), Front::Wait);
        // A Bind streams once its names are here.
        assert_eq!(client(true, BIND, LONG, b"\0s1\0\0\0"), Front::Stream);
        assert_eq!(client(true, BIND, LONG, b"\0s1"), Front::Wait);
        let endless = vec![b'n'; BIND_NAMES_MAX];
        assert_eq!(client(true, BIND, LONG, &endless), Front::TooLarge);
        // A Query streams unless it may be DEALLOCATE or DISCARD.
        let select = [&b"SELECT length('"[..], &[b'x'; QUERY_HEAD]].concat();
        assert_eq!(client(true, QUERY, LONG, &select), Front::Stream);
        assert_eq!(client(true, QUERY, LONG, &select[..10]), Front::Wait);
        let deallocate = [&b"DEALLOCATE "[..], &[b' '; QUERY_HEAD]].concat();
        assert_eq!(client(true, QUERY, LIMIT, &deallocate), Front::Wait);
        assert_eq!(client(true, QUERY, LONG, &deallocate), Front::TooLarge);
        for tag in [DESCRIBE, CLOSE, EXECUTE, SYNC, FLUSH, TERMINATE] {
            assert_eq!(client(true, tag, LONG, b"S"), Front::TooLarge);
            assert_eq!(client(true, tag, LIMIT, b"S"), Front::Wait);
        }
        for tag in [COPY_DATA, COPY_FAIL, FUNCTION_CALL, b'?'] {
            assert_eq!(client(true, tag, LONG, b""), Front::Stream);
        }
    }

    #[test]
    fn session_mode_streams_everything_it_forwards() {
        use frontend::*;
        for tag in [PARSE, BIND, QUERY, DESCRIBE, CLOSE, EXECUTE, COPY_DATA] {
            assert_eq!(client(false, tag, LONG, b"s1\0"), Front::Stream);
        }
        assert_eq!(client(false, SYNC, LONG, b""), Front::TooLarge);
    }

    #[test]
    fn what_is_held_whole_from_the_server() {
        use backend::*;
        let server = |tag: u8, len: usize, body: &[u8]| {
            let (h, bytes) = front(tag, len, body);
            server_front(h, &bytes, LIMIT)
        };
        for tag in [READY_FOR_QUERY, PARAMETER_STATUS, ROW_DESCRIPTION] {
            assert_eq!(server(tag, LIMIT, b""), Front::Wait);
            assert_eq!(server(tag, LONG, b""), Front::TooLarge);
        }
        assert_eq!(server(ERROR_RESPONSE, LONG, b"SERROR\0"), Front::Wait);
        assert_eq!(
            server(ERROR_RESPONSE, LONG, &[b'M'; ERROR_HEAD]),
            Front::Stream
        );
        for tag in [DATA_ROW, NOTICE_RESPONSE, b'd', PARAMETER_DESCRIPTION] {
            assert_eq!(server(tag, LONG, b""), Front::Stream);
        }
    }
}
