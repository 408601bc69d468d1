//! Short-poll: `GET /v1/streams/{id}?after=N` answers at once with the status and the events
//! after N.

use axum::{
    extract::{Path, Query, State, rejection::QueryRejection},
    response::Response,
};
use serde::Deserialize;

use crate::{
    error::ApiError,
    state::AppState,
    tenant::Caller,
    transports::{poll_body, sse::after_cursor},
};

/// Query of a short-poll.
#[derive(Debug, Deserialize)]
pub struct StatusQuery {
    /// Events after this seq (default 0).
    pub after: Option<String>,
}

/// `GET /v1/streams/{id}`.
pub async fn status(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let stream = app.stream_for(&caller, &id).await?;
    let after = after_cursor(query.after.as_deref())?;
    let (status, events) = stream.events_after(after)?;
    // A client polling the stream keeps it alive like an attached one.
    stream.touch();
    metrics::counter!("tokenfan_edge_events_delivered_total", "transport" => "shortpoll")
        .increment(events.len() as u64);
    Ok(poll_body(stream.id.as_str(), status, &events, after))
}
