//! The `tokenfan-loadgen` binary: help, exit status (0 clean, 1 errors or violations, 2 bad
//! usage), and `chart` writing a well-formed SVG with one curve per input and panel.

use std::{path::PathBuf, process::Command};

use serde_json::json;
use tokenfan_testkit::edge::TestEdge;

const BIN: &str = env!("CARGO_BIN_EXE_tokenfan-loadgen");

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "tokenfan-loadgen-bin-{}-{name}",
        std::process::id()
    ))
}

/// Runs the binary off the test's runtime threads.
async fn loadgen(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || Command::new(BIN).args(&args).output())
        .await
        .expect("join")
        .expect("the binary runs")
}

fn fast(scenario: &str, target: &str) -> Vec<String> {
    [
        scenario,
        "--target",
        target,
        "--concurrency",
        "3",
        "--ramp",
        "0.1",
        "--warmup",
        "0.1",
        "--duration",
        "0.8",
        "--max-tokens",
        "10",
        "--ttft-ms",
        "10",
        "--inter-token-ms",
        "2",
        "--quiet",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[test]
fn help_lists_every_scenario() {
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for s in [
        "chat",
        "native",
        "watch",
        "ws",
        "longpoll",
        "shortpoll",
        "mixed",
        "grpc",
        "idle",
        "chart",
    ] {
        assert!(
            text.contains(&format!("  {s} ")),
            "--help lists {s}: {text}"
        );
    }
    let out = Command::new(BIN)
        .args(["native", "--help"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--target",
        "--concurrency",
        "--rate",
        "--duration",
        "--ramp",
        "--warmup",
        "--max-tokens",
        "--ttft-ms",
        "--inter-token-ms",
        "--jitter-ms",
        "--seed",
        "--server-pid",
        "--json",
        "--label",
        "--quiet",
        "TOKENFAN_LOADGEN_TARGET",
    ] {
        assert!(text.contains(flag), "native --help has {flag}");
    }
}

#[test]
fn bad_usage_exits_2_with_a_message() {
    let out = Command::new(BIN)
        .args(["native", "--concurrency", "0"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--concurrency must be at least 1"), "{err}");
    let out = Command::new(BIN)
        .args(["native", "--target", "ftp://x"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["mixed", "--mix", "grpc=1"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_exits_0_and_its_json_charts() {
    let edge = TestEdge::start().await;
    let json = temp("native.json");
    let mut args = fast("native", &edge.url(""));
    args.extend(["--json".to_owned(), json.display().to_string()]);
    args.extend(["--label".to_owned(), "tokenfan".to_owned()]);
    let out = loadgen(args).await;
    drop(edge);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("RESULT: ok"), "{stdout}");
    assert!(stdout.contains("added delay (receipt − emitted_at), window: n="));

    let svg = temp("chart.svg");
    let out = Command::new(BIN)
        .args(["chart", "--out"])
        .arg(&svg)
        .arg(&json)
        .output()
        .expect("chart runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).expect("svg written");
    let _ = std::fs::remove_file(&svg);
    let _ = std::fs::remove_file(&json);
    assert_well_formed(&text);
    assert_eq!(text.matches("<polyline").count(), 2, "added delay and TTFT");
    assert!(text.contains("tokenfan · native"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_1() {
    // A port nobody listens on: every stream fails to connect.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let out = loadgen(fast("native", &format!("http://{addr}"))).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("RESULT: FAILED"), "{stdout}");
    assert!(stdout.contains("\"connect\""), "{stdout}");
}

/// A result file with one transport whose curves are made up.
fn result_file(name: &str, label: &str, transport: &str, scale: f64, delay: bool) -> PathBuf {
    let series = |s: f64| json!({"quantiles": [[50.0, 1.0 * s], [90.0, 2.0 * s], [99.0, 4.0 * s], [99.9, 8.0 * s], [100.0, 9.0 * s]]});
    let mut t = json!({"ttft_ms": series(scale * 10.0)});
    if delay {
        t["added_delay_ms"] = series(scale);
    }
    let v = json!({"label": label, "scenario": transport, "by_transport": {transport: t}});
    let path = temp(name);
    std::fs::write(&path, v.to_string()).expect("write");
    path
}

#[test]
fn chart_draws_one_curve_per_input_and_panel() {
    let a = result_file("a.json", "tokenfan", "native", 1.0, true);
    let b = result_file("b.json", "express <peer>", "native", 3.0, true);
    let c = result_file("c.json", "tokenfan", "chat", 2.0, false);
    let svg = temp("abc.svg");
    let out = Command::new(BIN)
        .args(["chart", "--log-y", "--title", "peers & tokenfan", "--out"])
        .arg(&svg)
        .args([&a, &b, &c])
        .output()
        .expect("chart runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).expect("written");
    for p in [&a, &b, &c, &svg] {
        let _ = std::fs::remove_file(p);
    }
    assert_well_formed(&text);
    // Added delay: a and b (chat has none); TTFT: all three.
    assert_eq!(text.matches("<polyline").count(), 5, "{text}");
    assert!(
        text.contains("express &lt;peer&gt; · native"),
        "labels are escaped"
    );
    assert!(text.contains("peers &amp; tokenfan"));
    assert!(text.contains("percentile (%)"));

    // A file that is not a result is refused.
    let bad = temp("bad.json");
    std::fs::write(&bad, "[1,2]").expect("write");
    let out = Command::new(BIN)
        .args(["chart", "--out"])
        .arg(temp("bad.svg"))
        .arg(&bad)
        .output()
        .expect("runs");
    let _ = std::fs::remove_file(&bad);
    assert_eq!(out.status.code(), Some(2));
}

/// A small XML well-formedness check: one root, every element closed in order, attribute
/// values quoted, no stray `<` or `&` in text.
fn assert_well_formed(xml: &str) {
    let body = xml
        .trim_start()
        .strip_prefix("<?xml")
        .and_then(|r| r.split_once("?>"))
        .map(|(_, rest)| rest)
        .expect("XML declaration");
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = body;
    while let Some(start) = rest.find('<') {
        let text = &rest[..start];
        assert!(!text.contains('>'), "stray > in text {text:?}");
        check_entities(text);
        let end = rest[start..].find('>').expect("tag closed") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "closing tag order"
            );
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name = tag.split_whitespace().next().expect("tag name").to_owned();
        assert!(
            tag.matches('"').count().is_multiple_of(2),
            "attribute quotes balanced in <{tag}>"
        );
        check_entities(tag);
        if stack.is_empty() {
            roots += 1;
        }
        if !self_closing {
            stack.push(name);
        }
    }
    assert!(rest.trim().is_empty(), "text after the root");
    assert!(stack.is_empty(), "unclosed elements {stack:?}");
    assert_eq!(roots, 1, "one root element");
}

fn check_entities(s: &str) {
    for (i, _) in s.match_indices('&') {
        let ent = &s[i..];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| ent.starts_with(e)),
            "bare & in {s:?}"
        );
    }
}
