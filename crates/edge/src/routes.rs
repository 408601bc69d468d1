//! The `/v1/…` API routes: their paths and what each one allows, in one table.
//!
//! The router ([`crate::app::router`]) mounts its handlers on these paths; authentication
//! ([`crate::auth`]) reads from the same entries which routes a stream ticket may stand in for
//! a credential on, and error responses made before a handler runs (authentication, the body
//! deadline) take the error shape of the route asked for ([`error_response`]).

use axum::{http::Method, response::Response};

use crate::error::{ApiError, ErrorFormat};

/// One API route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    /// The path as the router writes it (`{id}` matches one path segment).
    pub path: &'static str,
    /// Whether a stream ticket is accepted here instead of a credential.
    pub tickets: Tickets,
    /// The shape of this route's error bodies.
    pub errors: ErrorFormat,
}

/// Where a stream ticket may stand in for a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tickets {
    /// Never: a credential is needed.
    No,
    /// On `GET`/`HEAD` of the stream named by the path's `{id}`.
    ReadStream,
    /// On any method; each stream it then asks for is checked (the WebSocket's `subscribe`).
    PerMessage,
}

const fn route(path: &'static str, tickets: Tickets, errors: ErrorFormat) -> Route {
    Route {
        path,
        tickets,
        errors,
    }
}

/// `GET /v1/models`.
pub(crate) const MODELS: Route = route("/v1/models", Tickets::No, ErrorFormat::OpenAi);
/// `GET /v1/models/{id}`.
pub(crate) const MODEL: Route = route("/v1/models/{id}", Tickets::No, ErrorFormat::OpenAi);
/// `POST /v1/chat/completions`.
pub(crate) const CHAT_COMPLETIONS: Route =
    route("/v1/chat/completions", Tickets::No, ErrorFormat::OpenAi);
/// `POST /v1/streams` (create).
pub(crate) const STREAMS: Route = route("/v1/streams", Tickets::No, ErrorFormat::Native);
/// `GET /v1/streams/{id}` (status, short-poll) and `DELETE` (stop).
pub(crate) const STREAM: Route =
    route("/v1/streams/{id}", Tickets::ReadStream, ErrorFormat::Native);
/// `GET /v1/streams/{id}/events` (SSE).
pub(crate) const STREAM_EVENTS: Route = route(
    "/v1/streams/{id}/events",
    Tickets::ReadStream,
    ErrorFormat::Native,
);
/// `GET /v1/streams/{id}/poll` (long-poll).
pub(crate) const STREAM_POLL: Route = route(
    "/v1/streams/{id}/poll",
    Tickets::ReadStream,
    ErrorFormat::Native,
);
/// `POST /v1/streams/{id}/ticket`.
pub(crate) const STREAM_TICKET: Route =
    route("/v1/streams/{id}/ticket", Tickets::No, ErrorFormat::Native);
/// `/v1/ws` (WebSocket over HTTP/1.1 `GET` + Upgrade, or HTTP/2 extended `CONNECT`).
pub(crate) const WS: Route = route("/v1/ws", Tickets::PerMessage, ErrorFormat::Native);

/// Every API route.
pub(crate) const API: &[Route] = &[
    MODELS,
    MODEL,
    CHAT_COMPLETIONS,
    STREAMS,
    STREAM,
    STREAM_EVENTS,
    STREAM_POLL,
    STREAM_TICKET,
    WS,
];

/// The route `path` asks for, and the value of its `{id}` segment if it has one.
pub(crate) fn find(path: &str) -> Option<(&'static Route, Option<&str>)> {
    API.iter().find_map(|route| {
        let mut id = None;
        let mut pattern = route.path.split('/');
        let mut given = path.split('/');
        loop {
            match (pattern.next(), given.next()) {
                (None, None) => return Some((route, id)),
                (Some(p), Some(g)) if p.starts_with('{') => id = Some(g),
                (Some(p), Some(g)) if p == g => {}
                _ => return None,
            }
        }
    })
}

/// Whether a stream ticket may stand in for a credential on `method path`: `Some(Some(id))`
/// to read stream `id`, `Some(None)` where each stream asked for is checked later, `None` not
/// at all.
pub(crate) fn ticket_scope<'p>(method: &Method, path: &'p str) -> Option<Option<&'p str>> {
    let (route, id) = find(path)?;
    match route.tickets {
        Tickets::No => None,
        Tickets::PerMessage => Some(None),
        Tickets::ReadStream => (*method == Method::GET || *method == Method::HEAD).then_some(id),
    }
}

/// `error` in the shape of the route `path` asks for (OpenAI's on the OpenAI routes, native
/// elsewhere and on unknown paths).
pub(crate) fn error_response(path: &str, error: ApiError) -> Response {
    let format = find(path).map_or(ErrorFormat::Native, |(route, _)| route.errors);
    error.into_response_as(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_find_their_route_and_id() {
        assert_eq!(find("/v1/models"), Some((&MODELS, None)));
        assert_eq!(find("/v1/models/gpt"), Some((&MODEL, Some("gpt"))));
        assert_eq!(
            find("/v1/streams/abc/poll"),
            Some((&STREAM_POLL, Some("abc")))
        );
        assert_eq!(find("/v1/streams/abc/other"), None);
        assert_eq!(find("/v1/streams/abc/events/x"), None);
        assert_eq!(find("/v1/wsx"), None);
    }

    #[test]
    fn tickets_read_streams_and_open_websockets_only() {
        let get = Method::GET;
        assert_eq!(ticket_scope(&get, "/v1/streams/abc"), Some(Some("abc")));
        assert_eq!(
            ticket_scope(&Method::HEAD, "/v1/streams/abc/events"),
            Some(Some("abc"))
        );
        assert_eq!(ticket_scope(&Method::DELETE, "/v1/streams/abc"), None);
        assert_eq!(ticket_scope(&Method::POST, "/v1/streams/abc/ticket"), None);
        assert_eq!(ticket_scope(&get, "/v1/streams"), None);
        assert_eq!(ticket_scope(&Method::CONNECT, "/v1/ws"), Some(None));
        assert_eq!(ticket_scope(&get, "/v1/models"), None);
    }
}
