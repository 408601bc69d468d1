//! WebSocket: many streams multiplexed on one socket, JSON messages both ways.
//!
//! One task per socket runs [`serve`], generic over the socket's `Sink`/`Stream` halves; each
//! subscription gets a forwarding task that turns its batches into frames on a bounded
//! outgoing channel. The socket task feeds everything queued to the sink and flushes once, so
//! a burst of events costs one write. A full outgoing channel holds the forwarders back, and
//! their subscriptions then lag (and coalesce) inside the hub instead of here.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    extract::{
        State,
        ws::{
            CloseFrame, Message, Utf8Bytes, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use futures::{Sink, SinkExt as _, Stream, StreamExt as _};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    app::{AppState, TransportGuard, request_span},
    auth::{self, Caller},
    error::ApiError,
    ids::StreamId,
    observability::{GapMeter, Resume, ResumeResult},
    request::StreamRequest,
    stream::{Closed, StreamState},
};

/// Frames waiting to be written to one socket.
const OUTGOING: usize = 256;

/// Read buffer per socket (it grows for larger messages, up to the message limit).
const READ_BUFFER: usize = 4096;

/// Close code for a message over the size limit.
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code when the server restarts: reconnect elsewhere.
const CLOSE_RESTART: u16 = 1012;
/// Close code for a peer that stopped answering pings.
const CLOSE_POLICY: u16 = 1008;

/// `GET /v1/ws` (HTTP/1.1 Upgrade) and `CONNECT /v1/ws` (HTTP/2, RFC 8441).
pub async fn upgrade(
    State(app): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            let status = rejection.status();
            let error = ApiError::bad_request("websocket_required", rejection.body_text());
            return (status, axum::Json(error.body())).into_response();
        }
    };
    if !origin_allowed(&app, &headers, &uri) {
        let error = ApiError {
            status: StatusCode::FORBIDDEN,
            ..ApiError::bad_request("origin_not_allowed", "this Origin may not open a WebSocket")
        };
        return error.into_response();
    }
    let limit = app.config.http.ws_max_message_bytes;
    // A small read buffer: tungstenite's default (128 KiB) dominates an idle socket's memory.
    ws.read_buffer_size(READ_BUFFER)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let (sink, stream) = socket.split();
            serve(app, caller, sink, stream)
        })
}

fn origin_allowed(app: &AppState, headers: &HeaderMap, uri: &Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true; // not a browser
    };
    let allowed = app.config.ws_origins();
    if allowed
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    // Same origin is always allowed (Host on HTTP/1.1, :authority on HTTP/2), so the demo
    // page served by the edge keeps working when an allowlist is configured.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o))
}

/// What the client sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartMsg {
    #[serde(rename = "type")]
    _type: String,
    request_id: Option<String>,
    /// Parsed separately: a bad request body is `invalid_request`, as on `POST /v1/streams`.
    request: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamMsg {
    #[serde(rename = "type")]
    _type: String,
    request_id: Option<String>,
    stream_id: String,
    #[serde(default)]
    after: u64,
}

/// One subscription of the socket; its forwarder ends with the stream or is aborted.
struct Subscribed {
    forwarder: JoinHandle<()>,
}

/// Serves one socket for `caller` until the peer leaves, stops answering pings, or the server
/// shuts down.
pub async fn serve<S, R>(app: AppState, caller: Caller, mut sink: S, mut incoming: R)
where
    S: Sink<Message> + Unpin + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let guard = Arc::new(TransportGuard::new("ws"));
    let (tx, mut rx) = mpsc::channel::<Message>(OUTGOING);
    let mut subs: HashMap<StreamId, Subscribed> = HashMap::new();
    let ping_every = Duration::from_secs(app.config.http.ws_ping_secs);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    // After a long write to a slow client, do not fire the missed pings back to back.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unanswered = 0u32;
    let close = loop {
        tokio::select! {
            msg = incoming.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    // Replies go straight to the socket: this task is the only reader of the
                    // outgoing queue, so it must never wait for room in it.
                    unanswered = 0;
                    let reply = handle_text(&app, &caller, &text, &mut subs, &tx, &guard).await;
                    if let Some(reply) = reply
                        && sink.send(reply).await.is_err()
                    {
                        break None;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    unanswered = 0;
                    let e = json!({"type": "error", "code": "unsupported_frame",
                        "message": "binary frames are not supported; send JSON text"});
                    if sink.send(text_msg(&e)).await.is_err() { break None; }
                }
                Some(Ok(Message::Pong(_))) => unanswered = 0,
                Some(Ok(Message::Ping(_))) => {} // the library answers pings itself
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(err)) => {
                    let too_big = err.to_string().to_ascii_lowercase().contains("too long")
                        || err.to_string().to_ascii_lowercase().contains("capacity");
                    break too_big.then_some((CLOSE_TOO_BIG, "message too big"));
                }
            },
            Some(out) = rx.recv() => {
                if sink.feed(out).await.is_err() { break None; }
                // Write everything else already queued, then flush once.
                let mut failed = false;
                while let Ok(more) = rx.try_recv() {
                    if sink.feed(more).await.is_err() { failed = true; break; }
                }
                if failed || sink.flush().await.is_err() { break None; }
            }
            _ = ping.tick() => {
                if unanswered >= 2 {
                    break Some((CLOSE_POLICY, "ping timeout"));
                }
                unanswered += 1;
                if sink.send(Message::Ping(Default::default())).await.is_err() { break None; }
            }
            () = app.shutdown.cancelled() => break Some((CLOSE_RESTART, "server restarting; reconnect")),
        }
    };
    for (_, s) in subs.drain() {
        s.forwarder.abort();
    }
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
    }
    let _ = sink.close().await;
}

fn text_msg(value: &Value) -> Message {
    Message::Text(value.to_string().into())
}

fn error_msg(
    code: &str,
    message: &str,
    stream_id: Option<&str>,
    request_id: Option<&str>,
) -> Message {
    let mut e = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = stream_id {
        e["stream_id"] = json!(id);
    }
    if let Some(id) = request_id {
        e["request_id"] = json!(id);
    }
    text_msg(&e)
}

async fn handle_text(
    app: &AppState,
    caller: &Caller,
    text: &str,
    subs: &mut HashMap<StreamId, Subscribed>,
    tx: &mpsc::Sender<Message>,
    guard: &Arc<TransportGuard>,
) -> Option<Message> {
    subs.retain(|_, s| !s.forwarder.is_finished());
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Some(error_msg("invalid_json", &e.to_string(), None, None)),
    };
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let request_id = value
        .get("request_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let bad = |e: serde_json::Error| {
        Some(error_msg(
            "invalid_message",
            &e.to_string(),
            None,
            request_id.as_deref(),
        ))
    };
    match kind.as_str() {
        "ping" => {
            let mut pong = json!({"type": "pong"});
            if let Some(id) = value.get("id") {
                pong["id"] = id.clone();
            }
            Some(text_msg(&pong))
        }
        "start" => {
            let msg: StartMsg = match serde_json::from_value(value) {
                Ok(m) => m,
                Err(e) => return bad(e),
            };
            let rid = msg.request_id.as_deref();
            if subs.len() >= app.config.http.ws_max_subscriptions {
                return Some(too_many(app, None, rid));
            }
            let request: StreamRequest = match serde_json::from_value(msg.request) {
                Ok(r) => r,
                Err(e) => return Some(error_msg("invalid_request", &e.to_string(), None, rid)),
            };
            let spec = match request.validate(&app.config.streams) {
                Ok(spec) => spec,
                Err(e) => return Some(error_msg(e.code, &e.message, None, rid)),
            };
            let span = request_span(&HeaderMap::new(), "WS start");
            let stream = match auth::create_stream(app, caller, spec, &span, "ws").await {
                Ok(s) => s,
                Err(e) => return Some(error_msg(e.code, &e.message, None, rid)),
            };
            let mut started = json!({"type": "started", "stream_id": stream.id.as_str()});
            if let Some(rid) = rid {
                started["request_id"] = json!(rid);
            }
            if let Some(ticket) = app.security.ticket_for(&stream) {
                started["ticket"] = json!(ticket.token);
            }
            // `started` is written by the socket task as soon as this returns, before it reads
            // the outgoing queue where the forwarder puts the stream's events.
            match subscribe(subs, &stream, 0, tx, guard, rid) {
                Ok(_) => Some(text_msg(&started)),
                Err(error) => Some(error),
            }
        }
        "subscribe" | "cancel" | "unsubscribe" => {
            let msg: StreamMsg = match serde_json::from_value(value) {
                Ok(m) => m,
                Err(e) => return bad(e),
            };
            let rid = msg.request_id.as_deref();
            let resume = |replayed: u64, result: ResumeResult| Resume {
                transport: "ws",
                stream_id: &msg.stream_id,
                after: msg.after,
                replayed,
                result,
            };
            let found = if kind == "cancel" {
                auth::stream_to_manage(app, caller, &msg.stream_id).await
            } else {
                auth::stream_for(app, caller, &msg.stream_id).await
            };
            let stream = match found {
                Ok(s) => s,
                Err(e) => {
                    if kind == "subscribe" && msg.after > 0 {
                        resume(0, ResumeResult::of_error(&e)).record(app.hub.replica(), None, None);
                    }
                    return Some(error_msg(e.code, &e.message, Some(&msg.stream_id), rid));
                }
            };
            match kind.as_str() {
                "subscribe" => {
                    if subs.contains_key(&stream.id) {
                        return Some(error_msg(
                            "already_subscribed",
                            "this socket is already subscribed to the stream",
                            Some(stream.id.as_str()),
                            rid,
                        ));
                    }
                    if subs.len() >= app.config.http.ws_max_subscriptions {
                        return Some(too_many(app, Some(stream.id.as_str()), rid));
                    }
                    let subscribed = subscribe(subs, &stream, msg.after, tx, guard, rid);
                    if msg.after > 0 {
                        let (replayed, result) = match &subscribed {
                            Ok(backlog) => (
                                backlog.saturating_sub(msg.after),
                                ResumeResult::of_subscription(&stream, msg.after, *backlog),
                            ),
                            Err(_) => (0, ResumeResult::Invalid),
                        };
                        resume(replayed, result).record(app.hub.replica(), None, Some(&stream));
                    }
                    subscribed.err()
                }
                "cancel" => {
                    let subscribed = subs.contains_key(&stream.id);
                    let hub = app.hub.clone();
                    let tx = tx.clone();
                    let rid = rid.map(str::to_owned);
                    // The terminal event answers the cancel: through the subscription when
                    // there is one, else sent here once the owner wrote it.
                    tokio::spawn(async move {
                        if let Err(e) = hub.cancel(&stream).await {
                            let id = Some(stream.id.as_str());
                            let _ = tx
                                .send(error_msg(e.code, &e.message, id, rid.as_deref()))
                                .await;
                            return;
                        }
                        if subscribed {
                            return;
                        }
                        let last = stream.last_seq();
                        let terminal = stream
                            .events_after(last.saturating_sub(1))
                            .ok()
                            .and_then(|(_, events)| events.into_iter().next())
                            .filter(|e| e.is_terminal());
                        if let Some(event) = terminal
                            && let Ok(text) =
                                Utf8Bytes::try_from(event.ws(stream.id.as_str()).clone())
                        {
                            let _ = tx.send(Message::Text(text)).await;
                        }
                    });
                    None
                }
                _ => {
                    if let Some(s) = subs.remove(&stream.id) {
                        s.forwarder.abort();
                    }
                    None
                }
            }
        }
        "" => Some(error_msg(
            "invalid_message",
            "a message needs a string `type`",
            None,
            request_id.as_deref(),
        )),
        other => Some(error_msg(
            "unknown_type",
            &format!(
                "unknown message type {other:?}; expected start, subscribe, cancel, unsubscribe or ping"
            ),
            None,
            request_id.as_deref(),
        )),
    }
}

fn too_many(app: &AppState, stream_id: Option<&str>, request_id: Option<&str>) -> Message {
    error_msg(
        "too_many_subscriptions",
        &format!(
            "a socket may follow at most {} streams",
            app.config.http.ws_max_subscriptions
        ),
        stream_id,
        request_id,
    )
}

/// Subscribes the socket to `stream` from `after` and starts its forwarder; returns the
/// subscription's backlog end (the last seq that existed when it subscribed).
fn subscribe(
    subs: &mut HashMap<StreamId, Subscribed>,
    stream: &Arc<StreamState>,
    after: u64,
    tx: &mpsc::Sender<Message>,
    guard: &Arc<TransportGuard>,
    request_id: Option<&str>,
) -> Result<u64, Message> {
    let mut sub = stream
        .subscribe(after)
        .map_err(|e| error_msg(e.code, &e.message, Some(stream.id.as_str()), request_id))?;
    let backlog = sub.backlog_end();
    let tx = tx.clone();
    let guard = guard.clone();
    let id = stream.id.clone();
    let forwarder = tokio::spawn(async move {
        let mut gaps = GapMeter::new("ws");
        loop {
            match sub.next_batch().await {
                Ok(batch) => {
                    guard.delivered(batch.len());
                    gaps.batch(&batch, sub.backlog_end());
                    for event in batch {
                        let Ok(text) = Utf8Bytes::try_from(event.ws(id.as_str()).clone()) else {
                            continue;
                        };
                        if tx.send(Message::Text(text)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(Closed::Finished) => return,
                Err(Closed::SlowConsumer { last_seq }) => {
                    let message = format!(
                        "the socket fell too far behind; subscribe again with after={last_seq}"
                    );
                    let _ = tx
                        .send(error_msg(
                            "slow_consumer",
                            &message,
                            Some(id.as_str()),
                            None,
                        ))
                        .await;
                    return;
                }
            }
        }
    });
    subs.insert(stream.id.clone(), Subscribed { forwarder });
    Ok(backlog)
}
