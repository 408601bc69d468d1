//! Live fan-out between replicas behind a small trait. [`memory::MemoryBus`] serves one
//! process; a NATS bus slots in for clusters.
//!
//! The owner publishes each batch of events once; every replica with local subscribers holds
//! one bus subscription per stream and feeds it into its local [`crate::stream::StreamState`].
//! Cancel requests travel on a control channel to whichever replica owns the stream.

pub mod memory;
pub mod nats;
pub mod subjects;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{event::Event, ids::StreamId};

/// A bus failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bus backend: {0}")]
pub struct BusError(pub String);

/// One published batch as a subscriber receives it.
#[derive(Debug, Clone)]
pub struct BusBatch {
    /// Consecutive events of the stream.
    pub events: Arc<[Arc<Event>]>,
    /// The owner's stream span (W3C `traceparent`), when the stream is traced: the receiving
    /// replica parents its delivery span on it.
    pub traceparent: Option<Arc<str>>,
}

/// Batches of one stream's events, as published (at most once: gaps are refilled from the
/// store by the receiver).
pub type EventFeed = mpsc::Receiver<BusBatch>;

/// Event fan-out and stream control between replicas.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes a batch of consecutive events of `id`; `traceparent` travels with it so the
    /// replicas that deliver it continue the stream's trace.
    async fn publish(
        &self,
        id: &StreamId,
        events: Arc<[Arc<Event>]>,
        traceparent: Option<String>,
    ) -> Result<(), BusError>;
    /// Receives the batches published for `id` from now on (the feed ends when dropped).
    async fn subscribe(&self, id: &StreamId) -> Result<EventFeed, BusError>;
    /// Asks the owner of `id` to cancel it.
    async fn request_cancel(&self, id: &StreamId) -> Result<(), BusError>;
    /// Receives cancel requests addressed to any stream.
    async fn cancel_requests(&self) -> Result<mpsc::Receiver<StreamId>, BusError>;
    /// Tells the owner of `id` that subscribers are attached on another replica (restarts its
    /// detach grace). A single-process bus has no other replica: nothing to do.
    async fn request_touch(&self, _id: &StreamId) -> Result<(), BusError> {
        Ok(())
    }
    /// Receives touches addressed to any stream. A single-process bus has none: the channel
    /// it returns is already closed.
    async fn touch_requests(&self) -> Result<mpsc::Receiver<StreamId>, BusError> {
        Ok(mpsc::channel(1).1)
    }
    /// Whether the bus is connected (readiness).
    fn healthy(&self) -> bool {
        true
    }
}
