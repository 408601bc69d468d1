//! Per-server counters, mirrored into the process's Prometheus metrics.
//!
//! The atomics make one server's numbers observable in-process (tests embed several servers in
//! one process, where the global metrics are shared); the `metrics` handles feed `/metrics`.
//! `docs/operations.md` (section Metrics) documents every series.

use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use metrics::{
    Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram,
};

/// Counters of one generator server.
pub struct Stats {
    active: AtomicUsize,
    tokens: AtomicU64,
    active_gauge: Gauge,
    tokens_counter: Counter,
    outcomes: [Counter; 4],
    rejected: Counter,
    ttft: Histogram,
    emit_lag: Histogram,
}

/// Describes the generator's metrics (HELP lines on `/metrics`).
fn describe() {
    describe_gauge!(
        "tokenfan_generator_active_generations",
        "Generations running now (calls whose caller is still attached)."
    );
    describe_counter!("tokenfan_generator_tokens_total", "Tokens sent.");
    describe_counter!(
        "tokenfan_generator_generations_total",
        "Generations ended, by outcome (stop, length, fault, cancelled)."
    );
    describe_counter!(
        "tokenfan_generator_rejected_total",
        "Calls refused (invalid request, or --max-generations reached)."
    );
    describe_histogram!(
        "tokenfan_generator_time_to_first_token_seconds",
        Unit::Seconds,
        "From accepting a call to sending its first token."
    );
    describe_histogram!(
        "tokenfan_generator_emit_lag_seconds",
        Unit::Seconds,
        "Per generation, the largest delay between a token's scheduled time and its sending."
    );
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("active", &self.active())
            .field("tokens", &self.tokens())
            .finish()
    }
}

impl Default for Stats {
    fn default() -> Self {
        describe();
        let outcome = |o: Outcome| metrics::counter!("tokenfan_generator_generations_total", "outcome" => o.as_str());
        Self {
            active: AtomicUsize::new(0),
            tokens: AtomicU64::new(0),
            active_gauge: metrics::gauge!("tokenfan_generator_active_generations"),
            tokens_counter: metrics::counter!("tokenfan_generator_tokens_total"),
            outcomes: [
                outcome(Outcome::Stop),
                outcome(Outcome::Length),
                outcome(Outcome::Fault),
                outcome(Outcome::Cancelled),
            ],
            rejected: metrics::counter!("tokenfan_generator_rejected_total"),
            ttft: metrics::histogram!("tokenfan_generator_time_to_first_token_seconds"),
            emit_lag: metrics::histogram!("tokenfan_generator_emit_lag_seconds"),
        }
    }
}

impl Stats {
    /// Generations running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Tokens sent since start.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    pub(crate) fn try_start(&self, limit: usize) -> bool {
        let ok = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if ok {
            self.active_gauge.increment(1.0);
        }
        ok
    }

    pub(crate) fn first_token(&self, after: Duration) {
        self.ttft.record(after.as_secs_f64());
    }

    pub(crate) fn emit_lag(&self, worst: Duration) {
        self.emit_lag.record(worst.as_secs_f64());
    }

    pub(crate) fn finished(&self, outcome: Outcome) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.active_gauge.decrement(1.0);
        let i = match outcome {
            Outcome::Stop => 0,
            Outcome::Length => 1,
            Outcome::Fault => 2,
            Outcome::Cancelled => 3,
        };
        self.outcomes[i].increment(1);
    }

    pub(crate) fn token_sent(&self) {
        self.tokens.fetch_add(1, Ordering::Relaxed);
        self.tokens_counter.increment(1);
    }

    pub(crate) fn rejected(&self) {
        self.rejected.increment(1);
    }
}

/// How a generation ended, as counted in `tokenfan_generator_generations_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The answer ended naturally.
    Stop,
    /// `max_tokens` cut the answer.
    Length,
    /// An injected fault failed the call.
    Fault,
    /// The caller went away (or a stalled call was dropped).
    Cancelled,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Fault => "fault",
            Outcome::Cancelled => "cancelled",
        }
    }
}
