//! The WebSocket transport against a real edge over real sockets: the JSON protocol (start,
//! subscribe, cancel, unsubscribe, ping), many streams per socket, protocol errors, limits,
//! the Origin check, server pings, and WebSocket over HTTP/2 (RFC 8441).

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use futures::SinkExt as _;
use serde_json::{Value, json};
use tokenfan_testkit::{
    edge::{TestEdge, fast, slow},
    sse::{assert_contiguous, text_of},
    wait::wait_until,
    ws::{TcpWs, WAIT, Ws, is_terminal},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{
            Role,
            frame::{
                Frame,
                coding::{CloseCode, Data, OpCode},
            },
        },
    },
};

/// Opens `ws://ADDR/v1/ws` over HTTP/1.1.
async fn connect(edge: &TestEdge) -> TcpWs {
    TcpWs::connect(edge.addr).await
}

/// Opens the socket with this `Origin` header; the refusal's status on failure.
async fn connect_with_origin(edge: &TestEdge, origin: &str) -> Result<TcpWs, u16> {
    TcpWs::open(&edge.url(""), "", &[("origin", origin)]).await
}

/// The event without the WebSocket's `stream_id`: the native JSON every transport sends.
fn native(e: &Value) -> Value {
    let mut e = e.clone();
    e.as_object_mut().expect("object").remove("stream_id");
    e
}

/// Asserts a protocol error: type, code, and no `seq`.
fn assert_protocol_error(e: &Value, code: &str) {
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], code, "{e}");
    assert!(e.get("seq").is_none(), "protocol errors carry no seq: {e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
}

/// Subscriptions currently attached to a stream on this edge.
async fn attached(edge: &TestEdge, id: &str) -> usize {
    let stream = edge.stream(id).await;
    stream.attached_count()
}

#[tokio::test]
async fn start_streams_every_token_then_one_done() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;
    let id = ws.start("r1", fast("hello websocket", 40, 3)).await;
    let events = ws.events_until_terminal(&id).await;
    assert_contiguous(&events, 1);
    let (last, tokens) = events.split_last().expect("events");
    assert!(tokens.iter().all(|e| e["type"] == "token"), "{tokens:?}");
    assert!(!tokens.is_empty());
    assert_eq!(last["type"], "done");
    assert_eq!(last["seq"], tokens.len() as u64 + 1);
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 40);
    // Exactly one terminal event: nothing follows it.
    ws.assert_quiet().await;

    // Short-poll sees the same events, byte for byte apart from the WebSocket's stream_id.
    let polled = edge.short_poll(&id, 0).await;
    assert_eq!(polled["status"], "done");
    let polled = polled["events"].as_array().expect("events").clone();
    assert_eq!(text_of(&polled), text_of(&events));
    assert_eq!(polled, events.iter().map(native).collect::<Vec<_>>());
}

#[tokio::test]
async fn several_streams_share_one_socket() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;
    let seeds = [21u64, 22, 23];
    for (i, seed) in seeds.iter().enumerate() {
        ws.send_json(json!({"type": "start", "request_id": format!("r{i}"),
            "request": fast("multiplexed", 30, *seed)}))
            .await;
    }
    let mut ids: HashMap<String, String> = HashMap::new(); // stream id → request id
    let mut events: HashMap<String, Vec<Value>> = HashMap::new();
    let mut finished = 0;
    while finished < seeds.len() {
        let v = ws.next_json().await;
        if v["type"] == "started" {
            let id = v["stream_id"].as_str().expect("stream_id").to_string();
            ids.insert(id, v["request_id"].as_str().expect("request_id").into());
            continue;
        }
        let id = v["stream_id"].as_str().expect("stream_id").to_string();
        assert!(
            ids.contains_key(&id),
            "`started` precedes the stream's events: {v}"
        );
        let list = events.entry(id).or_default();
        assert!(
            !list.last().is_some_and(is_terminal),
            "nothing after the terminal event: {v}"
        );
        if is_terminal(&v) {
            finished += 1;
        }
        list.push(v);
    }
    assert_eq!(ids.len(), 3, "three distinct streams");
    let mut request_ids: Vec<_> = ids.values().cloned().collect();
    request_ids.sort();
    assert_eq!(request_ids, ["r0", "r1", "r2"]);
    for (id, list) in &events {
        assert_contiguous(list, 1);
        assert_eq!(list.last().expect("events")["type"], "done");
        let polled = edge.short_poll(id, 0).await;
        assert_eq!(
            text_of(&list.iter().map(native).collect::<Vec<_>>()),
            text_of(polled["events"].as_array().expect("events"))
        );
    }
    ws.assert_quiet().await;
}

#[tokio::test]
async fn subscribe_replays_from_after_and_refuses_bad_subscriptions() {
    let edge = TestEdge::start().await;
    let id = edge.create(fast("subscribe me", 30, 5)).await;
    let all = edge.wait_finished(&id).await;
    let terminal = all.last().expect("events")["seq"].as_u64().expect("seq");
    assert!(terminal > 6);

    let mut ws = connect(&edge).await;
    ws.send_json(json!({"type": "subscribe", "stream_id": id, "after": 5}))
        .await;
    let events = ws.events_until_terminal(&id).await;
    assert_contiguous(&events, 6);
    assert_eq!(events.last().expect("events")["seq"], terminal);
    assert_eq!(
        events.iter().map(native).collect::<Vec<_>>(),
        all[5..].to_vec()
    );

    // `after` defaults to 0.
    let mut other = connect(&edge).await;
    other
        .send_json(json!({"type": "subscribe", "stream_id": id}))
        .await;
    let events = other.events_until_terminal(&id).await;
    assert_contiguous(&events, 1);
    assert_eq!(text_of(&events), text_of(&all));

    // Past the terminal event.
    ws.send_json(json!({"type": "subscribe", "stream_id": id, "after": terminal + 1}))
        .await;
    let e = ws.next_json().await;
    assert_protocol_error(&e, "cursor_out_of_range");
    assert_eq!(e["stream_id"], id.as_str());

    // Unknown and malformed ids, whatever the message.
    for kind in ["subscribe", "cancel", "unsubscribe"] {
        for unknown in ["AAAAAAAAAAAAAAAAAAAAAA", "not-a-stream-id"] {
            ws.send_json(json!({"type": kind, "stream_id": unknown}))
                .await;
            let e = ws.next_json().await;
            assert_protocol_error(&e, "stream_not_found");
            assert_eq!(e["stream_id"], unknown);
        }
    }
    ws.assert_quiet().await;
}

#[tokio::test]
async fn a_second_subscribe_to_the_same_stream_is_refused() {
    let edge = TestEdge::start().await;
    let id = edge.create(slow("twice", 200, 50)).await;
    let mut ws = connect(&edge).await;
    ws.send_json(json!({"type": "subscribe", "stream_id": id}))
        .await;
    let first = ws.next_json().await;
    assert_eq!(
        (&first["type"], &first["seq"]),
        (&json!("token"), &json!(1))
    );
    ws.send_json(json!({"type": "subscribe", "stream_id": id, "after": 0}))
        .await;
    // Tokens of the first subscription may come first; the refusal must come.
    let mut seqs = vec![1];
    let refusal = loop {
        let v = ws.next_json().await;
        if v["type"] == "error" {
            break v;
        }
        assert_eq!(v["type"], "token", "{v}");
        seqs.push(v["seq"].as_u64().expect("seq"));
    };
    assert_protocol_error(&refusal, "already_subscribed");
    assert_eq!(refusal["stream_id"], id.as_str());
    // The first subscription goes on, without duplicates.
    ws.send_json(json!({"type": "cancel", "stream_id": id}))
        .await;
    for e in ws.events_until_terminal(&id).await {
        seqs.push(e["seq"].as_u64().expect("seq"));
    }
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected);
}

#[tokio::test]
async fn cancel_answers_with_the_cancelled_terminal_event_and_stops_the_generator() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;
    let id = ws.start("c1", slow("cancel me", 200, 50)).await;
    let mut events = Vec::new();
    while events.len() < 3 {
        let e = ws.next_json().await;
        assert_eq!(e["type"], "token", "{e}");
        events.push(e);
    }
    assert_eq!(edge.generator_active(), 1);
    ws.send_json(json!({"type": "cancel", "stream_id": id}))
        .await;
    events.extend(ws.events_until_terminal(&id).await);
    assert_contiguous(&events, 1);
    let last = events.last().expect("terminal");
    assert_eq!(last["type"], "done", "{last}");
    assert_eq!(last["finish_reason"], "cancelled");
    assert!(last["seq"].as_u64().expect("seq") < 201, "cancelled early");
    ws.assert_quiet().await;
    wait_until(Duration::from_secs(10), || async {
        (edge.generator_active() == 0).then_some(())
    })
    .await;
    assert_eq!(edge.short_poll(&id, 0).await["status"], "cancelled");
}

#[tokio::test]
async fn cancel_of_a_stream_the_socket_does_not_follow_still_answers_with_its_terminal_event() {
    let edge = TestEdge::start().await;
    let id = edge.create(slow("someone else's", 200, 50)).await;
    let mut ws = connect(&edge).await;
    ws.send_json(json!({"type": "cancel", "stream_id": id}))
        .await;
    let e = ws.next_json().await;
    assert_eq!(e["type"], "done", "{e}");
    assert_eq!(e["stream_id"], id.as_str());
    assert_eq!(e["finish_reason"], "cancelled");
    let polled = edge.short_poll(&id, 0).await;
    assert_eq!(polled["status"], "cancelled");
    assert_eq!(
        &native(&e),
        polled["events"]
            .as_array()
            .expect("events")
            .last()
            .expect("terminal")
    );
    ws.assert_quiet().await;
}

#[tokio::test]
async fn unsubscribe_stops_one_stream_while_another_continues() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;
    let a = ws.start("a", slow("left behind", 2000, 20)).await;
    let b = ws.start("b", slow("kept", 60, 20)).await;
    // Both deliver.
    let mut seen_a = 0;
    let mut b_events = Vec::new();
    while seen_a == 0 || b_events.is_empty() {
        let e = ws.next_json().await;
        if e["stream_id"] == a.as_str() {
            seen_a += 1;
        } else {
            assert_eq!(e["stream_id"], b.as_str());
            b_events.push(e);
        }
    }
    ws.send_json(json!({"type": "unsubscribe", "stream_id": a}))
        .await;
    // Once the subscription is gone nothing more of `a` can be queued; what was queued before
    // comes ahead of the next pong.
    wait_until(Duration::from_secs(10), || async {
        (attached(&edge, &a).await == 0).then_some(())
    })
    .await;
    for e in ws.until_pong("after-unsubscribe").await {
        if e["stream_id"] == a.as_str() {
            seen_a += 1;
        } else {
            b_events.push(e);
        }
    }
    // `a` goes on generating past what this socket got, but none of it reaches the socket
    // while `b` runs to its end.
    wait_until(Duration::from_secs(20), || async {
        let polled = edge.short_poll(&a, 0).await;
        (polled["next_after"].as_u64().expect("next_after") > seen_a + 5).then_some(())
    })
    .await;
    if !b_events.last().is_some_and(is_terminal) {
        b_events.extend(ws.events_until_terminal(&b).await);
    }
    assert_contiguous(&b_events, 1);
    ws.assert_quiet().await;
    assert_eq!(
        edge.short_poll(&a, 0).await["status"],
        "running",
        "unsubscribe is not cancel"
    );
}

#[tokio::test]
async fn ping_gets_pong_echoing_the_id() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong"}));
    ws.send_json(json!({"type": "ping", "id": 42})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": 42}));
    ws.send_json(json!({"type": "ping", "id": "abc"})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": "abc"}));
}

#[tokio::test]
async fn protocol_errors_are_answered_and_the_socket_stays_usable() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;

    ws.send(Message::text("{not json")).await;
    assert_protocol_error(&ws.next_json().await, "invalid_json");

    ws.send_json(json!({"type": "dance"})).await;
    assert_protocol_error(&ws.next_json().await, "unknown_type");

    ws.send_json(json!({"type": "subscribe"})).await;
    assert_protocol_error(&ws.next_json().await, "invalid_message");

    // Invalid requests: the same code a POST of that body gets, echoing request_id.
    for (i, request) in [
        json!({"prompt": "a", "max_tokens": 0}),
        json!({"prompt": "a", "max_tokens": -1}),
        json!({"prompt": "a", "bogus": 1}),
        json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
        json!({"prompt": 5}),
    ]
    .into_iter()
    .enumerate()
    {
        let rid = format!("bad{i}");
        ws.send_json(json!({"type": "start", "request_id": rid, "request": request}))
            .await;
        let e = ws.next_json().await;
        assert_protocol_error(&e, "invalid_request");
        assert_eq!(e["request_id"], rid.as_str(), "{e}");
        assert!(e.get("stream_id").is_none(), "{e}");
        let posted = edge.post("/v1/streams", &request).await;
        assert_eq!(posted.status(), 400);
        let body: Value = posted.json().await.expect("json");
        assert_eq!(body["error"]["code"], "invalid_request", "{request}");
    }

    ws.send(Message::binary(vec![1u8, 2, 3])).await;
    assert_protocol_error(&ws.next_json().await, "unsupported_frame");

    // Still usable: a ping is answered and a stream runs.
    ws.send_json(json!({"type": "ping", "id": "still-here"}))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "pong", "id": "still-here"})
    );
    let id = ws.start("ok", fast("after errors", 10, 1)).await;
    let events = ws.events_until_terminal(&id).await;
    assert_contiguous(&events, 1);
}

#[tokio::test]
async fn a_message_over_64_kib_closes_with_1009() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;
    let big = json!({"type": "ping", "id": "x".repeat(65 * 1024)}).to_string();
    // The server may close while the message is still being written.
    let _ = ws.socket.send(Message::text(big)).await;
    assert_eq!(ws.close_code().await, CloseCode::Size);
}

#[tokio::test]
async fn a_fragmented_message_over_64_kib_closes_with_1009() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;
    // Five 15 KiB frames: each under the limit, the message over it.
    let piece = Bytes::from("x".repeat(15 * 1024));
    for i in 0..5 {
        let opcode = if i == 0 { Data::Text } else { Data::Continue };
        let frame = Frame::message(piece.clone(), OpCode::Data(opcode), i == 4);
        if ws.socket.send(Message::Frame(frame)).await.is_err() {
            break; // already closed
        }
    }
    assert_eq!(ws.close_code().await, CloseCode::Size);
}

#[tokio::test]
async fn a_message_just_under_64_kib_is_accepted() {
    let edge = TestEdge::start().await;
    let mut ws = connect(&edge).await;
    let id = "x".repeat(60 * 1024);
    ws.send_json(json!({"type": "ping", "id": id})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": id}));
}

#[tokio::test]
async fn subscriptions_per_socket_are_capped() {
    let edge = TestEdge::with(|c| c.http.ws_max_subscriptions = 2).await;
    let mut ws = connect(&edge).await;
    let a = ws.start("s1", slow("one", 200, 50)).await;
    let _b = ws.start("s2", slow("two", 200, 50)).await;
    ws.send_json(json!({"type": "start", "request_id": "s3", "request": slow("three", 200, 50)}))
        .await;
    let refusal = loop {
        let v = ws.next_json().await;
        if v["type"] != "token" {
            break v;
        }
    };
    assert_protocol_error(&refusal, "too_many_subscriptions");
    assert_eq!(refusal["request_id"], "s3");
    assert_eq!(
        edge.running.hub.len(),
        2,
        "the refused start created no stream"
    );
    // Leaving one makes room again.
    ws.send_json(json!({"type": "unsubscribe", "stream_id": a}))
        .await;
    ws.send_json(json!({"type": "start", "request_id": "s4", "request": fast("four", 5, 4)}))
        .await;
    let started = loop {
        let v = ws.next_json().await;
        if v["type"] != "token" {
            break v;
        }
    };
    assert_eq!(started["type"], "started", "{started}");
    assert_eq!(started["request_id"], "s4");
}

#[tokio::test]
async fn origins_are_checked_on_the_upgrade() {
    let edge = TestEdge::start().await;
    assert_eq!(
        connect_with_origin(&edge, "http://evil.example")
            .await
            .err(),
        Some(403)
    );
    let same = format!("http://{}", edge.addr);
    let mut ws = connect_with_origin(&edge, &same)
        .await
        .expect("same origin");
    ws.assert_quiet().await;
    let mut ws = connect(&edge).await; // no Origin: not a browser
    ws.assert_quiet().await;

    let edge = TestEdge::with(|c| c.cors_origins = vec!["http://app.example".into()]).await;
    let mut ws = connect_with_origin(&edge, "http://app.example")
        .await
        .expect("allowed origin");
    ws.assert_quiet().await;
    for refused in [
        "http://evil.example",
        "https://app.example",
        "http://app.example.evil",
    ] {
        assert_eq!(
            connect_with_origin(&edge, refused).await.err(),
            Some(403),
            "{refused}"
        );
    }
}

#[tokio::test]
async fn server_pings_keep_a_reading_client_and_close_a_silent_one() {
    let edge = TestEdge::with(|c| c.http.ws_ping_secs = 1).await;

    // A reading client answers every ping (tungstenite does it while reading). Two unanswered
    // pings would close the socket before the third ping, so a fourth ping proves the pongs
    // count.
    let mut reader = connect(&edge).await;
    let mut pings = 0;
    while pings < 4 {
        match reader.next_frame().await {
            Message::Ping(_) => pings += 1,
            other => panic!("only pings expected, got {other:?}"),
        }
    }
    reader.assert_quiet().await;

    // A client that never reads answers no ping: the server closes it with 1008 and gives the
    // socket up. (Raw bytes here: a tungstenite client would answer pings as soon as it read.)
    let (mut silent, mut received) = raw_upgrade(&edge).await;
    let start = json!({"type": "start", "request_id": "quiet",
        "request": slow("nobody listens", 4000, 50)});
    silent
        .write_all(&masked_text_frame(&start.to_string()))
        .await
        .expect("write start");
    tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut received))
        .await
        .expect("the server closes the socket")
        .expect("read");
    let frames = parse_frames(&received);
    let (close, before) = frames.split_last().expect("frames");
    assert_eq!(close.0, OP_CLOSE, "the last frame is a close frame");
    assert_eq!(close.1[..2], 1008u16.to_be_bytes(), "close code 1008");
    assert!(
        before.iter().any(|(op, _)| *op == OP_PING),
        "the server pinged first"
    );
    let started: Value = before
        .iter()
        .find(|(op, _)| *op == OP_TEXT)
        .map(|(_, payload)| serde_json::from_slice(payload).expect("JSON"))
        .expect("`started`");
    assert_eq!(started["type"], "started");
    let id = started["stream_id"].as_str().expect("stream_id");
    // The dead socket's subscription is gone; the stream itself keeps its detach grace.
    wait_until(Duration::from_secs(10), || async {
        (attached(&edge, id).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        edge.short_poll(id, 0).await["status"],
        "running",
        "closing is not cancel"
    );
}

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// Upgrades a raw TCP connection to a WebSocket by hand; returns it and any bytes read past
/// the 101 response.
async fn raw_upgrade(edge: &TestEdge) -> (TcpStream, Vec<u8>) {
    let mut tcp = TcpStream::connect(edge.addr).await.expect("connect");
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        edge.addr
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .expect("response within the timeout")
            .expect("read");
        assert!(n > 0, "connection closed during the handshake");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (tcp, buf[end..].to_vec())
}

/// A client text frame (masked, with a zero mask key).
fn masked_text_frame(text: &str) -> Vec<u8> {
    let mut frame = vec![0x80 | OP_TEXT];
    match text.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&u16::try_from(n).expect("short").to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// Splits server frames (unmasked) into (opcode, payload).
fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 2, "truncated frame header");
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        let (len, start) = match bytes[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 => {
                let len = u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes"));
                (usize::try_from(len).expect("length"), 10)
            }
            n => (usize::from(n), 2),
        };
        assert!(bytes.len() >= start + len, "truncated frame");
        frames.push((bytes[0] & 0x0f, bytes[start..start + len].to_vec()));
        bytes = &bytes[start + len..];
    }
    frames
}

mod h2 {
    //! WebSocket over HTTP/2 extended CONNECT (RFC 8441), h2c prior knowledge on the same port.

    use http_body_util::Empty;
    use hyper::{Method, Request, client::conn::http2::SendRequest, ext::Protocol};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    /// An h2c connection (prior knowledge); returns once the server's SETTINGS announced the
    /// extended CONNECT protocol (without it hyper refuses to send `:protocol`).
    async fn handshake(edge: &TestEdge) -> SendRequest<Empty<Bytes>> {
        let tcp = TcpStream::connect(edge.addr).await.expect("connect");
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
        let (enabled_tx, enabled_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // hyper processes frames in a task of its own, so the flag is polled, not awaited.
            let mut conn = Box::pin(conn);
            let mut enabled_tx = Some(enabled_tx);
            let mut check = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = check.tick(), if enabled_tx.is_some() => {
                        if conn.is_extended_connect_protocol_enabled()
                            && let Some(tx) = enabled_tx.take()
                        {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        });
        tokio::time::timeout(WAIT, enabled_rx)
            .await
            .expect("the server sends SETTINGS_ENABLE_CONNECT_PROTOCOL")
            .expect("connection task");
        send
    }

    fn connect_request(edge: &TestEdge, origin: Option<&str>) -> Request<Empty<Bytes>> {
        let mut builder = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://{}/v1/ws", edge.addr))
            .header("sec-websocket-version", "13");
        if let Some(origin) = origin {
            builder = builder.header("origin", origin);
        }
        let mut req = builder.body(Empty::new()).expect("request");
        req.extensions_mut()
            .insert(Protocol::from_static("websocket"));
        req
    }

    #[tokio::test]
    async fn websocket_over_http2_extended_connect() {
        let edge = TestEdge::start().await;
        let mut send = handshake(&edge).await;
        // The Origin check also applies over HTTP/2 (against :authority).
        let refused = send
            .send_request(connect_request(&edge, Some("http://evil.example")))
            .await
            .expect("response");
        assert_eq!(refused.status(), 403);

        // Two sockets multiplexed on the one connection.
        let same = format!("http://{}", edge.addr);
        let mut sockets = Vec::new();
        for origin in [None, Some(same.as_str())] {
            let mut response = send
                .send_request(connect_request(&edge, origin))
                .await
                .expect("response");
            assert_eq!(response.status(), 200, "extended CONNECT accepted");
            let upgraded = hyper::upgrade::on(&mut response).await.expect("upgrade");
            let socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
            sockets.push(Ws::new(socket));
        }
        for (i, ws) in sockets.iter_mut().enumerate() {
            let id = ws.start("h2", fast("over http/2", 30, 7 + i as u64)).await;
            let events = ws.events_until_terminal(&id).await;
            assert_contiguous(&events, 1);
            assert_eq!(events.last().expect("terminal")["type"], "done");
            let polled = edge.short_poll(&id, 0).await;
            assert_eq!(
                polled["events"].as_array().expect("events"),
                &events.iter().map(native).collect::<Vec<_>>()
            );
            ws.assert_quiet().await;
        }
    }
}
