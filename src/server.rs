//! One connection from pgswitch to a PostgreSQL server: connect, log in as the
//! client's user, remember what the server reported, and know whether it is
//! still usable.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::protocol::error::{sqlstate, ServerErrorFields, SqlState, UserFacingError};
use crate::protocol::framing::read_cstr;
use crate::protocol::messages::{self, backend};
use crate::protocol::TxStatus;
use crate::protocol::{FrameHeader, PgError};
use crate::reachability::{CheckedBy, Reachability};
use crate::scram::client::{ScramClient, ScramClientError, ScramKeys};
use crate::session_params::ParamSet;
use crate::statements::ServerStatements;
use crate::tls::{ServerStream, ServerTls, TlsError};

/// Where a backend listens, and how pgswitch secures its connections to it.
#[derive(Debug, Clone)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
    pub tls: ServerTls,
    /// What every connection opened here says about reaching the server.
    pub reachability: Arc<Reachability>,
    /// This process's open connections to the server, by local address.
    pub own: Arc<OwnConnections>,
}

/// The local addresses of pgswitch's connections to one server: what the
/// server shows as `client_addr:client_port` in `pg_stat_activity`, so
/// that `check` can tell pgswitch's own sessions from others' (they carry
/// the client's application_name). Touched at connect and close only.
#[derive(Debug, Default)]
pub struct OwnConnections(std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>);

impl OwnConnections {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<std::net::SocketAddr>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// As `pg_stat_activity` writes them: `host(client_addr):client_port`.
    pub fn list(&self) -> Vec<String> {
        self.set()
            .iter()
            .map(|a| format!("{}:{}", a.ip(), a.port()))
            .collect()
    }
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Who pgswitch logs in as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub database: String,
    pub credentials: Credentials,
}

/// How pgswitch proves itself to a server.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// Only servers that ask for nothing (trust) accept the login.
    #[default]
    None,
    /// Answers SCRAM, md5 and cleartext password requests.
    Password(String),
    /// SCRAM pass-through: a client's ClientKey and the secret it matched.
    /// Works with servers that store the same secret and ask for SCRAM.
    ScramKeys(ScramKeys),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Password(_) => f.write_str("Password(<redacted>)"),
            Credentials::ScramKeys(keys) => f.debug_tuple("ScramKeys").field(keys).finish(),
        }
    }
}

/// The SCRAM client of one login, by kind of credentials.
enum ScramLogin {
    Password(ScramSha256),
    Keys(ScramClient),
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("timed out connecting to {addr}")]
    ConnectTimeout { addr: String },
    #[error("server {addr} refused the login: {} {}", fields.code, fields.message)]
    Refused {
        addr: String,
        fields: ServerErrorFields,
    },
    #[error("server {addr} asked for a password, but none is configured for user {user:?}")]
    NoPassword { addr: String, user: String },
    #[error(
        "server {addr} asked user {user:?} for {method}, but pgswitch only holds the client's \
         SCRAM keys for this user (SCRAM pass-through needs a server asking for scram-sha-256); \
         configure server_password"
    )]
    PassThroughNeedsScram {
        addr: String,
        user: String,
        method: &'static str,
    },
    #[error("SCRAM pass-through login of {user:?} to {addr}: {source}")]
    PassThrough {
        addr: String,
        user: String,
        source: ScramClientError,
    },
    #[error("server {addr} asked for unsupported authentication (code {code})")]
    UnsupportedAuth { addr: String, code: i32 },
    #[error("server {addr} broke the protocol: {message}")]
    Protocol { addr: String, message: String },
    #[error("server {addr}: {source}")]
    Tls { addr: String, source: TlsError },
    #[error("server connection lost: {0}")]
    Io(#[from] io::Error),
}

impl ServerError {
    /// Whether the server answered: a refused login (wrong password, unknown
    /// database, too many connections) or an authentication pgswitch can't
    /// do says the server is there; no connection, a timeout, a failed TLS
    /// handshake, a broken protocol, or a server starting up or shutting down
    /// (57P01, 57P02, 57P03) say it can't be used.
    pub fn server_answered(&self) -> bool {
        match self {
            ServerError::Refused { fields, .. } => !fields.code.starts_with("57P"),
            ServerError::NoPassword { .. }
            | ServerError::PassThroughNeedsScram { .. }
            | ServerError::PassThrough { .. }
            | ServerError::UnsupportedAuth { .. } => true,
            ServerError::Connect { .. }
            | ServerError::ConnectTimeout { .. }
            | ServerError::Protocol { .. }
            | ServerError::Tls { .. }
            | ServerError::Io(_) => false,
        }
    }
}

impl UserFacingError for ServerError {
    /// The error a client sees when its server connection could not be had.
    fn to_pg_error(&self) -> PgError {
        match self {
            // The server's own verdict (wrong password, unknown database, too many
            // connections...) is what the client would have got connecting directly.
            ServerError::Refused { fields, .. } => {
                PgError::fatal(SqlState::parse(&fields.code), fields.message.clone())
            }
            // The server would refuse the proof: report it like its refusal would be.
            ServerError::PassThrough { .. } => {
                PgError::fatal(sqlstate::INVALID_PASSWORD, format!("pgswitch: {self}"))
            }
            other => PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("pgswitch: {other}")),
        }
    }
}

/// A server connection's read buffer when it opens.
const READ_BUFFER: usize = 8 * 1024;
/// An idle connection's read buffer larger than this is replaced by a new one.
const IDLE_READ_BUFFER: usize = 64 * 1024;

pub struct ServerConn {
    pub stream: ServerStream,
    pub rbuf: BytesMut,
    pub addr: Arc<BackendAddr>,
    /// The server's own BackendKeyData, for forwarding cancels.
    pub backend_pid: u32,
    pub backend_secret: u32,
    /// Every ParameterStatus this connection has reported, canonical names.
    pub reported: Vec<(String, String)>,
    /// The session parameters last applied to this connection.
    pub applied: Arc<ParamSet>,
    pub statements: ServerStatements,
    pub created: Instant,
    pub idle_since: Instant,
    /// From the last ReadyForQuery; `Busy` while requests are out.
    pub tx_status: TxStatus,
    /// This end's address, registered in `addr.own` while the connection lives.
    local: Option<std::net::SocketAddr>,
}

impl ServerConn {
    /// Connects and logs in; the outcome is recorded in the backend's
    /// [`Reachability`].
    pub async fn connect(
        addr: Arc<BackendAddr>,
        login: &Login,
        connect_timeout: Duration,
        statement_capacity: usize,
    ) -> Result<ServerConn, ServerError> {
        let reachability = addr.reachability.clone();
        let result = Self::open(addr, login, connect_timeout, statement_capacity).await;
        match &result {
            Ok(_) => reachability.record_ok(CheckedBy::Connection),
            Err(e) => reachability.record_error(CheckedBy::Connection, e.server_answered(), e),
        }
        result
    }

    /// The housekeeping probe of a backend: connect, log in and close (the
    /// drop says goodbye), recorded in its [`Reachability`] as the probe's.
    pub async fn probe(
        addr: Arc<BackendAddr>,
        login: &Login,
        timeout: Duration,
    ) -> Result<(), ServerError> {
        let reachability = addr.reachability.clone();
        match Self::open(addr, login, timeout, 1).await {
            Ok(_) => {
                reachability.record_ok(CheckedBy::Probe);
                Ok(())
            }
            Err(e) => {
                reachability.record_error(CheckedBy::Probe, e.server_answered(), &e);
                Err(e)
            }
        }
    }

    /// The first step of a login probe, for a backend without credentials
    /// to log in with: the startup packet as `user`, and the server's first
    /// answer. An authentication request (or, from a server that trusts
    /// pgswitch, its AuthenticationOk) means the server is there and takes
    /// logins; an error is the server's refusal (57P03 while it starts up).
    /// The connection is then closed without answering: PostgreSQL ends such
    /// a backend silently (nothing in its log, nothing in pg_stat_activity).
    pub async fn probe_startup(
        addr: Arc<BackendAddr>,
        user: &str,
        database: &str,
        timeout: Duration,
    ) -> Result<(), ServerError> {
        let attempt = async {
            let (mut stream, _) = Self::open_stream(&addr, timeout).await?;
            let mut out = BytesMut::new();
            messages::startup(&mut out, &[("user", user), ("database", database)]);
            stream.write_all(&out).await?;
            stream.flush().await?;
            let mut rbuf = BytesMut::with_capacity(1024);
            loop {
                match FrameHeader::complete(&rbuf) {
                    Ok(Some(h)) => {
                        let body = &rbuf[5..h.len];
                        return match h.tag {
                            backend::AUTHENTICATION => {
                                if messages::split_authentication(body)
                                    .is_some_and(|(code, _)| code == messages::AUTH_OK)
                                {
                                    // Logged in already: say goodbye.
                                    let _ = stream.write_all(messages::TERMINATE).await;
                                    let _ = stream.flush().await;
                                }
                                Ok(())
                            }
                            backend::ERROR_RESPONSE => Err(ServerError::Refused {
                                addr: addr.to_string(),
                                fields: ServerErrorFields::parse(body),
                            }),
                            other => Err(ServerError::Protocol {
                                addr: addr.to_string(),
                                message: format!(
                                    "unexpected message '{}' before authentication",
                                    other.escape_ascii()
                                ),
                            }),
                        };
                    }
                    Ok(None) if rbuf.len() < 64 * 1024 => {}
                    Ok(None) | Err(_) => {
                        return Err(ServerError::Protocol {
                            addr: addr.to_string(),
                            message: "no valid answer to the startup packet".into(),
                        })
                    }
                }
                if stream.read_buf(&mut rbuf).await? == 0 {
                    return Err(ServerError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
            }
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ServerError::ConnectTimeout {
                addr: addr.to_string(),
            }),
        };
        match &result {
            Ok(()) => addr.reachability.record_ok(CheckedBy::Probe),
            Err(e) => addr
                .reachability
                .record_error(CheckedBy::Probe, e.server_answered(), e),
        }
        result
    }

    /// TCP connect and TLS negotiation, each within `connect_timeout`.
    async fn open_stream(
        addr: &BackendAddr,
        connect_timeout: Duration,
    ) -> Result<(ServerStream, Option<std::net::SocketAddr>), ServerError> {
        let target = (addr.host.as_str(), addr.port);
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
            Err(_) => {
                return Err(ServerError::ConnectTimeout {
                    addr: addr.to_string(),
                })
            }
            Ok(Err(source)) => {
                return Err(ServerError::Connect {
                    addr: addr.to_string(),
                    source,
                })
            }
            Ok(Ok(s)) => s,
        };
        stream.set_nodelay(true)?;
        let local = stream.local_addr().ok();
        match tokio::time::timeout(connect_timeout, addr.tls.negotiate(stream)).await {
            Err(_) => Err(ServerError::ConnectTimeout {
                addr: addr.to_string(),
            }),
            Ok(Err(source)) => Err(ServerError::Tls {
                addr: addr.to_string(),
                source,
            }),
            Ok(Ok(s)) => Ok((s, local)),
        }
    }

    async fn open(
        addr: Arc<BackendAddr>,
        login: &Login,
        connect_timeout: Duration,
        statement_capacity: usize,
    ) -> Result<ServerConn, ServerError> {
        let (stream, local) = Self::open_stream(&addr, connect_timeout).await?;
        if let Some(local) = local {
            addr.own.set().insert(local);
        }
        let now = Instant::now();
        let mut conn = ServerConn {
            stream,
            rbuf: BytesMut::with_capacity(READ_BUFFER),
            addr,
            backend_pid: 0,
            backend_secret: 0,
            reported: Vec::new(),
            applied: Arc::new(ParamSet::default()),
            statements: ServerStatements::new(statement_capacity),
            created: now,
            idle_since: now,
            tx_status: TxStatus::Idle,
            local,
        };
        match tokio::time::timeout(connect_timeout, conn.login(login)).await {
            Ok(result) => result.map(|()| conn),
            Err(_) => Err(ServerError::ConnectTimeout {
                addr: conn.addr.to_string(),
            }),
        }
    }

    async fn login(&mut self, login: &Login) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        messages::startup(
            &mut out,
            &[("user", &login.user), ("database", &login.database)],
        );
        self.stream.write_all(&out).await?;
        let mut scram: Option<ScramLogin> = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                backend::AUTHENTICATION => self.authenticate(login, &body, &mut scram).await?,
                backend::PARAMETER_STATUS => {
                    self.record_parameter(&body)?;
                }
                backend::BACKEND_KEY_DATA if body.len() == 8 => {
                    let mut b = &body[..];
                    self.backend_pid = b.get_u32();
                    self.backend_secret = b.get_u32();
                }
                backend::READY_FOR_QUERY => return Ok(()),
                backend::ERROR_RESPONSE => {
                    return Err(ServerError::Refused {
                        addr: self.addr.to_string(),
                        fields: ServerErrorFields::parse(&body),
                    })
                }
                backend::NOTICE_RESPONSE => {}
                other => {
                    return Err(self.protocol_error(format!(
                        "unexpected message '{}' during login",
                        other as char
                    )))
                }
            }
        }
    }

    async fn authenticate(
        &mut self,
        login: &Login,
        body: &[u8],
        scram: &mut Option<ScramLogin>,
    ) -> Result<(), ServerError> {
        let Some((code, data)) = messages::split_authentication(body) else {
            return Err(self.protocol_error("short authentication message".into()));
        };
        let password = |method: &'static str| match &login.credentials {
            Credentials::Password(password) => Ok(password.as_str()),
            Credentials::None => Err(ServerError::NoPassword {
                addr: self.addr.to_string(),
                user: login.user.clone(),
            }),
            Credentials::ScramKeys(_) => Err(ServerError::PassThroughNeedsScram {
                addr: self.addr.to_string(),
                user: login.user.clone(),
                method,
            }),
        };
        let pass_through_error = |source| ServerError::PassThrough {
            addr: self.addr.to_string(),
            user: login.user.clone(),
            source,
        };
        let mut out = BytesMut::new();
        match code {
            messages::AUTH_OK => return Ok(()),
            messages::AUTH_CLEARTEXT => {
                let mut pw = password("a cleartext password")?.as_bytes().to_vec();
                pw.push(0);
                messages::password(&mut out, &pw);
            }
            messages::AUTH_MD5 => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| self.protocol_error("bad md5 salt".into()))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    login.user.as_bytes(),
                    password("md5")?.as_bytes(),
                    salt,
                );
                let mut pw = hash.into_bytes();
                pw.push(0);
                messages::password(&mut out, &pw);
            }
            messages::AUTH_SASL => {
                let offers_scram = data
                    .split(|b| *b == 0)
                    .any(|m| m == SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(ServerError::UnsupportedAuth {
                        addr: self.addr.to_string(),
                        code,
                    });
                }
                let client = match &login.credentials {
                    Credentials::ScramKeys(keys) => {
                        let mut client = ScramClient::new(keys.clone());
                        let first = client.client_first();
                        messages::sasl_initial_response(&mut out, SCRAM_SHA_256, &first);
                        ScramLogin::Keys(client)
                    }
                    _ => {
                        let client = ScramSha256::new(
                            password("scram-sha-256")?.as_bytes(),
                            ChannelBinding::unsupported(),
                        );
                        messages::sasl_initial_response(&mut out, SCRAM_SHA_256, client.message());
                        ScramLogin::Password(client)
                    }
                };
                *scram = Some(client);
            }
            messages::AUTH_SASL_CONTINUE => {
                let client = scram.as_mut().ok_or_else(|| {
                    self.protocol_error("SASL continue without SASL start".into())
                })?;
                match client {
                    ScramLogin::Password(client) => {
                        client
                            .update(data)
                            .map_err(|e| self.protocol_error(format!("SCRAM: {e}")))?;
                        messages::password(&mut out, client.message());
                    }
                    ScramLogin::Keys(client) => {
                        let response = client.server_first(data).map_err(pass_through_error)?;
                        messages::password(&mut out, &response);
                    }
                }
            }
            messages::AUTH_SASL_FINAL => {
                let client = scram
                    .take()
                    .ok_or_else(|| self.protocol_error("SASL final without SASL start".into()))?;
                // Verifies the server's signature: a server that can't prove it knows
                // the password is not the server we meant to reach.
                match client {
                    ScramLogin::Password(mut client) => client
                        .finish(data)
                        .map_err(|e| self.protocol_error(format!("SCRAM server signature: {e}")))?,
                    ScramLogin::Keys(mut client) => {
                        client.server_final(data).map_err(pass_through_error)?
                    }
                }
                return Ok(());
            }
            code => {
                return Err(ServerError::UnsupportedAuth {
                    addr: self.addr.to_string(),
                    code,
                })
            }
        }
        self.stream.write_all(&out).await?;
        Ok(())
    }

    fn protocol_error(&self, message: String) -> ServerError {
        ServerError::Protocol {
            addr: self.addr.to_string(),
            message,
        }
    }

    /// Records a ParameterStatus body; returns the (name, value) pair.
    pub fn record_parameter(&mut self, body: &[u8]) -> Result<(String, String), ServerError> {
        let mut b = body;
        let (name, value) = match (read_cstr(&mut b), read_cstr(&mut b)) {
            (Ok(n), Ok(v)) => (n.to_owned(), v.to_owned()),
            _ => return Err(self.protocol_error("malformed ParameterStatus".into())),
        };
        match self.reported.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value.clone(),
            None => self.reported.push((name.clone(), value.clone())),
        }
        Ok((name, value))
    }

    /// Reads one whole message (outside the hot path: login, hidden queries).
    pub async fn read_message(&mut self) -> Result<(u8, BytesMut), ServerError> {
        loop {
            match FrameHeader::complete(&self.rbuf) {
                Ok(Some(h)) => {
                    let mut msg = self.rbuf.split_to(h.len);
                    msg.advance(5);
                    return Ok((h.tag, msg));
                }
                Ok(None) => {}
                Err(e) => return Err(self.protocol_error(e.message)),
            }
            // TLS may hold back the end of what was written; send it before waiting.
            self.stream.flush().await?;
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ServerError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs a query whose results nobody sees, outside any client's pipeline.
    /// Returns the ParameterStatus reports it caused, or the server's error.
    pub async fn run_hidden(
        &mut self,
        sql: &str,
    ) -> Result<Vec<(String, String)>, HiddenQueryError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.exchange(&out, |_| {}).await
    }

    /// Sends `out` (ending in a Sync or a simple query) and reads up to
    /// ReadyForQuery, handing each DataRow body to `on_row`. Returns the
    /// ParameterStatus reports, or the server's (first) error.
    pub async fn exchange(
        &mut self,
        out: &[u8],
        mut on_row: impl FnMut(&[u8]),
    ) -> Result<Vec<(String, String)>, HiddenQueryError> {
        self.stream.write_all(out).await?;
        let mut reports = Vec::new();
        let mut failure = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                backend::DATA_ROW => on_row(&body),
                backend::PARAMETER_STATUS => reports.push(self.record_parameter(&body)?),
                backend::ERROR_RESPONSE => {
                    failure.get_or_insert_with(|| ServerErrorFields::parse(&body));
                }
                backend::READY_FOR_QUERY => {
                    self.tx_status = TxStatus::from_byte(body.first().copied());
                    return match failure {
                        Some(fields) => Err(HiddenQueryError::Failed(fields)),
                        None => Ok(reports),
                    };
                }
                _ => {}
            }
        }
    }

    /// Whether an idle connection is still open and quiet. A server that closed
    /// it (restart, pg_terminate_backend, idle timeout) has sent EOF or a FATAL
    /// error, both of which show up as readable bytes.
    pub fn is_usable(&mut self) -> bool {
        if !self.rbuf.is_empty() || self.tx_status != TxStatus::Idle {
            return false;
        }
        let mut probe = [0u8; 64];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// An idle connection keeps no more buffer than a new one: a long
    /// message held whole (a RowDescription of many columns) may have grown
    /// its read buffer.
    pub fn shrink_buffer(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > IDLE_READ_BUFFER {
            self.rbuf = BytesMut::with_capacity(READ_BUFFER);
        }
    }

    /// Says goodbye to the server without waiting (on TLS with a close_notify,
    /// best effort); the socket closes on drop.
    pub fn terminate(&mut self) {
        self.stream.close_now(messages::TERMINATE);
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        // Spares the server log an "unexpected EOF" line for every pooled connection closed.
        self.terminate();
        if let Some(local) = self.local {
            self.addr.own.set().remove(&local);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HiddenQueryError {
    #[error("{} {}", .0.code, .0.message)]
    Failed(ServerErrorFields),
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl From<io::Error> for HiddenQueryError {
    fn from(e: io::Error) -> Self {
        HiddenQueryError::Server(ServerError::Io(e))
    }
}

impl UserFacingError for HiddenQueryError {
    fn to_pg_error(&self) -> PgError {
        match self {
            HiddenQueryError::Failed(fields) => {
                PgError::fatal(SqlState::parse(&fields.code), fields.message.clone())
            }
            HiddenQueryError::Server(e) => e.to_pg_error(),
        }
    }
}
