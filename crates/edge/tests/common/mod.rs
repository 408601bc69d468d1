//! Shared helpers for the edge's integration tests: a real edge on a port-0 listener (with the
//! embedded generator), an SSE parser over reqwest, and `wait_until`.

#![allow(dead_code)]

pub mod cluster;
pub mod tls;

use std::{net::SocketAddr, time::Duration};

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokenfan_edge::{EdgeConfig, Running};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running edge; stops when dropped.
pub struct TestEdge {
    pub addr: SocketAddr,
    pub running: Running,
    pub shutdown: CancellationToken,
    pub http: reqwest::Client,
}

impl TestEdge {
    /// An edge with default configuration (embedded generator).
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    /// An edge whose configuration `tweak` adjusts.
    pub async fn with(tweak: impl FnOnce(&mut EdgeConfig)) -> Self {
        let mut config = EdgeConfig::defaults();
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.admin_listen = "127.0.0.1:0".parse().expect("addr");
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = CancellationToken::new();
        let running = tokenfan_edge::start(config, listener, shutdown.clone())
            .await
            .expect("edge starts");
        Self {
            addr: running.addr,
            running,
            shutdown,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A URL on the admin listener (`/metrics`, `/readyz`, `/healthz`).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.admin_addr)
    }

    /// The Prometheus text of the admin listener.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Generations running in the embedded generator.
    pub fn generator_active(&self) -> usize {
        self.running
            .embedded_generator
            .as_ref()
            .map(|s| s.active())
            .unwrap_or(0)
    }

    /// `POST /v1/streams` (201) and the new stream's id.
    pub async fn create(&self, body: Value) -> String {
        let r = self
            .http
            .post(self.url("/v1/streams"))
            .json(&body)
            .send()
            .await
            .expect("POST /v1/streams");
        assert_eq!(r.status(), 201, "create: {:?}", r.text().await);
        let v: Value = r.json().await.expect("json");
        v["id"].as_str().expect("id").to_string()
    }

    /// Short-poll from `after`.
    pub async fn short_poll(&self, id: &str, after: u64) -> Value {
        self.http
            .get(self.url(&format!("/v1/streams/{id}?after={after}")))
            .send()
            .await
            .expect("short-poll")
            .json()
            .await
            .expect("json")
    }

    /// Short-polls until the stream is no longer running; returns every event.
    pub async fn wait_finished(&self, id: &str) -> Vec<Value> {
        wait_until(Duration::from_secs(20), || async {
            let v = self.short_poll(id, 0).await;
            (v["status"] != "running").then(|| v["events"].as_array().cloned().unwrap_or_default())
        })
        .await
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A fast request body: short timing so tests run quickly.
pub fn fast(prompt: &str, max_tokens: u32, seed: u64) -> Value {
    json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "seed": seed,
        "timing": {"ttft_ms": 5, "inter_token_ms": 2, "jitter_ms": 0},
    })
}

/// A slow request body: streams for a while.
pub fn slow(prompt: &str, max_tokens: u32, inter_token_ms: u32) -> Value {
    json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "seed": 11,
        "timing": {"ttft_ms": 5, "inter_token_ms": inter_token_ms, "jitter_ms": 0},
    })
}

/// Long-polls `base` (an edge's `http://addr`) from `after` until the stream is no longer
/// running; returns every event. Checks each answer's `stream_id` and that an empty batch
/// leaves `next_after` where it was.
pub async fn long_poll_all(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    mut after: u64,
) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let v: Value = http
            .get(format!(
                "{base}/v1/streams/{id}/poll?after={after}&timeout_ms=5000"
            ))
            .send()
            .await
            .expect("poll")
            .json()
            .await
            .expect("json");
        assert_eq!(v["stream_id"], id);
        let batch = v["events"].as_array().expect("events").clone();
        let next = v["next_after"].as_u64().expect("next_after");
        if batch.is_empty() {
            assert_eq!(next, after, "no events: next_after stays");
        }
        after = next;
        events.extend(batch);
        if v["status"] != "running" {
            return events;
        }
    }
}

/// Polls `f` until it returns `Some`, panicking after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One parsed SSE event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("data is JSON")
    }
}

/// An incremental SSE parser (the WHATWG algorithm, minus the parts tests don't need).
#[derive(Default)]
pub struct SseParser {
    buf: String,
    current: SseEvent,
    has_field: bool,
    pub comments: usize,
}

impl SseParser {
    /// Feeds bytes (whole UTF-8 chunks); returns completed events.
    pub fn feed(&mut self, chunk: &str) -> Vec<SseEvent> {
        self.buf.push_str(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.find('\n') {
            let line: String = self.buf.drain(..=pos).collect();
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            if line.is_empty() {
                if self.has_field {
                    out.push(std::mem::take(&mut self.current));
                    self.has_field = false;
                }
                continue;
            }
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => self.current.id = Some(value.to_string()),
                "event" => self.current.event = Some(value.to_string()),
                "data" => {
                    if !self.current.data.is_empty() {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                }
                "retry" => {
                    self.current.retry = value.parse().ok();
                }
                _ => {}
            }
            self.has_field = true;
        }
        out
    }
}

/// Reads a whole SSE response into events (stops at the end of the body).
pub async fn read_sse(response: reqwest::Response) -> (Vec<SseEvent>, usize) {
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.expect("body chunk"));
        // Only feed complete UTF-8 prefixes.
        let valid = match std::str::from_utf8(&pending) {
            Ok(_) => pending.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = String::from_utf8(pending.drain(..valid).collect()).expect("utf-8");
        events.extend(parser.feed(&text));
    }
    (events, parser.comments)
}

/// The JSON of the stream events among SSE events (those with an `id:`).
pub fn stream_events(events: &[SseEvent]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.id.is_some())
        .map(|e| e.json())
        .collect()
}

/// The text carried by token events.
pub fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().expect("text"))
        .collect()
}

/// Asserts the seqs are 1..=n (or start..=n) with no gap or duplicate.
pub fn assert_contiguous(events: &[Value], first: u64) {
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs exactly once, in order");
}
