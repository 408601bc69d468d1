//! Exactly once under faults that are not crashes: an owner paused past its lease (and woken
//! up), a stop issued while the owner is paused, a Redis restored from an older snapshot, a
//! generator that stalls — each a test of its own — and a randomized soak that mixes them with
//! `kill -9`s while clients read through resumes, checked by one checker over every
//! transcript and the stored history (`FAULT_SOAK_SECS`, default 40; `make soak` runs it
//! longer).

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{EdgeOptions, TestCluster};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokenfan_edge::{
    ids::StreamId,
    store::{Store as _, StreamMeta, redis::RedisStore},
    stream::StreamStatus,
};
use tokenfan_testkit::{
    edge::{expected_text, slow},
    sse::{SseParser, assert_contiguous, text_of},
    wait::wait_until,
};
use tokio::time::Instant;

/// The current base URLs of the edges (they change when one restarts).
type Edges = Arc<Mutex<Vec<String>>>;

fn bases(cluster: &TestCluster) -> Vec<String> {
    cluster.edges.iter().map(|e| e.url("")).collect()
}

fn pick(edges: &Edges, n: usize) -> String {
    let edges = edges.lock().unwrap_or_else(|e| e.into_inner());
    edges[n % edges.len()].clone()
}

/// What one client saw of one stream.
#[derive(Debug, Default, Clone)]
struct Transcript {
    events: Vec<Value>,
    /// Connections it opened after the first (resumes with `Last-Event-ID`).
    resumes: u32,
    /// Why it gave up, if it did before the terminal event.
    gave_up: Option<String>,
}

impl Transcript {
    fn last_seq(&self) -> u64 {
        self.events
            .last()
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or(0)
    }

    fn ended(&self) -> bool {
        self.events.last().is_some_and(|e| e["type"] != "token")
    }
}

/// Reads `id` like an EventSource: from the start, and after a dropped connection or one
/// silent for `stall`, again with `Last-Event-ID` on the next edge, until the terminal event
/// or `deadline`.
async fn read_stream(
    http: reqwest::Client,
    edges: Edges,
    id: String,
    first_edge: usize,
    stall: Duration,
    deadline: Instant,
    progress: Option<Arc<Mutex<Transcript>>>,
) -> Transcript {
    let mut t = Transcript::default();
    let mut turn = first_edge;
    let mut connections = 0u32;
    while !t.ended() {
        if Instant::now() >= deadline {
            t.gave_up = Some(format!(
                "no terminal event by the deadline (seq {})",
                t.last_seq()
            ));
            break;
        }
        connections += 1;
        let base = pick(&edges, turn);
        turn += 1;
        let request = http
            .get(format!("{base}/v1/streams/{id}/events"))
            .header("last-event-id", t.last_seq().to_string())
            .send();
        let response = match tokio::time::timeout(stall, request).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) | Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match response.status().as_u16() {
            200 => {}
            // Retry elsewhere: a replica that cannot reach the store or the owner right now.
            503 | 502 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            status => {
                t.gave_up = Some(format!("GET events answered {status}"));
                break;
            }
        }
        let mut parser = SseParser::default();
        let mut body = response.bytes_stream();
        let mut pending = Vec::new();
        loop {
            let chunk = match tokio::time::timeout(stall, body.next()).await {
                Ok(Some(Ok(chunk))) => chunk,
                // Dropped, ended or silent: resume elsewhere.
                _ => break,
            };
            pending.extend_from_slice(&chunk);
            let valid = match std::str::from_utf8(&pending) {
                Ok(_) => pending.len(),
                Err(e) => e.valid_up_to(),
            };
            let text = String::from_utf8(pending.drain(..valid).collect()).unwrap_or_default();
            for event in parser.feed(&text) {
                if event.id.is_some() {
                    t.events.push(event.json());
                }
            }
            if let Some(progress) = &progress {
                *progress.lock().unwrap_or_else(|e| e.into_inner()) = t.clone();
            }
            if t.ended() {
                break;
            }
        }
    }
    t.resumes = connections.saturating_sub(1);
    t
}

/// A stream's checks: every transcript contiguous from seq 1 with at most one terminal event,
/// last; all transcripts agree seq by seq; the text is the generator's answer (whole when it
/// finished, a prefix when stopped); the stored history equals what the clients saw, written
/// by non-decreasing epochs in contiguous batches. Returns the violations found.
async fn check_stream(
    store: &RedisStore,
    id: &str,
    prompt: &str,
    seed: u64,
    max_tokens: usize,
    transcripts: &[Transcript],
) -> Vec<String> {
    let mut violations = Vec::new();
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    for (i, t) in transcripts.iter().enumerate() {
        if let Some(why) = &t.gave_up {
            violations.push(format!("{id} reader {i}: {why}"));
        }
        for (n, event) in t.events.iter().enumerate() {
            let seq = event["seq"].as_u64().unwrap_or(0);
            if seq != n as u64 + 1 {
                violations.push(format!(
                    "{id} reader {i}: seq {seq} at position {} (lost, duplicated or reordered)",
                    n + 1
                ));
                break;
            }
            if event["type"] != "token" && n + 1 != t.events.len() {
                violations.push(format!(
                    "{id} reader {i}: events after the terminal seq {seq}"
                ));
            }
            match by_seq.get(&seq) {
                Some(seen) if seen != event => violations.push(format!(
                    "{id} seq {seq}: readers disagree: {seen} vs {event}"
                )),
                Some(_) => {}
                None => {
                    by_seq.insert(seq, event.clone());
                }
            }
        }
    }
    let all: Vec<Value> = by_seq.values().cloned().collect();
    if let Some(last) = all.last().filter(|e| e["type"] != "token") {
        let expected = expected_text(prompt, seed, max_tokens);
        let text = text_of(&all);
        let whole = last["type"] == "done" && last["finish_reason"] != "cancelled";
        if (whole && text != expected) || !expected.starts_with(&text) {
            violations.push(format!("{id}: text differs from the generator's answer"));
        }
    }
    let Some(sid) = StreamId::parse(id) else {
        violations.push(format!("{id}: not a stream id"));
        return violations;
    };
    match store.read(&sid, 0).await {
        Ok(stored) => {
            let stored: Vec<Value> = stored
                .iter()
                .map(|e| serde_json::from_slice(e.json()).unwrap_or(Value::Null))
                .collect();
            if stored.len() < all.len() || stored[..all.len()] != all[..] {
                violations.push(format!(
                    "{id}: stored history ({} events) differs from what clients saw ({})",
                    stored.len(),
                    all.len()
                ));
            }
        }
        Err(err) => violations.push(format!("{id}: stored history unreadable: {err}")),
    }
    match store.batches(&sid).await {
        Ok(batches) => {
            let mut next = 1;
            let mut epoch = 0;
            for b in &batches {
                if b.first != next || b.last < b.first {
                    violations.push(format!("{id}: stored batch {b:?} after seq {}", next - 1));
                }
                if b.epoch < epoch {
                    violations.push(format!(
                        "{id}: epoch {} wrote after epoch {epoch} (two owners)",
                        b.epoch
                    ));
                }
                epoch = epoch.max(b.epoch);
                next = b.last + 1;
            }
        }
        Err(err) => violations.push(format!("{id}: batches unreadable: {err}")),
    }
    violations
}

fn options(extra: &[&str], persistent_redis: bool) -> EdgeOptions {
    EdgeOptions {
        args: extra.iter().map(|s| s.to_string()).collect(),
        persistent_redis,
        ..EdgeOptions::default()
    }
}

fn reader(
    cluster: &TestCluster,
    id: &str,
    edge: usize,
) -> (Arc<Mutex<Transcript>>, tokio::task::JoinHandle<Transcript>) {
    let edges: Edges = Arc::new(Mutex::new(vec![cluster.edge(edge).url("")]));
    let progress = Arc::new(Mutex::new(Transcript::default()));
    let task = tokio::spawn(read_stream(
        cluster.http.clone(),
        edges,
        id.to_owned(),
        0,
        Duration::from_secs(60),
        Instant::now() + Duration::from_secs(60),
        Some(progress.clone()),
    ));
    (progress, task)
}

fn seen(progress: &Arc<Mutex<Transcript>>) -> u64 {
    progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .last_seq()
}

async fn stored_meta(cluster: &TestCluster, id: &str) -> (RedisStore, StreamMeta) {
    let store = RedisStore::connect(&cluster.redis.url())
        .await
        .expect("redis");
    let meta = store
        .meta(&StreamId::parse(id).expect("id"))
        .await
        .expect("meta");
    (store, meta)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_writes_nothing_after_its_lease_moved() {
    let mut cluster = TestCluster::start_with(2, 1, &options(&[], false)).await;
    let id = cluster.create(0, slow("paused owner", 400, 20)).await;
    let (on_owner, owner_reader) = reader(&cluster, &id, 0);
    wait_until(Duration::from_secs(10), || async {
        (seen(&on_owner) >= 10).then_some(())
    })
    .await;

    cluster.edge(0).pause();
    let paused_at = seen(&on_owner);
    // Edge 1 takes the stream over once the lease lapsed, and it goes on.
    let (on_b, b_reader) = reader(&cluster, &id, 1);
    wait_until(Duration::from_secs(15), || async {
        (seen(&on_b) > paused_at + 20).then_some(())
    })
    .await;
    let stop = cluster
        .http
        .delete(cluster.edge(1).url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("DELETE");
    // 202: it was running when asked; the body gives the final status.
    assert_eq!(stop.status(), 202);
    let answer: Value = stop.json().await.expect("json");
    assert_eq!(answer["status"], "cancelled", "{answer}");
    let b = b_reader.await.expect("reader");
    let end = b.events.last().expect("events").clone();
    assert_eq!(end["finish_reason"], "cancelled", "{end}");

    // The old owner wakes up: fenced, it shows the same history and nothing after the stop.
    cluster.edge(0).resume();
    let owner_side = owner_reader.await.expect("reader");
    assert_contiguous(&owner_side.events, 1);
    assert_eq!(owner_side.events, b.events, "one history on every replica");
    let polled = cluster.finished(0, &id).await;
    assert_eq!(polled, b.events);
    let (store, meta) = stored_meta(&cluster, &id).await;
    assert_eq!(meta.status, StreamStatus::Cancelled);
    assert!(meta.epoch >= 2, "edge 1 claimed the stream: {meta:?}");
    let violations = check_stream(&store, &id, "paused owner", 11, 400, &[b, owner_side]).await;
    assert!(violations.is_empty(), "{violations:#?}");
    cluster.edges[0].kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_sent_while_the_owner_is_paused_is_honoured_by_the_next_owner() {
    let cluster = TestCluster::start_with(2, 1, &options(&[], false)).await;
    let id = cluster.create(0, slow("stop in failover", 400, 20)).await;
    let (on_b, b_reader) = reader(&cluster, &id, 1);
    wait_until(Duration::from_secs(10), || async {
        (seen(&on_b) >= 10).then_some(())
    })
    .await;
    cluster.edge(0).pause();
    // Within the lease: the owner cannot be told, but the stop is recorded.
    let stop = cluster
        .http
        .delete(cluster.edge(1).url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(stop.status(), 202);
    let b = b_reader.await.expect("reader");
    let end = b.events.last().expect("events").clone();
    assert_eq!(end["finish_reason"], "cancelled", "{end}");
    assert!(b.events.len() < 100, "ended soon after the stop: {end}");
    cluster.edge(0).resume();
    assert_eq!(cluster.finished(0, &id).await, b.events);
    let (store, _) = stored_meta(&cluster, &id).await;
    let violations = check_stream(&store, &id, "stop in failover", 11, 400, &[b]).await;
    assert!(violations.is_empty(), "{violations:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_older_snapshot_is_healed_without_a_second_owner() {
    let mut cluster = TestCluster::start_with(2, 1, &options(&[], true)).await;
    let id = cluster.create(0, slow("rolled back", 300, 10)).await;
    let (on_a, a_reader) = reader(&cluster, &id, 0);
    let (on_b, b_reader) = reader(&cluster, &id, 1);
    wait_until(Duration::from_secs(10), || async {
        (seen(&on_a) >= 40 && seen(&on_b) >= 40).then_some(())
    })
    .await;
    let snapshot = cluster.redis.snapshot();
    wait_until(Duration::from_secs(10), || async {
        (seen(&on_a) >= 120).then_some(())
    })
    .await;
    cluster.redis.restart_from(&snapshot);
    let (a, b) = (
        a_reader.await.expect("reader"),
        b_reader.await.expect("reader"),
    );
    assert_contiguous(&a.events, 1);
    assert_eq!(a.events, b.events);
    assert_eq!(a.events.last().expect("end")["finish_reason"], "length");
    assert_eq!(
        text_of(&a.events),
        expected_text("rolled back", 11, 300),
        "the whole answer, once"
    );
    let (store, meta) = stored_meta(&cluster, &id).await;
    assert_eq!(
        meta.epoch, 1,
        "the owner healed the store; nobody took over"
    );
    assert_eq!(
        cluster.generators[0].stats.tokens(),
        300,
        "the generator generated the answer once"
    );
    let violations = check_stream(&store, &id, "rolled back", 11, 300, &[a, b]).await;
    assert!(violations.is_empty(), "{violations:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_generator_is_given_up_and_the_stream_resumes_on_another() {
    let cluster = TestCluster::start_with(
        1,
        2,
        &options(&["--generator-idle-timeout-secs", "1"], false),
    )
    .await;
    let id = cluster.create(0, slow("stalled", 150, 20)).await;
    let (progress, task) = reader(&cluster, &id, 0);
    wait_until(Duration::from_secs(10), || async {
        (seen(&progress) >= 10).then_some(())
    })
    .await;
    let serving = cluster
        .generators
        .iter()
        .position(|g| g.stats.active() == 1)
        .expect("one generator serves the stream");
    cluster.generators[serving].pause();
    let t = task.await.expect("reader");
    cluster.generators[serving].resume();
    assert_contiguous(&t.events, 1);
    assert_eq!(t.events.last().expect("end")["finish_reason"], "length");
    assert_eq!(text_of(&t.events), expected_text("stalled", 11, 150));
    assert!(cluster.generators[1 - serving].stats.tokens() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_generator_with_no_retry_left_ends_the_stream_with_an_error() {
    let cluster = TestCluster::start_with(
        1,
        1,
        &options(
            &[
                "--generator-idle-timeout-secs",
                "1",
                "--generator-retries",
                "1",
            ],
            false,
        ),
    )
    .await;
    let id = cluster.create(0, slow("stalled for good", 150, 20)).await;
    let (progress, task) = reader(&cluster, &id, 0);
    wait_until(Duration::from_secs(10), || async {
        (seen(&progress) >= 5).then_some(())
    })
    .await;
    cluster.generators[0].pause();
    let t = task.await.expect("reader");
    cluster.generators[0].resume();
    assert_contiguous(&t.events, 1);
    let end = t.events.last().expect("end");
    assert_eq!(end["type"], "error", "{end}");
    assert_eq!(end["code"], "generator_unavailable");
    assert_eq!(
        end["message"], "no generator could finish the answer",
        "upstream details stay in the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_lost_with_a_redis_outage_longer_than_the_lease_is_recorded_again() {
    // Redis without persistence, down for longer than the lease while a stream waits for its
    // first token: its owner cannot prove its lease and hands it over, and Redis comes back
    // empty. The replica that follows it records it again and finishes it.
    let idle = ["--generator-idle-timeout-secs", "20"];
    let mut cluster = TestCluster::start_with(2, 1, &options(&idle, false)).await;
    let body = json!({
        "prompt": "outage",
        "max_tokens": 30,
        "seed": 11,
        "timing": {"ttft_ms": 6000, "inter_token_ms": 10, "jitter_ms": 0},
    });
    let id = cluster.create(0, body).await;
    let (_, task) = reader(&cluster, &id, 0);
    cluster.redis.process.kill();
    tokio::time::sleep(Duration::from_millis(5000)).await;
    cluster.redis.restart();
    let t = task.await.expect("reader");
    assert!(t.gave_up.is_none(), "{:?}", t.gave_up);
    assert_contiguous(&t.events, 1);
    assert_eq!(t.events.last().expect("end")["finish_reason"], "length");
    assert_eq!(text_of(&t.events), expected_text("outage", 11, 30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_shutting_down_never_takes_a_stream_over() {
    let mut cluster = TestCluster::start_with(2, 1, &options(&[], false)).await;
    let id = cluster.create(0, slow("draining follower", 200, 20)).await;
    let (on_b, b_reader) = reader(&cluster, &id, 1);
    wait_until(Duration::from_secs(10), || async {
        (seen(&on_b) >= 10).then_some(())
    })
    .await;
    // The owner stalls while the only other replica drains: the lease lapses during the drain,
    // and the draining replica must leave the stream alone.
    cluster.edge(0).pause();
    assert!(cluster.edges[1].terminate().success());
    drop(b_reader);
    cluster.edge(0).resume();
    let events = cluster.finished(0, &id).await;
    assert_contiguous(&events, 1);
    assert_eq!(events.last().expect("end")["finish_reason"], "length");
    assert_eq!(
        text_of(&events),
        expected_text("draining follower", 11, 200)
    );
    let (_, meta) = stored_meta(&cluster, &id).await;
    assert_eq!(meta.epoch, 1, "nobody claimed the stream: {meta:?}");
}

/// One stream of the soak, as its clients saw it.
struct SoakStream {
    id: String,
    seed: u64,
    max_tokens: usize,
    transcripts: Vec<Transcript>,
}

const SOAK_PROMPT: &str = "fault soak";

/// Starts streams on random edges for `until`, each read by two resuming clients, a quarter
/// of them stopped from a random edge while they run.
async fn soak_clients(
    http: reqwest::Client,
    edges: Edges,
    until: Instant,
) -> (Vec<SoakStream>, u64) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed_creates = 0u64;
    let mut n: u64 = 0;
    while Instant::now() < until {
        n += 1;
        let seed = 1000 + n;
        let max_tokens = 40 + (n * 37 % 120) as usize;
        let body = json!({
            "prompt": SOAK_PROMPT,
            "max_tokens": max_tokens,
            "seed": seed,
            "timing": {"ttft_ms": 5, "inter_token_ms": 15, "jitter_ms": 0},
        });
        let base = pick(&edges, n as usize);
        let created = tokio::time::timeout(
            Duration::from_secs(3),
            http.post(format!("{base}/v1/streams")).json(&body).send(),
        )
        .await;
        let id = match created {
            Ok(Ok(r)) if r.status() == 201 => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned)),
            _ => None,
        };
        let Some(id) = id else {
            // Explicit: a refused or failed POST (an edge down, Redis restarting).
            failed_creates += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let stall = Duration::from_millis(2500);
        let readers: Vec<_> = (0..2)
            .map(|r| {
                tokio::spawn(read_stream(
                    http.clone(),
                    edges.clone(),
                    id.clone(),
                    (n as usize) + r + 1,
                    stall,
                    deadline,
                    None,
                ))
            })
            .collect();
        if n.is_multiple_of(4) {
            let (http, edges, id) = (http.clone(), edges.clone(), id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200 + n * 131 % 1500)).await;
                for attempt in 0..10 {
                    let base = pick(&edges, (n as usize) + 2 + attempt);
                    let stop = http
                        .delete(format!("{base}/v1/streams/{id}"))
                        .timeout(Duration::from_secs(8))
                        .send()
                        .await;
                    if stop.is_ok_and(|r| r.status().is_success()) {
                        break;
                    }
                }
            });
        }
        tasks.spawn(async move {
            let mut transcripts = Vec::new();
            for r in readers {
                transcripts.push(r.await.unwrap_or_default());
            }
            SoakStream {
                id,
                seed,
                max_tokens,
                transcripts,
            }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut streams = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(s) = done {
            streams.push(s);
        }
    }
    (streams, failed_creates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_soak_every_token_exactly_once() {
    let secs: u64 = std::env::var("FAULT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let mut cluster = TestCluster::start_with(
        3,
        2,
        &options(
            &[
                "--generator-idle-timeout-secs",
                "1",
                "--generator-retries",
                "4",
            ],
            true,
        ),
    )
    .await;
    let edges: Edges = Arc::new(Mutex::new(bases(&cluster)));
    let until = Instant::now() + Duration::from_secs(secs);
    let clients = tokio::spawn(soak_clients(cluster.http.clone(), edges.clone(), until));

    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let mut round = 0usize;
    while Instant::now() + Duration::from_secs(4) < until {
        tokio::time::sleep(Duration::from_secs(2)).await;
        round += 1;
        let edge = round % cluster.edges.len();
        let kind = match round % 7 {
            1 => {
                // Past the lease: another edge claims its streams; then it wakes up.
                cluster.edge(edge).pause();
                tokio::time::sleep(Duration::from_millis(2500)).await;
                cluster.edge(edge).resume();
                "edge SIGSTOP 2.5 s"
            }
            2 => {
                let generator = round % cluster.generators.len();
                cluster.generators[generator].pause();
                tokio::time::sleep(Duration::from_millis(2000)).await;
                cluster.generators[generator].resume();
                "generator stall 2 s"
            }
            3 => {
                cluster.redis.restart();
                "redis kill -9 + restart (AOF)"
            }
            4 => {
                cluster.nats.process.pause();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                cluster.nats.process.resume();
                "nats SIGSTOP 1.5 s"
            }
            5 => {
                let snapshot = cluster.redis.snapshot();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                cluster.redis.restart_from(&snapshot);
                let _ = std::fs::remove_dir_all(&snapshot);
                "redis restored from a 1.5 s old snapshot"
            }
            6 => {
                cluster.restart_edge(edge).await;
                *edges.lock().unwrap_or_else(|e| e.into_inner()) = bases(&cluster);
                "edge kill -9 + restart"
            }
            _ => {
                // A short pause, within the lease: nobody takes over.
                cluster.edge(edge).pause();
                tokio::time::sleep(Duration::from_millis(400)).await;
                cluster.edge(edge).resume();
                "edge SIGSTOP 0.4 s"
            }
        };
        *faults.entry(kind).or_default() += 1;
    }
    let (streams, failed_creates) = clients.await.expect("clients");

    let store = RedisStore::connect(&cluster.redis.url())
        .await
        .expect("redis");
    let mut violations = Vec::new();
    let (mut tokens, mut resumes, mut cancelled) = (0usize, 0u32, 0usize);
    for s in &streams {
        violations.extend(
            check_stream(
                &store,
                &s.id,
                SOAK_PROMPT,
                s.seed,
                s.max_tokens,
                &s.transcripts,
            )
            .await,
        );
        for t in &s.transcripts {
            tokens += t.events.len().saturating_sub(1);
            resumes += t.resumes;
        }
        if s.transcripts.iter().any(|t| {
            t.events
                .last()
                .is_some_and(|e| e["finish_reason"] == "cancelled")
        }) {
            cancelled += 1;
        }
    }
    eprintln!(
        "fault soak: {secs} s, faults {faults:?}, {} streams ({cancelled} stopped), \
         {failed_creates} refused creations, {tokens} tokens delivered, {resumes} resumes, \
         {} violations",
        streams.len(),
        violations.len()
    );
    assert!(
        streams.len() >= 10,
        "the soak ran streams: {}",
        streams.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
}
