//! The request body deadline: a body is read whole, within `--body-read-timeout-secs` and
//! `--max-body-bytes`, before the handler runs.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, header},
    middleware::Next,
    response::Response,
};

use crate::{error::ApiError, routes};

/// How much body a request may send, and how fast.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyDeadline {
    /// Largest body, in bytes (`--max-body-bytes`).
    pub max_bytes: usize,
    /// Time to send it whole (`--body-read-timeout-secs`).
    pub timeout: Duration,
}

/// Middleware: reads a POST/PUT/PATCH body whole within the deadline and the size limit
/// before the handler runs (408 / 413 otherwise, and the connection is closed), so a client
/// trickling a body cannot hold a handler.
pub(crate) async fn body_deadline(
    State(deadline): State<BodyDeadline>,
    request: Request,
    next: Next,
) -> Response {
    if !matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    ) {
        return next.run(request).await;
    }
    let limit = deadline.max_bytes;
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, limit);
    let error = match tokio::time::timeout(deadline.timeout, read).await {
        Ok(Ok(bytes)) => {
            return next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
        }
        Ok(Err(err)) if too_large(&err) => ApiError::BodyTooLarge(limit),
        Ok(Err(_)) => ApiError::InvalidBody,
        Err(_) => {
            metrics::counter!("tokenfan_edge_body_timeouts_total").increment(1);
            ApiError::BodyTimeout(deadline.timeout.as_secs())
        }
    };
    let mut response = routes::error_response(parts.uri.path(), error);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn too_large(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}
