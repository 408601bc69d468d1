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
    http::{HeaderMap, Uri, header},
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
    auth,
    error::ApiError,
    ids::StreamId,
    observability::{GapMeter, Resume, ResumeResult},
    request::StreamRequest,
    state::AppState,
    stream::{Closed, StreamState, Subscription},
    tenant::Caller,
    transports::{TransportGuard, request_span},
};
use tokio_tungstenite::tungstenite;

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
pub(crate) const WS_STRIKES: u32 = 10;

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
            return ApiError::WebSocketRequired {
                status: rejection.status(),
                message: rejection.body_text(),
            }
            .into_response();
        }
    };
    if !origin_allowed(&app, &headers, &uri) {
        return ApiError::OriginNotAllowed.into_response();
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

/// A message from the client; `type` says which (docs/protocol.md, "Client → server").
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMessage {
    /// Creates a stream and follows it from its start.
    Start(StartMsg),
    /// Follows a stream from a cursor.
    Subscribe(StreamMsg),
    /// Stops a stream (the terminal event answers).
    Cancel(StreamMsg),
    /// Stops following a stream.
    Unsubscribe(StreamMsg),
    /// Asks for a `pong`.
    Ping(PingMsg),
    /// Any other `type`.
    #[serde(other)]
    Unknown,
}

/// `start`: no other keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartMsg {
    request_id: Option<String>,
    /// Parsed separately: a bad request body is `invalid_request`, as on `POST /v1/streams`.
    request: Value,
}

/// `subscribe`, `cancel`, `unsubscribe`: no other keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamMsg {
    request_id: Option<String>,
    stream_id: String,
    #[serde(default)]
    after: u64,
}

impl StreamMsg {
    /// The resume this message makes (a `subscribe` with `after` > 0).
    fn resume(&self, replayed: u64, result: ResumeResult) -> Resume<'_> {
        Resume {
            transport: "ws",
            stream_id: &self.stream_id,
            after: self.after,
            replayed,
            result,
        }
    }
}

/// `ping`: other keys are ignored.
#[derive(Debug, Deserialize)]
struct PingMsg {
    /// Echoed in the `pong` when present (even when `null`).
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
}

/// Some value, `null` included (a missing key is `None` through `#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// One subscription of the socket; its forwarder ends with the stream or is aborted.
struct Subscribed {
    forwarder: JoinHandle<()>,
}

/// How the socket ends: the close frame's code and reason.
type Close = (u16, &'static str);

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
pub(crate) async fn serve_until<S, R>(
    app: AppState,
    caller: Caller,
    expires: Option<auth::CredentialExpiry>,
    slot: Option<crate::server::ConnectionSlot>,
    mut sink: S,
    incoming: R,
) where
    S: Sink<Message> + Unpin + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let (tx, mut rx) = mpsc::channel::<Message>(OUTGOING);
    let (control, mut control_rx) = mpsc::channel::<Message>(CONTROL);
    let write_timeout = Duration::from_secs(app.config.http.write_timeout_secs);
    let mut socket = Socket::new(&app, &caller, tx);
    let reader = socket.read(incoming, &control, expires);
    let writer = write(
        &mut sink,
        &mut control_rx,
        &mut rx,
        write_timeout,
        slot.as_ref(),
    );
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
    socket.unsubscribe_all();
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

/// Writes replies (first: the client waits for them; events can lag) and events to `sink`,
/// flushing once per burst, until both queues end or a write fails.
async fn write<S: Sink<Message> + Unpin>(
    sink: &mut S,
    control_rx: &mut mpsc::Receiver<Message>,
    rx: &mut mpsc::Receiver<Message>,
    write_timeout: Duration,
    slot: Option<&crate::server::ConnectionSlot>,
) -> Option<Close> {
    // Each step (one message, the flush) gets the whole timeout: a slow client that still
    // takes bytes is not closed for the size of a burst. The socket's own write deadline (the
    // same timeout) may fire first and fail the step: both mean the client stopped reading;
    // other errors mean it is gone.
    let step = |result: Result<Result<(), S::Error>, _>| match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) if slot.is_some_and(|s| s.write_timed_out()) => Err(Some(WRITE_TIMEOUT)),
        Ok(Err(_)) => Err(None),
        Err(_) => {
            match slot {
                Some(slot) => slot.count_write_timeout(),
                None => {
                    metrics::counter!("tokenfan_edge_write_timeouts_total", "transport" => "ws")
                        .increment(1)
                }
            }
            Err(Some(WRITE_TIMEOUT))
        }
    };
    loop {
        let first = tokio::select! {
            biased;
            Some(m) = control_rx.recv() => m,
            Some(m) = rx.recv() => m,
            else => return None,
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
}

/// The close for a client that stopped reading.
const WRITE_TIMEOUT: Close = (CLOSE_POLICY, "write timeout: the client does not read");

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

/// A protocol error as a WebSocket message.
fn error_msg(error: &ApiError, stream_id: Option<&str>, request_id: Option<&str>) -> Message {
    Message::Text(error.ws_message(stream_id, request_id).into())
}

/// What the reader does after one incoming frame.
enum Step {
    /// Queue this reply (or nothing) and read on.
    Reply(Option<Message>),
    /// Close the socket (None: without a close frame).
    Close(Option<Close>),
}

/// One socket's side of the protocol: its subscriptions, the queue their events go to, and its
/// limits.
struct Socket<'a> {
    app: &'a AppState,
    caller: &'a Caller,
    subs: HashMap<StreamId, Subscribed>,
    /// Events (and `started`) for the writer.
    tx: mpsc::Sender<Message>,
    guard: Arc<TransportGuard>,
    limits: SocketLimits,
}

impl<'a> Socket<'a> {
    fn new(app: &'a AppState, caller: &'a Caller, tx: mpsc::Sender<Message>) -> Self {
        let http = &app.config.http;
        Self {
            app,
            caller,
            subs: HashMap::new(),
            tx,
            guard: Arc::new(TransportGuard::new("ws")),
            limits: SocketLimits::new(
                http.ws_messages_per_sec,
                Arc::new(Semaphore::new(http.ws_max_pending_cancels)),
            ),
        }
    }

    /// Reads client frames, sends pings, and watches shutdown and the credential's expiry,
    /// queueing replies on `control`, until the socket is to close.
    async fn read<R>(
        &mut self,
        mut incoming: R,
        control: &mpsc::Sender<Message>,
        expires: Option<auth::CredentialExpiry>,
    ) -> Option<Close>
    where
        R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
    {
        let app = self.app;
        let ping_every = Duration::from_secs(app.config.http.ws_ping_secs);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        // After a long stall, do not fire the missed pings back to back.
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expired = std::pin::pin!(expiry(expires));
        let mut unanswered = 0u32;
        loop {
            let step = tokio::select! {
                msg = incoming.next() => self.on_frame(msg, &mut unanswered).await,
                // Never waits for the writer: a stuck write cannot hold the ping check back.
                _ = ping.tick() => {
                    if unanswered >= 2 {
                        return Some((CLOSE_POLICY, "ping timeout"));
                    }
                    unanswered += 1;
                    Step::Reply(Some(Message::Ping(Default::default())))
                }
                () = app.shutdown().cancelled() => {
                    return Some((CLOSE_RESTART, "server restarting; reconnect"));
                }
                () = expired.as_mut() => {
                    metrics::counter!("tokenfan_edge_credentials_expired_total", "transport" => "ws")
                        .increment(1);
                    let _ = control.try_send(error_msg(&CREDENTIALS_EXPIRED, None, None));
                    return Some((CLOSE_POLICY, "credentials expired"));
                }
            };
            let reply = match step {
                Step::Reply(reply) => reply,
                Step::Close(close) => return close,
            };
            if self.limits.strikes > WS_STRIKES {
                return Some((CLOSE_POLICY, "too many refused messages"));
            }
            if let Some(reply) = reply
                && control.try_send(reply).is_err()
            {
                return Some((CLOSE_POLICY, "the client does not read its replies"));
            }
        }
    }

    /// Answers one incoming frame (None: the client left).
    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, axum::Error>>,
        unanswered: &mut u32,
    ) -> Step {
        let per_sec = self.app.config.http.ws_messages_per_sec;
        match frame {
            Some(Ok(Message::Text(_) | Message::Binary(_))) if !self.limits.admit() => {
                *unanswered = 0;
                if self.limits.strikes > WS_STRIKES {
                    return Step::Close(Some((CLOSE_POLICY, "message rate limit exceeded")));
                }
                metrics::counter!("tokenfan_edge_rate_limited_total", "limit" => "ws_messages")
                    .increment(1);
                let refusal = ApiError::RateLimited {
                    message: format!(
                        "a socket may send {per_sec} messages per second; this one was not \
                         handled (the socket is closed if it goes on)"
                    ),
                    retry_after: 1,
                };
                Step::Reply(Some(error_msg(&refusal, None, None)))
            }
            Some(Ok(Message::Text(text))) => {
                *unanswered = 0;
                Step::Reply(self.handle_text(&text).await)
            }
            Some(Ok(Message::Binary(_))) => {
                *unanswered = 0;
                Step::Reply(Some(error_msg(&ApiError::UnsupportedFrame, None, None)))
            }
            Some(Ok(Message::Pong(_))) => {
                *unanswered = 0;
                Step::Reply(None)
            }
            Some(Ok(Message::Ping(_))) => Step::Reply(None), // the library answers pings itself
            Some(Ok(Message::Close(_))) | None => Step::Close(None),
            Some(Err(err)) => {
                Step::Close(too_big(err).then_some((CLOSE_TOO_BIG, "message too big")))
            }
        }
    }

    /// Handles one text message; the reply, if any, goes on the control queue.
    async fn handle_text(&mut self, text: &str) -> Option<Message> {
        self.subs.retain(|_, s| !s.forwarder.is_finished());
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Some(error_msg(&ApiError::InvalidJson(e.to_string()), None, None)),
        };
        let request_id = value
            .get("request_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let refuse = |e: ApiError| Some(error_msg(&e, None, request_id.as_deref()));
        let Some(kind) = value.get("type").and_then(Value::as_str).map(str::to_owned) else {
            return refuse(ApiError::InvalidMessage(
                "a message needs a string `type`".into(),
            ));
        };
        match serde_json::from_value(value) {
            Ok(ClientMessage::Start(msg)) => self.start(msg).await,
            Ok(ClientMessage::Subscribe(msg)) => self.subscribe(msg).await,
            Ok(ClientMessage::Cancel(msg)) => self.cancel(msg).await,
            Ok(ClientMessage::Unsubscribe(msg)) => self.unsubscribe(msg).await,
            Ok(ClientMessage::Ping(PingMsg { id })) => {
                let mut pong = json!({"type": "pong"});
                if let Some(id) = id {
                    pong["id"] = id;
                }
                Some(Message::Text(pong.to_string().into()))
            }
            Ok(ClientMessage::Unknown) => refuse(ApiError::UnknownType(kind)),
            Err(e) => refuse(ApiError::InvalidMessage(e.to_string())),
        }
    }

    /// `start`: creates a stream and follows it from its start, `started` first.
    async fn start(&mut self, msg: StartMsg) -> Option<Message> {
        let rid = msg.request_id.as_deref();
        let refuse = |e: ApiError| Some(error_msg(&e, None, rid));
        let max = self.app.config.http.ws_max_subscriptions;
        if self.subs.len() >= max {
            return refuse(ApiError::TooManySubscriptions(max));
        }
        let request: StreamRequest = match serde_json::from_value(msg.request) {
            Ok(r) => r,
            Err(e) => {
                return refuse(ApiError::InvalidRequest {
                    message: e.to_string(),
                    param: None,
                });
            }
        };
        let spec = match request.validate(&self.app.config.streams) {
            Ok(spec) => spec,
            Err(e) => return refuse(e),
        };
        let span = request_span(&HeaderMap::new(), "WS start");
        let stream = match self.app.create_stream(self.caller, spec, &span, "ws").await {
            Ok(s) => s,
            Err(e) => return refuse(e),
        };
        let mut started = json!({"type": "started", "stream_id": stream.id.as_str()});
        if let Some(rid) = rid {
            started["request_id"] = json!(rid);
        }
        if let Some(ticket) = self.app.security.ticket_for(&stream) {
            started["ticket"] = json!(ticket.token);
        }
        // The forwarder queues `started` before the stream's events, on the same queue.
        let started = Message::Text(started.to_string().into());
        self.follow(&stream, 0, rid, Some(started)).err()
    }

    /// `subscribe`: follows a stream from `after` (a resume when `after` > 0).
    async fn subscribe(&mut self, msg: StreamMsg) -> Option<Message> {
        let rid = msg.request_id.as_deref();
        let replica = self.app.hub.replica();
        let stream = match self.app.stream_for(self.caller, &msg.stream_id).await {
            Ok(s) => s,
            Err(e) => {
                if msg.after > 0 {
                    msg.resume(0, ResumeResult::of_error(&e))
                        .record(replica, None, None);
                }
                return Some(error_msg(&e, Some(&msg.stream_id), rid));
            }
        };
        let id = Some(stream.id.as_str());
        if self.subs.contains_key(&stream.id) {
            return Some(error_msg(&ApiError::AlreadySubscribed, id, rid));
        }
        let max = self.app.config.http.ws_max_subscriptions;
        if self.subs.len() >= max {
            return Some(error_msg(&ApiError::TooManySubscriptions(max), id, rid));
        }
        let subscribed = self.follow(&stream, msg.after, rid, None);
        if msg.after > 0 {
            let (replayed, result) = match &subscribed {
                Ok(backlog) => (
                    backlog.saturating_sub(msg.after),
                    ResumeResult::of_subscription(&stream, msg.after, *backlog),
                ),
                Err(_) => (0, ResumeResult::Invalid),
            };
            msg.resume(replayed, result)
                .record(replica, None, Some(&stream));
        }
        subscribed.err()
    }

    /// `cancel`: stops the stream; its terminal event is the answer (see [`answer_cancel`]).
    async fn cancel(&mut self, msg: StreamMsg) -> Option<Message> {
        let rid = msg.request_id.as_deref();
        let stream = match self.app.stream_to_manage(self.caller, &msg.stream_id).await {
            Ok(s) => s,
            Err(e) => return Some(error_msg(&e, Some(&msg.stream_id), rid)),
        };
        let Ok(permit) = self.limits.cancels.clone().try_acquire_owned() else {
            self.limits.strikes += 1;
            let max = self.app.config.http.ws_max_pending_cancels;
            return Some(error_msg(
                &ApiError::TooManyCancels(max),
                Some(stream.id.as_str()),
                rid,
            ));
        };
        let answer = if self.subs.contains_key(&stream.id) {
            CancelAnswer::BySubscription
        } else {
            CancelAnswer::Here
        };
        let cancel = answer_cancel(
            self.app.hub.clone(),
            stream,
            self.tx.clone(),
            msg.request_id,
            answer,
        );
        self.app.hub.spawn(async move {
            cancel.await;
            drop(permit);
        });
        None
    }

    /// `unsubscribe`: stops following the stream (no reply).
    async fn unsubscribe(&mut self, msg: StreamMsg) -> Option<Message> {
        let rid = msg.request_id.as_deref();
        let stream = match self.app.stream_for(self.caller, &msg.stream_id).await {
            Ok(s) => s,
            Err(e) => return Some(error_msg(&e, Some(&msg.stream_id), rid)),
        };
        if let Some(s) = self.subs.remove(&stream.id) {
            s.forwarder.abort();
        }
        None
    }

    /// Follows `stream` from `after` (its forwarder queues `first`, then the events); returns
    /// the subscription's backlog end (the last seq that existed when it subscribed).
    fn follow(
        &mut self,
        stream: &Arc<StreamState>,
        after: u64,
        request_id: Option<&str>,
        first: Option<Message>,
    ) -> Result<u64, Message> {
        let sub = stream
            .subscribe(after)
            .map_err(|e| error_msg(&e, Some(stream.id.as_str()), request_id))?;
        let backlog = sub.backlog_end();
        let forward = forward(sub, self.tx.clone(), self.guard.clone(), first);
        let forwarder = self.app.hub.spawn(forward);
        self.subs
            .insert(stream.id.clone(), Subscribed { forwarder });
        Ok(backlog)
    }

    /// Ends every subscription's forwarder (the socket is closing).
    fn unsubscribe_all(&mut self) {
        for (_, s) in self.subs.drain() {
            s.forwarder.abort();
        }
    }
}

/// What a socket is told when the credential or ticket it was opened with expires.
const CREDENTIALS_EXPIRED: ApiError = ApiError::CredentialsExpired(
    "the credential or ticket this socket was opened with has expired; reconnect with a fresh \
     one",
);

/// Resolves when `expires` comes; never without one.
async fn expiry(expires: Option<auth::CredentialExpiry>) {
    match expires {
        Some(e) => tokio::time::sleep_until(e.deadline()).await,
        None => std::future::pending().await,
    }
}

/// Whether a read failed because a message or frame was over the size limit.
fn too_big(err: axum::Error) -> bool {
    err.into_inner()
        .downcast_ref::<tungstenite::Error>()
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

/// Who sends the terminal event that answers a `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelAnswer {
    /// The socket follows the stream: its subscription delivers the event.
    BySubscription,
    /// It does not: [`answer_cancel`] sends the event once the owner wrote it.
    Here,
}

/// Cancels `stream` and sends the answer: an error, or (when `answer` says so) the terminal
/// event.
async fn answer_cancel(
    hub: Arc<crate::hub::Hub>,
    stream: Arc<StreamState>,
    tx: mpsc::Sender<Message>,
    request_id: Option<String>,
    answer: CancelAnswer,
) {
    if let Err(e) = hub.cancel(&stream).await {
        let reply = error_msg(&e, Some(stream.id.as_str()), request_id.as_deref());
        let _ = tx.send(reply).await;
        return;
    }
    if answer == CancelAnswer::BySubscription {
        return;
    }
    let last = stream.last_seq();
    let terminal = stream
        .events_after(last.saturating_sub(1))
        .ok()
        .and_then(|(_, events)| events.into_iter().next())
        .filter(|e| e.is_terminal());
    if let Some(event) = terminal
        && let Ok(text) = Utf8Bytes::try_from(event.ws(stream.id.as_str()).clone())
    {
        let _ = tx.send(Message::Text(text)).await;
    }
}

/// A subscription's forwarder: queues `first`, then every event, until the stream ends, the
/// subscription falls behind (`slow_consumer`), or the socket is gone.
async fn forward(
    mut sub: Subscription,
    tx: mpsc::Sender<Message>,
    guard: Arc<TransportGuard>,
    first: Option<Message>,
) {
    let id = sub.stream().id.clone();
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
                let e = ApiError::SlowConsumer(format!(
                    "the socket fell too far behind; subscribe again with after={last_seq}"
                ));
                let _ = tx.send(error_msg(&e, Some(id.as_str()), None)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        auth::Security,
        bus::memory::MemoryBus,
        config::EdgeConfig,
        event::{Event, EventKind, FinishReason, Usage},
        hub::Hub,
        lifecycle::Lifecycle,
        limits::{Limiter, memory::MemoryLimits},
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
        let lifecycle = Lifecycle::default();
        let hub = Hub::new(
            config.clone(),
            "ws".into(),
            generators,
            store,
            bus,
            true,
            &lifecycle,
        );
        let security = Security::from_args(&config.auth, false).expect("no auth");
        let policy = config.limits.policy();
        AppState {
            hub,
            security: Arc::new(security),
            limiter: Arc::new(Limiter::new(policy, Arc::new(MemoryLimits::new(policy)))),
            config,
        }
    }

    #[tokio::test]
    async fn cancels_past_the_in_flight_bound_are_refused_and_count_as_strikes() {
        let app = app().await;
        {
            let (tx, _rx) = mpsc::channel(OUTGOING);
            let cancel = json!({"type": "cancel", "stream_id": DONE}).to_string();
            let caller = Caller::anonymous();
            let mut socket = Socket::new(&app, &caller, tx);
            // Every permit held by cancels still in flight.
            socket.limits = SocketLimits::new(50, Arc::new(Semaphore::new(0)));
            for strikes in 1..=3 {
                let reply = socket.handle_text(&cancel).await.expect("a refusal");
                let Message::Text(text) = reply else {
                    panic!("a text reply")
                };
                let v: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(v["code"], "too_many_cancels", "{v}");
                assert_eq!(v["stream_id"], DONE);
                assert_eq!(socket.limits.strikes, strikes);
            }
            // With room, the cancel goes ahead (answered later by the terminal event).
            socket.limits = SocketLimits::new(50, Arc::new(Semaphore::new(1)));
            let reply = socket.handle_text(&cancel).await;
            assert!(reply.is_none(), "{reply:?}");
            assert_eq!(socket.limits.strikes, 0);
        }
    }

    #[test]
    fn client_messages_parse_by_type_and_refuse_unknown_keys() {
        let parse = |v: Value| serde_json::from_value::<ClientMessage>(v);
        let ping = parse(json!({"type": "ping", "id": null, "extra": 1})).expect("ping");
        assert!(matches!(
            ping,
            ClientMessage::Ping(PingMsg {
                id: Some(Value::Null)
            })
        ));
        let ping = parse(json!({"type": "ping"})).expect("ping");
        assert!(matches!(ping, ClientMessage::Ping(PingMsg { id: None })));
        let other = parse(json!({"type": "hello", "x": 1})).expect("unknown");
        assert!(matches!(other, ClientMessage::Unknown));
        let sub = parse(json!({"type": "subscribe", "stream_id": "s", "after": 3}));
        assert!(matches!(
            sub,
            Ok(ClientMessage::Subscribe(StreamMsg { after: 3, .. }))
        ));
        let bogus = parse(json!({"type": "cancel", "stream_id": "s", "bogus": true}));
        let err = bogus.expect_err("unknown key").to_string();
        assert_eq!(
            err,
            "unknown field `bogus`, expected one of `request_id`, `stream_id`, `after`"
        );
        let err = parse(json!({"type": "start"}))
            .expect_err("no request")
            .to_string();
        assert!(err.contains("missing field `request`"), "{err}");
    }

    #[test]
    fn only_a_capacity_error_is_a_message_too_big() {
        let too_long =
            tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong {
                size: 2,
                max_size: 1,
            });
        assert!(too_big(axum::Error::new(too_long)));
        assert!(!too_big(axum::Error::new(
            tungstenite::Error::ConnectionClosed
        )));
        assert!(!too_big(axum::Error::new(std::io::Error::other(
            "capacity too long"
        ))));
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
