//! Native stream control: `POST /v1/streams` (201 with URLs, or POST-SSE) and
//! `DELETE /v1/streams/{id}`.

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::{
    auth,
    error::ApiError,
    request::{StreamRequest, read_json},
    state::AppState,
    stream::StreamStatus,
    tenant::Caller,
    transports::{
        request_span,
        sse::{self, NativeFramer},
    },
};

/// `POST /v1/streams`.
pub async fn create(
    State(app): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    expires: Option<axum::Extension<auth::CredentialExpiry>>,
    body: Body,
) -> Result<Response, ApiError> {
    let request: StreamRequest = read_json(&headers, body, app.config.http.max_body_bytes).await?;
    let spec = request.validate(&app.config.streams)?;
    let span = request_span(&headers, "POST /v1/streams");
    let sse = wants_sse(&headers);
    let transport = if sse { "post_sse" } else { "native" };
    let stream = app.create_stream(&caller, spec, &span, transport).await?;
    let ticket = app.security.ticket_for(&stream);
    if sse {
        let sub = stream.subscribe(0)?;
        let expires = expires.map(|axum::Extension(e)| e);
        let mut response = sse::response_until(&app, sub, NativeFramer, "post_sse", expires);
        let out = response.headers_mut();
        app.security
            .add_ticket_headers(ticket.as_ref(), &stream, &headers, out);
        return Ok(response);
    }
    let id = stream.id.as_str();
    let mut body = serde_json::json!({
        "id": id,
        "status": stream.status().as_str(),
        "urls": {
            "events": format!("/v1/streams/{id}/events"),
            "poll": format!("/v1/streams/{id}/poll"),
            "status": format!("/v1/streams/{id}"),
            "ws": "/v1/ws",
        },
    });
    if let Some(ticket) = &ticket {
        body["ticket"] = ticket.token.clone().into();
        body["ticket_expires_at"] = ticket.expires_at.into();
    }
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    app.security
        .add_ticket_headers(ticket.as_ref(), &stream, &headers, response.headers_mut());
    if let Ok(v) = id.parse() {
        response.headers_mut().insert("x-stream-id", v);
    }
    if let Ok(v) = format!("/v1/streams/{id}").parse() {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| {
            m.split(';')
                .next()
                .is_some_and(|m| m.trim() == "text/event-stream")
        })
}

/// `DELETE /v1/streams/{id}`: 202 when it stopped a running stream, 200 when it had ended.
pub async fn stop(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stream = app.stream_to_manage(&caller, &id).await?;
    let (code, status) = if stream.status() == StreamStatus::Running {
        (StatusCode::ACCEPTED, app.hub.cancel(&stream).await?)
    } else {
        (StatusCode::OK, stream.status())
    };
    let body = serde_json::json!({"stream_id": stream.id.as_str(), "status": status.as_str()});
    Ok((code, Json(body)).into_response())
}

/// `POST /v1/streams/{id}/ticket`: a fresh ticket for reading one of the caller's streams
/// (e.g. when the one from creation expired). 404 when authentication is off.
pub async fn ticket(
    State(app): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stream = app.stream_to_manage(&caller, &id).await?;
    let Some(ticket) = app.security.ticket_for(&stream) else {
        return Err(ApiError::TicketsDisabled);
    };
    let body = serde_json::json!({
        "stream_id": stream.id.as_str(),
        "ticket": ticket.token,
        "ticket_expires_at": ticket.expires_at,
    });
    let mut response = (StatusCode::OK, Json(body)).into_response();
    app.security
        .add_ticket_headers(Some(&ticket), &stream, &headers, response.headers_mut());
    Ok(response)
}
