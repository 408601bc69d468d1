//! A mirror: this replica's copy of a stream another replica owns.
//!
//! Local subscribers read the mirror's [`StreamState`] exactly as they read an owned stream.
//! The mirror subscribes to the stream's bus feed first, then fills the history from the
//! store, then applies live batches; the bus is at-most-once, so a batch that skips seqs (or a
//! quiet spell) triggers a refill from the store. While it has subscribers it tells the owner
//! (so the owner's detach grace does not run out), and when the owner stops making progress
//! and its lease has lapsed, the mirror takes the lease and becomes the owner, resuming the
//! generator at the next token.
//!
//! Traced as one `tokenfan.stream.mirror` span per mirror, whose parent is the owner's
//! `tokenfan.stream` span named by the first bus batch's `traceparent` header.

use std::{sync::Arc, time::Duration};

use tokenfan_telemetry::propagation;
use tokio::time::Instant;

use crate::{
    bus::{BusBatch, EventFeed},
    context::Context,
    request::StreamSpec,
    store::{Claim, StoreError},
    stream::StreamState,
    stream::StreamStatus,
};

/// How often the mirror checks progress, attachment and the owner's lease.
const TICK: Duration = Duration::from_millis(250);

/// See the module docs.
pub(crate) struct Mirror {
    pub(crate) ctx: Arc<Context>,
    pub(crate) state: Arc<StreamState>,
    pub(crate) spec: StreamSpec,
}

/// What the hub does once a mirror stops.
pub(crate) enum Next {
    /// Nothing: the stream reached its terminal event.
    Done,
    /// Forget the mirror: nobody on this replica follows it any more.
    Forget,
    /// Own the stream: its owner died and this replica holds the lease now, at `epoch`;
    /// `failover` is the `tokenfan.stream.failover` span, the new owner's parent.
    Own { failover: tracing::Span, epoch: u64 },
}

/// What the mirror span records; written as the mirror goes, recorded at its end.
#[derive(Debug, Default)]
struct Tally {
    /// Events that arrived over the bus.
    received: u64,
    /// Refills from the store after a gap, a quiet spell or a resubscription.
    refills: u64,
    /// Whether the span got its parent (the first traced batch).
    parented: bool,
}

impl Mirror {
    pub(crate) async fn run(self) -> Next {
        // Not entered until it ends: its parent comes with the first traced batch, and a span
        // that has started cannot change parent.
        let span = tracing::info_span!(
            parent: None,
            "stream.mirror",
            otel.name = "tokenfan.stream.mirror",
            otel.kind = "consumer",
            stream_id = %self.state.id,
            replica = %self.ctx.replica,
            events_received = tracing::field::Empty,
            gaps_refilled = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let mut tally = Tally::default();
        let next = self.follow(&span, &mut tally).await;
        span.record("events_received", tally.received as i64);
        span.record("gaps_refilled", tally.refills as i64);
        span.record(
            "outcome",
            match next {
                Next::Done => "finished",
                Next::Forget => "forgotten",
                Next::Own { .. } => "took_over",
            },
        );
        next
    }

    /// Applies one bus batch (refilling first when it skips seqs).
    async fn apply(&self, batch: BusBatch, span: &tracing::Span, tally: &mut Tally) {
        if !tally.parented
            && let Some(tp) = &batch.traceparent
        {
            propagation::set_parent(span, propagation::from_traceparent(tp));
            self.state.set_traceparent(Some(tp.clone()));
            tally.parented = true;
        }
        tally.received += batch.events.len() as u64;
        let first = batch.events.first().map_or(0, |e| e.seq);
        if first > self.state.last_seq() + 1 {
            metrics::counter!("tokenfan_edge_bus_gaps_total").increment(1);
            tally.refills += 1;
            self.refill().await;
        }
        self.state.publish(&batch.events);
    }

    async fn follow(&self, span: &tracing::Span, tally: &mut Tally) -> Next {
        let id = self.state.id.clone();
        let config = &self.ctx.config;
        let lease_ttl = config.lease_ttl();
        let grace = config.detach_grace();
        let mut feed: Option<EventFeed> = self.ctx.bus.subscribe(&id).await.ok();
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
                    Some(batch) => self.apply(batch, span, tally).await,
                    // The bus dropped the feed (NATS down): the tick resubscribes and refills.
                    None => feed = None,
                },
                _ = tick.tick() => {
                    if feed.is_none() {
                        feed = self.ctx.bus.subscribe(&id).await.ok();
                        if feed.is_some() {
                            tally.refills += 1;
                            self.refill().await;
                        }
                    }
                    let seq = self.state.last_seq();
                    if seq != last_seq {
                        last_seq = seq;
                        last_progress = Instant::now();
                    } else if last_progress.elapsed() >= lease_ttl {
                        // Quiet: maybe the bus lost messages, maybe the owner died.
                        tally.refills += 1;
                        self.refill().await;
                        if self.state.last_seq() == last_seq
                            && let Some((failover, epoch)) = self.take_over().await
                        {
                            return Next::Own { failover, epoch };
                        }
                        last_progress = Instant::now();
                    }
                    if self.state.has_interest(grace / 2) {
                        idle_since = None;
                        if last_touch.is_none_or(|t| t.elapsed() >= grace / 3) {
                            let _ = self.ctx.bus.request_touch(&id).await;
                            last_touch = Some(Instant::now());
                        }
                    } else if idle_since.get_or_insert_with(Instant::now).elapsed()
                        >= grace + lease_ttl
                    {
                        // Nobody here follows it any more: forget the mirror.
                        return Next::Forget;
                    }
                }
            }
        }
        Next::Done
    }

    /// Applies the history after the last event this replica has.
    async fn refill(&self) {
        match self
            .ctx
            .store
            .read(&self.state.id, self.state.last_seq())
            .await
        {
            Ok(events) => self.state.publish(&events),
            Err(StoreError::NotFound | StoreError::Expired(_)) => {}
            Err(err) => tracing::warn!(%err, stream_id = %self.state.id, "store: refill failed"),
        }
    }

    /// Claims the stream when the owner's lease has lapsed (at the next epoch), for this
    /// replica to own it: the failover span and the epoch. Never during this replica's
    /// shutdown, and never a stream whose end is known (here or in the store).
    async fn take_over(&self) -> Option<(tracing::Span, u64)> {
        if self.ctx.lifecycle.handover.is_cancelled() {
            return None;
        }
        let store = &self.ctx.store;
        let id = &self.state.id;
        let (epoch, stop_requested) = match store
            .claim(id, &self.ctx.replica, self.ctx.lease_terms())
            .await
        {
            Ok(Claim::Claimed {
                epoch,
                stop_requested,
            }) => (epoch, stop_requested),
            Ok(Claim::Held) => return None,
            Ok(Claim::Ended) => {
                // The end is stored: it reaches the subscribers here through the refill.
                self.refill().await;
                return None;
            }
            Err(StoreError::NotFound) => {
                // The store forgot the stream (a restart without persistence) and its owner
                // did not record it again (it may have handed the stream over while the store
                // was down): this replica holds its request and history, so it does. A stream
                // that ended is never here (the mirror stops at the terminal event).
                let epoch = self.state.epoch() + 1;
                match self.ctx.restore(&self.state, &self.spec, epoch).await {
                    Ok(true) => (epoch, false),
                    _ => return None,
                }
            }
            Err(err) => {
                tracing::warn!(%err, stream_id = %id, "store: claiming a stream failed");
                return None;
            }
        };
        // Events the old owner stored just before it stopped.
        self.refill().await;
        if self.state.status() != StreamStatus::Running {
            return None;
        }
        if stop_requested {
            // A stop recorded while the old owner was failing: the new one only ends it.
            self.state.cancel.cancel();
        }
        // In the stream's trace when this replica learnt it from the bus; the new owner's
        // stream span is its child.
        let failover = tracing::info_span!(
            parent: None,
            "stream.failover",
            otel.name = "tokenfan.stream.failover",
            stream_id = %id,
            replica = %self.ctx.replica,
            resumed_after = self.state.last_seq() as i64,
            epoch = epoch as i64,
        );
        crate::observability::join_stream_trace(&failover, &self.state);
        failover.in_scope(|| {
            tracing::warn!(stream_id = %id, tokens = self.state.last_seq(), epoch,
                "the owner stopped; taking the stream over");
        });
        metrics::counter!("tokenfan_edge_owner_failovers_total").increment(1);
        Some((failover, epoch))
    }
}

async fn recv(feed: &mut Option<EventFeed>) -> Option<BusBatch> {
    match feed {
        Some(f) => f.recv().await,
        None => std::future::pending().await,
    }
}
