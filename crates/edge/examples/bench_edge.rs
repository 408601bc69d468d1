//! Load client for the edge benchmarks (benchmarks, not tests): the delay the edge adds to
//! token events at many concurrent streams, and the memory an idle connection costs.
//!
//! `stream` holds `--streams` streams open at once (closed loop: when a stream ends, its slot
//! starts the next one at once), over POST-SSE (`POST /v1/streams` with
//! `Accept: text/event-stream`, one HTTP/1.1 connection per slot, reused between its streams)
//! or over WebSocket (`--transport ws`: `--ws-streams-per-socket` slots multiplexed on each
//! socket with `start`). Every request asks for `"emit_times": true`, so each token event
//! carries `emitted_at_unix_nanos`, the generator's wall clock when it emitted the token (a
//! coalesced event: its last token). The **added delay** is the client's wall clock when the
//! bytes of the event were read minus that emit time: generator → gRPC → hub → transport →
//! socket → this client. Client and server must share the machine clock (same host).
//!
//! Slots start evenly over `--ramp-secs`; after `--warmup-secs` more the `--measure-secs`
//! window begins and only events received inside it are counted in the window figures. After
//! the window no new streams start, and the streams in flight are read to their end, so every
//! stream is verified: token seqs contiguous from 1, exactly one terminal event whose seq is
//! one past the last token's, `usage.completion_tokens` equal to the tokens received, nothing
//! after the terminal event. Violations are counted by kind and printed.
//!
//! `idle` measures the edge's resident memory per idle connection: it reads the server's
//! VmRSS with no client connection, opens `--connections` idle ones (`sse`: raw HTTP/1.1
//! `GET /v1/streams/{id}/events` on a stream that stays silent; `ws`: WebSockets with no
//! subscription; `ws-subscribed`: WebSockets each subscribed to the silent stream), waits until
//! the server's `tokenfan_edge_connections{transport}` gauge counts them all, reads VmRSS again
//! and reports (after − before) / N. The silent stream is created with `timing.ttft_ms` =
//! `--silent-ttft-ms` (30 000, the edge's default bound), and the measurement must end before
//! that; the run checks it did and that no token reached any connection.
//!
//! ```text
//! bench_edge stream --target http://127.0.0.1:8080 --streams 1000 --server-pid PID
//! bench_edge stream --target http://127.0.0.1:8080 --streams 1000 --transport ws --server-pid PID
//! bench_edge idle --target http://127.0.0.1:8080 --connections 10000 --kind sse --server-pid PID
//! ```
//! `scripts/bench-edge.sh` builds, starts a pinned edge and runs all of them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::Instant,
};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(about = "Edge benchmarks: added delay under load, memory per idle connection")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Many concurrent streams; the delay the edge adds to each token event.
    Stream(StreamArgs),
    /// Many idle connections; the server's resident memory per connection.
    Idle(IdleArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// POST /v1/streams with Accept: text/event-stream, one connection per slot.
    Sse,
    /// WebSocket /v1/ws, many streams per socket (`start`).
    Ws,
}

#[derive(Debug, Clone, Parser)]
struct StreamArgs {
    /// Base URL of the edge (loopback).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Streams kept running at once (slots).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Transport of the streams.
    #[arg(long, value_enum, default_value = "sse")]
    transport: Transport,
    /// With `--transport ws`: slots per socket (the edge allows 64 subscriptions per socket).
    #[arg(long, default_value_t = 50)]
    ws_streams_per_socket: usize,
    /// `max_tokens` of each stream (a stream ends earlier when its answer does).
    #[arg(long, default_value_t = 300)]
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
    #[arg(long, default_value_t = 20.0)]
    measure_secs: f64,
    /// Process id of the edge: its CPU use over the window and its memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Base of the per-stream seeds.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Progress lines on stderr every this many seconds (0 = none).
    #[arg(long, default_value_t = 5)]
    progress_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IdleKind {
    /// `GET /v1/streams/{id}/events` on a silent stream, one HTTP/1.1 connection each.
    Sse,
    /// WebSockets to /v1/ws with no subscription.
    Ws,
    /// WebSockets each subscribed to the silent stream.
    WsSubscribed,
}

#[derive(Debug, Clone, Parser)]
struct IdleArgs {
    /// Base URL of the edge (loopback).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Idle connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// What each connection is.
    #[arg(long, value_enum)]
    kind: IdleKind,
    /// Process id of the edge (its VmRSS is read from /proc).
    #[arg(long)]
    server_pid: u32,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// `timing.ttft_ms` of the silent stream: no token flows before it (edge bound: 30 000).
    #[arg(long, default_value_t = 30_000)]
    silent_ttft_ms: u32,
    /// Seconds to let the server settle before each memory reading.
    #[arg(long, default_value_t = 1.0)]
    settle_secs: f64,
    /// Longest wait for the connections to open and be counted, seconds.
    #[arg(long, default_value_t = 20.0)]
    open_timeout_secs: f64,
    /// Clock ticks per second of `/proc/<pid>/stat`.
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One thread: the client is pinned to one core by the script, and its CPU use is reported.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Stream(args) => runtime.block_on(stream_bench(args)),
        Cmd::Idle(args) => runtime.block_on(idle_bench(args)),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// `host:port` of an `http://` target.
fn authority(target: &str) -> anyhow::Result<String> {
    let uri: http::Uri = target
        .parse()
        .with_context(|| format!("--target {target:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--target must be an http:// URL, got {target:?}");
    }
    let auth = uri
        .authority()
        .with_context(|| format!("--target {target:?} has no host"))?;
    Ok(auth.as_str().to_owned())
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

/// SplitMix64 finaliser: distinct, well-spread seeds per (slot, stream).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .context("building the HTTP client")
}

/// `/metrics` of the edge.
async fn fetch_metrics(client: &reqwest::Client, target: &str) -> anyhow::Result<String> {
    let resp = client
        .get(format!("{target}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .context("GET /metrics")?;
    if !resp.status().is_success() {
        bail!("GET /metrics: {}", resp.status());
    }
    Ok(resp.text().await?)
}

/// Sum of the samples of `name` whose labels contain `label` (`""` = any).
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
                && series.contains(label)
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

#[derive(Debug, Clone, Copy, Default)]
struct ProcStat {
    /// utime + stime, clock ticks.
    ticks: u64,
    threads: u64,
}

fn proc_stat(pid: &str) -> anyhow::Result<ProcStat> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("parsing {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, num_threads 20.
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("{path}: no field {n}"))?
            .parse()
            .with_context(|| format!("{path}: field {n}"))
    };
    Ok(ProcStat {
        ticks: field(14)? + field(15)?,
        threads: field(20)?,
    })
}

/// Whole-machine CPU ticks from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
struct MachineStat {
    busy: u64,
    steal: u64,
    total: u64,
}

fn machine_stat() -> anyhow::Result<MachineStat> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    // cpu user nice system idle iowait irq softirq steal guest guest_nice
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().context("parsing /proc/stat"))
        .collect::<anyhow::Result<_>>()?;
    if v.len() < 8 {
        bail!("short /proc/stat line: {line}");
    }
    let total: u64 = v.iter().sum();
    Ok(MachineStat {
        busy: total - v[3] - v[4] - v[7],
        steal: v[7],
        total,
    })
}

/// Memory of a process from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss: u64,
    anon: u64,
    hwm: u64,
    threads: u64,
}

fn proc_memory(pid: &str) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss: kib("VmRSS:"),
        anon: kib("RssAnon:"),
        hwm: kib("VmHWM:"),
        threads: kib("Threads:"),
    })
}

/// CPU use of this client, the server and the machine between two readings.
#[derive(Debug, Clone, Copy)]
struct CpuReading {
    at: Instant,
    client: ProcStat,
    server: Option<ProcStat>,
    machine: MachineStat,
}

fn cpu_reading(server_pid: Option<u32>) -> anyhow::Result<CpuReading> {
    Ok(CpuReading {
        at: Instant::now(),
        client: proc_stat("self")?,
        server: server_pid.map(|p| proc_stat(&p.to_string())).transpose()?,
        machine: machine_stat()?,
    })
}

fn print_cpu(label: &str, a: &CpuReading, b: &CpuReading, clk_tck: u64) {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let pct = |ticks: u64| 100.0 * ticks as f64 / clk_tck as f64 / wall;
    let server = match (a.server, b.server) {
        (Some(x), Some(y)) => format!(
            "server {:.1} % of one core ({} threads)",
            pct(y.ticks - x.ticks),
            y.threads
        ),
        _ => "server not measured (no --server-pid)".to_owned(),
    };
    let total = (b.machine.total - a.machine.total).max(1) as f64;
    // Not available_parallelism: that follows this process's (pinned) CPU affinity.
    let cores = std::fs::read_to_string("/proc/stat").map_or(0, |t| {
        t.lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count()
    });
    println!(
        "CPU {label} ({wall:.1} s): client {:.1} % of one core, {server}; machine {:.1} % busy \
         of {cores} cores (steal {:.1} %)",
        pct(b.client.ticks - a.client.ticks),
        100.0 * (b.machine.busy - a.machine.busy) as f64 / total,
        100.0 * (b.machine.steal - a.machine.steal) as f64 / total,
    );
}

/// `p`-quantile of sorted microseconds, in ms.
fn quantile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1]) / 1000.0
}

fn summary_ms(samples: &mut [u32]) -> String {
    if samples.is_empty() {
        return "no samples".to_owned();
    }
    samples.sort_unstable();
    let mean = samples.iter().map(|&v| u64::from(v)).sum::<u64>() as f64 / samples.len() as f64;
    format!(
        "n={} p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, mean {:.3} ms",
        samples.len(),
        quantile_ms(samples, 0.50),
        quantile_ms(samples, 0.90),
        quantile_ms(samples, 0.99),
        quantile_ms(samples, 0.999),
        quantile_ms(samples, 1.0),
        mean / 1000.0,
    )
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: impl Into<String>) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key.into())
        .or_default() += 1;
}

// ---------------------------------------------------------------------------------------------
// stream: events and their verification

/// A native event as the client sees it (the text is not needed).
#[derive(Debug, Deserialize)]
struct Ev {
    #[serde(rename = "type")]
    kind: String,
    seq: Option<u64>,
    emitted_at_unix_nanos: Option<i64>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    code: Option<String>,
    message: Option<String>,
    stream_id: Option<String>,
    request_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Usage {
    completion_tokens: u64,
}

/// The kinds of verification failure, all reported (each must be 0).
const VIOLATIONS: &[&str] = &[
    "seq_gap",
    "seq_repeat_or_reorder",
    "missing_seq",
    "missing_emitted_at",
    "event_after_terminal",
    "no_terminal",
    "terminal_seq_mismatch",
    "usage_mismatch",
    "no_tokens",
    "unparseable_event",
    "unknown_event_type",
];

struct StreamShared {
    t0: Instant,
    /// Measured window, unix ns.
    window: (i64, i64),
    /// No stream starts after this.
    deadline: Instant,
    stream_timeout: Duration,
    args: StreamArgs,
    delays_window: Mutex<Vec<u32>>,
    delays_all: Mutex<Vec<u32>>,
    ttft_window: Mutex<Vec<u32>>,
    ttft_all: Mutex<Vec<u32>>,
    negative_delays: AtomicU64,
    tokens_all: AtomicU64,
    tokens_window: AtomicU64,
    token_events_window: AtomicU64,
    started: AtomicU64,
    completed: AtomicU64,
    verified: AtomicU64,
    active: AtomicUsize,
    finish_reasons: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    violations: Mutex<BTreeMap<String, u64>>,
    examples: Mutex<Vec<String>>,
    /// WebSocket streams that timed out: (stream id, tokens received).
    stalled: Mutex<Vec<(String, u64)>>,
    /// What the end-of-run ping on sockets with stalled streams found.
    probes: Mutex<Vec<String>>,
}

impl StreamShared {
    fn in_window(&self, t: i64) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    fn error(&self, kind: impl Into<String>, detail: impl FnOnce() -> String) {
        let kind = kind.into();
        self.example(|| format!("error {kind}: {}", detail()));
        bump(&self.errors, kind);
    }

    fn example(&self, text: impl FnOnce() -> String) {
        let mut ex = self.examples.lock().unwrap_or_else(|e| e.into_inner());
        if ex.len() < 20 {
            ex.push(text());
        }
    }

    fn body(&self, seed: u64) -> serde_json::Value {
        let a = &self.args;
        json!({
            "prompt": format!("benchmark prompt {seed}"),
            "seed": seed,
            "max_tokens": a.max_tokens,
            "emit_times": true,
            "timing": {"ttft_ms": a.ttft_ms, "inter_token_ms": a.inter_token_ms, "jitter_ms": 0},
        })
    }
}

/// Verification state of one stream.
struct Check {
    label: String,
    sent_ns: i64,
    /// The seq the next token event must have.
    expected: u64,
    tokens: u64,
    terminal: bool,
    violated: bool,
}

impl Check {
    fn new(label: String) -> Self {
        Self {
            label,
            sent_ns: unix_nanos(),
            expected: 1,
            tokens: 0,
            terminal: false,
            violated: false,
        }
    }

    fn violation(&mut self, sh: &StreamShared, kind: &'static str, detail: String) {
        self.violated = true;
        let label = &self.label;
        sh.example(|| format!("violation {kind} in {label}: {detail}"));
        bump(&sh.violations, kind);
    }

    /// Takes one event received at `recv_ns`; true when it was the terminal event.
    fn event(&mut self, sh: &StreamShared, ev: &Ev, recv_ns: i64) -> bool {
        if self.terminal {
            self.violation(sh, "event_after_terminal", format!("{} event", ev.kind));
            return false;
        }
        match ev.kind.as_str() {
            "token" => {
                let Some(seq) = ev.seq else {
                    self.violation(sh, "missing_seq", "token event without seq".into());
                    return false;
                };
                if seq < self.expected {
                    let detail = format!("seq {seq} after {}", self.expected - 1);
                    self.violation(sh, "seq_repeat_or_reorder", detail);
                    return false;
                }
                if seq > self.expected {
                    let detail = format!("expected seq {}, got {seq}", self.expected);
                    self.violation(sh, "seq_gap", detail);
                }
                let advance = seq + 1 - self.expected;
                self.expected = seq + 1;
                if self.tokens == 0 {
                    let ttft =
                        u32::try_from((recv_ns - self.sent_ns).max(0) / 1000).unwrap_or(u32::MAX);
                    push(&sh.ttft_all, ttft);
                    if sh.in_window(recv_ns) {
                        push(&sh.ttft_window, ttft);
                    }
                }
                self.tokens += advance;
                sh.tokens_all.fetch_add(advance, Ordering::Relaxed);
                let in_window = sh.in_window(recv_ns);
                if in_window {
                    sh.tokens_window.fetch_add(advance, Ordering::Relaxed);
                    sh.token_events_window.fetch_add(1, Ordering::Relaxed);
                }
                match ev.emitted_at_unix_nanos {
                    None => {
                        self.violation(sh, "missing_emitted_at", format!("seq {seq}"));
                    }
                    Some(emitted) => {
                        let ns = recv_ns - emitted;
                        if ns < 0 {
                            sh.negative_delays.fetch_add(1, Ordering::Relaxed);
                        }
                        let us = u32::try_from(ns.max(0) / 1000).unwrap_or(u32::MAX);
                        push(&sh.delays_all, us);
                        if in_window {
                            push(&sh.delays_window, us);
                        }
                    }
                }
                false
            }
            "done" | "error" => {
                self.terminal = true;
                match ev.seq {
                    Some(seq) if seq == self.expected => {}
                    other => {
                        let detail =
                            format!("terminal seq {other:?}, last token {}", self.expected - 1);
                        self.violation(sh, "terminal_seq_mismatch", detail);
                    }
                }
                if ev.kind == "error" {
                    let code = ev.code.as_deref().unwrap_or("?");
                    let msg = ev.message.clone().unwrap_or_default();
                    sh.error(format!("stream_error:{code}"), || msg);
                    return true;
                }
                let reason = ev.finish_reason.clone().unwrap_or_else(|| "?".into());
                if reason != "stop" && reason != "length" {
                    sh.error(format!("finish:{reason}"), || self.label.clone());
                } else {
                    sh.completed.fetch_add(1, Ordering::Relaxed);
                }
                bump(&sh.finish_reasons, reason);
                let completion = ev.usage.as_ref().map(|u| u.completion_tokens);
                if completion != Some(self.tokens) {
                    let detail = format!("usage {completion:?}, received {}", self.tokens);
                    self.violation(sh, "usage_mismatch", detail);
                }
                if self.tokens == 0 {
                    self.violation(sh, "no_tokens", String::new());
                }
                true
            }
            other => {
                let detail = format!("event type {other:?}");
                self.violation(sh, "unknown_event_type", detail);
                false
            }
        }
    }

    /// The stream's transport ended (`clean`: after the terminal event, without error).
    fn end(mut self, sh: &StreamShared) {
        if !self.terminal {
            self.violation(
                sh,
                "no_terminal",
                format!("{} tokens received", self.tokens),
            );
        } else if !self.violated {
            sh.verified.fetch_add(1, Ordering::Relaxed);
        }
        sh.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn push(v: &Mutex<Vec<u32>>, x: u32) {
    v.lock().unwrap_or_else(|e| e.into_inner()).push(x);
}

/// Incremental SSE parser: yields the `data:` of each complete frame.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8], mut on_data: impl FnMut(&[u8])) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(pos) = find(&self.buf[start..], b"\n\n") {
            let frame = &self.buf[start..start + pos];
            for line in frame.split(|&b| b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data:") {
                    on_data(data.strip_prefix(b" ").unwrap_or(data));
                }
            }
            start += pos + 2;
        }
        self.buf.drain(..start);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_event(sh: &StreamShared, check: &mut Check, data: &[u8]) -> Option<Ev> {
    match serde_json::from_slice::<Ev>(data) {
        Ok(ev) => Some(ev),
        Err(e) => {
            let detail = format!("{e}: {}", String::from_utf8_lossy(data));
            check.violation(sh, "unparseable_event", detail);
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// stream: the run

async fn stream_bench(args: StreamArgs) -> anyhow::Result<()> {
    if args.streams == 0 || args.ws_streams_per_socket == 0 {
        bail!("--streams and --ws-streams-per-socket must be at least 1");
    }
    let target = args.target.trim_end_matches('/').to_owned();
    let host = authority(&target)?;
    let client = http_client()?;
    let stream_len_ms = u64::from(args.ttft_ms)
        + u64::from(args.max_tokens) * u64::from(args.inter_token_ms.max(1));
    let t0 = Instant::now();
    let t0_unix = unix_nanos();
    let window_start = args.ramp_secs + args.warmup_secs;
    let window_end = window_start + args.measure_secs;
    let ns = |s: f64| t0_unix + (s * 1e9) as i64;
    let sh = Arc::new(StreamShared {
        t0,
        window: (ns(window_start), ns(window_end)),
        deadline: t0 + secs(window_end),
        stream_timeout: Duration::from_millis(stream_len_ms * 2 + 30_000),
        args: args.clone(),
        delays_window: Mutex::default(),
        delays_all: Mutex::default(),
        ttft_window: Mutex::default(),
        ttft_all: Mutex::default(),
        negative_delays: AtomicU64::default(),
        tokens_all: AtomicU64::default(),
        tokens_window: AtomicU64::default(),
        token_events_window: AtomicU64::default(),
        started: AtomicU64::default(),
        completed: AtomicU64::default(),
        verified: AtomicU64::default(),
        active: AtomicUsize::default(),
        finish_reasons: Mutex::default(),
        errors: Mutex::default(),
        violations: Mutex::default(),
        examples: Mutex::default(),
        stalled: Mutex::default(),
        probes: Mutex::default(),
    });
    let metrics_before = fetch_metrics(&client, &target).await.unwrap_or_default();

    // CPU over the window, read by a timer task.
    let cpu = {
        let sh = sh.clone();
        let pid = args.server_pid;
        tokio::spawn(async move {
            tokio::time::sleep_until(sh.t0 + secs(window_start)).await;
            let a = cpu_reading(pid)?;
            tokio::time::sleep_until(sh.t0 + secs(window_end)).await;
            let b = cpu_reading(pid)?;
            anyhow::Ok((a, b))
        })
    };
    let progress = (args.progress_secs > 0).then(|| {
        let sh = sh.clone();
        let every = Duration::from_secs(args.progress_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(sh.t0 + every, every);
            loop {
                tick.tick().await;
                let errors: u64 = sh.errors.lock().map(|m| m.values().sum()).unwrap_or(0);
                let violations: u64 = sh.violations.lock().map(|m| m.values().sum()).unwrap_or(0);
                eprintln!(
                    "[{:>5.1} s] active {} started {} completed {} tokens {} errors {} violations {}",
                    sh.t0.elapsed().as_secs_f64(),
                    sh.active.load(Ordering::Relaxed),
                    sh.started.load(Ordering::Relaxed),
                    sh.completed.load(Ordering::Relaxed),
                    sh.tokens_all.load(Ordering::Relaxed),
                    errors,
                    violations,
                );
            }
        })
    });

    let mut tasks = tokio::task::JoinSet::new();
    match args.transport {
        Transport::Sse => {
            let url = format!("{target}/v1/streams");
            for slot in 0..args.streams {
                tasks.spawn(sse_slot(sh.clone(), client.clone(), url.clone(), slot));
            }
        }
        Transport::Ws => {
            let sockets = args.streams.div_ceil(args.ws_streams_per_socket);
            let url = format!("ws://{host}/v1/ws");
            for socket in 0..sockets {
                let slots: Vec<usize> = (socket..args.streams).step_by(sockets).collect();
                tasks.spawn(ws_socket(sh.clone(), url.clone(), slots));
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(p) = progress {
        p.abort();
    }
    let run_secs = t0.elapsed().as_secs_f64();
    let metrics_after = fetch_metrics(&client, &target).await.unwrap_or_default();

    // Report.
    let a = &args;
    println!(
        "== stream: {} concurrent streams over {}, max_tokens {}, ttft {} ms, {} ms/token ({:.0} \
         tokens/s per stream), jitter 0",
        a.streams,
        match a.transport {
            Transport::Sse => "POST-SSE (HTTP/1.1, one connection per slot)".to_owned(),
            Transport::Ws => format!(
                "WebSocket ({} sockets, {} streams per socket)",
                a.streams.div_ceil(a.ws_streams_per_socket),
                a.ws_streams_per_socket
            ),
        },
        a.max_tokens,
        a.ttft_ms,
        a.inter_token_ms,
        1000.0 / f64::from(a.inter_token_ms.max(1)),
    );
    println!(
        "run {run_secs:.1} s: ramp {:.1} s, warm-up {:.1} s, measured window {:.1} s, then the \
         streams in flight were read to their end",
        a.ramp_secs, a.warmup_secs, a.measure_secs
    );
    let errors = sh.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let violations = sh
        .violations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let error_total: u64 = errors.values().sum();
    let violation_total: u64 = violations.values().sum();
    println!(
        "streams: started {}, completed {} (finish {:?}), verified clean {}, errors {}, \
         streams left open at the end {}",
        sh.started.load(Ordering::Relaxed),
        sh.completed.load(Ordering::Relaxed),
        sh.finish_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        sh.verified.load(Ordering::Relaxed),
        error_total,
        sh.active.load(Ordering::Relaxed),
    );
    let tokens_window = sh.tokens_window.load(Ordering::Relaxed);
    let events_window = sh.token_events_window.load(Ordering::Relaxed);
    println!(
        "tokens: {} received in all; in the window {} = {:.0} tokens/s (in {} token events; \
         {} coalesced)",
        sh.tokens_all.load(Ordering::Relaxed),
        tokens_window,
        tokens_window as f64 / a.measure_secs.max(1e-9),
        events_window,
        tokens_window - events_window,
    );
    let mut delays =
        std::mem::take(&mut *sh.delays_window.lock().unwrap_or_else(|e| e.into_inner()));
    println!(
        "added delay (receipt − emitted_at), window: {}",
        summary_ms(&mut delays)
    );
    let mut delays = std::mem::take(&mut *sh.delays_all.lock().unwrap_or_else(|e| e.into_inner()));
    println!(
        "added delay, whole run (ramp and drain too): {}",
        summary_ms(&mut delays)
    );
    println!(
        "negative delays (clock anomalies, counted as 0): {}",
        sh.negative_delays.load(Ordering::Relaxed)
    );
    let mut ttft = std::mem::take(&mut *sh.ttft_window.lock().unwrap_or_else(|e| e.into_inner()));
    println!(
        "time to first token (receipt − request sent; requested {} ms), window: {}",
        a.ttft_ms,
        summary_ms(&mut ttft)
    );
    println!(
        "errors by kind: {}",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            format!("{errors:?}")
        }
    );
    let listed: Vec<String> = VIOLATIONS
        .iter()
        .map(|k| format!("{k} {}", violations.get(*k).copied().unwrap_or(0)))
        .collect();
    println!(
        "verification violations: {violation_total} ({})",
        listed.join(", ")
    );
    for ex in sh.examples.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("  example: {ex}");
    }
    let stalled = std::mem::take(&mut *sh.stalled.lock().unwrap_or_else(|e| e.into_inner()));
    if !stalled.is_empty() {
        println!("streams that timed out: {}", stalled.len());
        for probe in sh.probes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            println!("  {probe}");
        }
        for (id, tokens) in stalled.iter().take(3) {
            let server = match stream_events(&client, &target, id).await {
                Ok((status, events)) => format!("server: status {status}, {events} events"),
                Err(e) => format!("server: short-poll failed: {e:#}"),
            };
            println!("  stream {id}: client received {tokens} tokens; {server}");
        }
    }
    match cpu.await {
        Ok(Ok((x, y))) => print_cpu("over the window", &x, &y, a.clk_tck),
        Ok(Err(e)) => println!("CPU: not measured ({e:#})"),
        Err(e) => println!("CPU: not measured ({e})"),
    }
    if let Some(pid) = a.server_pid
        && let Ok(m) = proc_memory(&pid.to_string())
    {
        println!(
            "server memory at the end: VmRSS {} KiB, VmHWM {} KiB, threads {}",
            m.rss, m.hwm, m.threads
        );
    }
    if !metrics_after.is_empty() {
        let delta = |name: &str, label: &str| {
            metric(&metrics_after, name, label) - metric(&metrics_before, name, label)
        };
        println!(
            "server counters over the run: coalesced_events {}, slow_consumer_closes {}, \
             connections_refused {}, generator_retries {}, streams_total {{done}} {}",
            delta("tokenfan_edge_coalesced_events_total", ""),
            delta("tokenfan_edge_slow_consumer_closes_total", ""),
            delta("tokenfan_edge_connections_refused_total", ""),
            delta("tokenfan_edge_generator_retries_total", ""),
            delta("tokenfan_edge_streams_total", "outcome=\"done\""),
        );
    }
    if error_total > 0 || violation_total > 0 {
        println!("RESULT: FAILED ({error_total} errors, {violation_total} violations)");
    } else {
        println!("RESULT: ok (0 errors, 0 violations)");
    }
    Ok(())
}

/// One SSE slot: streams back to back until the deadline.
async fn sse_slot(sh: Arc<StreamShared>, client: reqwest::Client, url: String, slot: usize) {
    let a = &sh.args;
    let offset = a.ramp_secs * slot as f64 / a.streams as f64;
    tokio::time::sleep_until(sh.t0 + secs(offset)).await;
    let mut n = 0u64;
    while Instant::now() < sh.deadline {
        let seed = mix(a.seed ^ ((slot as u64) << 24) ^ n);
        n += 1;
        if !sse_one(&sh, &client, &url, format!("slot {slot} stream {n}"), seed).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One POST-SSE stream, read to its end; false on an error.
async fn sse_one(
    sh: &StreamShared,
    client: &reqwest::Client,
    url: &str,
    label: String,
    seed: u64,
) -> bool {
    sh.started.fetch_add(1, Ordering::Relaxed);
    sh.active.fetch_add(1, Ordering::Relaxed);
    let mut check = Check::new(label);
    let deadline = Instant::now() + sh.stream_timeout;
    let sent = client
        .post(url)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .json(&sh.body(seed))
        .send();
    let mut resp = match tokio::time::timeout_at(deadline, sent).await {
        Err(_) => {
            sh.error("timeout_response", || check.label.clone());
            check.end(sh);
            return false;
        }
        Ok(Err(e)) => {
            let kind = if e.is_connect() { "connect" } else { "request" };
            sh.error(kind, || format!("{e:#}"));
            check.end(sh);
            return false;
        }
        Ok(Ok(r)) => r,
    };
    if resp.status() != reqwest::StatusCode::OK {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        sh.error(format!("http_{status}"), || body);
        check.end(sh);
        return false;
    }
    let mut parser = SseParser::default();
    let mut ok = true;
    loop {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Err(_) => {
                sh.error("timeout_body", || check.label.clone());
                ok = false;
                break;
            }
            Ok(Err(e)) => {
                sh.error("read", || format!("{e:#}"));
                ok = false;
                break;
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(bytes))) => {
                let recv = unix_nanos();
                parser.push(&bytes, |data| {
                    if let Some(ev) = parse_event(sh, &mut check, data) {
                        check.event(sh, &ev, recv);
                    }
                });
            }
        }
    }
    if !check.terminal && ok {
        sh.error("eof_before_terminal", || check.label.clone());
        ok = false;
    }
    check.end(sh);
    ok
}

/// One WebSocket carrying `slots`, each running streams back to back until the deadline.
async fn ws_socket(sh: Arc<StreamShared>, url: String, slots: Vec<usize>) {
    struct Slot {
        global: usize,
        n: u64,
        next_start: Option<Instant>,
        request_id: Option<String>,
        stream_id: Option<String>,
        check: Option<Check>,
        timeout_at: Instant,
    }
    let a = &sh.args;
    let mut state: Vec<Slot> = slots
        .iter()
        .map(|&g| Slot {
            global: g,
            n: 0,
            next_start: Some(sh.t0 + secs(a.ramp_secs * g as f64 / a.streams as f64)),
            request_id: None,
            stream_id: None,
            check: None,
            timeout_at: sh.deadline,
        })
        .collect();
    let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            sh.error("ws_connect", || format!("{e}"));
            return;
        }
    };
    let mut timed_out = 0usize;
    let mut socket_open = true;
    let mut by_request: HashMap<String, usize> = HashMap::new();
    let mut by_stream: HashMap<String, usize> = HashMap::new();
    let fail = |slot: &mut Slot, sh: &StreamShared, retry: bool| {
        if let Some(check) = slot.check.take() {
            check.end(sh);
        }
        slot.request_id = None;
        slot.stream_id = None;
        slot.next_start = retry.then(|| Instant::now() + Duration::from_millis(200));
    };
    loop {
        let now = Instant::now();
        // Start what is due; expire what timed out.
        for (i, slot) in state.iter_mut().enumerate() {
            if slot.check.is_some() && now >= slot.timeout_at {
                let label = slot
                    .check
                    .as_ref()
                    .map(|c| c.label.clone())
                    .unwrap_or_default();
                let tokens = slot.check.as_ref().map_or(0, |c| c.tokens);
                let id = slot.stream_id.clone().unwrap_or_default();
                sh.error("timeout_body", || {
                    format!("{label}, stream {id}, {tokens} tokens")
                });
                timed_out += 1;
                sh.stalled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id, tokens));
                if let Some(id) = slot.stream_id.take() {
                    by_stream.remove(&id);
                }
                fail(slot, &sh, true);
            }
            if slot.check.is_none() && slot.next_start.is_some_and(|t| t <= now) {
                if now >= sh.deadline {
                    slot.next_start = None;
                    continue;
                }
                let seed = mix(a.seed ^ ((slot.global as u64) << 24) ^ slot.n);
                slot.n += 1;
                let rid = format!("{}-{}", slot.global, slot.n);
                let msg = json!({"type": "start", "request_id": rid, "request": sh.body(seed)});
                sh.started.fetch_add(1, Ordering::Relaxed);
                sh.active.fetch_add(1, Ordering::Relaxed);
                slot.check = Some(Check::new(format!(
                    "slot {} stream {}",
                    slot.global, slot.n
                )));
                slot.timeout_at = now + sh.stream_timeout;
                slot.next_start = None;
                by_request.insert(rid.clone(), i);
                slot.request_id = Some(rid);
                if let Err(e) = ws.send(Message::text(msg.to_string())).await {
                    sh.error("ws_send", || format!("{e}"));
                    for s in &mut state {
                        fail(s, &sh, false);
                    }
                    return;
                }
            }
        }
        let busy = state.iter().any(|s| s.check.is_some());
        let next_wake = state
            .iter()
            .filter_map(|s| {
                if s.check.is_some() {
                    Some(s.timeout_at)
                } else {
                    s.next_start
                }
            })
            .min();
        let Some(next_wake) = next_wake else {
            debug_assert!(!busy);
            break;
        };
        let msg = tokio::select! {
            m = ws.next() => m,
            () = tokio::time::sleep_until(next_wake) => continue,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                sh.error("ws_closed_by_server", || format!("{frame:?}"));
                socket_open = false;
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                sh.error("ws_read", || format!("{e}"));
                socket_open = false;
                break;
            }
            None => {
                sh.error("ws_eof", String::new);
                socket_open = false;
                break;
            }
        };
        let recv = unix_nanos();
        let ev = match serde_json::from_str::<Ev>(&text) {
            Ok(ev) => ev,
            Err(e) => {
                bump(&sh.violations, "unparseable_event");
                sh.example(|| format!("violation unparseable_event: {e}: {text}"));
                continue;
            }
        };
        match (ev.kind.as_str(), ev.seq) {
            ("started", _) => {
                let (Some(rid), Some(sid)) = (&ev.request_id, &ev.stream_id) else {
                    sh.error("ws_bad_started", || text.to_string());
                    continue;
                };
                if let Some(i) = by_request.remove(rid) {
                    by_stream.insert(sid.clone(), i);
                    state[i].stream_id = Some(sid.clone());
                } else {
                    sh.error("ws_unknown_request", || text.to_string());
                }
            }
            ("pong", _) => {}
            // A protocol error (no seq): about a request or a stream of this socket.
            ("error", None) => {
                let code = ev.code.clone().unwrap_or_default();
                let slot = ev
                    .request_id
                    .as_ref()
                    .and_then(|r| by_request.remove(r))
                    .or_else(|| ev.stream_id.as_ref().and_then(|s| by_stream.remove(s)));
                sh.error(format!("ws_error:{code}"), || text.to_string());
                if let Some(i) = slot {
                    if let Some(id) = state[i].stream_id.take() {
                        by_stream.remove(&id);
                    }
                    fail(&mut state[i], &sh, true);
                }
            }
            _ => {
                let Some(i) = ev
                    .stream_id
                    .as_ref()
                    .and_then(|s| by_stream.get(s))
                    .copied()
                else {
                    sh.error("ws_unknown_stream", || text.to_string());
                    continue;
                };
                let slot = &mut state[i];
                let Some(check) = slot.check.as_mut() else {
                    continue;
                };
                if check.event(&sh, &ev, recv) {
                    if let Some(id) = slot.stream_id.take() {
                        by_stream.remove(&id);
                    }
                    slot.request_id = None;
                    if let Some(check) = slot.check.take() {
                        check.end(&sh);
                    }
                    slot.next_start = Some(Instant::now());
                }
            }
        }
    }
    for s in &mut state {
        if s.check.is_some() {
            fail(s, &sh, false);
        }
    }
    if timed_out > 0 && socket_open {
        // Is the socket still served? A live one answers a ping at once.
        let probe = json!({"type": "ping", "id": "stall-probe"}).to_string();
        let answer = async {
            ws.send(Message::text(probe)).await?;
            let mut other = 0u64;
            while let Some(m) = ws.next().await {
                match m? {
                    Message::Text(t) if t.contains("stall-probe") => return anyhow::Ok(other),
                    _ => other += 1,
                }
            }
            bail!("closed")
        };
        let verdict = match tokio::time::timeout(Duration::from_secs(3), answer).await {
            Ok(Ok(other)) => format!("answered the ping ({other} other messages first)"),
            Ok(Err(e)) => format!("failed: {e:#}"),
            Err(_) => {
                "did NOT answer a ping within 3 s (the server's socket task is stuck)".to_owned()
            }
        };
        sh.probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!(
                "socket with slots {:?}…: {timed_out} streams timed out; it {verdict}",
                &slots[..slots.len().min(3)]
            ));
    }
    let _ = ws.close(None).await;
}

// ---------------------------------------------------------------------------------------------
// idle

async fn idle_bench(args: IdleArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.connect_concurrency == 0 {
        bail!("--connections and --connect-concurrency must be at least 1");
    }
    let target = args.target.trim_end_matches('/').to_owned();
    let host = authority(&target)?;
    let pid = args.server_pid.to_string();
    let client = http_client()?;
    let label = match args.kind {
        IdleKind::Sse => "transport=\"sse\"",
        IdleKind::Ws | IdleKind::WsSubscribed => "transport=\"ws\"",
    };
    // `+ 0.0` turns a gauge of -0 into 0.
    let gauge = |text: &str| metric(text, "tokenfan_edge_connections", label) + 0.0;
    let g0 = gauge(&fetch_metrics(&client, &target).await?);

    // The silent stream: created first, so its memory is in the baseline.
    let stream_id = match args.kind {
        IdleKind::Ws => None,
        IdleKind::Sse | IdleKind::WsSubscribed => {
            Some(create_silent(&client, &target, &args).await?)
        }
    };
    let created = Instant::now();
    let silent_until = created + Duration::from_millis(u64::from(args.silent_ttft_ms));
    tokio::time::sleep(secs(args.settle_secs)).await;
    let before = proc_memory(&pid)?;
    let client_before = proc_memory("self")?;
    let cpu_before = cpu_reading(Some(args.server_pid))?;

    // Open the connections; each is then held by a task until `close`.
    let close = CancellationToken::new();
    let stats = Arc::new(IdleStats::default());
    let opening = Instant::now();
    let mut holders = tokio::task::JoinSet::new();
    {
        let mut opens = futures::stream::iter(0..args.connections)
            .map(|_| open_idle(&host, args.kind, stream_id.as_deref()))
            .buffer_unordered(args.connect_concurrency);
        let open_deadline = opening + secs(args.open_timeout_secs);
        loop {
            let next = tokio::time::timeout_at(open_deadline, opens.next()).await;
            match next {
                Err(_) => {
                    bump(&stats.errors, "open_timeout");
                    break;
                }
                Ok(None) => break,
                Ok(Some(Ok(conn))) => {
                    stats.open.fetch_add(1, Ordering::Relaxed);
                    holders.spawn(hold(conn, stats.clone(), close.clone()));
                }
                Ok(Some(Err(e))) => {
                    let kind = e.to_string();
                    let kind = kind.split(':').next().unwrap_or("open").to_owned();
                    if stats.errors.lock().map(|m| m.is_empty()).unwrap_or(false) {
                        eprintln!("first connection error: {e:#}");
                    }
                    bump(&stats.errors, kind);
                }
            }
        }
    }
    let opened_in = opening.elapsed();
    let opened = stats.open.load(Ordering::Relaxed);
    // Wait (bounded) until the server counts them all.
    let want = g0 + args.connections as f64;
    let count_deadline = Instant::now() + secs(args.open_timeout_secs);
    let mut counted = g0;
    loop {
        if let Ok(text) = fetch_metrics(&client, &target).await {
            counted = gauge(&text);
        }
        if counted >= want || Instant::now() >= count_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(secs(args.settle_secs)).await;
    let after = proc_memory(&pid)?;
    let client_after = proc_memory("self")?;
    let cpu_after = cpu_reading(Some(args.server_pid))?;
    let measured_at = Instant::now();
    // Still silent? (A short-poll answers at once with the events so far.)
    let silent = match &stream_id {
        None => None,
        Some(id) => Some(stream_events(&client, &target, id).await),
    };

    let n = args.connections as f64;
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n;
    println!(
        "== idle: {} {} connections to {target} (edge pid {pid})",
        args.connections,
        match args.kind {
            IdleKind::Sse => "SSE (GET /v1/streams/{id}/events, HTTP/1.1, one TCP connection each)",
            IdleKind::Ws => "WebSocket (/v1/ws, no subscription)",
            IdleKind::WsSubscribed => "WebSocket (/v1/ws, each subscribed to the silent stream)",
        }
    );
    println!(
        "opened {opened} in {:.2} s; server gauge tokenfan_edge_connections{{{label}}} {} → {} \
         (wanted ≥ {want})",
        opened_in.as_secs_f64(),
        g0,
        counted
    );
    println!(
        "server VmRSS {} KiB → {} KiB: +{} KiB = {:.2} KiB ({:.0} bytes) per connection",
        before.rss,
        after.rss,
        after.rss as i64 - before.rss as i64,
        per(before.rss, after.rss),
        per(before.rss, after.rss) * 1024.0,
    );
    println!(
        "server RssAnon {} KiB → {} KiB: {:.2} KiB per connection; threads {} → {}",
        before.anon,
        after.anon,
        per(before.anon, after.anon),
        before.threads,
        after.threads
    );
    println!(
        "client VmRSS {} KiB → {} KiB ({:.2} KiB per connection, client side)",
        client_before.rss,
        client_after.rss,
        per(client_before.rss, client_after.rss)
    );
    print_cpu(
        "from before opening to the reading",
        &cpu_before,
        &cpu_after,
        args.clk_tck,
    );
    let within = measured_at < silent_until;
    if let Some(id) = &stream_id {
        println!(
            "silent stream {id}: ttft {} ms, measured {:.1} s after it was created ({}); \
             short-poll: {}",
            args.silent_ttft_ms,
            measured_at.duration_since(created).as_secs_f64(),
            if within {
                "inside the silent window"
            } else {
                "PAST the silent window"
            },
            match &silent {
                Some(Ok((status, events))) => format!("status {status}, {events} events"),
                Some(Err(e)) => format!("failed: {e:#}"),
                None => String::new(),
            }
        );
    }
    let errors = stats
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!(
        "on the held connections: {} SSE bytes after the response head, {} token events \
         seen, {} WebSocket text messages, {} closed early",
        stats.extra_bytes.load(Ordering::Relaxed),
        stats.tokens_seen.load(Ordering::Relaxed),
        stats.ws_texts.load(Ordering::Relaxed),
        stats.closed_early.load(Ordering::Relaxed),
    );
    println!(
        "errors by kind: {}",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            format!("{errors:?}")
        }
    );

    // Close them all and see what the server gives back.
    close.cancel();
    while holders.join_next().await.is_some() {}
    let drain_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = fetch_metrics(&client, &target).await {
            counted = gauge(&text);
        }
        if counted <= g0 || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(secs(args.settle_secs)).await;
    let closed = proc_memory(&pid)?;
    println!(
        "after closing them: gauge {counted}, server VmRSS {} KiB ({:+} KiB against the baseline), \
         VmHWM {} KiB",
        closed.rss,
        closed.rss as i64 - before.rss as i64,
        closed.hwm
    );
    let ok = errors.is_empty()
        && opened == args.connections
        && counted <= g0
        && stats.tokens_seen.load(Ordering::Relaxed) == 0
        && stats.closed_early.load(Ordering::Relaxed) == 0
        && (stream_id.is_none() || within);
    println!(
        "RESULT: {}",
        if ok {
            "ok".to_owned()
        } else {
            "FAILED (see above)".to_owned()
        }
    );
    Ok(())
}

#[derive(Default)]
struct IdleStats {
    open: AtomicUsize,
    extra_bytes: AtomicU64,
    tokens_seen: AtomicU64,
    ws_texts: AtomicU64,
    closed_early: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

/// Creates a stream that emits nothing for `--silent-ttft-ms`; returns its id.
async fn create_silent(
    client: &reqwest::Client,
    target: &str,
    args: &IdleArgs,
) -> anyhow::Result<String> {
    let body = json!({
        "prompt": "an idle stream",
        "seed": 1,
        "max_tokens": 8,
        "timing": {"ttft_ms": args.silent_ttft_ms, "inter_token_ms": 20, "jitter_ms": 0},
    });
    let resp = client
        .post(format!("{target}/v1/streams"))
        .json(&body)
        .send()
        .await
        .context("POST /v1/streams")?;
    let status = resp.status();
    let text = resp.text().await?;
    if status != reqwest::StatusCode::CREATED {
        bail!("POST /v1/streams: {status}: {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["id"]
        .as_str()
        .map(str::to_owned)
        .context("201 without an id")
}

/// Short-poll: (status, number of events).
async fn stream_events(
    client: &reqwest::Client,
    target: &str,
    id: &str,
) -> anyhow::Result<(String, usize)> {
    let v: serde_json::Value = client
        .get(format!("{target}/v1/streams/{id}?after=0"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok((
        v["status"].as_str().unwrap_or("?").to_owned(),
        v["events"].as_array().map_or(0, Vec::len),
    ))
}

type WsStream = tokio_tungstenite::WebSocketStream<TcpStream>;

enum IdleConn {
    Sse(TcpStream),
    Ws(Box<WsStream>),
}

/// Opens one idle connection and returns once the server answered it.
async fn open_idle(
    host: &str,
    kind: IdleKind,
    stream_id: Option<&str>,
) -> anyhow::Result<IdleConn> {
    let work = async {
        let tcp = TcpStream::connect(host).await.context("connect")?;
        tcp.set_nodelay(true).context("connect")?;
        match kind {
            IdleKind::Sse => {
                let id = stream_id.context("sse: no stream")?;
                let mut tcp = tcp;
                let request = format!(
                    "GET /v1/streams/{id}/events HTTP/1.1\r\nHost: {host}\r\n\
                     Accept: text/event-stream\r\n\r\n"
                );
                tcp.write_all(request.as_bytes()).await.context("write")?;
                // Read the response head (and the first chunk with it, if it came along).
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 512];
                loop {
                    let n = tcp.read(&mut buf).await.context("read")?;
                    if n == 0 {
                        bail!("eof: closed before the response head");
                    }
                    head.extend_from_slice(&buf[..n]);
                    if find(&head, b"\r\n\r\n").is_some() {
                        break;
                    }
                    if head.len() > 16 * 1024 {
                        bail!("head: too long");
                    }
                }
                if !head.starts_with(b"HTTP/1.1 200") {
                    let line = String::from_utf8_lossy(&head);
                    let line = line.lines().next().unwrap_or("").to_owned();
                    bail!("status: {line}");
                }
                Ok(IdleConn::Sse(tcp))
            }
            IdleKind::Ws | IdleKind::WsSubscribed => {
                let url = format!("ws://{host}/v1/ws");
                // Small client buffers: 10 000 sockets on the client side too.
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (mut ws, _) =
                    tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
                        .await
                        .context("handshake")?;
                if kind == IdleKind::WsSubscribed {
                    let id = stream_id.context("ws-subscribed: no stream")?;
                    let sub = json!({"type": "subscribe", "stream_id": id, "after": 0});
                    ws.send(Message::text(sub.to_string()))
                        .await
                        .context("send")?;
                    // The socket handles messages in order: the pong means the subscribe was
                    // taken (a refusal would come first, as an error).
                    ws.send(Message::text(r#"{"type":"ping","id":1}"#))
                        .await
                        .context("send")?;
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Text(t))) if t.contains("\"pong\"") => break,
                            Some(Ok(Message::Text(t))) => bail!("subscribe: {t}"),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => bail!("read: {e}"),
                            None => bail!("eof: closed before the pong"),
                        }
                    }
                }
                Ok(IdleConn::Ws(Box::new(ws)))
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .context("timeout")?
}

/// Holds one connection until `close`, counting anything it receives.
async fn hold(conn: IdleConn, stats: Arc<IdleStats>, close: CancellationToken) {
    match conn {
        IdleConn::Sse(mut tcp) => {
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    r = tcp.read(&mut buf) => match r {
                        Ok(0) | Err(_) => {
                            stats.closed_early.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(n) => {
                            stats.extra_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            if find(&buf[..n], b"event: token").is_some() {
                                stats.tokens_seen.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    },
                    () = close.cancelled() => return,
                }
            }
        }
        IdleConn::Ws(mut ws) => loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        stats.ws_texts.fetch_add(1, Ordering::Relaxed);
                        if t.contains("\"token\"") {
                            stats.tokens_seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        stats.closed_early.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                },
                () = close.cancelled() => {
                    let _ = WsStream::close(&mut ws, None).await;
                    return;
                }
            }
        },
    }
}
