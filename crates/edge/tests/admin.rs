//! The admin listener: `/metrics` and `/readyz` live there and not on the public port, and
//! readiness means "can serve a stream": one generator of two failing does not pull the edge.

mod common;

use std::time::Duration;

use common::Generator;
use serde_json::Value;
use tokenfan_testkit::{
    edge::{TestEdge, fast},
    wait::wait_until,
};

#[tokio::test]
async fn one_failed_generator_of_two_leaves_the_edge_ready_and_none_does_not() {
    let mut generator = Generator::start();
    // A second generator that is not there at all.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let url = generator.url();
    let edge = TestEdge::with(move |c| c.generator = vec![url, dead]).await;
    let ready: Value = wait_until(Duration::from_secs(20), || async {
        let r = edge.http.get(edge.admin_url("/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(r.json().await.ok()?)
    })
    .await;
    assert_eq!(ready["checks"]["generators_serving"], 1, "{ready}");
    assert_eq!(ready["checks"]["generators"], 2, "{ready}");
    // Streams are served (the pool moves past the dead generator).
    let id = edge.create(fast("still serving", 5, 1)).await;
    let events = edge.wait_finished(&id).await;
    assert_eq!(events.last().expect("terminal")["type"], "done");

    generator.kill();
    let down: Value = wait_until(Duration::from_secs(20), || async {
        let r = edge.http.get(edge.admin_url("/readyz")).send().await.ok()?;
        (r.status() == 503).then_some(r.json().await.ok()?)
    })
    .await;
    assert_eq!(down["checks"]["generator"], "down", "{down}");
}

#[tokio::test]
async fn the_admin_listener_serves_only_the_operational_endpoints() {
    let edge = TestEdge::start().await;
    assert_ne!(edge.running.admin_addr.port(), edge.addr.port());
    let metrics = edge.metrics().await;
    assert!(metrics.contains("# TYPE"), "{metrics}");
    // The operational endpoints on the admin listener only; the API on the public port only.
    for (url, status) in [
        (edge.admin_url("/healthz"), 200),
        (edge.admin_url("/metrics"), 200),
        (edge.admin_url("/v1/models"), 404),
        (edge.admin_url("/"), 404),
        (edge.url("/metrics"), 404),
        (edge.url("/readyz"), 404),
    ] {
        let r = edge.http.get(&url).send().await.expect("GET");
        assert_eq!(r.status(), status, "{url}");
    }
}

#[test]
fn the_default_replica_id_is_the_host_name() {
    let config = tokenfan_edge::EdgeConfig::defaults();
    let addr = "127.0.0.1:8080".parse().expect("addr");
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    let id = tokenfan_edge::replica_id(&config, addr);
    match host {
        Some(host) => assert_eq!(id, host),
        None => assert_eq!(id, "edge-8080"),
    }
    let mut named = config;
    named.replica_id = Some("edge-a".into());
    assert_eq!(tokenfan_edge::replica_id(&named, addr), "edge-a");
}
