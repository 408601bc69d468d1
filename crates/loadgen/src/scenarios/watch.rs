//! `watch`: one stream created by `POST /v1/streams` (201), read by `--viewers` viewers over
//! `GET /v1/streams/{id}/events`, spread round-robin over the targets. Every viewer must get
//! exactly the same text (compared by hash), besides each one's own verification. This is
//! also the fan-out benchmark (`--streams 1 --viewers 1000` over three replicas).
//!
//! Viewers of `http://` targets over HTTP/1.1 read their sockets directly (see
//! [`crate::transports::raw`]), so that thousands of them cost this process little.
//!
//! A viewer's time to first token is measured from the creation request. Tokens emitted
//! before a viewer's request was sent reach it as history replay: they are verified but give
//! no added-delay sample (counted as `replayed_tokens`).

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
};

use tokio::{task::JoinSet, time::Instant};

use crate::{
    ctx::{Ctx, Ended},
    stats::unix_nanos,
    transports::{poll, sse},
    verify::Violation,
};

pub async fn run(ctx: &Arc<Ctx>, label: String, seed: u64) -> Ended {
    let target = ctx.next_target().to_owned();
    let deadline = Instant::now() + ctx.stream_timeout;
    let sent_ns = unix_nanos();
    let Some(id) = poll::create(ctx, &target, &ctx.native_body(seed), deadline).await else {
        return Ended::default();
    };
    let viewers = ctx.plan.viewers;
    let base = ctx.viewer_rr.fetch_add(viewers, Ordering::Relaxed);
    let mut set = JoinSet::new();
    for v in 0..viewers {
        let ctx = ctx.clone();
        let target = ctx.target(base + v).to_owned();
        let id = id.clone();
        let label = format!("{label} viewer {v}");
        set.spawn(async move { sse::viewer(&ctx, &target, &id, label, sent_ns, deadline).await });
    }
    let mut ends = Vec::with_capacity(viewers);
    while let Some(r) = set.join_next().await {
        if let Ok(end) = r {
            ends.push(end);
        }
    }
    // The text most viewers got is the reference; each viewer with another text is a violation.
    let mut by_hash: HashMap<u64, usize> = HashMap::new();
    for e in ends.iter().flatten().filter(|e| e.terminal) {
        *by_hash.entry(e.hash).or_default() += 1;
    }
    if by_hash.len() > 1 {
        let (_, most) = by_hash
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(h, n)| (*h, *n))
            .unwrap_or_default();
        let total: usize = by_hash.values().sum();
        let odd = (total - most) as u64;
        ctx.stats
            .add_violations([(Violation::ViewerTextMismatch, odd)].into_iter());
        ctx.stats.example(|| {
            format!(
                "violation in watch {label} (stream {id}): {odd} of {total} viewers got another \
                 text than the rest ({} distinct texts)",
                by_hash.len()
            )
        });
    }
    let all = ends.len() == viewers;
    Ended {
        ok: all && ends.iter().all(|e| e.as_ref().is_some_and(|e| e.terminal)),
        completed: all && ends.iter().all(|e| e.as_ref().is_some_and(|e| e.completed)),
    }
}
