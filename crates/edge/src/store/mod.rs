//! Stream history and metadata behind a small trait. [`memory::MemoryStore`] keeps them in
//! this process; a Redis store slots in for clusters.
//!
//! The owner appends events in batches (one call per batch the generator delivered), never per
//! token per subscriber.

pub mod memory;
pub mod redis;

use std::{sync::Arc, time::Duration};

use crate::{event::Event, ids::StreamId, stream::StreamStatus};

/// What is known of a stream apart from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMeta {
    /// The model it runs.
    pub model: &'static str,
    /// The replica that owns the generator call.
    pub owner: String,
    /// Where it stands.
    pub status: StreamStatus,
    /// The request ([`crate::request::StreamSpec::to_json`]), so another replica can take over.
    pub spec_json: String,
    /// The tenant that created the stream (every replica answers other tenants 404).
    pub tenant: String,
}

impl StreamMeta {
    /// A stream just created (or restored) by `owner`.
    pub fn running(spec: &crate::request::StreamSpec, owner: &str) -> Self {
        Self {
            model: spec.model,
            owner: owner.to_owned(),
            status: StreamStatus::Running,
            spec_json: spec.to_json(),
            tenant: spec.tenant.clone(),
        }
    }
}

/// A store failure (the backend is down or answered nonsense).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Nothing is known of this stream.
    #[error("unknown stream")]
    NotFound,
    /// The events after this seq are no longer kept.
    #[error("history after seq {0} expired")]
    Expired(u64),
    /// The backend failed.
    #[error("store backend: {0}")]
    Backend(String),
}

/// Stream metadata and history.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a new stream.
    async fn create(&self, id: &StreamId, meta: StreamMeta) -> Result<(), StoreError>;
    /// The stream's metadata.
    async fn meta(&self, id: &StreamId) -> Result<StreamMeta, StoreError>;
    /// Appends consecutive events (already-stored seqs are ignored) and updates the status.
    async fn append(&self, id: &StreamId, events: &[Arc<Event>]) -> Result<(), StoreError>;
    /// Events after `after`, in order.
    async fn read(&self, id: &StreamId, after: u64) -> Result<Vec<Arc<Event>>, StoreError>;
    /// Keeps the stream for `ttl` more, then forgets it.
    async fn expire(&self, id: &StreamId, ttl: Duration) -> Result<(), StoreError>;
    /// Takes (or renews) the owner lease of `id` for `ttl` when it is free or already
    /// `owner`'s; true when `owner` holds it afterwards.
    async fn acquire_lease(
        &self,
        id: &StreamId,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Who holds the lease now, if anyone.
    async fn lease_owner(&self, id: &StreamId) -> Result<Option<String>, StoreError>;
    /// Whether the backend answers (readiness).
    async fn healthy(&self) -> bool {
        true
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

    fn meta() -> StreamMeta {
        StreamMeta {
            model: "tokenfan-mock",
            owner: "edge-a".into(),
            status: StreamStatus::Running,
            spec_json: r#"{"spec":true}"#.into(),
            tenant: "tenant-a".into(),
        }
    }

    /// Runs every check against `store`.
    pub async fn run(store: &dyn Store) {
        let id = StreamId::random();
        assert!(matches!(store.meta(&id).await, Err(StoreError::NotFound)));
        assert!(matches!(
            store.read(&id, 0).await,
            Err(StoreError::NotFound)
        ));

        store.create(&id, meta()).await.expect("create");
        assert_eq!(store.meta(&id).await.expect("meta"), meta());
        assert!(store.read(&id, 0).await.expect("empty").is_empty());

        store
            .append(&id, &[token(1), token(2)])
            .await
            .expect("append");
        store
            .append(&id, &[token(2), token(3)])
            .await
            .expect("overlap");
        let seqs = |v: Vec<Arc<Event>>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(store.read(&id, 0).await.expect("read")), [1, 2, 3]);
        assert_eq!(seqs(store.read(&id, 2).await.expect("read")), [3]);
        assert!(store.read(&id, 3).await.expect("read").is_empty());

        let done = Arc::new(Event::new(
            4,
            EventKind::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
            },
        ));
        store.append(&id, &[done]).await.expect("terminal");
        assert_eq!(
            store.meta(&id).await.expect("meta").status,
            StreamStatus::Done
        );

        // Leases: one holder at a time, renewable by it, free again after the TTL.
        let ttl = Duration::from_millis(300);
        assert_eq!(store.lease_owner(&id).await.expect("owner"), None);
        assert!(
            store
                .acquire_lease(&id, "edge-a", ttl)
                .await
                .expect("lease")
        );
        assert!(
            !store
                .acquire_lease(&id, "edge-b", ttl)
                .await
                .expect("lease")
        );
        assert!(
            store
                .acquire_lease(&id, "edge-a", ttl)
                .await
                .expect("renew")
        );
        assert_eq!(
            store.lease_owner(&id).await.expect("owner").as_deref(),
            Some("edge-a")
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store.lease_owner(&id).await.expect("owner").is_some() {
            assert!(tokio::time::Instant::now() < deadline, "lease expires");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            store
                .acquire_lease(&id, "edge-b", ttl)
                .await
                .expect("take over")
        );

        store.expire(&id, Duration::ZERO).await.expect("expire");
        assert!(matches!(store.meta(&id).await, Err(StoreError::NotFound)));
    }
}
