//! What the edge tells operators, in one place: the Prometheus series it exports (described
//! and registered at start-up, so every series is on `/metrics` from the first scrape), the
//! delivered inter-token gap meter, and the spans that join a stream's trace on any replica
//! (resume, cancel; the owner's and the mirror's spans live in `owner.rs` and `mirror.rs`).
//!
//! `docs/operations.md` (sections Metrics and Traces) documents every name used here.

use std::{sync::Arc, time::Instant};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use tokenfan_telemetry::propagation;

use crate::{error::ApiError, event::Event, stream::StreamState};

/// Transports that hold a connection open (the `transport` label of the connection gauge, the
/// gap histogram and the delivered-events counter; short-poll only delivers).
pub(crate) const STREAMING_TRANSPORTS: &[&str] = &["sse", "post_sse", "openai", "ws", "longpoll"];

/// Transports whose subscriptions time their inter-token gaps (the polls answer per request).
pub(crate) const GAP_TRANSPORTS: &[&str] = &["sse", "post_sse", "openai", "ws"];

/// Every edge metric: its kind, name and help text (histograms are in seconds).
const METRICS: &[(Kind, &str, &str)] = &[
    (
        Kind::Gauge,
        "tokenfan_edge_connections",
        "Open streaming responses and WebSockets, by transport.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_connections_refused_total",
        "TCP connections refused because the replica was at --max-connections.",
    ),
    (
        Kind::Gauge,
        "tokenfan_edge_streams_active",
        "Running streams this replica owns (runs the generator call for).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_streams_total",
        "Streams that ended on this replica's owner task, by outcome (done, cancelled, error).",
    ),
    (
        Kind::Histogram,
        "tokenfan_edge_time_to_first_token_seconds",
        "From the owner task's start to the first token batch it received from the generator.",
    ),
    (
        Kind::Histogram,
        "tokenfan_edge_inter_token_gap_seconds",
        "Time between two consecutive live writes carrying tokens to one subscriber, by transport.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_events_delivered_total",
        "Stream events handed to clients, by transport (a coalesced event counts once).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_coalesced_events_total",
        "Token events joined into coalesced events for subscribers that fell behind.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_slow_consumer_closes_total",
        "Subscriptions closed with slow_consumer (more than --subscriber-max-bytes behind).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_resumes_total",
        "SSE and WebSocket subscriptions that named a cursor (Last-Event-ID, after > 0), by result.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_owner_failovers_total",
        "Streams this replica took over after their owner's lease lapsed.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_generator_retries_total",
        "Generator calls resumed on the next generator after a retryable failure.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_owner_releases_total",
        "Owners that stopped without a terminal event, by reason: fenced (another replica claimed the stream), unproven (the store did not confirm the lease for a lease TTL), handover (shutdown).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_store_heals_total",
        "Histories written back into a store that had lost part of them (an owner's write, or a Redis restart seen by its run_id).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_backend_errors_total",
        "Failed NATS or Redis operations (and undecodable messages), by backend (nats, redis).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_bus_gaps_total",
        "Bus batches that skipped seqs on arrival (the mirror refilled from the store).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_bus_dropped_batches_total",
        "Bus batches dropped before reaching a mirror (full feed or NATS slow consumer).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_connections_refused_per_ip_total",
        "TCP connections refused because their address held --max-connections-per-ip.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_auth_refusals_total",
        "Requests refused by authentication (401/403), by error code.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_rate_limited_total",
        "Stream creations refused by a tenant limit (429), by limit (rate, concurrent).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_body_timeouts_total",
        "Requests answered 408 because their body did not arrive within --body-read-timeout-secs.",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_write_timeouts_total",
        "Connections closed because a write made no progress for --write-timeout-secs, by transport (http, ws).",
    ),
    (
        Kind::Counter,
        "tokenfan_edge_credentials_expired_total",
        "Streaming responses and WebSockets ended because their JWT or ticket expired, by transport.",
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Describes every edge metric and registers its series at zero. Call once the Prometheus
/// recorder is installed.
pub(crate) fn register_metrics() {
    for (kind, name, help) in METRICS {
        match kind {
            Kind::Counter => describe_counter!(*name, *help),
            Kind::Gauge => describe_gauge!(*name, *help),
            Kind::Histogram => describe_histogram!(*name, Unit::Seconds, *help),
        }
    }
    register_series();
}

/// Creates every series a dashboard reads at zero, so it exists before its first event.
fn register_series() {
    for transport in STREAMING_TRANSPORTS {
        metrics::gauge!("tokenfan_edge_connections", "transport" => *transport).increment(0.0);
    }
    // Creating a histogram's handle registers it (empty buckets until the first sample).
    for transport in GAP_TRANSPORTS {
        let _ =
            metrics::histogram!("tokenfan_edge_inter_token_gap_seconds", "transport" => *transport);
    }
    let _ = metrics::histogram!("tokenfan_edge_time_to_first_token_seconds");
    for transport in STREAMING_TRANSPORTS.iter().chain(&["shortpoll"]) {
        metrics::counter!("tokenfan_edge_events_delivered_total", "transport" => *transport)
            .absolute(0);
    }
    for outcome in ["done", "cancelled", "error"] {
        metrics::counter!("tokenfan_edge_streams_total", "outcome" => outcome).absolute(0);
    }
    for result in ResumeResult::ALL {
        metrics::counter!("tokenfan_edge_resumes_total", "result" => result.as_str()).absolute(0);
    }
    for backend in ["nats", "redis"] {
        metrics::counter!("tokenfan_edge_backend_errors_total", "backend" => backend).absolute(0);
    }
    for reason in ["fenced", "unproven", "handover"] {
        metrics::counter!("tokenfan_edge_owner_releases_total", "reason" => reason).absolute(0);
    }
    for name in [
        "tokenfan_edge_connections_refused_total",
        "tokenfan_edge_coalesced_events_total",
        "tokenfan_edge_slow_consumer_closes_total",
        "tokenfan_edge_owner_failovers_total",
        "tokenfan_edge_generator_retries_total",
        "tokenfan_edge_store_heals_total",
        "tokenfan_edge_bus_gaps_total",
        "tokenfan_edge_bus_dropped_batches_total",
        "tokenfan_edge_connections_refused_per_ip_total",
        "tokenfan_edge_body_timeouts_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for limit in ["rate", "concurrent"] {
        metrics::counter!("tokenfan_edge_rate_limited_total", "limit" => limit).absolute(0);
    }
    // `increment(0)`: create the series without resetting a count another edge of this
    // process (tests, embedding) already has.
    metrics::counter!("tokenfan_edge_rate_limited_total", "limit" => "ws_messages").increment(0);
    for transport in ["http", "ws"] {
        metrics::counter!("tokenfan_edge_write_timeouts_total", "transport" => transport)
            .increment(0);
    }
    for transport in ["sse", "ws"] {
        metrics::counter!("tokenfan_edge_credentials_expired_total", "transport" => transport)
            .increment(0);
    }
    metrics::gauge!("tokenfan_edge_streams_active").increment(0.0);
}

/// Measures `tokenfan_edge_inter_token_gap_seconds{transport}` for one subscription: one
/// clock read and at most one sample per write batch, never per token.
///
/// A sample is the time since the previous batch carrying tokens was handed to the client's
/// connection; history replayed at subscribe time is not timed (it goes out back to back),
/// but the wait from the end of a replay to the first live token is.
pub(crate) struct GapMeter {
    histogram: metrics::Histogram,
    last: Option<Instant>,
}

impl GapMeter {
    /// A meter for one subscription of `transport`.
    pub(crate) fn new(transport: &'static str) -> Self {
        Self {
            histogram: metrics::histogram!(
                "tokenfan_edge_inter_token_gap_seconds", "transport" => transport
            ),
            last: None,
        }
    }

    /// Notes a batch about to be written; `backlog_end` is the subscription's
    /// [`crate::stream::Subscription::backlog_end`].
    pub(crate) fn batch(&mut self, batch: &[Arc<Event>], backlog_end: u64) {
        // Tokens come before the terminal event: a batch without one first has no token.
        let Some(first) = batch.first().filter(|e| e.text().is_some()) else {
            return;
        };
        let now = Instant::now();
        if first.seq > backlog_end
            && let Some(last) = self.last
        {
            self.histogram
                .record(now.duration_since(last).as_secs_f64());
        }
        self.last = Some(now);
    }
}

/// How a subscription that named a cursor went (`tokenfan_edge_resumes_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResumeResult {
    /// History after the cursor was waiting and is replayed.
    Replayed,
    /// Nothing was waiting: the subscriber continues live (at the tail, or ahead of this
    /// replica and waiting for the events after its cursor).
    Live,
    /// The stream had ended and the cursor was at its terminal event: nothing left to send
    /// (SSE answers 204 so EventSource stops reconnecting).
    Finished,
    /// The history is gone (410 `history_expired`).
    Expired,
    /// No such stream (404).
    Unknown,
    /// The cursor is past the end of the stream (400 `cursor_out_of_range`).
    Invalid,
    /// The stream could not be looked up (503: the store is unreachable).
    Error,
}

impl ResumeResult {
    /// Every result, for registering the series.
    pub(crate) const ALL: [ResumeResult; 7] = [
        ResumeResult::Replayed,
        ResumeResult::Live,
        ResumeResult::Finished,
        ResumeResult::Expired,
        ResumeResult::Unknown,
        ResumeResult::Invalid,
        ResumeResult::Error,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ResumeResult::Replayed => "replayed",
            ResumeResult::Live => "live",
            ResumeResult::Finished => "finished",
            ResumeResult::Expired => "expired",
            ResumeResult::Unknown => "unknown",
            ResumeResult::Invalid => "invalid",
            ResumeResult::Error => "error",
        }
    }

    /// The result of a resume refused with `error`.
    pub(crate) fn of_error(error: &ApiError) -> Self {
        match error {
            ApiError::HistoryExpired(_) => ResumeResult::Expired,
            ApiError::StreamNotFound => ResumeResult::Unknown,
            ApiError::CursorOutOfRange { .. } => ResumeResult::Invalid,
            _ => ResumeResult::Error,
        }
    }

    /// The result of a subscription from `after` that starts with `backlog_end` (the last
    /// seq it found).
    pub(crate) fn of_subscription(stream: &StreamState, after: u64, backlog_end: u64) -> Self {
        if backlog_end > after {
            ResumeResult::Replayed
        } else if stream.ended_at().is_some() {
            ResumeResult::Finished
        } else {
            ResumeResult::Live
        }
    }
}

/// One resume: what the client asked for and what it got.
pub(crate) struct Resume<'a> {
    /// `sse` or `ws`.
    pub transport: &'static str,
    /// The stream id as the client sent it.
    pub stream_id: &'a str,
    /// The client's cursor (> 0).
    pub after: u64,
    /// Events waiting after the cursor when it subscribed.
    pub replayed: u64,
    /// How it went.
    pub result: ResumeResult,
}

impl Resume<'_> {
    /// Counts the resume and emits its `tokenfan.stream.resume` span (an instant). The span's
    /// parent is the request's `traceparent` when it has one (then it links to the stream's
    /// trace), else the stream's own trace when this replica knows it.
    pub(crate) fn record(
        self,
        replica: &str,
        request: Option<&http::HeaderMap>,
        stream: Option<&StreamState>,
    ) {
        metrics::counter!("tokenfan_edge_resumes_total", "result" => self.result.as_str())
            .increment(1);
        let span = tracing::info_span!(
            parent: None,
            "stream.resume",
            otel.name = "tokenfan.stream.resume",
            stream_id = self.stream_id,
            transport = self.transport,
            after = self.after as i64,
            replayed = self.replayed as i64,
            result = self.result.as_str(),
            replica,
        );
        let request = request
            .map(propagation::extract_http)
            .filter(propagation::is_valid);
        let stream = stream
            .and_then(StreamState::traceparent)
            .map(|tp| propagation::from_traceparent(&tp));
        match (request, stream) {
            (Some(request), stream) => {
                propagation::set_parent(&span, request);
                if let Some(stream) = stream {
                    propagation::add_link(&span, &stream);
                }
            }
            (None, Some(stream)) => propagation::set_parent(&span, stream),
            (None, None) => {}
        }
    }
}

/// Makes `span` (created with `parent: None`, not yet entered) a child of the stream's
/// owner span when this replica knows it.
pub(crate) fn join_stream_trace(span: &tracing::Span, stream: &StreamState) {
    if let Some(tp) = stream.traceparent() {
        propagation::set_parent(span, propagation::from_traceparent(&tp));
    }
}

/// The cursor a streaming request names, read leniently (for counting resumes before the
/// strict parse, which answers bad values with 400): `Last-Event-ID` wins over `after`;
/// absent, empty, unparsable or 0 is no resume.
pub(crate) fn requested_cursor(headers: &http::HeaderMap, after: Option<&str>) -> Option<u64> {
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    last_event_id
        .or(after)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{event::EventKind, ids::StreamId, stream::SubscriberLimits};

    fn token(seq: u64) -> Arc<Event> {
        Arc::new(Event::new(seq, EventKind::Token { text: "x".into() }))
    }

    #[test]
    fn cursors_are_read_like_the_sse_handler_reads_them() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(requested_cursor(&headers, None), None);
        assert_eq!(requested_cursor(&headers, Some("0")), None);
        assert_eq!(requested_cursor(&headers, Some("7")), Some(7));
        assert_eq!(requested_cursor(&headers, Some("x")), None);
        headers.insert("last-event-id", "12".parse().expect("header"));
        assert_eq!(requested_cursor(&headers, Some("7")), Some(12));
        headers.insert("last-event-id", " ".parse().expect("header"));
        assert_eq!(requested_cursor(&headers, Some("7")), Some(7));
    }

    #[test]
    fn subscriptions_are_classified_by_what_was_waiting() {
        let limits = SubscriberLimits {
            queue: 8,
            max_bytes: 1 << 20,
        };
        let s = StreamState::new(StreamId::random(), "tokenfan-mock", limits, 100);
        s.publish(&[token(1), token(2)]);
        assert_eq!(
            ResumeResult::of_subscription(&s, 1, 2),
            ResumeResult::Replayed
        );
        assert_eq!(ResumeResult::of_subscription(&s, 2, 2), ResumeResult::Live);
        assert_eq!(ResumeResult::of_subscription(&s, 5, 2), ResumeResult::Live);
        assert_eq!(
            ResumeResult::of_error(&ApiError::HistoryExpired(3)),
            ResumeResult::Expired
        );
        assert_eq!(
            ResumeResult::of_error(&ApiError::StreamNotFound),
            ResumeResult::Unknown
        );
    }

    #[test]
    fn the_gap_meter_times_live_token_batches_only() {
        let mut meter = GapMeter::new("sse");
        meter.batch(&[token(1), token(2)], 2);
        assert!(meter.last.is_some(), "a replayed batch starts the clock");
        let terminal = Arc::new(Event::new(
            3,
            EventKind::Error {
                code: "x",
                message: String::new(),
            },
        ));
        let before = meter.last;
        meter.batch(&[terminal], 2);
        assert_eq!(
            meter.last, before,
            "a batch without tokens is not a token write"
        );
    }
}
