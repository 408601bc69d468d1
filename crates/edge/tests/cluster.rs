//! Any replica serves any stream: resume across replicas on every transport, cancel across
//! replicas, and failover when an owner edge or a generator dies — each checked for the
//! complete text, exactly once, in order.

mod common;

use std::time::Duration;

use common::TestCluster;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokenfan_testkit::{
    edge::{expected_text, long_poll_all, slow},
    sse::{SseEvent, SseParser, assert_contiguous, read_sse, stream_events, text_of},
    wait::wait_until,
};
use tokio_tungstenite::tungstenite::Message;

/// Checks a delivered stream against the reference: complete, exactly once, in order.
fn assert_complete(events: &[Value], prompt: &str, max_tokens: usize) {
    assert_contiguous(events, 1);
    let last = events
        .last()
        .unwrap_or_else(|| panic!("no events for {prompt:?}"));
    assert_eq!(last["type"], "done", "{last}");
    assert_ne!(last["finish_reason"], "cancelled", "{last}");
    assert_eq!(text_of(events), expected_text(prompt, 11, max_tokens));
}

/// Reads SSE from `edge` after `after` until the end of the response.
async fn sse_from(cluster: &TestCluster, edge: usize, id: &str, after: u64) -> Vec<Value> {
    let r = cluster
        .http
        .get(cluster.edge(edge).url(&format!("/v1/streams/{id}/events")))
        .header("last-event-id", after.to_string())
        .send()
        .await
        .expect("GET");
    if r.status() == 204 {
        return Vec::new();
    }
    let (events, _) = read_sse(r).await;
    stream_events(&events)
}

/// Reads SSE events from `r` until `n` of them carry an `id:`, then drops the connection (a
/// client that goes away mid-stream). Returns every event read, ids or not.
async fn read_prefix(r: reqwest::Response, n: usize) -> Vec<SseEvent> {
    assert_eq!(r.status(), 200);
    let mut parser = SseParser::default();
    let mut body = r.bytes_stream();
    let mut events = Vec::new();
    while events.iter().filter(|e: &&SseEvent| e.id.is_some()).count() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(15), body.next())
            .await
            .expect("in time")
            .expect("more")
            .expect("chunk");
        let text = String::from_utf8(chunk.to_vec()).expect("utf-8 frames");
        events.extend(parser.feed(&text));
    }
    events
}

#[tokio::test]
async fn a_stream_started_on_one_replica_resumes_on_every_other_and_every_transport() {
    let cluster = TestCluster::start(3, 2).await;
    let id = cluster.create(0, slow("cluster", 60, 15)).await;

    // Read a prefix live on replica 0.
    let r = cluster
        .http
        .get(cluster.edge(0).url(&format!("/v1/streams/{id}/events")))
        .send()
        .await
        .expect("GET");
    let prefix = stream_events(&read_prefix(r, 10).await);
    let last = prefix.last().expect("prefix")["seq"].as_u64().expect("seq");

    // SSE resume on replica 1 with Last-Event-ID.
    let mut sse = prefix.clone();
    sse.extend(sse_from(&cluster, 1, &id, last).await);
    assert_contiguous(&sse, 1);
    assert_eq!(sse.last().expect("end")["type"], "done");

    // Long-poll on replica 2 from the same point.
    let mut polled = prefix.clone();
    let base = cluster.edge(2).url("");
    polled.extend(long_poll_all(&cluster.http, &base, &id, last).await);
    assert_contiguous(&polled, 1);

    // WebSocket subscribe on replica 1, short-poll on replica 2.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", cluster.edge(1).addr))
            .await
            .expect("ws");
    ws.send(Message::text(
        json!({"type": "subscribe", "stream_id": id, "after": last}).to_string(),
    ))
    .await
    .expect("send");
    let mut over_ws = prefix.clone();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("message");
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["stream_id"], id.as_str());
        let done = v["type"] != "token";
        over_ws.push(v);
        if done {
            break;
        }
    }
    assert_contiguous(&over_ws, 1);
    let short = cluster.finished(2, &id).await;
    assert_contiguous(&short, 1);

    for (name, events) in [
        ("sse", &sse),
        ("longpoll", &polled),
        ("ws", &over_ws),
        ("shortpoll", &short),
    ] {
        assert_eq!(text_of(events), expected_text("cluster", 11, 60), "{name}");
    }
}

#[tokio::test]
async fn post_sse_and_openai_streams_resume_on_another_replica() {
    let cluster = TestCluster::start(2, 1).await;

    // Native POST-SSE on replica 0, cut after 8 events, resumed on replica 1 with Last-Event-ID.
    let r = cluster
        .http
        .post(cluster.edge(0).url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&slow("post sse resume", 50, 15))
        .send()
        .await
        .expect("POST");
    let id = r.headers()["x-stream-id"].to_str().expect("id").to_string();
    let mut native = stream_events(&read_prefix(r, 8).await);
    let last = native.last().expect("prefix")["seq"].as_u64().expect("seq");
    native.extend(sse_from(&cluster, 1, &id, last).await);
    assert_complete(&native, "post sse resume", 50);

    // OpenAI chunks on replica 0, cut after 8 content chunks, resumed on replica 1 as
    // `?format=openai` with the last chunk's id: the content joins up exactly once and the
    // resumed part ends with the finish chunk and [DONE].
    let r = cluster
        .http
        .post(cluster.edge(0).url("/v1/chat/completions"))
        .json(&json!({
            "model": "tokenfan-mock",
            "messages": [{"role": "user", "content": "openai resume"}],
            "stream": true,
            "max_tokens": 50,
            "seed": 11,
            "timing": {"ttft_ms": 5, "inter_token_ms": 15, "jitter_ms": 0}
        }))
        .send()
        .await
        .expect("POST");
    let id = r.headers()["x-stream-id"].to_str().expect("id").to_string();
    let prefix = read_prefix(r, 8).await;
    let last_id = prefix
        .iter()
        .filter_map(|e| e.id.clone())
        .next_back()
        .expect("an id");
    let r = cluster
        .http
        .get(
            cluster
                .edge(1)
                .url(&format!("/v1/streams/{id}/events?format=openai")),
        )
        .header("last-event-id", &last_id)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    let (rest, _) = read_sse(r).await;
    assert_eq!(rest.last().expect("last").data, "[DONE]");
    let chunks: Vec<Value> = prefix
        .iter()
        .chain(&rest)
        .filter(|e| !e.data.is_empty() && e.data != "[DONE]")
        .map(|e| e.json())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, expected_text("openai resume", 11, 50));
    let ids: Vec<u64> = prefix
        .iter()
        .chain(&rest)
        .filter_map(|e| e.id.as_deref())
        .map(|i| i.parse().expect("numeric id"))
        .collect();
    // The role chunk carries id 0, each content chunk its seq, the ending the terminal seq.
    assert_eq!(
        ids,
        (0..=51).collect::<Vec<u64>>(),
        "every id once, in order"
    );
    assert_eq!(
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
            .collect::<Vec<_>>(),
        ["length"]
    );
}

#[tokio::test]
async fn a_stop_sent_to_a_replica_that_does_not_own_the_stream_stops_it() {
    let cluster = TestCluster::start(2, 1).await;
    let id = cluster.create(0, slow("stop elsewhere", 1000, 20)).await;
    wait_until(Duration::from_secs(10), || async {
        (cluster.generator_active() == 1).then_some(())
    })
    .await;
    let r = cluster
        .http
        .delete(cluster.edge(1).url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.json::<Value>().await.expect("json")["status"],
        "cancelled"
    );
    wait_until(Duration::from_secs(10), || async {
        (cluster.generator_active() == 0).then_some(())
    })
    .await;
    for edge in 0..2 {
        let events = cluster.finished(edge, &id).await;
        assert_contiguous(&events, 1);
        assert_eq!(events.last().expect("end")["finish_reason"], "cancelled");
    }
}

#[tokio::test]
async fn killing_the_owner_mid_stream_loses_nothing() {
    let mut cluster = TestCluster::start(3, 1).await;
    let id = cluster.create(0, slow("failover", 150, 20)).await;
    // A reader on replica 1 (a mirror), live through the failover.
    let reader = {
        let r = cluster
            .http
            .get(cluster.edge(1).url(&format!("/v1/streams/{id}/events")))
            .send()
            .await
            .expect("GET");
        tokio::spawn(read_sse(r))
    };
    wait_until(Duration::from_secs(10), || async {
        let v = cluster.short_poll(2, &id, 0).await;
        (v["next_after"].as_u64() >= Some(20)).then_some(())
    })
    .await;
    cluster.edges[0].kill();

    let (events, _) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reader finishes")
        .expect("reader task");
    let live: Vec<Value> = stream_events(&events);
    assert_complete(&live, "failover", 150);

    // A client that reconnects on the third replica gets the same answer.
    let again = cluster.finished(2, &id).await;
    assert_complete(&again, "failover", 150);
}

#[tokio::test]
async fn killing_a_generator_mid_stream_continues_on_another() {
    let mut cluster = TestCluster::start(1, 2).await;
    let id = cluster.create(0, slow("generator failover", 120, 20)).await;
    let reader = {
        let r = cluster
            .http
            .get(cluster.edge(0).url(&format!("/v1/streams/{id}/events")))
            .send()
            .await
            .expect("GET");
        tokio::spawn(read_sse(r))
    };
    let busy = wait_until(Duration::from_secs(10), || async {
        let v = cluster.short_poll(0, &id, 0).await;
        let started = v["next_after"].as_u64() >= Some(10);
        let busy = cluster
            .generators
            .iter()
            .position(|g| g.stats.active() == 1);
        busy.filter(|_| started)
    })
    .await;
    cluster.generators[busy].kill();
    let (events, _) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reader finishes")
        .expect("reader task");
    let live: Vec<Value> = stream_events(&events);
    assert_complete(&live, "generator failover", 120);
}

/// Starts a stream on replica 0 and a live SSE reader on replica `reader_on`.
async fn stream_with_reader(
    cluster: &TestCluster,
    prompt: &str,
    max_tokens: u32,
    reader_on: usize,
) -> (String, tokio::task::JoinHandle<(Vec<SseEvent>, usize)>) {
    let id = cluster.create(0, slow(prompt, max_tokens, 20)).await;
    let r = cluster
        .http
        .get(
            cluster
                .edge(reader_on)
                .url(&format!("/v1/streams/{id}/events")),
        )
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    (id, tokio::spawn(read_sse(r)))
}

async fn collect(reader: tokio::task::JoinHandle<(Vec<SseEvent>, usize)>) -> Vec<Value> {
    let (events, _) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reader finishes")
        .expect("reader task");
    stream_events(&events)
}

#[tokio::test]
async fn a_nats_restart_mid_stream_is_refilled_from_redis() {
    let mut cluster = TestCluster::start(2, 1).await;
    let (id, reader) = stream_with_reader(&cluster, "nats restart", 150, 1).await;
    wait_until(Duration::from_secs(10), || async {
        let v = cluster.short_poll(1, &id, 0).await;
        (v["next_after"].as_u64() >= Some(15)).then_some(())
    })
    .await;
    cluster.nats.restart();
    assert_complete(&collect(reader).await, "nats restart", 150);
    // Live delivery works again for a new stream watched on the other replica.
    let (_, reader) = stream_with_reader(&cluster, "after nats restart", 30, 1).await;
    assert_complete(&collect(reader).await, "after nats restart", 30);
}

#[tokio::test]
async fn a_redis_restart_mid_stream_keeps_live_streams_going_and_history_whole() {
    let mut cluster = TestCluster::start(3, 1).await;
    let (id, reader) = stream_with_reader(&cluster, "redis restart", 150, 1).await;
    wait_until(Duration::from_secs(10), || async {
        let v = cluster.short_poll(1, &id, 0).await;
        (v["next_after"].as_u64() >= Some(15)).then_some(())
    })
    .await;
    cluster.redis.restart();
    assert_complete(&collect(reader).await, "redis restart", 150);
    // The owner wrote the lost history back: a replica that never saw the stream resumes it
    // from the start, whole.
    let events = cluster.finished(2, &id).await;
    assert_complete(&events, "redis restart", 150);
    // Readiness reflects a dead Redis.
    cluster.redis.process.kill();
    wait_until(Duration::from_secs(15), || async {
        let r = cluster
            .http
            .get(cluster.edge(2).admin_url("/readyz"))
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        (v["checks"]["store"] == "down").then_some(())
    })
    .await;
}
