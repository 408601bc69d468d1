//! A raw HTTP/1.1 `GET` of an SSE body on a plain TCP socket: the `watch` viewers' path to
//! `http://` targets over HTTP/1.1. One task and one `read` per wake-up, the body decoded in
//! place (chunked, `Content-Length` or close-delimited), no HTTP client library between the
//! socket and the SSE parser: thousands of viewers per process cost the load generator about
//! what they cost a minimal reader (`min-reader`), so it does not measure itself.

use std::io;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Longest response head and chunk-size line accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Why a raw request failed.
#[derive(Debug)]
pub enum RawError {
    /// The connection could not be made.
    Connect(io::Error),
    /// Writing the request or reading the head failed.
    Io(io::Error),
    /// A status other than 200, with the start of the body.
    Status(u16, String),
    /// Not an HTTP/1.1 response the reader understands.
    Malformed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk: bytes left.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk.
    Trailer,
    /// `Content-Length` body: bytes left.
    Length(u64),
    /// Body delimited by the connection's close.
    Close,
    Done,
}

/// An SSE response body read straight off its socket.
pub struct RawBody {
    stream: TcpStream,
    /// Bytes read and not decoded yet.
    buf: Vec<u8>,
    /// The body bytes of the last [`RawBody::chunk`].
    out: Vec<u8>,
    state: State,
}

/// Connects to `host` (`HOST:PORT`) and sends `GET path` with `Accept: text/event-stream`
/// and the extra headers; returns the body once the head says 200.
pub async fn get(host: &str, path: &str, headers: &[(&str, String)]) -> Result<RawBody, RawError> {
    let mut stream = TcpStream::connect(host).await.map_err(RawError::Connect)?;
    stream.set_nodelay(true).map_err(RawError::Io)?;
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\naccept: text/event-stream\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(RawError::Io)?;
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(RawError::Malformed("response head too large".to_owned()));
        }
        if stream.read_buf(&mut buf).await.map_err(RawError::Io)? == 0 {
            return Err(RawError::Malformed(
                "connection closed before the response head".to_owned(),
            ));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RawError::Malformed(format!("status line {status_line:?}")))?;
    let mut state = State::Close;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            state = State::Size;
        } else if name.eq_ignore_ascii_case("content-length") && state == State::Close {
            let n = value
                .parse()
                .map_err(|_| RawError::Malformed(format!("content-length {value:?}")))?;
            state = State::Length(n);
        }
    }
    let mut body = RawBody {
        stream,
        buf,
        out: Vec::with_capacity(1024),
        state,
    };
    if status != 200 {
        // What the body holds so far is enough to say why.
        let text = match body.chunk().await {
            Ok(Some(b)) => String::from_utf8_lossy(b).chars().take(300).collect(),
            _ => String::new(),
        };
        return Err(RawError::Status(status, text));
    }
    Ok(body)
}

impl RawBody {
    /// The next body bytes (every byte decoded from one or more reads), None at the end.
    pub async fn chunk(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            self.out.clear();
            self.decode()?;
            if !self.out.is_empty() {
                return Ok(Some(&self.out));
            }
            if self.state == State::Done {
                return Ok(None);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return match self.state {
                    State::Close => {
                        self.state = State::Done;
                        Ok(None)
                    }
                    _ => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside the body",
                    )),
                };
            }
        }
    }

    /// Moves what `buf` holds of the body into `out`.
    fn decode(&mut self) -> io::Result<()> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            match self.state {
                State::Done => break,
                State::Close => {
                    self.out.extend_from_slice(rest);
                    pos = self.buf.len();
                    break;
                }
                State::Length(n) => {
                    let take = rest.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    self.out.extend_from_slice(&rest[..take]);
                    pos += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    if left > 0 {
                        break;
                    }
                }
                State::Size | State::Trailer => {
                    let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if rest.len() > MAX_HEAD {
                            return Err(bad("chunk-size line too long"));
                        }
                        break;
                    };
                    let line = &rest[..nl];
                    pos += nl + 2;
                    if self.state == State::Trailer {
                        if line.is_empty() {
                            self.state = State::Done;
                        }
                        continue;
                    }
                    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                        .ok_or_else(|| bad("bad chunk size"))?;
                    self.state = if size == 0 {
                        State::Trailer
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(n) => {
                    let take = rest.len().min(n);
                    self.out.extend_from_slice(&rest[..take]);
                    pos += take;
                    if take < n {
                        self.state = State::Data(n - take);
                        break;
                    }
                    self.state = State::DataEnd;
                }
                State::DataEnd => {
                    if rest.len() < 2 {
                        break;
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(bad("no CRLF after chunk data"));
                    }
                    pos += 2;
                    self.state = State::Size;
                }
            }
        }
        self.buf.drain(..pos);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers one request with `response`, written in pieces of `split` bytes.
    async fn serve_once(response: &'static [u8], split: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            for piece in response.chunks(split) {
                let _ = s.write_all(piece).await;
                let _ = s.flush().await;
                tokio::task::yield_now().await;
            }
        });
        addr
    }

    async fn body_of(response: &'static [u8], split: usize) -> Result<Vec<u8>, String> {
        let addr = serve_once(response, split).await;
        let mut body = get(&addr, "/x", &[]).await.map_err(|e| format!("{e:?}"))?;
        let mut all = Vec::new();
        while let Some(b) = body.chunk().await.map_err(|e| e.to_string())? {
            all.extend_from_slice(b);
        }
        Ok(all)
    }

    #[tokio::test]
    async fn decodes_chunked_length_and_close_delimited_bodies_in_any_split() {
        const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in [1, 3, 7, 1000] {
            assert_eq!(
                body_of(CHUNKED, split).await.as_deref(),
                Ok(&b"hello, world"[..])
            );
        }
        const LENGTH: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndata";
        assert_eq!(body_of(LENGTH, 2).await.as_deref(), Ok(&b"data"[..]));
        const CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nuntil the end";
        assert_eq!(
            body_of(CLOSE, 5).await.as_deref(),
            Ok(&b"until the end"[..])
        );
    }

    #[tokio::test]
    async fn a_status_other_than_200_and_a_cut_body_are_errors() {
        const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nno stream";
        let addr = serve_once(NOT_FOUND, 1000).await;
        match get(&addr, "/x", &[]).await {
            Err(RawError::Status(404, body)) => assert_eq!(body, "no stream"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        const CUT: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel";
        assert!(body_of(CUT, 1000).await.is_err());
        const BAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n";
        assert!(body_of(BAD, 1000).await.is_err());
    }
}
