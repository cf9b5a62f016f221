//! Translating a client's messages for the server in transaction mode:
//! statement names become proxy-wide names (prepared on demand on whichever
//! server runs the transaction), and the statement-management commands that
//! concern those names are answered by the proxy.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::pipeline::{Pipeline, Reply, Synthetic, Undo};
use crate::data_plane::DataPlane;
use crate::protocol::error::sqlstate;
use crate::protocol::messages::{self, frontend};
use crate::protocol::PgError;
use crate::protocol::TxStatus;
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
pub(super) struct Translator<'a> {
    pub(super) data: &'a DataPlane,
    pub(super) server: &'a mut ServerConn,
    pub(super) statements: &'a mut HashMap<Bytes, Arc<Statement>>,
    /// The client's `search_path`: statements are shared within it only.
    pub(super) scope: &'a [u8],
    pub(super) pipeline: &'a mut Pipeline,
    pub(super) to_server: &'a mut BytesMut,
    pub(super) to_client: &'a mut BytesMut,
}

impl Translator<'_> {
    pub(super) fn translate(&mut self, tag: u8, frame: &[u8]) -> Result<Step, PgError> {
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
            frontend::BIND => return self.bind(frame, body),
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

    fn forward(&mut self, frame: &[u8], reply: Option<Reply>) {
        self.to_server.extend_from_slice(frame);
        self.server.tx_status = TxStatus::Busy;
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
        let stmt = self.data.statements.intern_scoped(self.scope, rest);
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
        self.pipeline.request(reply, Undo::Uses(stmt));
        Step::Done
    }

    fn bind(&mut self, frame: &[u8], body: &[u8]) -> Result<Step, PgError> {
        let bind = messages::split_bind(body)?;
        // An unknown name goes through as is: the server answers 26000 with the
        // client's own statement name, exactly as without a proxy.
        Ok(match self.known(bind.statement) {
            Some(stmt) => self.use_statement(
                stmt,
                |out, name| messages::bind_renamed(out, bind.portal, name, bind.rest),
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
