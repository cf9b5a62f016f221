//! From accept to the first ReadyForQuery: TLS (after SSLRequest, or direct as
//! PostgreSQL 17 clients may do), GSS refusal, startup packet, cancel
//! forwarding, authentication, and the parameters a real server would report.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, BytesMut};
use tokio::net::TcpStream;

use super::session::{Established, Origin, Session};
use crate::client_conn::{ClientConn, ClientError};
use crate::config::ClientTlsMode;
use crate::data_plane::DataPlane;
use crate::pool::{Pool, PoolKey};
use crate::protocol::error::sqlstate;
use crate::protocol::framing::{peek_encryption_request, EncryptionRequest, PROTOCOL_3_0};
use crate::protocol::messages;
use crate::protocol::{PgError, StartupPacket};
use crate::session_params::{ParamSet, Reported};
use crate::tls::{ClientTls, MaybeTls, ALPN_POSTGRESQL, TLS_HANDSHAKE_RECORD};

/// Serves one client connection to its end, and logs how it ended.
///
/// An idle client must cost little: the login is boxed and freed once it is
/// over, the session is boxed, and this future (the task's own, for the
/// connection's life) keeps only a few words besides.
pub fn serve(
    data: Arc<DataPlane>,
    stream: TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let count = data.count_client();
    let origin = Origin {
        id: data.next_client_id(),
        peer,
        started: Instant::now(),
    };
    // Not an `async fn`: its arguments would stay in the task for its life.
    let login = Box::pin(log_in(data, stream, origin));
    async move {
        let _count = count;
        if let Some(session) = login.await {
            session.run().await;
        }
    }
}

/// From accept to a logged-in client, within `client_login_timeout`; None
/// when there is no session to run (a cancel request, or a refusal, which
/// this sends and logs).
async fn log_in(data: Arc<DataPlane>, stream: TcpStream, origin: Origin) -> Option<Box<Session>> {
    let Origin { id, peer, started } = origin;
    let login_timeout = data.config().proxy.client_login_timeout;
    let deadline = tokio::time::Instant::now() + login_timeout;
    let timed_out = || {
        PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "login timed out (client_login_timeout)",
        )
    };
    let tls = data.client_tls();
    let (mut conn, failure) =
        // The login futures are boxed: they are large and short-lived.
        match tokio::time::timeout_at(deadline, Box::pin(open(&tls, ClientConn::new(stream)))).await {
            Ok(Ok(conn)) => (Some(conn), None),
            Ok(Err((conn, e))) => (conn, Some(e)),
            // Still plaintext or mid-handshake: nobody to tell.
            Err(_) => (None, Some(ClientError::from(timed_out()))),
        };
    let failure = match (conn.as_mut(), failure) {
        (Some(conn), None) => {
            match tokio::time::timeout_at(deadline, Box::pin(login(&data, &tls, conn, id, peer)))
                .await
            {
                Ok(Ok(None)) => return None, // a cancel request: nothing to log per connection
                Ok(Ok(Some(established))) => Ok(established),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(timed_out().into()),
            }
        }
        (_, Some(e)) => Err(e),
        (None, None) => unreachable!("open returns a connection or an error"),
    };
    let (failure, mut conn) = match (failure, conn) {
        (Ok(established), Some(conn)) => {
            let key = &established.pool.key;
            data.metrics.count_connection("accepted", "");
            tracing::info!(client = id, %peer, user = %key.user, database = %key.database, "client connected");
            return Some(Box::new(Session::new(data, conn, established, origin)));
        }
        (Ok(_), None) => unreachable!("logged in without a connection"),
        (Err(e), conn) => (e, conn),
    };
    let (reply, reason) = failure.into_reply(&data.metrics);
    data.metrics
        .count_connection("refused", refusal_reason(reply.as_ref()));
    if let (Some(e), Some(conn)) = (reply, conn.as_mut()) {
        conn.refuse(&e).await;
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(client = id, %peer, duration_ms, %reason, "client closed during login");
    None
}

/// The `reason` label of a refused connection, from the error it was sent.
fn refusal_reason(reply: Option<&PgError>) -> &'static str {
    let Some(e) = reply else {
        // Nothing to tell: the client left, or spoke no protocol.
        return "disconnected";
    };
    match e.code.as_str() {
        "28P01" | "28000" => "authentication",
        "53300" => "too_many_connections",
        "57P01" | "57P03" => "shutting_down",
        "3D000" => "unknown_database",
        code if code.starts_with("08") => "protocol",
        _ => "other",
    }
}

/// A failure while opening, with the connection if it is still usable for an
/// error message.
type OpenFailure = (Option<ClientConn>, ClientError);

/// Before the startup packet: a direct TLS handshake (PostgreSQL 17's
/// `sslnegotiation=direct`: the first byte is a TLS record, not a length), or
/// SSLRequest and GSSENCRequest, in any order, each answered once. Returns the
/// connection (TLS or not) with the next packet, unread, in its buffer.
async fn open(tls: &ClientTls, mut conn: ClientConn) -> Result<ClientConn, OpenFailure> {
    let MaybeTls::Plain(tcp) = &conn.stream else {
        unreachable!("connections open in plaintext")
    };
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return Err((None, io_error("closed before the startup packet"))),
        Ok(_) => {}
        Err(e) => return Err((None, e.into())),
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        let Some(acceptor) = &tls.acceptor else {
            // The client expects a TLS answer; plaintext would be noise to it.
            return Err((
                None,
                io_error("direct TLS handshake, but TLS is not configured"),
            ));
        };
        let mut conn = start_tls(acceptor, conn).await.map_err(|e| (None, e))?;
        let alpn = match &conn.stream {
            MaybeTls::Tls(s) => s.get_ref().1.alpn_protocol(),
            MaybeTls::Plain(_) => None,
        };
        if alpn != Some(ALPN_POSTGRESQL) {
            // As PostgreSQL 17: direct TLS must say which protocol it carries.
            conn.refuse(&PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "direct SSL connection was established without ALPN protocol negotiation extension",
            ))
            .await;
            return Err((None, io_error("direct TLS without ALPN \"postgresql\"")));
        }
        return Ok(conn);
    }
    let mut gss_answered = false;
    loop {
        match peek_encryption_request(&conn.buf) {
            EncryptionRequest::Incomplete => {
                if let Err(e) = conn.fill_to(conn.buf.len() + 1).await {
                    return Err((Some(conn), e));
                }
            }
            EncryptionRequest::Ssl => {
                conn.buf.advance(8);
                let Some(acceptor) = &tls.acceptor else {
                    // No TLS configured: 'N' tells the client to go on in
                    // plaintext (or give up, if it requires TLS).
                    if let Err(e) = conn.send(messages::ENCRYPTION_REFUSED).await {
                        return Err((Some(conn), e));
                    }
                    return Ok(conn);
                };
                if !conn.buf.is_empty() {
                    // Bytes sent before our answer would be taken as if they
                    // came over TLS (CVE-2021-23214): refuse, as PostgreSQL does.
                    let e = PgError::protocol("received unencrypted data after SSL request");
                    return Err((Some(conn), e.into()));
                }
                if let Err(e) = conn.send(messages::ENCRYPTION_ACCEPTED).await {
                    return Err((Some(conn), e));
                }
                return start_tls(acceptor, conn).await.map_err(|e| (None, e));
            }
            EncryptionRequest::GssEnc if !gss_answered => {
                conn.buf.advance(8);
                gss_answered = true;
                if let Err(e) = conn.send(messages::ENCRYPTION_REFUSED).await {
                    return Err((Some(conn), e));
                }
            }
            // The startup packet (or garbage, or a second GSSENCRequest) is
            // read, and judged, by `login`.
            EncryptionRequest::GssEnc | EncryptionRequest::None => return Ok(conn),
        }
    }
}

fn io_error(message: &str) -> ClientError {
    ClientError::Io(std::io::Error::other(message.to_owned()))
}

/// The TLS handshake on a plaintext connection; nothing read yet is buffered.
async fn start_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    conn: ClientConn,
) -> Result<ClientConn, ClientError> {
    let MaybeTls::Plain(tcp) = conn.stream else {
        return Err(io_error("TLS requested twice"));
    };
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| io_error(&format!("TLS handshake failed: {e}")))?;
    Ok(ClientConn {
        stream: MaybeTls::Tls(Box::new(tls)),
        buf: conn.buf,
    })
}

async fn login(
    data: &Arc<DataPlane>,
    tls: &ClientTls,
    conn: &mut ClientConn,
    id: u32,
    peer: SocketAddr,
) -> Result<Option<Established>, ClientError> {
    let (version, params) = match conn.read_startup().await? {
        // Only before the startup packet, once each (see `open`).
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
            return Err(PgError::protocol(
                "unexpected SSLRequest or GSSENCRequest after encryption negotiation",
            )
            .into())
        }
        StartupPacket::Cancel { pid, secret } => {
            data.cancels.cancel(pid, secret).await;
            return Ok(None);
        }
        StartupPacket::Startup { version, params } => (version, params),
    };
    if tls.mode == ClientTlsMode::Require && !conn.stream.is_tls() {
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!(
                "connection without SSL refused: client_tls = \"require\" (host \"{}\", user \"{}\", database \"{}\", SSL off)",
                peer.ip(),
                param("user"),
                param("database"),
            ),
        )
        .with_hint("Connect with sslmode=require (or stronger).")
        .into());
    }
    negotiate_version(conn, version, &params).await?;
    let config = data.config();
    if data.client_count() > config.proxy.max_client_conn {
        return Err(PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "no more connections allowed (max_client_conn = {})",
                config.proxy.max_client_conn
            ),
        )
        .into());
    }
    if data.is_shutting_down() {
        return Err(
            PgError::fatal(sqlstate::CANNOT_CONNECT_NOW, "the proxy is shutting down").into(),
        );
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let user = param("user").filter(|u| !u.is_empty()).ok_or_else(|| {
        PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
    })?;
    let database = param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let raw_params = ParamSet::from_startup(&params)?;

    let secrets = data.secrets();
    // Users missing from [[users]] are looked up on the active backend. An
    // unknown user is looked up too (and cached as unknown), so a found and a
    // missing user take the same path.
    let looked_up = if config.auth_query_enabled() && !secrets.contains(&user) {
        let addr = data.switch.active().addr.clone();
        data.auth_query
            .lookup(&addr, &config, &user)
            .await
            .map_err(|e| {
                tracing::warn!(client = id, error = %e, "auth_query lookup failed");
                ClientError::from(e)
            })?
    } else {
        None
    };
    let keys =
        crate::auth::authenticate(conn, config.proxy.auth_method, &user, &secrets, looked_up)
            .await?;
    if let Some(keys) = keys {
        data.remember_client_keys(&user, keys);
    }

    // New sessions wait at the gate during a cutover, like new transactions.
    let in_flight = data.switch.enter().await;
    let backend = data.switch.active();
    let pool_key = PoolKey { database, user };
    let pool = data.pool_for(&backend, &pool_key);
    let mode = config.pool_mode_for(config.user(&pool_key.user));
    let raw_params = Arc::new(raw_params);
    let (params, reported) = login_params(&pool, &raw_params).await?;
    drop(in_flight);

    let cancel = data.cancels.register(id);
    let mut out = BytesMut::with_capacity(512);
    for (name, value) in &reported {
        messages::parameter_status(&mut out, name, value);
    }
    messages::backend_key_data(&mut out, cancel.pid, cancel.secret);
    messages::ready_for_query(&mut out, b'I');
    conn.send(&out).await?;

    Ok(Some(Established {
        backend,
        pool,
        mode,
        params,
        cancel,
    }))
}

/// Protocol 3.x with a minor version we don't speak, or `_pq_` options, get a
/// NegotiateProtocolVersion, as PostgreSQL answers; anything else is refused.
async fn negotiate_version(
    conn: &mut ClientConn,
    version: i32,
    params: &[(String, String)],
) -> Result<(), ClientError> {
    let (major, minor) = (version >> 16, version & 0xffff);
    if major != 3 {
        return Err(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"),
        )
        .into());
    }
    let extensions: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    if version == PROTOCOL_3_0 && extensions.is_empty() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    messages::write_message(&mut out, b'v', |b| {
        b.put_i32(PROTOCOL_3_0);
        b.put_i32(extensions.len() as i32);
        for ext in &extensions {
            b.put_slice(ext.as_bytes());
            b.put_u8(0);
        }
    });
    conn.send(&out).await?;
    Ok(())
}

/// Validates the client's startup parameters on a server (once per distinct
/// set per pool) and returns the normalized set and the ParameterStatus list
/// to report. No server is kept: in session mode too the session takes its
/// server at the client's first message, so a login never waits for one.
async fn login_params(pool: &Arc<Pool>, raw: &Arc<ParamSet>) -> Result<LoginParams, ClientError> {
    if let Some(known) = pool.known_params(raw) {
        return Ok(known);
    }
    let mut checker = pool.param_checker().await?;
    let server = checker.conn();
    let mut normalized = (**raw).clone();
    if let Some(sql) = raw.transition_sql(&server.applied) {
        let reports = server.run_hidden(&sql).await?;
        normalized = normalized.normalized_by(&reports);
    }
    let set = Arc::new(normalized);
    server.applied = set.clone();
    pool.remember_params(raw, &set);
    let reported = server.reported.clone();
    checker.finish();
    Ok((set, reported))
}

type LoginParams = (Arc<ParamSet>, Reported);
