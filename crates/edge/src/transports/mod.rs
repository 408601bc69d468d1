//! Transports: each turns hub subscriptions into one wire format and nothing more; here, what
//! they share (the poll body, the connection metrics guard, the request span).

pub mod eventsource;
pub mod longpoll;
pub mod native;
pub mod openai;
pub mod shortpoll;
pub mod sse;
pub mod ws;

use std::sync::Arc;

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::{BufMut as _, BytesMut};

use crate::{event::Event, stream::StreamStatus};

/// The poll answer `{"stream_id","status","events":[…],"next_after"}`, written from the
/// events' cached JSON (no re-serialization).
pub(crate) fn poll_body(
    stream_id: &str,
    status: StreamStatus,
    events: &[Arc<Event>],
    after: u64,
) -> Response {
    let next_after = events.last().map_or(after, |e| e.seq);
    let mut b = BytesMut::with_capacity(96 + events.iter().map(|e| e.size() + 1).sum::<usize>());
    b.put_slice(b"{\"stream_id\":\"");
    b.put_slice(stream_id.as_bytes());
    b.put_slice(b"\",\"status\":\"");
    b.put_slice(status.as_str().as_bytes());
    b.put_slice(b"\",\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            b.put_u8(b',');
        }
        b.put_slice(e.json());
    }
    b.put_slice(b"],\"next_after\":");
    b.put_slice(next_after.to_string().as_bytes());
    b.put_u8(b'}');
    let mut r = b.freeze().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Counts an open streaming response or socket in `tokenfan_edge_connections{transport}` and
/// its delivered events in `tokenfan_edge_events_delivered_total{transport}`.
pub(crate) struct TransportGuard {
    gauge: metrics::Gauge,
    delivered: metrics::Counter,
}

impl TransportGuard {
    /// Counts one more open connection of `transport`.
    pub(crate) fn new(transport: &'static str) -> Self {
        let gauge = metrics::gauge!("tokenfan_edge_connections", "transport" => transport);
        gauge.increment(1.0);
        Self {
            gauge,
            delivered: metrics::counter!(
                "tokenfan_edge_events_delivered_total", "transport" => transport
            ),
        }
    }

    /// Counts delivered events.
    pub(crate) fn delivered(&self, n: usize) {
        self.delivered.increment(n as u64);
    }
}

impl Drop for TransportGuard {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// The request span for a stream-starting request, continuing the caller's `traceparent`.
pub(crate) fn request_span(headers: &axum::http::HeaderMap, route: &'static str) -> tracing::Span {
    let span = tracing::info_span!("http.request", otel.name = route, otel.kind = "server");
    tokenfan_telemetry::propagation::set_parent(
        &span,
        tokenfan_telemetry::propagation::extract_http(headers),
    );
    span
}
