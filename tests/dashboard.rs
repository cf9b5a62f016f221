//! The dashboard (issue 16): `GET /` serves the page without the token,
//! with its security headers, while every data endpoint still answers 401
//! without it; and a real headless Chromium, driven over WebDriver
//! (chromedriver, with the thirtyfour client), opens the page in front of a
//! real blue/green pair, enters the token, cuts over from the page and sees
//! green become active and the cutover's timeline appear. Its screenshots
//! are kept in `target/` (`dashboard-screenshot.png`, and the phone width
//! in `dashboard-screenshot-phone.png`).
//!
//! Chromium and chromedriver are the Debian packages `chromium` and
//! `chromium-driver` (scripts/test-deps.sh installs them). Without them the
//! browser test is skipped, saying so, except under `CI=true`, where it fails.
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::*;
use thirtyfour::common::capabilities::chromium::ChromiumLikeCapabilities;
use thirtyfour::prelude::*;
use thirtyfour::session::http::{Body, HttpClient};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const BROWSER_WAIT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------ plain HTTP

/// One request; the status, the headers (names in lower case) and the body.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    admin_http_with_headers(port, method, path, token, "").await
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> &'h str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_open_with_security_headers_and_the_data_needs_the_token() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = ProxyConfig::new(pg.port)
        .pool_size(2)
        .app_user()
        .admin(free_port(), &format!("token = \"{TOKEN}\""))
        .start();
    let port = proxy.admin_port;

    let (status, headers, page) = http(port, "GET", "/", None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    let csp = header(&headers, "content-security-policy");
    for directive in [
        "default-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(directive), "CSP {csp:?} lacks {directive:?}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("http"),
        "{csp}"
    );
    assert_eq!(header(&headers, "x-frame-options"), "DENY");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    assert_eq!(header(&headers, "referrer-policy"), "no-referrer");
    assert!(page.contains("<script src=\"/dashboard.js\""), "{page}");
    assert!(page.contains("id=\"token-input\""), "{page}");
    assert!(!page.contains(TOKEN));
    // Nothing inline (the CSP would block it) and nothing from elsewhere.
    assert_eq!(page.matches("<script").count(), 1, "{page}");
    assert!(
        !page.contains("<style") && !page.contains(" style="),
        "{page}"
    );
    assert!(!page.contains("http://") && !page.contains("https://"));

    for (path, content_type) in [
        ("/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard.css", "text/css; charset=utf-8"),
    ] {
        let (status, headers, body) = http(port, "GET", path, None).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), content_type, "{path}");
        assert_eq!(header(&headers, "x-frame-options"), "DENY");
        // (The SVG namespace is a name, not an address.)
        let body = body.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }

    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/lag"),
        ("GET", "/cutovers"),
        ("GET", "/check"),
        ("GET", "/prepare"),
        ("GET", "/metrics"),
        ("POST", "/cutover"),
        ("POST", "/fallback"),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("POST", "/decommission"),
        ("POST", "/"),
    ] {
        for token in [None, Some("wrong")] {
            let (status, headers, body) = http(port, method, path, token).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(header(&headers, "cache-control"), "no-store");
        }
    }

    // With the token: data, never cached; /lag is a list (empty here: this
    // proxy has no admin credentials to read a lag with).
    for path in ["/status", "/lag", "/cutovers", "/metrics"] {
        let (status, headers, body) = http(port, "GET", path, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(header(&headers, "cache-control"), "no-store", "{path}");
    }
    let (_, _, lag) = http(port, "GET", "/lag", Some(TOKEN)).await;
    assert_eq!(lag, "[]");
    let (_, _, status) = http(port, "GET", "/status", Some(TOKEN)).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    for counter in ["transactions", "queries", "errors"] {
        assert!(status["counters"][counter].is_u64(), "{status}");
    }
    assert!(
        !proxy.logs().contains(TOKEN),
        "the token must not be logged"
    );
}

// ------------------------------------------------------------- browser

/// thirtyfour's HTTP client, over hyper (already a dependency of
/// pgswitch): one connection per WebDriver command to chromedriver on
/// 127.0.0.1.
struct HyperClient;

fn request_failed(e: impl std::fmt::Display) -> WebDriverError {
    WebDriverError::RequestFailed(e.to_string())
}

#[async_trait::async_trait]
impl HttpClient for HyperClient {
    async fn send(
        &self,
        request: hyper::Request<Body<'_>>,
    ) -> WebDriverResult<hyper::Response<Bytes>> {
        let (mut parts, body) = request.into_parts();
        let body = match body {
            Body::Empty => Bytes::new(),
            Body::Json(value) => Bytes::from(serde_json::to_vec(value).map_err(request_failed)?),
        };
        let authority = parts
            .uri
            .authority()
            .ok_or_else(|| request_failed("no host in the WebDriver URL"))?
            .clone();
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(request_failed)?;
        parts.headers.insert(
            hyper::header::HOST,
            authority.as_str().parse().map_err(request_failed)?,
        );
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(request_failed)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(request_failed)?;
            tokio::spawn(conn);
            let response = sender
                .send_request(hyper::Request::from_parts(parts, Full::new(body)))
                .await
                .map_err(request_failed)?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(request_failed)?.to_bytes();
            Ok(hyper::Response::from_parts(parts, body))
        };
        tokio::time::timeout(Duration::from_secs(120), exchange)
            .await
            .map_err(|_| request_failed("chromedriver did not answer within 120 s"))?
    }

    async fn new(&self) -> Arc<dyn HttpClient> {
        Arc::new(HyperClient)
    }
}

/// `chromedriver --port=N`, killed on drop; its log in a temp dir.
struct ChromeDriver {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("chromedriver.log");
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {CHROMEDRIVER}: {e}"));
        let mut driver = ChromeDriver {
            child,
            port,
            log,
            _dir: dir,
        };
        if !wait_for_port(port, Duration::from_secs(20)) {
            let _ = driver.child.kill();
            panic!(
                "chromedriver did not listen on port {port}\n{}",
                file_tail(&driver.log, 40)
            );
        }
        driver
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- chromedriver log ----\n{}\n----",
                file_tail(&self.log, 60)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether Chromium and chromedriver are installed: `Err` says what is
/// missing.
fn browser_installed() -> Result<(), String> {
    for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        if !Path::new(path).exists() {
            return Err(format!("{path} (Debian package {package})"));
        }
    }
    Ok(())
}

async fn open_browser(driver: &ChromeDriver, profile: &Path) -> WebDriver {
    let mut caps = DesiredCapabilities::chrome();
    caps.set_binary(CHROMIUM).unwrap();
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1440,1000",
    ] {
        caps.add_arg(arg).unwrap();
    }
    caps.add_arg(&format!("--user-data-dir={}", profile.display()))
        .unwrap();
    WebDriver::builder(format!("http://127.0.0.1:{}", driver.port), caps)
        .client(HyperClient)
        .await
        .unwrap_or_else(|e| panic!("open a Chromium session: {e}"))
}

/// An element's `textContent` (what the page wrote, before CSS capitals).
async fn text(browser: &WebDriver, css: &str) -> Option<String> {
    let element = browser.find(By::Css(css)).await.ok()?;
    element.prop("textContent").await.ok()?
}

/// Clicks the button `id`, waits for the page's confirmation dialog, and
/// confirms; returns the dialog's title.
async fn confirm(browser: &WebDriver, id: &str) -> String {
    let button = browser.find(By::Id(id)).await.unwrap();
    wait_page(&format!("#{id} enabled"), || async {
        button.is_enabled().await.unwrap_or(false)
    })
    .await;
    button.click().await.unwrap();
    let dialog = browser.find(By::Id("confirm")).await.unwrap();
    assert!(
        dialog.is_displayed().await.unwrap(),
        "#{id} opens a confirmation dialog"
    );
    let title = text(browser, "#confirm-title").await.unwrap_or_default();
    browser
        .find(By::Id("confirm-yes"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    title
}

/// Whether the lag chart has been redrawn at its container's current width.
async fn chart_fits(browser: &WebDriver) -> bool {
    let script = "const c = document.getElementById('lag-chart'); \
                  const s = c.querySelector('svg'); \
                  return !!s && Number(s.getAttribute('width')) === Math.max(200, c.clientWidth);";
    match browser.execute(script, vec![]).await {
        Ok(ret) => ret.json().as_bool() == Some(true),
        Err(_) => false,
    }
}

/// Waits (polling, up to [`BROWSER_WAIT`]) until `check` says yes.
async fn wait_page<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until(BROWSER_WAIT, what, check).await
}

fn artefact(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A writer through pgswitch until stopped, so that the page has traffic
/// and replication lag to show; one insert per few milliseconds.
fn traffic(proxy: &Proxy, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    let port = proxy.port;
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=app password=app dbname=app"),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect through pgswitch");
        tokio::spawn(conn);
        let insert = client
            .prepare("INSERT INTO acked (id, writer) VALUES ($1, 1)")
            .await
            .unwrap();
        let (mut n, mut errors) = (0u64, Vec::new());
        while !stop.load(Ordering::Relaxed) && n < 200_000 {
            n += 1;
            if let Err(e) = client.execute(&insert, &[&(n as i64)]).await {
                errors.push(e.to_string());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (n, errors)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_cuts_over_in_a_real_browser() {
    if let Err(missing) = browser_installed() {
        let message = missing_prerequisite(&missing);
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
        return;
    }
    let pair = pair().await;
    let proxy = Proxy::start(&proxy_config(&pair, "", ""));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = traffic(&proxy, stop.clone());

    let driver = ChromeDriver::start();
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;
    let url = format!("http://127.0.0.1:{}/", proxy.admin_port);
    browser.goto(url.as_str()).await.unwrap();

    // The token, into the page's own form.
    let input = browser.find(By::Id("token-input")).await.unwrap();
    input.send_keys(TOKEN).await.unwrap();
    browser
        .find(By::Id("token-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_page("the page shows blue active", || async {
        text(&browser, "#active-side").await.as_deref() == Some("blue")
    })
    .await;
    wait_page("the page shows the traffic and the lag", || async {
        let tps = text(&browser, "#tps").await.unwrap_or_default();
        let lag = browser.find_all(By::Css("#lag-chart path.line")).await;
        tps.parse::<f64>().is_ok_and(|v| v > 0.0) && lag.is_ok_and(|l| !l.is_empty())
    })
    .await;

    // Cutover, through the page's confirmation dialog.
    let title = confirm(&browser, "btn-cutover").await;
    assert_eq!(title, "Cut over to green?");
    wait_page("the page shows green active", || async {
        text(&browser, "#active-side").await.as_deref() == Some("green")
    })
    .await;
    wait_page("the cutover's timeline appears in the history", || async {
        let Ok(rows) = browser
            .find_all(By::Css(
                "#history article.cutover[data-outcome=switched][data-kind=cutover] .timeline .tl-bar",
            ))
            .await
        else {
            return false;
        };
        rows.len() >= 5
    })
    .await;
    let history = text(&browser, "#history").await.unwrap();
    for phase in ["preflight", "drain", "catch up", "persist", "pause"] {
        assert!(
            history.contains(phase),
            "{phase} not in the history:\n{history}"
        );
    }
    let result = text(&browser, "#result").await.unwrap();
    assert!(
        result.contains("SWITCHED") || result.contains("switched"),
        "the report of the cutover: {result}"
    );
    assert!(result.contains("pause"), "{result}");

    // Pause and resume, then a dry run of the fallback, each confirmed.
    confirm(&browser, "btn-pause").await;
    wait_page("the gate shows closed by the operator", || async {
        text(&browser, "#gate").await.as_deref() == Some("closed (operator)")
    })
    .await;
    assert_eq!(
        status(&proxy).await["paused_by"],
        serde_json::json!(["operator"])
    );
    confirm(&browser, "btn-resume").await;
    wait_page("the gate shows open", || async {
        text(&browser, "#gate").await.as_deref() == Some("open")
    })
    .await;
    confirm(&browser, "btn-dry-run").await;
    wait_page("the dry run's timeline appears, green still active", || async {
        browser
            .find_all(By::Css(
                "#history article.cutover[data-outcome=dry_run][data-kind=fallback] .timeline .tl-bar",
            ))
            .await
            .is_ok_and(|bars| !bars.is_empty())
    })
    .await;
    assert_eq!(status(&proxy).await["active"], "green");

    // The check table, on demand.
    browser
        .find(By::Id("btn-check"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_page("the check table fills", || async {
        browser
            .find_all(By::Css("#checks tr[data-level]"))
            .await
            .is_ok_and(|rows| !rows.is_empty())
    })
    .await;

    // The token is in neither the page nor its address.
    let source = browser.source().await.unwrap();
    assert!(!source.contains(TOKEN), "the token is in the page source");
    let current = browser.current_url().await.unwrap().to_string();
    assert!(
        !current.contains(TOKEN),
        "the token is in the URL {current}"
    );
    assert_eq!(current, url);

    // Screenshots: the laptop view (tall enough to hold the whole page) and
    // a phone's width.
    browser.set_window_rect(0, 0, 1440, 2000).await.unwrap();
    browser
        .execute("window.scrollTo(0, 0)", vec![])
        .await
        .unwrap();
    wait_page("the charts redrawn at the laptop width", || {
        chart_fits(&browser)
    })
    .await;
    let shot = artefact("dashboard-screenshot.png");
    browser.screenshot(&shot).await.unwrap();
    eprintln!("dashboard screenshot: {}", shot.display());
    browser.set_window_rect(0, 0, 400, 2400).await.unwrap();
    wait_page("the charts redrawn at a phone's width", || {
        chart_fits(&browser)
    })
    .await;
    let phone = artefact("dashboard-screenshot-phone.png");
    browser.screenshot(&phone).await.unwrap();
    eprintln!("dashboard screenshot (phone width): {}", phone.display());
    browser.quit().await.unwrap();

    stop.store(true, Ordering::Relaxed);
    let (inserts, errors) = writer.await.unwrap();
    assert!(
        errors.is_empty(),
        "client errors during the cutover: {errors:?}"
    );
    eprintln!("{inserts} inserts through pgswitch, no client error");
    let status = status(&proxy).await;
    assert_eq!(status["active"], "green");
}
