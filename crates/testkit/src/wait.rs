//! Waiting on a condition with a timeout, instead of sleeping to synchronise.

use std::{future::Future, time::Duration};

/// Polls `f` every 10 ms until it returns `Some`, and returns that; panics after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
