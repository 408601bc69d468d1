//! Streams created with `POST /v1/streams` (201) and read by polling: long-poll
//! (`GET /v1/streams/{id}/poll?after=N&timeout_ms=T`) or short-poll
//! (`GET /v1/streams/{id}?after=N`, every `--poll-interval-ms`). Each answer's events get the
//! receipt time of the answer.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::time::Instant;

use crate::{
    ctx::{Ctx, Ended},
    event::PollAnswer,
    stats::{Kind, Reader, unix_nanos},
    transports::{request_error, status_error},
    verify::Violation,
};

/// `POST {target}/v1/streams` expecting 201; the new stream's id (errors are counted).
///
/// With `--resume-attempts`, a refused connection (nothing was sent, so trying again cannot
/// start a second stream) is tried again on the next target, 1 s later, counted under
/// `resumes` as `connect`.
pub async fn create(ctx: &Ctx, target: &str, body: &Value, deadline: Instant) -> Option<String> {
    let stats = &ctx.stats;
    let label = format!("POST {target}/v1/streams");
    let resp = super::send(
        ctx,
        target,
        deadline,
        &label,
        reqwest::StatusCode::CREATED,
        |t| ctx.http.post(format!("{t}/v1/streams")).json(body),
    )
    .await?;
    let bytes = match tokio::time::timeout_at(deadline, resp.bytes()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            stats.error("read", || format!("{e:#}"));
            return None;
        }
        Err(_) => {
            stats.error("timeout_body", || "201 body".to_owned());
            return None;
        }
    };
    let id = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned));
    if id.is_none() {
        let body = String::from_utf8_lossy(&bytes).into_owned();
        stats.error("created_without_id", || body);
    }
    id
}

/// One stream read by long-poll or short-poll (`kind`).
pub async fn run(ctx: &Ctx, kind: Kind, label: String, seed: u64) -> Ended {
    let stats = &ctx.stats;
    let target = ctx.next_target();
    let deadline = Instant::now() + ctx.stream_timeout;
    let sent_ns = unix_nanos();
    let Some(id) = create(ctx, target, &ctx.native_body(seed), deadline).await else {
        return Ended::default();
    };
    let mut reader = Reader::new(
        stats.clone(),
        kind,
        label.clone(),
        ctx.check_options(),
        sent_ns,
        sent_ns,
    );
    let interval = Duration::from_millis(ctx.plan.poll_interval_ms);
    let mut after = 0u64;
    let mut ok = true;
    loop {
        let url = match kind {
            Kind::Longpoll => format!(
                "{target}/v1/streams/{id}/poll?after={after}&timeout_ms={}",
                ctx.plan.poll_timeout_ms
            ),
            _ => format!("{target}/v1/streams/{id}?after={after}"),
        };
        let resp = match tokio::time::timeout_at(deadline, ctx.http.get(url).send()).await {
            Err(_) => {
                stats.error("timeout_response", || label.clone());
                ok = false;
                break;
            }
            Ok(Err(e)) => {
                request_error(stats, &e);
                ok = false;
                break;
            }
            Ok(Ok(r)) => r,
        };
        stats.http_version(resp.version());
        if resp.status() != reqwest::StatusCode::OK {
            status_error(stats, resp).await;
            ok = false;
            break;
        }
        let bytes = match tokio::time::timeout_at(deadline, resp.bytes()).await {
            Err(_) => {
                stats.error("timeout_body", || label.clone());
                ok = false;
                break;
            }
            Ok(Err(e)) => {
                stats.error("read", || format!("{e:#}"));
                ok = false;
                break;
            }
            Ok(Ok(b)) => b,
        };
        let recv = unix_nanos();
        let answer = match serde_json::from_slice::<PollAnswer<'_>>(&bytes) {
            Ok(a) => a,
            Err(e) => {
                let data = String::from_utf8_lossy(&bytes).into_owned();
                reader.violation(Violation::UnparseableEvent, || format!("{e}: {data}"));
                ok = false;
                break;
            }
        };
        for ev in &answer.events {
            reader.native(ev, recv);
        }
        let last = answer.events.last().and_then(|e| e.seq).unwrap_or(after);
        match answer.next_after {
            Some(n) if n == last && n >= after => after = n,
            other => {
                reader.violation(Violation::PollCursorMismatch, || {
                    format!("after {after}, last event seq {last}, next_after {other:?}")
                });
                after = last.max(after);
            }
        }
        let running = answer.status.as_deref() == Some("running");
        if reader.has_terminal() || (!running && answer.events.is_empty()) {
            break;
        }
        if kind == Kind::Shortpoll
            && tokio::time::timeout_at(deadline, tokio::time::sleep(interval))
                .await
                .is_err()
        {
            stats.error("timeout_body", || label.clone());
            ok = false;
            break;
        }
    }
    let end = reader.end();
    Ended {
        ok: ok && end.terminal,
        completed: end.completed,
    }
}

/// Short-poll from 0: (status, number of events).
pub async fn short_poll_status(
    http: &reqwest::Client,
    target: &str,
    id: &str,
) -> anyhow::Result<(String, usize)> {
    let v: Value = http
        .get(format!("{target}/v1/streams/{id}?after=0"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
        .context("short-poll answer")?;
    Ok((
        v["status"].as_str().unwrap_or("?").to_owned(),
        v["events"].as_array().map_or(0, Vec::len),
    ))
}
