//! Streams over SSE, long-poll and short-poll against a real edge (embedded generator):
//! exactly-once delivery, resume, stop, detach grace, slow readers.

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokenfan_testkit::{
    edge::{TestEdge, fast, get_json, long_poll_all, slow, try_get_json},
    sse::{SseParser, assert_contiguous, read_sse, stream_events, text_of},
    wait::wait_until,
};

#[tokio::test]
async fn post_sse_streams_every_token_then_done() {
    let edge = TestEdge::start().await;
    let r = edge
        .http
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&fast("hello", 60, 1))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["cache-control"], "no-cache");
    assert_eq!(r.headers()["x-accel-buffering"], "no");
    let id = r.headers()["x-stream-id"].to_str().expect("id").to_string();
    let (events, _) = read_sse(r).await;
    assert_eq!(events[0].retry, Some(1000), "retry hint first");
    let events = &events[1..];
    let json: Vec<Value> = events.iter().map(|e| e.json()).collect();
    assert_contiguous(&json, 1);
    for (e, j) in events.iter().zip(&json) {
        assert_eq!(e.id.as_deref(), Some(j["seq"].to_string().as_str()));
        assert_eq!(e.event.as_deref(), j["type"].as_str());
    }
    let last = json.last().expect("terminal");
    assert_eq!(last["type"], "done");
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 60);
    assert_eq!(json.iter().filter(|e| e["type"] != "token").count(), 1);
    // Another transport sees the same answer.
    let polled = edge.wait_finished(&id).await;
    assert_eq!(text_of(&polled), text_of(&json));
}

#[tokio::test]
async fn get_events_resumes_from_last_event_id_and_after() {
    let edge = TestEdge::start().await;
    let id = edge.create(fast("resume", 40, 2)).await;
    let all = edge.wait_finished(&id).await;
    let full = text_of(&all);
    let terminal = all.last().expect("events")["seq"].as_u64().expect("seq");

    for (header, query, first) in [
        (Some("17"), None, 18),
        (None, Some("17"), 18),
        (Some("17"), Some("3"), 18), // Last-Event-ID wins
        (Some(""), Some("5"), 6),    // an empty one counts as absent
        (None, None, 1),
    ] {
        let mut url = edge.url(&format!("/v1/streams/{id}/events"));
        if let Some(q) = query {
            url.push_str(&format!("?after={q}"));
        }
        let mut req = edge.http.get(url);
        if let Some(h) = header {
            req = req.header("last-event-id", h);
        }
        let r = req.send().await.expect("GET");
        assert_eq!(r.status(), 200);
        let (events, _) = read_sse(r).await;
        let json: Vec<Value> = events
            .iter()
            .filter(|e| !e.data.is_empty())
            .map(|e| e.json())
            .collect();
        assert_contiguous(&json, first);
        let prefix: String = text_of(&all[..first as usize - 1]);
        assert_eq!(prefix + &text_of(&json), full);
    }

    // At (or after) the end: 204 so EventSource stops; past the end: 400.
    let at_end = edge
        .http
        .get(edge.url(&format!("/v1/streams/{id}/events")))
        .header("last-event-id", terminal.to_string())
        .send()
        .await
        .expect("GET");
    assert_eq!(at_end.status(), 204);
    let past = edge
        .get(&format!("/v1/streams/{id}/events?after={}", terminal + 1))
        .await;
    assert_eq!(past.status(), 400);
    let body: Value = past.json().await.expect("json");
    assert_eq!(body["error"]["code"], "cursor_out_of_range");
}

#[tokio::test]
async fn live_resume_mid_stream_gets_the_rest_exactly_once() {
    let edge = TestEdge::start().await;
    let id = edge.create(slow("live", 60, 10)).await;
    // Read a prefix live, drop the connection, resume from the last id seen.
    let r = edge.get(&format!("/v1/streams/{id}/events")).await;
    let mut parser = SseParser::default();
    let mut body = r.bytes_stream();
    let mut got: Vec<Value> = Vec::new();
    while got.len() < 10 {
        let chunk = body.next().await.expect("more").expect("chunk");
        let text = String::from_utf8(chunk.to_vec()).expect("whole frames");
        got.extend(
            parser
                .feed(&text)
                .into_iter()
                .filter(|e| !e.data.is_empty())
                .map(|e| e.json()),
        );
    }
    drop(body);
    let last = got.last().expect("some")["seq"].as_u64().expect("seq");
    let r = edge
        .http
        .get(edge.url(&format!("/v1/streams/{id}/events")))
        .header("last-event-id", last.to_string())
        .send()
        .await
        .expect("GET");
    let (rest, _) = read_sse(r).await;
    got.extend(
        rest.into_iter()
            .filter(|e| !e.data.is_empty())
            .map(|e| e.json()),
    );
    assert_contiguous(&got, 1);
    assert_eq!(got.last().expect("end")["type"], "done");
    assert_eq!(text_of(&got), text_of(&edge.wait_finished(&id).await));
}

#[tokio::test]
async fn long_poll_and_short_poll_rebuild_the_sse_text() {
    let edge = TestEdge::start().await;
    let body = slow("polls", 50, 5);
    let sse = edge
        .http
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .expect("POST");
    let (sse_events, _) = read_sse(sse).await;
    let sse_json: Vec<Value> = sse_events
        .iter()
        .filter(|e| !e.data.is_empty())
        .map(|e| e.json())
        .collect();

    // Same seed, same answer: poll a second stream while it runs.
    let id = edge.create(body).await;
    let base = edge.url("");
    let long = long_poll_all(&edge.http, &base, &id, 0).await;
    assert_eq!(long.last().expect("end")["type"], "done");
    assert_contiguous(&long, 1);
    assert_eq!(text_of(&long), text_of(&sse_json));

    let mut after = 0;
    let mut short = Vec::new();
    loop {
        let v = edge.short_poll(&id, after).await;
        let events = v["events"].as_array().expect("events").clone();
        after = v["next_after"].as_u64().expect("next_after");
        short.extend(events);
        if v["status"] != "running" {
            break;
        }
    }
    assert_contiguous(&short, 1);
    assert_eq!(text_of(&short), text_of(&sse_json));

    // A long-poll past the end is refused; at the end it answers at once, empty.
    let r = edge
        .get(&format!("/v1/streams/{id}/poll?after={}", after + 1))
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = get_json(
        &edge.http,
        &edge.url(&format!(
            "/v1/streams/{id}/poll?after={after}&timeout_ms=55000"
        )),
    )
    .await;
    assert_eq!(v["events"], json!([]));
    assert_eq!(v["next_after"], after);
}

#[tokio::test]
async fn long_poll_times_out_with_an_empty_batch() {
    let edge = TestEdge::start().await;
    let id = edge
        .create(json!({"prompt": "wait", "max_tokens": 5, "timing": {"ttft_ms": 20_000}}))
        .await;
    let v: Value = get_json(
        &edge.http,
        &edge.url(&format!("/v1/streams/{id}/poll?after=0&timeout_ms=50")),
    )
    .await;
    assert_eq!(v["status"], "running");
    assert_eq!(v["events"], json!([]));
    assert_eq!(v["next_after"], 0);
}

#[tokio::test]
async fn delete_stops_the_stream_and_the_generator() {
    let edge = TestEdge::start().await;
    let id = edge.create(slow("stop me", 500, 20)).await;
    wait_until(Duration::from_secs(10), || async {
        (edge.generator_active() == 1).then_some(())
    })
    .await;
    let r = edge
        .http
        .delete(edge.url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["status"], "cancelled");
    wait_until(Duration::from_secs(10), || async {
        (edge.generator_active() == 0).then_some(())
    })
    .await;
    let events = edge.wait_finished(&id).await;
    let last = events.last().expect("terminal");
    assert_eq!(last["type"], "done");
    assert_eq!(last["finish_reason"], "cancelled");
    assert_contiguous(&events, 1);
    // Idempotent afterwards.
    let again = edge
        .http
        .delete(edge.url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn a_stream_nobody_watches_is_cancelled_after_the_detach_grace() {
    let edge = TestEdge::with(|c| c.streams.detach_grace_secs = 1).await;
    let id = edge.create(slow("unwatched", 1000, 20)).await;
    // Never attached: the grace runs from creation. Watch through the hub (a poll would
    // count as attention and restart the clock).
    let stream = edge.stream(&id).await;
    wait_until(Duration::from_secs(10), || async {
        (stream.status().as_str() != "running").then_some(())
    })
    .await;
    assert_eq!(stream.status().as_str(), "cancelled");
    wait_until(Duration::from_secs(10), || async {
        (edge.generator_active() == 0).then_some(())
    })
    .await;

    // An attached reader keeps a stream alive past the grace.
    let r = edge
        .http
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&slow("watched", 100, 25))
        .send()
        .await
        .expect("POST");
    let (events, _) = read_sse(r).await;
    let last = events.last().expect("terminal").json();
    assert_eq!(last["finish_reason"], "length");
}

#[tokio::test]
async fn disconnecting_is_not_stopping() {
    let edge = TestEdge::with(|c| c.streams.detach_grace_secs = 30).await;
    let r = edge
        .http
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&slow("keep going", 30, 5))
        .send()
        .await
        .expect("POST");
    let id = r.headers()["x-stream-id"].to_str().expect("id").to_string();
    let mut body = r.bytes_stream();
    body.next().await.expect("first chunk").expect("ok");
    drop(body);
    let events = edge.wait_finished(&id).await;
    let last = events.last().expect("terminal");
    assert_eq!(
        last["finish_reason"], "length",
        "the stream finished despite the disconnect"
    );
    assert_contiguous(&events, 1);
}

#[tokio::test]
async fn a_reader_that_stops_reading_does_not_hold_back_the_others() {
    // A tiny byte cap makes the stalled reader hit slow_consumer quickly.
    let edge = TestEdge::with(|c| {
        c.streams.subscriber_queue = 4;
        c.streams.subscriber_max_bytes = 2048;
    })
    .await;
    let id = edge.create(slow("fan", 300, 2)).await;
    // The stalled reader: opens the stream and never reads the body.
    let stalled = edge.get(&format!("/v1/streams/{id}/events")).await;
    let healthy = edge.get(&format!("/v1/streams/{id}/events")).await;
    let (events, _) = read_sse(healthy).await;
    let json: Vec<Value> = stream_events(&events);
    assert_eq!(json.last().expect("terminal")["type"], "done");
    let all = edge.wait_finished(&id).await;
    assert_eq!(
        text_of(&json),
        text_of(&all),
        "every character, coalesced or not"
    );
    // The stalled reader finally reads: whatever it gets is a prefix in order, then either the
    // rest or a slow_consumer notice telling it where to resume.
    let (late, _) = read_sse(stalled).await;
    let late_json: Vec<Value> = late
        .iter()
        .filter(|e| !e.data.is_empty())
        .map(|e| e.json())
        .collect();
    let tokens: Vec<&Value> = late_json
        .iter()
        .filter(|e| e.get("seq").is_some())
        .collect();
    let mut last = 0;
    for t in tokens {
        let seq = t["seq"].as_u64().expect("seq");
        assert!(seq > last, "in order, no duplicates");
        last = seq;
    }
    let ended_slow = late_json.iter().any(|e| e["code"] == "slow_consumer");
    let ended_done = late_json.last().is_some_and(|e| e["type"] == "done");
    assert!(ended_slow || ended_done, "{late_json:?}");
}

#[tokio::test]
async fn many_subscribers_each_get_everything_exactly_once() {
    let edge = TestEdge::start().await;
    let id = edge.create(slow("fanout", 80, 3)).await;
    let readers = (0..20).map(|_| {
        let req = edge.http.get(edge.url(&format!("/v1/streams/{id}/events")));
        async move { read_sse(req.send().await.expect("GET")).await.0 }
    });
    let results = futures::future::join_all(readers).await;
    let reference = text_of(&edge.wait_finished(&id).await);
    for events in results {
        let json: Vec<Value> = stream_events(&events);
        assert_contiguous(&json, 1);
        assert_eq!(text_of(&json), reference);
    }
}

#[tokio::test]
async fn openai_stream_format_field_by_field() {
    let edge = TestEdge::start().await;
    let r = edge
        .post(
            "/v1/chat/completions",
            &json!({
                "model": "tokenfan-mock",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": 12,
                "seed": 3,
                "temperature": 0.2,
                "timing": {"ttft_ms": 5, "inter_token_ms": 2}
            }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-stream-id"].to_str().expect("id").to_string();
    let (events, _) = read_sse(r).await;
    assert_eq!(events.last().expect("last").data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| e.json())
        .collect();
    for c in &chunks {
        assert_eq!(c["id"], format!("chatcmpl-{id}"));
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "tokenfan-mock");
        assert!(c["created"].as_u64().is_some());
        assert!(
            c.get("usage").is_some(),
            "include_usage: usage on every chunk"
        );
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let content: Vec<&Value> = chunks[1..chunks.len() - 2].iter().collect();
    assert_eq!(content.len(), 12, "one chunk per token");
    for (i, c) in content.iter().enumerate() {
        assert_eq!(
            events[i + 1].id.as_deref(),
            Some((i + 1).to_string().as_str())
        );
        assert!(c["choices"][0]["finish_reason"].is_null());
        assert!(c["choices"][0]["delta"]["content"].is_string());
    }
    // Only the last chunk of the ending carries the terminal id (13 = one past 12 tokens).
    let n = events.len();
    assert_eq!(events[n - 3].id, None, "finish chunk");
    assert_eq!(events[n - 2].id.as_deref(), Some("13"), "usage chunk");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let u = &usage["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().expect("p") + 12)
    );
    let text: String = content
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content")
        })
        .collect();
    assert_eq!(text, text_of(&edge.wait_finished(&id).await));

    // Non-streaming: one completion object with the same text for the same seed.
    let v: Value = edge
        .post(
            "/v1/chat/completions",
            &json!({
                "model": "tokenfan-mock",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 12,
                "seed": 3,
                "timing": {"ttft_ms": 5, "inter_token_ms": 2}
            }),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);

    // The same stream replayed as OpenAI chunks over GET.
    let r = edge
        .get(&format!("/v1/streams/{id}/events?format=openai"))
        .await;
    let (replay, _) = read_sse(r).await;
    assert_eq!(replay.last().expect("last").data, "[DONE]");
}

#[tokio::test]
async fn openai_cancel_mid_stream_sends_an_error_and_no_done() {
    let edge = TestEdge::start().await;
    let r = edge
        .post(
            "/v1/chat/completions",
            &json!({
                "model": "tokenfan-mock",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": true,
                "max_tokens": 500,
                "timing": {"ttft_ms": 5, "inter_token_ms": 20}
            }),
        )
        .await;
    let id = r.headers()["x-stream-id"].to_str().expect("id").to_string();
    let reader = tokio::spawn(read_sse(r));
    wait_until(Duration::from_secs(10), || async {
        let v = edge.short_poll(&id, 0).await;
        (v["next_after"].as_u64() >= Some(3)).then_some(())
    })
    .await;
    let d = edge
        .http
        .delete(edge.url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(d.status(), 202);
    let (events, _) = reader.await.expect("reader");
    let last = events.last().expect("last");
    assert_ne!(last.data, "[DONE]");
    assert!(last.json()["error"]["message"].is_string(), "{last:?}");
}

#[tokio::test]
async fn models_health_ready_and_metrics() {
    let edge = TestEdge::start().await;
    let models: Value = get_json(&edge.http, &edge.url("/v1/models")).await;
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert!(ids.contains(&"tokenfan-mock"));
    assert_eq!(edge.get("/healthz").await.status(), 200);
    // Metrics and readiness are on the admin listener only; health is on both.
    for path in ["/metrics", "/readyz"] {
        let r = edge.get(path).await;
        assert_eq!(r.status(), 404, "{path} is not on the public port");
    }
    let r = edge.http.get(edge.admin_url("/healthz")).send().await;
    assert_eq!(r.expect("GET").status(), 200);
    let ready = wait_until(Duration::from_secs(10), || async {
        let r = edge.http.get(edge.admin_url("/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    let v: Value = ready.json().await.expect("json");
    assert_eq!(v["checks"]["generator"], "ok");

    let id = edge.create(fast("metrics", 5, 1)).await;
    edge.wait_finished(&id).await;
    let metrics = edge.metrics().await;
    assert!(metrics.contains("tokenfan_edge_streams_total"), "{metrics}");
    assert!(
        metrics.contains("tokenfan_edge_time_to_first_token_seconds"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_demo_page_is_served_with_security_headers() {
    let edge = TestEdge::start().await;
    let r = edge.get("/").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/html")
    );
    assert!(r.headers().contains_key("content-security-policy"));
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let html = r.text().await.expect("html");
    assert!(html.contains("/app.js"));
    for path in ["/app.js", "/style.css"] {
        assert_eq!(edge.get(path).await.status(), 200);
    }
}

#[tokio::test]
async fn emit_times_are_opt_in() {
    let edge = TestEdge::start().await;
    let mut body = fast("timed", 5, 1);
    body["emit_times"] = json!(true);
    let timed = edge.create(body).await;
    let plain = edge.create(fast("timed", 5, 1)).await;
    let timed_events = edge.wait_finished(&timed).await;
    let plain_events = edge.wait_finished(&plain).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    for e in timed_events.iter().filter(|e| e["type"] == "token") {
        let t = e["emitted_at_unix_nanos"].as_i64().expect("emit time");
        assert!(t > 0 && t <= now);
    }
    assert!(
        plain_events
            .iter()
            .all(|e| e.get("emitted_at_unix_nanos").is_none())
    );
    assert_eq!(text_of(&timed_events), text_of(&plain_events));
}

#[tokio::test]
async fn sse_sends_heartbeat_comments_while_idle() {
    let edge = TestEdge::with(|c| c.http.sse_heartbeat_secs = 1).await;
    let body = json!({"prompt": "quiet", "max_tokens": 2, "timing": {"ttft_ms": 2500, "inter_token_ms": 1}});
    let id = edge.create(body).await;
    let r = edge.get(&format!("/v1/streams/{id}/events")).await;
    let (events, comments) = read_sse(r).await;
    assert!(
        comments >= 2,
        "heartbeats while waiting for the first token: {comments}"
    );
    let json: Vec<Value> = stream_events(&events);
    assert_contiguous(&json, 1);
    assert_eq!(json.len(), 3);
}

#[tokio::test]
async fn expired_history_answers_410_and_polls_replay_whole_histories() {
    let edge = TestEdge::with(|c| {
        c.streams.history_ttl_secs = 0;
        c.streams.subscriber_max_bytes = 300;
        c.streams.subscriber_queue = 4;
    })
    .await;
    let id = edge.create(fast("expire", 40, 9)).await;
    // A history larger than the byte cap is still replayed whole by a long-poll from 0.
    let all: Value = wait_until(Duration::from_secs(10), || async {
        let v: Value = try_get_json(
            &edge.http,
            &edge.url(&format!("/v1/streams/{id}/poll?after=0&timeout_ms=1000")),
        )
        .await?;
        (v["status"] == "done").then_some(v)
    })
    .await;
    let events = all["events"].as_array().expect("events").clone();
    assert_contiguous(&events, 1);
    assert_eq!(events.len(), 41);
    // Past the (zero) history TTL the sweeper forgets the stream: 410, not a silent replay.
    let r = wait_until(Duration::from_secs(15), || async {
        let r = edge
            .http
            .get(edge.url(&format!("/v1/streams/{id}/events")))
            .send()
            .await
            .ok()?;
        (r.status() == 410).then_some(r)
    })
    .await;
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "history_expired");
}

#[tokio::test]
async fn polling_keeps_a_stream_alive_past_the_detach_grace() {
    let edge = TestEdge::with(|c| c.streams.detach_grace_secs = 1).await;
    let id = edge.create(slow("polled", 120, 20)).await;
    let events = long_poll_all(&edge.http, &edge.url(""), &id, 0).await;
    assert_contiguous(&events, 1);
    assert_ne!(events.last().expect("end")["finish_reason"], "cancelled");
}
