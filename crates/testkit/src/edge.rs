//! A real edge in this process for integration tests, and the requests tests make to any edge:
//! request bodies, stream creation, polling, and the text the mock generator answers.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokenfan_edge::{EdgeConfig, Running, stream::StreamState, tenant::Caller};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::wait::wait_until;

/// A running edge on a port-0 listener (its admin listener too), with the embedded generator
/// unless the configuration names one; stops when dropped.
pub struct TestEdge {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The started edge (its hub, admin address, embedded generator's counters).
    pub running: Running,
    /// Cancelled on drop: stops the edge.
    pub shutdown: CancellationToken,
    /// A plain client for requests to it.
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

    /// A URL on the public listener.
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
        stream_id(&create(&self.http, &self.url(""), &[], body).await)
    }

    /// `POST <path>` with a JSON body (the response, whatever its status).
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        let request = self.http.post(self.url(path)).json(body);
        request.send().await.expect("POST")
    }

    /// `GET <path>` (the response, whatever its status).
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("GET")
    }

    /// Stream `id` as the hub holds it, found on behalf of the anonymous caller's tenant.
    pub async fn stream(&self, id: &str) -> Arc<StreamState> {
        let tenant = Caller::anonymous();
        let found = self.running.hub.get_for(id, Some(tenant.tenant())).await;
        found.expect("the stream")
    }

    /// Short-poll from `after`.
    pub async fn short_poll(&self, id: &str, after: u64) -> Value {
        short_poll(&self.http, &self.url(""), id, after).await
    }

    /// Short-polls until the stream is no longer running; returns every event.
    pub async fn wait_finished(&self, id: &str) -> Vec<Value> {
        finished(&self.http, &self.url(""), id, Duration::from_secs(20)).await
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
        let url = format!("{base}/v1/streams/{id}/poll?after={after}&timeout_ms=5000");
        let v = get_json(http, &url).await;
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

/// `POST <base>/v1/streams` with `body` and `headers`; asserts 201 and returns the answer.
pub async fn create(
    http: &reqwest::Client,
    base: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> Value {
    let mut request = http.post(format!("{base}/v1/streams")).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let r = request.send().await.expect("POST /v1/streams");
    assert_eq!(r.status(), 201, "create: {:?}", r.text().await);
    r.json().await.expect("json")
}

/// The stream id in an answer of [`create`].
pub fn stream_id(created: &Value) -> String {
    created["id"].as_str().expect("id").to_owned()
}

/// A short-poll of `id` on `base` from `after`.
pub async fn short_poll(http: &reqwest::Client, base: &str, id: &str, after: u64) -> Value {
    get_json(http, &format!("{base}/v1/streams/{id}?after={after}")).await
}

/// Short-polls `id` on `base` until the stream is no longer running there (within `timeout`);
/// returns every event.
pub async fn finished(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    timeout: Duration,
) -> Vec<Value> {
    wait_until(timeout, || async {
        let v = short_poll(http, base, id, 0).await;
        (v["status"] != "running").then(|| v["events"].as_array().cloned().unwrap_or_default())
    })
    .await
}

/// What the mock generator answers to `prompt` with `seed`, cut at `max_tokens`: the text every
/// replica must deliver (the [`slow`] bodies use seed 11).
pub fn expected_text(prompt: &str, seed: u64, max_tokens: usize) -> String {
    let messages = [tokenfan_proto::v1::ChatMessage {
        role: "user".into(),
        content: prompt.into(),
    }];
    tokenfan_generator::corpus::Corpus::get()
        .answer(&messages, seed)
        .into_tokens_from(0)
        .take(max_tokens)
        .map(|t| &*t.text)
        .collect()
}

/// `GET url` and its JSON body (panics when either fails).
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    try_get_json(http, url)
        .await
        .unwrap_or_else(|| panic!("GET {url}: no JSON answer"))
}

/// `GET url` and its JSON body; `None` when the request or the body fails (for polling a
/// replica that may be down or restarting).
pub async fn try_get_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}
