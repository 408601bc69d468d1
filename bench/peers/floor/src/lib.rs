//! The floor peer of `make bench`: the smallest server that does the per-token work of
//! tokenfan's POST-SSE, so every run can say what tokenfan costs per token *relative to* that.
//!
//! What it does, and nothing more: HTTP/1.1 on tokio with no HTTP library (request line,
//! headers, a `Content-Length` body, keep-alive, several requests per connection, pipelining);
//! `POST /v1/streams` with `Accept: text/event-stream` answers a chunked `text/event-stream`
//! whose events follow tokenfan's native framing ([protocol.md](../../../docs/protocol.md) §3,
//! §5): `id: <seq>`, `event: token|done`, `data: <json>`, one `write` per token on the
//! stream's own timer (first token after `timing.ttft_ms`, then one every
//! `timing.inter_token_ms`, each deadline counted from the request so a late timer does not
//! push the rest back); `GET /healthz` answers 200. Tokens are words from a fixed list; an
//! answer's length is drawn from the seed, uniform over 110–450 tokens (the range of the mock
//! generator's and the Express peer's answers), cut at `max_tokens` (`finish_reason`
//! `length`, else `stop`). `emitted_at_unix_nanos` (with `"emit_times": true`) is the wall clock
//! when the token's timer fired.
//!
//! No history, no fan-out, no resume, no other transport: it is a floor, not a peer product.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::Instant,
};

/// Longest request head accepted (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Bounds of the request's numbers (the edge's own limits are of the same order).
const MAX_TOKENS: u64 = 100_000;
const MAX_TTFT_MS: u64 = 30_000;
const MAX_INTER_TOKEN_MS: u64 = 10_000;
/// An answer's length, drawn from the seed (the mock generator's range).
const ANSWER_MIN: u64 = 110;
const ANSWER_MAX: u64 = 450;

/// Token texts (some multi-byte, as in the generator's corpus). None needs JSON escaping.
const WORDS: [&str; 16] = [
    " the", " stream", " of", " tokens", " arrives", " on", " time", ",", " one", " write", " per",
    " token", ".", " 流", " 式", " ✨",
];

/// Accepts connections until the listener fails for good. A failed accept (out of file
/// descriptors) is reported and retried after a pause instead of ending the server.
pub async fn serve(listener: TcpListener) -> io::Result<()> {
    let ids = std::sync::Arc::new(AtomicU64::new(1));
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                // One write per token must leave at once, as the edge's do.
                socket.set_nodelay(true)?;
                let ids = ids.clone();
                tokio::spawn(async move {
                    // A connection's failure (reset, bad request already answered) is its own.
                    let _ = connection(socket, &ids).await;
                });
            }
            Err(e) => {
                eprintln!("tokenfan-floor: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// HTTP/1.0, or `Connection: close`.
    pub close: bool,
    pub content_length: usize,
    pub accepts_sse: bool,
}

/// Why a request head was refused: the status and the message of the answer.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub u16, pub &'static str);

/// Parses a request head (everything before the blank line, without it).
pub fn parse_head(head: &[u8]) -> Result<Head<'_>, BadRequest> {
    let text =
        std::str::from_utf8(head).map_err(|_| BadRequest(400, "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest(400, "malformed request line"));
    };
    let mut close = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(BadRequest(505, "HTTP/1.1 only")),
    };
    let mut content_length = 0;
    let mut accepts_sse = false;
    for header in lines {
        let Some((name, value)) = header.split_once(':') else {
            return Err(BadRequest(400, "malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| BadRequest(400, "content-length is not a number"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(BadRequest(411, "chunked request bodies are not supported"));
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("accept") {
            accepts_sse |= value.contains("text/event-stream");
        }
    }
    if content_length > MAX_BODY {
        return Err(BadRequest(413, "request body too large"));
    }
    Ok(Head {
        method,
        path,
        close,
        content_length,
        accepts_sse,
    })
}

/// The parts of tokenfan's `POST /v1/streams` body the floor uses; the rest is ignored.
#[derive(Debug, Deserialize)]
pub struct StreamRequest {
    #[serde(default)]
    pub prompt: String,
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub emit_times: bool,
}

#[derive(Debug, Deserialize)]
pub struct Timing {
    pub ttft_ms: u64,
    pub inter_token_ms: u64,
    #[serde(default)]
    pub jitter_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ttft_ms: 100,
            inter_token_ms: 20,
            jitter_ms: 0,
        }
    }
}

/// The request's stream, or why it is refused.
pub fn parse_stream_request(body: &[u8]) -> Result<StreamRequest, String> {
    let r: StreamRequest = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    let max = r.max_tokens.unwrap_or(256);
    if max == 0 || max > MAX_TOKENS {
        return Err(format!("max_tokens: expected 1..={MAX_TOKENS}"));
    }
    if r.timing.ttft_ms > MAX_TTFT_MS || r.timing.inter_token_ms > MAX_INTER_TOKEN_MS {
        return Err(format!(
            "timing: ttft_ms ≤ {MAX_TTFT_MS} and inter_token_ms ≤ {MAX_INTER_TOKEN_MS}"
        ));
    }
    if r.timing.jitter_ms != 0 {
        return Err("timing.jitter_ms: the floor supports 0 only".to_owned());
    }
    Ok(r)
}

/// SplitMix64 finaliser: the token draw and the answer length from the seed.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Tokens the stream sends and its finish reason.
pub fn plan(seed: u64, max_tokens: u64) -> (u64, &'static str) {
    let answer = ANSWER_MIN + mix(seed) % (ANSWER_MAX - ANSWER_MIN + 1);
    if answer > max_tokens {
        (max_tokens, "length")
    } else {
        (answer, "stop")
    }
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Appends one SSE event as one HTTP/1.1 chunk to `out` (`frame` is scratch space).
fn chunk(out: &mut Vec<u8>, frame: &mut Vec<u8>, seq: u64, kind: &str, data: &[u8]) {
    use std::io::Write as _;
    frame.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(frame, "id: {seq}\nevent: {kind}\ndata: ");
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\n\n");
    let _ = write!(out, "{:x}\r\n", frame.len());
    out.extend_from_slice(frame);
    out.extend_from_slice(b"\r\n");
}

async fn respond(socket: &mut TcpStream, status: u16, body: &str, close: bool) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        406 => "Not Acceptable",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    let conn = if close { "connection: close\r\n" } else { "" };
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{conn}\r\n{body}",
        body.len()
    );
    socket.write_all(text.as_bytes()).await
}

fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"error": {"code": code, "message": message}}).to_string()
}

/// Serves one connection: requests one after the other until the client closes it.
async fn connection(mut socket: TcpStream, ids: &AtomicU64) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // The head: read until the blank line.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                let body = error_body("invalid_request", "request head too large");
                return respond(&mut socket, 431, &body, true).await;
            }
            if socket.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = match parse_head(&buf[..head_end]) {
            Ok(h) => h,
            Err(BadRequest(status, message)) => {
                let body = error_body("invalid_request", message);
                return respond(&mut socket, status, &body, true).await;
            }
        };
        let (method, path) = (head.method.to_owned(), head.path.to_owned());
        let (close, sse, len) = (head.close, head.accepts_sse, head.content_length);
        let body_start = head_end + 4;
        while buf.len() < body_start + len {
            if socket.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let body: Vec<u8> = buf[body_start..body_start + len].to_vec();
        // What follows the body is the next (pipelined) request.
        buf.drain(..body_start + len);

        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => respond(&mut socket, 200, "{\"status\":\"ok\"}", close).await?,
            ("POST", "/v1/streams") if sse => match parse_stream_request(&body) {
                Ok(request) => {
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    stream(&mut socket, &request, id, close).await?;
                }
                Err(message) => {
                    let body = error_body("invalid_request", &message);
                    respond(&mut socket, 400, &body, close).await?;
                }
            },
            ("POST", "/v1/streams") => {
                let body = error_body(
                    "not_supported",
                    "the floor serves POST /v1/streams with Accept: text/event-stream only",
                );
                respond(&mut socket, 406, &body, close).await?;
            }
            _ => {
                let body = error_body("not_found", "no such route on the floor");
                respond(&mut socket, 404, &body, close).await?;
            }
        }
        if close {
            return socket.shutdown().await;
        }
    }
}

/// One POST-SSE stream: the head, one write per token on the stream's timer, then the `done`
/// event and the last chunk in one write.
async fn stream(socket: &mut TcpStream, r: &StreamRequest, id: u64, close: bool) -> io::Result<()> {
    let start = Instant::now();
    let (tokens, finish) = plan(r.seed, r.max_tokens.unwrap_or(256));
    let conn = if close { "connection: close\r\n" } else { "" };
    // 22 characters, like a tokenfan stream id.
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         transfer-encoding: chunked\r\nx-stream-id: floor{id:017}\r\n{conn}\r\n"
    );
    socket.write_all(head.as_bytes()).await?;
    let ttft = Duration::from_millis(r.timing.ttft_ms);
    let gap = Duration::from_millis(r.timing.inter_token_ms);
    let mut out = Vec::with_capacity(256);
    let mut frame = Vec::with_capacity(192);
    let mut data = Vec::with_capacity(160);
    for i in 0..tokens {
        let due = start + ttft + gap * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due).await;
        let seq = i + 1;
        let word = WORDS[(mix(r.seed ^ seq.rotate_left(32)) % WORDS.len() as u64) as usize];
        data.clear();
        {
            use std::io::Write as _;
            let _ = write!(
                data,
                "{{\"type\":\"token\",\"seq\":{seq},\"text\":\"{word}\""
            );
            if r.emit_times {
                let _ = write!(data, ",\"emitted_at_unix_nanos\":{}", unix_nanos());
            }
            data.push(b'}');
        }
        out.clear();
        chunk(&mut out, &mut frame, seq, "token", &data);
        socket.write_all(&out).await?;
    }
    let prompt_tokens = r.prompt.split_whitespace().count();
    let done = format!(
        "{{\"type\":\"done\",\"seq\":{},\"finish_reason\":\"{finish}\",\"usage\":\
         {{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{tokens}}}}}",
        tokens + 1
    );
    out.clear();
    chunk(&mut out, &mut frame, tokens + 1, "done", done.as_bytes());
    out.extend_from_slice(b"0\r\n\r\n");
    socket.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = parse_head(
            b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Length: 12",
        )
        .expect("valid");
        assert_eq!(
            h,
            Head {
                method: "POST",
                path: "/v1/streams",
                close: false,
                content_length: 12,
                accepts_sse: true
            }
        );
        assert!(parse_head(b"GET / HTTP/1.0").expect("valid").close);
        assert_eq!(parse_head(b"GET /").unwrap_err().0, 400);
        assert_eq!(parse_head(b"GET / HTTP/2").unwrap_err().0, 505);
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\ncontent-length: x")
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked")
                .unwrap_err()
                .0,
            411
        );
    }

    #[test]
    fn requests() {
        let r = parse_stream_request(
            br#"{"prompt":"a b","max_tokens":50,"seed":7,"timing":{"ttft_ms":20,"inter_token_ms":20,"jitter_ms":0},"emit_times":true,"model":"x"}"#,
        )
        .expect("valid");
        assert_eq!((r.max_tokens, r.seed, r.timing.ttft_ms), (Some(50), 7, 20));
        assert!(parse_stream_request(br#"{"max_tokens":0}"#).is_err());
        assert!(
            parse_stream_request(br#"{"timing":{"ttft_ms":1,"inter_token_ms":1,"jitter_ms":3}}"#)
                .is_err()
        );
        assert!(parse_stream_request(b"nope").is_err());
        // Every answer is at least 110 tokens: 50 are always cut.
        assert_eq!(plan(1, 50), (50, "length"));
        let (n, reason) = plan(1, 1000);
        assert!((ANSWER_MIN..=ANSWER_MAX).contains(&n) && reason == "stop");
    }

    /// Two streams back to back on one kept-alive connection, read as raw bytes.
    #[tokio::test]
    async fn streams_on_a_kept_alive_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener));
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let body = br#"{"max_tokens":3,"seed":1,"timing":{"ttft_ms":1,"inter_token_ms":1},"emit_times":true}"#;
        for _ in 0..2 {
            let req = format!(
                "POST /v1/streams HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            c.write_all(req.as_bytes()).await.expect("write");
            c.write_all(body).await.expect("write");
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !got.ends_with(b"0\r\n\r\n") {
                let mut b = [0u8; 1024];
                let n = tokio::time::timeout_at(deadline, c.read(&mut b))
                    .await
                    .expect("the stream ends in time")
                    .expect("read");
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&b[..n]);
            }
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            for seq in 1..=3 {
                assert!(
                    text.contains(&format!(
                        "id: {seq}\nevent: token\ndata: {{\"type\":\"token\",\"seq\":{seq},"
                    )),
                    "{text}"
                );
            }
            assert!(text.contains("\"emitted_at_unix_nanos\":"), "{text}");
            assert!(text.contains(r#""type":"done","seq":4,"finish_reason":"length","usage":{"prompt_tokens":0,"completion_tokens":3}"#), "{text}");
        }
    }
}
