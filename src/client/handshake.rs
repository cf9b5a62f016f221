//! From accept to the first ReadyForQuery: startup packet, SSL/GSS refusal,
//! cancel forwarding, authentication, and the parameters a real server would
//! report.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::conn::{ClientConn, ClientError};
use super::session::Session;
use crate::app::App;
use crate::cancel::CancelKey;
use crate::config::PoolMode;
use crate::pool::{Checkout, Pool, PoolKey};
use crate::protocol::error::sqlstate;
use crate::protocol::framing::PROTOCOL_3_0;
use crate::protocol::messages;
use crate::protocol::{PgError, StartupPacket};
use crate::session_params::{ParamSet, Reported};
use crate::switch::Backend;

/// Serves one client connection to its end, and logs how it ended.
pub async fn serve(app: Arc<App>, stream: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let id = app.next_client_id();
    let _count = app.count_client();
    let mut conn = ClientConn::new(stream);
    let login_timeout = app.config().proxy.client_login_timeout;
    let failure = match tokio::time::timeout(login_timeout, login(&app, &mut conn, id)).await {
        Ok(Ok(None)) => return, // a cancel request: nothing to log per connection
        Ok(Ok(Some(established))) => {
            let key = established.pool_key.clone();
            tracing::info!(client = id, %peer, user = %key.user, database = %key.database, "client connected");
            let reason = Session::new(app, conn, established).run().await;
            let duration_ms = started.elapsed().as_millis() as u64;
            tracing::info!(client = id, %peer, user = %key.user, database = %key.database, duration_ms, %reason, "client closed");
            return;
        }
        Ok(Err(e)) => e,
        Err(_) => PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "login timed out (client_login_timeout)",
        )
        .into(),
    };
    let reason = match failure {
        ClientError::Io(e) => format!("client connection error: {e}"),
        ClientError::Pg(e) => {
            conn.send_error(&e).await;
            e.to_string()
        }
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(client = id, %peer, duration_ms, %reason, "client closed during login");
}

/// A logged-in client, ready for its session.
pub struct Established {
    pub backend: Arc<Backend>,
    pub pool: Arc<Pool>,
    pub pool_key: PoolKey,
    pub mode: PoolMode,
    pub params: Arc<ParamSet>,
    pub server: Option<Checkout>,
    pub cancel: CancelKey,
}

async fn login(
    app: &Arc<App>,
    conn: &mut ClientConn,
    id: u32,
) -> Result<Option<Established>, ClientError> {
    let (version, params) = loop {
        match conn.read_startup().await? {
            // No TLS or GSS encryption on the client leg yet: 'N' tells the
            // client to go on in plaintext (or give up, if it requires them).
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                conn.stream.write_all(b"N").await?
            }
            StartupPacket::Cancel { pid, secret } => {
                app.cancels.cancel(pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup { version, params } => break (version, params),
        }
    };
    negotiate_version(conn, version, &params).await?;
    let config = app.config();
    if app.client_count() > config.proxy.max_client_conn {
        return Err(PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "no more connections allowed (max_client_conn = {})",
                config.proxy.max_client_conn
            ),
        )
        .into());
    }
    if app.is_shutting_down() {
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

    let secrets = app.secrets();
    // Users missing from [[users]] are looked up on the active backend. An
    // unknown user is looked up too (and cached as unknown), so a found and a
    // missing user take the same path.
    let looked_up = if config.auth_query_enabled() && !secrets.contains(&user) {
        let addr = app.switch.active().addr.clone();
        app.auth_query
            .lookup(&addr, &config, &user)
            .await
            .map_err(|e| {
                tracing::warn!(client = id, error = %e, "auth_query lookup failed");
                e.to_client_error()
            })?
    } else {
        None
    };
    let keys =
        crate::auth::authenticate(conn, config.proxy.auth_method, &user, &secrets, looked_up)
            .await?;
    if let Some(keys) = keys {
        app.remember_client_keys(&user, keys);
    }

    // New sessions wait at the gate during a cutover, like new transactions.
    app.switch.gate.pass().await;
    let backend = app.switch.active();
    let pool_key = PoolKey { database, user };
    let pool = app.pool_for(&backend, &pool_key);
    let mode = config.pool_mode_for(config.user(&pool_key.user));
    let raw_params = Arc::new(raw_params);
    let (params, server, reported) = login_params(&pool, &raw_params, mode).await?;

    let cancel = app.cancels.register(id);
    let mut out = BytesMut::with_capacity(512);
    for (name, value) in &reported {
        messages::parameter_status(&mut out, name, value);
    }
    messages::backend_key_data(&mut out, cancel.pid, cancel.secret);
    messages::ready_for_query(&mut out, b'I');
    conn.stream.write_all(&out).await?;

    if let Some(server) = &server {
        cancel.slot.set(Some(crate::cancel::CancelTarget {
            addr: server.addr.clone(),
            pid: server.backend_pid,
            secret: server.backend_secret,
        }));
    }
    Ok(Some(Established {
        backend,
        pool,
        pool_key,
        mode,
        params,
        server,
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
    conn.stream.write_all(&out).await?;
    Ok(())
}

/// Validates the client's startup parameters on a server (once per distinct
/// set per pool) and returns the normalized set, the server connection to keep
/// (session mode), and the ParameterStatus list to report.
async fn login_params(
    pool: &Arc<Pool>,
    raw: &Arc<ParamSet>,
    mode: PoolMode,
) -> Result<LoginParams, ClientError> {
    if mode == PoolMode::Transaction {
        if let Some((set, reported)) = pool.known_params(raw) {
            return Ok((set, None, reported));
        }
    }
    let mut server = pool.acquire().await.map_err(|e| e.to_client_error())?;
    let mut normalized = (**raw).clone();
    if let Some(sql) = raw.transition_sql(&server.applied) {
        let reports = server
            .run_hidden(&sql)
            .await
            .map_err(|e| e.to_client_error())?;
        normalized = normalized.normalized_by(&reports);
    }
    let set = Arc::new(normalized);
    server.applied = set.clone();
    pool.remember_params(raw, &set);
    let reported = server.reported.clone();
    if mode == PoolMode::Transaction {
        server.release();
        Ok((set, None, reported))
    } else {
        Ok((set, Some(server), reported))
    }
}

type LoginParams = (Arc<ParamSet>, Option<Checkout>, Reported);
