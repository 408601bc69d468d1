//! Errors as clients see them: one type, one mapping to the wire.
//!
//! Every refusal carries an HTTP status, a stable machine tag (`code`) and a message saying
//! what is wrong. Native endpoints answer `{"error":{"code","message"}}`; the OpenAI endpoint
//! wraps the same error in OpenAI's shape with [`OpenAiError`]; WebSocket and SSE turn it into
//! error events. Internal causes are logged where they happen, never returned.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

/// A refusal with its status, tag and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine tag.
    pub code: &'static str,
    /// What is wrong, for people.
    pub message: String,
    /// The request field at fault, when there is one (OpenAI's `param`).
    pub param: Option<String>,
    /// Seconds to wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 400 with a specific tag.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `invalid_request` about one field.
    pub fn invalid_field(field: &str, message: impl std::fmt::Display) -> Self {
        let mut e = Self::bad_request("invalid_request", format!("{field}: {message}"));
        e.param = Some(field.to_string());
        e
    }

    /// 404 for a stream id that is unknown, malformed, or not the caller's.
    pub fn stream_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "stream_not_found", "no such stream")
    }

    /// 404 for an unknown model.
    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("the model {model:?} does not exist; GET /v1/models lists the models"),
        );
        e.param = Some("model".into());
        e
    }

    /// 410: the events a cursor needs are gone (`after` = the first seq that is missing
    /// minus one, or 0 when the whole history expired).
    pub fn history_expired(after: u64) -> Self {
        Self::new(
            StatusCode::GONE,
            "history_expired",
            format!("the stream's history after seq {after} is no longer kept; start a new stream"),
        )
    }

    /// 400: a cursor past the stream's end (or past what exists).
    pub fn cursor_out_of_range(after: u64, last: u64) -> Self {
        Self::bad_request(
            "cursor_out_of_range",
            format!("after={after} is beyond the last event of the stream (seq {last})"),
        )
    }

    /// 413: body over the limit.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds {limit} bytes"),
        )
    }

    /// 415: not JSON.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON (Content-Type: application/json)",
        )
    }

    /// 401: no usable credentials, or credentials that did not verify (`code` says which:
    /// `missing_credentials`, `invalid_credentials`, `expired_credentials`,
    /// `invalid_ticket`, `expired_ticket`). Answered with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 403: authenticated, but not allowed to do this (`code` says why).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 429: a per-tenant or per-address limit; retry after `retry_after` seconds.
    pub fn rate_limited(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        e.retry_after = Some(retry_after.max(1));
        e
    }

    /// 408: the request body did not arrive in time.
    pub fn body_timeout(secs: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {secs} s"),
        )
    }

    /// 503: this replica cannot take more streams now.
    pub fn capacity(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "capacity", message);
        e.retry_after = Some(1);
        e
    }

    /// 503: a dependency is down.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message);
        e.retry_after = Some(1);
        e
    }

    /// 500 for causes that are logged, not shown.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; it has been logged",
        )
    }

    /// The native JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }

    fn finish(&self, mut response: Response) -> Response {
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6750: a missing credential gets the bare challenge; a bad one says so.
            let challenge = if self.code == "missing_credentials" {
                r#"Bearer realm="tokenfan""#
            } else {
                r#"Bearer realm="tokenfan", error="invalid_token""#
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let response = (self.status, Json(self.body())).into_response();
        self.finish(response)
    }
}

/// The same error in the OpenAI API's shape:
/// `{"error":{"message","type","param","code"}}`.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl OpenAiError {
    /// The OpenAI error object (also sent as `data: {"error":…}` mid-stream).
    pub fn body(&self) -> serde_json::Value {
        let e = &self.0;
        // As the real API answers: 401 `invalid_request_error` / `invalid_api_key`, 429
        // `requests` / `rate_limit_exceeded` (SDKs branch on these); the edge's own tag is
        // then in the message.
        let (kind, code, message) = match e.status.as_u16() {
            401 => (
                "invalid_request_error",
                "invalid_api_key",
                format!("{} ({})", e.message, e.code),
            ),
            429 => (
                "requests",
                "rate_limit_exceeded",
                format!("{} ({})", e.message, e.code),
            ),
            403 => ("permission_error", e.code, e.message.clone()),
            s if s >= 500 => ("server_error", e.code, e.message.clone()),
            _ => ("invalid_request_error", e.code, e.message.clone()),
        };
        json!({"error": {"message": message, "type": kind, "param": e.param, "code": code}})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let response = (self.0.status, Json(self.body())).into_response();
        self.0.finish(response)
    }
}
