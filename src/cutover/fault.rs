//! Test hook: holds a switch at a named point so that a test can kill
//! pgswitch, or crash a server, exactly there.
//!
//! `PGSWITCH_TEST_STALL_AT=<point>` makes a switch wait when it reaches
//! `<point>` (a phase name as `/status` shows it, or one of the points the
//! switch names between phases: `switch`, `switched`, `cleanup`; and
//! `decommission_dropped`, `decommission_store`) until the
//! file named by `PGSWITCH_TEST_STALL_RELEASE` exists (for ever without
//! one). Unset, a point costs one comparison. Never set it in production.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

struct Stall {
    at: String,
    release: Option<PathBuf>,
}

fn configured() -> Option<&'static Stall> {
    static STALL: OnceLock<Option<Stall>> = OnceLock::new();
    STALL
        .get_or_init(|| {
            let at = std::env::var("PGSWITCH_TEST_STALL_AT").ok()?;
            let release = std::env::var_os("PGSWITCH_TEST_STALL_RELEASE").map(PathBuf::from);
            Some(Stall { at, release })
        })
        .as_ref()
}

/// Waits here when the test hook names this point.
pub async fn point(name: &str) {
    let Some(stall) = configured().filter(|s| s.at == name) else {
        return;
    };
    tracing::warn!(point = name, "test hook: switch stalled");
    loop {
        if stall.release.as_ref().is_some_and(|p| p.exists()) {
            tracing::warn!(point = name, "test hook: switch released");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
