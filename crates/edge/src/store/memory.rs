//! The in-process store: a map from stream id to metadata, events and lease, with expiry.
//! Same semantics as the Redis store (see the conformance suite), one mutex.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{Appended, Claim, LeaseTerms, Store, StoreError, StoredBatch, StreamMeta};
use crate::{event::Event, ids::StreamId, stream::StreamStatus};

struct Entry {
    meta: StreamMeta,
    events: Vec<Arc<Event>>,
    batches: Vec<StoredBatch>,
    expires_at: Option<Instant>,
    /// The lease holder and until when it holds it.
    lease: Option<(String, Instant)>,
}

impl Entry {
    fn lease_holder(&self, now: Instant) -> Option<&str> {
        self.lease
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(owner, _)| owner.as_str())
    }

    /// Appends the events that follow the stored end, up to a terminal event, logged as one
    /// batch at the current epoch.
    fn append(&mut self, events: &[Arc<Event>]) -> Appended {
        let first = self.events.len() as u64 + 1;
        for event in events {
            if self.meta.status != StreamStatus::Running {
                break;
            }
            if event.seq == self.events.len() as u64 + 1 {
                self.events.push(event.clone());
                self.meta.status = StreamStatus::of(event);
            }
        }
        let len = self.events.len() as u64;
        if len >= first {
            self.batches.push(StoredBatch {
                epoch: self.meta.epoch,
                first,
                last: len,
            });
        }
        Appended {
            len,
            stop_requested: self.meta.stop_requested,
        }
    }

    fn check_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        if self.meta.epoch == epoch {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }
}

/// History kept in this process (the embedded default).
#[derive(Default)]
pub struct MemoryStore {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<StreamId, Entry>,
    /// Creations since the last sweep.
    created: usize,
}

/// Expired entries are swept once every this many creations (and on access).
const SWEEP_EVERY: usize = 1024;

impl MemoryStore {
    fn with<T>(
        &self,
        id: &StreamId,
        f: impl FnOnce(&mut Entry) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entries = &mut guard.map;
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
    async fn create(
        &self,
        id: &StreamId,
        meta: StreamMeta,
        terms: LeaseTerms,
    ) -> Result<bool, StoreError> {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Counted, not keyed on the map's size: a map that stays at a multiple of the period
        // would be scanned on every creation.
        guard.created += 1;
        if guard.created >= SWEEP_EVERY {
            guard.created = 0;
            guard
                .map
                .retain(|_, e| e.expires_at.is_none_or(|t| t > now));
        }
        let entries = &mut guard.map;
        if entries
            .get(id)
            .is_some_and(|e| e.expires_at.is_none_or(|t| t > now))
        {
            return Ok(false);
        }
        let lease = Some((meta.owner.clone(), now + terms.ttl));
        entries.insert(
            id.clone(),
            Entry {
                meta,
                events: Vec::new(),
                batches: Vec::new(),
                // The embedded store keeps a running stream until its owner expires it.
                expires_at: None,
                lease,
            },
        );
        Ok(true)
    }

    async fn meta(&self, id: &StreamId) -> Result<StreamMeta, StoreError> {
        self.with(id, |e| Ok(e.meta.clone()))
    }

    async fn append(
        &self,
        id: &StreamId,
        epoch: u64,
        events: &[Arc<Event>],
    ) -> Result<Appended, StoreError> {
        self.with(id, |e| {
            e.check_epoch(epoch)?;
            Ok(e.append(events))
        })
    }

    async fn heal(&self, id: &StreamId, events: &[Arc<Event>]) -> Result<Appended, StoreError> {
        self.with(id, |e| Ok(e.append(events)))
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
            e.lease = None;
            Ok(())
        })
    }

    async fn claim(
        &self,
        id: &StreamId,
        owner: &str,
        terms: LeaseTerms,
    ) -> Result<Claim, StoreError> {
        self.with(id, |e| {
            let now = Instant::now();
            if e.meta.status != StreamStatus::Running {
                return Ok(Claim::Ended);
            }
            if e.lease_holder(now).is_some() {
                return Ok(Claim::Held);
            }
            e.meta.epoch += 1;
            e.meta.owner = owner.to_owned();
            e.lease = Some((owner.to_owned(), now + terms.ttl));
            Ok(Claim::Claimed {
                epoch: e.meta.epoch,
                stop_requested: e.meta.stop_requested,
            })
        })
    }

    async fn renew(
        &self,
        id: &StreamId,
        owner: &str,
        epoch: u64,
        terms: LeaseTerms,
    ) -> Result<bool, StoreError> {
        self.with(id, |e| {
            e.check_epoch(epoch)?;
            let now = Instant::now();
            if e.lease_holder(now).is_some_and(|holder| holder != owner) {
                return Err(StoreError::Fenced);
            }
            e.lease = Some((owner.to_owned(), now + terms.ttl));
            Ok(e.meta.stop_requested)
        })
    }

    async fn request_stop(&self, id: &StreamId) -> Result<StreamStatus, StoreError> {
        self.with(id, |e| {
            if e.meta.status == StreamStatus::Running {
                e.meta.stop_requested = true;
            }
            Ok(e.meta.status)
        })
    }

    async fn lease_owner(&self, id: &StreamId) -> Result<Option<String>, StoreError> {
        match self.with(id, |e| {
            Ok(e.lease_holder(Instant::now()).map(str::to_owned))
        }) {
            Err(StoreError::NotFound) => Ok(None),
            other => other,
        }
    }

    async fn batches(&self, id: &StreamId) -> Result<Vec<StoredBatch>, StoreError> {
        self.with(id, |e| Ok(e.batches.clone()))
    }
}
