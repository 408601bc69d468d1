//! The in-process bus: a bounded channel per local feed, fed synchronously.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::mpsc;

use super::{Bus, BusBatch, BusError, EventFeed};
use crate::{event::Event, ids::StreamId};

/// Batches a feed may hold before the bus drops new ones for it (the receiver then refills
/// from the store, as with any at-most-once bus).
const FEED_CAPACITY: usize = 1024;

type FeedSender = mpsc::Sender<BusBatch>;

/// Fan-out inside one process (the embedded default).
#[derive(Default)]
pub struct MemoryBus {
    feeds: Mutex<HashMap<StreamId, Vec<FeedSender>>>,
    control: Mutex<Vec<mpsc::Sender<StreamId>>>,
}

#[async_trait::async_trait]
impl Bus for MemoryBus {
    async fn publish(
        &self,
        id: &StreamId,
        events: Arc<[Arc<Event>]>,
        traceparent: Option<String>,
    ) -> Result<(), BusError> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(senders) = feeds.get_mut(id) {
            let batch = BusBatch {
                events,
                traceparent: traceparent.map(Arc::from),
            };
            senders.retain(|tx| match tx.try_send(batch.clone()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            if senders.is_empty() {
                feeds.remove(id);
            }
        }
        Ok(())
    }

    async fn subscribe(&self, id: &StreamId) -> Result<EventFeed, BusError> {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        feeds.entry(id.clone()).or_default().push(tx);
        Ok(rx)
    }

    async fn request_cancel(&self, id: &StreamId) -> Result<(), BusError> {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        control.retain(|tx| {
            !matches!(
                tx.try_send(id.clone()),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
        Ok(())
    }

    async fn cancel_requests(&self) -> Result<mpsc::Receiver<StreamId>, BusError> {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        Ok(rx)
    }
}
