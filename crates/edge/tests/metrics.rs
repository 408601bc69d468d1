//! `/metrics` after real traffic: the series a dashboard reads move as they should, every
//! family has HELP and TYPE, and histograms are consistent. The Prometheus recorder is
//! process-wide, so this file holds a single test and asserts differences between scrapes.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use serde_json::{Value, json};
use tokenfan_testkit::{
    edge::TestEdge,
    sse::{read_sse, stream_events},
    wait::wait_until,
};

/// One scrape in the Prometheus text format, parsed strictly.
#[derive(Debug, Default)]
struct Scrape {
    /// (metric name, labels) → value.
    samples: HashMap<(String, BTreeMap<String, String>), f64>,
    /// Family → HELP text.
    help: HashMap<String, String>,
    /// Family → TYPE.
    types: HashMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut scrape = Scrape::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                scrape.help.insert(name.into(), help.into());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                scrape.types.insert(name.into(), kind.into());
            } else {
                assert!(!line.starts_with('#'), "unexpected comment {line:?}");
                let (series, value) = line.rsplit_once(' ').expect("series value");
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}"));
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (
                        name,
                        parse_labels(rest.strip_suffix('}').expect("closing brace")),
                    ),
                    None => (series, BTreeMap::new()),
                };
                let previous = scrape.samples.insert((name.into(), labels), value);
                assert!(previous.is_none(), "duplicate series in {line:?}");
            }
        }
        scrape
    }

    /// The value of a series, which must exist.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = (name.to_string(), label_map(labels));
        *self
            .samples
            .get(&key)
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
    }

    /// The family a sample belongs to (histogram samples carry a suffix).
    fn family(name: &str) -> &str {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name)
    }
}

fn label_map(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `a="x",b="y"` (values quoted, `\"` and `\\` escaped).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (i, '"') => break i,
                (_, '\\') => value.push(chars.next().expect("escaped char").1),
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_string(), value);
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    labels
}

async fn scrape(edge: &TestEdge) -> Scrape {
    let r = edge
        .http
        .get(edge.admin_url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"]
        .to_str()
        .expect("text")
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    Scrape::parse(&r.text().await.expect("body"))
}

/// Every sample's family is described and typed; every histogram's `_count` equals its
/// `+Inf` bucket.
fn assert_well_formed(s: &Scrape) {
    for (name, labels) in s.samples.keys() {
        let family = Scrape::family(name);
        let family = if s.types.contains_key(name) {
            name.as_str()
        } else {
            family
        };
        assert!(s.help.contains_key(family), "{family} has no HELP");
        assert!(s.types.contains_key(family), "{family} has no TYPE");
        if s.types[family] == "histogram" && name.ends_with("_count") {
            let mut inf = labels.clone();
            inf.insert("le".into(), "+Inf".into());
            let bucket = s.samples[&(format!("{family}_bucket"), inf)];
            assert_eq!(bucket, s.samples[&(name.clone(), labels.clone())], "{name}");
        }
        if name.ends_with("_seconds") {
            assert_eq!(
                s.types[family], "histogram",
                "{family}: _seconds is a histogram"
            );
        }
    }
}

fn body(max_tokens: u32, seed: u64) -> Value {
    json!({
        "prompt": "metrics please",
        "max_tokens": max_tokens,
        "seed": seed,
        "timing": {"ttft_ms": 5, "inter_token_ms": 15, "jitter_ms": 0},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_moves_the_counters_a_dashboard_reads() {
    let edge = TestEdge::start().await;
    let before = scrape(&edge).await;
    assert_well_formed(&before);
    // Every series a dashboard queries exists from the first scrape, at zero.
    for transport in ["sse", "post_sse", "openai", "ws", "longpoll"] {
        assert_eq!(
            before.get("tokenfan_edge_connections", &[("transport", transport)]),
            0.0
        );
    }
    for result in [
        "replayed", "live", "finished", "expired", "unknown", "invalid", "error",
    ] {
        assert_eq!(
            before.get("tokenfan_edge_resumes_total", &[("result", result)]),
            0.0
        );
    }
    assert_eq!(before.get("tokenfan_edge_owner_failovers_total", &[]), 0.0);
    assert_eq!(
        before.get(
            "tokenfan_edge_inter_token_gap_seconds_count",
            &[("transport", "ws")]
        ),
        0.0
    );

    // One POST-SSE stream, read live.
    let r = edge
        .http
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&body(12, 3))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-stream-id"].to_str().expect("id").to_owned();
    let (events, _) = read_sse(r).await;
    let live = stream_events(&events);
    assert_eq!(live.last().expect("terminal")["type"], "done");
    let live_tokens = live.iter().filter(|e| e["type"] == "token").count();
    assert_eq!(live_tokens, 12);

    // Resumes over SSE: from seq 4 (history replayed), at the terminal event (nothing
    // left: 204), and of an unknown stream (404).
    let resume = |id: String, last_event_id: u64| {
        edge.http
            .get(edge.url(&format!("/v1/streams/{id}/events")))
            .header("last-event-id", last_event_id.to_string())
            .send()
    };
    let r = resume(id.clone(), 4).await.expect("resume");
    assert_eq!(r.status(), 200);
    let (events, _) = read_sse(r).await;
    let resumed = stream_events(&events);
    assert_eq!(resumed.first().expect("replayed")["seq"], 5);
    let terminal_seq = live.len() as u64;
    let r = resume(id.clone(), terminal_seq).await.expect("resume");
    assert_eq!(r.status(), 204);
    let unknown = "A".repeat(22);
    let r = resume(unknown, 2).await.expect("resume");
    assert_eq!(r.status(), 404);
    // A short-poll delivers too.
    let polled = edge.short_poll(&id, 0).await;
    let polled = polled["events"].as_array().expect("events").len();

    // Connections close once the bodies are gone; the generator call ended.
    let after = wait_until(Duration::from_secs(10), || async {
        let s = scrape(&edge).await;
        let open = s.get("tokenfan_edge_connections", &[("transport", "post_sse")])
            + s.get("tokenfan_edge_connections", &[("transport", "sse")]);
        let idle = s.get("tokenfan_generator_active_generations", &[]) == 0.0;
        (open == 0.0 && idle).then_some(s)
    })
    .await;
    assert_well_formed(&after);
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);

    assert_eq!(
        delta("tokenfan_edge_streams_total", &[("outcome", "done")]),
        1.0
    );
    assert_eq!(
        delta("tokenfan_edge_streams_total", &[("outcome", "error")]),
        0.0
    );
    assert_eq!(after.get("tokenfan_edge_streams_active", &[]), 0.0);
    assert_eq!(
        delta(
            "tokenfan_edge_events_delivered_total",
            &[("transport", "post_sse")]
        ),
        live.len() as f64
    );
    assert_eq!(
        delta(
            "tokenfan_edge_events_delivered_total",
            &[("transport", "sse")]
        ),
        resumed.len() as f64
    );
    assert_eq!(
        delta(
            "tokenfan_edge_events_delivered_total",
            &[("transport", "shortpoll")]
        ),
        polled as f64
    );
    assert_eq!(
        delta("tokenfan_edge_time_to_first_token_seconds_count", &[]),
        1.0
    );
    assert!(delta("tokenfan_edge_time_to_first_token_seconds_sum", &[]) > 0.0);
    // One sample per live write after the first carrying tokens: at least one (12 tokens
    // 15 ms apart), at most one per token after the first.
    let gaps = delta(
        "tokenfan_edge_inter_token_gap_seconds_count",
        &[("transport", "post_sse")],
    );
    assert!((1.0..=11.0).contains(&gaps), "{gaps} gap samples");
    // The resume replayed history only: replays are not timed.
    assert_eq!(
        delta(
            "tokenfan_edge_inter_token_gap_seconds_count",
            &[("transport", "sse")]
        ),
        0.0
    );
    assert_eq!(
        delta("tokenfan_edge_resumes_total", &[("result", "replayed")]),
        1.0
    );
    assert_eq!(
        delta("tokenfan_edge_resumes_total", &[("result", "finished")]),
        1.0
    );
    assert_eq!(
        delta("tokenfan_edge_resumes_total", &[("result", "unknown")]),
        1.0
    );
    assert_eq!(
        delta("tokenfan_edge_resumes_total", &[("result", "live")]),
        0.0
    );
    // The embedded generator reports into the same registry.
    assert_eq!(delta("tokenfan_generator_tokens_total", &[]), 12.0);
    let ended = delta(
        "tokenfan_generator_generations_total",
        &[("outcome", "length")],
    ) + delta(
        "tokenfan_generator_generations_total",
        &[("outcome", "stop")],
    );
    assert_eq!(ended, 1.0);
    assert_eq!(
        delta("tokenfan_generator_time_to_first_token_seconds_count", &[]),
        1.0
    );
    assert_eq!(delta("tokenfan_generator_emit_lag_seconds_count", &[]), 1.0);
}
