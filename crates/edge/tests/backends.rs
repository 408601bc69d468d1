//! The backends against real servers: the in-memory, NATS and Redis implementations each pass
//! their trait's conformance suite, and the NATS bus, the Redis store and the Redis tenant
//! limiter keep their promises about framing, key layout, expiry, full feeds and restarts.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ::redis::AsyncCommands as _;
use bytes::Bytes;
use futures::StreamExt as _;
use tokenfan_edge::{
    bus::{Bus as _, memory::MemoryBus, nats::NatsBus, subjects},
    event::{Event, EventKind, FinishReason, Usage},
    ids::StreamId,
    limits::Limiter,
    store::{
        LeaseTerms, Store as _, StoreError,
        memory::MemoryStore,
        redis::{RedisStore, keys},
    },
    stream::StreamStatus,
};
use tokenfan_testkit::{
    conformance::{
        self,
        store::{meta, token},
    },
    servers::{NatsServer, RedisServer},
    wait::wait_until,
};
use tokio::sync::mpsc;

#[tokio::test]
async fn memory_bus_conforms() {
    conformance::bus::run(&MemoryBus::default()).await;
}

#[tokio::test]
async fn memory_store_conforms() {
    conformance::store::run(&MemoryStore::default()).await;
}

// ---------------------------------------------------------------------------------------------
// NATS bus

const WAIT: Duration = Duration::from_secs(10);

fn batch(seqs: std::ops::RangeInclusive<u64>) -> Arc<[Arc<Event>]> {
    seqs.map(|s| {
        Arc::new(Event::new(
            s,
            EventKind::Token {
                text: format!("t{s}"),
            },
        ))
    })
    .collect()
}

fn seqs(batch: &[Arc<Event>]) -> Vec<u64> {
    batch.iter().map(|e| e.seq).collect()
}

async fn recv<T>(rx: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("feed open")
}

async fn connect(server: &NatsServer) -> NatsBus {
    NatsBus::connect(&server.url(), "test")
        .await
        .expect("connects")
}

/// Waits until the server has processed everything `client` sent before: an empty message
/// echoed to itself through a fresh inbox (the server handles one connection's commands in
/// order).
async fn round_trip(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.expect("subscribe");
    client.publish(inbox, Bytes::new()).await.expect("publish");
    tokio::time::timeout(WAIT, echo.next())
        .await
        .expect("the echo in time")
        .expect("the echo");
}

#[tokio::test]
async fn nats_bus_conforms() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    assert!(bus.connected());
    conformance::bus::run(&bus).await;
}

#[tokio::test]
async fn seq_and_traceparent_headers_arrive() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let raw = async_nats::connect(server.url()).await.expect("raw client");
    let id = StreamId::random();
    let mut sub = raw
        .subscribe(subjects::stream_events(&id).expect("subject"))
        .await
        .expect("subscribe");
    round_trip(&raw).await;

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let events = batch(5..=7);
    bus.publish(&id, events.clone(), Some(tp.into()))
        .await
        .expect("publish");
    let message = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("in time")
        .expect("message");
    let headers = message.headers.as_ref().expect("headers");
    assert_eq!(
        headers
            .get(subjects::HEADER_TRACEPARENT)
            .map(|v| v.as_str()),
        Some(tp)
    );
    assert_eq!(
        headers.get(subjects::HEADER_FIRST_SEQ).map(|v| v.as_str()),
        Some("5")
    );
    assert_eq!(
        headers.get(subjects::HEADER_LAST_SEQ).map(|v| v.as_str()),
        Some("7")
    );
    let lines: Vec<&[u8]> = message.payload.split(|b| *b == b'\n').collect();
    let want: Vec<&[u8]> = events.iter().map(|e| e.json()).collect();
    assert_eq!(lines, want, "the native JSON of each event, one per line");

    bus.publish(&id, batch(8..=8), None).await.expect("publish");
    let message = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("in time")
        .expect("message");
    let headers = message.headers.as_ref().expect("headers");
    assert!(headers.get(subjects::HEADER_TRACEPARENT).is_none());
    assert_eq!(&message.payload[..], batch(8..=8)[0].json());

    bus.publish(&id, Vec::new().into(), Some(tp.into()))
        .await
        .expect("an empty batch is a no-op");
}

#[tokio::test]
async fn dropping_the_feed_ends_its_task_and_subscription() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let raw = async_nats::connect(server.url()).await.expect("raw client");
    let id = StreamId::random();
    let subject = subjects::stream_events(&id).expect("subject");

    let feed = bus.subscribe(&id).await.expect("subscribe");
    assert_eq!(bus.active_feeds(), 1);
    drop(feed);
    wait_until(WAIT, || async { (bus.active_feeds() == 0).then_some(()) }).await;
    // The UNSUB went out before the task ended: the server soon knows nobody subscribes.
    wait_until(WAIT * 3, || async {
        let err = raw
            .request(subject.clone(), Bytes::from_static(b"anyone?"))
            .await
            .err()?;
        (err.kind() == async_nats::client::RequestErrorKind::NoResponders).then_some(())
    })
    .await;
    bus.publish(&id, batch(1..=1), None)
        .await
        .expect("publishing to a stream nobody follows is fine");

    let cancels = bus.cancel_requests().await.expect("control");
    assert_eq!(bus.active_feeds(), 1);
    drop(cancels);
    wait_until(WAIT, || async { (bus.active_feeds() == 0).then_some(()) }).await;
}

#[tokio::test]
async fn a_full_feed_drops_new_batches_and_recovers() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let id = StreamId::random();
    let mut feed = bus.subscribe(&id).await.expect("subscribe");
    let capacity = feed.max_capacity();
    let total = capacity as u64 + 200;
    for seq in 1..=total {
        bus.publish(&id, batch(seq..=seq), None)
            .await
            .expect("publish");
    }
    wait_until(WAIT, || async { (feed.len() == capacity).then_some(()) }).await;
    for want in 1..=capacity as u64 {
        assert_eq!(
            seqs(&recv(&mut feed).await.events),
            [want],
            "the oldest batches kept"
        );
    }
    let sentinel = total + 1000;
    bus.publish(&id, batch(sentinel..=sentinel), None)
        .await
        .expect("publish");
    let mut last = capacity as u64;
    loop {
        let got = seqs(&recv(&mut feed).await.events);
        assert!(
            got[0] > last,
            "still in order after drops: {got:?} after {last}"
        );
        last = got[0];
        if last == sentinel {
            break;
        }
    }
}

#[tokio::test]
async fn control_subjects_carry_ids_and_ignore_garbage() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let raw = async_nats::connect(server.url()).await.expect("raw client");
    let mut cancels = bus.cancel_requests().await.expect("control");
    raw.publish(subjects::CANCEL, Bytes::from_static(b"../../etc"))
        .await
        .expect("publish");
    let id = StreamId::random();
    bus.request_cancel(&id).await.expect("cancel");
    assert_eq!(recv(&mut cancels).await, id);

    let mut touches = bus.touch_requests().await.expect("control");
    bus.request_touch(&id).await.expect("touch");
    assert_eq!(recv(&mut touches).await, id);
    assert!(cancels.try_recv().is_err(), "a touch is not a cancel");
    assert!(bus.healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_is_survived() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let old = StreamId::random();
    let mut old_feed = bus.subscribe(&old).await.expect("subscribe");
    let mut cancels = bus.cancel_requests().await.expect("control");

    let server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.restart();
        server
    })
    .await
    .expect("restarted");

    // A fresh subscribe + publish round trip works once the client is back on its own.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        assert!(
            Instant::now() < deadline,
            "no round trip within 20 s of the restart"
        );
        let id = StreamId::random();
        let round_trip = async {
            let mut feed = bus.subscribe(&id).await.ok()?;
            bus.publish(&id, batch(attempt..=attempt), None)
                .await
                .ok()?;
            tokio::time::timeout(Duration::from_millis(500), feed.recv())
                .await
                .ok()
                .flatten()
        };
        if let Some(got) = round_trip.await {
            assert_eq!(seqs(&got.events), [attempt]);
            break;
        }
        if !bus.connected() {
            wait_until(Duration::from_secs(20), || async {
                bus.connected().then_some(())
            })
            .await;
        }
    }

    // The old server process was killed (`kill -9`) before the new one started: the round trip
    // above went over a new connection. The subscriptions made before the restart were re-registered by the client.
    bus.publish(&old, batch(1..=2), None)
        .await
        .expect("publish");
    assert_eq!(seqs(&recv(&mut old_feed).await.events), [1, 2]);
    let target = StreamId::random();
    bus.request_cancel(&target).await.expect("cancel");
    assert_eq!(recv(&mut cancels).await, target);
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// Redis store

const TERMS: LeaseTerms = LeaseTerms {
    ttl: Duration::from_secs(3),
    keep: Duration::from_secs(600),
};

async fn raw(server: &RedisServer) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

#[tokio::test]
async fn redis_store_conforms() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    assert!(store.ping().await);
    conformance::store::run(&store).await;
}

#[tokio::test]
async fn keys_share_one_slot_and_always_expire() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let id = StreamId::random();
    let tag = format!("{{{id}}}");
    for key in [
        keys::meta(&id),
        keys::events(&id),
        keys::batches(&id),
        keys::lease(&id),
    ] {
        assert!(key.starts_with("tokenfan:"), "{key}");
        assert_eq!(key.find('{'), key.find(&tag), "{key}: one hash tag");
    }

    assert!(store.create(&id, meta(), TERMS).await.expect("create"));
    store
        .append(&id, 1, &[token(1), token(2)])
        .await
        .expect("append");
    assert!(!store.renew(&id, "edge-a", 1, TERMS).await.expect("renew"));
    let mut conn = raw(&server).await;
    let keys = [
        keys::meta(&id),
        keys::events(&id),
        keys::batches(&id),
        keys::lease(&id),
    ];
    for key in &keys {
        let ttl: i64 = conn.pttl(key).await.expect("pttl");
        let limit = if *key == keys::lease(&id) {
            TERMS.ttl
        } else {
            TERMS.keep
        };
        assert!(
            ttl > 0 && ttl <= i64::try_from(limit.as_millis()).expect("ms"),
            "{key}: ttl {ttl}"
        );
    }

    store
        .expire(&id, Duration::from_secs(60))
        .await
        .expect("expire");
    for key in [keys::meta(&id), keys::events(&id), keys::batches(&id)] {
        let ttl: i64 = conn.pttl(&key).await.expect("pttl");
        assert!(ttl > 0 && ttl <= 60_000, "{key}: ttl {ttl}");
    }
    assert_eq!(store.lease_owner(&id).await.expect("owner"), None);
    assert!(matches!(
        store.expire(&StreamId::random(), Duration::ZERO).await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn append_skips_duplicates_and_gaps_and_records_terminal_status() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let id = StreamId::random();
    assert!(matches!(
        store.append(&id, 1, &[token(1)]).await,
        Err(StoreError::NotFound)
    ));
    store.create(&id, meta(), TERMS).await.expect("create");
    store
        .append(&id, 1, &[token(1), token(3)])
        .await
        .expect("gap");
    store
        .append(&id, 1, &[token(1), token(2), token(3)])
        .await
        .expect("dup");
    let cancelled = Arc::new(Event::new(
        4,
        EventKind::Done {
            finish_reason: FinishReason::Cancelled,
            usage: Usage::default(),
        },
    ));
    store
        .append(&id, 1, std::slice::from_ref(&cancelled))
        .await
        .expect("end");
    let got = store.read(&id, 0).await.expect("read");
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(got[3].json(), cancelled.json());
    assert_eq!(
        store.meta(&id).await.expect("meta").status,
        StreamStatus::Cancelled
    );
    assert!(store.read(&id, 10).await.expect("ahead").is_empty());
}

#[tokio::test]
async fn lost_history_is_expired_not_a_partial_replay() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let id = StreamId::random();
    store.create(&id, meta(), TERMS).await.expect("create");
    store
        .append(&id, 1, &[token(1), token(2), token(3)])
        .await
        .expect("append");
    // Redis evicting (or losing) the list while the meta hash survives.
    let mut conn = raw(&server).await;
    let _: () = conn.del(keys::events(&id)).await.expect("del");
    assert!(matches!(
        store.read(&id, 1).await,
        Err(StoreError::Expired(1))
    ));
    assert!(store.read(&id, 3).await.expect("at the end").is_empty());

    let _: () = conn
        .rpush(keys::events(&id), "not json")
        .await
        .expect("rpush");
    let _: () = conn.hset(keys::meta(&id), "len", 1).await.expect("hset");
    assert!(matches!(
        store.read(&id, 0).await,
        Err(StoreError::Backend(_))
    ));
    let _: () = conn
        .hset(keys::meta(&id), "model", "gpt-nope")
        .await
        .expect("hset");
    assert!(matches!(store.meta(&id).await, Err(StoreError::Backend(_))));
}

#[tokio::test]
async fn survives_a_redis_restart() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let old = StreamId::random();
    store.create(&old, meta(), TERMS).await.expect("create");
    store.append(&old, 1, &[token(1)]).await.expect("append");

    server.process.kill();
    assert!(matches!(
        store.meta(&old).await,
        Err(StoreError::Backend(_))
    ));
    assert!(!store.ping().await);

    server.restart();
    // The first call after the outage may still fail while the manager reconnects.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.meta(&old).await {
            Err(StoreError::NotFound) => break,
            Err(StoreError::Backend(_)) => {}
            other => panic!("the restarted Redis is empty, got {other:?}"),
        }
        assert!(Instant::now() < deadline, "the store reconnects");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.ping().await);

    let new = StreamId::random();
    store
        .create(&new, meta(), TERMS)
        .await
        .expect("create after restart");
    store
        .append(&new, 1, &[token(1), token(2)])
        .await
        .expect("append after restart");
    assert_eq!(store.read(&new, 1).await.expect("read")[0].seq, 2);
}

// ---------------------------------------------------------------------------------------------
// Redis tenant limiter

#[tokio::test]
async fn redis_script_enforces_both_limits_atomically_and_entries_lapse() {
    let server = RedisServer::start();
    let lease = Duration::from_millis(400);
    let limiter = Limiter::redis(&server.url(), 0.0, 1, 2, lease)
        .await
        .expect("connect");
    let ids: Vec<StreamId> = (0..3).map(|_| StreamId::random()).collect();
    limiter.admit("t", &ids[0]).await.expect("1");
    limiter.admit("t", &ids[1]).await.expect("2");
    let refused = limiter.admit("t", &ids[2]).await.expect_err("full");
    assert_eq!(
        (refused.code(), refused.retry_after()),
        ("concurrency_limited", Some(1))
    );
    limiter
        .admit("other", &ids[2])
        .await
        .expect("tenants are separate");
    limiter.release("t", &ids[0]).await;
    limiter.admit("t", &ids[2]).await.expect("released");
    // Nobody renews: every entry lapses after the lease (a crashed replica's streams).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while limiter.admit("t", &StreamId::random()).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "entries lapse");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let rated = Limiter::redis(&server.url(), 1.0, 2, 0, lease)
        .await
        .expect("connect");
    rated.admit("r", &StreamId::random()).await.expect("1");
    rated.admit("r", &StreamId::random()).await.expect("2");
    let refused = rated
        .admit("r", &StreamId::random())
        .await
        .expect_err("empty");
    assert_eq!(
        (refused.code(), refused.retry_after()),
        ("rate_limited", Some(1))
    );
    let mut conn = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys::tenant_bucket("r"))
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(
        ttl > 0 && ttl <= 3000,
        "the bucket expires once full again: {ttl}"
    );
}
