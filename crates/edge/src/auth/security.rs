//! [`Security`]: a request's credentials or ticket → its [`Caller`], and new streams' tickets.

use std::{sync::Arc, time::Duration};

use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};

use super::{
    args::{AuthArgs, AuthMode},
    cookies,
    credentials::Verifier,
    ticket::{self, IssuedTicket, TICKET_HEADER, TicketKey, Tickets},
};
use crate::{error::ApiError, routes, stream::StreamState, tenant::Caller};

/// Authentication and tickets, as configured; shared by the middleware and the handlers.
pub struct Security {
    mode: AuthMode,
    verifier: Verifier,
    tickets: Tickets,
    cookie: Option<String>,
    /// Whether this edge serves TLS itself (cookies get `Secure`).
    tls: bool,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("mode", &self.mode)
            .field("cookie", &self.cookie)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

impl Security {
    /// Loads the keys `args` name; `tls`: this edge serves TLS itself.
    pub fn from_args(args: &AuthArgs, tls: bool) -> anyhow::Result<Self> {
        let key = match &args.ticket_secret {
            Some(secret) => TicketKey::new(secret.expose().as_bytes()),
            None => {
                if args.mode != AuthMode::None {
                    tracing::warn!(
                        "no --ticket-secret: stream tickets are signed with a random key and \
                         work on this replica only; give every replica the same secret"
                    );
                }
                TicketKey::random()
            }
        };
        Ok(Self {
            mode: args.mode,
            verifier: Verifier::from_args(args)?,
            tickets: Tickets::new(key, Duration::from_secs(args.ticket_ttl_secs)),
            cookie: args.auth_cookie.clone(),
            tls,
        })
    }

    /// The configured mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Identifies the caller of a `/v1/…` request, with the Unix second the credential or
    /// ticket stops being accepted (None: API keys and no authentication do not expire).
    /// Precedence: the `Authorization` header, then credentials in the cookie, then a ticket
    /// (`?ticket=` or the cookie). Tickets count only on the routes that read a stream; one
    /// for another stream is 403.
    pub fn identify_until(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<(Caller, Option<u64>), ApiError> {
        if self.mode == AuthMode::None {
            return Ok((Caller::anonymous(), None));
        }
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let credential = value
                .to_str()
                .ok()
                .and_then(|v| {
                    let (scheme, token) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    ApiError::InvalidCredentials(
                        "the Authorization header must be `Bearer <credential>`".into(),
                    )
                })?;
            return self.verifier.verify(credential);
        }
        let (tickets, credentials) = self.presented(uri, headers)?;
        let mut error: Option<ApiError> = None;
        for credential in &credentials {
            match self.verifier.verify(credential) {
                Ok(identified) => return Ok(identified),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        let scope = routes::ticket_scope(method, uri.path());
        let mut out_of_scope = false;
        for ticket in &tickets {
            match self.tickets.check(ticket) {
                Ok(claims) => {
                    let in_scope =
                        scope.is_some_and(|s| s.is_none_or(|s| s == claims.stream.as_str()));
                    if in_scope {
                        return Ok((
                            Caller::Ticket {
                                tenant: Arc::from(claims.tenant),
                                stream: Arc::from(claims.stream.as_str()),
                            },
                            Some(claims.expires_at),
                        ));
                    }
                    out_of_scope = true;
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if out_of_scope {
            return Err(ticket::out_of_scope());
        }
        Err(error.unwrap_or(ApiError::MissingCredentials))
    }

    /// The tickets (`?ticket=`, the cookie) and credentials (the cookie) a request without an
    /// `Authorization` header presents.
    fn presented(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<(Vec<String>, Vec<String>), ApiError> {
        let mut tickets: Vec<String> = Vec::new();
        let mut credentials: Vec<String> = Vec::new();
        if let Some(query) = uri.query() {
            let parsed: Result<axum::extract::Query<TicketQuery>, _> =
                axum::extract::Query::try_from_uri(uri);
            match parsed {
                Ok(q) => tickets.extend(q.0.ticket),
                Err(_) if query.contains("ticket=") => {
                    return Err(ApiError::InvalidTicket(
                        "`ticket` must appear once in the query".into(),
                    ));
                }
                Err(_) => {}
            }
        }
        if let Some(name) = &self.cookie {
            for value in cookies::values(headers, name) {
                if value.starts_with(ticket::PREFIX) {
                    tickets.push(value.to_owned());
                } else {
                    credentials.push(value.to_owned());
                }
            }
        }
        Ok((tickets, credentials))
    }

    /// A ticket for reading `stream`, when authentication is on.
    pub(crate) fn ticket_for(&self, stream: &StreamState) -> Option<IssuedTicket> {
        (self.mode != AuthMode::None).then(|| self.tickets.issue(&stream.id, stream.tenant()))
    }

    /// Puts `ticket` on a response: the `x-stream-ticket` header and, with `--auth-cookie`,
    /// a cookie scoped to the stream's URLs.
    pub(crate) fn add_ticket_headers(
        &self,
        ticket: Option<&IssuedTicket>,
        stream: &StreamState,
        request: &HeaderMap,
        response: &mut HeaderMap,
    ) {
        let Some(ticket) = ticket else { return };
        if let Ok(v) = HeaderValue::from_str(&ticket.token) {
            response.insert(TICKET_HEADER, v);
        }
        if let Some(name) = &self.cookie
            && let Some(cookie) = cookies::ticket_cookie(
                name,
                ticket,
                &stream.id,
                self.tickets.ttl,
                self.tls,
                request,
            )
        {
            response.append(header::SET_COOKIE, cookie);
        }
    }
}
