//! The stream hub: creates streams, finds them (here or on another replica), and hands out
//! subscriptions.
//!
//! Transports never see the generator, the bus or the store: they ask the hub for a
//! [`StreamState`] and subscribe to it. A stream created here gets an [`Owner`] task that runs
//! the generator call and publishes each batch once: to the local subscribers, to the store,
//! and to the bus. A stream owned by another replica is followed by a [`Mirror`] task that
//! fills a local `StreamState` from the store and the bus, and takes the stream over if its
//! owner dies.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{
    bus::Bus,
    config::EdgeConfig,
    context::Context,
    error::ApiError,
    ids::StreamId,
    lifecycle::Lifecycle,
    mirror::{self, Mirror},
    owner::{self, Owner},
    request::StreamSpec,
    store::{Store, StoreError, StreamMeta},
    stream::{StreamState, StreamStatus, SubscriberLimits},
    upstream::Generators,
};

/// How often finished streams past their history TTL are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How often the store is asked whether it restarted.
const STORE_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// How long a stop waits for the stream's terminal event before answering with the status
/// it has (202 `running`): the stop stays recorded and the owner, current or next, ends the
/// stream.
pub(crate) const STOP_WAIT: Duration = Duration::from_secs(5);

/// The hub; shared by every transport through `Arc<Hub>`.
pub struct Hub {
    /// What the owner and mirror tasks share with the hub.
    ctx: Arc<Context>,
    /// Whether other replicas share the store and bus (streams may live elsewhere).
    cluster: bool,
    streams: Mutex<HashMap<StreamId, Arc<StreamState>>>,
    /// Streams whose history expired, until when they are remembered (answered with 410
    /// `history_expired` rather than 404), and their tenant. Bounded by `max_streams`.
    expired: Mutex<HashMap<StreamId, (std::time::Instant, Arc<str>)>>,
    /// Counts the owner and mirror tasks (spawned on `tasks`), which the drain waits for.
    streams_tasks: TaskTracker,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("replica", &self.ctx.replica)
            .finish()
    }
}

impl Hub {
    /// A hub over these backends; `cluster` when other replicas share them. Its tasks go on
    /// `lifecycle`'s tracker; `lifecycle.handover` hands its streams over.
    pub fn new(
        config: Arc<EdgeConfig>,
        replica: String,
        generators: Arc<dyn Generators>,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        cluster: bool,
        lifecycle: &Lifecycle,
    ) -> Arc<Self> {
        Arc::new(Self {
            ctx: Arc::new(Context {
                config,
                replica,
                generators,
                store,
                bus,
                lifecycle: lifecycle.clone(),
            }),
            cluster,
            streams: Mutex::new(HashMap::new()),
            expired: Mutex::new(HashMap::new()),
            streams_tasks: TaskTracker::new(),
        })
    }

    /// Spawns `task` on the edge's tracker (waited for at shutdown).
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.ctx.lifecycle.spawn(task)
    }

    /// The edge's shutdown phases and task tracker.
    pub(crate) fn lifecycle(&self) -> &Lifecycle {
        &self.ctx.lifecycle
    }

    /// The configuration.
    pub fn config(&self) -> &EdgeConfig {
        &self.ctx.config
    }

    /// The generators.
    pub fn generators(&self) -> &dyn Generators {
        &*self.ctx.generators
    }

    /// This replica's id (in leases and logs).
    pub fn replica(&self) -> &str {
        &self.ctx.replica
    }

    /// Whether the store and bus answer (readiness).
    pub(crate) async fn backends_healthy(&self) -> (bool, bool) {
        (self.ctx.store.healthy().await, self.ctx.bus.healthy())
    }

    fn limits(&self) -> SubscriberLimits {
        SubscriberLimits {
            queue: self.ctx.config.streams.subscriber_queue,
            max_bytes: self.ctx.config.streams.subscriber_max_bytes,
        }
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

    /// Starts a stream: registers it (in the store too, so every replica can find it at
    /// once, with this replica's lease) and spawns its owner task. `parent` is the request's
    /// span (which continues the caller's traceparent); `transport` is the one that started
    /// it (an attribute of the stream span).
    pub async fn create(
        self: &Arc<Self>,
        spec: StreamSpec,
        parent: &tracing::Span,
        transport: &'static str,
    ) -> Result<Arc<StreamState>, ApiError> {
        self.create_with_id(StreamId::random(), spec, parent, transport)
            .await
    }

    /// [`Hub::create`] with an id minted by the caller (who may need it before the stream
    /// exists, e.g. to count it against its tenant's limits).
    pub(crate) async fn create_with_id(
        self: &Arc<Self>,
        id: StreamId,
        spec: StreamSpec,
        parent: &tracing::Span,
        transport: &'static str,
    ) -> Result<Arc<StreamState>, ApiError> {
        let max_seq = u64::from(spec.max_tokens) + 1;
        let state = Arc::new(
            StreamState::new(id.clone(), spec.model, self.limits(), max_seq)
                .with_tenant(&spec.tenant)
                .with_spec_json(spec.to_json()),
        );
        {
            let mut map = self.map();
            if map.len() >= self.ctx.config.streams.max_streams {
                return Err(ApiError::Capacity(format!(
                    "this replica already holds {} streams",
                    map.len()
                )));
            }
            map.insert(id.clone(), state.clone());
        }
        let meta = StreamMeta::running(&spec, &self.ctx.replica);
        let epoch = meta.epoch;
        if let Err(err) = self
            .ctx
            .store
            .create(&id, meta, self.ctx.lease_terms())
            .await
        {
            self.map().remove(&id);
            tracing::warn!(%err, "store: recording a new stream failed");
            return Err(ApiError::StoreUnavailable);
        }
        self.spawn_owner(state.clone(), spec, parent, transport, epoch);
        Ok(state)
    }

    /// Starts owning a stream taken over from a replica that died (the lease is already
    /// held, at `epoch`); `failover` is the mirror's `tokenfan.stream.failover` span.
    fn take_over(
        self: &Arc<Self>,
        state: Arc<StreamState>,
        spec: StreamSpec,
        failover: &tracing::Span,
        epoch: u64,
    ) {
        self.spawn_owner(state, spec, failover, "failover", epoch);
    }

    fn spawn_owner(
        self: &Arc<Self>,
        state: Arc<StreamState>,
        spec: StreamSpec,
        parent: &tracing::Span,
        transport: &'static str,
        epoch: u64,
    ) {
        metrics::gauge!("tokenfan_edge_streams_active").increment(1.0);
        state.set_owned(true);
        state.set_epoch(epoch);
        let span = tracing::info_span!(
            parent: parent,
            "stream",
            otel.name = "tokenfan.stream",
            stream_id = %state.id,
            model = spec.model,
            replica = %self.ctx.replica,
            transport,
            resumed_after = state.last_seq() as i64,
            tokens = tracing::field::Empty,
            ttft_ms = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
            cancel_cause = tracing::field::Empty,
            attempts = tracing::field::Empty,
            epoch = epoch as i64,
            released = tracing::field::Empty,
        );
        // Computed once: every bus batch carries it, and spans on this replica join it.
        let traceparent = tokenfan_telemetry::propagation::span_traceparent(&span);
        state.set_traceparent(traceparent.as_deref().map(Arc::from));
        let owner = Owner {
            ctx: self.ctx.clone(),
            state,
            spec,
            span: span.clone(),
            traceparent,
            epoch,
            proven: tokio::time::Instant::now(),
        };
        let hub = self.clone();
        self.spawn(self.streams_tasks.track_future(async move {
            // A released stream (fenced, or its lease unproven) is followed like any other
            // replica's, unless this replica is shutting down.
            if let owner::Next::Follow(state, spec) = owner.run().instrument(span).await {
                hub.follow(state, spec);
            }
        }));
    }

    /// Follows a stream another replica owns.
    fn follow(self: &Arc<Self>, state: Arc<StreamState>, spec: StreamSpec) {
        let mirror = Mirror {
            ctx: self.ctx.clone(),
            state: state.clone(),
            spec: spec.clone(),
        };
        let hub = self.clone();
        self.spawn(self.streams_tasks.track_future(async move {
            match mirror.run().await {
                mirror::Next::Done => {}
                // Nobody here follows it any more.
                mirror::Next::Forget => hub.forget(&state.id),
                mirror::Next::Own { failover, epoch } => {
                    hub.take_over(state, spec, &failover, epoch);
                }
            }
        }));
    }

    /// Drops a mirror nobody here follows any more.
    fn forget(&self, id: &StreamId) {
        let mut map = self.map();
        if map.get(id).is_some_and(|s| !s.is_owned()) {
            map.remove(id);
        }
    }

    /// The stream with this client-supplied id, on behalf of `tenant`: held here, or (in a
    /// cluster) found in the store and mirrored. Malformed and unknown ids are both 404, and so
    /// is a stream of another tenant, before anything about it is revealed or mirrored; a
    /// stream whose history expired is 410. `None` skips the tenant check.
    pub async fn get_for(
        self: &Arc<Self>,
        id: &str,
        tenant: Option<&str>,
    ) -> Result<Arc<StreamState>, ApiError> {
        let id = StreamId::parse(id).ok_or(ApiError::StreamNotFound)?;
        let foreign = |owner: &str| tenant.is_some_and(|t| t != owner);
        if let Some(state) = self.map().get(&id) {
            if foreign(state.tenant()) {
                return Err(ApiError::StreamNotFound);
            }
            return Ok(state.clone());
        }
        if let Some((_, owner)) = self
            .expired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            if foreign(owner) {
                return Err(ApiError::StreamNotFound);
            }
            return Err(ApiError::HistoryExpired(0));
        }
        if !self.cluster {
            return Err(ApiError::StreamNotFound);
        }
        let meta = match self.ctx.store.meta(&id).await {
            Ok(meta) => meta,
            Err(StoreError::NotFound) => return Err(ApiError::StreamNotFound),
            Err(StoreError::Expired(after)) => return Err(ApiError::HistoryExpired(after)),
            Err(err) => {
                tracing::warn!(%err, "store: looking a stream up failed");
                return Err(ApiError::StoreUnavailable);
            }
        };
        if foreign(&meta.tenant) {
            return Err(ApiError::StreamNotFound);
        }
        let mut spec = StreamSpec::from_json(&meta.spec_json).ok_or_else(|| {
            tracing::error!(stream_id = %id, "store: unreadable stream spec");
            ApiError::Internal
        })?;
        spec.tenant = meta.tenant;
        let max_seq = u64::from(spec.max_tokens) + 1;
        let state = Arc::new(
            StreamState::new(id.clone(), spec.model, self.limits(), max_seq)
                .with_tenant(&spec.tenant)
                .with_spec_json(spec.to_json()),
        );
        // Fill the history before anyone subscribes, so a finished stream answers at once.
        match self.ctx.store.read(&id, 0).await {
            Ok(events) => state.publish(&events),
            Err(StoreError::Expired(after)) => return Err(ApiError::HistoryExpired(after)),
            Err(err) => tracing::warn!(%err, "store: reading history failed; the mirror retries"),
        }
        let (state, fresh) = {
            let mut map = self.map();
            match map.get(&id) {
                Some(existing) => (existing.clone(), false),
                None => {
                    map.insert(id, state.clone());
                    (state, true)
                }
            }
        };
        if fresh && state.status() == StreamStatus::Running {
            self.follow(state.clone(), spec);
        }
        Ok(state)
    }

    /// The running streams this replica owns now (the tenant limits keep counting them).
    pub(crate) fn owned_running(&self) -> Vec<Arc<StreamState>> {
        self.map()
            .values()
            .filter(|s| s.is_owned() && s.status() == StreamStatus::Running)
            .cloned()
            .collect()
    }

    /// Stops a stream now, wherever it is owned, and returns its final status (waits briefly
    /// for the terminal event); 503 when the owner cannot be told. Traced as
    /// `tokenfan.stream.cancel` in the stream's trace.
    pub async fn cancel(&self, state: &Arc<StreamState>) -> Result<StreamStatus, ApiError> {
        let span = tracing::info_span!(
            parent: None,
            "stream.cancel",
            otel.name = "tokenfan.stream.cancel",
            stream_id = %state.id,
            replica = %self.ctx.replica,
            relayed = !state.is_owned(),
            status = tracing::field::Empty,
        );
        crate::observability::join_stream_trace(&span, state);
        let result = self.stop(state).instrument(span.clone()).await;
        span.record(
            "status",
            match &result {
                Ok(status) => status.as_str(),
                Err(e) => e.code(),
            },
        );
        result
    }

    /// Records the stop in the store (so the owner, current or next, honours it), then tells
    /// the owner at once: directly when it runs here, over the bus otherwise.
    async fn stop(&self, state: &Arc<StreamState>) -> Result<StreamStatus, ApiError> {
        if state.status() != StreamStatus::Running {
            return Ok(state.status());
        }
        match self.ctx.store.request_stop(&state.id).await {
            Ok(_) | Err(StoreError::NotFound) => {}
            // The owner here ends the stream; the store learns it with the terminal event.
            Err(err) if state.is_owned() => {
                tracing::warn!(%err, "store: recording a stop failed; stopping here");
            }
            Err(err) => {
                tracing::warn!(%err, "store: recording a stop failed");
                return Err(ApiError::StoreUnavailable);
            }
        }
        if state.is_owned() {
            state.cancel.cancel();
        } else if let Err(err) = self.ctx.bus.request_cancel(&state.id).await {
            // Recorded: the owner sees it at its next lease renewal.
            tracing::warn!(%err, "bus: relaying a stop failed; the owner reads it from the store");
        }
        let _ = tokio::time::timeout(STOP_WAIT, state.wait_finished()).await;
        Ok(state.status())
    }

    /// Forgets finished streams past their history TTL, every few seconds, until `shutdown`.
    pub(crate) async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let ttl = self.ctx.config.history_ttl();
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
                    gone.push((id.clone(), Arc::from(s.tenant())));
                }
                keep
            });
            let mut expired = self.expired.lock().unwrap_or_else(|e| e.into_inner());
            expired.retain(|_, (until, _)| *until > now);
            let room = self
                .ctx
                .config
                .streams
                .max_streams
                .saturating_sub(expired.len());
            expired.extend(
                gone.into_iter()
                    .take(room)
                    .map(|(id, tenant)| (id, (now + ttl, tenant))),
            );
        }
    }

    /// Watches the store for a restart (a new [`Store::incarnation`]) once a second, until
    /// `shutdown`. A store that restarted may have come back with older data (an append-only
    /// file a second behind, a snapshot): every stream this replica holds that no owner here
    /// is writing is written back, so an ended stream stays ended and a history stays whole.
    /// Running streams owned here heal through their owner's next write.
    pub(crate) async fn watch_store(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(STORE_WATCH_INTERVAL);
        let mut known: Option<String> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let Some(now) = self.ctx.store.incarnation().await else {
                continue;
            };
            if known.as_ref().is_some_and(|k| *k != now) {
                self.heal_store().await;
            }
            known = Some(now);
        }
    }

    async fn heal_store(&self) {
        let held: Vec<Arc<StreamState>> = self
            .map()
            .values()
            .filter(|s| s.last_seq() > 0 && !(s.is_owned() && s.status() == StreamStatus::Running))
            .cloned()
            .collect();
        tracing::warn!(
            streams = held.len(),
            "store restarted: writing back held histories"
        );
        for state in held {
            let Ok((status, events)) = state.events_after(0) else {
                continue;
            };
            if status != StreamStatus::Running {
                // An ended stream the store may have forgotten: record it again (a running one
                // is recorded again by its owner, who knows its epoch).
                let meta = StreamMeta {
                    model: state.model,
                    owner: self.ctx.replica.clone(),
                    status: StreamStatus::Running,
                    spec_json: state.spec_json().to_owned(),
                    tenant: state.tenant().to_owned(),
                    epoch: state.epoch().max(1),
                    stop_requested: false,
                };
                let _ = self
                    .ctx
                    .store
                    .create(&state.id, meta, self.ctx.lease_terms())
                    .await;
            }
            match self.ctx.store.heal(&state.id, &events).await {
                Ok(stored) if stored.len < state.last_seq() => {
                    tracing::warn!(stream_id = %state.id, stored = stored.len,
                        "store: a history could not be written back whole");
                }
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(err) => tracing::warn!(%err, stream_id = %state.id, "store: healing failed"),
            }
            if let Some(ended) = state.ended_at() {
                let left = self
                    .ctx
                    .config
                    .history_ttl()
                    .saturating_sub(ended.elapsed());
                let _ = self.ctx.store.expire(&state.id, left).await;
            }
            metrics::counter!("tokenfan_edge_store_heals_total").increment(1);
        }
    }

    /// Applies control requests from other replicas, until `shutdown`: cancel a stream owned
    /// here; restart the detach grace of a stream followed elsewhere.
    pub(crate) async fn serve_control(self: Arc<Self>, shutdown: CancellationToken) {
        let (mut cancels, mut touches) = match (
            self.ctx.bus.cancel_requests().await,
            self.ctx.bus.touch_requests().await,
        ) {
            (Ok(c), Ok(t)) => (Some(c), Some(t)),
            (Err(err), _) | (_, Err(err)) => {
                tracing::error!(%err, "bus: cannot receive control requests");
                return;
            }
        };
        loop {
            tokio::select! {
                id = recv(&mut cancels) => match id {
                    Some(id) => {
                        if let Some(state) = self.map().get(&id).filter(|s| s.is_owned()) {
                            state.cancel.cancel();
                        }
                    }
                    None => cancels = None,
                },
                id = recv(&mut touches) => match id {
                    Some(id) => {
                        if let Some(state) = self.map().get(&id) {
                            state.touch();
                        }
                    }
                    None => touches = None,
                },
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Shutdown. In a cluster, owned streams are handed over at once (the owners stop and the
    /// other replicas take over after the lease lapses). Alone, running streams get up to
    /// `grace` to finish; the rest are cancelled with their terminal events written.
    pub async fn drain(&self, grace: Duration) {
        if self.cluster {
            self.ctx.lifecycle.handover.cancel();
            self.streams_tasks.close();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.streams_tasks.wait()).await;
            return;
        }
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
        self.streams_tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.streams_tasks.wait()).await;
    }
}

async fn recv(rx: &mut Option<tokio::sync::mpsc::Receiver<StreamId>>) -> Option<StreamId> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
