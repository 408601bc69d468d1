//! A Redis Cluster (3 masters, a replica each) as the store: the conformance suite, streams
//! spread over every master, the tenant limiter's scripts on the cluster, and edges that
//! resume a stream on another replica while the master holding it is killed and its replica
//! takes over.

mod common;

use std::time::Duration;

use common::{EdgeOptions, Generator};
use serde_json::Value;
use tokenfan_edge::{
    ids::StreamId,
    limits::Limiter,
    store::{LeaseTerms, Store as _, redis::RedisStore, redis::keys},
};
use tokenfan_testkit::{
    conformance::{
        self,
        store::{meta, token},
    },
    edge::{expected_text, slow, try_get_json},
    servers::{NatsServer, RedisCluster, redis_cli},
    sse::{assert_contiguous, read_sse, stream_events, text_of},
    tls::TlsDir,
    wait::wait_until,
};

const TERMS: LeaseTerms = LeaseTerms {
    ttl: Duration::from_secs(3),
    keep: Duration::from_secs(600),
};

#[tokio::test]
async fn the_store_conforms_on_a_redis_cluster_and_spreads_streams_over_every_master() {
    let cluster = RedisCluster::start(3, 1);
    let store = RedisStore::connect(&cluster.url())
        .await
        .expect("cluster connect");
    assert!(store.healthy().await);
    conformance::store::run(&store).await;

    // Streams land on every master (their ids are random, so their hash tags are too).
    let mut masters = std::collections::HashSet::new();
    for _ in 0..30 {
        let id = StreamId::random();
        store.create(&id, meta(), TERMS).await.expect("create");
        masters.insert(cluster.master_of(&keys::meta(&id)));
    }
    assert_eq!(masters.len(), 3, "30 streams over 3 masters");
    for m in &masters {
        assert!(cluster.keys_on(*m) > 0, "master {m} holds keys");
    }

    // The tenant limiter's script keeps to one slot per tenant, whatever the tenant.
    let limiter = Limiter::redis(&cluster.url(), 0.0, 1, 1, Duration::from_secs(30))
        .await
        .expect("limiter");
    for tenant in ["a", "b", "tenant-with-{braces}", "ü"] {
        let id = StreamId::random();
        limiter.admit(tenant, &id).await.expect("first admitted");
        assert!(
            limiter.admit(tenant, &StreamId::random()).await.is_err(),
            "{tenant}: the second is over the limit"
        );
        limiter.release(tenant, &id).await;
    }
}

#[tokio::test]
async fn the_store_survives_a_master_failover() {
    let mut cluster = RedisCluster::start(3, 1);
    let store = RedisStore::connect(&cluster.url()).await.expect("connect");
    let id = StreamId::random();
    store.create(&id, meta(), TERMS).await.expect("create");
    store
        .append(&id, 1, &[token(1), token(2)])
        .await
        .expect("append");
    // Let the replica catch up before its master dies (replication is asynchronous: a write
    // acknowledged just before the crash can be lost; see docs/operations.md).
    let master = cluster.master_of(&keys::meta(&id));
    let port = cluster.nodes[master].addr.port().to_string();
    let _ = redis_cli(&["-p", &port, "wait", "1", "2000"]);

    // A second connection that will not touch the cluster until after the failover: its slot
    // map is stale then.
    let idle = RedisStore::connect(&cluster.url()).await.expect("connect");
    cluster.fail_master_of(&keys::meta(&id));
    // The client learns the new master (MOVED / a refreshed slot map) and carries on.
    let events = wait_until(Duration::from_secs(20), || async {
        store.read(&id, 0).await.ok()
    })
    .await;
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    store
        .append(&id, 1, &[token(3)])
        .await
        .expect("append after");
    assert_eq!(store.read(&id, 2).await.expect("read")[0].seq, 3);

    // A connection whose slot map is stale: the create lands on the moved slot all the same.
    let promoted = cluster.master_of(&keys::meta(&id));
    let moved = std::iter::repeat_with(StreamId::random)
        .find(|other| cluster.master_of(&keys::meta(other)) == promoted)
        .expect("an id on the promoted master");
    idle.create(&moved, meta(), TERMS)
        .await
        .expect("create on a slot that moved");
    idle.append(&moved, 1, &[token(1)]).await.expect("append");
    assert_eq!(idle.read(&moved, 0).await.expect("read").len(), 1);
}

#[tokio::test]
async fn edges_resume_across_replicas_while_a_redis_master_fails_over() {
    let mut redis = RedisCluster::start(3, 1);
    let nats = NatsServer::start();
    let generator = Generator::start();
    // The owner lease must outlive the failover (node timeout 1 s, then an election): an
    // owner waiting for Redis keeps its streams instead of a follower taking them over.
    let options = EdgeOptions {
        args: vec!["--lease-ttl-ms".into(), "10000".into()],
        ..EdgeOptions::default()
    };
    let edges = [0, 1].map(|i| {
        common::spawn_edge(
            &format!("edge-{i}"),
            &nats.url(),
            &redis.url(),
            &generator.url(),
            &options,
        )
    });
    let http = reqwest::Client::new();
    for edge in &edges {
        edge.wait_ready(&http).await;
    }

    let id = edges[0].create(&http, slow("redis cluster", 150, 25)).await;
    let short_poll = |edge: usize, after: u64| {
        let url = edges[edge].url(&format!("/v1/streams/{id}?after={after}"));
        let http = http.clone();
        async move { try_get_json(&http, &url).await }
    };
    // A prefix read on the owner, then resumed on the other replica from where it stopped.
    let prefix = wait_until(Duration::from_secs(20), || async {
        let v = short_poll(0, 0).await?;
        let events = v["events"].as_array()?.clone();
        (events.len() >= 10).then_some(events)
    })
    .await;
    let after = prefix.last().expect("prefix")["seq"].as_u64().expect("seq");
    let follow = tokio::spawn({
        let url = edges[1].url(&format!("/v1/streams/{id}/events?after={after}"));
        let http = http.clone();
        async move { read_sse(http.get(url).send().await.expect("GET")).await }
    });
    wait_until(Duration::from_secs(20), || async {
        let v = short_poll(1, 0).await?;
        (v["next_after"].as_u64()? >= after + 5).then_some(())
    })
    .await;

    // The master holding this stream dies mid-stream; its replica takes over.
    let parsed = StreamId::parse(&id).expect("stream id");
    let killed = redis.fail_master_of(&keys::meta(&parsed));
    assert_ne!(redis.master_of(&keys::meta(&parsed)), killed);

    let (events, _) = tokio::time::timeout(Duration::from_secs(60), follow)
        .await
        .expect("the stream ends")
        .expect("reader");
    let mut all = prefix.clone();
    all.extend(stream_events(&events));
    assert_contiguous(&all, 1);
    assert_eq!(all.last().expect("events")["type"], "done");
    assert_eq!(text_of(&all), expected_text("redis cluster", 11, 150));
    // The history written across the failover reads back whole from the new master.
    let stored = short_poll(0, 0).await.expect("short poll");
    let stored = stored["events"].as_array().expect("events").clone();
    assert_contiguous(&stored, 1);
    assert_eq!(text_of(&stored), expected_text("redis cluster", 11, 150));
    let fresh = common::spawn_edge(
        "edge-late",
        &nats.url(),
        &redis.url(),
        &generator.url(),
        &options,
    );
    let from_store = wait_until(Duration::from_secs(20), || async {
        let v: Value =
            try_get_json(&http, &fresh.url(&format!("/v1/streams/{id}?after=0"))).await?;
        v["events"].as_array().cloned()
    })
    .await;
    assert_contiguous(&from_store, 1);
    assert_eq!(
        text_of(&from_store),
        expected_text("redis cluster", 11, 150)
    );

    // A new stream after the failover works end to end, resumed on the other replica.
    let id2 = edges[1].create(&http, slow("after failover", 20, 5)).await;
    let done = wait_until(Duration::from_secs(20), || async {
        let v: Value =
            try_get_json(&http, &edges[0].url(&format!("/v1/streams/{id2}?after=0"))).await?;
        (v["status"] == "done").then(|| v["events"].as_array().cloned().unwrap_or_default())
    })
    .await;
    assert_contiguous(&done, 1);
    assert_eq!(text_of(&done), expected_text("after failover", 11, 20));
}

#[tokio::test]
async fn the_store_conforms_on_a_tls_redis_cluster() {
    let tls = TlsDir::new();
    let cluster = RedisCluster::start_tls(3, 0, &tls.files);
    let args = tokenfan_edge::redis_conn::RedisArgs {
        redis_ca_file: Some(tls.files.ca.clone()),
        ..Default::default()
    };
    assert!(cluster.url().starts_with("rediss+cluster://"));
    let store = RedisStore::connect_with(&cluster.url(), &args)
        .await
        .expect("TLS cluster connect");
    assert!(store.healthy().await);
    conformance::store::run(&store).await;
    // Plain text to a TLS-only cluster fails at start-up.
    let plain = cluster.url().replacen("rediss+", "redis+", 1);
    assert!(RedisStore::connect(&plain).await.is_err());
}
