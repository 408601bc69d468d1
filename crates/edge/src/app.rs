//! The HTTP application: the router (paths from [`crate::routes`], state in
//! [`crate::state`]), its middleware, and the small endpoints (models, health, the demo
//! page). `/metrics` and `/readyz` are on the admin listener ([`crate::admin`]).

use std::time::Duration;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    body_deadline::BodyDeadline,
    config::EdgeConfig,
    error::{ApiError, ErrorFormat},
    request::MODELS,
    routes,
    state::AppState,
    transports::{eventsource, longpoll, native, openai, shortpoll, ws},
};

/// Builds the router with every endpoint, CORS and the body limit.
pub fn router(state: AppState) -> Router {
    let cors = cors_layer(&state.config);
    let body_deadline = BodyDeadline {
        max_bytes: state.config.http.max_body_bytes,
        timeout: Duration::from_secs(state.config.limits.body_read_timeout_secs),
    };
    let router = Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/healthz", get(crate::admin::healthz))
        .route(routes::MODELS.path, get(models))
        .route(routes::MODEL.path, get(model))
        .route(
            routes::CHAT_COMPLETIONS.path,
            post(openai::chat_completions),
        )
        .route(routes::STREAMS.path, post(native::create))
        .route(
            routes::STREAM.path,
            get(shortpoll::status).delete(native::stop),
        )
        .route(routes::STREAM_EVENTS.path, get(eventsource::events))
        .route(routes::STREAM_POLL.path, get(longpoll::poll))
        .route(routes::STREAM_TICKET.path, post(native::ticket))
        // `any`: WebSocket over HTTP/1.1 (GET + Upgrade) and HTTP/2 (extended CONNECT).
        .route(routes::WS.path, any(ws::upgrade))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Outermost first: authenticate, then read the body (so an unauthenticated client
        // cannot make the edge wait for its body).
        .layer(axum::middleware::from_fn_with_state(
            body_deadline,
            crate::body_deadline::body_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.security.clone(),
            crate::auth::authenticate,
        ))
        .layer(axum::middleware::from_fn(echo_request_id))
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

fn cors_layer(config: &EdgeConfig) -> Option<CorsLayer> {
    if config.cors_origins.is_empty() {
        return None;
    }
    let origins = if config.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static("last-event-id"),
                header::HeaderName::from_static("traceparent"),
                header::HeaderName::from_static("tracestate"),
            ])
            .expose_headers([
                header::HeaderName::from_static("x-stream-id"),
                header::HeaderName::from_static(REQUEST_ID),
                header::HeaderName::from_static(crate::auth::TICKET_HEADER),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// The request id header clients (the OpenAI SDKs among them) log and send to support.
const REQUEST_ID: &str = "x-request-id";

/// Answers with the request's `x-request-id` (up to 200 bytes), on every response, errors
/// included.
async fn echo_request_id(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .cloned();
    let mut response = next.run(request).await;
    if let Some(id) = id {
        response.headers_mut().insert(REQUEST_ID, id);
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

const INDEX_HTML: &str = include_str!("../../../web/index.html");
const APP_JS: &str = include_str!("../../../web/app.js");
const STYLE_CSS: &str = include_str!("../../../web/style.css");

fn static_file(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index(State(app): State<AppState>) -> Response {
    let mut r = static_file(INDEX_HTML, "text/html; charset=utf-8");
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; \
             img-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::HeaderName::from_static("permissions-policy"),
        HeaderValue::from_static(
            "camera=(), microphone=(), geolocation=(), payment=(), usb=(), interest-cohort=()",
        ),
    );
    h.insert(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    if app.config.tls_cert.is_some() {
        // Only over TLS: on plain HTTP the header is meaningless (and ignored).
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    r
}

async fn app_js() -> Response {
    static_file(APP_JS, "text/javascript; charset=utf-8")
}

async fn style_css() -> Response {
    static_file(STYLE_CSS, "text/css; charset=utf-8")
}

fn model_json(id: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "object": "model",
        "created": 1_767_225_600,
        "owned_by": "tokenfan",
    })
}

async fn models() -> Response {
    let data: Vec<_> = MODELS.iter().map(|m| model_json(m.id)).collect();
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn model(axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    match crate::request::resolve_model(Some(&id)) {
        Ok(m) => Json(model_json(m.id)).into_response(),
        Err(e) => e.into_response_as(ErrorFormat::OpenAi),
    }
}
