//! The owner of a stream: the one task, on one replica, that runs its generator call(s) and
//! writes its events.
//!
//! It holds the stream's lease in the store (renewed on a tick) so exactly one replica
//! generates; reads the gRPC call in batches; retries on another generator from the next
//! token; and ends with the single terminal event. When it loses the lease (another replica
//! took over) or the replica hands its streams over at shutdown, it stops without a terminal
//! event and the new owner continues.

use std::{sync::Arc, time::Duration};

use futures::FutureExt as _;
use tokenfan_proto::v1::{
    ChatMessage, FinishReason as WireFinish, GenerateRequest, GenerateResponse, Timing,
    generate_response::Event as WireEvent,
};
use tokio::{sync::watch, time::Instant};
use tonic::Streaming;

use crate::{
    event::{Event, EventKind, FinishReason, Usage},
    hub::Hub,
    request::StreamSpec,
    store::{StoreError, StreamMeta},
    stream::StreamState,
    upstream::retryable,
};

/// Most messages taken from the generator call into one batch.
const MAX_BATCH: usize = 128;

/// The owner of one stream: runs its generator call(s) to the terminal event.
pub(crate) struct Owner {
    pub(crate) hub: Arc<Hub>,
    pub(crate) state: Arc<StreamState>,
    pub(crate) spec: StreamSpec,
    /// The stream span (`tokenfan.stream`): one per stream and owner, never one per token.
    pub(crate) span: tracing::Span,
    /// `span` as a W3C traceparent (when traced), sent with every bus batch.
    pub(crate) traceparent: Option<String>,
}

/// How a generator attempt ended.
enum Attempt {
    /// The generator sent `Finished`.
    Finished(FinishReason, Usage),
    /// Cancelled by a client or the detach grace.
    Cancelled,
    /// The call failed; retry from the next token when allowed.
    Failed(tonic::Status),
    /// Another replica holds the lease now, or this one hands its streams over: stop without
    /// a terminal event.
    Released,
}

impl Owner {
    pub(crate) async fn run(self) {
        let hub = &self.hub;
        // The hub recorded the stream, took the lease and marked it owned before spawning this.
        let started = Instant::now();
        let retries = hub.config().streams.generator_retries;
        let grace = hub.config().detach_grace();
        let detached = detached(self.state.attached(), grace);
        tokio::pin!(detached);

        let turn = hub.generators().next_turn();
        let mut attempt = 0u32;
        let terminal = loop {
            let outcome = self
                .attempt(turn + attempt as usize, started, &mut detached)
                .await;
            match outcome {
                Attempt::Finished(reason, usage) => {
                    break EventKind::Done {
                        finish_reason: reason,
                        usage,
                    };
                }
                Attempt::Cancelled => {
                    // The token: a stop request (here or relayed), or the shutdown grace.
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
                Attempt::Released => {
                    tracing::info!("ownership released: another replica continues the stream");
                    self.state.set_owned(false);
                    metrics::gauge!("tokenfan_edge_streams_active").decrement(1.0);
                    if !hub.handover.is_cancelled() {
                        hub.follow(self.state.clone(), self.spec.clone());
                    }
                    return;
                }
                Attempt::Failed(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(),
                        "generator call failed; ending the stream with an error");
                    let (code, message) = if status.code() == tonic::Code::InvalidArgument {
                        ("invalid_request", status.message().to_string())
                    } else {
                        (
                            "generator_unavailable",
                            format!("the generator failed: {}", status.message()),
                        )
                    };
                    break EventKind::Error { code, message };
                }
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
        self.publish(vec![event]).await;
        let status = self.state.status();
        metrics::counter!("tokenfan_edge_streams_total", "outcome" => status.as_str()).increment(1);
        metrics::gauge!("tokenfan_edge_streams_active").decrement(1.0);
        if let Err(err) = hub
            .store
            .expire(&self.state.id, hub.config().history_ttl())
            .await
        {
            tracing::warn!(%err, "store: setting the history TTL failed");
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

    async fn attempt(
        &self,
        turn: usize,
        started: Instant,
        detached: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Attempt {
        let call = self
            .hub
            .generators()
            .generate(self.request(), turn, &self.span);
        let mut call: Streaming<GenerateResponse> = tokio::select! {
            r = call => match r {
                Ok((_, stream)) => stream,
                Err(status) => return Attempt::Failed(status),
            },
            () = self.state.cancel.cancelled() => return Attempt::Cancelled,
            () = detached.as_mut() => return Attempt::Cancelled,
            () = self.hub.handover.cancelled() => return Attempt::Released,
        };
        let config = self.hub.config();
        let idle = Duration::from_secs(config.streams.generator_idle_timeout_secs);
        let lease_every = config.lease_ttl() / 3;
        let mut lease = tokio::time::interval_at(Instant::now() + lease_every, lease_every);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                biased;
                () = self.state.cancel.cancelled() => return Attempt::Cancelled,
                () = detached.as_mut() => {
                    tracing::info!("no subscriber for the detach grace: cancelling");
                    return Attempt::Cancelled;
                }
                () = self.hub.handover.cancelled() => return Attempt::Released,
                _ = lease.tick() => {
                    if !self.renew_lease().await {
                        return Attempt::Released;
                    }
                    continue;
                }
                m = tokio::time::timeout(idle, call.message()) => m,
            };
            let first = match message {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => {
                    return Attempt::Failed(tonic::Status::unavailable(
                        "the generator ended the call without finishing",
                    ));
                }
                Ok(Err(status)) => return Attempt::Failed(status),
                Err(_) => {
                    return Attempt::Failed(tonic::Status::unavailable(format!(
                        "no message from the generator for {idle:?}"
                    )));
                }
            };
            // Take everything else the call already has: one publish per batch.
            let mut batch = Vec::new();
            let mut next = Some(first);
            let mut finished = None;
            let mut failure = None;
            while let Some(m) = next.take() {
                match m.event {
                    Some(WireEvent::Token(t)) => {
                        let seq = u64::from(t.index) + 1;
                        let expected = self.state.last_seq() + batch.len() as u64 + 1;
                        if seq == expected {
                            let emitted_at =
                                self.spec.emit_times.then_some(t.emitted_at_unix_nanos);
                            let kind = EventKind::Token { text: t.text };
                            batch.push(Arc::new(Event::with_emit_time(seq, kind, emitted_at)));
                        } else if seq > expected {
                            failure = Some(tonic::Status::data_loss(format!(
                                "the generator skipped from seq {expected} to {seq}"
                            )));
                            break;
                        }
                    }
                    Some(WireEvent::Finished(f)) => {
                        let usage = f.usage.unwrap_or_default();
                        let reason = match WireFinish::try_from(f.reason) {
                            Ok(WireFinish::Length) => FinishReason::Length,
                            _ => FinishReason::Stop,
                        };
                        finished = Some((
                            reason,
                            Usage {
                                prompt_tokens: usage.prompt_tokens,
                                completion_tokens: usage.completion_tokens,
                            },
                        ));
                        break;
                    }
                    None => {}
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                match call.message().now_or_never() {
                    Some(Ok(Some(m))) => next = Some(m),
                    Some(Ok(None)) | None => {}
                    Some(Err(status)) => {
                        failure = Some(status);
                    }
                }
            }
            if !batch.is_empty() {
                if self.state.last_seq() == 0 {
                    let ttft = started.elapsed();
                    self.span.record("ttft_ms", ttft.as_millis() as i64);
                    metrics::histogram!("tokenfan_edge_time_to_first_token_seconds")
                        .record(ttft.as_secs_f64());
                }
                self.publish(batch).await;
            }
            if let Some((reason, usage)) = finished {
                return Attempt::Finished(reason, usage);
            }
            if let Some(status) = failure {
                return Attempt::Failed(status);
            }
        }
    }

    /// Renews the lease; false when another replica holds it. A store that is down keeps
    /// the current owner going (live streams survive a Redis restart).
    async fn renew_lease(&self) -> bool {
        let store = &self.hub.store;
        match store
            .acquire_lease(
                &self.state.id,
                self.hub.replica(),
                self.hub.config().lease_ttl(),
            )
            .await
        {
            Ok(held) => held,
            Err(err) => {
                tracing::warn!(%err, "store: renewing the lease failed; generating on");
                true
            }
        }
    }

    /// One batch: local subscribers first (lowest latency), then the store, then the bus.
    async fn publish(&self, batch: Vec<Arc<Event>>) {
        self.state.publish(&batch);
        match self.hub.store.append(&self.state.id, &batch).await {
            Ok(()) => {}
            // The store lost the stream (a Redis restart): write it back whole from the
            // events this owner holds, so other replicas can still resume it.
            Err(StoreError::NotFound) => self.restore_store().await,
            // Counted once, by the backend (`tokenfan_edge_backend_errors_total{backend}`).
            Err(err) => tracing::warn!(%err, "store: appending history failed"),
        }
        if let Err(err) = self
            .hub
            .bus
            .publish(&self.state.id, batch.into(), self.traceparent.clone())
            .await
        {
            tracing::warn!(%err, "bus: publishing failed");
        }
    }
}

impl Owner {
    async fn restore_store(&self) {
        let store = &self.hub.store;
        let Ok((_, events)) = self.state.events_after(0) else {
            return;
        };
        let restored = async {
            let meta = StreamMeta::running(&self.spec, self.hub.replica());
            store.create(&self.state.id, meta).await?;
            store.append(&self.state.id, &events).await
        };
        match restored.await {
            Ok(()) => {
                tracing::info!(
                    events = events.len(),
                    "store: history restored after data loss"
                );
                self.renew_lease().await;
            }
            Err(err) => tracing::warn!(%err, "store: restoring history failed"),
        }
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
