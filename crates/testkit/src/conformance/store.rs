//! The behaviour every [`Store`] must have; run against each implementation.

use std::{sync::Arc, time::Duration};

use tokenfan_edge::{
    event::{Event, EventKind, FinishReason, Usage},
    ids::StreamId,
    store::{Claim, LeaseTerms, Store, StoreError, StreamMeta},
    stream::StreamStatus,
};

/// Token event `seq`, with the text `t<seq>`.
pub fn token(seq: u64) -> Arc<Event> {
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

/// The metadata of a running stream owned by `edge-a`, tenant `tenant-a`, at epoch 1.
pub fn meta() -> StreamMeta {
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

/// The recorded batches of `id`: (epoch, first seq, last seq) each.
async fn batches(store: &dyn Store, id: &StreamId) -> Vec<(u64, u64, u64)> {
    let batches = store.batches(id).await.expect("batches");
    batches.iter().map(|b| (b.epoch, b.first, b.last)).collect()
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
    assert_eq!(batches(store, &id).await, [(1, 1, 2), (1, 3, 3), (1, 4, 4)]);

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
    let epochs: Vec<u64> = batches(store, &id).await.iter().map(|b| b.0).collect();
    assert_eq!(epochs, [1, 2, 2]);
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
