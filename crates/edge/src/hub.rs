//! The stream hub: creates streams, owns their generator calls, and hands out subscriptions.
//!
//! Transports never see the generator, the bus or the store: they ask the hub for a
//! [`StreamState`] and subscribe to it. The owner task of a stream (one per stream, on the
//! replica that created it) reads the gRPC call, turns messages into seq-numbered events in
//! batches (everything the call has ready), and publishes each batch once: to the local
//! subscribers, to the store, and to the bus.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::FutureExt as _;
use tokenfan_proto::v1::{
    ChatMessage, FinishReason as WireFinish, GenerateRequest, GenerateResponse, Timing,
    generate_response::Event as WireEvent,
};
use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::Streaming;
use tracing::Instrument as _;

use crate::{
    bus::Bus,
    config::EdgeConfig,
    error::ApiError,
    event::{Event, EventKind, FinishReason, Usage},
    ids::StreamId,
    request::StreamSpec,
    store::{Store, StreamMeta},
    stream::{StreamState, StreamStatus, SubscriberLimits},
    upstream::{GeneratorPool, retryable},
};

/// Most messages taken from the generator call into one batch.
const MAX_BATCH: usize = 128;

/// How often finished streams past their history TTL are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The hub; shared by every transport through `Arc<Hub>`.
pub struct Hub {
    config: Arc<EdgeConfig>,
    replica: String,
    generators: GeneratorPool,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    streams: Mutex<HashMap<StreamId, Arc<StreamState>>>,
    /// Streams whose history expired, and until when they are remembered (answered with 410
    /// `history_expired` rather than 404). Bounded by `max_streams`.
    expired: Mutex<HashMap<StreamId, std::time::Instant>>,
    /// Owner tasks; awaited on shutdown.
    tasks: TaskTracker,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("replica", &self.replica)
            .finish()
    }
}

impl Hub {
    /// A hub over these backends.
    pub fn new(
        config: Arc<EdgeConfig>,
        replica: String,
        generators: GeneratorPool,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            replica,
            generators,
            store,
            bus,
            streams: Mutex::new(HashMap::new()),
            expired: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EdgeConfig {
        &self.config
    }

    /// The generators.
    pub fn generators(&self) -> &GeneratorPool {
        &self.generators
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, Arc<StreamState>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams this replica holds (running or within their history TTL).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether the hub holds no stream.
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Starts a stream: registers it and spawns its owner task. `parent` is the request's
    /// span (which continues the caller's traceparent).
    pub fn create(
        self: &Arc<Self>,
        spec: StreamSpec,
        parent: &tracing::Span,
    ) -> Result<Arc<StreamState>, ApiError> {
        let id = StreamId::random();
        let limits = SubscriberLimits {
            queue: self.config.streams.subscriber_queue,
            max_bytes: self.config.streams.subscriber_max_bytes,
        };
        let max_seq = u64::from(spec.max_tokens) + 1;
        let state = Arc::new(StreamState::new(id.clone(), spec.model, limits, max_seq));
        {
            let mut map = self.map();
            if map.len() >= self.config.streams.max_streams {
                return Err(ApiError::capacity(format!(
                    "this replica already holds {} streams",
                    map.len()
                )));
            }
            map.insert(id.clone(), state.clone());
        }
        metrics::gauge!("tokenfan_edge_streams_active").increment(1.0);
        let span = tracing::info_span!(
            parent: parent,
            "stream",
            otel.name = "tokenfan.stream",
            stream_id = %id,
            model = spec.model,
            replica = %self.replica,
            tokens = tracing::field::Empty,
            ttft_ms = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
            attempts = tracing::field::Empty,
        );
        let owner = Owner {
            hub: self.clone(),
            state: state.clone(),
            spec,
            span: span.clone(),
        };
        self.tasks.spawn(owner.run().instrument(span));
        Ok(state)
    }

    /// The stream with this client-supplied id; malformed and unknown ids are both 404, a
    /// stream whose history expired recently is 410.
    pub fn get(&self, id: &str) -> Result<Arc<StreamState>, ApiError> {
        let id = StreamId::parse(id).ok_or_else(ApiError::stream_not_found)?;
        if let Some(state) = self.map().get(&id) {
            return Ok(state.clone());
        }
        let expired = self.expired.lock().unwrap_or_else(|e| e.into_inner());
        if expired.contains_key(&id) {
            return Err(ApiError::history_expired(0));
        }
        Err(ApiError::stream_not_found())
    }

    /// Stops a stream now and returns its final status (waits briefly for the owner to write
    /// the terminal event).
    pub async fn cancel(&self, state: &Arc<StreamState>) -> StreamStatus {
        state.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), state.wait_finished()).await;
        state.status()
    }

    /// Forgets finished streams past their history TTL, every few seconds, until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let ttl = self.config.history_ttl();
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let now = std::time::Instant::now();
            let mut gone = Vec::new();
            self.map().retain(|id, s| {
                let keep = s.ended_at().is_none_or(|t| now.duration_since(t) < ttl);
                if !keep {
                    gone.push(id.clone());
                }
                keep
            });
            let mut expired = self.expired.lock().unwrap_or_else(|e| e.into_inner());
            expired.retain(|_, until| *until > now);
            let room = self
                .config
                .streams
                .max_streams
                .saturating_sub(expired.len());
            expired.extend(gone.into_iter().take(room).map(|id| (id, now + ttl)));
        }
    }

    /// Cancels local streams that another replica asked to stop (over the bus), until
    /// `shutdown`.
    pub async fn serve_cancel_requests(self: Arc<Self>, shutdown: CancellationToken) {
        let mut requests = match self.bus.cancel_requests().await {
            Ok(rx) => rx,
            Err(err) => {
                tracing::error!(%err, "bus: cannot receive cancel requests");
                return;
            }
        };
        loop {
            let id = tokio::select! {
                id = requests.recv() => match id { Some(id) => id, None => return },
                () = shutdown.cancelled() => return,
            };
            if let Some(state) = self.map().get(&id) {
                state.cancel.cancel();
            }
        }
    }

    /// Shutdown: lets running streams finish for up to `grace`, then cancels the rest and
    /// waits for their owners to write the terminal events.
    pub async fn drain(&self, grace: Duration) {
        let running: Vec<Arc<StreamState>> = self
            .map()
            .values()
            .filter(|s| s.status() == StreamStatus::Running)
            .cloned()
            .collect();
        let all = futures::future::join_all(running.iter().map(|s| s.wait_finished()));
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("shutdown grace elapsed: cancelling the remaining streams");
            for s in &running {
                s.cancel.cancel();
            }
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

/// The owner of one stream: runs its generator call(s) to the terminal event.
struct Owner {
    hub: Arc<Hub>,
    state: Arc<StreamState>,
    spec: StreamSpec,
    span: tracing::Span,
}

/// How a generator attempt ended.
enum Attempt {
    /// The generator sent `Finished`.
    Finished(FinishReason, Usage),
    /// Cancelled by a client or the detach grace.
    Cancelled,
    /// The call failed; retry from the next token when allowed.
    Failed(tonic::Status),
}

impl Owner {
    async fn run(self) {
        let hub = &self.hub;
        let meta = StreamMeta {
            model: self.spec.model,
            owner: hub.replica.clone(),
            status: StreamStatus::Running,
            spec_json: self.spec.to_json(),
        };
        if let Err(err) = hub.store.create(&self.state.id, meta).await {
            tracing::warn!(%err, "store: recording the stream failed");
        }
        let started = Instant::now();
        let retries = hub.config.streams.generator_retries;
        let grace = hub.config.detach_grace();
        let detached = detached(self.state.attached(), grace);
        tokio::pin!(detached);

        let mut attempt = 0u32;
        let terminal = loop {
            let outcome = self.attempt(attempt, started, &mut detached).await;
            match outcome {
                Attempt::Finished(reason, usage) => {
                    break EventKind::Done {
                        finish_reason: reason,
                        usage,
                    };
                }
                Attempt::Cancelled => {
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
        self.span.record("attempts", attempt + 1);
        self.span.record("tokens", seq - 1);
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
            .expire(&self.state.id, hub.config.history_ttl())
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
        attempt: u32,
        started: Instant,
        detached: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Attempt {
        let call = self
            .hub
            .generators
            .generate(self.request(), attempt, &self.span);
        let mut call: Streaming<GenerateResponse> = tokio::select! {
            r = call => match r {
                Ok((_, stream)) => stream,
                Err(status) => return Attempt::Failed(status),
            },
            () = self.state.cancel.cancelled() => return Attempt::Cancelled,
            () = detached.as_mut() => return Attempt::Cancelled,
        };
        let idle = Duration::from_secs(self.hub.config.streams.generator_idle_timeout_secs);
        loop {
            let message = tokio::select! {
                biased;
                () = self.state.cancel.cancelled() => return Attempt::Cancelled,
                () = detached.as_mut() => {
                    tracing::info!("no subscriber for the detach grace: cancelling");
                    return Attempt::Cancelled;
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
                    self.span.record("ttft_ms", ttft.as_millis() as u64);
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

    /// One batch: local subscribers first (lowest latency), then the store, then the bus.
    async fn publish(&self, batch: Vec<Arc<Event>>) {
        self.state.publish(&batch);
        if let Err(err) = self.hub.store.append(&self.state.id, &batch).await {
            metrics::counter!("tokenfan_edge_backend_errors_total", "backend" => "store")
                .increment(1);
            tracing::warn!(%err, "store: appending history failed");
        }
        let traceparent = tokenfan_telemetry::propagation::span_traceparent(&self.span);
        if let Err(err) = self
            .hub
            .bus
            .publish(&self.state.id, batch.into(), traceparent)
            .await
        {
            metrics::counter!("tokenfan_edge_backend_errors_total", "backend" => "bus")
                .increment(1);
            tracing::warn!(%err, "bus: publishing failed");
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
