//! What every stream of a run shares ([`Ctx`]: the plan, the counters, the HTTP client, the
//! request bodies) and how a stream ended ([`Ended`]): the leaf the transports and the
//! scenarios both build on (scenarios → transports → ctx).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};

use crate::{cli::Plan, stats::Stats, verify::CheckOptions};

/// How one stream ended, for the loop that started it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ended {
    /// The transport worked and the stream reached its terminal event (else the slot pauses
    /// briefly before its next stream, so a dead server is not hammered).
    pub ok: bool,
    /// Every reader got `done` with `stop` or `length`.
    pub completed: bool,
}

/// What every stream of a run shares.
pub struct Ctx {
    pub plan: Plan,
    pub stats: Arc<Stats>,
    pub http: reqwest::Client,
    /// Round-robin position over the targets (streams).
    rr: AtomicUsize,
    /// Round-robin position over the targets (watch viewers).
    pub viewer_rr: AtomicUsize,
    pub stream_timeout: Duration,
}

impl Ctx {
    pub fn new(
        plan: Plan,
        stats: Arc<Stats>,
        http: reqwest::Client,
        stream_timeout: Duration,
    ) -> Self {
        Self {
            plan,
            stats,
            http,
            rr: AtomicUsize::new(0),
            viewer_rr: AtomicUsize::new(0),
            stream_timeout,
        }
    }

    /// The next target, round-robin.
    pub fn next_target(&self) -> &str {
        let i = self.rr.fetch_add(1, Ordering::Relaxed);
        self.target(i)
    }

    pub fn target(&self, i: usize) -> &str {
        &self.plan.targets[i % self.plan.targets.len()]
    }

    /// What the checker of a reader expects (the same on every transport).
    pub fn check_options(&self) -> CheckOptions {
        CheckOptions {
            allow_coalescing: self.plan.load.allow_coalescing,
            require_emit_times: self.plan.emit_times(),
        }
    }

    fn prompt(&self, seed: u64) -> String {
        format!("{} {seed}", self.plan.load.prompt)
    }

    fn timing(&self) -> Value {
        let l = &self.plan.load;
        json!({"ttft_ms": l.ttft_ms, "inter_token_ms": l.inter_token_ms, "jitter_ms": l.jitter_ms})
    }

    /// The body of `POST /v1/streams` and of WebSocket `start`.
    pub fn native_body(&self, seed: u64) -> Value {
        let l = &self.plan.load;
        let mut body = json!({
            "prompt": self.prompt(seed),
            "seed": seed,
            "max_tokens": l.max_tokens,
            "timing": self.timing(),
        });
        if self.plan.emit_times() {
            body["emit_times"] = json!(true);
        }
        if let Some(m) = &l.model {
            body["model"] = json!(m);
        }
        body
    }

    /// The body of `POST /v1/chat/completions`.
    /// With emit times, the tokenfan extension `"emit_times": true` (token chunks then carry
    /// `emitted_at_unix_nanos`; OpenAI servers ignore the field).
    pub fn chat_body(&self, seed: u64) -> Value {
        let l = &self.plan.load;
        let mut body = json!({
            "model": l.model.as_deref().unwrap_or("tokenfan-mock"),
            "messages": [{"role": "user", "content": self.prompt(seed)}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": l.max_tokens,
            "seed": seed,
            "timing": self.timing(),
        });
        if self.plan.emit_times() {
            body["emit_times"] = json!(true);
        }
        body
    }
}

/// SplitMix64 finaliser: distinct, well-spread seeds per (slot, stream).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
