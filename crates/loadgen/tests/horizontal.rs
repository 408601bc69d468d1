//! Horizontal load tests: several real `tokenfan-loadgen` processes against one real edge,
//! started with the same `--start-at`, merged with `tokenfan-loadgen merge`; and the HTTP/2 and
//! TLS targets a real cluster needs.
//!
//! The merge is checked exactly against the union of the runs: every run's JSON carries its
//! HDR histograms, the test re-records every sample of every run (value and count, as decoded
//! from each run's own file) into one histogram per figure — what a single load generator that
//! had received all those tokens would have recorded — and the merged percentiles, maxima,
//! means and counts must equal that histogram's, while every counter must equal the sum.

use std::{path::Path, process::Command};

use clap::Parser as _;
use hdrhistogram::Histogram;
use serde_json::Value;
use tokenfan_loadgen::{
    Cli, Report,
    report::Counts,
    run,
    stats::{Hists, Summary, new_hist},
};
use tokenfan_testkit::{edge::TestEdge, temp::temp_dir, tls::TlsDir};

const BIN: &str = env!("CARGO_BIN_EXE_tokenfan-loadgen");

/// Runs the binary off the test's runtime threads.
async fn loadgen(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || Command::new(BIN).args(&args).output())
        .await
        .expect("join")
        .expect("the binary runs")
}

fn unix_secs_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

fn read_report(path: &Path) -> (Report, Value) {
    let text = std::fs::read_to_string(path).expect("the JSON file was written");
    (
        serde_json::from_str(&text).expect("a report"),
        serde_json::from_str(&text).expect("JSON"),
    )
}

/// Records every sample of `from` (each bucket's value, `count` times) into `into`.
fn rerecord(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    for v in from.iter_recorded() {
        into.record_n(v.value_iterated_to(), v.count_at_value())
            .expect("in range");
    }
}

/// The union of the runs' samples, per figure.
#[derive(Default)]
struct Union {
    ttft: Option<Histogram<u64>>,
    itl: Option<Histogram<u64>>,
    delay: Option<Histogram<u64>>,
    delay_all: Option<Histogram<u64>>,
}

impl Union {
    fn add(&mut self, h: &Hists) {
        for (into, from) in [
            (&mut self.ttft, &h.ttft),
            (&mut self.itl, &h.itl),
            (&mut self.delay, &h.delay),
            (&mut self.delay_all, &h.delay_all),
        ] {
            rerecord(into.get_or_insert_with(new_hist), from);
        }
    }
}

fn same(got: &Option<Summary>, want: &Option<Histogram<u64>>, what: &str) {
    let want = want.as_ref().and_then(Summary::of);
    match (got, &want) {
        (None, None) => {}
        (Some(g), Some(w)) => {
            assert_eq!(g.count, w.count, "{what}: count");
            assert_eq!(
                (g.p50, g.p90, g.p99, g.p999, g.max, g.mean),
                (w.p50, w.p90, w.p99, w.p999, w.max, w.mean),
                "{what}: percentiles"
            );
            assert_eq!(g.quantiles, w.quantiles, "{what}: quantile series");
        }
        _ => panic!("{what}: merged {got:?}, union {want:?}"),
    }
}

/// Three load generators, one window, one exact report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_runs_equal_the_union_of_their_samples() {
    let edge = TestEdge::start().await;
    let dir = temp_dir("merge");
    let target = format!("http://{}", edge.addr);
    // Far enough ahead for the three processes to start and connect.
    let start_at = format!("{:.3}", unix_secs_now() + 3.0);
    let mut runs = Vec::new();
    for i in 0..3u32 {
        let json = dir.join(format!("pod-{i}.json"));
        let args: Vec<String> = [
            "mixed",
            "--mix",
            "native=2,chat=1,ws=1",
            "--target",
            &target,
            "--concurrency",
            &(3 + i).to_string(),
            "--ramp",
            "0.3",
            "--warmup",
            "0.3",
            "--duration",
            "1.2",
            "--max-tokens",
            "20",
            "--ttft-ms",
            "10",
            "--inter-token-ms",
            "3",
            "--seed",
            &(1000 * u64::from(i) + 1).to_string(),
            "--start-at",
            &start_at,
            "--label",
            "pods",
            "--quiet",
            "--json",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([json.display().to_string()])
        .collect();
        runs.push((json, tokio::spawn(loadgen(args))));
    }
    let mut parts = Vec::new();
    for (json, task) in runs {
        let out = task.await.expect("join");
        assert!(
            out.status.success(),
            "a load generator failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        parts.push((json.clone(), read_report(&json)));
    }
    // Every process measured the same window: --start-at + ramp + warm-up.
    let want_window = (start_at.parse::<f64>().expect("secs") * 1000.0).round() as i64 + 600;
    for (path, (r, _)) in &parts {
        assert!(
            (r.window_start_unix_ms - want_window).abs() <= 1,
            "{}: window from {} ms, want {want_window}",
            path.display(),
            r.window_start_unix_ms
        );
        assert!(r.ok && r.total.streams_completed > 0, "{}", path.display());
    }

    let merged_path = dir.join("merged.json");
    let mut args = vec!["merge".to_owned()];
    args.extend(parts.iter().map(|(p, _)| p.display().to_string()));
    args.extend(["--json".to_owned(), merged_path.display().to_string()]);
    let out = loadgen(args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "merge: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("merged from 3 runs"), "{stdout}");
    assert!(stdout.contains("RESULT: ok"), "{stdout}");
    let (merged, merged_json) = read_report(&merged_path);

    // Counters: sums, per transport and in total; rates over the one shared window.
    let sum = |f: &dyn Fn(&Report) -> Counts| {
        let mut c = Counts::default();
        for (_, (r, _)) in &parts {
            c.add(&f(r));
        }
        c
    };
    assert_eq!(Counts::of(&merged.total), sum(&|r| Counts::of(&r.total)));
    let transports: std::collections::BTreeSet<&String> = parts
        .iter()
        .flat_map(|(_, (r, _))| r.by_transport.keys())
        .collect();
    assert!(transports.len() >= 2, "several transports: {transports:?}");
    for t in &transports {
        let want = sum(&|r| r.by_transport.get(*t).map(Counts::of).unwrap_or_default());
        assert_eq!(Counts::of(&merged.by_transport[*t]), want, "{t}");
    }
    let tokens: u64 = parts.iter().map(|(_, (r, _))| r.total.tokens_window).sum();
    assert_eq!(merged.total.tokens_window, tokens);
    let rate = tokens as f64 / 1.2;
    assert!((merged.total.tokens_per_sec - rate).abs() < 1e-6);
    let readers: u64 = parts.iter().map(|(_, (r, _))| r.total.readers_clean).sum();
    assert_eq!(merged.total.readers_clean, readers);
    assert_eq!(merged.config.concurrency, 3 + 4 + 5);
    assert_eq!(merged.parts.len(), 3);
    assert_eq!(merged.error_total, 0);
    assert_eq!(merged.violation_total, 0);
    let http: u64 = parts
        .iter()
        .map(|(_, (r, _))| r.http_versions.values().sum::<u64>())
        .sum();
    assert_eq!(merged.http_versions.values().sum::<u64>(), http);

    // Percentiles: the merged figures are those of one histogram of every sample.
    let mut total = Union::default();
    for t in &transports {
        let mut union = Union::default();
        for (path, (r, _)) in &parts {
            let Some(tr) = r.by_transport.get(*t) else {
                continue;
            };
            let h = Hists::decode(tr.histograms.as_ref().expect("histograms")).expect("decodes");
            // Each file's histograms are the ones its own percentiles came from.
            same(
                &tr.ttft_ms,
                &Some(h.ttft.clone()),
                &format!("{} ttft", path.display()),
            );
            same(&tr.added_delay_ms, &Some(h.delay.clone()), "own delay");
            union.add(&h);
            total.add(&h);
        }
        let m = &merged.by_transport[*t];
        same(&m.ttft_ms, &union.ttft, &format!("{t} ttft"));
        same(&m.inter_token_ms, &union.itl, &format!("{t} inter-token"));
        same(&m.added_delay_ms, &union.delay, &format!("{t} added delay"));
        same(
            &m.added_delay_all_ms,
            &union.delay_all,
            &format!("{t} added delay, all"),
        );
    }
    same(&merged.total.ttft_ms, &total.ttft, "total ttft");
    same(
        &merged.total.inter_token_ms,
        &total.itl,
        "total inter-token",
    );
    same(
        &merged.total.added_delay_ms,
        &total.delay,
        "total added delay",
    );
    // chat is measured too (emit times on the OpenAI chunks).
    if let Some(chat) = merged.by_transport.get("chat") {
        assert!(chat.added_delay_ms.is_some(), "chat added delay");
    }
    assert!(merged_json["by_transport"]["native"]["histograms"]["ttft"].is_string());

    // The merged file merges again (with itself it doubles) and charts.
    let twice = dir.join("twice.json");
    let out = loadgen(vec![
        "merge".into(),
        "-q".into(),
        merged_path.display().to_string(),
        merged_path.display().to_string(),
        "--json".into(),
        twice.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (twice, _) = read_report(&twice);
    assert_eq!(twice.total.tokens_window, 2 * tokens);
    assert_eq!(twice.parts.len(), 6);
    assert_eq!(
        twice.total.ttft_ms.as_ref().map(|s| (s.count, s.p99)),
        merged.total.ttft_ms.as_ref().map(|s| (s.count * 2, s.p99))
    );
    let svg = dir.join("merged.svg");
    let out = loadgen(vec![
        "chart".into(),
        "--out".into(),
        svg.display().to_string(),
        merged_path.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_to_string(&svg)
            .expect("svg")
            .contains("<polyline")
    );

    // A run of other timing is refused, with the reason.
    let (_, mut other) = read_report(&parts[0].0);
    other["config"]["inter_token_ms"] = 20.into();
    let other_path = dir.join("other.json");
    std::fs::write(&other_path, other.to_string()).expect("write");
    let out = loadgen(vec![
        "merge".into(),
        parts[1].0.display().to_string(),
        other_path.display().to_string(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("inter_token_ms"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_time_past_the_window_is_refused() {
    let out = loadgen(
        [
            "native",
            "--target",
            "http://127.0.0.1:9",
            "--ramp",
            "1",
            "--warmup",
            "1",
            "--start-at",
            "2020-01-01T00:00:00Z",
            "-q",
        ]
        .map(str::to_owned)
        .to_vec(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--start-at"), "{stderr}");
}

/// A short, fast run; an option in `extra` replaces the default one.
fn fast(scenario: &str, target: &str, json: &Path, extra: &[&str]) -> Vec<String> {
    let json = json.display().to_string();
    let defaults = [
        ("--target", target),
        ("--concurrency", "4"),
        ("--ramp", "0.1"),
        ("--warmup", "0.1"),
        ("--duration", "0.8"),
        ("--max-tokens", "15"),
        ("--ttft-ms", "10"),
        ("--inter-token-ms", "2"),
        ("--json", json.as_str()),
    ];
    let mut args = vec![
        "tokenfan-loadgen".to_owned(),
        scenario.to_owned(),
        "--quiet".to_owned(),
    ];
    for (name, value) in defaults {
        if !extra.contains(&name) {
            args.extend([name.to_owned(), value.to_owned()]);
        }
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

async fn run_in_process(args: Vec<String>) -> Report {
    let cli = Cli::try_parse_from(&args).expect("arguments parse");
    run(cli)
        .await
        .expect("the run completes")
        .report
        .expect("a report")
}

fn only_version(r: &Report, version: &str) {
    assert!(
        r.ok,
        "errors {:?}, violations {:?}, examples {:?}",
        r.errors, r.violations, r.examples
    );
    assert!(r.total.streams_completed > 0);
    assert_eq!(
        r.http_versions.keys().collect::<Vec<_>>(),
        vec![version],
        "{:?}",
        r.http_versions
    );
}

/// h2c with prior knowledge, TLS with ALPN (h2 chosen, or HTTP/1.1 asked), WebSockets over
/// TLS, `--insecure`, and an untrusted certificate refused. The SSE runs over HTTP/2 stay
/// under 100 streams per connection: the edge ends each SSE response with an empty DATA frame
/// and h2 closes a connection after 100 of those (docs/benchmarks.md, "Known limit").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_tls_targets() {
    let dir = temp_dir("tls");
    let json = dir.join("run.json");

    let plain = TestEdge::start().await;
    let r = run_in_process(fast(
        "native",
        &format!("http://{}", plain.addr),
        &json,
        &["--http", "2", "--inter-token-ms", "10"],
    ))
    .await;
    only_version(&r, "HTTP/2.0");
    assert_eq!(r.config.http, "2");
    let r = run_in_process(fast(
        "longpoll",
        &format!("http://{}", plain.addr),
        &json,
        &["--http", "2"],
    ))
    .await;
    only_version(&r, "HTTP/2.0");

    let certs = TlsDir::new();
    let tls = TestEdge::with(|c| {
        c.tls_cert = Some(certs.files.cert.clone());
        c.tls_key = Some(certs.files.key.clone());
    })
    .await;
    let https = format!("https://localhost:{}", tls.addr.port());
    let ca = certs.files.ca.display().to_string();

    let r = run_in_process(fast(
        "chat",
        &https,
        &json,
        &["--http", "auto", "--ca-file", &ca, "--inter-token-ms", "10"],
    ))
    .await;
    only_version(&r, "HTTP/2.0");
    assert!(r.total.added_delay_ms.is_some());
    let r = run_in_process(fast("native", &https, &json, &["--ca-file", &ca])).await;
    only_version(&r, "HTTP/1.1");
    let r = run_in_process(fast("watch", &https, &json, &["--insecure"])).await;
    only_version(&r, "HTTP/1.1");
    let r = run_in_process(fast(
        "longpoll",
        &https,
        &json,
        &["--http", "2", "--insecure"],
    ))
    .await;
    only_version(&r, "HTTP/2.0");
    // wss:// (no HTTP responses are counted: the sockets are upgrades).
    let r = run_in_process(fast("ws", &https, &json, &["--ca-file", &ca])).await;
    assert!(r.ok && r.total.streams_completed > 0, "{:?}", r.examples);

    // The system's CAs do not trust the test certificate: the run fails, and says why.
    let out = loadgen(
        fast("native", &https, &json, &[])
            .into_iter()
            .skip(1)
            .collect(),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, _) = read_report(&json);
    assert!(r.errors.contains_key("connect"), "{:?}", r.errors);
    assert!(
        r.examples.iter().any(|e| e.contains("certificate")),
        "{:?}",
        r.examples
    );
    let _ = std::fs::remove_dir_all(&dir);
}
