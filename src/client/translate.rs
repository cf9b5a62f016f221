//! Translating a client's messages for the server in transaction mode:
//! statement names become proxy-wide names (prepared on demand on whichever
//! server runs the transaction), and the statement-management commands that
//! concern those names are answered by the proxy.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::pipeline::{Pipeline, Reply, Synthetic, Undo};
use crate::data_plane::DataPlane;
use crate::protocol::error::{sqlstate, UserFacingError};
use crate::protocol::messages::{self, frontend};
use crate::protocol::TxStatus;
use crate::protocol::{FrameHeader, PgError};
use crate::server::ServerConn;
use crate::statements::{self, Statement};

/// The server-side name of a Parse that only asks the server whether it would
/// accept a statement; never left prepared.
const PROBE_NAME: &[u8] = b"pgsw_probe";

/// Answers a Bind or Describe of a statement whose result columns changed
/// under it, on the server, so that the transaction fails there as it would
/// without a proxy: PostgreSQL's own error, raised on purpose.
const RAISE_RESULT_CHANGED: &[u8] = b"DO $$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
MESSAGE = 'cached plan must not change result type'; END$$\0\0\0";

/// What a client message did to the session's statement state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reset {
    DeallocateAll,
    DiscardAll,
}

/// What became of one client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Done,
    /// It changed the session's statement state.
    Reset(Reset),
    /// Not taken: it waits for the server's answer to what the proxy sent
    /// before it. The same message is translated again later.
    Wait,
}

/// Rewrites one client message for the server in transaction mode.
///
/// A message longer than `STREAM_THRESHOLD` may come as its front only (see
/// `Session::forward_client_frames`): a Query, an unnamed Parse, a Bind up to
/// its statement name, COPY data and the like, whose rest the session passes
/// on behind what was written here, or drops (`passed`).
pub(super) struct Translator<'a> {
    pub(super) data: &'a DataPlane,
    pub(super) server: &'a mut ServerConn,
    pub(super) statements: &'a mut HashMap<Bytes, Arc<Statement>>,
    /// The client's `search_path`: statements are shared within it only.
    pub(super) scope: &'a [u8],
    pub(super) pipeline: &'a mut Pipeline,
    pub(super) to_server: &'a mut BytesMut,
    pub(super) to_client: &'a mut BytesMut,
    /// The message went to the server (renamed or not), so the rest of one
    /// that arrives in pieces follows it; otherwise that rest is dropped.
    pub(super) passed: bool,
}

impl Translator<'_> {
    /// Translates the message `frame`, or its front when it is shorter than
    /// `len` (the whole message's length).
    pub(super) fn translate(&mut self, tag: u8, frame: &[u8], len: usize) -> Result<Step, PgError> {
        if self.pipeline.gated() {
            return Ok(Step::Wait);
        }
        if self.pipeline.skipping() {
            // The server discards everything up to the next Sync after an error; so do we.
            if tag == frontend::SYNC {
                self.pipeline.end_skip();
                self.forward(frame, Some(Reply::Sync));
            }
            return Ok(Step::Done);
        }
        let body = &frame[5..];
        if frame.len() < len {
            return self.translate_front(tag, frame, body, len);
        }
        if self.pipeline.in_copy_in() {
            if matches!(tag, frontend::COPY_DONE | frontend::COPY_FAIL) {
                self.pipeline.end_copy_in();
            }
            // Copy data, and Sync/Flush, which the server ignores in copy mode.
            self.forward(frame, None);
            return Ok(Step::Done);
        }
        match tag {
            frontend::PARSE => self.parse(frame, body)?,
            frontend::BIND => return self.bind(frame, body, len),
            frontend::DESCRIBE => return self.describe(frame, body),
            frontend::CLOSE => self.close(frame, body)?,
            frontend::EXECUTE => self.forward(frame, Some(Reply::Execute)),
            frontend::SYNC => self.forward(frame, Some(Reply::Sync)),
            frontend::QUERY => return self.query(frame, body),
            frontend::FUNCTION_CALL => self.forward(frame, Some(Reply::FunctionCall)),
            // Flush, COPY data and anything else: no reply of their own.
            _ => self.forward(frame, None),
        }
        Ok(Step::Done)
    }

    /// The front of a message passing through in pieces: one the proxy
    /// forwards unchanged, or a Bind, whose statement name it renames.
    fn translate_front(
        &mut self,
        tag: u8,
        frame: &[u8],
        body: &[u8],
        len: usize,
    ) -> Result<Step, PgError> {
        if self.pipeline.in_copy_in() {
            self.forward(frame, None);
            return Ok(Step::Done);
        }
        let reply = match tag {
            frontend::BIND => return self.bind(frame, body, len),
            // Only an unnamed Parse comes in pieces (a named one is held whole).
            frontend::PARSE if body.first() == Some(&0) => Some(Reply::Parse),
            // Not a statement command (see `Session::client_front`).
            frontend::QUERY => Some(Reply::Query),
            frontend::FUNCTION_CALL => Some(Reply::FunctionCall),
            frontend::PARSE
            | frontend::DESCRIBE
            | frontend::CLOSE
            | frontend::EXECUTE
            | frontend::SYNC
            | frontend::FLUSH
            | frontend::TERMINATE => {
                return Err(PgError::protocol(format!(
                    "pgswitch: message type '{}' can't be relayed in pieces",
                    tag.escape_ascii()
                )))
            }
            _ => None,
        };
        self.forward(frame, reply);
        Ok(Step::Done)
    }

    /// A message the proxy would have to hold whole (see
    /// `Session::client_front`), over `max_message_size` (a Bind: whose
    /// names don't end within `BIND_NAMES_MAX`). A Parse, Bind,
    /// Describe, Close or Execute fails as if the server had refused it
    /// (ERROR 54000, then everything up to the next Sync is dropped), and the
    /// session goes on; anything else ends it.
    pub(super) fn refuse_too_large(
        &mut self,
        h: FrameHeader,
        limit: usize,
    ) -> Result<Step, PgError> {
        if self.pipeline.gated() {
            return Ok(Step::Wait);
        }
        if self.pipeline.skipping() {
            return Ok(Step::Done);
        }
        let error = too_large(h, limit);
        match h.tag {
            frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::CLOSE
            | frontend::EXECUTE => {
                self.pipeline
                    .synthetic(Synthetic::Error(error.to_bytes().freeze()), self.to_client);
                self.pipeline.start_skip();
                Ok(Step::Done)
            }
            _ => Err(PgError {
                severity: crate::protocol::Severity::Fatal,
                ..error
            }),
        }
    }

    fn forward(&mut self, frame: &[u8], reply: Option<Reply>) {
        self.to_server.extend_from_slice(frame);
        self.server.tx_status = TxStatus::Busy;
        self.passed = true;
        if let Some(reply) = reply {
            self.pipeline.request(reply, Undo::None);
        }
    }

    fn parse(&mut self, frame: &[u8], body: &[u8]) -> Result<(), PgError> {
        let (name, rest) = messages::split_name(body)?;
        if name.is_empty() {
            self.forward(frame, Some(Reply::Parse));
            return Ok(());
        }
        if self.statements.contains_key(name) {
            let error = PgError::error(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!(
                    "prepared statement \"{}\" already exists",
                    String::from_utf8_lossy(name)
                ),
            );
            self.pipeline
                .synthetic(Synthetic::Error(error.to_bytes().freeze()), self.to_client);
            self.pipeline.start_skip();
            return Ok(());
        }
        let stmt = match self.data.statements.intern_scoped(self.scope, rest) {
            Ok(stmt) => stmt,
            Err(full) => {
                let error = full.to_pg_error();
                self.pipeline
                    .synthetic(Synthetic::Error(error.to_bytes().freeze()), self.to_client);
                self.pipeline.start_skip();
                return Ok(());
            }
        };
        let name = Bytes::copy_from_slice(name);
        // Registered now, so the Bind and Describe pipelined behind the Parse
        // find it; withdrawn if the server refuses or skips the Parse.
        self.statements.insert(name.clone(), stmt.clone());
        let on_server = self.server.statements.touch(stmt.id);
        if !on_server {
            self.evict_for(stmt.id);
            messages::parse_renamed(self.to_server, &stmt.server_name, &stmt.body);
            self.server.tx_status = TxStatus::Busy;
            let undo = Undo::Named {
                name,
                stmt: stmt.clone(),
                prepared: true,
            };
            self.pipeline.request(Reply::Parse, undo);
            self.learn_shape(&stmt, false);
            return Ok(());
        }
        let undo = Undo::Named {
            name,
            stmt: stmt.clone(),
            prepared: false,
        };
        if self.pipeline.may_be_failed() {
            // In a failed transaction PostgreSQL refuses a Parse of anything
            // but COMMIT/ROLLBACK (25P02), so the server must judge this one
            // although it has the statement: the same text under a scratch
            // name, closed again at once.
            messages::parse_renamed(self.to_server, PROBE_NAME, &stmt.body);
            self.pipeline.request(Reply::Parse, undo);
            messages::close_statement(self.to_server, PROBE_NAME);
            self.pipeline.hidden(Reply::Close, Undo::None);
            self.server.tx_status = TxStatus::Busy;
        } else {
            self.pipeline
                .synthetic_undoable(Synthetic::ParseComplete, undo, self.to_client);
        }
        Ok(())
    }

    /// Makes room in the server's statement cache for `id` and records it.
    fn evict_for(&mut self, id: u64) {
        if let Some(old) = self.server.statements.insert(id) {
            messages::close_statement(self.to_server, &statements::server_name(old));
            self.pipeline.hidden(Reply::Close, Undo::Closed(old));
        }
    }

    /// Prepares a client's statement on this server if it isn't there yet.
    /// False when the client's message must wait: the statement was prepared
    /// here afresh, and whether it still describes the result columns its
    /// clients were told of is known only once the server answers.
    fn ensure_prepared(&mut self, stmt: &Arc<Statement>) -> bool {
        if self.server.statements.touch(stmt.id) {
            return true;
        }
        self.evict_for(stmt.id);
        messages::parse_renamed(self.to_server, &stmt.server_name, &stmt.body);
        self.pipeline
            .hidden(Reply::Parse, Undo::Prepared(stmt.clone()));
        self.server.tx_status = TxStatus::Busy;
        let gate = stmt.shape_known();
        self.learn_shape(stmt, gate);
        if gate {
            messages::flush(self.to_server);
        }
        !gate
    }

    /// Asks the server for the statement's result columns (hidden).
    fn learn_shape(&mut self, stmt: &Arc<Statement>, gate: bool) {
        if stmt.shape_known() && !gate {
            return;
        }
        messages::describe_statement(self.to_server, &stmt.server_name);
        let undo = Undo::Shape {
            stmt: stmt.clone(),
            gate,
        };
        if gate {
            self.pipeline.errors_shown(Reply::Describe, undo);
        } else {
            self.pipeline.hidden(Reply::Describe, undo);
        }
    }

    /// The client's statement is one whose result columns changed (see
    /// [`Statement::check_shape`]): the server raises PostgreSQL's 0A000 for
    /// it, and the client's messages up to Sync are dropped, as after any error.
    fn raise_result_changed(&mut self) {
        messages::parse_renamed(self.to_server, b"", RAISE_RESULT_CHANGED);
        self.pipeline.errors_shown(Reply::Parse, Undo::None);
        messages::bind_execute_unnamed(self.to_server);
        self.pipeline.errors_shown(Reply::Bind, Undo::None);
        self.pipeline.errors_shown(Reply::Execute, Undo::None);
        self.server.tx_status = TxStatus::Busy;
        self.pipeline.start_skip();
    }

    /// Bind or Describe of a client's statement, under its proxy-wide name.
    fn use_statement(
        &mut self,
        stmt: Arc<Statement>,
        write: impl FnOnce(&mut BytesMut, &[u8]),
        reply: Reply,
    ) -> Step {
        if !self.ensure_prepared(&stmt) {
            return Step::Wait;
        }
        if stmt.result_changed() {
            if reply == Reply::Describe {
                write(self.to_server, &stmt.server_name);
                self.pipeline.parameters_only();
            }
            self.raise_result_changed();
            return Step::Done;
        }
        write(self.to_server, &stmt.server_name);
        self.server.tx_status = TxStatus::Busy;
        self.passed = true;
        self.pipeline.request(reply, Undo::Uses(stmt));
        Step::Done
    }

    /// A Bind, or its front up to the statement name at least: `len` is the
    /// whole message's length.
    fn bind(&mut self, frame: &[u8], body: &[u8], len: usize) -> Result<Step, PgError> {
        let bind = messages::split_bind(body)?;
        let rest_len = len - (frame.len() - bind.rest.len());
        // An unknown name goes through as is: the server answers 26000 with the
        // client's own statement name, exactly as without a proxy.
        Ok(match self.known(bind.statement) {
            Some(stmt) => self.use_statement(
                stmt,
                |out, name| messages::bind_renamed(out, bind.portal, name, bind.rest, rest_len),
                Reply::Bind,
            ),
            None => {
                self.forward(frame, Some(Reply::Bind));
                Step::Done
            }
        })
    }

    fn describe(&mut self, frame: &[u8], body: &[u8]) -> Result<Step, PgError> {
        let (kind, name) = messages::split_target(body)?;
        Ok(match self.known(name).filter(|_| kind == b'S') {
            Some(stmt) => self.use_statement(stmt, messages::describe_statement, Reply::Describe),
            None => {
                self.forward(frame, Some(Reply::Describe));
                Step::Done
            }
        })
    }

    fn close(&mut self, frame: &[u8], body: &[u8]) -> Result<(), PgError> {
        let (kind, name) = messages::split_target(body)?;
        // The server keeps the shared preparation (other clients may use it);
        // only the client's name goes away.
        if kind == b'S' && !name.is_empty() && self.statements.remove(name).is_some() {
            self.pipeline
                .synthetic(Synthetic::CloseComplete, self.to_client);
        } else {
            self.forward(frame, Some(Reply::Close));
        }
        Ok(())
    }

    fn known(&self, name: &[u8]) -> Option<Arc<Statement>> {
        if name.is_empty() {
            return None;
        }
        self.statements.get(name).cloned()
    }

    /// Simple queries pass through, except the statement-management commands
    /// that concern the proxy's names (see [`answer_statement_command`]).
    fn query(&mut self, frame: &[u8], body: &[u8]) -> Result<Step, PgError> {
        let sql = body.strip_suffix(b"\0").unwrap_or(body);
        let status = self.pipeline.client_status();
        // In a failed transaction the server answers (25P02) and nothing changes.
        let answered = (status != TxStatus::Failed)
            .then(|| {
                let between = status == TxStatus::Idle && self.pipeline.is_idle();
                answer_statement_command(sql, self.statements, between)
            })
            .flatten();
        match answered {
            Some((tag, reset)) => {
                self.pipeline
                    .synthetic(Synthetic::Command(tag), self.to_client);
                Ok(reset.map_or(Step::Done, Step::Reset))
            }
            None => {
                self.forward(frame, Some(Reply::Query));
                Ok(Step::Done)
            }
        }
    }
}

/// The 54000 error for a message over `max_message_size` the proxy would
/// have to hold whole.
fn too_large(h: FrameHeader, limit: usize) -> PgError {
    if h.tag == frontend::BIND {
        return PgError::error(
            sqlstate::PROGRAM_LIMIT_EXCEEDED,
            format!(
                "pgswitch: the portal and statement names of a Bind message take over {} bytes",
                super::long_message::BIND_NAMES_MAX
            ),
        );
    }
    let kind = match h.tag {
        frontend::PARSE => "Parse (of a named statement)".to_owned(),
        frontend::DESCRIBE => "Describe".to_owned(),
        frontend::CLOSE => "Close".to_owned(),
        frontend::EXECUTE => "Execute".to_owned(),
        frontend::QUERY => "Query (of a statement command)".to_owned(),
        frontend::SYNC => "Sync".to_owned(),
        frontend::FLUSH => "Flush".to_owned(),
        frontend::TERMINATE => "Terminate".to_owned(),
        other => format!("'{}'", other.escape_ascii()),
    };
    PgError::error(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!(
            "pgswitch: {kind} message of {} bytes exceeds max_message_size ({limit} bytes)",
            h.len - 1
        ),
    )
    .with_hint(
        "pgswitch holds this message whole (a named statement's text is kept to prepare it on \
         other servers). Raise max_message_size in proxy.toml, or use an unnamed statement or a \
         simple query, which pass through at any size.",
    )
}

/// DEALLOCATE [ALL] and DISCARD ALL of the proxy's statements, answered by the
/// proxy: the CommandComplete tag and what the session must reset. None: the
/// server answers. DISCARD ALL only `between_transactions`.
pub(super) fn answer_statement_command(
    sql: &[u8],
    statements: &mut HashMap<Bytes, Arc<Statement>>,
    between_transactions: bool,
) -> Option<(&'static str, Option<Reset>)> {
    match statement_command(sql)? {
        Command::DeallocateAll => Some(("DEALLOCATE ALL", Some(Reset::DeallocateAll))),
        Command::Deallocate(name) if statements.remove(name.as_bytes()).is_some() => {
            Some(("DEALLOCATE", None))
        }
        Command::DiscardAll if between_transactions => {
            Some(("DISCARD ALL", Some(Reset::DiscardAll)))
        }
        _ => None,
    }
}

enum Command {
    Deallocate(String),
    DeallocateAll,
    DiscardAll,
}

/// Whether a Query whose text starts with `head` may be one of the statement
/// commands the proxy answers (so it must be held whole): its first word is,
/// or (cut short) could be, DEALLOCATE or DISCARD.
pub(super) fn may_be_statement_command(head: &[u8]) -> bool {
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let text = &head[start..];
    let starts_with = |word: &[u8]| {
        let n = word.len().min(text.len());
        text[..n].eq_ignore_ascii_case(&word[..n])
    };
    starts_with(b"deallocate") || starts_with(b"discard")
}

/// Recognizes `DEALLOCATE [PREPARE] name|ALL` and `DISCARD ALL` (alone, with an
/// optional semicolon). A cheap prefix test keeps this off every other query.
fn statement_command(sql: &[u8]) -> Option<Command> {
    let first = sql.iter().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(first, b'd' | b'D') {
        return None;
    }
    let text = std::str::from_utf8(sql)
        .ok()?
        .trim()
        .trim_end_matches(';')
        .trim_end();
    let mut words = text.split_ascii_whitespace();
    let verb = words.next()?.to_ascii_lowercase();
    let mut arg = words.next()?;
    match verb.as_str() {
        "discard" if arg.eq_ignore_ascii_case("all") && words.next().is_none() => {
            Some(Command::DiscardAll)
        }
        "deallocate" => {
            if arg.eq_ignore_ascii_case("prepare") {
                arg = words.next()?;
            }
            if words.next().is_some() {
                return None;
            }
            if arg.eq_ignore_ascii_case("all") {
                return Some(Command::DeallocateAll);
            }
            identifier(arg).map(Command::Deallocate)
        }
        _ => None,
    }
}

/// An SQL identifier as PostgreSQL reads it: quoted keeps case, unquoted folds.
fn identifier(word: &str) -> Option<String> {
    match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(quoted) => Some(quoted.replace("\"\"", "\"")),
        None if !word.contains('"') => Some(word.to_ascii_lowercase()),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_head_tells_what_may_be_a_statement_command() {
        for head in [
            &b"DEALLOCATE ALL"[..],
            b"  \n discard all",
            b"deallocate prepare \"a very long name indeed\"",
            b"   ",
            b"DEALL",
            b"dis",
        ] {
            assert!(may_be_statement_command(head), "{head:?}");
        }
        for head in [
            &b"SELECT length('xxxxxxxxxxxxxxxx"[..],
            b"DELETE FROM t WHERE id IN (1, 2, 3",
            b"do $$ begin perform 1; end $$",
            b"INSERT",
        ] {
            assert!(!may_be_statement_command(head), "{head:?}");
        }
        for sql in [
            &b"DEALLOCATE ALL"[..],
            b" deallocate prepare all;",
            b"discard all",
        ] {
            assert!(statement_command(sql).is_some() && may_be_statement_command(sql));
        }
    }

    #[test]
    fn recognizes_statement_commands() {
        assert!(matches!(
            statement_command(b"DEALLOCATE ALL"),
            Some(Command::DeallocateAll)
        ));
        assert!(matches!(
            statement_command(b" deallocate prepare all;"),
            Some(Command::DeallocateAll)
        ));
        assert!(
            matches!(statement_command(b"DEALLOCATE _pg3_1"), Some(Command::Deallocate(n)) if n == "_pg3_1")
        );
        assert!(
            matches!(statement_command(b"DEALLOCATE S_1"), Some(Command::Deallocate(n)) if n == "s_1")
        );
        assert!(
            matches!(statement_command(b"deallocate \"S_1\""), Some(Command::Deallocate(n)) if n == "S_1")
        );
        assert!(matches!(
            statement_command(b"discard all"),
            Some(Command::DiscardAll)
        ));
        assert!(statement_command(b"discard plans").is_none());
        assert!(statement_command(b"delete from t").is_none());
        assert!(statement_command(b"select 1").is_none());
        assert!(statement_command(b"DEALLOCATE a; select 1").is_none());
    }
}
