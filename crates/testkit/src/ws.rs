//! A WebSocket client of the edge's JSON protocol (`/v1/ws`), over any byte stream.

use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{
        self, Message, client::IntoClientRequest as _, protocol::frame::coding::CloseCode,
    },
};

/// Longest wait for any single message; generous so a loaded machine cannot flake.
pub const WAIT: Duration = Duration::from_secs(30);

/// A WebSocket client speaking the edge's JSON protocol.
pub struct Ws<S> {
    /// The socket, for frames the protocol methods do not send.
    pub socket: WebSocketStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    /// Wraps an open socket (over HTTP/1.1 or HTTP/2).
    pub fn new(socket: WebSocketStream<S>) -> Self {
        Self { socket }
    }

    /// Sends one frame.
    pub async fn send(&mut self, msg: Message) {
        self.socket.send(msg).await.expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send(Message::text(value.to_string())).await;
    }

    /// The next frame of any kind (including pings and the close frame); panics on timeout,
    /// error or end of stream.
    pub async fn next_frame(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.socket.next())
            .await
            .expect("a frame within the timeout")
            .expect("socket still open")
            .expect("no socket error")
    }

    /// The next JSON message, skipping WebSocket pings and pongs.
    pub async fn next_json(&mut self) -> Value {
        loop {
            match self.next_frame().await {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON text"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Reads until the close frame (skipping anything else) and returns its code.
    pub async fn close_code(&mut self) -> CloseCode {
        loop {
            match self.next_frame().await {
                Message::Close(Some(frame)) => return frame.code,
                Message::Close(None) => panic!("close frame without a code"),
                _ => continue,
            }
        }
    }

    /// `start` → `started` (echoing `request_id`); returns the new stream's id.
    pub async fn start(&mut self, request_id: &str, request: Value) -> String {
        self.send_json(json!({"type": "start", "request_id": request_id, "request": request}))
            .await;
        let started = self.next_json().await;
        assert_eq!(started["type"], "started", "{started}");
        assert_eq!(started["request_id"], request_id);
        started["stream_id"]
            .as_str()
            .expect("stream_id")
            .to_string()
    }

    /// Reads the events of `stream_id` up to and including its terminal event; every message
    /// read must belong to that stream.
    pub async fn events_until_terminal(&mut self, stream_id: &str) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let e = self.next_json().await;
            assert_eq!(e["stream_id"], stream_id, "an event of this stream: {e}");
            let terminal = is_terminal(&e);
            events.push(e);
            if terminal {
                return events;
            }
        }
    }

    /// Sends `ping` with `id` and returns every message read before the matching `pong`.
    pub async fn until_pong(&mut self, id: &str) -> Vec<Value> {
        self.send_json(json!({"type": "ping", "id": id})).await;
        let mut before = Vec::new();
        loop {
            let v = self.next_json().await;
            if v["type"] == "pong" && v["id"] == id {
                return before;
            }
            before.push(v);
        }
    }

    /// Asserts nothing is pending: a `ping` is answered by the very next message.
    pub async fn assert_quiet(&mut self) {
        let before = self.until_pong("quiet").await;
        assert!(before.is_empty(), "unexpected messages: {before:?}");
    }
}

/// A client over a plain TCP connection.
pub type TcpWs = Ws<MaybeTlsStream<TcpStream>>;

impl TcpWs {
    /// Opens `ws://<addr>/v1/ws` over HTTP/1.1 (the upgrade must succeed).
    pub async fn connect(addr: std::net::SocketAddr) -> Self {
        let (socket, response) = connect_async(format!("ws://{addr}/v1/ws"))
            .await
            .expect("WebSocket upgrade");
        assert_eq!(response.status(), 101);
        Self { socket }
    }

    /// Opens `<base>/v1/ws<query>` (`base` an `http://` URL) with these headers; the
    /// refusal's status on failure.
    pub async fn open(base: &str, query: &str, headers: &[(&str, &str)]) -> Result<Self, u16> {
        let url = format!("{}/v1/ws{query}", base.replacen("http://", "ws://", 1));
        let mut request = url.into_client_request().expect("request");
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        match connect_async(request).await {
            Ok((socket, _)) => Ok(Self { socket }),
            Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
            Err(other) => panic!("unexpected connect error: {other}"),
        }
    }
}

/// Whether a WebSocket message is a stream's terminal event (`done`, or `error` with a `seq`).
pub fn is_terminal(e: &Value) -> bool {
    e["type"] == "done" || (e["type"] == "error" && e.get("seq").is_some())
}
