//! Every scenario against real servers: an embedded `tokenfan-edge` on a port-0 listener (and
//! a `tokenfan-generator` for `grpc`), short closed-loop runs with fast timing. Each run must
//! complete streams with no error and no violation, and its JSON result must carry the
//! figures. A deliberately broken server shows that violations are caught on the wire.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use clap::Parser as _;
use serde_json::Value;
use tokenfan_loadgen::{Cli, Report, run};
use tokenfan_testkit::edge::TestEdge;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

fn json_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "tokenfan-loadgen-test-{}-{name}.json",
        std::process::id()
    ))
}

/// The arguments of a short, fast closed-loop run of 4 streams in flight.
fn fast_args(scenario: &str, target: &str, json: &Path) -> Vec<String> {
    fast_args_n(scenario, target, json, 4)
}

fn fast_args_n(scenario: &str, target: &str, json: &Path, concurrency: usize) -> Vec<String> {
    let concurrency = concurrency.to_string();
    [
        "tokenfan-loadgen",
        scenario,
        "--target",
        target,
        "--concurrency",
        &concurrency,
        "--ramp",
        "0.2",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--max-tokens",
        "20",
        "--ttft-ms",
        "10",
        "--inter-token-ms",
        "2",
        "--quiet",
        "--label",
        "test",
        "--json",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([json.display().to_string()])
    .collect()
}

/// Runs the loadgen in-process; returns the report and the JSON file it wrote.
async fn run_args(args: Vec<String>, json: &Path) -> (Report, Value) {
    let cli = Cli::try_parse_from(&args).expect("arguments parse");
    let outcome = run(cli).await.expect("the run completes");
    let report = outcome.report.expect("a streaming run reports");
    let text = std::fs::read_to_string(json).expect("the JSON file was written");
    let _ = std::fs::remove_file(json);
    let value: Value = serde_json::from_str(&text).expect("the JSON file parses");
    (report, value)
}

/// The checks every clean run must pass.
fn assert_clean(report: &Report, json: &Value, transports: &[&str]) {
    assert!(
        report.ok,
        "errors {:?}, violations {:?}, examples {:?}",
        report.errors, report.violations, report.examples
    );
    assert!(report.total.streams_completed > 0, "no stream completed");
    assert_eq!(report.violation_total, 0);
    assert_eq!(report.error_total, 0);
    assert!(report.total.tokens_window > 0);
    // The JSON has the figures charts and tables are made of.
    for key in [
        "tool",
        "label",
        "scenario",
        "config",
        "total",
        "by_transport",
        "errors",
        "violations",
        "cpu",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key}: {json}");
    }
    assert_eq!(json["label"], "test");
    assert_eq!(json["ok"], true);
    for v in [
        "lost",
        "duplicated",
        "out_of_order",
        "no_terminal",
        "usage_mismatch",
    ] {
        assert_eq!(json["violations"][v], 0, "violation {v} is listed with 0");
    }
    let total = &json["total"];
    assert!(total["streams_completed"].as_u64().unwrap_or(0) > 0);
    assert!(total["tokens_per_sec"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(total["ttft_ms"]["p99"].as_f64().is_some(), "{total}");
    assert!(total["inter_token_ms"]["p50"].as_f64().is_some());
    assert!(json["cpu"]["loadgen_pct_of_core"].as_f64().is_some());
    for t in transports {
        let tr = &json["by_transport"][*t];
        assert!(
            tr["streams_completed"].as_u64().unwrap_or(0) > 0,
            "transport {t}: {tr}"
        );
        assert!(
            tr["ttft_ms"]["quantiles"]
                .as_array()
                .is_some_and(|q| q.len() > 10),
            "transport {t} has a quantile series"
        );
    }
}

fn added_delay_p99(json: &Value, transport: &str) -> Option<f64> {
    json["by_transport"][transport]["added_delay_ms"]["p99"].as_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_post_sse() {
    let edge = TestEdge::start().await;
    let json = json_path("native");
    let mut args = fast_args("native", &edge.url(""), &json);
    args.extend([
        "--metrics".to_owned(),
        "--metrics-url".to_owned(),
        format!("http://{}", edge.running.admin_addr),
        "--server-pid".to_owned(),
    ]);
    args.push(std::process::id().to_string());
    let (report, value) = run_args(args, &json).await;
    assert_clean(&report, &value, &["native"]);
    assert!(
        added_delay_p99(&value, "native").is_some(),
        "added delay measured"
    );
    assert!(
        report.server_counters.is_some(),
        "--metrics read the counters"
    );
    assert_eq!(report.server_memory.len(), 1);
    assert!(report.server_memory[0].memory.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions() {
    let edge = TestEdge::start().await;
    let json = json_path("chat");
    let (report, value) = run_args(fast_args("chat", &edge.url(""), &json), &json).await;
    assert_clean(&report, &value, &["chat"]);
    // `"emit_times": true` on the request: every token chunk carried `emitted_at_unix_nanos`
    // (a missing one is the violation `missing_emitted_at`), so the added delay is measured.
    assert!(
        added_delay_p99(&value, "chat").is_some(),
        "{}",
        value["by_transport"]["chat"]
    );

    // Without it the chunks are plain OpenAI ones: no delay figure, and the report says why.
    let json = json_path("chat-plain");
    let mut args = fast_args("chat", &edge.url(""), &json);
    args.push("--no-emit-times".to_owned());
    let (report, value) = run_args(args, &json).await;
    assert_clean(&report, &value, &["chat"]);
    assert!(added_delay_p99(&value, "chat").is_none());
    assert!(
        value["by_transport"]["chat"]["added_delay_note"]
            .as_str()
            .is_some_and(|n| n.starts_with("n/a")),
        "{}",
        value["by_transport"]["chat"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_viewers_over_two_targets() {
    let edge = TestEdge::start().await;
    let json = json_path("watch");
    let targets = format!("{},{}", edge.url(""), edge.url(""));
    let mut args = fast_args("watch", &targets, &json);
    args.extend(["--viewers".to_owned(), "5".to_owned()]);
    let (report, value) = run_args(args, &json).await;
    assert_clean(&report, &value, &["watch"]);
    let w = &value["by_transport"]["watch"];
    assert_eq!(
        w["readers_started"].as_u64(),
        w["streams_started"].as_u64().map(|s| s * 5),
        "five viewers per stream"
    );
    assert_eq!(value["violations"]["viewer_text_mismatch"], 0);
    assert_eq!(value["config"]["targets"].as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_multiplexed() {
    let edge = TestEdge::start().await;
    let json = json_path("ws");
    let mut args = fast_args("ws", &edge.url(""), &json);
    args.extend(["--streams-per-socket".to_owned(), "2".to_owned()]);
    let (report, value) = run_args(args, &json).await;
    assert_clean(&report, &value, &["ws"]);
    assert!(added_delay_p99(&value, "ws").is_some());
    assert_eq!(value["config"]["streams_per_socket"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll() {
    let edge = TestEdge::start().await;
    let json = json_path("longpoll");
    let (report, value) = run_args(fast_args("longpoll", &edge.url(""), &json), &json).await;
    assert_clean(&report, &value, &["longpoll"]);
    assert!(added_delay_p99(&value, "longpoll").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_poll() {
    let edge = TestEdge::start().await;
    let json = json_path("shortpoll");
    let mut args = fast_args("shortpoll", &edge.url(""), &json);
    args.extend(["--poll-interval-ms".to_owned(), "20".to_owned()]);
    let (report, value) = run_args(args, &json).await;
    assert_clean(&report, &value, &["shortpoll"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_draws_every_transport() {
    let edge = TestEdge::start().await;
    let json = json_path("mixed");
    let mut args = fast_args_n("mixed", &edge.url(""), &json, 12);
    args.extend(
        [
            "--mix",
            "native=1,chat=1,ws=1,longpoll=1,shortpoll=1,watch=1",
            "--viewers",
            "2",
            "--poll-interval-ms",
            "20",
        ]
        .map(str::to_owned),
    );
    let (report, value) = run_args(args, &json).await;
    let kinds = ["native", "chat", "ws", "longpoll", "shortpoll", "watch"];
    assert_clean(&report, &value, &kinds);
    assert_eq!(report.by_transport.len(), kinds.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_arrivals() {
    let edge = TestEdge::start().await;
    let json = json_path("open");
    let mut args = fast_args("native", &edge.url(""), &json);
    args.extend(["--rate", "40", "--max-in-flight", "100"].map(str::to_owned));
    let (report, value) = run_args(args, &json).await;
    assert_clean(&report, &value, &["native"]);
    assert_eq!(value["config"]["loop_kind"], "open");
    // 40/s rising over 0.2 s, until the end of the window at 1.4 s: about 52 arrivals.
    let started = report.total.streams_started;
    assert!((40..=60).contains(&started), "{started} streams started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_floor() {
    let config =
        <tokenfan_generator::GeneratorConfig as clap::Parser>::parse_from(["tokenfan-generator"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let stats = Arc::new(tokenfan_generator::Stats::default());
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { tokenfan_generator::serve_grpc(&config, listener, stats, shutdown).await }
    });
    // Ready once it answered one call (it tokenizes its corpus first).
    let mut client =
        tokenfan_proto::v1::generator_client::GeneratorClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
    let first = tokenfan_proto::v1::GenerateRequest {
        messages: vec![tokenfan_proto::v1::ChatMessage {
            role: "user".to_owned(),
            content: "ready?".to_owned(),
        }],
        max_tokens: 1,
        ..Default::default()
    };
    let mut stream = client.generate(first).await.expect("generate").into_inner();
    while stream.message().await.expect("message").is_some() {}
    let json = json_path("grpc");
    let (report, value) =
        run_args(fast_args("grpc", &format!("http://{addr}"), &json), &json).await;
    shutdown.cancel();
    let _ = server.await;
    assert_clean(&report, &value, &["grpc"]);
    assert!(
        added_delay_p99(&value, "grpc").is_some(),
        "the generator's emit times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections() {
    let edge = TestEdge::start().await;
    let json = json_path("idle");
    let args = [
        "tokenfan-loadgen",
        "idle",
        "--kind",
        "ws-subscribed",
        "--connections",
        "20",
        "--settle-secs",
        "0.1",
        "--no-metrics",
        "--label",
        "test",
        "--target",
    ]
    .map(str::to_owned)
    .into_iter()
    .chain([
        edge.url(""),
        "--server-pid".to_owned(),
        std::process::id().to_string(),
        "--json".to_owned(),
        json.display().to_string(),
    ])
    .collect::<Vec<_>>();
    let outcome = run(Cli::try_parse_from(&args).expect("parse"))
        .await
        .expect("idle runs");
    assert!(outcome.ok, "the idle run found a problem");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("written")).expect("parses");
    let _ = std::fs::remove_file(&json);
    assert_eq!(v["opened"], 20);
    assert_eq!(v["tokens_seen"], 0);
    assert_eq!(v["inside_silent_window"], true);
    assert!(v["server_rss_per_connection_kib"].as_f64().is_some());
}

/// A server that answers every POST-SSE with the same broken stream: seq 2 twice, seq 4
/// before 3, seq 6 never, and a terminal event that says 7 tokens.
async fn broken_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let body = [
        (1, "token"),
        (2, "token"),
        (2, "token"),
        (4, "token"),
        (3, "token"),
        (5, "token"),
        (7, "token"),
        (8, "done"),
    ]
    .iter()
    .map(|(seq, kind)| {
        let data = if *kind == "token" {
            format!(r#"{{"type":"token","seq":{seq},"text":"t{seq}","emitted_at_unix_nanos":1}}"#)
        } else {
            format!(
                r#"{{"type":"done","seq":{seq},"finish_reason":"length","usage":{{"prompt_tokens":1,"completion_tokens":7}}}}"#
            )
        };
        format!("id: {seq}\nevent: {kind}\ndata: {data}\n\n")
    })
    .collect::<String>();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                // Read the request head and its body (Content-Length), then answer and close.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_on_the_wire_are_counted_and_fail_the_run() {
    let (addr, server) = broken_server().await;
    let json = json_path("broken");
    let args = fast_args_n("native", &format!("http://{addr}"), &json, 1);
    let cli = Cli::try_parse_from(&args).expect("parse");
    let outcome = run(cli).await.expect("the run completes");
    server.abort();
    let _ = std::fs::remove_file(&json);
    let report = outcome.report.expect("report");
    assert!(!outcome.ok, "a run with violations is not ok");
    let streams = report.total.readers_started;
    assert!(streams > 0);
    let v = &report.violations;
    assert_eq!(v["duplicated"], streams, "one duplicate per stream");
    assert_eq!(v["out_of_order"], streams, "one late seq per stream");
    assert_eq!(v["lost"], streams, "one lost seq per stream");
    assert_eq!(v["usage_mismatch"], 0, "usage 7 = 6 received + 1 lost");
    assert_eq!(report.total.readers_clean, 0);
}
