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
    if let Some(reloaded) = value.get("reloaded").and_then(|v| v.as_bool()) {
        return match reloaded {
            true => "configuration reloaded\n".into(),
            false => format!(
                "reload refused, the running configuration kept: {}\n",
                text(value, "error")
            ),
        };
    }
    if let Some(switches) = value.as_array() {
        return render_history(switches);
    }
    if value.get("pools").is_some() && value.get("active").is_some() {
        return render_status(value);
    }
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn text<'v>(value: &'v serde_json::Value, key: &str) -> &'v str {
    value.get(key).and_then(|v| v.as_str()).unwrap_or("-")
}

fn number(value: &serde_json::Value, key: &str) -> String {
    value
        .get(key)
        .filter(|v| !v.is_null())
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

/// `GET /status` as a person reads it: the side, the gate, replication,
/// backends, then one line per pool.
fn render_status(st: &serde_json::Value) -> String {
    let mut out = String::new();
    let paused_by: Vec<&str> = st
        .get("paused_by")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    let gate = if paused_by.is_empty() {
        "open".to_owned()
    } else {
        format!("closed (held by {})", paused_by.join(", "))
    };
    out.push_str(&format!("active:       {}\n", text(st, "active")));
    out.push_str(&format!("gate:         {gate}\n"));
    out.push_str(&format!("phase:        {}\n", text(st, "phase")));
    let lag = &st["replication_lag"];
    let replication = if lag.is_null() {
        "not measured (no admin credentials, or no replication)".to_owned()
    } else {
        let seconds = lag["seconds"]
            .as_f64()
            .map(|s| format!(", ~{s:.1} s"))
            .unwrap_or_default();
        let streaming = if lag["streaming"] == true {
            "streaming"
        } else {
            "NOT streaming"
        };
        format!(
            "{} bytes behind{seconds}, {streaming}",
            number(lag, "bytes")
        )
    };
    out.push_str(&format!("replication:  {replication}\n"));
    for (key, label) in [
        ("unfinished_switch", "unfinished:   "),
        ("unreconciled", "unreconciled: "),
    ] {
        if let Some(v) = st.get(key).filter(|v| !v.is_null()) {
            out.push_str(&format!("{label}{}\n", v.to_string().trim_matches('"')));
        }
    }
    out.push_str(&format!("clients:      {}\n", number(st, "clients")));
    if let Some(backends) = st.get("backends").and_then(|v| v.as_object()) {
        out.push_str("backends:\n");
        for (side, b) in backends {
            let reachable = match b["reachable"].as_bool() {
                Some(true) => "reachable",
                Some(false) => "UNREACHABLE",
                None => "not checked yet",
            };
            let error = b["last_error"]
                .as_str()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {side:<6} {:<22} {reachable}{error}\n",
                text(b, "addr")
            ));
        }
    }
    let pools = st["pools"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!(
        "pools:\n  {:<6} {:<16} {:<16} {:>4} {:>4} {:>6} {:>4} {:>7}\n",
        "SIDE", "DATABASE", "USER", "SIZE", "OPEN", "ACTIVE", "IDLE", "WAITING"
    ));
    for p in &pools {
        let stats = &p["stats"];
        out.push_str(&format!(
            "  {:<6} {:<16} {:<16} {:>4} {:>4} {:>6} {:>4} {:>7}\n",
            text(p, "backend"),
            text(p, "database"),
            text(p, "user"),
            number(stats, "size"),
            number(stats, "open"),
            number(stats, "active"),
            number(stats, "idle"),
            number(stats, "waiting")
        ));
    }
    out
}

/// `GET /cutovers`: one line per switch, oldest first.
fn render_history(switches: &[serde_json::Value]) -> String {
    if switches.is_empty() {
        return "no cutover or fallback since pgswitch started\n".into();
    }
    let mut out = format!(
        "{:<24} {:<8} {:<14} {:<9} {:>9}  {}\n",
        "STARTED (UTC)", "KIND", "DIRECTION", "OUTCOME", "PAUSE", "REASON"
    );
    for s in switches {
        let started = s["started_at_unix_ms"]
            .as_u64()
            .map(|ms| {
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                )
                .to_string()
            })
            .unwrap_or_else(|| "-".into());
        let pause = s["pause_ms"]
            .as_f64()
            .map(|ms| format!("{ms:.1} ms"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{started:<24} {:<8} {:<14} {:<9} {pause:>9}  {}\n",
            text(s, "kind"),
            format!("{} -> {}", text(s, "from"), text(s, "to")),
            text(s, "outcome"),
            s["reason"].as_str().unwrap_or("")
        ));
    }
    out
}
