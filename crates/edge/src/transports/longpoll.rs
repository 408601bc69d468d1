//! Long-poll: `GET /v1/streams/{id}/poll?after=N&timeout_ms=T` answers at once when events
//! after N exist, else waits for the next ones or the timeout (then an empty batch).

use std::time::Duration;

use axum::{
    extract::{Path, Query, State, rejection::QueryRejection},
    response::Response,
};
use serde::Deserialize;

use crate::{
    error::ApiError,
    state::AppState,
    stream::StreamStatus,
    tenant::Caller,
    transports::{TransportGuard, poll_body, sse::after_cursor},
};

/// Default wait when the client gives no `timeout_ms`.
const DEFAULT_TIMEOUT_MS: u64 = 25_000;

/// Query of a long-poll.
#[derive(Debug, Deserialize)]
pub struct PollQuery {
    /// Events after this seq (default 0).
    pub after: Option<String>,
    /// Longest wait in ms (default 25 000, capped by configuration).
    pub timeout_ms: Option<String>,
}

/// `GET /v1/streams/{id}/poll`.
pub async fn poll(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let stream = app.stream_for(&caller, &id).await?;
    let after = after_cursor(query.after.as_deref())?;
    let max = app.config.http.longpoll_max_ms;
    let timeout_ms = match query.timeout_ms.as_deref() {
        None => DEFAULT_TIMEOUT_MS.min(max),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms <= max => ms,
            _ => {
                return Err(ApiError::invalid_field(
                    "timeout_ms",
                    format!("{v:?} is not an integer in 0..={max}"),
                ));
            }
        },
    };
    let guard = TransportGuard::new("longpoll");
    // Polling keeps a stream alive like an attached subscriber.
    stream.touch();
    // Whatever exists after the cursor answers at once (no coalescing: polls replay history).
    let (status, mut events) = stream.events_after(after)?;
    if events.is_empty() && status == StreamStatus::Running {
        // Nothing yet: wait for the next events, counted as attached while waiting.
        let mut sub = stream.subscribe(after)?;
        let wait = Duration::from_millis(timeout_ms);
        tokio::select! {
            r = tokio::time::timeout(wait, sub.next_batch()) => {
                // A timeout answers with an empty batch.
                if let Ok(Ok(batch)) = r {
                    events = batch;
                }
            }
            () = app.shutdown().cancelled() => {}
        }
    }
    guard.delivered(events.len());
    let status = match events.last() {
        Some(e) if e.is_terminal() => StreamStatus::of(e),
        Some(_) => StreamStatus::Running,
        None => stream.status(),
    };
    Ok(poll_body(stream.id.as_str(), status, &events, after))
}
