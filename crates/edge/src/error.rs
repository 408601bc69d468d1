//! Errors as clients see them: one enum, one mapping to each wire format.
//!
//! Every refusal is an [`ApiError`] variant, which knows its HTTP status, its stable machine
//! tag ([`ApiError::code`], the `code` on the wire: docs/protocol.md lists them), its message,
//! the request field at fault and how long to wait before retrying. Each wire format has one
//! mapping here and nowhere else:
//!
//! - native JSON `{"error":{"code","message"}}`: [`ApiError::body`] and `IntoResponse`;
//! - the OpenAI shape `{"error":{"message","type","param","code"}}`: [`OpenAiError`];
//! - the SSE `error` event: [`ApiError::write_sse`];
//! - the WebSocket `error` message: [`ApiError::ws_message`].
//!
//! [`ErrorFormat`] picks between the two HTTP shapes. Internal causes are logged where they
//! happen, never returned.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::BytesMut;
use serde_json::json;

/// A refusal: what went wrong, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400 `invalid_request`: a field (or the request) is wrong.
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The field at fault (OpenAI's `param`).
        param: Option<String>,
    },
    /// 400 `invalid_json`: the body (or a WebSocket message) is not JSON.
    InvalidJson(String),
    /// 400 `invalid_query`: the query string does not parse.
    InvalidQuery(String),
    /// 400 `invalid_cursor`: `after` or `Last-Event-ID` is not a seq.
    InvalidCursor(String),
    /// 400 `invalid_body`: the request body could not be read.
    InvalidBody,
    /// 400 `cursor_out_of_range`: a cursor past the stream's end (or past what exists).
    CursorOutOfRange {
        /// The cursor asked for.
        after: u64,
        /// The stream's last seq.
        last: u64,
    },
    /// `websocket_required` with the upgrade rejection's status (400, 405, 426…).
    WebSocketRequired {
        /// The rejection's status.
        status: StatusCode,
        /// The rejection's text.
        message: String,
    },
    /// 408 `body_timeout`: the body did not arrive within this many seconds.
    BodyTimeout(u64),
    /// 413 `body_too_large`: the body exceeds this many bytes.
    BodyTooLarge(usize),
    /// 415 `unsupported_media_type`: the body is not JSON.
    UnsupportedMediaType,
    /// 401 `missing_credentials`.
    MissingCredentials,
    /// 401 `invalid_credentials`.
    InvalidCredentials(String),
    /// 401 `expired_credentials`.
    ExpiredCredentials(String),
    /// 401 `invalid_ticket`.
    InvalidTicket(String),
    /// 401 `expired_ticket`.
    ExpiredTicket,
    /// 401 `credentials_expired`: the credential a stream or socket was opened with expired
    /// while it was open (the message says how to go on).
    CredentialsExpired(&'static str),
    /// 403 `ticket_scope`: a ticket used for another stream, or to do more than read.
    TicketScope,
    /// 403 `origin_not_allowed`: a WebSocket from a browser page of another origin.
    OriginNotAllowed,
    /// 404 `not_found`: no such endpoint.
    NotFound,
    /// 404 `not_found`: a path the admin listener does not serve.
    AdminNotFound,
    /// 404 `not_found`: a ticket asked for while authentication is off.
    TicketsDisabled,
    /// 404 `stream_not_found`: unknown, malformed, or not the caller's.
    StreamNotFound,
    /// 404 `model_not_found`.
    ModelNotFound(String),
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 409 `already_subscribed` (WebSocket).
    AlreadySubscribed,
    /// 410 `history_expired`: the events after this seq are gone (0: the whole history).
    HistoryExpired(u64),
    /// 429 `rate_limited`: a tenant's stream rate, or a socket's message rate.
    RateLimited {
        /// Which limit, and what it is.
        message: String,
        /// Seconds to wait.
        retry_after: u64,
    },
    /// 429 `concurrency_limited`: a tenant's running streams.
    ConcurrencyLimited {
        /// What the limit is.
        message: String,
        /// Seconds to wait.
        retry_after: u64,
    },
    /// 429 `too_many_connections`: one address holds too many connections.
    TooManyConnections,
    /// 429 `too_many_subscriptions`: a socket follows this many streams already.
    TooManySubscriptions(usize),
    /// 429 `too_many_cancels`: a socket has this many cancels in flight already.
    TooManyCancels(usize),
    /// 400 `slow_consumer`: the client fell too far behind (the message says how to resume).
    SlowConsumer(String),
    /// 400 `stream_cancelled`: the stream a response follows was cancelled.
    StreamCancelled,
    /// 503 `stream_cancelled`: the stream was cancelled before a whole answer was ready.
    CancelledBeforeFinish,
    /// 400 `invalid_message`: a WebSocket message of the wrong shape.
    InvalidMessage(String),
    /// 400 `unknown_type`: a WebSocket message of an unknown `type`.
    UnknownType(String),
    /// 400 `unsupported_frame`: a binary WebSocket frame.
    UnsupportedFrame,
    /// 500 `internal`: causes that are logged, not shown.
    Internal,
    /// 503 `capacity`: this replica cannot take more streams or connections now.
    Capacity(String),
    /// 503 `store_unavailable`: stream history is unreachable.
    StoreUnavailable,
    /// 503 `store_unavailable`: the tenant limits' store is unreachable.
    LimitsUnavailable,
    /// 503 `server_shutdown`: the response was cut by a restart (the message says how to
    /// resume).
    ServerShutdown(String),
    /// 503: the generator failed a stream; `code` is the stream's terminal `error` code.
    GeneratorFailed {
        /// The terminal event's code (`generator_unavailable`, `invalid_request`, `internal`).
        code: &'static str,
        /// The terminal event's message.
        message: String,
    },
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// 400 `invalid_request` about one field.
    pub(crate) fn invalid_field(field: &str, message: impl std::fmt::Display) -> Self {
        Self::InvalidRequest {
            message: format!("{field}: {message}"),
            param: Some(field.to_string()),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. }
            | Self::InvalidJson(_)
            | Self::InvalidQuery(_)
            | Self::InvalidCursor(_)
            | Self::InvalidBody
            | Self::CursorOutOfRange { .. }
            | Self::SlowConsumer(_)
            | Self::StreamCancelled
            | Self::InvalidMessage(_)
            | Self::UnknownType(_)
            | Self::UnsupportedFrame => StatusCode::BAD_REQUEST,
            Self::WebSocketRequired { status, .. } => *status,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MissingCredentials
            | Self::InvalidCredentials(_)
            | Self::ExpiredCredentials(_)
            | Self::InvalidTicket(_)
            | Self::ExpiredTicket
            | Self::CredentialsExpired(_) => StatusCode::UNAUTHORIZED,
            Self::TicketScope | Self::OriginNotAllowed => StatusCode::FORBIDDEN,
            Self::NotFound
            | Self::AdminNotFound
            | Self::TicketsDisabled
            | Self::StreamNotFound
            | Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::AlreadySubscribed => StatusCode::CONFLICT,
            Self::HistoryExpired(_) => StatusCode::GONE,
            Self::RateLimited { .. }
            | Self::ConcurrencyLimited { .. }
            | Self::TooManyConnections
            | Self::TooManySubscriptions(_)
            | Self::TooManyCancels(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::CancelledBeforeFinish
            | Self::Capacity(_)
            | Self::StoreUnavailable
            | Self::LimitsUnavailable
            | Self::ServerShutdown(_)
            | Self::GeneratorFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine tag (`code` on the wire).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidQuery(_) => "invalid_query",
            Self::InvalidCursor(_) => "invalid_cursor",
            Self::InvalidBody => "invalid_body",
            Self::CursorOutOfRange { .. } => "cursor_out_of_range",
            Self::WebSocketRequired { .. } => "websocket_required",
            Self::BodyTimeout(_) => "body_timeout",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MissingCredentials => "missing_credentials",
            Self::InvalidCredentials(_) => "invalid_credentials",
            Self::ExpiredCredentials(_) => "expired_credentials",
            Self::InvalidTicket(_) => "invalid_ticket",
            Self::ExpiredTicket => "expired_ticket",
            Self::CredentialsExpired(_) => "credentials_expired",
            Self::TicketScope => "ticket_scope",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::NotFound | Self::AdminNotFound | Self::TicketsDisabled => "not_found",
            Self::StreamNotFound => "stream_not_found",
            Self::ModelNotFound(_) => "model_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::AlreadySubscribed => "already_subscribed",
            Self::HistoryExpired(_) => "history_expired",
            Self::RateLimited { .. } => "rate_limited",
            Self::ConcurrencyLimited { .. } => "concurrency_limited",
            Self::TooManyConnections => "too_many_connections",
            Self::TooManySubscriptions(_) => "too_many_subscriptions",
            Self::TooManyCancels(_) => "too_many_cancels",
            Self::SlowConsumer(_) => "slow_consumer",
            Self::StreamCancelled | Self::CancelledBeforeFinish => "stream_cancelled",
            Self::InvalidMessage(_) => "invalid_message",
            Self::UnknownType(_) => "unknown_type",
            Self::UnsupportedFrame => "unsupported_frame",
            Self::Internal => "internal",
            Self::Capacity(_) => "capacity",
            Self::StoreUnavailable | Self::LimitsUnavailable => "store_unavailable",
            Self::ServerShutdown(_) => "server_shutdown",
            Self::GeneratorFailed { code, .. } => code,
        }
    }

    /// What is wrong, for people.
    pub fn message(&self) -> String {
        match self {
            Self::InvalidRequest { message, .. }
            | Self::InvalidJson(message)
            | Self::InvalidQuery(message)
            | Self::InvalidCursor(message)
            | Self::WebSocketRequired { message, .. }
            | Self::InvalidCredentials(message)
            | Self::ExpiredCredentials(message)
            | Self::InvalidTicket(message)
            | Self::RateLimited { message, .. }
            | Self::ConcurrencyLimited { message, .. }
            | Self::SlowConsumer(message)
            | Self::InvalidMessage(message)
            | Self::Capacity(message)
            | Self::ServerShutdown(message)
            | Self::GeneratorFailed { message, .. } => message.clone(),
            Self::CredentialsExpired(message) => (*message).to_owned(),
            Self::InvalidBody => "the request body could not be read".into(),
            Self::CursorOutOfRange { after, last } => {
                format!("after={after} is beyond the last event of the stream (seq {last})")
            }
            Self::BodyTimeout(secs) => format!("the request body did not arrive within {secs} s"),
            Self::BodyTooLarge(limit) => format!("the request body exceeds {limit} bytes"),
            Self::UnsupportedMediaType => {
                "the body must be JSON (Content-Type: application/json)".into()
            }
            Self::MissingCredentials => "this endpoint needs `Authorization: Bearer <credential>` \
                                         (or a stream ticket to read a stream)"
                .into(),
            Self::ExpiredTicket => "the stream ticket has expired; ask for a new one".into(),
            Self::TicketScope => "a stream ticket only lets its holder read that one stream".into(),
            Self::OriginNotAllowed => "this Origin may not open a WebSocket".into(),
            Self::NotFound => "no such endpoint".into(),
            Self::AdminNotFound => {
                "the admin listener serves /metrics, /readyz and /healthz".into()
            }
            Self::TicketsDisabled => {
                "tickets are issued only when authentication is on (--auth)".into()
            }
            Self::StreamNotFound => "no such stream".into(),
            Self::ModelNotFound(model) => {
                format!("the model {model:?} does not exist; GET /v1/models lists the models")
            }
            Self::MethodNotAllowed => "this endpoint does not accept that method".into(),
            Self::AlreadySubscribed => "this socket is already subscribed to the stream".into(),
            Self::HistoryExpired(after) => format!(
                "the stream's history after seq {after} is no longer kept; start a new stream"
            ),
            Self::TooManyConnections => {
                "this address has too many open connections; close some or retry shortly".into()
            }
            Self::TooManySubscriptions(max) => format!("a socket may follow at most {max} streams"),
            Self::TooManyCancels(max) => format!(
                "a socket may have {max} cancels in flight; wait for their answers (the socket \
                 is closed if this goes on)"
            ),
            Self::StreamCancelled => "the stream was cancelled".into(),
            Self::CancelledBeforeFinish => "the stream was cancelled before it finished".into(),
            Self::UnknownType(kind) => format!(
                "unknown message type {kind:?}; expected start, subscribe, cancel, unsubscribe \
                 or ping"
            ),
            Self::UnsupportedFrame => "binary frames are not supported; send JSON text".into(),
            Self::Internal => "internal error; it has been logged".into(),
            Self::StoreUnavailable => {
                "stream history is unreachable right now; retry shortly".into()
            }
            Self::LimitsUnavailable => {
                "stream limits are unreachable right now; retry shortly".into()
            }
        }
    }

    /// The request field at fault, when there is one (OpenAI's `param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// Seconds to wait before retrying (429, 503), sent as `Retry-After`.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after, .. }
            | Self::ConcurrencyLimited { retry_after, .. } => Some((*retry_after).max(1)),
            Self::TooManyConnections
            | Self::CancelledBeforeFinish
            | Self::Capacity(_)
            | Self::StoreUnavailable
            | Self::LimitsUnavailable
            | Self::ServerShutdown(_)
            | Self::GeneratorFailed { .. } => Some(1),
            _ => None,
        }
    }

    /// The native JSON body `{"error":{"code","message"}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code(), "message": self.message()}})
    }

    /// The SSE `error` event (not a stream event: no `id:`, no seq).
    pub(crate) fn write_sse(&self, out: &mut BytesMut) {
        let body = json!({"type": "error", "code": self.code(), "message": self.message()});
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(body.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    /// The WebSocket `error` message, naming the stream and echoing the client's `request_id`
    /// when there are.
    pub fn ws_message(&self, stream_id: Option<&str>, request_id: Option<&str>) -> String {
        let mut e = json!({"type": "error", "code": self.code(), "message": self.message()});
        if let Some(id) = stream_id {
            e["stream_id"] = json!(id);
        }
        if let Some(id) = request_id {
            e["request_id"] = json!(id);
        }
        e.to_string()
    }

    /// The response in `format`.
    pub(crate) fn into_response_as(self, format: ErrorFormat) -> Response {
        match format {
            ErrorFormat::Native => self.into_response(),
            ErrorFormat::OpenAi => OpenAiError(self).into_response(),
        }
    }

    /// Adds `Retry-After` and, for a 401, `WWW-Authenticate`.
    fn finish(&self, mut response: Response) -> Response {
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            // RFC 6750: a missing credential gets the bare challenge; a bad one says so.
            let challenge = if *self == Self::MissingCredentials {
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
        let response = (self.status(), Json(self.body())).into_response();
        self.finish(response)
    }
}

/// Which HTTP error shape a route answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorFormat {
    /// `{"error":{"code","message"}}`.
    Native,
    /// OpenAI's `{"error":{"message","type","param","code"}}`.
    OpenAi,
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
        let (kind, code, message) = match e.status().as_u16() {
            401 => (
                "invalid_request_error",
                "invalid_api_key",
                format!("{} ({})", e.message(), e.code()),
            ),
            429 => (
                "requests",
                "rate_limit_exceeded",
                format!("{} ({})", e.message(), e.code()),
            ),
            403 => ("permission_error", e.code(), e.message()),
            s if s >= 500 => ("server_error", e.code(), e.message()),
            _ => ("invalid_request_error", e.code(), e.message()),
        };
        json!({"error": {"message": message, "type": kind, "param": e.param(), "code": code}})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let response = (self.0.status(), Json(self.body())).into_response();
        self.0.finish(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_format_carries_the_same_code_and_message() {
        let e = ApiError::TooManyCancels(4);
        let native = e.body();
        assert_eq!(native["error"]["code"], "too_many_cancels");
        let ws: serde_json::Value =
            serde_json::from_str(&e.ws_message(Some("s"), Some("r"))).expect("json");
        assert_eq!(
            (
                &ws["type"],
                &ws["code"],
                &ws["stream_id"],
                &ws["request_id"]
            ),
            (
                &json!("error"),
                &native["error"]["code"],
                &json!("s"),
                &json!("r")
            )
        );
        assert_eq!(ws["message"], native["error"]["message"]);
        let mut sse = BytesMut::new();
        e.write_sse(&mut sse);
        let data = std::str::from_utf8(&sse)
            .expect("utf-8")
            .strip_prefix("event: error\ndata: ")
            .expect("an error event")
            .trim_end();
        let sse: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(sse["code"], "too_many_cancels");
        let openai = OpenAiError(e).body();
        assert_eq!(openai["error"]["type"], "requests");
        assert_eq!(openai["error"]["code"], "rate_limit_exceeded");
    }

    #[test]
    fn retry_after_and_challenge_headers() {
        let r = ApiError::StoreUnavailable.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::MissingCredentials.into_response();
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            r#"Bearer realm="tokenfan""#
        );
        let r = ApiError::ExpiredTicket.into_response_as(ErrorFormat::OpenAi);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            r#"Bearer realm="tokenfan", error="invalid_token""#
        );
    }
}
