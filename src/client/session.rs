//! The session loop: relays frames between a client and a server connection,
//! taking a server from the pool when a transaction starts and giving it back
//! when ReadyForQuery reports idle (transaction mode), or holding one for the
//! whole session (session mode).
//!
//! Both sockets are polled in one task with bounded buffers, so a client that
//! pipelines faster than the server answers never deadlocks the pair, and a slow
//! reader holds back only its own server.
//!
//! Memory per connection is bounded whatever the size of a message: one longer
//! than `STREAM_THRESHOLD` that the proxy forwards unchanged (a DataRow, a
//! Query, COPY data, a Bind's parameters behind its renamed front) passes
//! through in pieces as it arrives (a [`Passthrough`]); what must be held whole
//! (a named Parse, a ParameterStatus) is capped by `max_message_size`.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::io::{flush_tls, read_client, read_some, write_some};
use super::long_message::{
    client_front, max_message_size, server_front, server_too_large, session_too_large, Front,
};
use super::pipeline::{Pipeline, Reply, Route, Synthetic, Undo};
use super::translate::{answer_statement_command, Reset, Step, Translator};
use crate::backends::Backend;
use crate::cancel::{CancelKey, CancelTarget};
use crate::client_conn::{ClientConn, ClientError};
use crate::config::PoolMode;
use crate::data_plane::DataPlane;
use crate::pool::{Checkout, Pool};
use crate::protocol::error::{sqlstate, ServerErrorFields};
use crate::protocol::framing::{Passthrough, STREAM_THRESHOLD};
use crate::protocol::messages::{self, backend, frontend};
use crate::protocol::TxStatus;
use crate::protocol::{FrameHeader, PgError};
use crate::server::ServerConn;
use crate::session_params::ParamSet;
use crate::statements::Statement;
use crate::switch::InFlight;
use crate::tls::ClientStream;

/// A logged-in client, ready for its session.
pub struct Established {
    pub backend: Arc<Backend>,
    pub pool: Arc<Pool>,
    pub mode: PoolMode,
    pub params: Arc<ParamSet>,
    pub cancel: CancelKey,
}

/// Stop reading a side once this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;

/// How a session ended, for the close log line.
pub type CloseReason = &'static str;

/// Who the client is, for the session's log lines.
#[derive(Clone, Copy)]
pub struct Origin {
    pub id: u32,
    pub peer: SocketAddr,
    pub started: Instant,
}

pub struct Session {
    data: Arc<DataPlane>,
    client: ClientStream,
    cbuf: BytesMut,
    to_client: BytesMut,
    to_server: BytesMut,
    server: Option<Checkout>,
    /// Counts this transaction (or session-mode session) for a cutover's drain.
    in_flight: Option<InFlight>,
    backend: Arc<Backend>,
    /// The pool of (`backend`, the client's database and user).
    pool: Arc<Pool>,
    mode: PoolMode,
    /// What the client expects its session parameters to be.
    params: Arc<ParamSet>,
    /// The parameters the client started with, restored by DISCARD ALL.
    startup_params: Arc<ParamSet>,
    /// The client's prepared statements by the client's names.
    statements: HashMap<Bytes, Arc<Statement>>,
    /// The `search_path` the client's statements are interned under.
    scope: Bytes,
    pipeline: Pipeline,
    cancel: CancelKey,
    /// The server sent a FATAL error, which the client has been given.
    server_said_fatal: bool,
    /// When the current transaction's first message was forwarded.
    tx_started: Option<Instant>,
    /// Queries forwarded in the current transaction, added to the metrics at its end.
    queries: u64,
    /// The client's next message waits for a server answer (see
    /// [`Step::Wait`]): read no more than `HIGH_WATER` of its messages meanwhile.
    waiting: bool,
    /// The rest of a client message on its way to the server in pieces.
    client_rest: Passthrough,
    /// The rest of a server message on its way to the client in pieces.
    server_rest: Passthrough,
    origin: Origin,
}

/// Which side closed.
enum Closed {
    Client,
    Server(io::Error),
}

impl Session {
    pub fn new(
        data: Arc<DataPlane>,
        conn: ClientConn,
        login: Established,
        origin: Origin,
    ) -> Session {
        Session {
            data,
            client: conn.stream,
            cbuf: conn.buf,
            to_client: BytesMut::new(),
            to_server: BytesMut::new(),
            server: None,
            in_flight: None,
            backend: login.backend,
            pool: login.pool,
            mode: login.mode,
            startup_params: login.params.clone(),
            scope: statement_scope(&login.params),
            params: login.params,
            statements: HashMap::new(),
            pipeline: Pipeline::default(),
            cancel: login.cancel,
            server_said_fatal: false,
            tx_started: None,
            queries: 0,
            waiting: false,
            client_rest: Passthrough::default(),
            server_rest: Passthrough::default(),
            origin,
        }
    }

    /// Runs the session to its end and logs why it ended. An error meant for
    /// the client is sent before the connection closes.
    pub async fn run(mut self: Box<Self>) {
        let outcome = self.serve().await;
        // Boxed, like every rare path: an idle session's future stays small.
        Box::pin(self.close(outcome)).await;
    }

    /// Tells the client why its session ends (if there is someone to tell),
    /// pools a session-mode server that can be reused, and logs the close.
    async fn close(&mut self, outcome: Result<CloseReason, ClientError>) {
        let reason = match outcome {
            Ok(reason) => reason.to_owned(),
            Err(failure) => {
                let (reply, reason) = failure.into_reply(&self.data.metrics);
                if let Some(e) = reply {
                    self.to_client.extend_from_slice(&e.to_bytes());
                    let _ = self.flush_client().await;
                }
                reason
            }
        };
        self.return_session_server().await;
        let Origin { id, peer, started } = self.origin;
        let key = &self.pool.key;
        let duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(client = id, %peer, user = %key.user, database = %key.database, duration_ms, %reason, "client closed");
    }

    /// Session mode: a server whose session ended cleanly between transactions
    /// is reset with DISCARD ALL and pooled for the next session; any other
    /// server left attached is closed when the checkout drops.
    async fn return_session_server(&mut self) {
        if self.mode != PoolMode::Session || !self.is_between_transactions() {
            return;
        }
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.cancel.slot.set(None);
        if server.rbuf.is_empty() && server.run_hidden("DISCARD ALL").await.is_ok() {
            server.applied = Arc::new(ParamSet::default());
            server.statements.clear();
            server.release();
        }
    }

    async fn serve(&mut self) -> Result<CloseReason, ClientError> {
        let mut signals = self.data.switch.signals();
        let session_mode = self.mode == PoolMode::Session;
        loop {
            if self.server.is_none() && self.mode == PoolMode::Transaction {
                self.answer_locally()?;
            }
            if self.has_client_frame()? {
                if self.server.is_none() {
                    if self.cbuf.first() == Some(&frontend::TERMINATE) {
                        return Ok("client terminated");
                    }
                    self.attach().await?;
                }
                if self.forward_client_frames()? {
                    return Ok("client terminated");
                }
            }
            self.release_if_idle();
            let idle = self.is_between_transactions();
            let signal = *signals.borrow_and_update();
            if idle && signal.shutdown {
                self.flush_client().await?;
                return Err(PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection due to administrator command",
                )
                .into());
            }
            let holds_server = self.server.is_some();
            if idle && session_mode && holds_server && signal.draining {
                // A cutover is switching servers: the session's state can't
                // follow, so it ends here, between transactions, and the
                // client reconnects to the new side.
                self.flush_client().await?;
                return Err(PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection because pgswitch is switching database servers",
                )
                .with_hint("Reconnect: the new session runs on the new server.")
                .into());
            }
            if idle {
                self.shrink_buffers();
            }
            let pumped = tokio::select! {
                r = self.pump() => r,
                _ = signals.changed(), if idle => continue,
            };
            match pumped {
                Ok(()) => {}
                Err(Closed::Client) => return Ok("client disconnected"),
                Err(Closed::Server(e)) => return Box::pin(self.server_lost(e)).await,
            }
            if self.server.is_some() {
                self.relay_server_frames()?;
                self.release_if_idle();
            }
        }
    }

    /// A client message can be taken: all of it is here, or a long one's
    /// front that may go ahead of the rest (or the rest of one under way).
    fn has_client_frame(&self) -> Result<bool, PgError> {
        if self.client_rest.is_active() {
            return Ok(!self.cbuf.is_empty());
        }
        let Some(h) = FrameHeader::peek(&self.cbuf)? else {
            return Ok(false);
        };
        if self.cbuf.len() >= h.len {
            return Ok(true);
        }
        if h.len <= STREAM_THRESHOLD {
            return Ok(false);
        }
        let transaction_mode = self.mode == PoolMode::Transaction;
        let limit = max_message_size(&self.data);
        Ok(client_front(transaction_mode, h, &self.cbuf, limit) != Front::Wait)
    }

    /// No message is partly through, either way.
    fn between_messages(&self) -> bool {
        !self.client_rest.is_active() && !self.server_rest.is_active()
    }

    /// No transaction in progress: nothing would be lost by ending here.
    fn is_between_transactions(&self) -> bool {
        match &self.server {
            None => self.cbuf.is_empty(),
            Some(server) => {
                self.mode == PoolMode::Session
                    && server.tx_status == TxStatus::Idle
                    && self.pipeline.is_idle()
                    && self.to_server.is_empty()
                    && self.between_messages()
            }
        }
    }

    /// Answers, without a server, what needs none between transactions: a
    /// Parse of a statement some server already accepted, a Close, a Sync, and
    /// DEALLOCATE/DISCARD ALL. Drivers prepare statements one round trip at a
    /// time (pgbench -M prepared blocks a whole thread on it); needing a server
    /// for that while the pool is busy with the same thread's other clients
    /// would deadlock.
    fn answer_locally(&mut self) -> Result<(), PgError> {
        let mut pos = 0;
        while let Some(h) = FrameHeader::complete(&self.cbuf[pos..])? {
            let body = &self.cbuf[pos + 5..pos + h.len];
            let reply = match h.tag {
                frontend::PARSE => {
                    let (name, rest) = messages::split_name(body)?;
                    if name.is_empty() || self.statements.contains_key(name) {
                        break;
                    }
                    let Some(stmt) = self
                        .data
                        .statements
                        .get_scoped(&self.scope, rest)
                        .filter(|s| s.is_validated())
                    else {
                        break;
                    };
                    self.statements.insert(Bytes::copy_from_slice(name), stmt);
                    Some(Synthetic::ParseComplete)
                }
                frontend::CLOSE => match messages::split_target(body)? {
                    (b'S', name) if !name.is_empty() => {
                        self.statements.remove(name);
                        Some(Synthetic::CloseComplete)
                    }
                    _ => break,
                },
                frontend::SYNC => Some(Synthetic::Ready),
                frontend::FLUSH => None,
                frontend::QUERY => {
                    let sql = body.strip_suffix(b"\0").unwrap_or(body);
                    let Some((tag, reset)) =
                        answer_statement_command(sql, &mut self.statements, true)
                    else {
                        break;
                    };
                    if let Some(reset) = reset {
                        reset_statements(
                            reset,
                            &mut self.statements,
                            &mut self.params,
                            &self.startup_params,
                            &mut self.scope,
                        );
                    }
                    Some(Synthetic::Command(tag))
                }
                _ => break,
            };
            if let Some(reply) = reply {
                self.pipeline.synthetic(reply, &mut self.to_client);
            }
            pos += h.len;
        }
        self.cbuf.advance(pos);
        Ok(())
    }

    /// Takes a server connection for the next transaction: passes the gate,
    /// follows a backend swap, and brings the server's session parameters in
    /// line with the client's.
    async fn attach(&mut self) -> Result<(), ClientError> {
        // The waits are boxed, off the fast path: an idle session's future
        // would otherwise reserve room for them.
        let in_flight = match self.data.switch.try_enter() {
            Some(in_flight) => in_flight,
            None => Box::pin(self.data.switch.enter()).await,
        };
        if !self.data.switch.is_active(&self.backend) {
            let active = self.data.switch.active();
            self.pool = self.data.pool_for(&active, &self.pool.key);
            self.backend = active;
        }
        let mut server = match self.pool.acquire_idle() {
            Some(server) => server,
            None => {
                let (server, waited) = Box::pin(self.pool.acquire()).await?;
                if let Some(waited) = waited {
                    self.data
                        .metrics
                        .server_wait_seconds
                        .observe(waited.as_secs_f64());
                }
                server
            }
        };
        if self.mode == PoolMode::Session {
            // Session mode relays the server's replies unfiltered: the
            // parameters are set before the client's first message goes out.
            Box::pin(self.apply_params(&mut server)).await?;
        } else {
            self.sync_params(&mut server);
        }
        self.cancel.slot.set(Some(CancelTarget {
            addr: server.addr.clone(),
            pid: server.backend_pid,
            secret: server.backend_secret,
        }));
        self.server = Some(server);
        self.in_flight = Some(in_flight);
        Ok(())
    }

    /// Moves the server to the client's parameters now, for session mode.
    async fn apply_params(&mut self, server: &mut ServerConn) -> Result<(), ClientError> {
        if !Arc::ptr_eq(&server.applied, &self.params) {
            if let Some(sql) = self.params.transition_sql(&server.applied) {
                server.run_hidden(&sql).await?;
            }
            server.applied = self.params.clone();
        }
        Ok(())
    }

    /// Queues a hidden query that moves the server to the client's parameters.
    fn sync_params(&mut self, server: &mut ServerConn) {
        if Arc::ptr_eq(&server.applied, &self.params) {
            return;
        }
        if let Some(sql) = self.params.transition_sql(&server.applied) {
            messages::query(&mut self.to_server, &sql);
            self.pipeline.hidden(Reply::Query, Undo::None);
            server.tx_status = TxStatus::Busy;
        }
        server.applied = self.params.clone();
    }

    /// Gives the server back once the transaction is over: ReadyForQuery said
    /// idle and every request sent has been answered.
    fn release_if_idle(&mut self) {
        if self.mode != PoolMode::Transaction {
            return;
        }
        let Some(server) = &self.server else { return };
        if server.tx_status != TxStatus::Idle
            || !self.pipeline.is_idle()
            || !self.to_server.is_empty()
            || !self.between_messages()
        {
            return;
        }
        self.cancel.slot.set(None);
        self.in_flight = None;
        if let Some(server) = self.server.take() {
            if std::mem::take(&mut self.pipeline.hidden_failed) {
                drop(server); // its session state is unknown: close it
            } else {
                server.release();
            }
        }
    }

    /// Moves client messages to the server, rewriting statement names in
    /// transaction mode: complete ones, and the front of a long one that may
    /// go ahead, whose rest then follows as it arrives. Returns true when the
    /// client sent Terminate.
    fn forward_client_frames(&mut self) -> Result<bool, PgError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(false);
        };
        let server: &mut ServerConn = server;
        if self.client_rest.is_active()
            && !self.client_rest.pass(&mut self.cbuf, &mut self.to_server)
        {
            return Ok(false);
        }
        let transaction_mode = self.mode == PoolMode::Transaction;
        let mut pos = 0;
        let mut terminated = false;
        self.waiting = false;
        while let Some(h) = FrameHeader::peek(&self.cbuf[pos..])? {
            let buffered = &self.cbuf[pos..];
            let front = if buffered.len() >= h.len {
                None
            } else if h.len <= STREAM_THRESHOLD {
                break;
            } else {
                let limit = max_message_size(&self.data);
                match client_front(transaction_mode, h, buffered, limit) {
                    Front::Wait => break,
                    front => Some((front, limit)),
                }
            };
            let frame = &buffered[..h.len.min(buffered.len())];
            if h.tag == frontend::TERMINATE && front.is_none() {
                pos += h.len;
                terminated = true;
                break;
            }
            let passed = if transaction_mode {
                let mut tx = Translator {
                    data: &self.data,
                    server: &mut *server,
                    statements: &mut self.statements,
                    scope: &self.scope,
                    pipeline: &mut self.pipeline,
                    to_server: &mut self.to_server,
                    to_client: &mut self.to_client,
                    passed: false,
                };
                let step = match front {
                    Some((Front::TooLarge, limit)) => tx.refuse_too_large(h, limit)?,
                    _ => tx.translate(h.tag, frame, h.len)?,
                };
                let passed = tx.passed;
                match step {
                    Step::Done => {}
                    Step::Reset(reset) => reset_statements(
                        reset,
                        &mut self.statements,
                        &mut self.params,
                        &self.startup_params,
                        &mut self.scope,
                    ),
                    Step::Wait => {
                        // Taken again once the server has answered.
                        self.waiting = true;
                        break;
                    }
                }
                passed
            } else {
                if let Some((Front::TooLarge, limit)) = front {
                    return Err(session_too_large(h, limit));
                }
                self.to_server.extend_from_slice(frame);
                server.tx_status = TxStatus::Busy;
                true
            };
            pos += frame.len();
            if matches!(h.tag, frontend::QUERY | frontend::EXECUTE) {
                self.queries += 1;
            }
            if self.tx_started.is_none() {
                self.tx_started = Some(Instant::now());
            }
            if frame.len() < h.len {
                // The rest follows as it arrives (or is dropped).
                self.client_rest = Passthrough::new(h.len - frame.len(), passed);
                break;
            }
        }
        self.cbuf.advance(pos);
        Ok(terminated)
    }

    /// Moves server messages to the client through the pipeline: complete
    /// ones, and the front of a long one the session need not hold whole,
    /// whose rest then follows as it arrives.
    fn relay_server_frames(&mut self) -> Result<(), PgError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let ServerConn {
            rbuf,
            statements,
            tx_status,
            ..
        } = &mut **server;
        if self.server_rest.is_active() && !self.server_rest.pass(rbuf, &mut self.to_client) {
            return Ok(());
        }
        let mut pos = 0;
        let mut reports: Vec<(usize, usize)> = Vec::new();
        while let Some(h) = FrameHeader::peek(&rbuf[pos..])? {
            let buffered = &rbuf[pos..];
            let whole = buffered.len() >= h.len;
            if !whole {
                if h.len <= STREAM_THRESHOLD {
                    break;
                }
                let limit = max_message_size(&self.data);
                match server_front(h, buffered, limit) {
                    Front::Wait => break,
                    Front::TooLarge => return Err(server_too_large(h, limit)),
                    Front::Stream => {}
                }
            }
            let frame = &buffered[..h.len.min(buffered.len())];
            match h.tag {
                backend::READY_FOR_QUERY => *tx_status = TxStatus::from_byte(frame.get(5).copied()),
                backend::PARAMETER_STATUS => reports.push((pos, h.len)),
                _ => {}
            }
            let route = if self.mode == PoolMode::Transaction {
                self.pipeline
                    .on_server_message(h.tag, frame, &mut self.to_client, statements)
            } else {
                self.to_client.extend_from_slice(frame);
                Route::Forward
            };
            if h.tag == backend::ERROR_RESPONSE {
                let fields = ServerErrorFields::parse(&frame[5..]);
                if route == Route::Swallow {
                    tracing::warn!(code = %fields.code, message = %fields.message, "hidden parameter sync failed");
                    self.pipeline.note_hidden_error();
                } else {
                    self.data
                        .metrics
                        .count_error(fields.code.get(..2).unwrap_or("XX"));
                    self.server_said_fatal |= fields.is_fatal();
                }
            }
            if h.tag == backend::READY_FOR_QUERY
                && route == Route::Forward
                && *tx_status == TxStatus::Idle
            {
                // One transaction done: one atomic add per counter, not per message.
                let metrics = &self.data.metrics;
                metrics.transactions.inc();
                metrics.queries.inc_by(std::mem::take(&mut self.queries));
                if let Some(started) = self.tx_started.take() {
                    metrics
                        .transaction_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
            }
            pos += frame.len();
            if !whole {
                // The rest follows as it arrives (or is dropped, if hidden).
                self.server_rest = Passthrough::new(h.len - frame.len(), route == Route::Forward);
                break;
            }
        }
        // ParameterStatus is rare; handled after the loop to keep borrows simple.
        let rbuf_reports: Vec<BytesMut> = reports
            .iter()
            .map(|&(at, len)| BytesMut::from(&rbuf[at + 5..at + len]))
            .collect();
        rbuf.advance(pos);
        for body in rbuf_reports {
            self.track_parameter(&body);
        }
        for (name, stmt) in self.pipeline.refused.drain(..) {
            // Unless the client has since prepared the name anew.
            if self
                .statements
                .get(&name)
                .is_some_and(|s| Arc::ptr_eq(s, &stmt))
            {
                self.statements.remove(&name);
            }
        }
        Ok(())
    }

    fn track_parameter(&mut self, body: &[u8]) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let Ok((name, value)) = server.record_parameter(body) else {
            return;
        };
        if let Some(next) = self.params.with_report(&name, &value) {
            self.params = next;
            self.scope = statement_scope(&self.params);
            server.applied = self.params.clone();
        }
    }

    /// One round of socket I/O: writes what is queued, reads what is ready.
    /// Returns once anything moved.
    async fn pump(&mut self) -> Result<(), Closed> {
        let Session {
            client,
            cbuf,
            to_client,
            to_server,
            server,
            waiting,
            ..
        } = self;
        let server = server.as_mut().map(|s| {
            let s: &mut ServerConn = s;
            s
        });
        let mut server = server.map(|s| (&mut s.stream, &mut s.rbuf));
        poll_fn(|cx| {
            let mut progress = false;
            progress |= write_some(client, to_client, cx).map_err(|_| Closed::Client)?;
            flush_tls(client, cx).map_err(|_| Closed::Client)?;
            if let Some((stream, rbuf)) = server.as_mut() {
                progress |= write_some(&mut **stream, to_server, cx).map_err(Closed::Server)?;
                flush_tls(&mut **stream, cx).map_err(Closed::Server)?;
                if to_client.len() < HIGH_WATER {
                    progress |= read_some(&mut **stream, rbuf, cx).map_err(Closed::Server)?;
                }
            }
            if to_server.len() < HIGH_WATER && !(*waiting && cbuf.len() >= HIGH_WATER) {
                progress |= read_client(client, cbuf, cx).map_err(|_| Closed::Client)?;
            }
            if progress {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    async fn flush_client(&mut self) -> Result<(), ClientError> {
        if !self.to_client.is_empty() {
            self.client.write_all(&self.to_client).await?;
            self.to_client.clear();
        }
        self.client.flush().await?;
        Ok(())
    }

    /// The server connection died: pass on what it said, then tell the client.
    async fn server_lost(&mut self, e: io::Error) -> Result<CloseReason, ClientError> {
        let _ = self.relay_server_frames();
        self.flush_client().await?;
        // Dropping the checkout closes the connection; the pool opens a new one.
        self.server = None;
        tracing::warn!(error = %e, "server connection lost mid-session");
        if self.server_said_fatal {
            // The server explained itself (shutdown, terminated backend): that is the client's error.
            return Ok("server closed the connection");
        }
        Err(PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            "server closed the connection unexpectedly",
        )
        .with_detail(
            "pgswitch lost its connection to the database server while this session was using it.",
        )
        .into())
    }

    /// Between transactions a client holds no buffer memory: ten thousand
    /// idle clients must cost little, and an allocation per transaction is
    /// cheap next to its system calls.
    fn shrink_buffers(&mut self) {
        for buf in [&mut self.cbuf, &mut self.to_client, &mut self.to_server] {
            if buf.is_empty() && buf.capacity() > 0 {
                *buf = BytesMut::new();
            }
        }
    }
}

/// DEALLOCATE ALL forgets the client's statements; DISCARD ALL also brings
/// back its startup parameters. (Fields, not the session: the caller may hold
/// the session's server at the same time.)
fn reset_statements(
    reset: Reset,
    statements: &mut HashMap<Bytes, Arc<Statement>>,
    params: &mut Arc<ParamSet>,
    startup_params: &Arc<ParamSet>,
    scope: &mut Bytes,
) {
    statements.clear();
    if reset == Reset::DiscardAll {
        *params = startup_params.clone();
        *scope = statement_scope(params);
    }
}

/// The scope statements are shared in: clients with another `search_path`
/// may mean other tables by the same text.
fn statement_scope(params: &ParamSet) -> Bytes {
    Bytes::copy_from_slice(params.get("search_path").unwrap_or("").as_bytes())
}
