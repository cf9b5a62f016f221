//! The CLI's side of the admin API: `pgswitch status|cutover|fallback|pause|resume`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("admin URL {0:?} must look like http://127.0.0.1:9930")]
    Url(String),
    #[error("cannot reach the admin API at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("admin API: {0}")]
    Http(#[from] hyper::Error),
    #[error("admin API: {0}")]
    Request(#[from] hyper::http::Error),
}

/// Sends one request and returns the HTTP status and the body.
pub async fn call(
    admin: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String), ClientError> {
    let addr = admin
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| ClientError::Url(admin.to_owned()))?;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr);
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// One line per item of each list `key` of `value`, under its `label`.
fn push_lists(out: &mut String, value: &serde_json::Value, lists: &[(&str, &str)], width: usize) {
    for (key, label) in lists {
        for item in value
            .get(*key)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            out.push_str(&format!(
                "  {:<width$} {}\n",
                format!("{label}:"),
                item.as_str().unwrap_or("?")
            ));
        }
    }
}

/// A report or status, readable by a person at 3 a.m.
pub fn render(value: &serde_json::Value) -> String {
    let mut out = String::new();
    if value.get("kind").and_then(|v| v.as_str()) == Some("decommission") {
        let outcome = value.get("outcome").and_then(|v| v.as_str()).unwrap_or("?");
        out.push_str(&format!("decommission: {}\n", outcome.to_uppercase()));
        if let Some(reason) = value.get("reason").and_then(|v| v.as_str()) {
            out.push_str(&format!("  reason:    {reason}\n"));
        }
        let lists = [
            ("dropped", "dropped"),
            ("lifted", "unfenced"),
            ("remaining", "remaining"),
        ];
        push_lists(&mut out, value, &lists, 10);
        return out;
    }
    if let Some(outcome) = value.get("outcome").and_then(|v| v.as_str()) {
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or("switch");
        let from = value.get("from").and_then(|v| v.as_str()).unwrap_or("?");
        let to = value.get("to").and_then(|v| v.as_str()).unwrap_or("?");
        out.push_str(&format!(
            "{kind} {from} -> {to}: {}\n",
            outcome.to_uppercase()
        ));
        if let Some(reason) = value.get("reason").and_then(|v| v.as_str()) {
            out.push_str(&format!("  reason:            {reason}\n"));
        }
        if let Some(pause) = value.get("pause_ms").and_then(|v| v.as_f64()) {
            out.push_str(&format!("  pause:             {pause:.1} ms\n"));
        }
        if value
            .get("still_paused_by_operator")
            .and_then(|v| v.as_bool())
            == Some(true)
        {
            out.push_str(
                "  still paused:      by the operator's /pause, until `pgswitch resume`\n",
            );
        }
        if let Some(held) = value.get("held_transactions").and_then(|v| v.as_u64()) {
            out.push_str(&format!("  held at the gate:  {held} transaction(s)\n"));
        }
        // The catch-up target is a position in the old side's WAL, the
        // switch point one in the new side's (where the way back starts).
        for (key, server) in [
            ("target_lsn", from),
            ("switch_lsn", to),
            ("sequences_synced", ""),
            ("lag_bytes", ""),
        ] {
            if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                let on = if server.is_empty() {
                    String::new()
                } else {
                    format!(" (on {server})")
                };
                out.push_str(&format!(
                    "  {:<18} {}{on}\n",
                    format!("{}:", key.replace('_', " ")),
                    v.to_string().trim_matches('"')
                ));
            }
        }
        let lists = [
            ("forced", "forced"),
            ("warnings", "check warned"),
            ("undone", "undone"),
            ("undo_failures", "undo failed"),
        ];
        push_lists(&mut out, value, &lists, 18);
        if let Some(phases) = value.get("phases").and_then(|v| v.as_array()) {
            out.push_str("  phases (* inside the pause):\n");
            for phase in phases {
                let name = phase.get("name").and_then(|v| v.as_str()).unwrap_or("?");
                let ms = phase.get("ms").and_then(|v| v.as_f64()).unwrap_or(0.0);
                let paused = phase.get("in_pause").and_then(|v| v.as_bool()) == Some(true);
                let mark = if paused { '*' } else { ' ' };
                out.push_str(&format!("   {mark}{name:<12} {ms:>9.1} ms\n"));
            }
        }
        return out;
    }
    serde_json::to_string_pretty(value).unwrap_or_default()
}
