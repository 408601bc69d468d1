//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz), and a test that runs every committed
//! corpus file through them, so an input that once failed stays in the ordinary test suite.
//!
//! Each function takes arbitrary bytes, drives the real code with them and panics when a
//! property fails (not only when the code under test panics):
//!
//! - [`ws_messages`]: newline-separated frames through a real WebSocket session
//!   ([`tokenfan_edge::transports::ws::serve`]) over in-memory channels; every reply is a
//!   well-formed protocol message, pongs echo their pings in order, each kind of bad frame gets
//!   its error, a valid `start` reaches stream creation, replayed stream events equal the stored ones.
//! - [`stream_request`]: one body through the native and the OpenAI request validation,
//!   directly and through the router; a valid spec survives its JSON round trip and both
//!   paths agree.
//! - [`cursor`]: `Last-Event-ID` bytes and a query string through `GET …/events`, `…/poll`
//!   and `GET /v1/streams/{id}`, checked against a reference decoder of the query and the
//!   cursor rules; accepted cursors replay exactly the events after them.
//! - [`jwt`]: a token's raw text, or a header and claims signed with the edge's HS256 secret,
//!   through the JWT verifier: forged tokens are refused; an accepted token's tenant, audience,
//!   issuer and expiry are what the claims say.
//! - [`credentials`]: `Authorization` and `Cookie` headers and a query string (with
//!   placeholders for a valid API key, JWT and ticket) through the request authentication of
//!   both modes: a caller is only ever the one a valid credential or in-scope ticket names,
//!   with that credential's expiry; every refusal is a 401 or 403 with a tag.
//!
//! The fixture is one edge per thread, built once and leaked: a cluster-mode hub over the
//! in-memory store and bus holding two finished streams (read from the store, so no owner task
//! and no generator call exist), with `max_streams = 0`, so a valid request ends in a 503
//! `capacity` instead of a generator call. Nothing touches the network.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use axum::{
    Router,
    body::Body,
    extract::ws::Message,
    http::{HeaderValue, Request, StatusCode, Uri, header},
};
use bytes::Bytes;
use futures::{StreamExt as _, stream};
use serde_json::Value;
use tokenfan_edge::{
    Lifecycle, app, auth,
    bus::memory::MemoryBus,
    config::{EdgeConfig, StreamLimits},
    error::ApiError,
    event::{Event, EventKind, FinishReason, Usage},
    hub::Hub,
    ids::StreamId,
    request::{ROLES, StreamRequest, StreamSpec, parse_json},
    state::AppState,
    store::{LeaseTerms, Store, StreamMeta, memory::MemoryStore},
    stream::StreamStatus,
    tenant::{self, Caller},
    transports::{openai::ChatRequest, sse::parse_cursor, ws},
    upstream::GeneratorPool,
};
use tower::ServiceExt as _;

/// A finished stream of the fixture that ends with `done`.
pub const DONE_STREAM: &str = "FuzzFixtureDoneAAAAAAA";
/// A finished stream of the fixture that ends with an `error` event.
pub const ERROR_STREAM: &str = "FuzzFixtureErrorAAAAAA";
/// A well-formed id that no stream has.
pub const UNKNOWN_STREAM: &str = "AAAAAAAAAAAAAAAAAAAAAA";

/// Frames one [`ws_messages`] input may hold (a longer input is cut).
const MAX_FRAMES: usize = 64;
/// Client pongs sent after the input's frames: each lets the subscriptions' forwarders run, so
/// replays reach the socket before it closes.
const TRAILING_PONGS: usize = 32;

struct Fixture {
    rt: tokio::runtime::Runtime,
    app: AppState,
    router: Router,
    /// The fixture streams' events by id.
    streams: HashMap<&'static str, Vec<Arc<Event>>>,
}

thread_local! {
    static FIXTURE: &'static Fixture = Box::leak(Box::new(Fixture::new()));
}

fn fixture() -> &'static Fixture {
    FIXTURE.with(|f| *f)
}

fn token(seq: u64, text: &str) -> Arc<Event> {
    Arc::new(Event::new(seq, EventKind::Token { text: text.into() }))
}

impl Fixture {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut config = EdgeConfig::defaults();
        config.streams.max_streams = 0;
        config.streams.generator_connections = 1;
        let config = Arc::new(config);
        let done = vec![
            token(1, "Hel"),
            token(2, "lo, \"wörld\""),
            token(3, " 🚀\n"),
            token(4, "</script>\u{0}"),
            token(5, "中文"),
            Arc::new(Event::new(
                6,
                EventKind::Done {
                    finish_reason: FinishReason::Stop,
                    usage: Usage {
                        prompt_tokens: 3,
                        completion_tokens: 5,
                    },
                },
            )),
        ];
        let failed = vec![
            token(1, "a"),
            token(2, "b"),
            Arc::new(Event::new(
                3,
                EventKind::Error {
                    code: "generator_unavailable",
                    message: "the generator failed".into(),
                },
            )),
        ];
        let streams = HashMap::from([(DONE_STREAM, done), (ERROR_STREAM, failed)]);
        let app = rt.block_on(async {
            let store = Arc::new(MemoryStore::default());
            let spec = StreamRequest {
                prompt: Some("fuzz".into()),
                seed: Some(1),
                max_tokens: Some(16),
                ..StreamRequest::default()
            }
            .validate(&config.streams)
            .expect("a valid fixture request");
            for (id, events) in &streams {
                let id = StreamId::parse(id).expect("a valid fixture id");
                let meta = StreamMeta::running(&spec, "edge-owner");
                let terms = LeaseTerms {
                    ttl: config.lease_ttl(),
                    keep: config.history_ttl(),
                };
                store.create(&id, meta, terms).await.expect("memory store");
                store.append(&id, 1, events).await.expect("memory store");
            }
            // Connects lazily: never, since no stream can be created.
            let generators = Arc::new(
                GeneratorPool::new(&["http://127.0.0.1:9".to_owned()], 1).expect("a pool"),
            );
            let bus = Arc::new(MemoryBus::default());
            let lifecycle = Lifecycle::default();
            let hub = Hub::new(
                config.clone(),
                "fuzz".into(),
                generators,
                store,
                bus,
                true,
                &lifecycle,
            );
            for id in streams.keys() {
                let state = hub
                    .get_for(id, Some(Caller::anonymous().tenant()))
                    .await
                    .expect("the fixture stream");
                assert_ne!(state.status(), StreamStatus::Running);
            }
            let security =
                auth::Security::from_args(&config.auth, false).expect("authentication off");
            AppState {
                hub,
                security: Arc::new(security),
                limiter: Arc::new(tokenfan_edge::limits::Limiter::memory(
                    0.0,
                    1,
                    0,
                    tokenfan_edge::limits::LEASE,
                )),
                config,
            }
        });
        let router = app::router(app.clone());
        Self {
            rt,
            app,
            router,
            streams,
        }
    }

    /// Sends one request through the router; the status and the body.
    fn send(&self, request: Request<Body>) -> (StatusCode, Bytes) {
        self.rt.block_on(async {
            let response = self
                .router
                .clone()
                .oneshot(request)
                .await
                .expect("infallible");
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 16 << 20)
                .await
                .expect("a finite body");
            (status, body)
        })
    }

    fn post_json(&self, path: &str, body: &[u8]) -> (StatusCode, Value) {
        let request = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_vec()))
            .expect("a request");
        let (status, body) = self.send(request);
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path} answered {status} with a non-JSON body: {e}"));
        (status, json)
    }
}

fn object_keys(value: &Value) -> Vec<&str> {
    value
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

fn nonempty_str<'a>(value: &'a Value, key: &str) -> &'a str {
    let s = value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{value}: no string {key:?}"));
    assert!(!s.is_empty(), "{value}: empty {key:?}");
    s
}

/// A native error body: exactly `{"error":{"code","message"}}`; the code.
fn native_error(body: &Value) -> &str {
    assert_eq!(object_keys(body), ["error"], "{body}");
    let error = &body["error"];
    let mut keys = object_keys(error);
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message"], "{body}");
    nonempty_str(error, "message");
    nonempty_str(error, "code")
}

/// An OpenAI error body: `{"error":{"message","type","param","code"}}` with the type that
/// goes with `status`; the code.
fn openai_error(status: StatusCode, body: &Value) -> &str {
    assert_eq!(object_keys(body), ["error"], "{body}");
    let error = &body["error"];
    let mut keys = object_keys(error);
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    nonempty_str(error, "message");
    assert!(
        error["param"].is_null() || error["param"].is_string(),
        "{body}"
    );
    let kind = nonempty_str(error, "type");
    let expected = match status.as_u16() {
        429 => "requests",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    assert_eq!(kind, expected, "{status}: {body}");
    nonempty_str(error, "code")
}

// ---------------------------------------------------------------------------------------------
// WebSocket messages

/// What the frames of one input must produce, worked out without the server.
#[derive(Debug, Default)]
struct WsExpectations {
    invalid_json: usize,
    binary: usize,
    missing_type: usize,
    unknown_type: usize,
    /// `start` messages whose request is valid: each must reach stream creation (and get
    /// `capacity`, the fixture holding no room).
    valid_starts: usize,
    /// The `id` of each `ping`, in order.
    pongs: Vec<Option<Value>>,
    /// String `request_id`s sent (only these may be echoed).
    request_ids: HashSet<String>,
    /// `subscribe` and `cancel` messages per stream id: each may produce one terminal event.
    terminal_sources: HashMap<String, usize>,
}

impl WsExpectations {
    fn of(frames: &[Message], limits: &StreamLimits) -> Self {
        let mut x = Self::default();
        for frame in frames {
            let text = match frame {
                Message::Text(t) => t.as_str(),
                _ => {
                    x.binary += 1;
                    continue;
                }
            };
            let Ok(value) = serde_json::from_str::<Value>(text) else {
                x.invalid_json += 1;
                continue;
            };
            if let Some(id) = value.get("request_id").and_then(Value::as_str) {
                x.request_ids.insert(id.to_owned());
            }
            match value.get("type").and_then(Value::as_str).unwrap_or("") {
                "" => x.missing_type += 1,
                "ping" => x.pongs.push(value.get("id").cloned()),
                "start" => {
                    if start_is_valid(&value, limits) {
                        x.valid_starts += 1;
                    }
                }
                "subscribe" | "cancel" => {
                    if let Some(id) = value.get("stream_id").and_then(Value::as_str) {
                        *x.terminal_sources.entry(id.to_owned()).or_default() += 1;
                    }
                }
                "unsubscribe" => {}
                _ => x.unknown_type += 1,
            }
        }
        x
    }
}

/// Whether a `start` message is well formed (`type`, optional string `request_id`, a
/// `request`, nothing else) and its request passes validation.
fn start_is_valid(value: &Value, limits: &StreamLimits) -> bool {
    let Some(object) = value.as_object() else {
        return false;
    };
    let shape = object
        .keys()
        .all(|k| ["type", "request_id", "request"].contains(&k.as_str()))
        && object
            .get("request_id")
            .is_none_or(|r| r.is_null() || r.is_string());
    let Some(request) = object.get("request").filter(|_| shape) else {
        return false;
    };
    serde_json::from_value::<StreamRequest>(request.clone())
        .ok()
        .is_some_and(|r| r.validate(limits).is_ok())
}

/// Feeds newline-separated frames (text when valid UTF-8, else binary) to one WebSocket
/// session and checks every reply. Panics when a property fails.
pub fn ws_messages(data: &[u8]) {
    let fx = fixture();
    let frames: Vec<Message> = data
        .split(|b| *b == b'\n')
        .take(MAX_FRAMES)
        .map(|frame| match std::str::from_utf8(frame) {
            Ok(text) => Message::Text(text.to_owned().into()),
            Err(_) => Message::Binary(Bytes::copy_from_slice(frame)),
        })
        .collect();
    let expect = WsExpectations::of(&frames, &fx.app.config.streams);
    let replies = fx.rt.block_on(async {
        let (sink, mut replies) = futures::channel::mpsc::unbounded::<Message>();
        let trailing = stream::unfold(0, |n| async move {
            if n == TRAILING_PONGS {
                return None;
            }
            tokio::task::yield_now().await;
            Some((Ok(Message::Pong(Bytes::new())), n + 1))
        });
        let incoming = stream::iter(frames.into_iter().map(Ok)).chain(trailing);
        ws::serve(
            fx.app.clone(),
            Caller::anonymous(),
            sink,
            Box::pin(incoming),
        )
        .await;
        let mut out = Vec::new();
        while let Ok(reply) = replies.try_recv() {
            out.push(reply);
        }
        out
    });

    let mut codes: HashMap<String, usize> = HashMap::new();
    let mut pongs = Vec::new();
    let mut terminals: HashMap<String, usize> = HashMap::new();
    for reply in &replies {
        let Message::Text(text) = reply else {
            panic!("a non-text reply: {reply:?}");
        };
        let value: Value = serde_json::from_str(text.as_str())
            .unwrap_or_else(|e| panic!("a reply that is not JSON ({e}): {text}"));
        let kind = nonempty_str(&value, "type");
        let has_seq = value.get("seq").is_some();
        match kind {
            "pong" => {
                let keys = object_keys(&value);
                assert!(keys.iter().all(|k| ["type", "id"].contains(k)), "{value}");
                pongs.push(value.get("id").cloned());
            }
            "error" if !has_seq => {
                let keys = object_keys(&value);
                assert!(
                    keys.iter().all(|k| {
                        ["type", "code", "message", "stream_id", "request_id"].contains(k)
                    }),
                    "{value}"
                );
                nonempty_str(&value, "message");
                let code = nonempty_str(&value, "code");
                if let Some(rid) = value.get("request_id") {
                    let rid = rid.as_str().unwrap_or_else(|| panic!("{value}"));
                    assert!(expect.request_ids.contains(rid), "echoed {rid:?}: {value}");
                    assert!(
                        !["invalid_json", "unsupported_frame", "slow_consumer"].contains(&code),
                        "{value}"
                    );
                }
                if let Some(sid) = value.get("stream_id") {
                    assert!(sid.is_string(), "{value}");
                }
                *codes.entry(code.to_owned()).or_default() += 1;
            }
            "token" | "done" | "error" => {
                // A stream event: it must be the stored one, with the stream's id.
                let id = nonempty_str(&value, "stream_id");
                let events = fx
                    .streams
                    .get(id)
                    .unwrap_or_else(|| panic!("an event of an unknown stream: {value}"));
                let seq = value["seq"].as_u64().unwrap_or_else(|| panic!("{value}"));
                let stored = seq
                    .checked_sub(1)
                    .and_then(|i| events.get(i as usize))
                    .unwrap_or_else(|| panic!("seq out of range: {value}"));
                let stored: Value = serde_json::from_slice(stored.ws(id)).expect("stored JSON");
                assert_eq!(
                    value, stored,
                    "a replayed event differs from the stored one"
                );
                if kind != "token" {
                    *terminals.entry(id.to_owned()).or_default() += 1;
                }
            }
            other => panic!("unexpected reply type {other:?}: {value}"),
        }
    }
    let count = |code: &str| codes.get(code).copied().unwrap_or(0);
    assert_eq!(pongs, expect.pongs, "pongs answer the pings, in order");
    assert_eq!(count("invalid_json"), expect.invalid_json, "{replies:?}");
    assert_eq!(count("unsupported_frame"), expect.binary, "{replies:?}");
    assert_eq!(count("unknown_type"), expect.unknown_type, "{replies:?}");
    assert!(
        count("invalid_message") >= expect.missing_type,
        "{replies:?}"
    );
    assert_eq!(count("capacity"), expect.valid_starts, "{replies:?}");
    for (id, n) in terminals {
        let sources = expect.terminal_sources.get(&id).copied().unwrap_or(0);
        assert!(
            n <= sources,
            "{n} terminal events of {id} for {sources} subscribe/cancel messages"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies

/// What a valid spec must satisfy.
fn check_spec(spec: &StreamSpec, limits: &StreamLimits) {
    assert!(!spec.messages.is_empty());
    assert!(
        spec.messages
            .iter()
            .all(|m| ROLES.contains(&m.role.as_str()))
    );
    assert!((1..=limits.max_tokens_cap).contains(&spec.max_tokens));
    let t = spec.timing;
    assert!(t.ttft_ms.is_none_or(|v| v <= limits.max_ttft_ms));
    assert!(
        t.inter_token_ms
            .is_none_or(|v| v <= limits.max_inter_token_ms)
    );
    assert!(t.jitter_ms.is_none_or(|v| v <= limits.max_jitter_ms));
    assert_eq!(
        StreamSpec::from_json(&spec.to_json()).as_ref(),
        Some(spec),
        "a spec survives the JSON kept with the stream's metadata"
    );
}

fn check_refusal(e: &ApiError) {
    match e.code() {
        "invalid_json" | "invalid_request" => assert_eq!(e.status(), StatusCode::BAD_REQUEST),
        "model_not_found" => assert_eq!(e.status(), StatusCode::NOT_FOUND),
        other => panic!("unexpected refusal {other}: {e}"),
    }
    assert!(!e.message().is_empty());
}

/// Sends one body to the native and the OpenAI validation, directly and through the router,
/// and checks that they agree and that valid specs round-trip. Panics when a property fails.
pub fn stream_request(data: &[u8]) {
    let fx = fixture();
    let limits = &fx.app.config.streams;

    let native = parse_json::<StreamRequest>(data).and_then(|r| r.validate(limits));
    match &native {
        Ok(spec) => check_spec(spec, limits),
        Err(e) => check_refusal(e),
    }
    let (status, body) = fx.post_json("/v1/streams", data);
    let code = native_error(&body);
    match &native {
        // Valid: it reached stream creation, refused only for want of room.
        Ok(_) => assert_eq!(
            (status, code),
            (StatusCode::SERVICE_UNAVAILABLE, "capacity")
        ),
        Err(e) => {
            assert_eq!((status, code), (e.status(), e.code()), "{body}");
            assert_eq!(body["error"]["message"], e.message().as_str());
        }
    }

    let chat = parse_json::<ChatRequest>(data);
    let (status, body) = fx.post_json("/v1/chat/completions", data);
    let code = openai_error(status, &body);
    match &chat {
        Err(e) => assert_eq!((status, code), (e.status(), e.code()), "{body}"),
        Ok(_) => match code {
            "capacity" => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE),
            "invalid_request" => assert_eq!(status, StatusCode::BAD_REQUEST),
            "model_not_found" => assert_eq!(status, StatusCode::NOT_FOUND),
            other => panic!("unexpected OpenAI refusal {other}: {body}"),
        },
    }
    // A valid native body naming its model and messages is a valid chat request too (every
    // key it may hold means the same there).
    if native.is_ok()
        && let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(data)
        && o.contains_key("model")
        && o.contains_key("messages")
    {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cursors

/// The reference cursor rule: optional surrounding whitespace, an optional `+`, ASCII digits,
/// within `u64`.
fn reference_cursor(value: &str) -> Option<u64> {
    let t = value.trim();
    let digits = t.strip_prefix('+').unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.bytes().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn check_parse_cursor(value: &str) {
    match (parse_cursor("after", value), reference_cursor(value)) {
        (Ok(n), Some(m)) => {
            assert_eq!(n, m, "{value:?}");
            assert_eq!(parse_cursor("after", &n.to_string()), Ok(n), "round trip");
        }
        (Err(e), None) => {
            assert_eq!(
                (e.status(), e.code()),
                (StatusCode::BAD_REQUEST, "invalid_cursor")
            );
            assert!(e.message().starts_with("after: "), "{}", e.message());
        }
        (got, want) => panic!("{value:?}: parsed {got:?}, the rule says {want:?}"),
    }
}

/// `application/x-www-form-urlencoded` decoding, written independently of the server's.
fn decode_query(query: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = |c: u8| char::from(c).to_digit(16);
            match b[i] {
                b'+' => out.push(b' '),
                b'%' => match (
                    b.get(i + 1).and_then(|&c| hex(c)),
                    b.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                },
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// The endpoints a cursor reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Events,
    Poll,
    Status,
}

/// What the server must answer, by the documented rules.
#[derive(Debug, PartialEq, Eq)]
enum Want {
    /// An error with this status and code.
    Error(u16, &'static str),
    /// 204 (SSE at the end).
    NoContent,
    /// 200 with the events after this cursor.
    Events { after: u64, openai: bool },
}

fn want(
    endpoint: Endpoint,
    longpoll_max_ms: u64,
    stream: Option<&[Arc<Event>]>,
    last_event_id: Option<&HeaderValue>,
    query: &[(String, String)],
) -> Want {
    let get = |key: &str| {
        query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let repeated = |key: &str| query.iter().filter(|(k, _)| k == key).count() > 1;
    let known: &[&str] = match endpoint {
        Endpoint::Events => &["after", "format", "include_usage"],
        Endpoint::Poll => &["after", "timeout_ms"],
        Endpoint::Status => &["after"],
    };
    if known.iter().any(|k| repeated(k))
        || (endpoint == Endpoint::Events
            && get("include_usage").is_some_and(|v| v != "true" && v != "false"))
    {
        return Want::Error(400, "invalid_query");
    }
    let Some(events) = stream else {
        return Want::Error(404, "stream_not_found");
    };
    let last = events.len() as u64;
    let mut cursor_text = get("after");
    if endpoint == Endpoint::Events
        && let Some(v) = last_event_id
    {
        let Ok(v) = v.to_str() else {
            return Want::Error(400, "invalid_cursor");
        };
        if !v.trim().is_empty() {
            cursor_text = Some(v);
        }
    }
    let after = match cursor_text.map(reference_cursor) {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => return Want::Error(400, "invalid_cursor"),
    };
    let mut openai = false;
    match endpoint {
        Endpoint::Events => match get("format") {
            None | Some("native") => {}
            Some("openai") => openai = true,
            Some(_) => return Want::Error(400, "invalid_request"),
        },
        Endpoint::Poll => {
            let in_range = |v: &str| {
                v.trim()
                    .parse::<u64>()
                    .is_ok_and(|ms| ms <= longpoll_max_ms)
            };
            if get("timeout_ms").is_some_and(|v| !in_range(v)) {
                return Want::Error(400, "invalid_request");
            }
        }
        Endpoint::Status => {}
    }
    if after > last {
        return Want::Error(400, "cursor_out_of_range");
    }
    if endpoint == Endpoint::Events && after == last {
        return Want::NoContent;
    }
    Want::Events { after, openai }
}

/// The `id:` of each frame of an SSE body, and the `data:` of each frame that has one.
fn sse_frames(body: &str) -> Vec<(Option<u64>, Option<&str>)> {
    body.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|frame| {
            let mut id = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse().unwrap_or_else(|_| panic!("bad id line {line:?}")));
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(v);
                }
            }
            (id, data)
        })
        .collect()
}

/// Byte 0 chooses the stream, the endpoint and whether to send `Last-Event-ID`; the rest is
/// the header's bytes, a newline, the query string. Checks `parse_cursor` on both pieces,
/// then the endpoint's answer against the documented rules. Panics when a property fails.
pub fn cursor(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (header_bytes, query_bytes) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    for piece in [header_bytes, query_bytes] {
        if let Ok(text) = std::str::from_utf8(piece) {
            check_parse_cursor(text);
        }
    }

    let fx = fixture();
    let id = match selector & 3 {
        0 => DONE_STREAM,
        1 => ERROR_STREAM,
        2 => UNKNOWN_STREAM,
        _ => "not-an-id",
    };
    let endpoint = match (selector >> 2) % 3 {
        0 => Endpoint::Events,
        1 => Endpoint::Poll,
        _ => Endpoint::Status,
    };
    let suffix = match endpoint {
        Endpoint::Events => "/events",
        Endpoint::Poll => "/poll",
        Endpoint::Status => "",
    };
    let mut target = format!("/v1/streams/{id}{suffix}?").into_bytes();
    target.extend_from_slice(query_bytes);
    // Only what an HTTP server could receive: a parsable request target and header value.
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let last_event_id = if selector & 0x20 != 0 {
        match HeaderValue::from_bytes(header_bytes) {
            Ok(v) => Some(v),
            Err(_) => return,
        }
    } else {
        None
    };
    let query = decode_query(uri.query().unwrap_or(""));
    let events = fx.streams.get(id).map(Vec::as_slice);
    let longpoll_max_ms = fx.app.config.http.longpoll_max_ms;
    let want = want(
        endpoint,
        longpoll_max_ms,
        events,
        last_event_id.as_ref(),
        &query,
    );

    let mut request = Request::get(uri.clone());
    if let Some(v) = &last_event_id {
        request = request.header("last-event-id", v);
    }
    let (status, body) = fx.send(request.body(Body::empty()).expect("a request"));
    let context = format!("{uri} last-event-id={last_event_id:?}: {status}");
    match want {
        Want::Error(code_status, code) => {
            assert_eq!(status.as_u16(), code_status, "{context} (want {code})");
            let body: Value = serde_json::from_slice(&body).expect("a JSON error");
            assert_eq!(native_error(&body), code, "{context}");
        }
        Want::NoContent => {
            assert_eq!(status, StatusCode::NO_CONTENT, "{context}");
            assert!(body.is_empty());
        }
        Want::Events { after, openai } => {
            assert_eq!(status, StatusCode::OK, "{context}");
            let events = events.expect("a fixture stream");
            let last = events.len() as u64;
            let later = &events[after as usize..];
            match endpoint {
                Endpoint::Events if openai => {
                    let text = std::str::from_utf8(&body).expect("UTF-8");
                    let ids: Vec<u64> = sse_frames(text).iter().filter_map(|f| f.0).collect();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{context}: {ids:?}");
                    assert!(
                        ids.iter()
                            .all(|&i| (i == 0 && after == 0) || (i > after && i <= last)),
                        "{context}: {ids:?}"
                    );
                    assert_eq!(ids.last(), Some(&last), "{context}: {text}");
                }
                Endpoint::Events => {
                    let text = std::str::from_utf8(&body).expect("UTF-8");
                    let frames = sse_frames(text);
                    assert_eq!(
                        frames.first(),
                        Some(&(None, None)),
                        "{context}: retry first"
                    );
                    assert!(text.starts_with("retry: 1000\n\n"), "{context}");
                    let got: Vec<(Option<u64>, Option<&str>)> = frames[1..].to_vec();
                    let stored: Vec<(Option<u64>, Option<&str>)> = later
                        .iter()
                        .map(|e| {
                            (
                                Some(e.seq),
                                Some(std::str::from_utf8(e.json()).expect("UTF-8")),
                            )
                        })
                        .collect();
                    assert_eq!(
                        got, stored,
                        "{context}: exactly the events after the cursor"
                    );
                }
                Endpoint::Poll | Endpoint::Status => {
                    let body: Value = serde_json::from_slice(&body).expect("a JSON answer");
                    assert_eq!(body["stream_id"], id, "{context}");
                    let status = match &events[events.len() - 1].kind {
                        EventKind::Error { .. } => "error",
                        _ => "done",
                    };
                    assert_eq!(body["status"], status, "{context}");
                    let stored: Vec<Value> = later
                        .iter()
                        .map(|e| serde_json::from_slice(e.json()).expect("stored JSON"))
                        .collect();
                    assert_eq!(body["events"], Value::Array(stored), "{context}");
                    let next = if later.is_empty() { after } else { last };
                    assert_eq!(body["next_after"], next, "{context}");
                }
            }
        }
    }
}

/// The HS256 secret, audience and issuer of the auth targets.
const FUZZ_JWT_SECRET: &str = "fuzz-hs256-secret-0123456789abcdef0123";
const FUZZ_AUDIENCE: &str = "tokenfan";
const FUZZ_ISSUER: &str = "https://issuer.fuzz";
const FUZZ_TICKET_SECRET: &str = "fuzz-ticket-secret-0123456789abcdef012";
const FUZZ_API_KEY: &str = "sk-fuzz-0123456789abcdef";

/// Authentication of both modes, and a valid credential of each kind.
struct AuthFixture {
    keys: auth::Security,
    jwt: auth::Security,
    verifier: auth::jwt::JwtAuth,
    token: String,
    token_until: u64,
    ticket: String,
    ticket_until: u64,
}

fn auth_fixture() -> &'static AuthFixture {
    thread_local! {
        static AUTH: &'static AuthFixture = Box::leak(Box::new(build_auth_fixture()));
    }
    AUTH.with(|f| *f)
}

fn build_auth_fixture() -> AuthFixture {
    use auth::{AuthMode, jwt, ticket::TicketKey};
    let base = || {
        let mut c = EdgeConfig::defaults();
        c.auth.ticket_secret = Some(FUZZ_TICKET_SECRET.parse().expect("secret"));
        c.auth.auth_cookie = Some("tf".into());
        c
    };
    let mut keys = base();
    keys.auth.mode = AuthMode::ApiKeys;
    keys.auth.api_keys = vec![format!("{FUZZ_API_KEY}:alice")];
    let mut jwts = base();
    jwts.auth.mode = AuthMode::Jwt;
    jwts.auth.jwt_hs256_secret = Some(FUZZ_JWT_SECRET.parse().expect("secret"));
    jwts.auth.jwt_audience = vec![FUZZ_AUDIENCE.into()];
    jwts.auth.jwt_issuer = Some(FUZZ_ISSUER.into());
    jwts.auth.jwt_leeway_secs = 0;
    let verifier = jwt::JwtAuth::from_args(&jwts.auth).expect("a verifier");
    let keys = auth::Security::from_args(&keys.auth, false).expect("api keys");
    let jwt_security = auth::Security::from_args(&jwts.auth, false).expect("jwt");
    let now = unix_now();
    let token_until = now + 3600;
    let claims: jwt::Claims = [
        ("tenant", serde_json::json!("acme")),
        ("aud", serde_json::json!(FUZZ_AUDIENCE)),
        ("iss", serde_json::json!(FUZZ_ISSUER)),
        ("exp", serde_json::json!(token_until)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let token = jwt::sign(
        jwt::SigningAlgorithm::HS256,
        FUZZ_JWT_SECRET.as_bytes(),
        None,
        &claims,
    )
    .expect("a token");
    let ticket_until = now + 3600;
    let ticket = TicketKey::new(FUZZ_TICKET_SECRET.as_bytes()).sign(
        &StreamId::parse(DONE_STREAM).expect("an id"),
        "alice",
        ticket_until,
    );
    AuthFixture {
        keys,
        jwt: jwt_security,
        verifier,
        token,
        token_until,
        ticket,
        ticket_until,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Byte 0 even: the rest is a token's text, verified as it is; no forged token may pass.
/// Odd: the rest is a JOSE header, a newline and the claims, signed here with the edge's HS256
/// secret; an accepted token must carry exactly what the verifier requires. Panics when a
/// property fails.
pub fn jwt(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let fx = auth_fixture();
    let token = if selector % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_owned()
    } else {
        let (header, claims) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let signing_input = format!("{}.{}", b64(header), b64(claims));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, FUZZ_JWT_SECRET.as_bytes());
        let tag = ring::hmac::sign(&key, signing_input.as_bytes());
        format!("{signing_input}.{}", b64(tag.as_ref()))
    };
    match fx.verifier.verify_until(&token) {
        Ok((tenant, until)) => {
            assert!(
                selector % 2 == 1 || token == fx.token,
                "a forged token passed: {token:?}"
            );
            let claims_text = rest.splitn(2, |b| *b == b'\n').nth(1).unwrap_or(&[]);
            let claims: serde_json::Map<String, Value> = serde_json::from_slice(claims_text)
                .unwrap_or_else(|e| panic!("accepted claims that are not an object: {e}"));
            let named = claims
                .get("tenant")
                .or_else(|| claims.get("sub"))
                .and_then(Value::as_str);
            assert_eq!(named, Some(tenant.as_str()), "the tenant is the claim's");
            assert!(tenant::check_tenant(&tenant).is_ok(), "{tenant:?}");
            let aud_ok = match claims.get("aud") {
                Some(Value::String(a)) => a == FUZZ_AUDIENCE,
                Some(Value::Array(a)) => a.iter().any(|v| v == FUZZ_AUDIENCE),
                _ => false,
            };
            assert!(aud_ok, "accepted without our audience: {claims:?}");
            assert_eq!(claims.get("iss").and_then(Value::as_str), Some(FUZZ_ISSUER));
            assert!(until >= unix_now(), "accepted an expired token: {until}");
        }
        Err(e) => {
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED, "{e:?}");
            assert!(
                ["invalid_credentials", "expired_credentials"].contains(&e.code()),
                "{e:?}"
            );
            assert!(!e.message().is_empty());
        }
    }
}

/// Byte 0 picks the mode (API keys or JWT) and the route; the rest is the `Authorization`
/// value, a newline, the `Cookie` value, a newline, the query string. `$K`, `$J` and `$T`
/// stand for a valid API key, JWT and ticket (of stream [`DONE_STREAM`]). Panics when a
/// property fails.
pub fn credentials(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let fx = auth_fixture();
    let mut parts = rest.splitn(3, |b| *b == b'\n');
    let substitute = |bytes: &[u8]| -> Vec<u8> {
        let text = String::from_utf8_lossy(bytes)
            .replace("$K", FUZZ_API_KEY)
            .replace("$J", &fx.token)
            .replace("$T", &fx.ticket);
        if std::str::from_utf8(bytes).is_ok() {
            text.into_bytes()
        } else {
            bytes.to_vec()
        }
    };
    let authorization = parts.next().unwrap_or(&[]);
    let cookie = parts.next().unwrap_or(&[]);
    let query = parts.next().unwrap_or(&[]);
    let routes: [(axum::http::Method, String); 4] = [
        (
            axum::http::Method::GET,
            format!("/v1/streams/{DONE_STREAM}/events"),
        ),
        (axum::http::Method::POST, "/v1/streams".to_owned()),
        (axum::http::Method::GET, "/v1/ws".to_owned()),
        (
            axum::http::Method::DELETE,
            format!("/v1/streams/{DONE_STREAM}"),
        ),
    ];
    let (method, path) = &routes[usize::from(selector >> 1) % routes.len()];
    let jwt_mode = selector % 2 == 1;
    let security = if jwt_mode { &fx.jwt } else { &fx.keys };
    let mut headers = axum::http::HeaderMap::new();
    if !authorization.is_empty() {
        match HeaderValue::from_bytes(&substitute(authorization)) {
            Ok(v) => {
                headers.insert(header::AUTHORIZATION, v);
            }
            Err(_) => return,
        }
    }
    if !cookie.is_empty() {
        match HeaderValue::from_bytes(&substitute(cookie)) {
            Ok(v) => {
                headers.insert(header::COOKIE, v);
            }
            Err(_) => return,
        }
    }
    let query = substitute(query);
    let uri = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{}", String::from_utf8_lossy(&query))
    };
    let Ok(uri) = uri.parse::<Uri>() else {
        return;
    };
    let mentions = |needle: &[u8]| rest.windows(needle.len()).any(|w| w == needle);
    match security.identify_until(method, &uri, &headers) {
        Ok((Caller::Tenant(tenant), until)) => {
            if jwt_mode {
                assert!(mentions(b"$J"), "a tenant without the token: {data:?}");
                assert_eq!((&*tenant, until), ("acme", Some(fx.token_until)));
            } else {
                assert!(mentions(b"$K"), "a tenant without the key: {data:?}");
                assert_eq!((&*tenant, until), ("alice", None));
            }
        }
        Ok((Caller::Ticket { tenant, stream }, until)) => {
            assert!(
                mentions(b"$T"),
                "a ticket caller without the ticket: {data:?}"
            );
            assert_eq!((&*tenant, &*stream), ("alice", DONE_STREAM));
            assert_eq!(until, Some(fx.ticket_until));
            assert_eq!(*method, axum::http::Method::GET, "tickets only read");
        }
        Err(e) => {
            assert!(
                e.status() == StatusCode::UNAUTHORIZED || e.status() == StatusCode::FORBIDDEN,
                "{e:?}"
            );
            assert!(!e.code().is_empty() && !e.message().is_empty(), "{e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every committed corpus file through its target: `fuzz/corpus/<target>/`.

    use std::path::PathBuf;

    use super::*;

    fn run_corpus(target: &str, body: fn(&[u8])) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(files.len() >= 5, "{}: a seed corpus", dir.display());
        for file in files {
            let data = std::fs::read(&file).expect("a corpus file");
            let run = std::panic::catch_unwind(|| body(&data));
            assert!(run.is_ok(), "{} fails its properties", file.display());
        }
    }

    #[test]
    fn ws_message_corpus() {
        run_corpus("ws_message", ws_messages);
    }

    #[test]
    fn stream_request_corpus() {
        run_corpus("stream_request", stream_request);
    }

    #[test]
    fn cursor_corpus() {
        run_corpus("cursor", cursor);
    }

    #[test]
    fn jwt_corpus() {
        run_corpus("jwt", jwt);
    }

    #[test]
    fn credentials_corpus() {
        run_corpus("credentials", credentials);
    }

    #[test]
    fn the_query_reference_decodes_like_a_form() {
        assert_eq!(
            decode_query("after=%2B5&x&&a+b=c%zz%4"),
            [
                ("after".to_owned(), "+5".to_owned()),
                ("x".to_owned(), String::new()),
                ("a b".to_owned(), "c%zz%4".to_owned()),
            ]
        );
        assert_eq!(reference_cursor(" 007 "), Some(7));
        assert_eq!(reference_cursor("18446744073709551616"), None);
        assert_eq!(reference_cursor("-1"), None);
    }
}
