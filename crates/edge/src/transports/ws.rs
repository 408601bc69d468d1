//! WebSocket: many streams multiplexed on one socket, JSON messages both ways.
//!
//! One task per socket runs [`serve`], generic over the socket's `Sink`/`Stream` halves; each
//! subscription gets a forwarding task that turns its batches into frames on a bounded
//! outgoing channel. Inside the socket task a reader (client messages, pings, shutdown) and a
//! writer run side by side: the writer feeds everything queued to the sink and flushes once,
//! so a burst of events costs one write. A full outgoing channel holds the forwarders back,
//! and their subscriptions then lag (and coalesce) inside the hub instead of here.
//!
//! Limits of one socket, each answered the same way (an `error` message; close 1008 when it
//! goes on): a write that makes no progress for `--write-timeout-secs` closes the socket with
//! 1008 (the reader keeps counting unanswered pings meanwhile); more than
//! `--ws-messages-per-sec` messages (bursts of twice that) get `rate_limited`; more than
//! `--ws-max-pending-cancels` cancels in flight get `too_many_cancels`; [`WS_STRIKES`]
//! refusals in a row close the socket with 1008.

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
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};

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
/// Close code for a peer that stopped answering pings, does not read, or keeps breaking a
/// limit.
const CLOSE_POLICY: u16 = 1008;

/// Replies, pongs and pings waiting to be written; a client that leaves this many unread is
/// closed (it is not reading).
const CONTROL: usize = 128;

/// Refusals in a row (rate limit, too many cancels) after which the socket is closed.
pub const WS_STRIKES: u32 = 10;

/// How long a close frame may take to write.
const CLOSE_WRITE: Duration = Duration::from_secs(1);

/// `GET /v1/ws` (HTTP/1.1 Upgrade) and `CONNECT /v1/ws` (HTTP/2, RFC 8441).
pub async fn upgrade(
    State(app): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    uri: Uri,
    slot: Option<axum::Extension<crate::server::ConnectionSlot>>,
    expires: Option<axum::Extension<auth::CredentialExpiry>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let expires = expires.map(|axum::Extension(e)| e);
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
        .on_upgrade(move |socket| async move {
            // The connection's slot of the caps stays taken until the socket closes.
            let slot = slot.map(|axum::Extension(slot)| slot);
            if let Some(slot) = &slot {
                slot.upgraded();
            }
            let (sink, stream) = socket.split();
            serve_until(app, caller, expires, slot, sink, stream).await;
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

/// Serves one socket for `caller` until the peer leaves, stops answering pings, stops reading,
/// keeps breaking a limit, or the server shuts down.
pub async fn serve<S, R>(app: AppState, caller: Caller, sink: S, incoming: R)
where
    S: Sink<Message> + Unpin + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    serve_until(app, caller, None, None, sink, incoming).await;
}

/// [`serve`], closing the socket (1008, after an `error` message `credentials_expired`) when
/// the credential or ticket it was opened with expires. `slot` is the connection's share of
/// the connection caps (held until the socket closes) and where write timeouts are counted.
pub async fn serve_until<S, R>(
    app: AppState,
    caller: Caller,
    expires: Option<auth::CredentialExpiry>,
    slot: Option<crate::server::ConnectionSlot>,
    mut sink: S,
    mut incoming: R,
) where
    S: Sink<Message> + Unpin + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let expired = async move {
        match expires {
            Some(e) => tokio::time::sleep_until(e.deadline()).await,
            None => std::future::pending().await,
        }
    };
    let guard = Arc::new(TransportGuard::new("ws"));
    let (tx, mut rx) = mpsc::channel::<Message>(OUTGOING);
    let (control, mut control_rx) = mpsc::channel::<Message>(CONTROL);
    let mut subs: HashMap<StreamId, Subscribed> = HashMap::new();
    let http = &app.config.http;
    let ping_every = Duration::from_secs(http.ws_ping_secs);
    let write_timeout = Duration::from_secs(http.write_timeout_secs);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    // After a long stall, do not fire the missed pings back to back.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut socket = SocketLimits::new(
        http.ws_messages_per_sec,
        Arc::new(Semaphore::new(http.ws_max_pending_cancels)),
    );
    let reader = async {
        let mut unanswered = 0u32;
        let mut expired = std::pin::pin!(expired);
        loop {
            let reply = tokio::select! {
                msg = incoming.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        unanswered = 0;
                        if !socket.admit() {
                            if socket.strikes > WS_STRIKES {
                                return Some((CLOSE_POLICY, "message rate limit exceeded"));
                            }
                            Some(rate_limited(http.ws_messages_per_sec))
                        } else {
                            handle_text(&app, &caller, &text, &mut subs, &tx, &guard, &mut socket)
                                .await
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        unanswered = 0;
                        if socket.admit() {
                            let e = json!({"type": "error", "code": "unsupported_frame",
                                "message": "binary frames are not supported; send JSON text"});
                            Some(text_msg(&e))
                        } else if socket.strikes > WS_STRIKES {
                            return Some((CLOSE_POLICY, "message rate limit exceeded"));
                        } else {
                            Some(rate_limited(http.ws_messages_per_sec))
                        }
                    }
                    Some(Ok(Message::Pong(_))) => {
                        unanswered = 0;
                        None
                    }
                    Some(Ok(Message::Ping(_))) => None, // the library answers pings itself
                    Some(Ok(Message::Close(_))) | None => return None,
                    Some(Err(err)) => {
                        let text = err.to_string().to_ascii_lowercase();
                        let too_big = text.contains("too long") || text.contains("capacity");
                        return too_big.then_some((CLOSE_TOO_BIG, "message too big"));
                    }
                },
                // Never waits for the writer: a stuck write cannot hold the ping check back.
                _ = ping.tick() => {
                    if unanswered >= 2 {
                        return Some((CLOSE_POLICY, "ping timeout"));
                    }
                    unanswered += 1;
                    Some(Message::Ping(Default::default()))
                }
                () = app.shutdown.cancelled() => {
                    return Some((CLOSE_RESTART, "server restarting; reconnect"));
                }
                () = expired.as_mut() => {
                    metrics::counter!("tokenfan_edge_credentials_expired_total", "transport" => "ws")
                        .increment(1);
                    let _ = control.try_send(error_msg(
                        "credentials_expired",
                        "the credential or ticket this socket was opened with has expired; \
                         reconnect with a fresh one",
                        None,
                        None,
                    ));
                    return Some((CLOSE_POLICY, "credentials expired"));
                }
            };
            if socket.strikes > WS_STRIKES {
                return Some((CLOSE_POLICY, "too many refused messages"));
            }
            if let Some(reply) = reply
                && control.try_send(reply).is_err()
            {
                return Some((CLOSE_POLICY, "the client does not read its replies"));
            }
        }
    };
    let writer = async {
        loop {
            // Replies first: the client waits for them; events can lag.
            let first = tokio::select! {
                biased;
                Some(m) = control_rx.recv() => m,
                Some(m) = rx.recv() => m,
                else => return None,
            };
            // Each step (one message, the flush) gets the whole timeout: a slow client that
            // still takes bytes is not closed for the size of a burst. The socket's own write
            // deadline (the same timeout) may fire first and fail the step: both mean the
            // client stopped reading; other errors mean it is gone.
            let step = |result: Result<Result<(), S::Error>, _>| match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) if slot.as_ref().is_some_and(|s| s.write_timed_out()) => {
                    Err(Some(WRITE_TIMEOUT))
                }
                Ok(Err(_)) => Err(None),
                Err(_) => {
                    match &slot {
                        Some(slot) => slot.count_write_timeout(),
                        None => metrics::counter!(
                            "tokenfan_edge_write_timeouts_total", "transport" => "ws"
                        )
                        .increment(1),
                    }
                    Err(Some(WRITE_TIMEOUT))
                }
            };
            let mut next = Some(first);
            while let Some(message) = next {
                let fed = tokio::time::timeout(write_timeout, sink.feed(message)).await;
                if let Err(close) = step(fed) {
                    return close;
                }
                // Write everything else already queued, then flush once.
                next = control_rx.try_recv().ok().or_else(|| rx.try_recv().ok());
            }
            let flushed = tokio::time::timeout(write_timeout, sink.flush()).await;
            if let Err(close) = step(flushed) {
                return close;
            }
        }
    };
    let (close, by_reader) = tokio::select! {
        close = reader => (close, true),
        close = writer => (close, false),
    };
    if by_reader && close.is_some() {
        // Replies the reader queued (the refusals that led to the close) go out first.
        let flush = async {
            while let Ok(m) = control_rx.try_recv() {
                sink.feed(m).await.map_err(|_| ())?;
            }
            sink.flush().await.map_err(|_| ())
        };
        let _ = tokio::time::timeout(CLOSE_WRITE, flush).await;
    }
    for (_, s) in subs.drain() {
        s.forwarder.abort();
    }
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        // Written if the client still reads at all.
        let _ = tokio::time::timeout(CLOSE_WRITE, sink.send(Message::Close(Some(frame)))).await;
    }
    let _ = tokio::time::timeout(CLOSE_WRITE, sink.close()).await;
}

/// The close for a client that stopped reading.
const WRITE_TIMEOUT: (u16, &str) = (CLOSE_POLICY, "write timeout: the client does not read");

/// One socket's message rate (a token bucket of `2 × rate`) and its cancels in flight.
struct SocketLimits {
    rate: f64,
    tokens: f64,
    refilled: tokio::time::Instant,
    /// Refusals in a row.
    strikes: u32,
    /// One permit per cancel in flight, held by its task.
    cancels: Arc<Semaphore>,
}

impl SocketLimits {
    fn new(per_sec: u32, cancels: Arc<Semaphore>) -> Self {
        let rate = f64::from(per_sec);
        Self {
            rate,
            tokens: 2.0 * rate,
            refilled: tokio::time::Instant::now(),
            strikes: 0,
            cancels,
        }
    }

    /// Takes a token for one message; false (and a strike) when there is none.
    fn admit(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

fn rate_limited(per_sec: u32) -> Message {
    metrics::counter!("tokenfan_edge_rate_limited_total", "limit" => "ws_messages").increment(1);
    error_msg(
        "rate_limited",
        &format!(
            "a socket may send {per_sec} messages per second; this one was not handled (the \
             socket is closed if it goes on)"
        ),
        None,
        None,
    )
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
    limits: &mut SocketLimits,
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
            // The forwarder queues `started` before the stream's events, on the same queue.
            subscribe(subs, &stream, 0, tx, guard, rid, Some(text_msg(&started))).err()
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
                    let subscribed = subscribe(subs, &stream, msg.after, tx, guard, rid, None);
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
                    let Ok(permit) = limits.cancels.clone().try_acquire_owned() else {
                        limits.strikes += 1;
                        return Some(error_msg(
                            "too_many_cancels",
                            &format!(
                                "a socket may have {} cancels in flight; wait for their \
                                 answers (the socket is closed if this goes on)",
                                app.config.http.ws_max_pending_cancels
                            ),
                            Some(stream.id.as_str()),
                            rid,
                        ));
                    };
                    let subscribed = subs.contains_key(&stream.id);
                    let hub = app.hub.clone();
                    let tx = tx.clone();
                    let rid = rid.map(str::to_owned);
                    // The terminal event answers the cancel: through the subscription when
                    // there is one, else sent here once the owner wrote it.
                    tokio::spawn(async move {
                        let _permit = permit;
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
    first: Option<Message>,
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
        if let Some(first) = first
            && tx.send(first).await.is_err()
        {
            return;
        }
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

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{
        auth::Security,
        bus::memory::MemoryBus,
        config::EdgeConfig,
        event::{Event, EventKind, FinishReason, Usage},
        hub::Hub,
        store::{LeaseTerms, Store as _, StreamMeta, memory::MemoryStore},
        upstream::GeneratorPool,
    };

    /// The finished stream in [`app`]'s store.
    const DONE: &str = "WsTestFinishedStreamAA";

    /// An application over the in-memory backends in cluster mode (streams are found in the
    /// store), whose store holds one finished stream, [`DONE`]; with no room for new streams
    /// and a generator nobody calls.
    async fn app() -> AppState {
        let mut config = EdgeConfig::defaults();
        config.streams.max_streams = 0;
        config.streams.generator_connections = 1;
        let config = Arc::new(config);
        let request = StreamRequest {
            prompt: Some("ws".into()),
            ..StreamRequest::default()
        };
        let spec = request.validate(&config.streams).expect("a valid request");
        let terms = LeaseTerms {
            ttl: config.lease_ttl(),
            keep: config.history_ttl(),
        };
        let id = StreamId::parse(DONE).expect("an id");
        let done = EventKind::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
        };
        let store = Arc::new(MemoryStore::default());
        let meta = StreamMeta::running(&spec, "edge-owner");
        store.create(&id, meta, terms).await.expect("create");
        let events = [Arc::new(Event::new(1, done))];
        store.append(&id, 1, &events).await.expect("append");
        let unused = ["http://127.0.0.1:9".to_owned()];
        let generators = Arc::new(GeneratorPool::new(&unused, 1).expect("a pool"));
        let bus = Arc::new(MemoryBus::default());
        let hub = Hub::new(config.clone(), "ws".into(), generators, store, bus, true);
        let security = Security::from_config(&config).await.expect("no auth");
        AppState {
            hub,
            security: Arc::new(security),
            config,
            shutdown: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn cancels_past_the_in_flight_bound_are_refused_and_count_as_strikes() {
        let app = app().await;
        {
            let (tx, _rx) = mpsc::channel(OUTGOING);
            let guard = Arc::new(TransportGuard::new("ws"));
            let mut subs = HashMap::new();
            let cancel = json!({"type": "cancel", "stream_id": DONE}).to_string();
            let caller = Caller::anonymous();
            // Every permit held by cancels still in flight.
            let mut limits = SocketLimits::new(50, Arc::new(Semaphore::new(0)));
            for strikes in 1..=3 {
                let reply =
                    handle_text(&app, &caller, &cancel, &mut subs, &tx, &guard, &mut limits)
                        .await
                        .expect("a refusal");
                let Message::Text(text) = reply else {
                    panic!("a text reply")
                };
                let v: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(v["code"], "too_many_cancels", "{v}");
                assert_eq!(v["stream_id"], DONE);
                assert_eq!(limits.strikes, strikes);
            }
            // With room, the cancel goes ahead (answered later by the terminal event).
            let mut limits = SocketLimits::new(50, Arc::new(Semaphore::new(1)));
            let reply =
                handle_text(&app, &caller, &cancel, &mut subs, &tx, &guard, &mut limits).await;
            assert!(reply.is_none(), "{reply:?}");
            assert_eq!(limits.strikes, 0);
        }
    }

    /// A socket whose writes never complete (a client that stopped reading).
    struct StuckSink;

    impl Sink<Message> for StuckSink {
        type Error = ();

        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), ()>> {
            std::task::Poll::Pending
        }

        fn start_send(self: std::pin::Pin<&mut Self>, _: Message) -> Result<(), ()> {
            Ok(())
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), ()>> {
            std::task::Poll::Pending
        }

        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), ()>> {
            std::task::Poll::Pending
        }
    }

    #[test]
    fn a_stuck_write_does_not_hold_the_ping_check_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let mut app = app().await;
            let mut config = (*app.config).clone();
            config.http.ws_ping_secs = 20;
            config.http.write_timeout_secs = 1000;
            app.config = Arc::new(config);
            let incoming = futures::stream::pending::<Result<Message, axum::Error>>();
            let started = tokio::time::Instant::now();
            // The first ping's write never completes; two unanswered pings still close the
            // socket on the third tick (~60 s), long before the write timeout (1000 s).
            tokio::time::timeout(
                Duration::from_secs(200),
                serve(app, Caller::anonymous(), StuckSink, incoming),
            )
            .await
            .expect("closed by the ping check");
            let took = started.elapsed();
            assert!(
                took >= Duration::from_secs(60) && took < Duration::from_secs(70),
                "{took:?}"
            );
        });
    }

    #[tokio::test(start_paused = true)]
    async fn the_message_rate_is_a_bucket_of_twice_the_rate() {
        let mut limits = SocketLimits::new(2, Arc::new(Semaphore::new(1)));
        for _ in 0..4 {
            assert!(limits.admit());
        }
        assert!(!limits.admit());
        assert!(!limits.admit());
        assert_eq!(limits.strikes, 2);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limits.admit(), "one token back after half a second");
        assert_eq!(limits.strikes, 0, "an accepted message resets the strikes");
        assert!(!limits.admit());
    }
}
