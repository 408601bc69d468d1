//! A mirror: this replica's copy of a stream another replica owns.
//!
//! Local subscribers read the mirror's [`StreamState`] exactly as they read an owned stream.
//! The mirror subscribes to the stream's bus feed first, then fills the history from the
//! store, then applies live batches; the bus is at-most-once, so a batch that skips seqs (or a
//! quiet spell) triggers a refill from the store. While it has subscribers it tells the owner
//! (so the owner's detach grace does not run out), and when the owner stops making progress
//! and its lease has lapsed, the mirror takes the lease and becomes the owner, resuming the
//! generator at the next token.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    bus::EventFeed, hub::Hub, request::StreamSpec, store::StoreError, stream::StreamState,
    stream::StreamStatus,
};

/// How often the mirror checks progress, attachment and the owner's lease.
const TICK: Duration = Duration::from_millis(250);

/// See the module docs.
pub(crate) struct Mirror {
    pub(crate) hub: Arc<Hub>,
    pub(crate) state: Arc<StreamState>,
    pub(crate) spec: StreamSpec,
}

impl Mirror {
    pub(crate) async fn run(self) {
        let id = self.state.id.clone();
        let config = self.hub.config();
        let lease_ttl = config.lease_ttl();
        let grace = config.detach_grace();
        let mut feed: Option<EventFeed> = self.hub.bus.subscribe(&id).await.ok();
        self.refill().await;

        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seq = self.state.last_seq();
        let mut last_progress = Instant::now();
        let mut last_touch: Option<Instant> = None;
        let mut idle_since: Option<Instant> = None;
        while self.state.status() == StreamStatus::Running {
            tokio::select! {
                batch = recv(&mut feed) => match batch {
                    Some(batch) => {
                        let first = batch.first().map_or(0, |e| e.seq);
                        if first > self.state.last_seq() + 1 {
                            metrics::counter!("tokenfan_edge_bus_gaps_total").increment(1);
                            self.refill().await;
                        }
                        self.state.publish(&batch);
                    }
                    // The bus dropped the feed (NATS down): the tick resubscribes and refills.
                    None => feed = None,
                },
                _ = tick.tick() => {
                    if feed.is_none() {
                        feed = self.hub.bus.subscribe(&id).await.ok();
                        if feed.is_some() {
                            self.refill().await;
                        }
                    }
                    let seq = self.state.last_seq();
                    if seq != last_seq {
                        last_seq = seq;
                        last_progress = Instant::now();
                    } else if last_progress.elapsed() >= lease_ttl {
                        // Quiet: maybe the bus lost messages, maybe the owner died.
                        self.refill().await;
                        if self.state.last_seq() == last_seq && self.take_over().await {
                            return;
                        }
                        last_progress = Instant::now();
                    }
                    if self.state.has_interest(grace / 2) {
                        idle_since = None;
                        if last_touch.is_none_or(|t| t.elapsed() >= grace / 3) {
                            let _ = self.hub.bus.request_touch(&id).await;
                            last_touch = Some(Instant::now());
                        }
                    } else if idle_since.get_or_insert_with(Instant::now).elapsed()
                        >= grace + lease_ttl
                    {
                        // Nobody here follows it any more: forget the mirror.
                        self.hub.forget(&id);
                        return;
                    }
                }
            }
        }
    }

    /// Applies the history after the last event this replica has.
    async fn refill(&self) {
        match self
            .hub
            .store
            .read(&self.state.id, self.state.last_seq())
            .await
        {
            Ok(events) => self.state.publish(&events),
            Err(StoreError::NotFound | StoreError::Expired(_)) => {}
            Err(err) => tracing::warn!(%err, stream_id = %self.state.id, "store: refill failed"),
        }
    }

    /// Takes the lease when the owner's has lapsed, and starts owning the stream here.
    async fn take_over(&self) -> bool {
        let store = &self.hub.store;
        let id = &self.state.id;
        if !matches!(store.lease_owner(id).await, Ok(None)) {
            return false;
        }
        let ttl = self.hub.config().lease_ttl();
        if !matches!(
            store.acquire_lease(id, self.hub.replica(), ttl).await,
            Ok(true)
        ) {
            return false;
        }
        // Events the old owner stored just before it died.
        self.refill().await;
        if self.state.status() != StreamStatus::Running {
            return false;
        }
        tracing::warn!(stream_id = %id, tokens = self.state.last_seq(),
            "the owner stopped; taking the stream over");
        metrics::counter!("tokenfan_edge_owner_failovers_total").increment(1);
        self.hub.take_over(self.state.clone(), self.spec.clone());
        true
    }
}

async fn recv(feed: &mut Option<EventFeed>) -> Option<Arc<[Arc<crate::event::Event>]>> {
    match feed {
        Some(f) => f.recv().await,
        None => std::future::pending().await,
    }
}
