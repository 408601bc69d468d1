//! `GET /v1/streams/{id}/events`: EventSource-friendly SSE with `Last-Event-ID` resume, in the
//! native format or (`?format=openai`) as Chat Completions chunks.

use axum::{
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use crate::{
    auth,
    error::ApiError,
    observability::{Resume, ResumeResult, requested_cursor},
    state::AppState,
    tenant::Caller,
    transports::{
        openai::{OpenAiFramer, OpenAiFraming},
        sse::{NativeFramer, parse_cursor, response_until},
    },
};

/// Query of `GET /v1/streams/{id}/events`.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Resume after this seq (`Last-Event-ID` wins).
    pub after: Option<String>,
    /// `openai` replays as Chat Completions chunks.
    pub format: Option<String>,
    /// With `format=openai`: `true` adds the usage chunk at the end.
    pub include_usage: Option<bool>,
}

/// The cursor of a `GET …/events`: `Last-Event-ID` (when not blank), else `?after=`, else 0.
fn cursor(headers: &HeaderMap, after: Option<&str>) -> Result<u64, ApiError> {
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::InvalidCursor("Last-Event-ID is not text".into()))
        })
        .transpose()?
        .filter(|v| !v.trim().is_empty());
    match (last_event_id, after) {
        (Some(v), _) => parse_cursor("Last-Event-ID", v),
        (None, Some(v)) => parse_cursor("after", v),
        (None, None) => Ok(0),
    }
}

/// The event format of a `GET …/events` (`?format=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Native events (the default).
    Native,
    /// Chat Completions chunks.
    OpenAi,
}

impl Format {
    fn of(format: Option<&str>) -> Result<Self, ApiError> {
        match format {
            None | Some("native") => Ok(Self::Native),
            Some("openai") => Ok(Self::OpenAi),
            Some(other) => Err(ApiError::invalid_field(
                "format",
                format!("{other:?} is not one of native, openai"),
            )),
        }
    }
}

/// `GET /v1/streams/{id}/events`: EventSource-friendly SSE with resume.
pub async fn events(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
    expires: Option<axum::Extension<auth::CredentialExpiry>>,
) -> Result<Response, ApiError> {
    let expires = expires.map(|axum::Extension(e)| e);
    let Query(query) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    // A request naming a cursor is a resume: counted and traced whatever its result.
    let resume = |after: u64, replayed: u64, result: ResumeResult| Resume {
        transport: "sse",
        stream_id: &id,
        after,
        replayed,
        result,
    };
    let stream = match app.stream_for(&caller, &id).await {
        Ok(stream) => stream,
        Err(e) => {
            if let Some(after) = requested_cursor(&headers, query.after.as_deref()) {
                resume(after, 0, ResumeResult::of_error(&e)).record(
                    app.hub.replica(),
                    Some(&headers),
                    None,
                );
            }
            return Err(e);
        }
    };
    let record = |after: u64, replayed: u64, result: ResumeResult| {
        if after > 0 {
            resume(after, replayed, result).record(
                app.hub.replica(),
                Some(&headers),
                Some(&stream),
            );
        }
    };
    let after = cursor(&headers, query.after.as_deref())?;
    let format = Format::of(query.format.as_deref())?;
    // Positioned at or past the end: 204 tells EventSource to stop reconnecting.
    if stream.ended_at().is_some() && after >= stream.last_seq() {
        if after > stream.last_seq() {
            record(after, 0, ResumeResult::Invalid);
            return Err(ApiError::CursorOutOfRange {
                after,
                last: stream.last_seq(),
            });
        }
        record(after, 0, ResumeResult::Finished);
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let sub = stream.subscribe(after).inspect_err(|e| {
        record(after, 0, ResumeResult::of_error(e));
    })?;
    let backlog = sub.backlog_end();
    record(
        after,
        backlog.saturating_sub(after),
        ResumeResult::of_subscription(&stream, after, backlog),
    );
    Ok(if format == Format::OpenAi {
        let framing = OpenAiFraming {
            role_chunk: after == 0,
            retry_hint: true,
            include_usage: query.include_usage.unwrap_or(false),
        };
        let framer = OpenAiFramer::new(&stream, framing);
        response_until(&app, sub, framer, "sse", expires)
    } else {
        response_until(&app, sub, NativeFramer, "sse", expires)
    })
}
