//! Entry points for the fuzz targets (`fuzz/`) and the corpus test
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes, runs them through
//! the parsers a peer's bytes reach, and checks what must hold whatever the
//! input. A broken property panics (that is what the fuzzer looks for); bad
//! input never does. Not an API.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::protocol::error::ServerErrorFields;
use crate::protocol::framing::{
    peek_encryption_request, read_cstr, take_startup, EncryptionRequest, MAX_STARTUP_LEN,
};
use crate::protocol::messages::{self, backend, frontend};
use crate::protocol::{FrameHeader, StartupPacket};
use crate::session_params::ParamSet;
use crate::statements::{Statement, StatementRegistry};

/// The handshake's parsers, as a client's first bytes reach them: answered
/// SSLRequest/GSSENCRequest packets (8 bytes each), then startup packets
/// one after another, and the startup parameters of each (`options`
/// included) as the login checks them and turns them into a server's SET.
pub fn startup(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        match peek_encryption_request(&buf) {
            EncryptionRequest::Ssl | EncryptionRequest::GssEnc => {
                let _ = buf.split_to(8);
                continue;
            }
            EncryptionRequest::Incomplete => assert!(buf.len() < 8),
            EncryptionRequest::None => {}
        }
        let before = buf.len();
        match take_startup(&mut buf) {
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete packet consumes nothing");
                return;
            }
            Err(_) => return,
            Ok(Some(packet)) => {
                let used = before - buf.len();
                assert!(
                    (8..=MAX_STARTUP_LEN).contains(&used),
                    "a startup packet of {used} bytes"
                );
                if let StartupPacket::Startup { params, .. } = packet {
                    if let Ok(set) = ParamSet::from_startup(&params) {
                        let _ = set.transition_sql(&ParamSet::default());
                        let _ = ParamSet::default().transition_sql(&set);
                    }
                }
            }
        }
    }
}

/// The frame reader over a byte stream (either direction), and the field
/// readers the proxy applies to the frames it looks into. Every frame it
/// returns lies within the input, and reading stops at the first error.
pub fn frames(data: &[u8]) {
    let mut rest = data;
    loop {
        match FrameHeader::complete(rest) {
            Err(_) => {
                assert!(rest.len() >= 5, "an error needs a whole header");
                return;
            }
            Ok(None) => {
                if let Ok(Some(h)) = FrameHeader::peek(rest) {
                    assert!(h.len > rest.len(), "a complete frame was not taken");
                }
                return;
            }
            Ok(Some(h)) => {
                assert!(
                    h.len >= 5 && h.len <= rest.len(),
                    "frame of {} bytes from {} bytes of input",
                    h.len,
                    rest.len()
                );
                let (frame, tail) = rest.split_at(h.len);
                assert_eq!(frame[0], h.tag);
                look_into(h.tag, &frame[5..]);
                rest = tail;
            }
        }
    }
}

/// What the proxy reads from inside a frame, by tag (frontend and backend
/// tags overlap; every reader gets a go).
fn look_into(tag: u8, body: &[u8]) {
    match tag {
        frontend::PARSE => {
            let _ = messages::split_name(body);
        }
        frontend::BIND => {
            let _ = messages::split_bind(body);
        }
        frontend::DESCRIBE | frontend::CLOSE => {
            let _ = messages::split_target(body);
        }
        backend::AUTHENTICATION => {
            let _ = messages::split_authentication(body);
        }
        backend::ERROR_RESPONSE | backend::NOTICE_RESPONSE => {
            let _ = ServerErrorFields::parse(body);
        }
        _ => {
            let mut b = body;
            let _ = read_cstr(&mut b);
        }
    }
}

/// Transaction mode's translation of a client's stream, without a server:
/// the statement names a Parse registers, Close and the statement commands
/// the proxy answers (DEALLOCATE, DISCARD ALL) take away, and the rewriting
/// of Parse, Bind and Describe under a proxy-wide name. The first byte says
/// whether the client is between transactions.
pub fn translate(data: &[u8]) {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let between = flags & 1 == 1;
    let registry = StatementRegistry::default();
    let mut names: HashMap<Bytes, Arc<Statement>> = HashMap::new();
    let mut rest = stream;
    while let Ok(Some(h)) = FrameHeader::complete(rest) {
        let (frame, tail) = rest.split_at(h.len);
        rest = tail;
        let body = &frame[5..];
        match h.tag {
            frontend::PARSE => {
                let Ok((name, query_and_types)) = messages::split_name(body) else {
                    continue;
                };
                // The default registry's bounds are far above what a fuzz
                // input can fill; a refusal would be an ERROR 54000, not a panic.
                let Ok(stmt) = registry.intern(query_and_types) else {
                    continue;
                };
                let mut out = BytesMut::new();
                messages::parse_renamed(&mut out, &stmt.server_name, &stmt.body);
                let renamed = one_frame(&out, frontend::PARSE);
                assert_eq!(
                    messages::split_name(renamed).ok(),
                    Some((&stmt.server_name[..], query_and_types)),
                    "Parse renamed"
                );
                if !name.is_empty() {
                    names.insert(Bytes::copy_from_slice(name), stmt);
                }
            }
            frontend::BIND => {
                let Ok(bind) = messages::split_bind(body) else {
                    continue;
                };
                let Some(stmt) = names.get(bind.statement) else {
                    continue;
                };
                let mut out = BytesMut::new();
                messages::bind_renamed(
                    &mut out,
                    bind.portal,
                    &stmt.server_name,
                    bind.rest,
                    bind.rest.len(),
                );
                let renamed = messages::split_bind(one_frame(&out, frontend::BIND))
                    .expect("a renamed Bind splits");
                assert_eq!(renamed.portal, bind.portal);
                assert_eq!(renamed.statement, &stmt.server_name[..]);
                assert_eq!(renamed.rest, bind.rest);
            }
            frontend::DESCRIBE => {
                if let Ok((b'S', name)) = messages::split_target(body) {
                    if let Some(stmt) = names.get(name) {
                        let mut out = BytesMut::new();
                        messages::describe_statement(&mut out, &stmt.server_name);
                        let target = messages::split_target(one_frame(&out, frontend::DESCRIBE));
                        assert_eq!(target.ok(), Some((b'S', &stmt.server_name[..])));
                    }
                }
            }
            frontend::CLOSE => {
                if let Ok((b'S', name)) = messages::split_target(body) {
                    names.remove(name);
                }
            }
            frontend::QUERY => {
                let sql = body.strip_suffix(b"\0").unwrap_or(body);
                let before: Vec<Bytes> = names.keys().cloned().collect();
                let answer =
                    crate::client::fuzzing::answer_statement_command(sql, &mut names, between);
                match answer {
                    Some(("DEALLOCATE", false)) => {
                        assert_eq!(names.len() + 1, before.len(), "DEALLOCATE removes one name");
                    }
                    Some(("DEALLOCATE ALL", true)) => {}
                    Some(("DISCARD ALL", true)) => {
                        assert!(between, "DISCARD ALL inside a transaction")
                    }
                    None => assert_eq!(names.len(), before.len(), "unanswered, unchanged"),
                    Some(other) => panic!("unexpected answer {other:?}"),
                }
            }
            _ => {}
        }
    }
}

/// The body of the single frame `out` holds, checked to be one `tag` frame.
fn one_frame(out: &[u8], tag: u8) -> &[u8] {
    let h = FrameHeader::complete(out)
        .ok()
        .flatten()
        .expect("a frame the proxy writes reads back");
    assert_eq!((h.tag, h.len), (tag, out.len()), "one whole frame");
    &out[5..]
}

/// The log redaction every log line goes through: any text, no panic; and a
/// conninfo `password=<secret>` put between any two texts (the input's two
/// halves) never survives it. The first byte picks the secret's length, the
/// next ones its letters.
pub fn redact(data: &[u8]) {
    let _ = crate::logging::redact(&String::from_utf8_lossy(data));
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let len = 8 + usize::from(len % 24);
    if rest.len() < len {
        return;
    }
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let secret: String = rest[..len]
        .iter()
        .map(|b| LETTERS[usize::from(*b) % LETTERS.len()] as char)
        .collect();
    let (before, after) = rest[len..].split_at((rest.len() - len) / 2);
    let (before, after) = (
        String::from_utf8_lossy(before),
        String::from_utf8_lossy(after),
    );
    if before.contains(&secret) || after.contains(&secret) || secret == "password" {
        return;
    }
    let text = format!("{before} password={secret} {after}");
    let redacted = crate::logging::redact(&text);
    assert!(
        !redacted.contains(&secret),
        "password {secret:?} survived: {redacted:?}"
    );
}
