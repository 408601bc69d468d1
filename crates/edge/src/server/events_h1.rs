//! A lean HTTP/1.1 path for `GET /v1/streams/{id}/events` on plain TCP: an SSE response that
//! may stay open for hours, mostly idle.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer per HTTP/1 connection for as long
//! as it lives, both resident, and has no setting below 8 KiB. This path holds neither: the
//! request head is peeked into a temporary buffer (freed before the response starts), the
//! request runs through the same router (auth, CORS, request id, tickets, errors and the
//! handler are unchanged), and the response is written straight to the socket: the head once,
//! then each chunk of the body as one vectored write. After the response, a connection the
//! client keeps alive is handed to hyper for whatever it sends next.
//!
//! Only a request whose whole head is already in the socket, alone, and plain qualifies: a
//! `GET` over HTTP/1.1 for an events path, without a body, `Upgrade` or `Expect`, at most
//! [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers. Anything else goes to hyper untouched, since
//! nothing was consumed.

use std::{
    io,
    task::{Context, Poll},
    time::SystemTime,
};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version, header};
use http_body_util::BodyExt as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::routes;

/// The largest request head this path takes (larger ones go to hyper).
const MAX_HEAD: usize = 8 * 1024;

/// The first peek at a request head, in bytes.
const FIRST_PEEK: usize = 1024;

/// The most request headers this path takes (more go to hyper).
const MAX_HEADERS: usize = 64;

/// Headers that would make the request something this path does not handle.
const DECLINED: [header::HeaderName; 4] = [
    header::UPGRADE,
    header::EXPECT,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
];

/// Reads the request head of an events request off `tcp`, or leaves the socket as it was.
/// `tcp` has bytes waiting (the protocol sniff saw them). Ok(None): not for this path, nothing
/// consumed. Err: the socket failed while the head was being consumed.
pub(super) async fn take_request(tcp: &mut TcpStream) -> io::Result<Option<Request<Body>>> {
    // Most heads fit the smaller buffer; a larger one is tried only when it is full.
    for size in [FIRST_PEEK, MAX_HEAD] {
        let mut buf = vec![0u8; size];
        let seen = tcp.peek(&mut buf).await?;
        if let Some((request, head_len)) = parse(&buf[..seen]) {
            tcp.read_exact(&mut buf[..head_len]).await?;
            return Ok(Some(request));
        }
        if seen < size {
            break;
        }
    }
    Ok(None)
}

/// The request `bytes` hold, and its length, when it is exactly one complete events request
/// this path serves.
fn parse(bytes: &[u8]) -> Option<(Request<Body>, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = head.parse(bytes).ok()? else {
        return None;
    };
    // Pipelined bytes after the head: hyper serves those.
    if len != bytes.len() || head.method != Some("GET") || head.version != Some(1) {
        return None;
    }
    let path = head.path?;
    if !is_events_path(path) {
        return None;
    }
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11)
        .body(Body::empty())
        .ok()?;
    let map = request.headers_mut();
    for h in head.headers.iter() {
        let name = header::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if DECLINED.contains(&name) {
            return None;
        }
        map.append(name, header::HeaderValue::from_bytes(h.value).ok()?);
    }
    Some((request, len))
}

/// Whether `target` (origin form) is `/v1/streams/{id}/events` (the route table's
/// [`routes::STREAM_EVENTS`]) with a non-empty id, with or without a query.
fn is_events_path(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    routes::find(path).is_some_and(|(route, id)| {
        *route == routes::STREAM_EVENTS && id.is_some_and(|id| !id.is_empty())
    })
}

/// The socket this path writes to: it also tells when the client closed, without consuming
/// anything the client sent (a pipelined request is hyper's to read).
pub(super) trait Socket: AsyncWrite + Unpin {
    /// Ready once the client closed (true) or sent more bytes (false).
    fn poll_peer(&mut self, cx: &mut Context<'_>) -> Poll<bool>;
}

/// Whether the request asks to close the connection after its response.
pub(super) fn wants_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Writes `response` to `io`: a body of known size with `content-length`, any other chunked.
/// With `keep_alive` the connection may carry more requests after it; else the response says
/// `connection: close`. Returns whether the connection is still usable: false when the client
/// closed, the body failed (the chunked response is then left unterminated, as hyper does) or
/// the response said close (then `io` was shut down).
pub(super) async fn respond<I: Socket>(
    io: &mut I,
    response: http::Response<Body>,
    keep_alive: bool,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let length = hyper::body::Body::size_hint(&body).exact();
    let chunked = !bodiless && length.is_none();
    let head = head(parts.status, &parts.headers, bodiless, length, keep_alive);
    // Not held while the body streams.
    drop(parts);
    io.write_all(&head).await?;
    drop(head);
    if bodiless {
        body = Body::empty();
    }
    // Until the client sends something (a pipelined request), its socket is watched for a
    // close, so an idle stream notices a client that left.
    let mut watch_peer = true;
    loop {
        tokio::select! {
            biased;
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if chunked {
                        write_chunk(io, &data).await?;
                    } else {
                        io.write_all(&data).await?;
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(%err, "response body failed");
                    return Ok(false);
                }
                None => break,
            },
            closed = std::future::poll_fn(|cx| io.poll_peer(cx)), if watch_peer => {
                if closed {
                    return Ok(false);
                }
                watch_peer = false;
            }
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    if !keep_alive {
        io.shutdown().await?;
    }
    Ok(keep_alive)
}

/// The response head: status line, the response's headers (less those about the connection and
/// framing, which this path sets), `date`, framing, and `connection: close` unless `keep_alive`.
fn head(
    status: StatusCode,
    headers: &HeaderMap,
    bodiless: bool,
    length: Option<u64>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if matches!(
            *name,
            header::CONNECTION | header::CONTENT_LENGTH | header::TRANSFER_ENCODING
        ) || name.as_str() == "keep-alive"
        {
            continue;
        }
        line(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !headers.contains_key(header::DATE) {
        line(
            &mut out,
            b"date",
            httpdate::fmt_http_date(SystemTime::now()).as_bytes(),
        );
    }
    match (bodiless, length) {
        (true, _) => {}
        (false, Some(n)) => line(&mut out, b"content-length", n.to_string().as_bytes()),
        (false, None) => line(&mut out, b"transfer-encoding", b"chunked"),
    }
    if !keep_alive {
        line(&mut out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `data` as one chunk (nothing when it is empty: an empty chunk would end the body),
/// size line, data and CRLF in one vectored write when the socket takes it all.
async fn write_chunk<I: AsyncWrite + Unpin>(io: &mut I, data: &Bytes) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut size = [0u8; 18];
    let size = chunk_size_line(data.len(), &mut size);
    let mut parts = [
        io::IoSlice::new(size),
        io::IoSlice::new(data),
        io::IoSlice::new(b"\r\n"),
    ];
    let mut left = &mut parts[..];
    while !left.is_empty() {
        let n = io.write_vectored(left).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

/// `len` in hex followed by CRLF, written into `buf`.
fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = buf.len() - 2;
    buf[at..].copy_from_slice(b"\r\n");
    let mut rest = len;
    loop {
        at -= 1;
        buf[at] = HEX[rest % 16];
        rest /= 16;
        if rest == 0 {
            break;
        }
    }
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[test]
    fn only_plain_complete_events_requests_qualify() {
        let ok = b"GET /v1/streams/abc/events?after=3 HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n";
        let (request, len) = parse(ok).expect("qualifies");
        assert_eq!(len, ok.len());
        assert_eq!(request.uri(), "/v1/streams/abc/events?after=3");
        assert_eq!(request.headers()["accept"], "text/event-stream");

        for declined in [
            &b"GET /v1/streams/abc/events HTTP/1.1\r\nhost: x\r\n"[..],
            b"GET /v1/streams/abc/events HTTP/1.0\r\n\r\n",
            b"HEAD /v1/streams/abc/events HTTP/1.1\r\n\r\n",
            b"POST /v1/streams/abc/events HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
            b"GET /v1/streams/abc HTTP/1.1\r\n\r\n",
            b"GET /v1/streams//events HTTP/1.1\r\n\r\n",
            b"GET /v1/streams/a/b/events HTTP/1.1\r\n\r\n",
            b"GET /v1/streams/abc/events HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
            b"GET /v1/streams/abc/events HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /v1/streams/abc/events HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
            b"GET /v1/streams/abc/events HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET /v1/streams/abc/events HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET /v1/streams/abc/events HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(
                parse(declined).is_none(),
                "{:?}",
                String::from_utf8_lossy(declined)
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let many = format!("GET /v1/streams/abc/events HTTP/1.1\r\n{many}\r\n");
        assert!(parse(many.as_bytes()).is_none());
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_size_line(1, &mut buf), b"1\r\n");
        assert_eq!(chunk_size_line(255, &mut buf), b"ff\r\n");
        assert_eq!(chunk_size_line(4096, &mut buf), b"1000\r\n");
        assert_eq!(
            chunk_size_line(usize::MAX, &mut buf),
            b"ffffffffffffffff\r\n"
        );
    }

    /// One end of an in-memory pipe, whose client never closes nor sends.
    struct Pipe(tokio::io::DuplexStream);

    impl AsyncWrite for Pipe {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl Socket for Pipe {
        fn poll_peer(&mut self, _: &mut Context<'_>) -> Poll<bool> {
            Poll::Pending
        }
    }

    /// What `respond` writes for `response`, and its result.
    async fn written(response: http::Response<Body>, keep_alive: bool) -> (String, bool) {
        let (mut client, server) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            let mut server = Pipe(server);
            respond(&mut server, response, keep_alive).await
        });
        let mut got = Vec::new();
        let reader = async {
            let mut buf = [0u8; 1024];
            // Until the writer is done (keep-alive leaves the pipe open).
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        };
        reader.await;
        let open = writer.await.expect("join").expect("respond");
        (String::from_utf8(got).expect("utf-8"), open)
    }

    #[tokio::test]
    async fn a_streaming_body_is_chunked_and_terminated() {
        let body = || {
            Body::from_stream(futures::stream::iter([
                Ok::<_, io::Error>(Bytes::from_static(b"retry: 1000\n\n")),
                Ok(Bytes::new()),
                Ok(Bytes::from_static(b"data: x\n\n")),
            ]))
        };
        let response = |body| {
            http::Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CONNECTION, "keep-alive")
                .body(body)
                .expect("response")
        };
        let (got, open) = written(response(body()), false).await;
        assert!(!open);
        let (head, rest) = got.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-type: text/event-stream\r\n"));
        assert!(head.contains("\r\ntransfer-encoding: chunked\r\n"));
        assert!(head.contains("\r\ndate: "));
        assert!(head.ends_with("\r\nconnection: close"), "{head}");
        assert!(!head.contains("keep-alive"));
        assert_eq!(
            rest,
            "d\r\nretry: 1000\n\n\r\n9\r\ndata: x\n\n\r\n0\r\n\r\n"
        );

        let (got, open) = written(response(body()), true).await;
        assert!(open);
        assert!(!got.contains("connection"), "{got}");
        assert!(got.ends_with("\r\n0\r\n\r\n"), "{got}");
    }

    #[tokio::test]
    async fn a_sized_body_has_a_content_length_and_204_none() {
        let response = http::Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from("{\"error\":1}"))
            .expect("response");
        let (got, _) = written(response, false).await;
        assert!(got.starts_with("HTTP/1.1 404 Not Found\r\n"), "{got}");
        assert!(got.contains("\r\ncontent-length: 11\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\n{\"error\":1}"), "{got}");

        let response = http::Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Body::empty())
            .expect("response");
        let (got, _) = written(response, false).await;
        assert!(got.starts_with("HTTP/1.1 204 No Content\r\n"), "{got}");
        assert!(
            !got.contains("content-length") && !got.contains("chunked"),
            "{got}"
        );
        assert!(got.ends_with("\r\nconnection: close\r\n\r\n"), "{got}");
    }

    #[test]
    fn connection_close_is_a_token() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, header::HeaderValue::from_static(v));
            wants_close(&h)
        };
        assert!(with("close"));
        assert!(with("Keep-Alive, Close"));
        assert!(!with("keep-alive"));
        assert!(!with("closed"));
        assert!(!wants_close(&HeaderMap::new()));
    }
}
