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

#[doc(hidden)]
pub mod conformance {
    //! The behaviour every [`Store`] must have; run against each implementation.

    use super::*;
    use crate::event::{EventKind, FinishReason, Usage};

    fn token(seq: u64) -> Arc<Event> {
        Arc::new(Event::new(
            seq,
            EventKind::Token {
                text: format!("t{seq}"),
            },
        ))
    }

    fn done(seq: u64, finish_reason: FinishReason) -> Arc<Event> {
        Arc::new(Event::new(
            seq,
            EventKind::Done {
                finish_reason,
                usage: Usage::default(),
            },
        ))
    }

    fn meta() -> StreamMeta {
        StreamMeta {
            model: "tokenfan-mock",
            owner: "edge-a".into(),
            status: StreamStatus::Running,
            spec_json: r#"{"spec":true}"#.into(),
            tenant: "tenant-a".into(),
            epoch: 1,
            stop_requested: false,
        }
    }

    const TERMS: LeaseTerms = LeaseTerms {
        ttl: Duration::from_millis(300),
        keep: Duration::from_secs(60),
    };

    fn seqs(v: Vec<Arc<Event>>) -> Vec<u64> {
        v.iter().map(|e| e.seq).collect()
    }

    async fn lease_lapses(store: &dyn Store, id: &StreamId) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store.lease_owner(id).await.expect("owner").is_some() {
            assert!(tokio::time::Instant::now() < deadline, "lease expires");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs every check against `store`.
    pub async fn run(store: &dyn Store) {
        history(store).await;
        fencing(store).await;
        stops(store).await;
    }

    /// Create, append (idempotent by seq, no gaps), read, terminal, expire.
    async fn history(store: &dyn Store) {
        let id = StreamId::random();
        assert!(matches!(store.meta(&id).await, Err(StoreError::NotFound)));
        assert!(matches!(
            store.read(&id, 0).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.append(&id, 1, &[token(1)]).await,
            Err(StoreError::NotFound)
        ));

        assert!(store.create(&id, meta(), TERMS).await.expect("create"));
        assert!(
            !store.create(&id, meta(), TERMS).await.expect("again"),
            "a recorded stream is never replaced"
        );
        assert_eq!(store.meta(&id).await.expect("meta"), meta());
        assert_eq!(
            store.lease_owner(&id).await.expect("owner").as_deref(),
            Some("edge-a")
        );
        assert!(store.read(&id, 0).await.expect("empty").is_empty());

        let appended = store
            .append(&id, 1, &[token(1), token(2)])
            .await
            .expect("append");
        assert_eq!(appended.len, 2);
        let overlap = store
            .append(&id, 1, &[token(2), token(3), token(5)])
            .await
            .expect("overlap and a gap");
        assert_eq!(
            overlap.len, 3,
            "the duplicate skipped, nothing past the gap"
        );
        assert_eq!(seqs(store.read(&id, 0).await.expect("read")), [1, 2, 3]);
        assert_eq!(seqs(store.read(&id, 2).await.expect("read")), [3]);
        assert!(store.read(&id, 3).await.expect("read").is_empty());

        store
            .append(&id, 1, &[done(4, FinishReason::Stop)])
            .await
            .expect("terminal");
        assert_eq!(
            store.meta(&id).await.expect("meta").status,
            StreamStatus::Done
        );
        let after_end = store
            .append(&id, 1, &[token(5)])
            .await
            .expect("after the end");
        assert_eq!(after_end.len, 4, "nothing is stored after a terminal event");
        let healed = store
            .heal(&id, &[token(5)])
            .await
            .expect("heal after the end");
        assert_eq!(healed.len, 4, "not even by a heal");
        assert_eq!(
            store
                .batches(&id)
                .await
                .expect("batches")
                .iter()
                .map(|b| (b.epoch, b.first, b.last))
                .collect::<Vec<_>>(),
            [(1, 1, 2), (1, 3, 3), (1, 4, 4)]
        );

        // A store that lost the end of a history gets it back from a replica that delivered it.
        let lost = StreamId::random();
        assert!(store.create(&lost, meta(), TERMS).await.expect("create"));
        store.append(&lost, 1, &[token(1)]).await.expect("append");
        let healed = store
            .heal(&lost, &[token(1), token(2), done(3, FinishReason::Stop)])
            .await
            .expect("heal");
        assert_eq!(healed.len, 3);
        assert_eq!(seqs(store.read(&lost, 0).await.expect("read")), [1, 2, 3]);
        assert_eq!(
            store.meta(&lost).await.expect("meta").status,
            StreamStatus::Done
        );
        store.expire(&lost, Duration::ZERO).await.expect("expire");

        store.expire(&id, Duration::ZERO).await.expect("expire");
        assert!(matches!(store.meta(&id).await, Err(StoreError::NotFound)));
    }

    /// One writer at a time: a claim moves the epoch and the old owner can no longer write.
    async fn fencing(store: &dyn Store) {
        let id = StreamId::random();
        assert!(matches!(
            store.claim(&id, "edge-b", TERMS).await,
            Err(StoreError::NotFound)
        ));
        assert!(store.create(&id, meta(), TERMS).await.expect("create"));
        store.append(&id, 1, &[token(1)]).await.expect("append");
        assert_eq!(
            store.claim(&id, "edge-b", TERMS).await.expect("claim"),
            Claim::Held,
            "the lease is held"
        );
        assert!(!store.renew(&id, "edge-a", 1, TERMS).await.expect("renew"));
        assert!(matches!(
            store.append(&id, 2, &[token(2)]).await,
            Err(StoreError::Fenced)
        ));

        // The owner pauses: its lease lapses and edge-b takes the stream over.
        lease_lapses(store, &id).await;
        assert_eq!(
            store.claim(&id, "edge-b", TERMS).await.expect("claim"),
            Claim::Claimed {
                epoch: 2,
                stop_requested: false
            }
        );
        let meta = store.meta(&id).await.expect("meta");
        assert_eq!((meta.owner.as_str(), meta.epoch), ("edge-b", 2));
        // The old owner wakes up: fenced, whatever it tries.
        assert!(matches!(
            store.append(&id, 1, &[token(2)]).await,
            Err(StoreError::Fenced)
        ));
        assert!(matches!(
            store.renew(&id, "edge-a", 1, TERMS).await,
            Err(StoreError::Fenced)
        ));
        assert_eq!(
            store
                .append(&id, 2, &[token(2)])
                .await
                .expect("new owner")
                .len,
            2
        );
        // The new owner's lease may lapse and be taken again by it while nobody claimed it.
        lease_lapses(store, &id).await;
        assert!(!store.renew(&id, "edge-b", 2, TERMS).await.expect("re-take"));
        assert_eq!(
            store.lease_owner(&id).await.expect("owner").as_deref(),
            Some("edge-b")
        );
        store
            .append(&id, 2, &[done(3, FinishReason::Stop)])
            .await
            .expect("terminal");
        assert_eq!(
            store
                .batches(&id)
                .await
                .expect("batches")
                .iter()
                .map(|b| b.epoch)
                .collect::<Vec<_>>(),
            [1, 2, 2]
        );
        // Ended: nobody takes it over again.
        lease_lapses(store, &id).await;
        assert_eq!(
            store.claim(&id, "edge-c", TERMS).await.expect("claim"),
            Claim::Ended
        );
        store.expire(&id, Duration::ZERO).await.expect("expire");
    }

    /// A stop is recorded for the owner, current or next, and ends with the terminal event.
    async fn stops(store: &dyn Store) {
        let id = StreamId::random();
        assert!(matches!(
            store.request_stop(&id).await,
            Err(StoreError::NotFound)
        ));
        assert!(store.create(&id, meta(), TERMS).await.expect("create"));
        assert_eq!(
            store.request_stop(&id).await.expect("stop"),
            StreamStatus::Running
        );
        assert!(store.meta(&id).await.expect("meta").stop_requested);
        assert!(store.renew(&id, "edge-a", 1, TERMS).await.expect("renew"));
        assert!(
            store
                .append(&id, 1, &[token(1)])
                .await
                .expect("append")
                .stop_requested
        );
        // The owner dies before it could end the stream: the next one is told.
        lease_lapses(store, &id).await;
        assert_eq!(
            store.claim(&id, "edge-b", TERMS).await.expect("claim"),
            Claim::Claimed {
                epoch: 2,
                stop_requested: true
            }
        );
        store
            .append(&id, 2, &[done(2, FinishReason::Cancelled)])
            .await
            .expect("terminal");
        assert_eq!(
            store.request_stop(&id).await.expect("stop again"),
            StreamStatus::Cancelled,
            "a stop after the end reports the final status"
        );
        store.expire(&id, Duration::ZERO).await.expect("expire");
    }
}
