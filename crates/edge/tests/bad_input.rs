//! Bad input gets the right status and a JSON body naming the problem, and changes nothing:
//! a stream running alongside completes untouched.

use reqwest::Method;
use serde_json::Value;
use tokenfan_testkit::{
    edge::{TestEdge, slow},
    sse::{assert_contiguous, read_sse, stream_events, text_of},
};

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(
    name: &'static str,
    method: Method,
    path: &str,
    body: &str,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name,
        method,
        path: path.to_string(),
        content_type: Some("application/json"),
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
        status,
        code,
    }
}

#[tokio::test]
async fn every_malformed_request_gets_a_clear_error_and_changes_nothing() {
    let edge = TestEdge::with(|c| c.http.max_body_bytes = 4096).await;
    // A stream that must be unaffected by everything below.
    let bystander = edge
        .http
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&slow("bystander", 60, 5))
        .send()
        .await
        .expect("POST");
    let bystander_id = bystander.headers()["x-stream-id"]
        .to_str()
        .expect("id")
        .to_string();
    let reader = tokio::spawn(read_sse(bystander));
    let id = bystander_id.as_str();
    let streams_before = edge.running.hub.len();

    let post = Method::POST;
    let get = Method::GET;
    let mut cases = vec![
        case(
            "malformed JSON",
            post.clone(),
            "/v1/streams",
            r#"{"prompt":"#,
            400,
            "invalid_json",
        ),
        case(
            "wrong type",
            post.clone(),
            "/v1/streams",
            r#"{"prompt":42}"#,
            400,
            "invalid_request",
        ),
        case(
            "unknown field",
            post.clone(),
            "/v1/streams",
            r#"{"prompt":"a","tempo":1}"#,
            400,
            "invalid_request",
        ),
        case(
            "both prompt and messages",
            post.clone(),
            "/v1/streams",
            r#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#,
            400,
            "invalid_request",
        ),
        case(
            "no messages",
            post.clone(),
            "/v1/streams",
            r#"{"messages":[]}"#,
            400,
            "invalid_request",
        ),
        case(
            "absurd max_tokens",
            post.clone(),
            "/v1/streams",
            r#"{"prompt":"a","max_tokens":99999999}"#,
            400,
            "invalid_request",
        ),
        case(
            "negative max_tokens",
            post.clone(),
            "/v1/streams",
            r#"{"prompt":"a","max_tokens":-5}"#,
            400,
            "invalid_request",
        ),
        case(
            "timing out of bounds",
            post.clone(),
            "/v1/streams",
            r#"{"prompt":"a","timing":{"inter_token_ms":600000}}"#,
            400,
            "invalid_request",
        ),
        case(
            "unknown model",
            post.clone(),
            "/v1/streams",
            r#"{"prompt":"a","model":"gpt-99"}"#,
            404,
            "model_not_found",
        ),
        case(
            "JSON array",
            post.clone(),
            "/v1/streams",
            r#"[1,2]"#,
            400,
            "invalid_request",
        ),
        case(
            "empty body",
            post.clone(),
            "/v1/streams",
            "",
            400,
            "invalid_json",
        ),
        case(
            "unknown stream",
            get.clone(),
            "/v1/streams/AAAAAAAAAAAAAAAAAAAAAA",
            "",
            404,
            "stream_not_found",
        ),
        case(
            "malformed stream id",
            get.clone(),
            "/v1/streams/..%2F..%2Fetc",
            "",
            404,
            "stream_not_found",
        ),
        case(
            "unknown stream events",
            get.clone(),
            "/v1/streams/AAAAAAAAAAAAAAAAAAAAAA/events",
            "",
            404,
            "stream_not_found",
        ),
        case(
            "unknown stream poll",
            get.clone(),
            "/v1/streams/AAAAAAAAAAAAAAAAAAAAAA/poll",
            "",
            404,
            "stream_not_found",
        ),
        case(
            "unknown stream delete",
            Method::DELETE,
            "/v1/streams/AAAAAAAAAAAAAAAAAAAAAA",
            "",
            404,
            "stream_not_found",
        ),
        case(
            "bogus after",
            get.clone(),
            &format!("/v1/streams/{id}?after=abc"),
            "",
            400,
            "invalid_cursor",
        ),
        case(
            "negative after",
            get.clone(),
            &format!("/v1/streams/{id}/poll?after=-1"),
            "",
            400,
            "invalid_cursor",
        ),
        case(
            "cursor beyond the end",
            get.clone(),
            &format!("/v1/streams/{id}?after=100000"),
            "",
            400,
            "cursor_out_of_range",
        ),
        case(
            "long-poll timeout over the cap",
            get.clone(),
            &format!("/v1/streams/{id}/poll?timeout_ms=999999"),
            "",
            400,
            "invalid_request",
        ),
        case(
            "unknown format",
            get.clone(),
            &format!("/v1/streams/{id}/events?format=xml"),
            "",
            400,
            "invalid_request",
        ),
        case(
            "unknown endpoint",
            get.clone(),
            "/v2/nothing",
            "",
            404,
            "not_found",
        ),
    ];
    let mut c = case(
        "not JSON content type",
        post.clone(),
        "/v1/streams",
        r#"{"prompt":"a"}"#,
        415,
        "unsupported_media_type",
    );
    c.content_type = Some("text/plain");
    cases.push(c);
    let mut c = case(
        "no content type",
        post.clone(),
        "/v1/streams",
        r#"{"prompt":"a"}"#,
        415,
        "unsupported_media_type",
    );
    c.content_type = None;
    cases.push(c);
    let mut c = case(
        "invalid UTF-8",
        post.clone(),
        "/v1/streams",
        "",
        400,
        "invalid_json",
    );
    c.body = b"{\"prompt\":\"\xff\xfe\"}".to_vec();
    cases.push(c);
    let mut c = case(
        "huge body",
        post.clone(),
        "/v1/streams",
        "",
        413,
        "body_too_large",
    );
    c.body = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(10_000)).into_bytes();
    cases.push(c);
    let mut c = case(
        "bogus Last-Event-ID",
        get.clone(),
        &format!("/v1/streams/{id}/events"),
        "",
        400,
        "invalid_cursor",
    );
    c.headers.push(("last-event-id", "not-a-number"));
    cases.push(c);

    for c in cases {
        let mut req = edge
            .http
            .request(c.method.clone(), edge.url(&c.path))
            .body(c.body.clone());
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in &c.headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.expect(c.name);
        assert_eq!(r.status().as_u16(), c.status, "{}", c.name);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .expect("ct")
                .starts_with("application/json"),
            "{}: JSON error body",
            c.name
        );
        let body: Value = r.json().await.expect(c.name);
        assert_eq!(body["error"]["code"], c.code, "{}: {body}", c.name);
        let message = body["error"]["message"].as_str().expect("message");
        assert!(!message.is_empty(), "{}", c.name);
    }
    assert_eq!(
        edge.running.hub.len(),
        streams_before,
        "no stream was created"
    );

    let (events, _) = reader.await.expect("bystander");
    let json: Vec<Value> = stream_events(&events);
    assert_contiguous(&json, 1);
    assert_eq!(json.last().expect("end")["finish_reason"], "length");
    assert_eq!(text_of(&json), text_of(&edge.wait_finished(id).await));
}

#[tokio::test]
async fn openai_errors_have_the_openai_shape() {
    let edge = TestEdge::start().await;
    for (body, status, param) in [
        (
            r#"{"messages":[{"role":"user","content":"a"}]}"#,
            400,
            "model",
        ),
        (
            r#"{"model":"tokenfan-mock","messages":[{"role":"user","content":"a"}],"n":2}"#,
            400,
            "n",
        ),
        (
            r#"{"model":"tokenfan-mock","messages":[{"role":"user","content":"a"}],"tools":[{"type":"function"}]}"#,
            400,
            "tools",
        ),
        (
            r#"{"model":"nope","messages":[{"role":"user","content":"a"}]}"#,
            404,
            "model",
        ),
        (
            r#"{"model":"tokenfan-mock","messages":[{"role":"user","content":"a"}],"stream_options":{"include_usage":true}}"#,
            400,
            "stream_options",
        ),
        (
            r#"{"model":"tokenfan-mock","messages":[{"role":"user","content":"a"}],"max_tokens":0}"#,
            400,
            "max_tokens",
        ),
    ] {
        let r = edge
            .http
            .post(edge.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.expect("json");
        let e = &v["error"];
        assert!(e["message"].is_string(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert_eq!(e["param"], param, "{v}");
        assert!(e["code"].is_string(), "{v}");
    }
    // Extra fields SDKs send are ignored.
    let r = edge
        .http
        .post(edge.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"tokenfan-mock","messages":[{"role":"user","content":"a"}],"max_tokens":3,"temperature":0.5,"user":"u","frequency_penalty":0,"timing":{"ttft_ms":1,"inter_token_ms":1}}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_stream_cap_answers_503_with_retry_after() {
    let edge = TestEdge::with(|c| c.streams.max_streams = 1).await;
    let _first = edge.create(slow("one", 100, 50)).await;
    let r = edge.post("/v1/streams", &slow("two", 10, 5)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "capacity");
}
