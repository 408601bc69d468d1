//! Server-sent events: native POST-SSE (`POST /v1/streams` with `Accept: text/event-stream`),
//! viewers (`GET /v1/streams/{id}/events`) and OpenAI chat completions. Viewers of `http://`
//! targets over HTTP/1.1 read their socket directly ([`raw`]); everything else goes through
//! reqwest. Token events are read by a byte scan ([`TokenScan`]), the rest as JSON.

use tokio::time::Instant;

use crate::{
    cli::HttpVersion,
    ctx::{Ctx, Ended},
    event::{Chunk, Ev, Frame, SseParser, TokenScan},
    stats::{Kind, Reader, ReaderEnd, Stats, unix_nanos},
    transports::{raw, request_error, status_error},
    verify::Violation,
};

/// Why an SSE body ended early: an error kind (`timeout_body`, `read`, `sse_line_too_long`)
/// and its detail.
struct Failure {
    kind: &'static str,
    detail: String,
}

/// An SSE response body: through the HTTP client, or (viewers of `http://` targets over
/// HTTP/1.1) straight off its socket ([`raw`]).
enum SseBody {
    Http(reqwest::Response),
    Raw(raw::RawBody),
}

impl SseBody {
    /// Hands the next bytes of the body to `f`; None at its end, Err with the cause's chain.
    async fn with_chunk<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, String> {
        match self {
            SseBody::Http(r) => match r.chunk().await {
                Ok(b) => Ok(b.map(|b| f(&b))),
                Err(e) => Err(super::chain(&e)),
            },
            SseBody::Raw(r) => match r.chunk().await {
                Ok(b) => Ok(b.map(f)),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// Read-to-parsed times a body holds before it hands them to the run (one lock per batch).
const LAG_BATCH: usize = 64;

/// Reads an SSE body to its end, calling `on_frame` with each event and its receipt time (the
/// wall clock when the read returned). Records how long each read in the window took from
/// its return to its last event handled ([`Stats::read_to_parsed`]). Err when the body failed
/// or ran past `deadline`.
async fn read_body(
    resp: &mut SseBody,
    stats: &Stats,
    deadline: Instant,
    label: &str,
    mut on_frame: impl FnMut(Frame<'_>, i64),
) -> Result<(), Failure> {
    let mut parser = SseParser::default();
    let mut lag: Vec<u64> = Vec::new();
    let end = read_frames(
        resp,
        stats,
        deadline,
        label,
        &mut parser,
        &mut lag,
        &mut on_frame,
    )
    .await;
    if !lag.is_empty() {
        stats.read_to_parsed(&lag);
    }
    end
}

async fn read_frames(
    resp: &mut SseBody,
    stats: &Stats,
    deadline: Instant,
    label: &str,
    parser: &mut SseParser,
    lag: &mut Vec<u64>,
    on_frame: &mut impl FnMut(Frame<'_>, i64),
) -> Result<(), Failure> {
    loop {
        let next = resp.with_chunk(|bytes| {
            let recv = unix_nanos();
            (recv, parser.push(bytes, |f| on_frame(f, recv)))
        });
        match tokio::time::timeout_at(deadline, next).await {
            Err(_) => {
                return Err(Failure {
                    kind: "timeout_body",
                    detail: label.to_owned(),
                });
            }
            Ok(Err(e)) => {
                return Err(Failure {
                    kind: "read",
                    detail: format!("{label}: {e}"),
                });
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some((_, Err(_))))) => {
                return Err(Failure {
                    kind: "sse_line_too_long",
                    detail: label.to_owned(),
                });
            }
            Ok(Ok(Some((recv, Ok(()))))) => {
                if stats.in_window(recv) {
                    lag.push(u64::try_from((unix_nanos() - recv) / 1000).unwrap_or(0));
                    if lag.len() >= LAG_BATCH {
                        stats.read_to_parsed(lag);
                        lag.clear();
                    }
                }
            }
        }
    }
}

/// Counts a failed body as an error; true when it ended cleanly.
fn counted(stats: &Stats, end: Result<(), Failure>) -> bool {
    match end {
        Ok(()) => true,
        Err(f) => {
            stats.error(f.kind, || f.detail);
            false
        }
    }
}

/// Reads a native SSE body into `reader` to its end. With `--resume-attempts`, a connection
/// that drops before the terminal event is re-attached with `Last-Event-ID` = the last seq
/// received (on the next target, 1 s later, as an EventSource does) and read on into the same
/// reader, so the stream is verified across the resumes. True when the last body ended
/// cleanly.
async fn follow_native(
    ctx: &Ctx,
    mut resp: SseBody,
    reader: &mut Reader,
    id: Option<&str>,
    deadline: Instant,
    label: &str,
) -> bool {
    let stats = &ctx.stats;
    let mut attempts = ctx.plan.load.resume_attempts;
    loop {
        let end = read_body(&mut resp, stats, deadline, label, |f, recv| {
            native_frame(reader, stats, &f, recv)
        })
        .await;
        let cause = match &end {
            Ok(()) if reader.has_terminal() => return true,
            Ok(()) => "eof_before_terminal",
            Err(f) if f.kind == "timeout_body" => return counted(stats, end),
            Err(f) => f.kind,
        };
        let Some(id) = id.filter(|_| attempts > 0) else {
            return counted(stats, end);
        };
        // Re-attach: each try (a refused or failed GET too) spends one attempt.
        let resumed = loop {
            attempts -= 1;
            tokio::time::sleep(super::RETRY_DELAY).await;
            if Instant::now() >= deadline {
                break None;
            }
            let last = reader.next_seq().saturating_sub(1);
            let request = ctx
                .http
                .get(format!("{}/v1/streams/{id}/events", ctx.next_target()))
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .header("last-event-id", last.to_string())
                .send();
            match tokio::time::timeout_at(deadline, request).await {
                Ok(Ok(r)) if r.status() == reqwest::StatusCode::OK => break Some(r),
                _ if attempts > 0 => {}
                Ok(Ok(r)) => {
                    status_error(stats, r).await;
                    break None;
                }
                Ok(Err(e)) => {
                    request_error(stats, &e);
                    break None;
                }
                Err(_) => break None,
            }
        };
        match resumed {
            Some(r) => {
                stats.resumed(cause);
                resp = SseBody::Http(r);
            }
            None => {
                // What ended the last connection is the stream's error.
                return counted(stats, end);
            }
        }
    }
}

/// Feeds one native SSE frame to `reader`. Token events take the byte scan of
/// [`TokenScan`] (no JSON parser on the hot path); anything else, and a token event the scan
/// cannot read, is parsed as JSON. A `type: error` without `seq` is a notice (e.g.
/// `slow_consumer`), not the terminal event: counted as an error, and the body ends after it.
fn native_frame(reader: &mut Reader, stats: &Stats, f: &Frame<'_>, recv: i64) {
    if let Some(t) = TokenScan::of(f.data) {
        reader.token(Some(t.seq), t.text, t.emitted_at, recv);
        return;
    }
    match serde_json::from_slice::<Ev<'_>>(f.data) {
        Ok(ev) if ev.kind.as_deref() == Some("error") && ev.seq.is_none() => {
            let code = ev.code.as_deref().unwrap_or("?").to_owned();
            let label = reader.label.clone();
            stats.error(format!("notice_{code}"), || label);
        }
        Ok(ev) => reader.native(&ev, recv),
        Err(e) => {
            let data = String::from_utf8_lossy(f.data).into_owned();
            reader.violation(Violation::UnparseableEvent, || format!("{e}: {data}"));
        }
    }
}

/// Closes a reader whose body ended: a clean end without the terminal event is an error too.
fn finish(reader: Reader, stats: &Stats, body_ok: bool) -> ReaderEnd {
    if body_ok && !reader.has_terminal() {
        let label = reader.label.clone();
        stats.error("eof_before_terminal", || label);
    }
    reader.end()
}

/// One native POST-SSE stream.
pub async fn native(ctx: &Ctx, label: String, seed: u64) -> Ended {
    let stats = &ctx.stats;
    let target = ctx.next_target();
    let deadline = Instant::now() + ctx.stream_timeout;
    let body = ctx.native_body(seed);
    let sent_ns = unix_nanos();
    let Some(resp) = super::send(
        ctx,
        target,
        deadline,
        &label,
        reqwest::StatusCode::OK,
        |t| {
            ctx.http
                .post(format!("{t}/v1/streams"))
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .json(&body)
        },
    )
    .await
    else {
        return Ended::default();
    };
    let id = resp
        .headers()
        .get("x-stream-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut reader = Reader::new(
        stats.clone(),
        Kind::Native,
        label.clone(),
        ctx.check_options(),
        sent_ns,
        sent_ns,
    );
    let ok = follow_native(
        ctx,
        SseBody::Http(resp),
        &mut reader,
        id.as_deref(),
        deadline,
        &label,
    )
    .await;
    let end = finish(reader, stats, ok);
    Ended {
        ok: ok && end.terminal,
        completed: end.completed,
    }
}

/// One viewer of an existing stream: `GET {target}/v1/streams/{id}/events` from the start.
/// `sent_ns` is when the stream was created (the viewer's time to first token counts from it).
pub async fn viewer(
    ctx: &Ctx,
    target: &str,
    id: &str,
    label: String,
    sent_ns: i64,
    deadline: Instant,
) -> Option<ReaderEnd> {
    let stats = &ctx.stats;
    let subscribed_ns = unix_nanos();
    let resp = match raw_host(ctx, target) {
        Some(host) => raw_viewer(stats, host, id, deadline, &label).await?,
        None => SseBody::Http(
            super::send(
                ctx,
                target,
                deadline,
                &label,
                reqwest::StatusCode::OK,
                |t| {
                    ctx.http
                        .get(format!("{t}/v1/streams/{id}/events"))
                        .header(reqwest::header::ACCEPT, "text/event-stream")
                },
            )
            .await?,
        ),
    };
    let mut reader = Reader::new(
        stats.clone(),
        Kind::Watch,
        label.clone(),
        ctx.check_options(),
        sent_ns,
        subscribed_ns,
    );
    let ok = follow_native(ctx, resp, &mut reader, Some(id), deadline, &label).await;
    let mut end = finish(reader, stats, ok);
    end.terminal &= ok;
    Some(end)
}

/// `HOST:PORT` when a viewer of `target` reads its socket directly: an `http://` target over
/// HTTP/1.1, and no `--resume-attempts` (re-attaching goes through the HTTP client).
fn raw_host<'t>(ctx: &Ctx, target: &'t str) -> Option<&'t str> {
    let l = &ctx.plan.load;
    if l.http != HttpVersion::Http1 || l.resume_attempts > 0 {
        return None;
    }
    let host = target.strip_prefix("http://")?.trim_end_matches('/');
    (!host.contains('/')).then_some(host)
}

/// A viewer's `GET …/events` on a raw socket; failures are counted as [`super::send`] counts
/// them.
async fn raw_viewer(
    stats: &Stats,
    host: &str,
    id: &str,
    deadline: Instant,
    label: &str,
) -> Option<SseBody> {
    let path = format!("/v1/streams/{id}/events");
    match tokio::time::timeout_at(deadline, raw::get(host, &path, &[])).await {
        Err(_) => stats.error("timeout_response", || label.to_owned()),
        Ok(Ok(body)) => {
            stats.http_version(http::Version::HTTP_11);
            return Some(SseBody::Raw(body));
        }
        Ok(Err(raw::RawError::Connect(e))) => stats.error("connect", || format!("{label}: {e}")),
        Ok(Err(raw::RawError::Io(e))) => stats.error("request", || format!("{label}: {e}")),
        Ok(Err(raw::RawError::Malformed(m))) => stats.error("request", || format!("{label}: {m}")),
        Ok(Err(raw::RawError::Status(status, body))) => {
            stats.error(format!("http_{status}"), || body)
        }
    }
    None
}

/// One OpenAI chat completion stream (`stream: true`, `include_usage`).
///
/// Chunks are mapped onto the native checks: the `id:` line of each chunk is its seq (a server
/// that sends none is taken in arrival order), a content delta is a token, the usage chunk
/// (with the finish reason of the chunk before it) is the terminal `done`, a `{"error":…}`
/// frame the terminal error. `data: [DONE]` must follow a usage chunk. Emit times come from
/// the tokenfan extension field `emitted_at_unix_nanos` of token chunks (asked for with
/// `"emit_times": true`).
pub async fn chat(ctx: &Ctx, label: String, seed: u64) -> Ended {
    let stats = &ctx.stats;
    let target = ctx.next_target();
    let deadline = Instant::now() + ctx.stream_timeout;
    let body = ctx.chat_body(seed);
    let sent_ns = unix_nanos();
    let Some(resp) = super::send(
        ctx,
        target,
        deadline,
        &label,
        reqwest::StatusCode::OK,
        |t| {
            ctx.http
                .post(format!("{t}/v1/chat/completions"))
                .json(&body)
        },
    )
    .await
    else {
        return Ended::default();
    };
    let mut reader = Reader::new(
        stats.clone(),
        Kind::Chat,
        label.clone(),
        ctx.check_options(),
        sent_ns,
        sent_ns,
    );
    let mut finish_reason: Option<String> = None;
    let mut done_marker = false;
    let mut resp = SseBody::Http(resp);
    let end = read_body(&mut resp, stats, deadline, &label, |f, recv| {
        if done_marker {
            reader.violation(Violation::EventAfterTerminal, || {
                format!("{} after [DONE]", String::from_utf8_lossy(f.data))
            });
            return;
        }
        if f.data == b"[DONE]" {
            done_marker = true;
            if !reader.has_terminal() {
                // A finish without the usage chunk that was asked for.
                let seq = Some(reader.next_seq());
                let reason = finish_reason.clone().unwrap_or_else(|| "?".to_owned());
                reader.done(seq, &reason, None, recv);
            }
            return;
        }
        let chunk = match serde_json::from_slice::<Chunk<'_>>(f.data) {
            Ok(c) => c,
            Err(e) => {
                let data = String::from_utf8_lossy(f.data).into_owned();
                reader.violation(Violation::UnparseableEvent, || format!("{e}: {data}"));
                return;
            }
        };
        let seq = f.id_seq().or_else(|| Some(reader.next_seq()));
        if let Some(err) = chunk.error {
            let code = err.code.as_deref().unwrap_or("?");
            reader.error_event(seq, code, err.message.as_deref().unwrap_or(""), recv);
            return;
        }
        if chunk.choices.is_empty() {
            if let Some(usage) = chunk.usage {
                let reason = finish_reason.clone().unwrap_or_else(|| "?".to_owned());
                reader.done(seq, &reason, Some(usage.completion_tokens), recv);
            }
            return;
        }
        for choice in &chunk.choices {
            if let Some(reason) = &choice.finish_reason {
                finish_reason = Some(reason.to_string());
            }
            if let Some(delta) = &choice.delta
                && delta.role.is_none()
                && let Some(text) = &delta.content
            {
                reader.token(seq, Some(text), chunk.emitted_at_unix_nanos, recv);
            }
        }
    })
    .await;
    let ok = counted(stats, end);
    if ok && reader.has_terminal() && !done_marker && finish_reason.is_some() {
        reader.violation(Violation::MissingDone, || "no data: [DONE]".to_owned());
    }
    let end = finish(reader, stats, ok);
    Ended {
        ok: ok && end.terminal,
        completed: end.completed,
    }
}
