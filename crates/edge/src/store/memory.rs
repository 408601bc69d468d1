//! The in-process store: a map from stream id to metadata and events, with expiry.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{Store, StoreError, StreamMeta};
use crate::{event::Event, ids::StreamId, stream::StreamStatus};

struct Entry {
    meta: StreamMeta,
    events: Vec<Arc<Event>>,
    expires_at: Option<Instant>,
}

/// History kept in this process (the embedded default).
#[derive(Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<StreamId, Entry>>,
    leases: Mutex<HashMap<StreamId, (String, Instant)>>,
}

/// Expired entries are swept once every this many creations (and on access).
const SWEEP_EVERY: usize = 1024;

impl MemoryStore {
    fn with<T>(
        &self,
        id: &StreamId,
        f: impl FnOnce(&mut Entry) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let expired = entries
            .get(id)
            .and_then(|e| e.expires_at)
            .is_some_and(|t| t <= Instant::now());
        if expired {
            entries.remove(id);
        }
        entries.get_mut(id).ok_or(StoreError::NotFound).and_then(f)
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn create(&self, id: &StreamId, meta: StreamMeta) -> Result<(), StoreError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len().is_multiple_of(SWEEP_EVERY) {
            let now = Instant::now();
            entries.retain(|_, e| e.expires_at.is_none_or(|t| t > now));
        }
        entries.insert(
            id.clone(),
            Entry {
                meta,
                events: Vec::new(),
                expires_at: None,
            },
        );
        Ok(())
    }

    async fn meta(&self, id: &StreamId) -> Result<StreamMeta, StoreError> {
        self.with(id, |e| Ok(e.meta.clone()))
    }

    async fn append(&self, id: &StreamId, events: &[Arc<Event>]) -> Result<(), StoreError> {
        self.with(id, |e| {
            for event in events {
                if event.seq == e.events.len() as u64 + 1 {
                    e.events.push(event.clone());
                    e.meta.status = StreamStatus::of(event);
                }
            }
            Ok(())
        })
    }

    async fn read(&self, id: &StreamId, after: u64) -> Result<Vec<Arc<Event>>, StoreError> {
        self.with(id, |e| {
            Ok(e.events
                .get(after as usize..)
                .map(<[_]>::to_vec)
                .unwrap_or_default())
        })
    }

    async fn expire(&self, id: &StreamId, ttl: Duration) -> Result<(), StoreError> {
        self.with(id, |e| {
            e.expires_at = Some(Instant::now() + ttl);
            Ok(())
        })
    }

    async fn acquire_lease(
        &self,
        id: &StreamId,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        leases.retain(|_, (_, until)| *until > now);
        match leases.get_mut(id) {
            Some((holder, until)) if holder == owner => {
                *until = now + ttl;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => {
                leases.insert(id.clone(), (owner.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn lease_owner(&self, id: &StreamId) -> Result<Option<String>, StoreError> {
        let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        Ok(leases
            .get(id)
            .filter(|(_, until)| *until > now)
            .map(|(owner, _)| owner.clone()))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conforms() {
        super::super::conformance::run(&super::MemoryStore::default()).await;
    }
}
