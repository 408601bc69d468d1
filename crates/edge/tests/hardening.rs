//! Limits that must hold for every kind of connection and client: the connection caps count
//! upgraded WebSockets and HTTP/2 streams, a client that stops reading is closed after
//! `--write-timeout-secs` and counted, and a WebSocket client that floods is refused, then
//! closed.

use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokenfan_testkit::{
    edge::{TestEdge, fast, slow},
    wait::wait_until,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::{
    client_async, connect_async,
    tungstenite::{self, Message, protocol::frame::coding::CloseCode},
};

/// Held by the tests that wait for `tokenfan_edge_write_timeouts_total` to move: the counter
/// is shared by every edge of this test process, so only one of them may make it move at once.
static WRITE_TIMEOUT_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The value of one Prometheus series (0 when absent).
fn series(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn ws_url(edge: &TestEdge) -> String {
    format!("ws://{}/v1/ws", edge.addr)
}

/// The HTTP status a refused WebSocket handshake got.
fn refused_status(result: Result<impl Sized, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, the socket opened"),
    }
}

#[tokio::test]
async fn upgraded_websockets_count_against_the_per_address_cap_until_they_close() {
    let edge = TestEdge::with(|c| c.limits.max_connections_per_ip = 2).await;
    let url = ws_url(&edge).await;
    let (mut first, _) = connect_async(&url).await.expect("first socket");
    let (mut second, _) = connect_async(&url).await.expect("second socket");
    // Both sockets work after their HTTP connections were handed off.
    for ws in [&mut first, &mut second] {
        ws.send(Message::text(r#"{"type":"ping"}"#))
            .await
            .expect("send");
        let pong = ws.next().await.expect("frame").expect("ok");
        assert_eq!(pong.to_text().expect("text"), r#"{"type":"pong"}"#);
    }
    assert_eq!(refused_status(connect_async(&url).await), 429);
    // Plain requests from the address are refused too while both sockets are open.
    let r = edge.http.get(edge.url("/healthz")).send().await;
    assert_eq!(r.expect("answer").status(), 429);
    first.close(None).await.expect("close");
    drop(first);
    let (third, _) = wait_until(Duration::from_secs(10), || async {
        connect_async(&url).await.ok()
    })
    .await;
    drop((second, third));
}

#[tokio::test]
async fn upgraded_websockets_count_against_max_connections() {
    let edge = TestEdge::with(|c| c.http.max_connections = 2).await;
    let url = ws_url(&edge).await;
    let sockets = [
        connect_async(&url).await.expect("first").0,
        connect_async(&url).await.expect("second").0,
    ];
    assert_eq!(refused_status(connect_async(&url).await), 503);
    drop(sockets);
    wait_until(Duration::from_secs(10), || async {
        connect_async(&url).await.ok()
    })
    .await;
}

#[tokio::test]
async fn http2_requests_in_flight_count_against_the_per_address_cap() {
    let edge = TestEdge::with(|c| c.limits.max_connections_per_ip = 2).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let open = |h2: reqwest::Client| {
        let url = edge.url("/v1/streams");
        async move {
            h2.post(url)
                .header("accept", "text/event-stream")
                .json(&slow("long", 200, 200))
                .send()
                .await
                .expect("answer")
        }
    };
    let first = open(h2.clone()).await;
    let second = open(h2.clone()).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    let third = open(h2.clone()).await;
    assert_eq!(third.status(), 429, "a third stream over one connection");
    let body: Value = third.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_connections");
    // Once a response ends, its slot is free again.
    drop(first);
    wait_until(Duration::from_secs(10), || async {
        let r = open(h2.clone()).await;
        (r.status() == 200).then_some(())
    })
    .await;
    drop(second);
}

/// A client socket with a tiny receive buffer, so that the edge's writes stall soon.
async fn tight_socket(edge: &TestEdge) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(edge.addr).await.expect("connect")
}

#[tokio::test]
async fn an_sse_client_that_stops_reading_is_closed_and_counted() {
    let _serial = WRITE_TIMEOUT_TESTS.lock().await;
    let edge = TestEdge::with(|c| c.http.write_timeout_secs = 1).await;
    let metric = r#"tokenfan_edge_write_timeouts_total{transport="http"}"#;
    let before = series(&edge.metrics().await, metric);
    let id = edge.create(fast("a long answer", 4096, 3)).await;
    edge.wait_finished(&id).await;
    // Replays of the whole stream, pipelined, many more than the kernel buffers hold; the
    // client then stops reading and the edge's writes stall.
    let mut tcp = tight_socket(&edge).await;
    let request = format!("GET /v1/streams/{id}/events HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut head = [0u8; 12];
    tcp.write_all(request.as_bytes()).await.expect("write");
    tcp.read_exact(&mut head).await.expect("status line");
    assert_eq!(&head, b"HTTP/1.1 200");
    tcp.write_all(request.repeat(600).as_bytes())
        .await
        .expect("write");
    wait_until(Duration::from_secs(30), || async {
        (series(&edge.metrics().await, metric) > before).then_some(())
    })
    .await;
    // What was sent before the stall is still readable, then the connection ends.
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the edge closed the connection");
}

#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_closed_and_counted() {
    let _serial = WRITE_TIMEOUT_TESTS.lock().await;
    let edge = TestEdge::with(|c| {
        c.http.write_timeout_secs = 1;
        c.http.ws_messages_per_sec = 10_000;
    })
    .await;
    let metric = r#"tokenfan_edge_write_timeouts_total{transport="ws"}"#;
    let before = series(&edge.metrics().await, metric);
    let tcp = tight_socket(&edge).await;
    let (mut ws, _) = client_async(ws_url(&edge).await, tcp)
        .await
        .expect("handshake");
    // Each pong echoes a 60 KB id: far more than the socket buffers hold.
    let id = "x".repeat(60_000);
    for _ in 0..200 {
        let ping = Message::text(json!({"type": "ping", "id": id}).to_string());
        if ws.send(ping).await.is_err() {
            break; // the edge already gave up on this client
        }
    }
    wait_until(Duration::from_secs(20), || async {
        (series(&edge.metrics().await, metric) > before).then_some(())
    })
    .await;
    // Reading again: the pongs that got through, then the end of the socket.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the edge closed the socket");
    if let Some(code) = ended {
        assert_eq!(code, CloseCode::Policy);
    }
}

#[tokio::test]
async fn a_websocket_client_over_the_message_rate_is_refused_then_closed() {
    let edge = TestEdge::with(|c| c.http.ws_messages_per_sec = 1).await;
    let (mut ws, _) = connect_async(ws_url(&edge).await).await.expect("socket");
    for _ in 0..40 {
        ws.send(Message::text(r#"{"type":"ping"}"#))
            .await
            .expect("send");
    }
    let mut pongs = 0;
    let mut refused = 0;
    let close = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("json");
                    match v["type"].as_str() {
                        Some("pong") => pongs += 1,
                        Some("error") => {
                            assert_eq!(v["code"], "rate_limited", "{v}");
                            refused += 1;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
    .expect("the socket closes");
    assert_eq!(close, Some(CloseCode::Policy));
    assert!((1..=3).contains(&pongs), "the burst is answered: {pongs}");
    assert!(refused >= 5, "refusals before the close: {refused}");
}

#[tokio::test]
async fn an_http2_response_stalled_by_flow_control_closes_its_connection() {
    let _serial = WRITE_TIMEOUT_TESTS.lock().await;
    let edge = TestEdge::with(|c| c.http.write_timeout_secs = 1).await;
    let metric = r#"tokenfan_edge_write_timeouts_total{transport="http"}"#;
    let id = edge.create(fast("a long answer", 4096, 3)).await;
    edge.wait_finished(&id).await;
    let before = series(&edge.metrics().await, metric);
    // A client that stops reading one HTTP/2 response: its stream window (64 KiB) fills and
    // the edge can send no more on it, while the socket itself stays writable.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .http2_adaptive_window(false)
        .http2_initial_stream_window_size(65_535)
        .build()
        .expect("client");
    let r = h2
        .get(edge.url(&format!("/v1/streams/{id}/events?format=openai")))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    wait_until(Duration::from_secs(30), || async {
        (series(&edge.metrics().await, metric) > before).then_some(())
    })
    .await;
    // Reading now: what was sent, then the end of a closed connection (no `[DONE]`).
    let body = tokio::time::timeout(Duration::from_secs(30), r.text())
        .await
        .expect("the body ends");
    if let Ok(text) = body {
        assert!(!text.contains("[DONE]"), "the response was cut");
    }
}
