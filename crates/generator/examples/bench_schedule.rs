//! Load client for the generator's scale benchmark: holds `--streams` generations open at once
//! (50 tokens/s each by default) against a running `tokenfan-generator` and measures how far the
//! tokens fall behind their schedule.
//!
//! Every stream slot runs calls back to back (closed loop): when a call finishes, the slot starts
//! the next one at once, so the number of running generations stays at `--streams` for the whole
//! measured window. Slots start evenly over `--ramp-secs`; after `--warmup-secs` more, the
//! `--measure-secs` window begins, and only tokens received inside it are counted.
//!
//! With jitter 0 the generator schedules token `i` of a call at `start + ttft + i * gap`. The
//! client cannot see `start`, so it reports:
//!
//! * **schedule lag**: `emitted_at(i) - (anchor + ttft + i * gap)`, where `anchor` is the latest
//!   start consistent with every token of the call (`min_i(emitted_at(i) - ttft - i * gap)`).
//!   Tokens are never early, so this is a lower bound of the true lag that still shows any drift
//!   inside a call (a server falling behind makes later tokens later and later).
//! * **lag vs send**: the same, anchored at the moment the client sent the request, an upper bound
//!   (it includes the request's trip to the server).
//! * **first-token lag**: `emitted_at(0) - (sent + ttft)`.
//! * **receipt lag**: client receive time minus the anchored schedule (schedule lag + transport
//!   + client scheduling).
//!
//! `emitted_at` is the server's wall clock; run client and server on the same machine. CPU use of
//! the server (`--server-pid`) and of this client comes from `/proc/<pid>/stat` over the window,
//! read with the load generator's `procfs` (one reader of `/proc` for every benchmark client).
//!
//! ```text
//! cargo run --release -p tokenfan-generator --example bench_schedule -- \
//!     --target http://127.0.0.1:50051 --streams 10000 --server-pid "$(pgrep -n tokenfan-gen)"
//! ```
//! `scripts/bench-generator.sh` starts a pinned generator and runs this for you.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::json;
use tokenfan_loadgen::procfs::{ProcStat, proc_memory, proc_stat};
use tokenfan_proto::v1::{
    ChatMessage, FinishReason, GenerateRequest, Timing, generate_response::Event,
    generator_client::GeneratorClient,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Parser)]
#[command(about = "Holds many concurrent generations open and measures schedule lag")]
struct Args {
    /// gRPC address of the generator.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Generations kept running at once.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// HTTP/2 connections (tonic channels) the streams are spread over.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// HTTP/2 connection-level receive window of each connection, KiB (h2's default is 64).
    /// h2 also sizes its budget for buffered small DATA frames from it (half the window): a
    /// connection that buffers more unread token frames than that gets GOAWAY ENHANCE_YOUR_CALM.
    #[arg(long, default_value_t = 1024)]
    connection_window_kib: u32,
    /// `max_tokens` of each call (a call ends earlier when its answer does).
    #[arg(long, default_value_t = 200)]
    max_tokens: u32,
    /// Requested time to first token, ms.
    #[arg(long, default_value_t = 100)]
    ttft_ms: u32,
    /// Requested gap between tokens, ms (20 ms = 50 tokens/s).
    #[arg(long, default_value_t = 20)]
    inter_token_ms: u32,
    /// Slots start evenly over this many seconds.
    #[arg(long, default_value_t = 5.0)]
    ramp_secs: f64,
    /// Seconds between the end of the ramp and the measured window.
    #[arg(long, default_value_t = 5.0)]
    warmup_secs: f64,
    /// Length of the measured window, seconds.
    #[arg(long, default_value_t = 30.0)]
    measure_secs: f64,
    /// Process id of the generator, to report its CPU use and memory over the window.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Worker threads of this client; 1 = a current-thread runtime.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Base of the per-call seeds.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Progress lines on stderr every this many seconds (0 = none).
    #[arg(long, default_value_t = 5)]
    progress_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.streams == 0 || args.connections == 0 {
        bail!("--streams and --connections must be at least 1");
    }
    if args.inter_token_ms == 0 {
        bail!("--inter-token-ms must be at least 1");
    }
    let runtime = if args.client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.client_threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

// ---------------------------------------------------------------------------------------------
// Histogram

/// Log-linear histogram of microseconds, ~1.6 % resolution, lock-free (the slots share it).
struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

/// Values below `2^SUB_BITS` get a bucket each; above, each power of two has `2^(SUB_BITS-1)`.
const SUB_BITS: u32 = 7;
const HALF: u64 = 1 << (SUB_BITS - 1);

impl Histogram {
    fn new() -> Self {
        let len = ((64 - SUB_BITS + 2) as u64 * HALF) as usize;
        Self {
            buckets: (0..len).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    fn index(v: u64) -> usize {
        if v < (1 << SUB_BITS) {
            return v as usize;
        }
        let e = 63 - u64::from(v.leading_zeros()); // >= SUB_BITS
        let mantissa = v >> (e - u64::from(SUB_BITS) + 1); // in [HALF, 2 * HALF)
        ((e - u64::from(SUB_BITS) + 1) * HALF + mantissa) as usize
    }

    /// Highest value that falls in bucket `idx`.
    fn upper(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < (1 << SUB_BITS) {
            return idx;
        }
        let q = idx / HALF;
        let r = idx % HALF;
        let low = (r + HALF) << (q - 1);
        low + (1u64 << (q - 1)) - 1
    }

    fn record(&self, micros: u64) {
        self.buckets[Self::index(micros)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(micros, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
    }

    /// The value at quantile `q` (upper edge of its bucket, capped at the maximum seen).
    fn quantile(&self, q: f64) -> u64 {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 {
            return 0;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Self::upper(i).min(self.max.load(Ordering::Relaxed));
            }
        }
        self.max.load(Ordering::Relaxed)
    }

    fn summary(&self) -> Summary {
        let count = self.count.load(Ordering::Relaxed);
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count,
            mean_ms: if count == 0 {
                0.0
            } else {
                self.sum.load(Ordering::Relaxed) as f64 / count as f64 / 1000.0
            },
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            p999_ms: ms(self.quantile(0.999)),
            max_ms: ms(self.max.load(Ordering::Relaxed)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Summary {
    count: u64,
    mean_ms: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Summary {
    fn json(&self) -> serde_json::Value {
        json!({
            "count": self.count, "mean_ms": self.mean_ms, "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
        })
    }

    fn line(&self, name: &str) -> String {
        format!(
            "{name:<17} p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  p99.9 {:>8.2}  max {:>8.2}  mean {:>8.2} ms  (n={})",
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.mean_ms,
            self.count
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state

/// Per-second counters over the whole run, by receive time.
struct Second {
    tokens: AtomicU64,
    lag_sum_us: AtomicU64,
    lag_max_us: AtomicU64,
}

struct Shared {
    ttft_ns: i64,
    gap_ns: i64,
    /// Unix nanos of the run's start, and the measured window.
    t0_unix: i64,
    window: (i64, i64),
    schedule_lag: Histogram,
    lag_vs_send: Histogram,
    first_token_lag: Histogram,
    receipt_lag: Histogram,
    seconds: Vec<Second>,
    /// Calls in flight right now (sent, not yet finished).
    in_call: AtomicUsize,
    /// Tokens received since start (all, for progress lines).
    tokens_total: AtomicU64,
    /// Calls that ended inside the window, by outcome.
    calls_stop: AtomicU64,
    calls_length: AtomicU64,
    calls_error: AtomicU64,
    tokens_in_finished_calls: AtomicU64,
    /// Any call error during the run, and the last message.
    errors_total: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
    /// Samples that came out negative (would mean clock trouble); clamped to 0.
    negative: AtomicI64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    index: u32,
    emitted: i64,
    recv: i64,
}

enum CallEnd {
    Finished(FinishReason),
    Error,
    /// Cut by the end of the run.
    Cut,
}

impl Shared {
    fn in_window(&self, t: i64) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    fn non_negative(&self, ns: i64) -> u64 {
        if ns < 0 {
            self.negative.fetch_add(1, Ordering::Relaxed);
            0
        } else {
            (ns / 1000) as u64
        }
    }

    /// Records one call's tokens once the call is over.
    fn record_call(&self, sent: i64, samples: &[Sample], end: &CallEnd, ended_at: i64) {
        let offset = |s: &Sample| self.ttft_ns + i64::from(s.index) * self.gap_ns;
        let Some(anchor) = samples.iter().map(|s| s.emitted - offset(s)).min() else {
            return;
        };
        for s in samples {
            let due = anchor + offset(s);
            let lag = self.non_negative(s.emitted - due);
            let secs = (s.recv - self.t0_unix) / 1_000_000_000;
            if let Some(second) = usize::try_from(secs).ok().and_then(|i| self.seconds.get(i)) {
                second.tokens.fetch_add(1, Ordering::Relaxed);
                second.lag_sum_us.fetch_add(lag, Ordering::Relaxed);
                second.lag_max_us.fetch_max(lag, Ordering::Relaxed);
            }
            if !self.in_window(s.recv) {
                continue;
            }
            self.schedule_lag.record(lag);
            self.lag_vs_send
                .record(self.non_negative(s.emitted - (sent + offset(s))));
            self.receipt_lag.record(self.non_negative(s.recv - due));
            if s.index == 0 {
                self.first_token_lag
                    .record(self.non_negative(s.emitted - (sent + self.ttft_ns)));
            }
        }
        if self.in_window(ended_at) {
            let counter = match end {
                CallEnd::Finished(FinishReason::Length) => &self.calls_length,
                CallEnd::Finished(_) => &self.calls_stop,
                CallEnd::Error => &self.calls_error,
                CallEnd::Cut => return,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            self.tokens_in_finished_calls
                .fetch_add(samples.len() as u64, Ordering::Relaxed);
        }
    }
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// SplitMix64 finaliser: distinct, well-spread seeds per (slot, call).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// /proc

/// CPU ticks of one `cpu*` line of `/proc/stat` (the whole machine, then each core).
#[derive(Debug, Clone, Default)]
struct CpuTicks {
    name: String,
    busy: u64,
    irq: u64,
    steal: u64,
    idle: u64,
}

fn machine_stat() -> anyhow::Result<Vec<CpuTicks>> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut cpus = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("cpu")) {
        let mut fields = line.split_whitespace();
        let name = fields.next().unwrap_or_default().to_string();
        // user nice system idle iowait irq softirq steal (guest time is inside user)
        let v: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().context("parsing /proc/stat"))
            .collect::<anyhow::Result<_>>()?;
        if v.len() < 8 {
            bail!("short /proc/stat line: {line}");
        }
        cpus.push(CpuTicks {
            name,
            busy: v[0] + v[1] + v[2] + v[5] + v[6],
            irq: v[5] + v[6],
            steal: v[7],
            idle: v[3] + v[4],
        });
    }
    Ok(cpus)
}

/// Use of one `cpu*` line over the window, in percent of one core.
#[derive(Debug, Clone)]
struct CpuUse {
    name: String,
    busy: f64,
    irq: f64,
    steal: f64,
    idle: f64,
}

fn cpu_use(before: &[CpuTicks], after: &[CpuTicks], ticks_per_sec: f64) -> Vec<CpuUse> {
    let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 / ticks_per_sec * 100.0;
    before
        .iter()
        .zip(after)
        .map(|(b, a)| CpuUse {
            name: a.name.clone(),
            busy: pct(a.busy, b.busy),
            irq: pct(a.irq, b.irq),
            steal: pct(a.steal, b.steal),
            idle: pct(a.idle, b.idle),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The run

#[derive(Debug, Clone, Copy, Default)]
struct ActiveSamples {
    min: usize,
    max: usize,
    sum: u64,
    n: u64,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let total_secs = args.ramp_secs + args.warmup_secs + args.measure_secs;
    let t0 = Instant::now();
    let t0_unix = unix_nanos();
    let window_start = t0 + secs(args.ramp_secs + args.warmup_secs);
    let window_end = window_start + secs(args.measure_secs);
    let run_end = t0 + secs(total_secs);
    let to_unix = |at: Instant| t0_unix + (at - t0).as_nanos() as i64;

    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let channel = Endpoint::from_shared(args.target.clone())
            .context("--target")?
            .tcp_nodelay(true)
            .initial_connection_window_size(args.connection_window_kib.saturating_mul(1024))
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.target))?;
        channels.push(channel);
    }

    let shared = Arc::new(Shared {
        ttft_ns: i64::from(args.ttft_ms) * 1_000_000,
        gap_ns: i64::from(args.inter_token_ms) * 1_000_000,
        t0_unix,
        window: (to_unix(window_start), to_unix(window_end)),
        schedule_lag: Histogram::new(),
        lag_vs_send: Histogram::new(),
        first_token_lag: Histogram::new(),
        receipt_lag: Histogram::new(),
        seconds: (0..total_secs.ceil() as usize + 2)
            .map(|_| Second {
                tokens: AtomicU64::new(0),
                lag_sum_us: AtomicU64::new(0),
                lag_max_us: AtomicU64::new(0),
            })
            .collect(),
        in_call: AtomicUsize::new(0),
        tokens_total: AtomicU64::new(0),
        calls_stop: AtomicU64::new(0),
        calls_length: AtomicU64::new(0),
        calls_error: AtomicU64::new(0),
        tokens_in_finished_calls: AtomicU64::new(0),
        errors_total: AtomicU64::new(0),
        last_error: std::sync::Mutex::new(None),
        negative: AtomicI64::new(0),
    });
    let stop = CancellationToken::new();

    let mut slots = tokio::task::JoinSet::new();
    for i in 0..args.streams {
        let start_at = t0 + secs(args.ramp_secs * i as f64 / args.streams as f64);
        let client = GeneratorClient::new(channels[i % channels.len()].clone());
        slots.spawn(slot(
            i as u64,
            client,
            start_at,
            args.clone(),
            shared.clone(),
            stop.clone(),
        ));
    }
    drop(channels);

    if args.progress_secs > 0 {
        tokio::spawn(progress(
            shared.clone(),
            t0,
            Duration::from_secs(args.progress_secs),
            stop.clone(),
        ));
    }

    // Steady window: CPU before/after, active calls sampled every 100 ms.
    let server_pid = args.server_pid.map(|p| p.to_string());
    tokio::time::sleep_until(window_start).await;
    let server_before = server_pid.as_deref().map(proc_stat).transpose()?;
    let client_before = proc_stat("self")?;
    let machine_before = machine_stat()?;
    let measured_from = Instant::now();
    let mut active = ActiveSamples {
        min: usize::MAX,
        ..Default::default()
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let n = shared.in_call.load(Ordering::Relaxed);
                active.min = active.min.min(n);
                active.max = active.max.max(n);
                active.sum += n as u64;
                active.n += 1;
            }
            () = tokio::time::sleep_until(window_end) => break,
        }
    }
    let server_after = server_pid.as_deref().map(proc_stat).transpose()?;
    let client_after = proc_stat("self")?;
    let machine_after = machine_stat()?;
    let measured = measured_from.elapsed().as_secs_f64();
    let server_memory = server_pid
        .as_deref()
        .and_then(|p| proc_memory(p).ok())
        .map(|m| (m.rss_kib, m.hwm_kib));

    tokio::time::sleep_until(run_end).await;
    stop.cancel();
    while let Some(joined) = slots.join_next().await {
        joined.context("a stream slot panicked")?;
    }

    let cpu = |before: ProcStat, after: ProcStat| {
        (after.ticks - before.ticks) as f64 / args.clk_tck as f64 / measured * 100.0
    };
    let server_cpu = server_before.zip(server_after).map(|(b, a)| cpu(b, a));
    let client_cpu = cpu(client_before, client_after);
    let cpus = cpu_use(
        &machine_before,
        &machine_after,
        args.clk_tck as f64 * measured,
    );
    let report = Report {
        args: &args,
        shared: &shared,
        measured,
        active,
        server_cpu,
        server_threads: server_after.map(|s| s.threads),
        server_memory,
        client_cpu,
        cpus,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        report.print();
    }
    Ok(())
}

/// One stream slot: calls back to back from `start_at` until `stop`.
async fn slot(
    slot: u64,
    mut client: GeneratorClient<Channel>,
    start_at: Instant,
    args: Args,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    tokio::select! {
        () = tokio::time::sleep_until(start_at) => {}
        () = stop.cancelled() => return,
    }
    let mut samples: Vec<Sample> = Vec::with_capacity(args.max_tokens as usize);
    let mut call: u64 = 0;
    while !stop.is_cancelled() {
        let request = GenerateRequest {
            request_id: format!("bench-{slot}-{call}"),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Explain the benchmark.".into(),
            }],
            max_tokens: args.max_tokens,
            seed: mix(args.seed ^ mix(slot) ^ call.wrapping_mul(0xa076_1d64_78bd_642f)),
            timing: Some(Timing {
                ttft_ms: Some(args.ttft_ms),
                inter_token_ms: Some(args.inter_token_ms),
                jitter_ms: Some(0),
            }),
            ..Default::default()
        };
        samples.clear();
        shared.in_call.fetch_add(1, Ordering::Relaxed);
        let sent = unix_nanos();
        let end = tokio::select! {
            end = one_call(&mut client, request, &mut samples, &shared) => end,
            () = stop.cancelled() => CallEnd::Cut,
        };
        shared.in_call.fetch_sub(1, Ordering::Relaxed);
        shared.record_call(sent, &samples, &end, unix_nanos());
        if matches!(end, CallEnd::Error) {
            // Do not spin on a failing server.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = stop.cancelled() => {}
            }
        }
        call += 1;
    }
}

async fn one_call(
    client: &mut GeneratorClient<Channel>,
    request: GenerateRequest,
    samples: &mut Vec<Sample>,
    shared: &Shared,
) -> CallEnd {
    let result = async {
        let mut stream = client.generate(request).await?.into_inner();
        while let Some(response) = stream.message().await? {
            match response.event {
                Some(Event::Token(token)) => {
                    samples.push(Sample {
                        index: token.index,
                        emitted: token.emitted_at_unix_nanos,
                        recv: unix_nanos(),
                    });
                    shared.tokens_total.fetch_add(1, Ordering::Relaxed);
                }
                Some(Event::Finished(finished)) => {
                    return Ok(finished.reason());
                }
                None => {}
            }
        }
        Err(tonic::Status::unknown("stream ended without Finished"))
    }
    .await;
    match result {
        Ok(reason) => CallEnd::Finished(reason),
        Err(status) => {
            shared.errors_total.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = shared.last_error.lock() {
                *last = Some(format!("{:?}: {}", status.code(), status.message()));
            }
            CallEnd::Error
        }
    }
}

async fn progress(shared: Arc<Shared>, t0: Instant, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(t0 + every, every);
    let mut last = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let total = shared.tokens_total.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.1}s] in flight {:>6}  tokens/s {:>9.0}  errors {}",
            t0.elapsed().as_secs_f64(),
            shared.in_call.load(Ordering::Relaxed),
            (total - last) as f64 / every.as_secs_f64(),
            shared.errors_total.load(Ordering::Relaxed),
        );
        last = total;
    }
}

// ---------------------------------------------------------------------------------------------
// Report

struct Report<'a> {
    args: &'a Args,
    shared: &'a Shared,
    measured: f64,
    active: ActiveSamples,
    server_cpu: Option<f64>,
    server_threads: Option<u64>,
    server_memory: Option<(u64, u64)>,
    client_cpu: f64,
    /// The whole machine (first) and each core over the window, in percent of one core.
    /// Interrupt/softirq time is not charged to processes (loopback TCP is partly processed
    /// there); steal is time the hypervisor gave to someone else.
    cpus: Vec<CpuUse>,
}

impl Report<'_> {
    /// CPU used by other processes (percent of one core): busy time minus the generator, this
    /// client and interrupt/softirq time; what else ran on the machine during the window.
    fn others_cpu(&self) -> f64 {
        self.cpus.first().map_or(0.0, |all| {
            (all.busy - all.irq - self.server_cpu.unwrap_or(0.0) - self.client_cpu).max(0.0)
        })
    }

    fn tokens_per_sec(&self) -> f64 {
        self.shared.schedule_lag.count.load(Ordering::Relaxed) as f64 / self.measured
    }

    /// Tokens/s the closed loop would receive with a perfect server: every slot repeats
    /// `ttft + tokens * gap` (mean tokens per finished call in the window).
    fn ideal_tokens_per_sec(&self) -> Option<f64> {
        let s = self.shared;
        let calls = s.calls_stop.load(Ordering::Relaxed) + s.calls_length.load(Ordering::Relaxed);
        if calls == 0 {
            return None;
        }
        let mean_tokens = s.tokens_in_finished_calls.load(Ordering::Relaxed) as f64 / calls as f64;
        let call_secs = (f64::from(self.args.ttft_ms)
            + mean_tokens * f64::from(self.args.inter_token_ms))
            / 1000.0;
        Some(self.args.streams as f64 * mean_tokens / call_secs)
    }

    fn mean_active(&self) -> f64 {
        if self.active.n == 0 {
            0.0
        } else {
            self.active.sum as f64 / self.active.n as f64
        }
    }

    /// Per-second (by receive time) token count, mean and max schedule lag.
    fn seconds(&self) -> Vec<(usize, u64, f64, f64)> {
        self.shared
            .seconds
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let n = s.tokens.load(Ordering::Relaxed);
                (n > 0).then(|| {
                    let mean = s.lag_sum_us.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0;
                    let max = s.lag_max_us.load(Ordering::Relaxed) as f64 / 1000.0;
                    (i, n, mean, max)
                })
            })
            .collect()
    }

    fn json(&self) -> serde_json::Value {
        let s = self.shared;
        let a = self.args;
        json!({
            "config": {
                "target": a.target, "streams": a.streams, "connections": a.connections,
                "connection_window_kib": a.connection_window_kib,
                "max_tokens": a.max_tokens, "ttft_ms": a.ttft_ms,
                "inter_token_ms": a.inter_token_ms, "ramp_secs": a.ramp_secs,
                "warmup_secs": a.warmup_secs, "measure_secs": a.measure_secs,
                "client_threads": a.client_threads,
            },
            "window_secs": self.measured,
            "active_calls": {
                "min": if self.active.n == 0 { 0 } else { self.active.min },
                "mean": self.mean_active(), "max": self.active.max,
            },
            "tokens_per_sec": self.tokens_per_sec(),
            "ideal_tokens_per_sec": self.ideal_tokens_per_sec(),
            "calls_in_window": {
                "stop": s.calls_stop.load(Ordering::Relaxed),
                "length": s.calls_length.load(Ordering::Relaxed),
                "error": s.calls_error.load(Ordering::Relaxed),
            },
            "errors_total": s.errors_total.load(Ordering::Relaxed),
            "last_error": s.last_error.lock().ok().and_then(|e| e.clone()),
            "negative_samples_clamped": s.negative.load(Ordering::Relaxed),
            "server_cpu_percent": self.server_cpu,
            "server_threads": self.server_threads,
            "server_rss_kib": self.server_memory.map(|m| m.0),
            "server_hwm_kib": self.server_memory.map(|m| m.1),
            "client_cpu_percent": self.client_cpu,
            "others_cpu_percent": self.others_cpu(),
            "cpus": self.cpus.iter().map(|c| json!({
                "cpu": c.name, "busy_percent": c.busy, "irq_percent": c.irq,
                "steal_percent": c.steal, "idle_percent": c.idle,
            })).collect::<Vec<_>>(),
            "schedule_lag": s.schedule_lag.summary().json(),
            "lag_vs_send": s.lag_vs_send.summary().json(),
            "first_token_lag": s.first_token_lag.summary().json(),
            "receipt_lag": s.receipt_lag.summary().json(),
            "per_second": self.seconds().iter().map(|(i, n, mean, max)| json!({
                "second": i, "tokens": n, "lag_mean_ms": mean, "lag_max_ms": max,
            })).collect::<Vec<_>>(),
        })
    }

    fn print(&self) {
        let s = self.shared;
        let a = self.args;
        println!(
            "streams {}  connections {}  max_tokens {}  ttft {} ms  gap {} ms  window {:.1} s",
            a.streams, a.connections, a.max_tokens, a.ttft_ms, a.inter_token_ms, self.measured
        );
        println!(
            "calls in flight during window: min {}  mean {:.0}  max {}",
            if self.active.n == 0 {
                0
            } else {
                self.active.min
            },
            self.mean_active(),
            self.active.max
        );
        println!(
            "tokens/s received {:.0}  (a perfect server: {})",
            self.tokens_per_sec(),
            self.ideal_tokens_per_sec()
                .map_or_else(|| "n/a".into(), |v| format!("{v:.0}"))
        );
        println!(
            "calls finished in window: stop {}  length {}  error {}   errors over the run {}{}",
            s.calls_stop.load(Ordering::Relaxed),
            s.calls_length.load(Ordering::Relaxed),
            s.calls_error.load(Ordering::Relaxed),
            s.errors_total.load(Ordering::Relaxed),
            s.last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .map(|e| format!(" (last: {e})"))
                .unwrap_or_default()
        );
        match (self.server_cpu, self.server_threads, self.server_memory) {
            (Some(cpu), Some(threads), Some((rss, hwm))) => println!(
                "server CPU {cpu:.1} %  threads {threads}  RSS {:.1} MiB (peak {:.1} MiB)",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0
            ),
            _ => println!("server CPU n/a (no --server-pid)"),
        }
        println!(
            "client CPU {:.1} %   other processes {:.1} %",
            self.client_cpu,
            self.others_cpu()
        );
        for c in &self.cpus {
            println!(
                "  {:<5} busy {:>6.1} %  (irq+softirq {:>5.1} %)  steal {:>5.1} %  idle {:>6.1} %",
                c.name, c.busy, c.irq, c.steal, c.idle
            );
        }
        println!("{}", s.schedule_lag.summary().line("schedule lag"));
        println!("{}", s.lag_vs_send.summary().line("lag vs send"));
        println!("{}", s.first_token_lag.summary().line("first-token lag"));
        println!("{}", s.receipt_lag.summary().line("receipt lag"));
        let negative = s.negative.load(Ordering::Relaxed);
        if negative > 0 {
            println!("warning: {negative} negative samples clamped to 0 (clock steps?)");
        }
        println!("per second (receive time): second tokens lag-mean-ms lag-max-ms");
        for (i, n, mean, max) in self.seconds() {
            println!("  {i:>4} {n:>9} {mean:>9.2} {max:>9.2}");
        }
    }
}
