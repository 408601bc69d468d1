//! Server-sent events: the response body shared by `GET …/events`
//! ([`super::eventsource`]), the POST-SSE of `POST /v1/streams` and the OpenAI stream.
//!
//! A [`Framer`] turns events into bytes (native frames are the events' cached SSE bytes; the
//! OpenAI framer builds chunks). Everything a subscription has ready goes out as one chunk.

use std::{convert::Infallible, time::Duration};

use axum::{
    body::Body,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::{
    auth,
    error::ApiError,
    event::Event,
    observability::GapMeter,
    state::AppState,
    stream::{Closed, Quiet, Subscription},
    transports::TransportGuard,
};

/// The reconnection delay EventSource is told to use.
pub(crate) const RETRY: &[u8] = b"retry: 1000\n\n";

/// Turns a subscription's events into SSE bytes.
pub trait Framer: Send + 'static {
    /// Bytes before the first event.
    fn start(&mut self, out: &mut BytesMut);
    /// One event.
    fn event(&mut self, event: &Event, out: &mut BytesMut);
    /// The subscription ended.
    fn closed(&mut self, reason: Closed, out: &mut BytesMut);
    /// The response ends before the stream did (server shutdown): what tells the client so.
    /// Native SSE says nothing (EventSource reconnects and resumes by itself).
    fn interrupted(&mut self, _out: &mut BytesMut) {}
    /// The credential or ticket the response was opened with expired: the last bytes.
    fn credentials_expired(&mut self, out: &mut BytesMut) {
        ApiError::CredentialsExpired(
            "the credential or ticket this stream was opened with has expired; reconnect with \
             a fresh one (resume with Last-Event-ID or ?after=)",
        )
        .write_sse(out);
    }
}

/// Native framing: `retry:` then `id:`/`event:`/`data:` frames.
pub(crate) struct NativeFramer;

impl Framer for NativeFramer {
    fn start(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(RETRY);
    }

    fn event(&mut self, event: &Event, out: &mut BytesMut) {
        out.extend_from_slice(event.sse());
    }

    fn closed(&mut self, reason: Closed, out: &mut BytesMut) {
        if let Closed::SlowConsumer { last_seq } = reason {
            // Not a stream event (no id, no seq): EventSource reconnects with its
            // Last-Event-ID; fetch clients resume with GET …/events?after=<last_seq>.
            ApiError::SlowConsumer(format!(
                "the client fell too far behind; resume after seq {last_seq}"
            ))
            .write_sse(out);
        }
    }
}

/// A streaming SSE response over `sub`, ending at the terminal event, on a slow-consumer
/// close, or at server shutdown (the client then reconnects elsewhere).
pub fn response(
    app: &AppState,
    sub: Subscription,
    framer: impl Framer,
    transport: &'static str,
) -> Response {
    response_until(app, sub, framer, transport, None)
}

/// [`response`] that also ends when `expires` (the request's credential expiry) comes, with
/// the framer's `credentials_expired` bytes.
pub(crate) fn response_until(
    app: &AppState,
    sub: Subscription,
    mut framer: impl Framer,
    transport: &'static str,
    expires: Option<auth::CredentialExpiry>,
) -> Response {
    let guard = TransportGuard::new(transport);
    let heartbeat = Duration::from_secs(app.config.http.sse_heartbeat_secs);
    let shutdown = Quiet::new(app.shutdown().clone().cancelled_owned());
    let stream_id = sub.stream().id.to_string();
    let mut prelude = BytesMut::new();
    framer.start(&mut prelude);
    let state = SseBody {
        sub,
        framer,
        heartbeat: tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat),
        shutdown,
        prelude: Some(prelude.freeze()),
        expires: expires.map(|e| Box::pin(tokio::time::sleep_until(e.deadline()))),
        done: false,
        guard,
        gaps: GapMeter::new(transport),
    };
    let body = futures::stream::unfold(state, next_chunk);
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(&stream_id) {
        headers.insert("x-stream-id", v);
    }
    response
}

struct SseBody<F> {
    sub: Subscription,
    framer: F,
    heartbeat: tokio::time::Interval,
    /// Registered with the shutdown token once, polled again only when it wakes the task.
    shutdown: Quiet<WaitForCancellationFutureOwned>,
    prelude: Option<Bytes>,
    /// Fires when the credential the response was opened with expires.
    expires: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    done: bool,
    /// Counts this response in the connections gauge until the body is dropped.
    guard: TransportGuard,
    /// Times the gaps between token writes.
    gaps: GapMeter,
}

async fn next_chunk<F: Framer>(
    mut s: SseBody<F>,
) -> Option<(Result<Bytes, Infallible>, SseBody<F>)> {
    if s.done {
        return None;
    }
    let mut out = BytesMut::new();
    // The first chunk: the prelude and whatever is ready now. Later chunks wait for more
    // (`next_batch` looks at what is pending before it waits).
    let ready = s.prelude.take().map(|prelude| {
        out.extend_from_slice(&prelude);
        s.sub.try_batch()
    });
    let result = match ready {
        Some(r) => r,
        None => tokio::select! {
            r = s.sub.next_batch() => r,
            _ = s.heartbeat.tick() => {
                out.extend_from_slice(b": heartbeat\n\n");
                return Some((Ok(out.freeze()), s));
            }
            () = &mut s.shutdown => {
                s.framer.interrupted(&mut out);
                s.done = true;
                return (!out.is_empty()).then(|| (Ok(out.freeze()), s));
            }
            () = expiry(&mut s.expires) => {
                metrics::counter!("tokenfan_edge_credentials_expired_total", "transport" => "sse")
                    .increment(1);
                s.framer.credentials_expired(&mut out);
                s.done = true;
                return Some((Ok(out.freeze()), s));
            }
        },
    };
    match result {
        Ok(batch) => {
            s.guard.delivered(batch.len());
            s.gaps.batch(&batch, s.sub.backlog_end());
            for event in &batch {
                s.framer.event(event, &mut out);
            }
        }
        Err(reason) => {
            s.framer.closed(reason, &mut out);
            s.done = true;
        }
    }
    // Nothing to say at the end (the terminal event went out already): end the body without
    // an empty chunk, which HTTP/2 would send as an empty DATA frame (h2 clients count those
    // against a limit and drop the connection).
    if s.done && out.is_empty() {
        return None;
    }
    Some((Ok(out.freeze()), s))
}

/// Resolves when `expires` fires; never without one.
async fn expiry(expires: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match expires {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Parses a cursor from a query parameter or `Last-Event-ID`.
pub fn parse_cursor(name: &str, value: &str) -> Result<u64, ApiError> {
    value.trim().parse::<u64>().map_err(|_| {
        ApiError::InvalidCursor(format!(
            "{name}: {value:?} is not a non-negative integer seq"
        ))
    })
}

/// The `?after=` cursor of a poll: the seq to read after, 0 when absent.
pub(crate) fn after_cursor(after: Option<&str>) -> Result<u64, ApiError> {
    after.map_or(Ok(0), |v| parse_cursor("after", v))
}
