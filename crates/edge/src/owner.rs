//! The owner of a stream: the one task, on one replica, that runs its generator call(s) and
//! writes its events.
//!
//! It holds the stream's lease in the store at an **epoch** (see [`crate::store`]): every
//! batch is written to the store under that epoch *before* anyone sees it (local subscribers,
//! then the bus), so an event that reached a client is always part of the stored history, and
//! an owner that was paused or cut off cannot show one event once another replica claimed the
//! stream. It reads the gRPC call in batches; retries on another generator from the next
//! token when a call fails or stalls; and ends with the single terminal event. When it loses
//! the lease, cannot prove it for a lease TTL, or the replica hands its streams over at
//! shutdown, it stops without a terminal event and the next owner continues.

use std::{sync::Arc, time::Duration};

use futures::{FutureExt as _, StreamExt as _};
use tokenfan_proto::v1::{
    ChatMessage, FinishReason as WireFinish, GenerateRequest, GenerateResponse, Timing,
    generate_response::Event as WireEvent,
};
use tokio::{sync::watch, time::Instant};

use crate::{
    context::Context,
    event::{Event, EventKind, FinishReason, Usage},
    request::StreamSpec,
    store::StoreError,
    stream::{Quiet, StreamState},
    upstream::{Generation, retryable},
};

/// Most messages taken from the generator call into one batch.
const MAX_BATCH: usize = 128;

/// Most repairs (history written back, stream recorded again) one write may need.
const MAX_REPAIRS: u32 = 3;

/// Longest pause between two tries of a store write that failed.
const MAX_WRITE_BACKOFF: Duration = Duration::from_millis(250);

/// The owner of one stream: runs its generator call(s) to the terminal event.
pub(crate) struct Owner {
    pub(crate) ctx: Arc<Context>,
    pub(crate) state: Arc<StreamState>,
    pub(crate) spec: StreamSpec,
    /// The stream span (`tokenfan.stream`): one per stream and owner, never one per token.
    pub(crate) span: tracing::Span,
    /// `span` as a W3C traceparent (when traced), sent with every bus batch.
    pub(crate) traceparent: Option<String>,
    /// The ownership epoch every store write of this owner is fenced with.
    pub(crate) epoch: u64,
    /// When the store last confirmed this owner's epoch (the time the confirming call was
    /// sent). Past a lease TTL without confirmation another replica may own the stream, so
    /// this one stops publishing.
    pub(crate) proven: Instant,
}

/// How a generator attempt ended.
enum Attempt {
    /// The generator sent `Finished`.
    Finished(EventKind),
    /// Cancelled by a client or the detach grace.
    Cancelled,
    /// The call failed or stalled; retry from the next token when allowed.
    Failed(tonic::Status),
    /// Ownership is gone: another replica claimed the stream, the store could not confirm the
    /// lease for a lease TTL, or this replica hands its streams over. Stop without a terminal
    /// event.
    Released(Release),
}

/// Why an owner stops without a terminal event.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Release {
    /// Another replica claimed the stream (a higher epoch).
    Fenced,
    /// The store did not confirm the lease for a lease TTL.
    Unproven,
    /// This replica is shutting down.
    Handover,
}

/// What the hub does once an owner stops.
pub(crate) enum Next {
    /// Nothing: the stream ended here, or the replica is shutting down.
    Done,
    /// Follow the stream like any other replica's (ownership was released while this replica
    /// keeps serving; it may claim the stream again later).
    Follow(Arc<StreamState>, StreamSpec),
}

impl Owner {
    pub(crate) async fn run(mut self) -> Next {
        let ctx = self.ctx.clone();
        // The hub recorded the stream, took the lease and marked it owned before spawning this.
        let started = Instant::now();
        let retries = ctx.config.streams.generator_retries;
        let grace = ctx.config.detach_grace();
        let detached = Quiet::new(detached(self.state.attached(), grace));
        tokio::pin!(detached);

        let turn = ctx.generators.next_turn();
        let mut attempt = 0u32;
        let terminal = loop {
            let outcome = if self.state.cancel.is_cancelled() {
                // A stop recorded before this owner started (a takeover of a stopped stream).
                Attempt::Cancelled
            } else {
                self.attempt(turn + attempt as usize, started, &mut detached)
                    .await
            };
            match outcome {
                Attempt::Finished(kind) => break kind,
                Attempt::Cancelled => {
                    // The token: a stop request (here, relayed or recorded), or the shutdown
                    // grace.
                    let cause = if self.state.cancel.is_cancelled() {
                        "stop"
                    } else {
                        "detached"
                    };
                    self.span.record("cancel_cause", cause);
                    break EventKind::Done {
                        finish_reason: FinishReason::Cancelled,
                        usage: self.usage_so_far(),
                    };
                }
                Attempt::Failed(status) if retryable(&status) && attempt < retries => {
                    attempt += 1;
                    tracing::warn!(code = ?status.code(), message = status.message(), attempt,
                        "generator call failed; resuming on the next generator");
                    metrics::counter!("tokenfan_edge_generator_retries_total").increment(1);
                    let backoff = Duration::from_millis(50 * u64::from(attempt));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.state.cancel.cancelled() => {}
                    }
                }
                Attempt::Failed(status) => break failed(&status),
                Attempt::Released(why) => return self.release(why),
            }
        };
        let seq = self.state.last_seq() + 1;
        let event = Arc::new(Event::new(seq, terminal));
        // Integers as i64: OpenTelemetry exports unsigned values as strings.
        self.span.record("attempts", i64::from(attempt) + 1);
        self.span.record("tokens", (seq - 1) as i64);
        self.span.record(
            "finish_reason",
            match &event.kind {
                EventKind::Done { finish_reason, .. } => finish_reason.as_str(),
                _ => "error",
            },
        );
        if let Err(why) = self.write(vec![event]).await {
            return self.release(why);
        }
        let status = self.state.status();
        metrics::counter!("tokenfan_edge_streams_total", "outcome" => status.as_str()).increment(1);
        metrics::gauge!("tokenfan_edge_streams_active").decrement(1.0);
        if let Err(err) = ctx
            .store
            .expire(&self.state.id, ctx.config.history_ttl())
            .await
        {
            tracing::warn!(%err, "store: setting the history TTL failed");
        }
        Next::Done
    }

    /// Stops owning the stream without a terminal event; unless the replica is shutting down,
    /// it goes on following it like any other replica (and may claim it again later).
    fn release(self, why: Release) -> Next {
        tracing::info!(?why, epoch = self.epoch, "ownership released");
        self.span
            .record("released", format!("{why:?}").to_lowercase());
        self.state.set_owned(false);
        metrics::gauge!("tokenfan_edge_streams_active").decrement(1.0);
        metrics::counter!("tokenfan_edge_owner_releases_total",
        "reason" => match why {
            Release::Fenced => "fenced",
            Release::Unproven => "unproven",
            Release::Handover => "handover",
        })
        .increment(1);
        if self.ctx.lifecycle.handover.is_cancelled() {
            Next::Done
        } else {
            Next::Follow(self.state, self.spec)
        }
    }

    fn usage_so_far(&self) -> Usage {
        Usage {
            prompt_tokens: 0,
            completion_tokens: u32::try_from(self.state.last_seq()).unwrap_or(u32::MAX),
        }
    }

    fn request(&self) -> GenerateRequest {
        GenerateRequest {
            request_id: self.state.id.to_string(),
            messages: self
                .spec
                .messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect(),
            max_tokens: self.spec.max_tokens,
            seed: self.spec.seed,
            // Token seq = index + 1: resume right after the last recorded token.
            start_index: u32::try_from(self.state.last_seq()).unwrap_or(u32::MAX),
            timing: Some(Timing {
                ttft_ms: self.spec.timing.ttft_ms,
                inter_token_ms: self.spec.timing.inter_token_ms,
                jitter_ms: self.spec.timing.jitter_ms,
            }),
            fault: None,
            model: self.spec.model.to_string(),
        }
    }

    /// One generator call, read to its end. The idle timeout counts from the last message of
    /// the call (or from its start), whatever else wakes the loop.
    async fn attempt(
        &mut self,
        turn: usize,
        started: Instant,
        detached: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Attempt {
        let ctx = self.ctx.clone();
        let config = &ctx.config;
        let idle = Duration::from_secs(config.streams.generator_idle_timeout_secs);
        let stall = tokio::time::sleep(idle);
        tokio::pin!(stall);
        let stalled = || {
            tracing::warn!(?idle, "the generator sent nothing for the idle timeout");
            Attempt::Failed(tonic::Status::unavailable(format!(
                "no message from the generator for {idle:?}"
            )))
        };
        // Registered once for the whole call and polled again only when they wake the task,
        // not on every batch.
        let mut cancelled = Quiet::new(self.state.cancel.clone().cancelled_owned());
        let mut handover = Quiet::new(ctx.lifecycle.handover.clone().cancelled_owned());
        let call = ctx.generators.generate(self.request(), turn, &self.span);
        let mut call: Generation = tokio::select! {
            r = call => match r {
                Ok(stream) => stream,
                Err(status) => return Attempt::Failed(status),
            },
            () = &mut cancelled => return Attempt::Cancelled,
            () = detached.as_mut() => return Attempt::Cancelled,
            () = &mut handover => return Attempt::Released(Release::Handover),
            () = &mut stall => return stalled(),
        };
        let lease_every = config.lease_ttl() / 3;
        let mut lease = tokio::time::interval_at(Instant::now() + lease_every, lease_every);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                () = &mut cancelled => return Attempt::Cancelled,
                () = detached.as_mut() => {
                    tracing::info!("no subscriber for the detach grace: cancelling");
                    return Attempt::Cancelled;
                }
                () = &mut handover => return Attempt::Released(Release::Handover),
                _ = lease.tick() => {
                    if let Err(why) = self.renew().await {
                        return Attempt::Released(why);
                    }
                    continue;
                }
                // Before the stall timer: a message that is already there is no stall.
                m = call.next() => match m {
                    Some(Ok(m)) => m,
                    None => {
                        return Attempt::Failed(tonic::Status::unavailable(
                            "the generator ended the call without finishing",
                        ));
                    }
                    Some(Err(status)) => return Attempt::Failed(status),
                },
                () = &mut stall => return stalled(),
            };
            stall.as_mut().reset(Instant::now() + idle);
            let (batch, end) = self.take_batch(first, &mut call);
            if let Some(first) = batch.first() {
                if first.seq == 1 {
                    let ttft = started.elapsed();
                    self.span.record("ttft_ms", ttft.as_millis() as i64);
                    metrics::histogram!("tokenfan_edge_time_to_first_token_seconds")
                        .record(ttft.as_secs_f64());
                }
                if let Err(why) = self.write(batch).await {
                    return Attempt::Released(why);
                }
            }
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// `first` and everything else the call already has, numbered (`seq = index + 1`) after
    /// the last recorded event: one write per batch. Also returns how the call ended, if it
    /// did within the batch.
    fn take_batch(
        &self,
        first: GenerateResponse,
        call: &mut Generation,
    ) -> (Vec<Arc<Event>>, Option<Attempt>) {
        let mut batch = Vec::new();
        let mut next = Some(first);
        let mut end = None;
        // Only this task appends to the stream while it owns it.
        let recorded = self.state.last_seq();
        while let Some(m) = next.take() {
            match m.event {
                Some(WireEvent::Token(t)) => {
                    let seq = u64::from(t.index) + 1;
                    let expected = recorded + batch.len() as u64 + 1;
                    if seq == expected {
                        let emitted_at = self.spec.emit_times.then_some(t.emitted_at_unix_nanos);
                        let kind = EventKind::Token { text: t.text };
                        batch.push(Arc::new(Event::with_emit_time(seq, kind, emitted_at)));
                    } else if seq > expected {
                        end = Some(Attempt::Failed(tonic::Status::data_loss(format!(
                            "the generator skipped from seq {expected} to {seq}"
                        ))));
                        break;
                    }
                }
                Some(WireEvent::Finished(f)) => {
                    end = Some(Attempt::Finished(finished(
                        f.reason,
                        f.usage.unwrap_or_default(),
                    )));
                    break;
                }
                None => {}
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            match call.next().now_or_never() {
                Some(Some(Ok(m))) => next = Some(m),
                Some(None) | None => {}
                Some(Some(Err(status))) => end = Some(Attempt::Failed(status)),
            }
        }
        (batch, end)
    }

    /// Renews the lease (and learns of a recorded stop). A store that fails keeps the owner
    /// going until the lease could have lapsed; past that, ownership is released.
    async fn renew(&mut self) -> Result<(), Release> {
        let ctx = self.ctx.clone();
        let sent = Instant::now();
        let renewed = ctx
            .store
            .renew(&self.state.id, &ctx.replica, self.epoch, ctx.lease_terms())
            .await;
        match renewed {
            Ok(stop) => {
                self.proven = sent;
                if stop {
                    self.state.cancel.cancel();
                }
                Ok(())
            }
            Err(StoreError::Fenced) => Err(Release::Fenced),
            Err(StoreError::NotFound) if self.restore().await => Ok(()),
            Err(err) => {
                tracing::warn!(%err, "store: renewing the lease failed");
                self.check_proven()
            }
        }
    }

    fn check_proven(&self) -> Result<(), Release> {
        if self.proven.elapsed() >= self.ctx.config.lease_ttl() {
            Err(Release::Unproven)
        } else {
            Ok(())
        }
    }

    /// Writes a batch: to the store first, under this owner's epoch; once stored, to the
    /// local subscribers and the bus. A store that lost events (a restart that restored an
    /// older snapshot, a list evicted) gets them again from this owner's history; one that
    /// lost the stream gets it whole; one that fails is retried until it answers or the
    /// lease could have lapsed.
    async fn write(&mut self, batch: Vec<Arc<Event>>) -> Result<(), Release> {
        let ctx = self.ctx.clone();
        let Some(last) = batch.last().map(|e| e.seq) else {
            return Ok(());
        };
        // What to send: the batch, or (after the store lost events) the history it lacks too.
        let mut resend: Option<Vec<Arc<Event>>> = None;
        let mut backoff = Duration::from_millis(10);
        // Write-backs of a short history, and re-recordings of a forgotten stream: each should
        // succeed at once; a store that keeps refusing them is not one this owner can trust.
        let mut repairs = 0u32;
        loop {
            if repairs > MAX_REPAIRS {
                tracing::error!(
                    repairs,
                    "store: repairs did not take; handing the stream over"
                );
                return Err(Release::Unproven);
            }
            let sent = Instant::now();
            let send = resend.as_deref().unwrap_or(&batch);
            match ctx.store.append(&self.state.id, self.epoch, send).await {
                Ok(stored) if stored.len >= last => {
                    self.proven = sent;
                    if stored.stop_requested {
                        self.state.cancel.cancel();
                    }
                    break;
                }
                Ok(stored) if stored.len < self.state.last_seq() => {
                    // The store is behind what subscribers already have: heal it from here.
                    self.proven = sent;
                    tracing::warn!(
                        stored = stored.len,
                        have = self.state.last_seq(),
                        "store: history shorter than delivered; writing it again"
                    );
                    metrics::counter!("tokenfan_edge_store_heals_total").increment(1);
                    repairs += 1;
                    let mut history = self.history_after(stored.len);
                    history.extend(batch.iter().cloned());
                    resend = Some(history);
                    continue;
                }
                Ok(stored) => {
                    // Not stored although nothing is missing before it: the store recorded an
                    // end this owner did not write. Never show a second ending.
                    tracing::error!(
                        stored = stored.len,
                        last,
                        "store: a batch was refused after a recorded end"
                    );
                    return Err(Release::Fenced);
                }
                Err(StoreError::Fenced) => return Err(Release::Fenced),
                Err(StoreError::NotFound) => {
                    repairs += 1;
                    if !self.restore().await {
                        self.check_proven()?;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_WRITE_BACKOFF);
                    }
                    let mut history = self.history_after(0);
                    history.extend(batch.iter().cloned());
                    resend = Some(history);
                }
                Err(err) => {
                    tracing::warn!(%err, "store: appending history failed; retrying");
                    self.check_proven()?;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_WRITE_BACKOFF);
                }
            }
        }
        self.state.publish(&batch);
        if let Err(err) = ctx
            .bus
            .publish(&self.state.id, batch.into(), self.traceparent.clone())
            .await
        {
            tracing::warn!(%err, "bus: publishing failed");
        }
        Ok(())
    }

    /// The events this replica delivered after `after`.
    fn history_after(&self, after: u64) -> Vec<Arc<Event>> {
        self.state
            .events_after(after)
            .map(|(_, events)| events)
            .unwrap_or_default()
    }

    /// The store forgot the stream (a Redis restart without persistence): record it again at
    /// this owner's epoch; the caller then writes the history. False when the store failed.
    async fn restore(&mut self) -> bool {
        match self.ctx.restore(&self.state, &self.spec, self.epoch).await {
            Ok(_) => {
                tracing::info!("store: stream recorded again after data loss");
                true
            }
            Err(err) => {
                tracing::warn!(%err, "store: recording the stream again failed");
                false
            }
        }
    }
}

/// The terminal event for a generator's `Finished`.
fn finished(reason: i32, usage: tokenfan_proto::v1::Usage) -> EventKind {
    let usage = Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    };
    let finish_reason = match WireFinish::try_from(reason) {
        Ok(WireFinish::Length) => FinishReason::Length,
        Ok(WireFinish::Cancelled) => FinishReason::Cancelled,
        Ok(WireFinish::Error) => {
            return EventKind::Error {
                code: "generator_unavailable",
                message: "the generator could not finish the answer".to_owned(),
            };
        }
        Ok(WireFinish::Stop | WireFinish::Unspecified) | Err(_) => FinishReason::Stop,
    };
    EventKind::Done {
        finish_reason,
        usage,
    }
}

/// Completes once nobody has been attached (nor touched the stream) for `grace`.
async fn detached(mut attached: watch::Receiver<usize>, grace: Duration) {
    loop {
        if *attached.borrow_and_update() > 0 {
            if attached.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        }
        tokio::select! {
            changed = attached.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
            () = tokio::time::sleep(grace) => return,
        }
    }
}

/// The terminal event of a stream whose generator call failed for good; the generator's own
/// words stay in the logs and the trace.
fn failed(status: &tonic::Status) -> EventKind {
    tracing::warn!(code = ?status.code(), message = status.message(),
        "generator call failed; ending the stream with an error");
    let (code, message) = if status.code() == tonic::Code::InvalidArgument {
        ("invalid_request", "the generator refused the request")
    } else {
        (
            "generator_unavailable",
            "no generator could finish the answer",
        )
    };
    EventKind::Error {
        code,
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokenfan_proto::v1::Token;

    use super::*;
    use crate::{
        bus::memory::MemoryBus,
        config::EdgeConfig,
        hub::Hub,
        request::StreamRequest,
        store::memory::MemoryStore,
        upstream::{Generation, Generators},
    };

    /// A generator that sends `tokens` tokens (from the requested index on), then nothing:
    /// a stall with the call left open.
    struct Stalling {
        tokens: u32,
        calls: Mutex<Vec<u32>>,
    }

    #[async_trait::async_trait]
    impl Generators for Stalling {
        fn next_turn(&self) -> usize {
            0
        }

        async fn generate(
            &self,
            req: GenerateRequest,
            _turn: usize,
            _span: &tracing::Span,
        ) -> Result<Generation, tonic::Status> {
            self.calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(req.start_index);
            let tokens = (req.start_index..self.tokens).map(|index| {
                Ok(GenerateResponse {
                    event: Some(WireEvent::Token(Token {
                        index,
                        text: format!("t{index} "),
                        token_id: index,
                        emitted_at_unix_nanos: 0,
                    })),
                })
            });
            Ok(Box::pin(
                futures::stream::iter(tokens.collect::<Vec<_>>()).chain(futures::stream::pending()),
            ))
        }

        fn count(&self) -> usize {
            1
        }

        async fn serving(&self) -> usize {
            1
        }
    }

    /// The idle timeout counts from the last message even though the lease is renewed (and
    /// the loop woken) far more often than that; the stall is retried from the next token,
    /// then the stream ends with an error.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_generator_is_retried_then_given_up_despite_lease_ticks() {
        let mut config = EdgeConfig::defaults();
        config.streams.lease_ttl_ms = 300;
        config.streams.generator_idle_timeout_secs = 2;
        config.streams.generator_retries = 1;
        let config = Arc::new(config);
        let generator = Arc::new(Stalling {
            tokens: 3,
            calls: Mutex::default(),
        });
        let hub = Hub::new(
            config.clone(),
            "edge-a".into(),
            generator.clone(),
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryBus::default()),
            false,
            &crate::Lifecycle::default(),
        );
        let spec = StreamRequest {
            prompt: Some("p".into()),
            max_tokens: Some(10),
            seed: Some(1),
            ..StreamRequest::default()
        }
        .validate(&config.streams)
        .expect("valid");
        let state = hub
            .create(spec, &tracing::Span::none(), "test")
            .await
            .expect("created");
        let mut sub = state.subscribe(0).expect("subscribe");
        let mut events = Vec::new();
        while let Ok(batch) = sub.next_batch().await {
            events.extend(batch);
        }
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4], "3 tokens once, then the terminal event");
        assert!(
            matches!(
                &events[3].kind,
                EventKind::Error {
                    code: "generator_unavailable",
                    ..
                }
            ),
            "{:?}",
            events[3].kind
        );
        assert_eq!(
            *generator.calls.lock().unwrap_or_else(|e| e.into_inner()),
            [0, 3],
            "the retry resumed at the next token"
        );
    }

    #[test]
    fn every_finish_reason_maps_to_its_terminal_event() {
        let usage = tokenfan_proto::v1::Usage {
            prompt_tokens: 3,
            completion_tokens: 5,
        };
        let reason = |r: WireFinish| match finished(r as i32, usage) {
            EventKind::Done { finish_reason, .. } => finish_reason.as_str(),
            EventKind::Error { code, .. } => code,
            EventKind::Token { .. } => "token",
        };
        assert_eq!(reason(WireFinish::Stop), "stop");
        assert_eq!(reason(WireFinish::Length), "length");
        assert_eq!(reason(WireFinish::Cancelled), "cancelled");
        assert_eq!(reason(WireFinish::Error), "generator_unavailable");
    }
}
