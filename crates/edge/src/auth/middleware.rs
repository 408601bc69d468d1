//! The authentication middleware, and what it leaves on the request for the handlers: the
//! [`Caller`] (an extractor) and the [`CredentialExpiry`].

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{FromRequestParts, Request, State},
    http::request::Parts,
    middleware::Next,
    response::Response,
};

use super::{security::Security, ticket::unix_now};
use crate::{error::ApiError, routes, tenant::Caller};

/// Middleware: authenticates every `/v1/…` request and hands the [`Caller`] to the handler;
/// other paths (the demo page, health, metrics) pass untouched.
pub async fn authenticate(
    State(security): State<Arc<Security>>,
    mut request: Request,
    next: Next,
) -> Response {
    if !request.uri().path().starts_with("/v1/") {
        return next.run(request).await;
    }
    match security.identify_until(request.method(), request.uri(), request.headers()) {
        Ok((caller, expires)) => {
            request.extensions_mut().insert(caller);
            if let Some(at) = expires {
                request.extensions_mut().insert(CredentialExpiry(at));
            }
            next.run(request).await
        }
        Err(error) => {
            metrics::counter!("tokenfan_edge_auth_refusals_total", "code" => error.code())
                .increment(1);
            routes::error_response(request.uri().path(), error)
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    /// Set by [`authenticate`] on every `/v1/…` request; its absence is a wiring bug.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::error!("no caller on the request: the auth middleware is not installed");
            ApiError::Internal
        })
    }
}

/// When the credential (JWT) or ticket of a request stops being accepted, in Unix seconds; in
/// the request's extensions when it has one. A WebSocket or SSE response opened with it ends
/// then (WebSocket close 1008, SSE `error` event `credentials_expired`): reconnecting with a
/// fresh credential resumes where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialExpiry(pub u64);

impl CredentialExpiry {
    /// The same moment on the runtime's clock.
    pub fn deadline(self) -> tokio::time::Instant {
        let left = self.0.saturating_sub(unix_now());
        tokio::time::Instant::now() + Duration::from_secs(left)
    }
}
