//! Polling helpers: wait until a condition holds, or fail saying what didn't.
use super::*;

use std::future::Future;
use std::time::Instant;

/// How often the helpers below check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls async `check` until it yields `Some` (returned) or `timeout` passes
/// (`None`). It is checked at least once, and once more at the deadline.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls async `cond` until it is true; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if wait_for(timeout, || {
        let f = cond();
        async move { f.await.then_some(()) }
    })
    .await
    .is_none()
    {
        panic!("{what} (waited {timeout:?})");
    }
}

/// Polls `check` until it yields `Some` or `timeout` passes, blocking the
/// thread between checks.
pub fn wait_for_sync<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Blocking [`wait_until`].
#[track_caller]
pub fn wait_until_sync(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    if wait_for_sync(timeout, || cond().then_some(())).is_none() {
        panic!("{what} (waited {timeout:?})");
    }
}
