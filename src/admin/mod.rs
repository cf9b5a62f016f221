//! The admin HTTP API (control plane): health (liveness), ready (the active
//! backend is reachable), status, Prometheus metrics, cutover and fallback,
//! the checks (`GET /check`), the initial copy of `prepare` (`GET /prepare`),
//! the lag of the last minutes (`GET /lag`), the operator's hold of the gate
//! (pause/resume), and the dashboard page (`GET /`, see [`dashboard`]).
//! Every endpoint but `GET /health`, `GET /ready` and the page's static
//! files requires `Authorization: Bearer <token>` when a token is
//! configured; a non-loopback listen address without a token is refused at
//! config load. Data answers carry `Cache-Control: no-store`.

pub mod client;
mod dashboard;
mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::cutover::{Controller, Direction, Options};
use crate::data_plane::DataPlane;
use crate::replication::LagWatch;
use crate::switch::Holder;
use http_body_util::BodyExt;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} for the admin API: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Listen { addr, source })
}

/// What the admin API acts on and reports.
pub struct AdminState {
    pub data: Arc<DataPlane>,
    pub cutover: Arc<Controller>,
    pub lag: Arc<LagWatch>,
    /// The configuration file `POST /reload` reads again (as SIGHUP does).
    pub config_path: std::path::PathBuf,
}

/// Refused connections (over `max_connections`) answered with a 503 at a
/// time; past these, one more is closed without an answer.
const MAX_REFUSING: usize = 16;

/// How long answering one refused connection may take (the 503, then reading
/// what the client sent so that the close is not a reset).
const REFUSE_TIME: Duration = Duration::from_millis(200);

/// Serves the admin API until the process ends: at most `max_connections`
/// connections at once, each with `request_read_timeout` to send a request's
/// headers (and, for the endpoints that read one, its body).
pub async fn serve(app: Arc<AdminState>, listener: TcpListener) {
    let max_connections = app.data.config().admin.max_connections;
    let slots = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Ok(permit) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, max_connections).await;
                    drop(permit);
                });
            }
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let read_timeout = app.data.config().admin.request_read_timeout;
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(route(&app, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
            drop(slot);
        });
    }
}

/// Answers a connection over `max_connections` with a 503 and closes it:
/// the write side first, then what the client sent is read (briefly), so
/// that the close is not a reset that could overtake the answer.
async fn refuse(mut stream: TcpStream, max_connections: usize) {
    let body = json!({
        "error": format!("too many admin connections (max_connections = {max_connections})")
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSE_TIME, answer).await;
}

async fn route(app: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    // Liveness: the process is up and serves HTTP (says nothing of the backends).
    if req.method() == Method::GET && path == "/health" {
        return text(StatusCode::OK, "ok\n");
    }
    if req.method() == Method::GET && path == "/ready" {
        return ready(&app.data);
    }
    // The dashboard's page, script and style: static, no data, no token.
    if req.method() == Method::GET {
        if let Some(response) = dashboard::asset(&path) {
            return response;
        }
    }
    if !authorized(app, &req) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "missing or wrong bearer token"}),
        );
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/status") => json_response(StatusCode::OK, &views::status(app)),
        (&Method::GET, "/check") => {
            let config = app.data.config().clone();
            let own = crate::check::OwnSessions {
                blue: app.data.own_connections(crate::config::Side::Blue),
                green: app.data.own_connections(crate::config::Side::Green),
            };
            match crate::check::run(&config, &own).await {
                Ok(report) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(&report).unwrap_or_default(),
                ),
                Err(e) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": e.to_string()}),
                ),
            }
        }
        (&Method::GET, "/prepare") => {
            let config = app.data.config().clone();
            match crate::prepare::current_progress(&config).await {
                Ok(progress) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(&progress).unwrap_or_default(),
                ),
                Err(e) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": e.to_string()}),
                ),
            }
        }
        (&Method::GET, "/metrics") => {
            let body = app.data.metrics.render(&views::metrics_snapshot(app));
            Response::builder()
                .status(StatusCode::OK)
                .header(
                    CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .header(CACHE_CONTROL, "no-store")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"))
        }
        (&Method::POST, "/cutover") | (&Method::POST, "/fallback") => {
            let direction = if path == "/cutover" {
                Direction::Cutover
            } else {
                Direction::Fallback
            };
            let read_timeout = app.data.config().admin.request_read_timeout;
            let options = match read_json::<Options>(req, read_timeout).await {
                Ok(options) => options,
                Err(message) => {
                    return json_response(StatusCode::BAD_REQUEST, &json!({"error": message}))
                }
            };
            let report = app.cutover.run(&app.data, direction, options).await;
            let status = StatusCode::from_u16(report.http_status()).unwrap_or(StatusCode::CONFLICT);
            json_response(status, &serde_json::to_value(&report).unwrap_or_default())
        }
        (&Method::POST, "/reload") => match app.data.reload(&app.config_path).await {
            Ok(()) => {
                tracing::info!(path = %app.config_path.display(), "configuration reloaded (admin API)");
                json_response(StatusCode::OK, &json!({"reloaded": true}))
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; keeping the running configuration");
                json_response(
                    StatusCode::CONFLICT,
                    &json!({"reloaded": false, "error": e.to_string()}),
                )
            }
        },
        (&Method::POST, "/decommission") => {
            let read_timeout = app.data.config().admin.request_read_timeout;
            let force = match read_json::<DecommissionOptions>(req, read_timeout).await {
                Ok(options) => options.force,
                Err(message) => {
                    return json_response(StatusCode::BAD_REQUEST, &json!({"error": message}))
                }
            };
            let report = app.cutover.decommission(&app.data, force).await;
            let status = StatusCode::from_u16(report.http_status()).unwrap_or(StatusCode::CONFLICT);
            json_response(status, &serde_json::to_value(&report).unwrap_or_default())
        }
        (&Method::GET, "/lag") => json_response(
            StatusCode::OK,
            &serde_json::to_value(app.lag.history()).unwrap_or_default(),
        ),
        (&Method::GET, "/cutovers") => json_response(
            StatusCode::OK,
            &serde_json::to_value(app.cutover.history()).unwrap_or_default(),
        ),
        (&Method::POST, "/pause") => {
            pause(&app.data);
            json_response(StatusCode::OK, &views::status(app))
        }
        (&Method::POST, "/resume") => {
            resume(&app.data);
            json_response(StatusCode::OK, &views::status(app))
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no endpoint {path}")}),
        ),
    }
}

/// The longest request body read (the options of /cutover and /fallback).
const MAX_BODY: usize = 64 * 1024;

/// Readiness: 200 when the active backend was reachable at its last
/// connection or probe, 503 otherwise (also before the first one). Open
/// like /health, so it says no more than that: the error is in /status.
fn ready(data: &DataPlane) -> Response<Full<Bytes>> {
    let active = data.switch.active();
    let reachable = active.addr.reachability.reachable();
    // A state file that can't be read would stop the next start, and a
    // switch's commit: not ready, though traffic still flows.
    let state_file = data.config().cutover.state_file.as_deref().map(|path| {
        crate::state::load(path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let state_file_ok = !matches!(state_file, Some(Err(_)));
    let ready = reachable == Some(true) && state_file_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({
            "ready": ready,
            "active": active.side.as_str(),
            "reachable": reachable,
            "state_file": match state_file {
                None => json!(null),
                Some(Ok(())) => json!("readable"),
                Some(Err(e)) => json!(e),
            },
        }),
    )
}

/// The optional JSON body of /decommission.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DecommissionOptions {
    #[serde(default)]
    force: bool,
}

/// The optional JSON body of /cutover, /fallback and /decommission, sent
/// within `timeout`; empty is the defaults.
async fn read_json<T: serde::de::DeserializeOwned + Default>(
    req: Request<Incoming>,
    timeout: Duration,
) -> Result<T, String> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let body = tokio::time::timeout(timeout, body.collect())
        .await
        .map_err(|_| format!("the body did not arrive within request_read_timeout ({timeout:?})"))?
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// The operator's hold of the gate: new transactions wait until /resume, also
/// across a cutover that runs meanwhile.
fn pause(data: &DataPlane) {
    if data.switch.gate.hold(Holder::Operator) {
        tracing::info!("paused: new transactions wait at the gate");
    }
}

/// Ends the operator's hold; the gate opens unless a cutover holds it too.
fn resume(data: &DataPlane) {
    if let Some(held) = data.switch.gate.release(Holder::Operator) {
        data.metrics.pause_seconds.observe(held.as_secs_f64());
        tracing::info!(pause_ms = held.as_millis() as u64, "resumed");
    }
}

fn authorized(app: &AdminState, req: &Request<Incoming>) -> bool {
    let Some(expected) = app.data.config().admin.resolved_token() else {
        return true; // loopback without a token: allowed by configuration
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Data (and tokens' refusals) are never kept by a browser or a proxy.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
