//! The `--auth-cookie` cookie: read for a credential or a ticket, set to a new stream's ticket.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};

use super::ticket::IssuedTicket;
use crate::ids::StreamId;

/// The values of cookie `name` in the request's `Cookie` headers.
pub fn values<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` for cookie `name` holding `ticket`, scoped to the URLs of `stream`, kept for
/// `ttl`; `Secure` when the client reached the edge over HTTPS (`tls`: the edge serves TLS
/// itself; else an `X-Forwarded-Proto: https` from the proxy in front says so).
pub(crate) fn ticket_cookie(
    name: &str,
    ticket: &IssuedTicket,
    stream: &StreamId,
    ttl: Duration,
    tls: bool,
    request: &HeaderMap,
) -> Option<HeaderValue> {
    let https = tls
        || request
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{name}={}; Path=/v1/streams/{stream}; Max-Age={}; HttpOnly; SameSite=Strict{}",
        ticket.token,
        ttl.as_secs(),
        if https { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&cookie).ok()
}
