//! Stream history and metadata behind a small trait. [`memory::MemoryStore`] keeps them in
//! this process; [`redis::RedisStore`] shares them between replicas.
//!
//! The owner appends events in batches (one call per batch the generator delivered), never per
//! token per subscriber.
//!
//! # Fencing
//!
//! Ownership is a lease with an **epoch**: [`Store::create`] records epoch 1, and every
//! takeover ([`Store::claim`]) increments it. [`Store::append`] and [`Store::renew`] succeed
//! only for the current epoch, in the same atomic step as the write, so an owner that was
//! paused, partitioned or slow cannot write a single event once another replica took the
//! stream over ([`StoreError::Fenced`]). A terminal event, once stored, is final: nothing is
//! appended after it and nobody claims the stream again. A stop is recorded in the metadata
//! ([`Store::request_stop`]) and reported to whoever owns the stream now or next.

pub mod memory;
pub mod redis;

use std::{sync::Arc, time::Duration};

use crate::{event::Event, ids::StreamId, stream::StreamStatus};

/// What is known of a stream apart from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMeta {
    /// The model it runs.
    pub model: &'static str,
    /// The replica that owns the generator call (the last to create or claim it).
    pub owner: String,
    /// Where it stands.
    pub status: StreamStatus,
    /// The request ([`crate::request::StreamSpec::to_json`]), so another replica can take over.
    pub spec_json: String,
    /// The tenant that created the stream (every replica answers other tenants 404).
    pub tenant: String,
    /// The ownership epoch: 1 at creation, one more on each takeover.
    pub epoch: u64,
    /// Whether a client asked to stop the stream (the owner, current or next, ends it).
    pub stop_requested: bool,
}

impl StreamMeta {
    /// A stream just created (or restored) by `owner`, at epoch 1.
    pub fn running(spec: &crate::request::StreamSpec, owner: &str) -> Self {
        Self {
            model: spec.model,
            owner: owner.to_owned(),
            status: StreamStatus::Running,
            spec_json: spec.to_json(),
            tenant: spec.tenant.clone(),
            epoch: 1,
            stop_requested: false,
        }
    }
}

/// How long an owner lease and a stream's stored keys last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTerms {
    /// A lease not renewed within this is free for another replica to claim.
    pub ttl: Duration,
    /// A running stream's keys live this long past its owner's last write or renewal
    /// (the history TTL plus the lease TTL), so a stream whose owner died and that nobody
    /// took over is forgotten like a finished one.
    pub keep: Duration,
}

/// What [`Store::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the stream now, at this epoch.
    Claimed {
        /// The new epoch (one more than the last owner's).
        epoch: u64,
        /// A stop was recorded: the new owner only writes the terminal event.
        stop_requested: bool,
    },
    /// Another replica holds the lease.
    Held,
    /// The stream's terminal event is stored: there is nothing left to own.
    Ended,
}

/// What [`Store::append`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Events stored now. Less than the last seq sent means the store lost events (e.g. a
    /// Redis restored from an older snapshot): the owner re-sends from here.
    pub len: u64,
    /// A stop was recorded for the stream.
    pub stop_requested: bool,
}

/// One stored batch, for audits: which epoch wrote which seqs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBatch {
    /// The writer's epoch.
    pub epoch: u64,
    /// First seq the batch added.
    pub first: u64,
    /// Last seq the batch added.
    pub last: u64,
}

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Nothing is known of this stream.
    #[error("unknown stream")]
    NotFound,
    /// The events after this seq are no longer kept.
    #[error("history after seq {0} expired")]
    Expired(u64),
    /// The caller's epoch is not the stream's: another replica took the stream over.
    #[error("another replica owns the stream now")]
    Fenced,
    /// The backend failed (down, timed out, or answered nonsense).
    #[error("store backend: {0}")]
    Backend(String),
}

/// Stream metadata, history and owner leases.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a stream with no events whose owner `meta.owner` holds the lease at
    /// `meta.epoch`; false (and nothing written) when the stream is already recorded.
    async fn create(
        &self,
        id: &StreamId,
        meta: StreamMeta,
        terms: LeaseTerms,
    ) -> Result<bool, StoreError>;
    /// The stream's metadata.
    async fn meta(&self, id: &StreamId) -> Result<StreamMeta, StoreError>;
    /// Appends consecutive events for the owner at `epoch`: already-stored seqs are skipped,
    /// nothing is stored past a gap or after a terminal event, and the status follows the
    /// last appended event. [`StoreError::Fenced`] (nothing written) when `epoch` is not the
    /// stream's.
    async fn append(
        &self,
        id: &StreamId,
        epoch: u64,
        events: &[Arc<Event>],
    ) -> Result<Appended, StoreError>;
    /// Events after `after`, in order.
    async fn read(&self, id: &StreamId, after: u64) -> Result<Vec<Arc<Event>>, StoreError>;
    /// Keeps the stream for `ttl` more, then forgets it; releases the lease.
    async fn expire(&self, id: &StreamId, ttl: Duration) -> Result<(), StoreError>;
    /// Takes the lease of a running stream whose lease is free, at the next epoch.
    async fn claim(
        &self,
        id: &StreamId,
        owner: &str,
        terms: LeaseTerms,
    ) -> Result<Claim, StoreError>;
    /// Renews the lease of the owner at `epoch` (taking it again if it lapsed while nobody
    /// claimed it) and the keys' lifetime; true when a stop was recorded.
    /// [`StoreError::Fenced`] when another replica claimed the stream.
    async fn renew(
        &self,
        id: &StreamId,
        owner: &str,
        epoch: u64,
        terms: LeaseTerms,
    ) -> Result<bool, StoreError>;
    /// Records a stop of a running stream (kept until its terminal event is stored) and
    /// returns the stream's status.
    async fn request_stop(&self, id: &StreamId) -> Result<StreamStatus, StoreError>;
    /// Who holds the lease now, if anyone.
    async fn lease_owner(&self, id: &StreamId) -> Result<Option<String>, StoreError>;
    /// The stored batches with their writers' epochs, in order.
    async fn batches(&self, id: &StreamId) -> Result<Vec<StoredBatch>, StoreError>;
    /// Writes back events this replica delivered (so they were stored once) into a store that
    /// lost them: appends those past the stored end, never past a recorded end, without
    /// fencing (they are the stream's history whoever owns it now). The batch is logged at the
    /// stream's current epoch.
    async fn heal(&self, id: &StreamId, events: &[Arc<Event>]) -> Result<Appended, StoreError>;
    /// Whether the backend answers (readiness).
    async fn healthy(&self) -> bool {
        true
    }
    /// An id of the backend's current run, which changes when it restarted (and may have come
    /// back with older data); `None` when unknown or when the backend cannot restart apart from
    /// this process.
    async fn incarnation(&self) -> Option<String> {
        None
    }
}
