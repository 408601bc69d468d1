//! Transports: each reads one stream (or, for WebSocket, many on one socket) and feeds its
//! events to a [`Reader`](crate::stats::Reader). Failures before a stream starts are errors;
//! what happens after is verified.

pub mod grpc;
pub mod poll;
pub mod raw;
pub mod sse;
pub mod ws;

use tokio::time::Instant;

use crate::{ctx::Ctx, stats::Stats};

/// How long a client waits before it reconnects (`--resume-attempts`): EventSource's default.
pub(crate) const RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts a failed HTTP request as `connect`, `timeout_response` or `request`.
pub(crate) fn request_error(stats: &Stats, e: &reqwest::Error) {
    let kind = if e.is_connect() {
        "connect"
    } else if e.is_timeout() {
        "timeout_response"
    } else {
        "request"
    };
    stats.error(kind, || chain(e));
}

/// An error and its causes, `: `-separated (reqwest's Display shows only the outermost).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Counts an unexpected HTTP status as `http_<status>`, with the body as the example.
pub(crate) async fn status_error(stats: &Stats, resp: reqwest::Response) {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    stats.error(format!("http_{status}"), || body);
}

/// Sends the request `build` makes for `target` and returns its response when it has status
/// `expect`; None otherwise (a failed request or another status is counted as an error,
/// `label` naming it). With `--resume-attempts`, a refused connection (nothing was sent, so
/// trying again cannot start a second stream) is tried again on the next target after
/// [`RETRY_DELAY`], as an EventSource does, and counted under `resumes` as `connect`.
pub(crate) async fn send(
    ctx: &Ctx,
    target: &str,
    deadline: Instant,
    label: &str,
    expect: reqwest::StatusCode,
    build: impl Fn(&str) -> reqwest::RequestBuilder,
) -> Option<reqwest::Response> {
    let stats = &ctx.stats;
    let mut target = target.to_owned();
    let mut attempts = ctx.plan.load.resume_attempts;
    loop {
        match tokio::time::timeout_at(deadline, build(&target).send()).await {
            Err(_) => {
                stats.error("timeout_response", || label.to_owned());
                return None;
            }
            Ok(Err(e)) if e.is_connect() && attempts > 0 => {
                attempts -= 1;
                stats.resumed("connect");
                tokio::time::sleep(RETRY_DELAY).await;
                target = ctx.next_target().to_owned();
            }
            Ok(Err(e)) => {
                request_error(stats, &e);
                return None;
            }
            Ok(Ok(r)) if r.status() == expect => {
                stats.http_version(r.version());
                return Some(r);
            }
            Ok(Ok(r)) => {
                status_error(stats, r).await;
                return None;
            }
        }
    }
}
