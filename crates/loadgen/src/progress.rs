//! The live progress line on stderr: elapsed time, streams in flight, streams done, tokens/s
//! over the last tick, p99 added delay and time to first token so far, errors, violations.
//! On a terminal it rewrites one line; otherwise it prints one line per tick.

use std::{
    io::{IsTerminal as _, Write as _},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

pub struct Ticker {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Ticker {
    /// Stops the ticker and ends its line.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

pub fn spawn(stats: Arc<Stats>, every: Duration) -> Ticker {
    let stop = CancellationToken::new();
    let tty = std::io::stderr().is_terminal();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            let mut last_tokens = 0u64;
            let mut last_at = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => break,
                }
                let tokens = stats.sum(|k| &k.tokens_all);
                let now = Instant::now();
                let rate = (tokens - last_tokens) as f64
                    / now.duration_since(last_at).as_secs_f64().max(1e-9);
                last_tokens = tokens;
                last_at = now;
                let line = line(&stats, rate);
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    write!(err, "\r\x1b[2K{line}")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
            if tty {
                let _ = writeln!(std::io::stderr());
            }
        }
    });
    Ticker { stop, task }
}

fn line(stats: &Stats, tokens_per_sec: f64) -> String {
    let elapsed = stats.t0.elapsed().as_secs_f64();
    let now = Instant::now();
    let phase = if now < stats.window_start {
        "warm-up"
    } else if now < stats.deadline {
        "window"
    } else {
        "drain"
    };
    let (p99_delay, p99_ttft) = match stats.merged() {
        Some(h) => (
            (!h.delay_all.is_empty())
                .then(|| format!("{:.1} ms", h.delay_all.value_at_quantile(0.99) as f64 / 1e3)),
            (!h.ttft_all.is_empty())
                .then(|| format!("{:.1} ms", h.ttft_all.value_at_quantile(0.99) as f64 / 1e3)),
        ),
        None => (None, None),
    };
    format!(
        "[{elapsed:>6.1} s {phase:<7}] in flight {}  done {}  {:.0} tok/s  p99 delay {}  p99 ttft {}  errors {}  violations {}",
        stats.in_flight.load(Ordering::Relaxed),
        stats.sum(|k| &k.streams_completed),
        tokens_per_sec,
        p99_delay.as_deref().unwrap_or("n/a"),
        p99_ttft.as_deref().unwrap_or("n/a"),
        stats.error_total(),
        stats.violation_total(),
    )
}
