//! Matching server replies to client requests, so the proxy can hide replies to
//! messages it injected (a Parse a client never sent on this connection, a
//! parameter sync) and add replies to messages it answered itself (a Parse the
//! server already has, a Close of a proxy-held statement), in exactly the order
//! a server would have sent them.
//!
//! Only message tags are read. Each request the server answers is queued with
//! the kind of reply that ends it; an ErrorResponse in the extended protocol
//! ends the failing request and makes the server skip everything up to the next
//! Sync, which the queue mirrors.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::protocol::messages::{self, backend};
use crate::protocol::TxStatus;
use std::sync::Arc;

use crate::protocol::error::ServerErrorFields;
use crate::statements::{ServerStatements, Statement};

/// What a request's reply ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Parse,
    Bind,
    Close,
    Describe,
    Execute,
    Sync,
    Query,
    FunctionCall,
}

impl Reply {
    fn ended_by(self, tag: u8) -> bool {
        use Reply::*;
        match tag {
            backend::PARSE_COMPLETE => self == Parse,
            backend::BIND_COMPLETE => self == Bind,
            backend::CLOSE_COMPLETE => self == Close,
            backend::ROW_DESCRIPTION | backend::NO_DATA => self == Describe,
            backend::COMMAND_COMPLETE | backend::EMPTY_QUERY | backend::PORTAL_SUSPENDED => {
                self == Execute
            }
            backend::READY_FOR_QUERY => matches!(self, Sync | Query | FunctionCall),
            // In the extended protocol an error ends the request that failed; a
            // simple query or a Sync still ends with ReadyForQuery after it.
            backend::ERROR_RESPONSE => !matches!(self, Sync | Query | FunctionCall),
            _ => false,
        }
    }
}

/// A reply the proxy writes itself in place of the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synthetic {
    /// An ErrorResponse the proxy raises (e.g. 42P05 for a duplicate name).
    Error(Bytes),
    ParseComplete,
    CloseComplete,
    /// CommandComplete with this tag, then ReadyForQuery.
    Command(&'static str),
    /// ReadyForQuery alone (a Sync answered by the proxy).
    Ready,
}

impl Synthetic {
    fn encode(&self, out: &mut BytesMut, status: TxStatus) {
        match self {
            Synthetic::Error(bytes) => out.extend_from_slice(bytes),
            Synthetic::ParseComplete => out.extend_from_slice(messages::PARSE_COMPLETE),
            Synthetic::CloseComplete => out.extend_from_slice(messages::CLOSE_COMPLETE),
            &Synthetic::Command(tag) => {
                messages::command_complete(out, tag);
                messages::ready_for_query(out, status.byte());
            }
            Synthetic::Ready => messages::ready_for_query(out, status.byte()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Visibility {
    /// The client's request: the reply goes to the client.
    Client,
    /// Injected by the proxy: the reply is swallowed.
    Hidden,
    /// Injected by the proxy on the client's behalf: success is swallowed, an
    /// error is the answer to the client's request.
    ErrorsShown,
    /// A Describe of a statement whose result columns changed: the client gets
    /// its ParameterDescription, then the error PostgreSQL raises there.
    ParametersOnly,
    Synthetic(Synthetic),
}

/// How to put the server's statement cache right if a request never ran.
#[derive(Debug, Clone)]
pub enum Undo {
    None,
    /// A Parse the proxy injected to prepare this statement: if it failed or
    /// was skipped, the server does not have it; if it succeeded, the
    /// statement is valid.
    Prepared(Arc<Statement>),
    /// A Close that evicted it: if skipped, the server still has it.
    Closed(u64),
    /// A Bind or Describe of this statement: if the server says its cached
    /// plan went stale (the table changed), the next Parse of the text must
    /// prepare it afresh.
    Uses(Arc<Statement>),
    /// The client's named Parse. Its name was registered when the Parse went
    /// out, so that the Bind and Describe pipelined behind it find it; if the
    /// server refuses or skips the Parse (25P02 in a failed transaction, a
    /// syntax error), the name is withdrawn, as PostgreSQL never created it.
    /// `prepared`: this Parse also prepared the proxy-wide name on the server.
    Named {
        name: Bytes,
        stmt: Arc<Statement>,
        prepared: bool,
    },
    /// A Describe of this statement the proxy added to learn its result
    /// columns (see [`Statement::check_shape`]). `gate`: the client's next
    /// message waits for the answer.
    Shape {
        stmt: Arc<Statement>,
        gate: bool,
    },
}

#[derive(Debug)]
struct Pending {
    reply: Reply,
    visibility: Visibility,
    undo: Undo,
}

/// What to do with one server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Forward,
    Swallow,
}

#[derive(Debug)]
pub struct Pipeline {
    queue: VecDeque<Pending>,
    /// The server is discarding messages until the client's next Sync.
    skipping: bool,
    /// ReadyForQuery status as the client last saw it.
    client_status: TxStatus,
    /// A hidden parameter sync failed; the server's session state is unknown.
    pub hidden_failed: bool,
    /// The server is in COPY FROM STDIN of an extended-protocol Execute, where
    /// it ignores Sync and Flush until CopyDone or CopyFail.
    copy_in: bool,
    /// Client statement names whose Parse the server refused or skipped (see
    /// [`Undo::Named`]); the session withdraws them.
    pub refused: Vec<(Bytes, Arc<Statement>)>,
    /// Gating [`Undo::Shape`] describes not yet answered.
    gates: usize,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline {
            queue: VecDeque::new(),
            skipping: false,
            client_status: TxStatus::Idle,
            hidden_failed: false,
            copy_in: false,
            refused: Vec::new(),
            gates: 0,
        }
    }
}

impl Pipeline {
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && !self.skipping
    }

    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// A Sync sent while the server skips: it ends the skip.
    pub fn end_skip(&mut self) {
        self.skipping = false;
    }

    /// The proxy itself failed a request: like the server after an error, it
    /// drops the client's requests up to the next Sync.
    pub fn start_skip(&mut self) {
        self.skipping = true;
    }

    pub fn in_copy_in(&self) -> bool {
        self.copy_in
    }

    /// CopyDone or CopyFail: the server listens to Sync again.
    pub fn end_copy_in(&mut self) {
        self.copy_in = false;
    }

    pub fn client_status(&self) -> TxStatus {
        self.client_status
    }

    /// The transaction may be failed by the time the server reads the next
    /// message: the client last saw a failed transaction, or a Sync or query
    /// is still unanswered and may leave one.
    pub fn may_be_failed(&self) -> bool {
        self.client_status == TxStatus::Failed
            || self.queue.iter().any(|p| {
                p.visibility == Visibility::Client
                    && matches!(p.reply, Reply::Sync | Reply::Query | Reply::FunctionCall)
            })
    }

    pub fn request(&mut self, reply: Reply, undo: Undo) {
        self.push(reply, Visibility::Client, undo);
    }

    pub fn hidden(&mut self, reply: Reply, undo: Undo) {
        self.push(reply, Visibility::Hidden, undo);
    }

    /// A request the proxy adds for the client: its error is the client's.
    pub fn errors_shown(&mut self, reply: Reply, undo: Undo) {
        self.push(reply, Visibility::ErrorsShown, undo);
    }

    /// A statement Describe whose ParameterDescription alone is the client's.
    pub fn parameters_only(&mut self) {
        self.push(Reply::Describe, Visibility::ParametersOnly, Undo::None);
    }

    fn push(&mut self, reply: Reply, visibility: Visibility, undo: Undo) {
        if matches!(undo, Undo::Shape { gate: true, .. }) {
            self.gates += 1;
        }
        self.queue.push_back(Pending {
            reply,
            visibility,
            undo,
        });
    }

    /// The client's next message waits: the proxy is learning whether a
    /// statement it re-prepared still describes the same result columns.
    pub fn gated(&self) -> bool {
        self.gates > 0
    }

    /// Answers a request in the proxy: at once if nothing is outstanding,
    /// otherwise when the replies before it have gone out.
    pub fn synthetic(&mut self, reply: Synthetic, out: &mut BytesMut) {
        self.synthetic_undoable(reply, Undo::None, out);
    }

    /// Like [`synthetic`](Self::synthetic), with what to undo if an error
    /// before it makes the server skip the request it stands for.
    pub fn synthetic_undoable(&mut self, reply: Synthetic, undo: Undo, out: &mut BytesMut) {
        if self.queue.is_empty() {
            reply.encode(out, self.client_status);
        } else {
            self.queue.push_back(Pending {
                reply: Reply::Sync,
                visibility: Visibility::Synthetic(reply),
                undo,
            });
        }
    }

    /// Routes one server message (`tag`) and writes `frame` to `out` when it is
    /// the client's. Async messages (notices, notifications, parameter reports)
    /// always reach the client.
    pub fn on_server_message(
        &mut self,
        tag: u8,
        frame: &[u8],
        out: &mut BytesMut,
        cache: &mut ServerStatements,
    ) -> Route {
        if matches!(
            tag,
            backend::NOTICE_RESPONSE | backend::NOTIFICATION_RESPONSE | backend::PARAMETER_STATUS
        ) {
            out.extend_from_slice(frame);
            return Route::Forward;
        }
        let Some(head) = self.queue.front() else {
            // Nothing asked for this (e.g. a FATAL error when the server shuts down).
            out.extend_from_slice(frame);
            return Route::Forward;
        };
        let reply = head.reply;
        let from_client = head.visibility == Visibility::Client;
        // A statement the proxy re-prepares can fail (the table changed): that
        // error is the answer to the client's Bind. Other hidden replies vanish.
        let shown = match head.visibility {
            Visibility::Client => true,
            Visibility::Hidden => tag == backend::ERROR_RESPONSE && reply == Reply::Parse,
            Visibility::ErrorsShown => tag == backend::ERROR_RESPONSE,
            Visibility::ParametersOnly => {
                matches!(
                    tag,
                    backend::ERROR_RESPONSE | backend::PARAMETER_DESCRIPTION
                )
            }
            Visibility::Synthetic(_) => false,
        };
        let route = if shown {
            Route::Forward
        } else {
            Route::Swallow
        };
        if route == Route::Forward {
            out.extend_from_slice(frame);
        }
        if tag == backend::READY_FOR_QUERY && from_client {
            self.client_status = TxStatus::from_byte(frame.get(5).copied());
        }
        if tag == backend::COPY_IN_RESPONSE && reply == Reply::Execute {
            // The Syncs the client sent after this Execute reached the server
            // in copy mode and will never be answered.
            self.copy_in = true;
            let mut i = 1;
            while i < self.queue.len() {
                if self.queue[i].reply == Reply::Sync
                    && self.queue[i].visibility == Visibility::Client
                {
                    self.queue.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        if !reply.ended_by(tag) {
            return route;
        }
        let Some(done) = self.queue.pop_front() else {
            return route;
        };
        match (tag, done.undo) {
            (backend::ERROR_RESPONSE, Undo::Uses(stmt)) => {
                if ServerErrorFields::parse(frame.get(5..).unwrap_or_default()).code == STALE_PLAN {
                    stmt.mark_stale();
                }
                self.skip_to_sync(cache);
            }
            (backend::ERROR_RESPONSE, undone) => {
                self.undo(undone, cache);
                self.skip_to_sync(cache);
            }
            (backend::PARSE_COMPLETE, Undo::Prepared(stmt))
            | (
                backend::PARSE_COMPLETE,
                Undo::Named {
                    stmt,
                    prepared: true,
                    ..
                },
            ) => stmt.mark_validated(),
            (backend::ROW_DESCRIPTION | backend::NO_DATA, Undo::Shape { stmt, gate }) => {
                let columns = if tag == backend::NO_DATA {
                    &[][..]
                } else {
                    frame.get(5..).unwrap_or_default()
                };
                stmt.check_shape(columns);
                self.gates = self.gates.saturating_sub(usize::from(gate));
            }
            _ => {}
        }
        self.emit_ready_synthetics(out);
        route
    }

    /// Marks the hidden query at the head as failed (its error was swallowed).
    pub fn note_hidden_error(&mut self) {
        if self
            .queue
            .front()
            .is_some_and(|p| p.visibility == Visibility::Hidden)
        {
            self.hidden_failed = true;
        }
    }

    /// After an error the server skips every request up to the next Sync; so
    /// do we, undoing what the skipped requests would have done.
    fn skip_to_sync(&mut self, cache: &mut ServerStatements) {
        while let Some(p) = self.queue.front() {
            if p.reply == Reply::Sync && !matches!(p.visibility, Visibility::Synthetic(_)) {
                return;
            }
            if let Some(p) = self.queue.pop_front() {
                self.undo(p.undo, cache);
            }
        }
        self.skipping = true;
    }

    fn emit_ready_synthetics(&mut self, out: &mut BytesMut) {
        while let Some(Pending {
            visibility: Visibility::Synthetic(reply),
            ..
        }) = self.queue.front()
        {
            reply.encode(out, self.client_status);
            self.queue.pop_front();
        }
    }

    /// Puts right what a request that never ran would have done.
    fn undo(&mut self, undo: Undo, cache: &mut ServerStatements) {
        match undo {
            Undo::None | Undo::Uses(_) => {}
            Undo::Prepared(stmt) => cache.forget(stmt.id),
            Undo::Closed(id) => cache.restore(id),
            Undo::Named {
                name,
                stmt,
                prepared,
            } => {
                if prepared {
                    cache.forget(stmt.id);
                }
                self.refused.push((name, stmt));
            }
            Undo::Shape { gate, .. } => self.gates = self.gates.saturating_sub(usize::from(gate)),
        }
    }
}

/// "cached plan must not change result type".
const STALE_PLAN: &str = "0A000";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statements::StatementRegistry;

    fn msg(tag: u8) -> Vec<u8> {
        vec![tag, 0, 0, 0, 4]
    }

    fn rfq(status: u8) -> Vec<u8> {
        vec![b'Z', 0, 0, 0, 5, status]
    }

    #[test]
    fn synthetic_replies_keep_their_place() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let mut out = BytesMut::new();
        p.request(Reply::Bind, Undo::None);
        p.synthetic(Synthetic::CloseComplete, &mut out);
        p.request(Reply::Sync, Undo::None);
        assert!(out.is_empty(), "must wait for the BindComplete");
        p.on_server_message(b'2', &msg(b'2'), &mut out, &mut cache);
        assert_eq!(&out[..], &[msg(b'2'), msg(b'3')].concat()[..]);
        p.on_server_message(b'Z', &rfq(b'I'), &mut out, &mut cache);
        assert!(p.is_idle());
    }

    #[test]
    fn hidden_replies_are_swallowed() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let mut out = BytesMut::new();
        let registry = StatementRegistry::default();
        let stmt = registry.intern(b"select 1\0\0\0").unwrap();
        p.hidden(Reply::Query, Undo::None);
        p.hidden(Reply::Parse, Undo::Prepared(stmt.clone()));
        p.request(Reply::Bind, Undo::None);
        for m in [
            msg(b'T'),
            msg(b'D'),
            msg(b'C'),
            rfq(b'I'),
            msg(b'1'),
            msg(b'2'),
        ] {
            p.on_server_message(m[0], &m, &mut out, &mut cache);
        }
        assert_eq!(&out[..], &msg(b'2')[..]);
        assert!(p.is_idle());
        assert!(stmt.is_validated(), "ParseComplete validates the statement");
    }

    #[test]
    fn error_skips_to_sync_and_undoes_preparations() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let registry = StatementRegistry::default();
        let stmt = registry.intern(b"select 1\0\0\0").unwrap();
        cache.insert(stmt.id);
        let mut out = BytesMut::new();
        p.request(Reply::Bind, Undo::None);
        p.request(Reply::Parse, Undo::Prepared(stmt.clone()));
        p.hidden(Reply::Close, Undo::Closed(3));
        p.synthetic(Synthetic::ParseComplete, &mut out);
        p.request(Reply::Sync, Undo::None);
        p.on_server_message(b'E', &msg(b'E'), &mut out, &mut cache);
        assert!(!cache.touch(stmt.id), "the skipped Parse never prepared it");
        assert!(!stmt.is_validated());
        assert!(cache.touch(3), "the skipped Close never closed it");
        p.on_server_message(b'Z', &rfq(b'I'), &mut out, &mut cache);
        assert_eq!(&out[..], &[msg(b'E'), rfq(b'I')].concat()[..]);
        assert!(p.is_idle());
    }

    #[test]
    fn refused_or_skipped_named_parses_are_withdrawn() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let registry = StatementRegistry::default();
        let refused = registry.intern(b"select 1\0\0\0").unwrap();
        let skipped = registry.intern(b"select 2\0\0\0").unwrap();
        cache.insert(refused.id);
        let mut out = BytesMut::new();
        let named = |name: &'static str, stmt: &Arc<Statement>, prepared| Undo::Named {
            name: Bytes::from_static(name.as_bytes()),
            stmt: stmt.clone(),
            prepared,
        };
        p.request(Reply::Parse, named("a", &refused, true));
        p.synthetic_undoable(
            Synthetic::ParseComplete,
            named("b", &skipped, false),
            &mut out,
        );
        p.request(Reply::Sync, Undo::None);
        assert!(p.may_be_failed(), "a Sync is outstanding");
        p.on_server_message(b'E', &msg(b'E'), &mut out, &mut cache);
        let names: Vec<_> = p.refused.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        assert!(
            !cache.touch(refused.id),
            "the refused Parse prepared nothing"
        );
        assert_eq!(
            &out[..],
            &msg(b'E')[..],
            "no ParseComplete for a skipped Parse"
        );
        p.on_server_message(b'Z', &rfq(b'E'), &mut out, &mut cache);
        assert!(p.may_be_failed(), "the transaction is failed");
    }

    #[test]
    fn accepted_named_parse_validates_its_statement() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let registry = StatementRegistry::default();
        let stmt = registry.intern(b"rollback\0\0\0").unwrap();
        let mut out = BytesMut::new();
        p.request(
            Reply::Parse,
            Undo::Named {
                name: Bytes::from_static(b"r"),
                stmt: stmt.clone(),
                prepared: true,
            },
        );
        p.on_server_message(b'1', &msg(b'1'), &mut out, &mut cache);
        assert!(stmt.is_validated());
        assert!(p.refused.is_empty());
        assert!(!p.may_be_failed());
    }

    #[test]
    fn a_gating_describe_holds_the_client_until_answered() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let registry = StatementRegistry::default();
        let stmt = registry.intern(b"select * from t\0\0\0").unwrap();
        stmt.check_shape(b"\0\x01a\0");
        let mut out = BytesMut::new();
        p.hidden(Reply::Parse, Undo::Prepared(stmt.clone()));
        p.errors_shown(
            Reply::Describe,
            Undo::Shape {
                stmt: stmt.clone(),
                gate: true,
            },
        );
        assert!(p.gated());
        for m in [msg(b'1'), msg(b't')] {
            p.on_server_message(m[0], &m, &mut out, &mut cache);
        }
        assert!(p.gated(), "not answered yet");
        let mut other_columns = msg(b'T');
        other_columns.extend_from_slice(b"\0\x01b\0");
        p.on_server_message(b'T', &other_columns, &mut out, &mut cache);
        assert!(!p.gated());
        assert!(out.is_empty(), "all of it hidden");
        assert!(
            stmt.result_changed(),
            "other result columns than first described"
        );
    }

    #[test]
    fn errors_of_requests_made_for_the_client_reach_it() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let mut out = BytesMut::new();
        p.parameters_only();
        p.errors_shown(Reply::Parse, Undo::None);
        p.request(Reply::Sync, Undo::None);
        for m in [msg(b't'), msg(b'T'), msg(b'E'), rfq(b'E')] {
            p.on_server_message(m[0], &m, &mut out, &mut cache);
        }
        assert_eq!(&out[..], &[msg(b't'), msg(b'E'), rfq(b'E')].concat()[..]);
        assert!(p.is_idle());
    }

    #[test]
    fn error_without_sync_skips_until_the_client_sends_one() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let mut out = BytesMut::new();
        p.request(Reply::Execute, Undo::None);
        p.on_server_message(b'E', &msg(b'E'), &mut out, &mut cache);
        assert!(p.skipping());
        assert!(!p.is_idle());
    }

    #[test]
    fn synthetic_command_reports_the_current_status() {
        let mut p = Pipeline::default();
        let mut cache = ServerStatements::new(10);
        let mut out = BytesMut::new();
        p.request(Reply::Query, Undo::None);
        p.synthetic(Synthetic::Command("DEALLOCATE"), &mut out);
        p.on_server_message(b'Z', &rfq(b'T'), &mut out, &mut cache);
        assert_eq!(out.last(), Some(&b'T'));
    }
}
