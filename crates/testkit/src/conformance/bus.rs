//! The behaviour every [`Bus`] must have; run against each implementation.

use std::{sync::Arc, time::Duration};

use tokenfan_edge::{
    bus::Bus,
    event::{Event, EventKind},
    ids::StreamId,
};

fn batch(seqs: std::ops::RangeInclusive<u64>) -> Arc<[Arc<Event>]> {
    seqs.map(|s| {
        Arc::new(Event::new(
            s,
            EventKind::Token {
                text: s.to_string(),
            },
        ))
    })
    .collect()
}

/// Runs every check against `bus`.
pub async fn run(bus: &dyn Bus) {
    let wait = Duration::from_secs(5);
    let a = StreamId::random();
    let b = StreamId::random();
    let mut feed_a1 = bus.subscribe(&a).await.expect("subscribe");
    let mut feed_a2 = bus.subscribe(&a).await.expect("subscribe");
    let mut feed_b = bus.subscribe(&b).await.expect("subscribe");

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    bus.publish(&a, batch(1..=3), Some(traceparent.to_owned()))
        .await
        .expect("publish");
    bus.publish(&a, batch(4..=4), None).await.expect("publish");
    for feed in [&mut feed_a1, &mut feed_a2] {
        let first = tokio::time::timeout(wait, feed.recv())
            .await
            .expect("in time")
            .expect("a batch");
        let second = tokio::time::timeout(wait, feed.recv())
            .await
            .expect("in time")
            .expect("a batch");
        assert_eq!(first.traceparent.as_deref(), Some(traceparent));
        assert_eq!(second.traceparent, None);
        let seqs: Vec<u64> = [first, second]
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.seq).collect::<Vec<_>>())
            .collect();
        assert_eq!(
            seqs,
            [1, 2, 3, 4],
            "every subscriber of the stream, in order"
        );
    }
    assert!(
        feed_b.try_recv().is_err(),
        "another stream's feed stays quiet"
    );

    let mut cancels = bus.cancel_requests().await.expect("control");
    bus.request_cancel(&b).await.expect("cancel");
    let got = tokio::time::timeout(wait, cancels.recv())
        .await
        .expect("in time");
    assert_eq!(got, Some(b));
}
