//! The `tokenfan-edge` binary from outside: `--help`, bad configuration, the embedded default
//! end to end, and SIGTERM.

mod common;

use std::{process::Command, time::Duration};

use tokenfan_testkit::binary::{assert_help_names_env_vars, terminate};

const BIN: &str = env!("CARGO_BIN_EXE_tokenfan-edge");

#[test]
fn help_lists_every_option_with_its_environment_variable() {
    assert_help_names_env_vars(
        BIN,
        &[
            ("--listen", "TOKENFAN_EDGE_LISTEN"),
            ("--generator", "TOKENFAN_EDGE_GENERATOR"),
            ("--nats-url", "TOKENFAN_EDGE_NATS_URL"),
            ("--redis-url", "TOKENFAN_EDGE_REDIS_URL"),
            ("--replica-id", "TOKENFAN_EDGE_REPLICA_ID"),
            ("--cors-origins", "TOKENFAN_EDGE_CORS_ORIGINS"),
            ("--ws-origins", "TOKENFAN_EDGE_WS_ORIGINS"),
            ("--tls-cert", "TOKENFAN_EDGE_TLS_CERT"),
            ("--detach-grace-secs", "TOKENFAN_EDGE_DETACH_GRACE_SECS"),
            ("--history-ttl-secs", "TOKENFAN_EDGE_HISTORY_TTL_SECS"),
            ("--max-tokens-cap", "TOKENFAN_EDGE_MAX_TOKENS_CAP"),
        ],
    );
}

#[test]
fn invalid_configuration_exits_with_a_message() {
    for args in [
        vec!["--generator", "not a url"],
        vec!["--default-max-tokens", "10", "--max-tokens-cap", "5"],
        vec!["--tls-cert", "/nonexistent.pem"],
    ] {
        let out = Command::new(BIN).args(&args).output().expect("run");
        assert!(!out.status.success(), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: says why");
    }
}

#[tokio::test]
async fn embedded_default_serves_a_stream_and_sigterm_drains() {
    let mut child = common::edge_command().spawn().expect("spawn");
    let (addr, _) = common::listening(&mut child, "edge");

    let http = reqwest::Client::new();
    let body: serde_json::Value = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "tokenfan-mock",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "timing": {"ttft_ms": 1, "inter_token_ms": 1}
        }))
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 8);

    // An SSE reader attached to a long stream sees its response end at SIGTERM (it would
    // reconnect elsewhere) and the process exits on its own within the drain.
    let r = http
        .post(format!("http://{addr}/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&serde_json::json!({"prompt": "long", "max_tokens": 50, "timing": {"inter_token_ms": 10}}))
        .send()
        .await
        .expect("POST");
    let reader = tokio::spawn(async move { r.text().await.map(|t| t.len()) });
    let status = terminate(&mut child, Duration::from_secs(40)).await;
    let read = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the SSE response ends")
        .expect("reader");
    assert!(read.is_ok_and(|n| n > 0));
    assert!(status.success(), "{status:?}");
}
