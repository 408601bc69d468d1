//! The `tokenfan-generator` binary from outside: `--help`, `/metrics` while streaming, SIGTERM.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokenfan_proto::v1::{ChatMessage, GenerateRequest, Timing, generator_client::GeneratorClient};
use tokenfan_testkit::binary::{assert_help_names_env_vars, terminate};

const BIN: &str = env!("CARGO_BIN_EXE_tokenfan-generator");

#[test]
fn help_lists_every_option_with_its_environment_variable() {
    assert_help_names_env_vars(
        BIN,
        &[
            ("--listen", "TOKENFAN_GENERATOR_LISTEN"),
            ("--metrics-listen", "TOKENFAN_GENERATOR_METRICS_LISTEN"),
            ("--allow-faults", "TOKENFAN_GENERATOR_ALLOW_FAULTS"),
            ("--ttft-ms", "TOKENFAN_GENERATOR_TTFT_MS"),
            ("--inter-token-ms", "TOKENFAN_GENERATOR_INTER_TOKEN_MS"),
            ("--jitter-ms", "TOKENFAN_GENERATOR_JITTER_MS"),
            ("--max-tokens-cap", "TOKENFAN_GENERATOR_MAX_TOKENS_CAP"),
            (
                "--shutdown-grace-secs",
                "TOKENFAN_GENERATOR_SHUTDOWN_GRACE_SECS",
            ),
            ("--log-format", "TOKENFAN_LOG_FORMAT"),
            ("--otlp-endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ],
    );
}

#[test]
fn invalid_configuration_exits_with_a_message() {
    let out = Command::new(BIN)
        .args(["--ttft-ms", "50000", "--max-ttft-ms", "100"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ttft-ms"), "{err}");
}

struct Running {
    child: Child,
    grpc: String,
    metrics: String,
}

fn spawn() -> Running {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let (grpc, metrics) = loop {
        let line = lines
            .next()
            .expect("the generator logs its addresses")
            .expect("read");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &v["fields"];
        if fields["message"] == "tokenfan-generator listening" {
            break (
                fields["grpc"].as_str().expect("grpc").to_string(),
                fields["metrics"].as_str().expect("metrics").to_string(),
            );
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Running {
        child,
        grpc,
        metrics,
    }
}

async fn gauge(metrics: &str) -> Option<f64> {
    let body = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find(|l| l.starts_with("tokenfan_generator_active_generations "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

async fn wait_for_gauge(metrics: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if gauge(metrics).await == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "active generations never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_follow_a_stream_and_sigterm_exits_cleanly() {
    let mut running = spawn();
    let mut client = GeneratorClient::connect(format!("http://{}", running.grpc))
        .await
        .expect("connect");
    let request = GenerateRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "metrics".into(),
        }],
        max_tokens: 1000,
        timing: Some(Timing {
            ttft_ms: Some(0),
            inter_token_ms: Some(100),
            jitter_ms: Some(0),
        }),
        ..Default::default()
    };
    let mut stream = client.generate(request).await.expect("call").into_inner();
    stream.message().await.expect("ok").expect("token");
    wait_for_gauge(&running.metrics, 1.0).await;
    drop(stream);
    wait_for_gauge(&running.metrics, 0.0).await;

    let body = reqwest::get(format!("http://{}/metrics", running.metrics))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    assert!(body.contains("tokenfan_generator_tokens_total"), "{body}");
    assert!(
        body.contains(r#"tokenfan_generator_generations_total{outcome="cancelled"} 1"#),
        "{body}"
    );

    let status = terminate(&mut running.child, Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}
