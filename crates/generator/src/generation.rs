//! One generation as a `Stream` of gRPC responses, driven by a single tokio timer.
//!
//! There is no task and no channel per generation: tonic polls this stream directly, so a
//! generation costs one timer and a few words of state, and when the caller goes away tonic
//! drops the stream and generation stops at once (the [`ActiveGuard`] then updates the gauges).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::Stream;
use tokenfan_proto::v1::{
    FinishReason, Finished, GenerateResponse, Token, Usage, generate_response::Event,
};
use tokio::time::{Instant, Sleep};
use tonic::Status;

use crate::{
    corpus::Tokens,
    rng::mix,
    stats::{Outcome, Stats},
};

/// When tokens are due: time to first token, then a steady gap with deterministic jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Delay from the call to the first token sent.
    pub ttft: Duration,
    /// Nominal delay between two tokens.
    pub inter_token: Duration,
    /// Each delay moves by a deterministic amount within ± this.
    pub jitter: Duration,
}

impl Schedule {
    /// Jitter for the token at `index`: a pure function of (seed, index), so a resumed run keeps
    /// the rhythm of the original.
    fn jitter_for(&self, seed: u64, index: u32) -> i64 {
        let span = self.jitter.as_micros() as u64;
        if span == 0 {
            return 0;
        }
        let r = mix(seed ^ u64::from(index).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        (r % (2 * span + 1)) as i64 - span as i64
    }

    fn shifted(base: Duration, jitter_us: i64) -> Duration {
        if jitter_us >= 0 {
            base + Duration::from_micros(jitter_us as u64)
        } else {
            base.saturating_sub(Duration::from_micros(jitter_us.unsigned_abs()))
        }
    }
}

/// An injected fault, counted in tokens sent by this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Fail with `code` after this many tokens.
    pub fail_after: Option<u32>,
    /// Stop sending (but keep the stream open) after this many tokens.
    pub stall_after: Option<u32>,
    /// Status code of the failure.
    pub code: tonic::Code,
}

/// Everything a generation needs, decided by the service when it accepted the request.
#[derive(Debug)]
pub struct Plan {
    /// The answer's tokens from `start_index` on.
    pub tokens: Tokens,
    /// Index of the first token to send.
    pub start_index: u32,
    /// One past the last index to send: `min(answer length, max_tokens)`.
    pub end: u32,
    /// `Length` when `max_tokens` cut the answer, else `Stop`.
    pub finish: FinishReason,
    /// Reported in `Finished`: the whole answer's counts, also under `start_index`.
    pub usage: Usage,
    /// Token timing.
    pub schedule: Schedule,
    /// Seed for the jitter.
    pub seed: u64,
    /// Injected fault, if any.
    pub fault: Option<FaultPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Stalled,
    Done,
}

/// A running generation; see the module docs.
pub struct Generation {
    plan: Plan,
    next_index: u32,
    sent: u32,
    state: State,
    started: Instant,
    deadline: Instant,
    /// The single timer of this generation, re-armed after each token.
    sleep: Pin<Box<Sleep>>,
    /// The request's span (child of the caller's traceparent); ends when the stream drops.
    span: tracing::Span,
    /// Holds this generation in the active gauge until the stream is dropped.
    guard: ActiveGuard,
}

impl Generation {
    /// Starts the clock now. `guard` must already count this generation as active.
    pub fn new(plan: Plan, span: tracing::Span, guard: ActiveGuard) -> Self {
        let started = Instant::now();
        let first_gap = Schedule::shifted(
            plan.schedule.ttft,
            plan.schedule.jitter_for(plan.seed, plan.start_index),
        );
        let deadline = started + first_gap;
        Self {
            next_index: plan.start_index,
            sent: 0,
            state: State::Running,
            started,
            deadline,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            span,
            guard,
            plan,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Done;
        self.guard.outcome = Some(outcome);
        // Integers as i64: OpenTelemetry exports unsigned values as strings.
        self.span.record("tokens", i64::from(self.sent));
        self.span.record("finish_reason", outcome.as_str());
    }

    fn token(&mut self) -> Option<GenerateResponse> {
        let tok = self.plan.tokens.next()?;
        let index = self.next_index;
        self.next_index += 1;
        self.sent += 1;
        if self.sent == 1 {
            let ttft = self.started.elapsed();
            self.span.record("ttft_ms", ttft.as_millis() as i64);
            self.guard.stats.first_token(ttft);
        }
        self.guard.stats.token_sent();
        let gap = Schedule::shifted(
            self.plan.schedule.inter_token,
            self.plan
                .schedule
                .jitter_for(self.plan.seed, self.next_index),
        );
        self.deadline += gap;
        self.sleep.as_mut().reset(self.deadline);
        Some(GenerateResponse {
            event: Some(Event::Token(Token {
                index,
                text: tok.text.to_string(),
                token_id: tok.id,
                emitted_at_unix_nanos: unix_nanos(),
            })),
        })
    }
}

impl Stream for Generation {
    type Item = Result<GenerateResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.state {
                State::Done => return Poll::Ready(None),
                // A stall sends nothing more and never wakes; the caller's drop ends it.
                State::Stalled => return Poll::Pending,
                State::Running => {}
            }
            if let Some(fault) = this.plan.fault {
                if fault.fail_after == Some(this.sent) {
                    this.finish(Outcome::Fault);
                    let message = format!("injected fault after {} tokens", this.sent);
                    return Poll::Ready(Some(Err(Status::new(fault.code, message))));
                }
                if fault.stall_after == Some(this.sent) {
                    this.state = State::Stalled;
                    this.span.record("finish_reason", "stalled");
                    return Poll::Pending;
                }
            }
            if this.next_index >= this.plan.end {
                let reason = this.plan.finish;
                this.finish(match reason {
                    FinishReason::Length => Outcome::Length,
                    _ => Outcome::Stop,
                });
                return Poll::Ready(Some(Ok(GenerateResponse {
                    event: Some(Event::Finished(Finished {
                        reason: reason as i32,
                        usage: Some(this.plan.usage),
                    })),
                })));
            }
            ready!(this.sleep.as_mut().poll(cx));
            // How late this token goes out (one clock read per token; one sample per
            // generation, its worst, when it ends).
            let lag = Instant::now().saturating_duration_since(this.deadline);
            this.guard.worst_lag = Some(this.guard.worst_lag.map_or(lag, |w| w.max(lag)));
            match this.token() {
                Some(response) => return Poll::Ready(Some(Ok(response))),
                // Unreachable while `end` is at most the answer's length; end there if not.
                None => this.plan.end = this.next_index,
            }
        }
    }
}

impl Drop for Generation {
    /// The caller went away (or a stalled call was dropped) before the end: say so on the span.
    fn drop(&mut self) {
        if self.state == State::Running {
            self.span.record("tokens", i64::from(self.sent));
            self.span
                .record("finish_reason", Outcome::Cancelled.as_str());
        }
    }
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Counts one generation as active from creation until drop, then records its outcome.
pub struct ActiveGuard {
    stats: Arc<Stats>,
    outcome: Option<Outcome>,
    /// The largest emit lag so far (`None` before the first token).
    worst_lag: Option<Duration>,
}

impl ActiveGuard {
    /// Takes an active slot, or `None` when `limit` generations already run.
    pub fn acquire(stats: Arc<Stats>, limit: usize) -> Option<Self> {
        stats.try_start(limit).then_some(Self {
            stats,
            outcome: None,
            worst_lag: None,
        })
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(lag) = self.worst_lag {
            self.stats.emit_lag(lag);
        }
        self.stats
            .finished(self.outcome.unwrap_or(Outcome::Cancelled));
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use tokenfan_proto::v1::{ChatMessage, Fault, GenerateRequest, Timing};

    use super::*;
    use crate::{config::Limits, service::GeneratorService};

    fn service() -> (GeneratorService, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        (
            GeneratorService::new(Limits::default(), true, stats.clone()),
            stats,
        )
    }

    fn request(timing: Timing) -> GenerateRequest {
        GenerateRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "timing".into(),
            }],
            max_tokens: 8,
            seed: 1,
            timing: Some(timing),
            ..Default::default()
        }
    }

    fn start(svc: &GeneratorService, stats: &Arc<Stats>, req: &GenerateRequest) -> Generation {
        let plan = svc.plan(req).expect("valid");
        let guard = ActiveGuard::acquire(stats.clone(), 10).expect("slot");
        Generation::new(plan, tracing::Span::none(), guard)
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_follow_ttft_then_the_inter_token_gap() {
        let (svc, stats) = service();
        let t0 = Instant::now();
        let mut generation = start(
            &svc,
            &stats,
            &request(Timing {
                ttft_ms: Some(500),
                inter_token_ms: Some(100),
                jitter_ms: Some(0),
            }),
        );
        let mut offsets = Vec::new();
        while let Some(item) = generation.next().await {
            if let Some(Event::Token(_)) = item.expect("ok").event {
                offsets.push((Instant::now() - t0).as_millis());
            }
        }
        assert_eq!(offsets, [500, 600, 700, 800, 900, 1000, 1100, 1200]);
        assert_eq!(stats.active(), 1, "the stream object still exists");
        drop(generation);
        assert_eq!(stats.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_stays_within_bounds_and_is_deterministic() {
        let (svc, stats) = service();
        let timing = Timing {
            ttft_ms: Some(200),
            inter_token_ms: Some(50),
            jitter_ms: Some(10),
        };
        let mut runs = Vec::new();
        for _ in 0..2 {
            let t0 = Instant::now();
            let mut generation = start(&svc, &stats, &request(timing));
            let mut at = Vec::new();
            while let Some(item) = generation.next().await {
                if let Some(Event::Token(_)) = item.expect("ok").event {
                    at.push((Instant::now() - t0).as_micros());
                }
            }
            runs.push(at);
        }
        assert_eq!(runs[0], runs[1], "the same seed keeps the same rhythm");
        let at = &runs[0];
        assert!((190_000..=210_000).contains(&at[0]), "ttft {}", at[0]);
        for w in at.windows(2) {
            let gap = w[1] - w[0];
            assert!((40_000..=60_000).contains(&gap), "gap {gap}");
        }
        assert!(
            at.windows(2).any(|w| w[1] - w[0] != 50_000),
            "jitter applied"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_never_sends_again() {
        let (svc, stats) = service();
        let mut req = request(Timing {
            ttft_ms: Some(10),
            inter_token_ms: Some(10),
            jitter_ms: Some(0),
        });
        req.fault = Some(Fault {
            stall_after_tokens: Some(2),
            ..Default::default()
        });
        let mut generation = start(&svc, &stats, &req);
        for _ in 0..2 {
            let item = generation.next().await.expect("item").expect("ok");
            assert!(matches!(item.event, Some(Event::Token(_))));
        }
        // An hour of (paused) time passes with nothing sent and the call still open.
        let waited = tokio::time::timeout(Duration::from_secs(3600), generation.next()).await;
        assert!(waited.is_err(), "nothing after the stall");
        assert_eq!(stats.active(), 1);
        drop(generation);
        assert_eq!(stats.active(), 0);
    }
}
