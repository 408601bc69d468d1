mod common;
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::{connect_async, tungstenite::Message};

#[tokio::test]
async fn big() {
    let edge = common::TestEdge::start().await;
    for size in [65 * 1024, 256 * 1024, 1024 * 1024, 8 * 1024 * 1024] {
        let (mut ws, _) = connect_async(format!("ws://{}/v1/ws", edge.addr)).await.unwrap();
        let s = ws.send(Message::text("x".repeat(size))).await;
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await {
                Ok(Some(m)) => { let end = m.as_ref().map(|m| m.is_close()).unwrap_or(true); got.push(format!("{m:?}")); if end { break } }
                Ok(None) => { got.push("None".into()); break }
                Err(_) => { got.push("timeout".into()); break }
            }
        }
        eprintln!("{size}: send={:?} got={got:?}", s.is_ok());
    }
}
