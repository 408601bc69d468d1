//! What the real OpenAI API accepts, the edge accepts (options that cannot change a mock's
//! answer), and what would change the answer's shape is refused in OpenAI's 400 shape; a stream
//! cut by shutdown ends with an error chunk; `x-request-id` is echoed.

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokenfan_testkit::edge::TestEdge;

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "tokenfan-mock",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 6,
        "timing": {"ttft_ms": 1, "inter_token_ms": 1},
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

async fn post(edge: &TestEdge, body: &Value) -> (u16, Value) {
    let r = edge.post("/v1/chat/completions", body).await;
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
}

#[tokio::test]
async fn options_the_real_api_accepts_are_accepted() {
    let edge = TestEdge::start().await;
    for extra in [
        json!({"stream": null}),
        json!({"seed": -5}),
        json!({"seed": i64::MIN}),
        json!({"seed": u64::MAX}),
        json!({"temperature": 0.2, "top_p": 0.9, "frequency_penalty": 0.5,
               "presence_penalty": -0.5, "logit_bias": {"50256": -100}, "user": "u-1",
               "stop": ["\n\n"], "logprobs": false, "n": 1, "response_format": {"type": "text"}}),
        json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "function_call": {"name": "w", "arguments": "{}"}},
            {"role": "function", "name": "w", "content": "sunny"},
        ]}),
    ] {
        let (status, body) = post(&edge, &chat(extra.clone())).await;
        assert_eq!(status, 200, "{extra}: {body}");
        assert_eq!(body["object"], "chat.completion", "{extra}");
    }
    // A negative seed decides the answer like any other seed.
    let (_, a) = post(&edge, &chat(json!({"seed": -5}))).await;
    let (_, b) = post(&edge, &chat(json!({"seed": -5}))).await;
    let (_, c) = post(&edge, &chat(json!({"seed": -6}))).await;
    assert_eq!(content(&a), content(&b));
    assert_ne!(content(&a), content(&c));
}

#[tokio::test]
async fn options_that_change_the_answer_shape_are_refused_like_openai() {
    let edge = TestEdge::start().await;
    for (extra, param) in [
        (json!({"n": 2}), "n"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"seed": 1.5}), "seed"),
    ] {
        let (status, body) = post(&edge, &chat(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {body}");
        let e = &body["error"];
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert_eq!(e["param"], param, "{body}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(e.get("code").is_some(), "{body}");
    }
}

#[tokio::test]
async fn x_request_id_is_echoed() {
    let edge = TestEdge::start().await;
    for (path, body) in [
        ("/v1/chat/completions", chat(json!({}))),
        ("/v1/chat/completions", json!({"bogus": true})),
    ] {
        let r = edge
            .http
            .post(edge.url(path))
            .header("x-request-id", "req-abc-123")
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.headers()["x-request-id"], "req-abc-123", "{body}");
    }
}

#[tokio::test]
async fn a_stream_cut_by_shutdown_ends_with_an_error_chunk() {
    let edge = TestEdge::start().await;
    let r = edge
        .post(
            "/v1/chat/completions",
            &chat(json!({"stream": true, "max_tokens": 200,
            "timing": {"ttft_ms": 1, "inter_token_ms": 200}})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    // Wait for the role chunk, then stop the server.
    while !text.contains("\n\n") {
        let chunk = body.next().await.expect("chunk").expect("bytes");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    edge.shutdown.cancel();
    let rest = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(rest.is_ok(), "the response ends");
    let last = text
        .split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .last()
        .expect("a last frame");
    assert!(!text.contains("[DONE]"), "{text}");
    let data = last.strip_prefix("data: ").expect("a data line");
    let error: Value = serde_json::from_str(data).expect("json");
    assert_eq!(error["error"]["code"], "server_shutdown", "{last}");
    assert_eq!(error["error"]["type"], "server_error", "{last}");
}
