//! Streaming runs: the closed loop (N slots, each starting its next stream when one ends) and
//! the open loop (arrivals at a rate, a cap on streams in flight), over whichever transport the
//! scenario names. Every stream goes through [`one_stream`], which picks the transport (the
//! weighted draw of `mixed`) and counts the outcome.

pub mod idle;
pub mod mixed;
pub mod watch;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

use crate::ctx::{Ctx, Ended, mix};
use crate::{
    Outcome,
    cli::{HttpVersion, LoadArgs, Plan, Scenario},
    metrics, procfs, progress, report,
    stats::{Kind, Stats, unix_nanos},
    tls,
    transports::{grpc::GrpcPool, poll, sse, ws::WsPool},
    verify::CheckOptions,
};

/// A run's shared context and the connection pools of the transports that need one.
struct Run {
    ctx: Arc<Ctx>,
    /// WebSocket sockets (`ws`), shared by every stream of the run.
    ws: Option<WsPool>,
    /// gRPC channels (`grpc`).
    grpc: Option<GrpcPool>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// HTTP/2 receive window of the connection (64 MiB: room for ~160,000 unread token frames).
const H2_CONNECTION_WINDOW: u32 = 64 << 20;
/// HTTP/2 receive window of each stream.
const H2_STREAM_WINDOW: u32 = 1 << 20;

/// The HTTP client of a run. HTTP/1.1: one connection per request in flight, kept for reuse.
/// HTTP/2 (`--http 2`, or `auto` when the server picks h2): the streams of a target share its
/// connection, as a browser's do. https:// targets use [`tls::client_config`].
pub fn http_client(load: &LoadArgs) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(usize::MAX);
    builder = match load.http {
        HttpVersion::Http1 => builder.http1_only(),
        HttpVersion::Http2 => builder.http2_prior_knowledge(),
        HttpVersion::Auto => builder,
    };
    if load.http != HttpVersion::Http1 {
        // Large receive windows: every stream of a target shares one connection, and h2
        // closes a connection (ENHANCE_YOUR_CALM, "too_many_data_frames") once its unread
        // small DATA frames (one per token) use up half the connection window (see
        // docs/benchmarks.md, "HTTP/2 finding").
        builder = builder
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW);
    }
    let alpn: &[&[u8]] = match load.http {
        HttpVersion::Http1 => &[tls::ALPN_HTTP11],
        HttpVersion::Http2 => &[tls::ALPN_H2],
        HttpVersion::Auto => &[tls::ALPN_H2, tls::ALPN_HTTP11],
    };
    if load
        .targets
        .iter()
        .any(|t| t.trim().starts_with("https://"))
    {
        let config = tls::client_config(load.ca_file.as_deref(), load.insecure, alpn)?;
        builder = builder.use_preconfigured_tls(config);
    }
    builder.build().context("building the HTTP client")
}

/// When the run's clock starts: now, or at `--start-at` (waiting for it, or joining late if
/// the window has not begun). Returns the start as an instant and as Unix ns.
async fn start_clock(plan: &Plan) -> anyhow::Result<(Instant, i64)> {
    let Some(at) = plan.start_at_ns else {
        return Ok((Instant::now(), unix_nanos()));
    };
    let l = &plan.load;
    let now = unix_nanos();
    if at > now {
        let wait = Duration::from_nanos(u64::try_from(at - now).unwrap_or(0));
        if !plan.report.quiet {
            eprintln!(
                "tokenfan-loadgen: waiting {:.1} s for --start-at",
                wait.as_secs_f64()
            );
        }
        tokio::time::sleep(wait).await;
        return Ok((Instant::now(), at));
    }
    let late = Duration::from_nanos(u64::try_from(now - at).unwrap_or(0));
    if late.as_secs_f64() >= l.ramp + l.warmup {
        anyhow::bail!(
            "--start-at was {:.1} s ago: the measured window (after the {} s ramp and {} s \
             warm-up) has already begun, so this run could not share it; give a later time",
            late.as_secs_f64(),
            l.ramp,
            l.warmup
        );
    }
    let t0 = Instant::now()
        .checked_sub(late)
        .unwrap_or_else(Instant::now);
    Ok((t0, at))
}

/// Runs one streaming scenario to its end and reports it.
pub async fn run(plan: Plan, threads: usize) -> anyhow::Result<Outcome> {
    let l = &plan.load;
    let http = http_client(&plan.load)?;
    let stream_timeout = plan.stream_timeout();
    let metrics_before = if plan.report.metrics {
        Some(metrics::fetch_all(&http, &plan.metrics_urls).await)
    } else {
        None
    };
    let uses = |k: Kind| plan.mix.iter().any(|(m, _)| *m == k);
    let grpc = if uses(Kind::Grpc) {
        Some(GrpcPool::connect(&plan.targets, plan.grpc_connections, plan.grpc_window_kib).await?)
    } else {
        None
    };
    // The clock of the run starts once the connections are set up.
    let (t0, t0_unix) = start_clock(&plan).await?;
    let stats = Arc::new(Stats::starting(t0, t0_unix, l.ramp + l.warmup, l.duration));
    let ws = if uses(Kind::Ws) {
        // Closed loop: slot i runs on socket i % sockets. Open loop: enough sockets for the
        // cap, each arrival on the least busy one. Sockets connect on their first stream.
        let slots = match l.rate {
            None => l.concurrency,
            Some(_) => l.max_in_flight,
        };
        let sockets = slots.div_ceil(plan.streams_per_socket).max(1);
        let opts = CheckOptions {
            allow_coalescing: l.allow_coalescing,
            require_emit_times: plan.emit_times(),
        };
        Some(WsPool::new(
            &plan.targets,
            sockets,
            plan.streams_per_socket,
            stats.clone(),
            opts,
            stream_timeout,
            ws_tls(&plan.load)?,
        )?)
    } else {
        None
    };
    let ctx = Arc::new(Ctx::new(
        plan.clone(),
        stats.clone(),
        http.clone(),
        stream_timeout,
    ));
    let run = Arc::new(Run { ctx, ws, grpc });

    // CPU over the window, read by a timer task.
    let cpu = {
        let stats = stats.clone();
        let pids = plan.report.server_pids.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(stats.window_start).await;
            let a = procfs::cpu_reading(&pids)?;
            tokio::time::sleep_until(stats.deadline).await;
            let b = procfs::cpu_reading(&pids)?;
            anyhow::Ok((a, b))
        })
    };
    let ticker = (!plan.report.quiet)
        .then(|| progress::spawn(stats.clone(), secs(plan.report.progress_secs)));
    let lag_tickers: Vec<_> = (0..threads.max(1))
        .map(|_| tokio::spawn(lag_ticker(stats.clone())))
        .collect();

    drive(&run).await;

    if let Some(t) = ticker {
        t.stop().await;
    }
    for t in lag_tickers {
        // They end at the end of the window; by now they have.
        let _ = t.await;
    }
    if let Some(ws) = &run.ws {
        ws.shutdown().await;
    }
    let run_secs = stats.t0.elapsed().as_secs_f64();
    let cpu = match cpu.await {
        Ok(Ok((a, b))) => Some(procfs::cpu_use(&a, &b, plan.report.clk_tck)),
        Ok(Err(e)) => {
            stats.note(format!("CPU: not measured ({e:#})"));
            None
        }
        Err(e) => {
            stats.note(format!("CPU: not measured ({e})"));
            None
        }
    };
    stalled_diagnostics(&run.ctx).await;
    let counters = match metrics_before {
        Some((before, failed)) => {
            let (after, failed_after) = metrics::fetch_all(&http, &plan.metrics_urls).await;
            for f in failed.iter().chain(&failed_after) {
                stats.note(format!("/metrics not read: {f}"));
            }
            let a = metrics::counters(&after);
            let b = metrics::counters(&before);
            Some(
                a.into_iter()
                    .map(|(k, v)| {
                        let d = v - b.get(&k).copied().unwrap_or(0.0);
                        (k, d + 0.0)
                    })
                    .collect(),
            )
        }
        None => None,
    };
    let report = report::build(&plan, threads, &stats, run_secs, cpu, counters);
    print!("{}", report::text(&report));
    if let Some(path) = &plan.report.json {
        report::write_json(path, &report)?;
    }
    Ok(Outcome {
        ok: report.ok,
        report: Some(report),
    })
}

/// Period of the lag tickers.
const LAG_TICK: Duration = Duration::from_millis(10);

/// Measures the event-loop delay: wakes every [`LAG_TICK`] until the end of the window and
/// records how late it woke ([`Stats::event_loop_delay`]). Tokio's timer has 1 ms resolution,
/// so up to ~1 ms is the timer, not the load.
async fn lag_ticker(stats: Arc<Stats>) {
    loop {
        let due = Instant::now() + LAG_TICK;
        if due >= stats.deadline {
            return;
        }
        tokio::time::sleep_until(due).await;
        let late = Instant::now().saturating_duration_since(due);
        stats.event_loop_delay(
            unix_nanos(),
            u64::try_from(late.as_micros()).unwrap_or(u64::MAX),
        );
    }
}

/// TLS of `wss://` sockets (https:// targets): ALPN http/1.1, the Upgrade needs it.
fn ws_tls(load: &LoadArgs) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    if !load
        .targets
        .iter()
        .any(|t| t.trim().starts_with("https://"))
    {
        return Ok(None);
    }
    let config = tls::client_config(load.ca_file.as_deref(), load.insecure, &[tls::ALPN_HTTP11])?;
    Ok(Some(Arc::new(config)))
}

/// Starts streams until the end of the window, then waits for those in flight.
async fn drive(run: &Arc<Run>) {
    let l = &run.ctx.plan.load;
    let stats = &run.ctx.stats;
    let mut tasks = JoinSet::new();
    match l.rate {
        None => {
            let n = l.concurrency;
            for slot in 0..n {
                let run = run.clone();
                tasks.spawn(async move {
                    let ctx = &run.ctx;
                    let l = &ctx.plan.load;
                    let offset = l.ramp * slot as f64 / n as f64;
                    tokio::time::sleep_until(ctx.stats.t0 + secs(offset)).await;
                    let mut k = 0u64;
                    while Instant::now() < ctx.stats.deadline {
                        let seed = mix(l.seed ^ ((slot as u64) << 24) ^ k);
                        k += 1;
                        let label = format!("slot {slot} stream {k}");
                        if !one_stream(&run, Some(slot), label, seed).await {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                });
            }
        }
        Some(rate) => {
            let cap = Arc::new(Semaphore::new(l.max_in_flight));
            let mut k = 0u64;
            loop {
                let at = stats.t0 + secs(arrival_secs(k, rate, l.ramp));
                if at >= stats.deadline {
                    break;
                }
                tokio::time::sleep_until(at).await;
                while tasks.try_join_next().is_some() {}
                let seed = mix(l.seed ^ (1 << 63) ^ k);
                let label = format!("arrival {k}");
                k += 1;
                match cap.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let run = run.clone();
                        tasks.spawn(async move {
                            one_stream(&run, None, label, seed).await;
                            drop(permit);
                        });
                    }
                    Err(_) => stats.error("arrival_dropped_in_flight_cap", || label),
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Seconds from the start to arrival `k` at `rate`/s, the rate rising linearly over `ramp`.
pub fn arrival_secs(k: u64, rate: f64, ramp: f64) -> f64 {
    let k = k as f64;
    let in_ramp = rate * ramp / 2.0; // arrivals during the ramp
    if ramp > 0.0 && k < in_ramp {
        (2.0 * k * ramp / rate).sqrt()
    } else {
        ramp + (k - in_ramp) / rate
    }
}

/// One stream over the transport its kind names; false when it failed.
async fn one_stream(run: &Run, slot: Option<usize>, label: String, seed: u64) -> bool {
    let ctx = &run.ctx;
    let kind = mixed::pick(&ctx.plan.mix, seed);
    let ks = ctx.stats.kind(kind);
    ks.streams_started.fetch_add(1, Ordering::Relaxed);
    ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    let ended = match kind {
        Kind::Native => sse::native(ctx, label, seed).await,
        Kind::Chat => sse::chat(ctx, label, seed).await,
        Kind::Watch => watch::run(ctx, label, seed).await,
        Kind::Ws => match &run.ws {
            Some(ws) => ws.run(slot, label, ctx.native_body(seed)).await,
            None => Ended::default(),
        },
        Kind::Longpoll | Kind::Shortpoll => poll::run(ctx, kind, label, seed).await,
        Kind::Grpc => match &run.grpc {
            Some(g) => g.run(ctx, label, seed).await,
            None => Ended::default(),
        },
    };
    if ended.completed {
        ks.streams_completed.fetch_add(1, Ordering::Relaxed);
    }
    ctx.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    ended.ok
}

/// For streams abandoned on a timeout: what the server says about up to three of them (a
/// short-poll, when the server has one).
async fn stalled_diagnostics(ctx: &Ctx) {
    let stalled = ctx.stats.stalled_streams();
    if stalled.is_empty() || ctx.plan.scenario == Scenario::Grpc {
        return;
    }
    ctx.stats
        .note(format!("streams abandoned on a timeout: {}", stalled.len()));
    for (kind, id, tokens) in stalled.iter().filter(|(_, id, _)| !id.is_empty()).take(3) {
        let target = ctx.target(0);
        let server = match poll::short_poll_status(&ctx.http, target, id).await {
            Ok((status, events)) => format!("short-poll: status {status}, {events} events"),
            Err(e) => format!("short-poll failed: {e:#}"),
        };
        ctx.stats.note(format!(
            "  {} stream {id}: client received {tokens} tokens; {server}",
            kind.name()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_ramp_then_keep_the_rate() {
        // 10/s with a 2 s ramp: 10 arrivals in the ramp, then one every 100 ms.
        assert_eq!(arrival_secs(0, 10.0, 2.0), 0.0);
        let t10 = arrival_secs(10, 10.0, 2.0);
        assert!((t10 - 2.0).abs() < 1e-9, "{t10}");
        let t20 = arrival_secs(20, 10.0, 2.0);
        assert!((t20 - 3.0).abs() < 1e-9, "{t20}");
        assert!(arrival_secs(5, 10.0, 2.0) > arrival_secs(4, 10.0, 2.0));
        // No ramp: evenly spaced from 0.
        assert!((arrival_secs(3, 4.0, 0.0) - 0.75).abs() < 1e-9);
    }
}
