//! A cursor ahead of a running stream (accepted: a client may have read further on another
//! replica) that the stream never reaches because it ends first: the SSE response and the
//! waiting long-poll end with the stream instead of waiting forever.

use std::time::Duration;

use serde_json::Value;
use tokenfan_testkit::{
    edge::{TestEdge, slow},
    sse::{read_sse, stream_events},
    wait::wait_until,
};

#[tokio::test]
async fn waits_on_a_cursor_the_stream_never_reaches_end_with_the_stream() {
    let edge = TestEdge::start().await;
    // 50 tokens (seqs up to 51) at 200 ms each: still running when it is stopped below.
    let id = edge.create(slow("hello", 50, 200)).await;
    let sse = edge
        .http
        .get(edge.url(&format!("/v1/streams/{id}/events")))
        .header("last-event-id", "40")
        .send()
        .await
        .expect("GET events");
    assert_eq!(
        sse.status(),
        200,
        "a cursor ahead of a running stream is accepted"
    );
    let poll = {
        let (http, url) = (
            edge.http.clone(),
            edge.url(&format!("/v1/streams/{id}/poll?after=40&timeout_ms=55000")),
        );
        tokio::spawn(async move { http.get(url).send().await.expect("long-poll") })
    };
    let state = edge.stream(&id).await;
    wait_until(Duration::from_secs(10), || async {
        (state.attached_count() == 2).then_some(())
    })
    .await;

    let stopped = edge
        .http
        .delete(edge.url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(stopped.status(), 202);
    let terminal = state.last_seq();
    assert!(
        terminal < 40,
        "stopped at seq {terminal}, before the cursor"
    );

    let (events, _) = tokio::time::timeout(Duration::from_secs(10), read_sse(sse))
        .await
        .expect("the SSE response ends with the stream");
    assert!(stream_events(&events).is_empty(), "{events:?}");
    let poll = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long-poll answers when the stream ends")
        .expect("poll task");
    assert_eq!(poll.status(), 200);
    let body: Value = poll.json().await.expect("json");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["events"], serde_json::json!([]));
    assert_eq!(body["next_after"], 40);

    // EventSource reconnects with its Last-Event-ID and is told the cursor is past the end.
    let again = edge
        .http
        .get(edge.url(&format!("/v1/streams/{id}/events")))
        .header("last-event-id", "40")
        .send()
        .await
        .expect("GET events");
    assert_eq!(again.status(), 400);
    let body: Value = again.json().await.expect("json");
    assert_eq!(body["error"]["code"], "cursor_out_of_range");
}
