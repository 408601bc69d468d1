//! Command line: one subcommand per scenario (plus `idle` and `chart`), and the [`Plan`] every
//! streaming scenario is normalised into.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::stats::Kind;

/// Default target of the HTTP scenarios (the edge's default listen address).
pub const DEFAULT_HTTP_TARGET: &str = "http://127.0.0.1:8080";
const DEFAULT_VIEWERS: usize = 10;
const DEFAULT_STREAMS_PER_SOCKET: usize = 50;
const DEFAULT_POLL_TIMEOUT_MS: u32 = 25_000;
const DEFAULT_POLL_INTERVAL_MS: u64 = 100;

/// Default target of the `grpc` scenario (the generator's default listen address).
pub const DEFAULT_GRPC_TARGET: &str = "http://127.0.0.1:50051";

#[derive(Debug, Parser)]
#[command(
    name = "tokenfan-loadgen",
    version,
    about = "Load tester for LLM token streaming: tokenfan and any server speaking its native \
             wire format",
    long_about = "Load tester for LLM token streaming: tokenfan and any server speaking its \
                  native wire format.\n\nEvery stream is verified (seqs exactly once and in \
                  order, one terminal event, usage equal to the tokens received; in `watch` \
                  every viewer must get the same text). It reports time to first token, the \
                  gap between tokens as received, the delay the server adds (receipt minus the \
                  generator's `emitted_at_unix_nanos`, one clock on loopback), tokens/s, \
                  events/s, errors by kind and its own CPU use. Exit status: 0 when every \
                  stream was clean, 1 when any error or violation was counted, 2 on bad usage."
)]
pub struct Cli {
    /// Tokio worker threads (1 = a current-thread runtime: pin the process to one core and
    /// its CPU figure is that core's).
    #[arg(
        long,
        global = true,
        default_value_t = 1,
        env = "TOKENFAN_LOADGEN_THREADS"
    )]
    pub threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// OpenAI `POST /v1/chat/completions` with `stream: true` (added delay from the tokenfan
    /// extension `emit_times`: token chunks carry `emitted_at_unix_nanos`).
    Chat(ChatCmd),
    /// Native POST-SSE: `POST /v1/streams` with `Accept: text/event-stream`.
    Native(NativeCmd),
    /// K streams × M viewers: streams created by `POST /v1/streams` (201), each read by
    /// `--viewers` EventSource-style `GET /v1/streams/{id}/events`, spread over the targets.
    Watch(WatchCmd),
    /// WebSocket `/v1/ws`: `start` messages, `--streams-per-socket` streams per socket.
    Ws(WsCmd),
    /// `POST /v1/streams` (201), then `GET /v1/streams/{id}/poll?after=N&timeout_ms=T`.
    Longpoll(LongpollCmd),
    /// `POST /v1/streams` (201), then `GET /v1/streams/{id}?after=N` every interval.
    Shortpoll(ShortpollCmd),
    /// A weighted mix of chat, native, watch, ws, longpoll and shortpoll streams.
    Mixed(MixedCmd),
    /// Direct gRPC `Generate` calls to `tokenfan-generator`: the floor to compare against.
    Grpc(GrpcCmd),
    /// Resident memory per idle connection of a server (SSE, WebSocket).
    Idle(IdleArgs),
    /// An SVG chart of latency distributions from `--json` result files.
    Chart(ChartArgs),
    /// One exact result from the `--json` results of several load generators: counters
    /// summed, percentiles from the merged HDR histograms; runs of different scenarios,
    /// timing or windows are refused.
    Merge(MergeArgs),
}

/// Load shape and stream requests, shared by every streaming scenario.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Base URL of a server; repeat it or give a comma list to spread streams round-robin
    /// over replicas (or give one load balancer). Default: http://127.0.0.1:8080
    /// (grpc: http://127.0.0.1:50051).
    #[arg(
        long = "target",
        value_delimiter = ',',
        env = "TOKENFAN_LOADGEN_TARGET"
    )]
    pub targets: Vec<String>,
    /// Closed loop: streams kept in flight at once (a finished one starts the next). In
    /// `watch`: streams, each with `--viewers` viewers.
    #[arg(
        long,
        visible_alias = "streams",
        default_value_t = 100,
        env = "TOKENFAN_LOADGEN_CONCURRENCY"
    )]
    pub concurrency: usize,
    /// Open loop: new streams per second (they arrive on schedule whatever the server does;
    /// replaces the closed loop). The rate rises linearly over `--ramp`.
    #[arg(long, env = "TOKENFAN_LOADGEN_RATE")]
    pub rate: Option<f64>,
    /// Open loop: most streams in flight; an arrival beyond it is dropped and counted as the
    /// error `arrival_dropped_in_flight_cap`.
    #[arg(long, default_value_t = 10_000, env = "TOKENFAN_LOADGEN_MAX_IN_FLIGHT")]
    pub max_in_flight: usize,
    /// Length of the measured window, seconds.
    #[arg(
        long,
        visible_alias = "measure-secs",
        default_value_t = 20.0,
        env = "TOKENFAN_LOADGEN_DURATION"
    )]
    pub duration: f64,
    /// Connection ramp, seconds: closed-loop slots start evenly over it (open loop: the rate
    /// rises linearly over it).
    #[arg(
        long,
        visible_alias = "ramp-secs",
        default_value_t = 5.0,
        env = "TOKENFAN_LOADGEN_RAMP"
    )]
    pub ramp: f64,
    /// Seconds between the end of the ramp and the measured window.
    #[arg(
        long,
        visible_alias = "warmup-secs",
        default_value_t = 5.0,
        env = "TOKENFAN_LOADGEN_WARMUP"
    )]
    pub warmup: f64,
    /// `max_tokens` of each stream (a stream ends earlier when its answer does).
    #[arg(long, default_value_t = 300, env = "TOKENFAN_LOADGEN_MAX_TOKENS")]
    pub max_tokens: u32,
    /// Requested time to first token, ms (`timing.ttft_ms`).
    #[arg(long, default_value_t = 100, env = "TOKENFAN_LOADGEN_TTFT_MS")]
    pub ttft_ms: u32,
    /// Requested gap between tokens, ms (`timing.inter_token_ms`; 20 ms = 50 tokens/s).
    #[arg(long, default_value_t = 20, env = "TOKENFAN_LOADGEN_INTER_TOKEN_MS")]
    pub inter_token_ms: u32,
    /// Requested jitter of the gap, ms (`timing.jitter_ms`).
    #[arg(long, default_value_t = 0, env = "TOKENFAN_LOADGEN_JITTER_MS")]
    pub jitter_ms: u32,
    /// Base of the per-stream seeds (the same seed gives the same answer).
    #[arg(long, default_value_t = 0x5eed, env = "TOKENFAN_LOADGEN_SEED")]
    pub seed: u64,
    /// `model` of each request (absent: the server's default; chat: tokenfan-mock).
    #[arg(long, env = "TOKENFAN_LOADGEN_MODEL")]
    pub model: Option<String>,
    /// Prompt of each stream; the stream's seed is appended.
    #[arg(
        long,
        default_value = "benchmark prompt",
        env = "TOKENFAN_LOADGEN_PROMPT"
    )]
    pub prompt: String,
    /// Don't ask for `"emit_times": true` and don't require `emitted_at_unix_nanos` on token
    /// events (added delay is then not measured).
    #[arg(long, env = "TOKENFAN_LOADGEN_NO_EMIT_TIMES")]
    pub no_emit_times: bool,
    /// Accept coalesced token events (a seq jump whose text carries the skipped tokens) instead
    /// of counting the skipped seqs as lost.
    #[arg(long, env = "TOKENFAN_LOADGEN_ALLOW_COALESCING")]
    pub allow_coalescing: bool,
    /// Longest a stream may take before it is abandoned (default: 2 × its nominal length +
    /// 30 s).
    #[arg(long, env = "TOKENFAN_LOADGEN_STREAM_TIMEOUT_SECS")]
    pub stream_timeout_secs: Option<f64>,
    /// Reconnect like an EventSource, up to this many times per stream, 1 s apart, on the next
    /// target: in `native` and `watch`, a connection that drops before the terminal event is
    /// re-attached with `GET /v1/streams/{id}/events` and `Last-Event-ID` = the last seq
    /// received, and the stream is verified across the resumes; in the HTTP scenarios, a
    /// refused connection (nothing was sent) is tried again. Each retry is counted under
    /// `resumes` by what ended the connection. 0 = a drop or a refusal is an error.
    #[arg(long, default_value_t = 0, env = "TOKENFAN_LOADGEN_RESUME_ATTEMPTS")]
    pub resume_attempts: u32,
    /// Start the run's clock (the ramp) at this wall-clock time: RFC 3339
    /// (`2026-12-02T21:00:00Z`) or Unix seconds. Every process of a horizontal run given the
    /// same time (and the same ramp, warm-up and duration) measures the same window, so the
    /// merged tokens/s is a rate over one window. Connections are set up first; a process that
    /// comes up late joins mid-ramp; once the window has begun it refuses to run (exit 2).
    #[arg(long, env = "TOKENFAN_LOADGEN_START_AT")]
    pub start_at: Option<String>,
    /// HTTP version of the HTTP scenarios: `1.1`; `2` (h2c with prior knowledge on http://,
    /// ALPN h2 on https://); `auto` (https://: ALPN offers h2 and http/1.1, the server picks;
    /// http://: HTTP/1.1). WebSockets always use HTTP/1.1 Upgrade.
    #[arg(long, value_enum, default_value = "1.1", env = "TOKENFAN_LOADGEN_HTTP")]
    pub http: HttpVersion,
    /// PEM file of the CA certificates to trust for https:// and wss:// targets (default: the
    /// system's).
    #[arg(long, env = "TOKENFAN_LOADGEN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate on https:// targets (test servers with self-signed
    /// certificates only).
    #[arg(long, env = "TOKENFAN_LOADGEN_INSECURE")]
    pub insecure: bool,
}

/// `--http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HttpVersion {
    #[value(name = "1.1")]
    Http1,
    #[value(name = "2")]
    Http2,
    Auto,
}

impl HttpVersion {
    pub fn name(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "1.1",
            HttpVersion::Http2 => "2",
            HttpVersion::Auto => "auto",
        }
    }
}

/// What to measure besides the streams, and where the result goes.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Process id of a server (repeatable): its CPU over the window and its memory.
    #[arg(
        long = "server-pid",
        env = "TOKENFAN_LOADGEN_SERVER_PID",
        value_delimiter = ','
    )]
    pub server_pids: Vec<u32>,
    /// Read tokenfan's `/metrics` on every target before and after the run and report its
    /// counters (coalesced events, slow consumers, refused connections, generator retries).
    #[arg(long, env = "TOKENFAN_LOADGEN_METRICS")]
    pub metrics: bool,
    /// With `--metrics`: read `/metrics` from these base URLs instead of the targets (the
    /// edges' admin listeners, e.g. http://127.0.0.1:9465, when `/metrics` is not served on
    /// the public port). Repeat it or give a comma list.
    #[arg(
        long = "metrics-url",
        value_delimiter = ',',
        env = "TOKENFAN_LOADGEN_METRICS_URL"
    )]
    pub metrics_urls: Vec<String>,
    /// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100, env = "TOKENFAN_LOADGEN_CLK_TCK")]
    pub clk_tck: u64,
    /// Write the full result as JSON to this file.
    #[arg(long, env = "TOKENFAN_LOADGEN_JSON")]
    pub json: Option<PathBuf>,
    /// Name of the system measured (tokenfan, express, pushpin, grpc-floor, …), for reports
    /// and charts.
    #[arg(long, env = "TOKENFAN_LOADGEN_LABEL")]
    pub label: Option<String>,
    /// No live progress line on stderr.
    #[arg(long, short, env = "TOKENFAN_LOADGEN_QUIET")]
    pub quiet: bool,
    /// Seconds between progress updates.
    #[arg(long, default_value_t = 1.0, env = "TOKENFAN_LOADGEN_PROGRESS_SECS")]
    pub progress_secs: f64,
}

#[derive(Debug, Clone, Args)]
pub struct ChatCmd {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Clone, Args)]
pub struct NativeCmd {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WatchOpts {
    /// Viewers per stream, each its own `GET /v1/streams/{id}/events` (round-robin over the
    /// targets).
    #[arg(long, default_value_t = DEFAULT_VIEWERS, env = "TOKENFAN_LOADGEN_VIEWERS")]
    pub viewers: usize,
}

#[derive(Debug, Clone, Args)]
pub struct WatchCmd {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub watch: WatchOpts,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WsOpts {
    /// Streams multiplexed on each WebSocket (tokenfan allows 64 per socket).
    #[arg(
        long,
        visible_alias = "ws-streams-per-socket",
        default_value_t = DEFAULT_STREAMS_PER_SOCKET,
        env = "TOKENFAN_LOADGEN_STREAMS_PER_SOCKET"
    )]
    pub streams_per_socket: usize,
}

#[derive(Debug, Clone, Args)]
pub struct WsCmd {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub ws: WsOpts,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Clone, Args)]
pub struct LongpollOpts {
    /// `timeout_ms` of each long-poll (tokenfan allows up to 55 000).
    #[arg(long, default_value_t = DEFAULT_POLL_TIMEOUT_MS, env = "TOKENFAN_LOADGEN_POLL_TIMEOUT_MS")]
    pub poll_timeout_ms: u32,
}

#[derive(Debug, Clone, Args)]
pub struct LongpollCmd {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub longpoll: LongpollOpts,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ShortpollOpts {
    /// Pause between short-polls of a stream, ms.
    #[arg(long, default_value_t = DEFAULT_POLL_INTERVAL_MS, env = "TOKENFAN_LOADGEN_POLL_INTERVAL_MS")]
    pub poll_interval_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ShortpollCmd {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub shortpoll: ShortpollOpts,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MixedCmd {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Weights of the scenarios each new stream is drawn from (seeded), `name=weight` comma
    /// list over chat, native, watch, ws, longpoll, shortpoll.
    #[arg(
        long,
        default_value = "native=4,chat=2,ws=2,longpoll=1,shortpoll=1",
        env = "TOKENFAN_LOADGEN_MIX"
    )]
    pub mix: String,
    #[command(flatten)]
    pub watch: WatchOpts,
    #[command(flatten)]
    pub ws: WsOpts,
    #[command(flatten)]
    pub longpoll: LongpollOpts,
    #[command(flatten)]
    pub shortpoll: ShortpollOpts,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Clone, Args)]
pub struct GrpcCmd {
    #[command(flatten)]
    pub load: LoadArgs,
    /// HTTP/2 connections (tonic channels) per target; streams are spread over them.
    #[arg(long, default_value_t = 8, env = "TOKENFAN_LOADGEN_GRPC_CONNECTIONS")]
    pub connections: usize,
    /// HTTP/2 connection receive window of each connection, KiB (h2's default is 64; small
    /// windows make h2 refuse many buffered small frames).
    #[arg(long, default_value_t = 1024, env = "TOKENFAN_LOADGEN_GRPC_WINDOW_KIB")]
    pub connection_window_kib: u32,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdleKind {
    /// `GET /v1/streams/{id}/events` on a silent stream, one HTTP/1.1 connection each.
    Sse,
    /// WebSockets to /v1/ws with no subscription.
    Ws,
    /// WebSockets each subscribed to the silent stream.
    WsSubscribed,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Base URL of the server (one).
    #[arg(long, default_value = DEFAULT_HTTP_TARGET, env = "TOKENFAN_LOADGEN_TARGET")]
    pub target: String,
    /// Idle connections to open.
    #[arg(long, default_value_t = 10_000, env = "TOKENFAN_LOADGEN_CONNECTIONS")]
    pub connections: usize,
    /// What each connection is.
    #[arg(long, value_enum, env = "TOKENFAN_LOADGEN_IDLE_KIND")]
    pub kind: IdleKind,
    /// Process id of the server (its VmRSS is read from /proc).
    #[arg(long, env = "TOKENFAN_LOADGEN_SERVER_PID")]
    pub server_pid: u32,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// `timing.ttft_ms` of the silent stream: no token flows before it (tokenfan's bound:
    /// 30 000).
    #[arg(long, default_value_t = 30_000)]
    pub silent_ttft_ms: u32,
    /// Seconds to let the server settle before each memory reading.
    #[arg(long, default_value_t = 1.0)]
    pub settle_secs: f64,
    /// Longest wait for the connections to open and be counted, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub open_timeout_secs: f64,
    /// Don't wait for tokenfan's `tokenfan_edge_connections` gauge (a server without
    /// `/metrics`: the reading is taken `--settle-secs` after the last connection opened).
    #[arg(long)]
    pub no_metrics: bool,
    /// Clock ticks per second of `/proc/<pid>/stat`.
    #[arg(long, default_value_t = 100)]
    pub clk_tck: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Name of the system measured.
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ChartArgs {
    /// The SVG file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Result files written by `--json`.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Chart title.
    #[arg(long, default_value = "tokenfan-loadgen: latency distribution")]
    pub title: String,
    /// Logarithmic millisecond axis (for distributions that span decades).
    #[arg(long)]
    pub log_y: bool,
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Result files written by `--json` (by several load generators of one run, or by
    /// `merge` itself).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Write the merged result as JSON to this file (it merges and charts like any other).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Label of the merged result (default: the inputs' label when they share one).
    #[arg(long)]
    pub label: Option<String>,
    /// Largest difference between the inputs' measured windows, seconds. Runs started with the
    /// same `--start-at` differ by a few ms; runs that did not share a window make a merged
    /// tokens/s that means nothing, so they are refused unless this is raised (`inf` accepts
    /// any).
    #[arg(long, default_value_t = 1.0)]
    pub max_window_skew_secs: f64,
    /// No text report on stdout.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The streaming scenarios (what `--scenario`-like reports call them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Chat,
    Native,
    Watch,
    Ws,
    Longpoll,
    Shortpoll,
    Mixed,
    Grpc,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Chat => "chat",
            Scenario::Native => "native",
            Scenario::Watch => "watch",
            Scenario::Ws => "ws",
            Scenario::Longpoll => "longpoll",
            Scenario::Shortpoll => "shortpoll",
            Scenario::Mixed => "mixed",
            Scenario::Grpc => "grpc",
        }
    }
}

/// Everything a streaming run needs, validated.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub load: LoadArgs,
    pub report: ReportArgs,
    /// Normalised targets (no trailing `/`).
    pub targets: Vec<String>,
    pub viewers: usize,
    pub streams_per_socket: usize,
    pub poll_timeout_ms: u32,
    pub poll_interval_ms: u64,
    pub grpc_connections: usize,
    pub grpc_window_kib: u32,
    /// Weights of the mix (only `mixed`; one entry of weight 1 otherwise).
    pub mix: Vec<(Kind, u32)>,
    /// `--start-at`, Unix ns.
    pub start_at_ns: Option<i64>,
    /// Where `--metrics` reads `/metrics`: `--metrics-url`, else the targets.
    pub metrics_urls: Vec<String>,
}

impl Plan {
    /// Normalises and validates a streaming subcommand; `None` for `idle` and `chart`.
    pub fn from_command(cmd: &Command) -> anyhow::Result<Option<Plan>> {
        let (scenario, load, report) = match cmd {
            Command::Chat(c) => (Scenario::Chat, &c.load, &c.report),
            Command::Native(c) => (Scenario::Native, &c.load, &c.report),
            Command::Watch(c) => (Scenario::Watch, &c.load, &c.report),
            Command::Ws(c) => (Scenario::Ws, &c.load, &c.report),
            Command::Longpoll(c) => (Scenario::Longpoll, &c.load, &c.report),
            Command::Shortpoll(c) => (Scenario::Shortpoll, &c.load, &c.report),
            Command::Mixed(c) => (Scenario::Mixed, &c.load, &c.report),
            Command::Grpc(c) => (Scenario::Grpc, &c.load, &c.report),
            Command::Idle(_) | Command::Chart(_) | Command::Merge(_) => return Ok(None),
        };
        // Options of other scenarios keep their defaults (used by `mixed` only).
        let mut watch = WatchOpts {
            viewers: DEFAULT_VIEWERS,
        };
        let mut ws = WsOpts {
            streams_per_socket: DEFAULT_STREAMS_PER_SOCKET,
        };
        let mut lp = LongpollOpts {
            poll_timeout_ms: DEFAULT_POLL_TIMEOUT_MS,
        };
        let mut sp = ShortpollOpts {
            poll_interval_ms: DEFAULT_POLL_INTERVAL_MS,
        };
        let mut grpc = (8, 1024);
        let mut mix = None;
        match cmd {
            Command::Watch(c) => watch = c.watch.clone(),
            Command::Ws(c) => ws = c.ws.clone(),
            Command::Longpoll(c) => lp = c.longpoll.clone(),
            Command::Shortpoll(c) => sp = c.shortpoll.clone(),
            Command::Mixed(c) => {
                watch = c.watch.clone();
                ws = c.ws.clone();
                lp = c.longpoll.clone();
                sp = c.shortpoll.clone();
                mix = Some(c.mix.as_str());
            }
            Command::Grpc(c) => grpc = (c.connections, c.connection_window_kib),
            _ => {}
        }
        let default_target = if scenario == Scenario::Grpc {
            DEFAULT_GRPC_TARGET
        } else {
            DEFAULT_HTTP_TARGET
        };
        let targets = normalise_targets(&load.targets, default_target)?;
        if scenario == Scenario::Grpc && targets.iter().any(|t| t.starts_with("https://")) {
            bail!("the grpc scenario supports http:// targets only");
        }
        let start_at_ns = load.start_at.as_deref().map(parse_start_at).transpose()?;
        let metrics_urls = if report.metrics_urls.is_empty() {
            targets.clone()
        } else {
            normalise_targets(&report.metrics_urls, default_target).context("--metrics-url")?
        };
        let l = load;
        if l.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if let Some(rate) = l.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            bail!("--rate must be a positive number of streams per second, got {rate}");
        }
        if l.max_in_flight == 0 {
            bail!("--max-in-flight must be at least 1");
        }
        for (name, v) in [
            ("--duration", l.duration),
            ("--ramp", l.ramp),
            ("--warmup", l.warmup),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a number of seconds ≥ 0, got {v}");
            }
        }
        if l.duration <= 0.0 {
            bail!("--duration must be more than 0 seconds");
        }
        if l.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if let Some(t) = l.stream_timeout_secs
            && !(t.is_finite() && t > 0.0)
        {
            bail!("--stream-timeout-secs must be more than 0, got {t}");
        }
        if !(report.progress_secs.is_finite() && report.progress_secs > 0.0) {
            bail!("--progress-secs must be more than 0");
        }
        if report.clk_tck == 0 {
            bail!("--clk-tck must be at least 1");
        }
        if !report.metrics_urls.is_empty() && !report.metrics {
            bail!("--metrics-url needs --metrics");
        }
        if watch.viewers == 0 {
            bail!("--viewers must be at least 1");
        }
        if ws.streams_per_socket == 0 {
            bail!("--streams-per-socket must be at least 1");
        }
        let (grpc_connections, grpc_window_kib) = grpc;
        if grpc_connections == 0 {
            bail!("--connections must be at least 1");
        }
        let mix = match (scenario, mix) {
            (Scenario::Mixed, Some(spec)) => parse_mix(spec)?,
            _ => vec![(scenario_kind(scenario), 1)],
        };
        Ok(Some(Plan {
            scenario,
            load: load.clone(),
            report: report.clone(),
            targets,
            viewers: watch.viewers,
            streams_per_socket: ws.streams_per_socket,
            poll_timeout_ms: lp.poll_timeout_ms,
            poll_interval_ms: sp.poll_interval_ms,
            grpc_connections,
            grpc_window_kib,
            mix,
            start_at_ns,
            metrics_urls,
        }))
    }

    /// Nominal length of one stream: first token plus every later gap.
    pub fn nominal_stream(&self) -> Duration {
        let l = &self.load;
        Duration::from_millis(
            u64::from(l.ttft_ms)
                + u64::from(l.max_tokens) * u64::from(l.inter_token_ms.max(1))
                + u64::from(l.jitter_ms) * u64::from(l.max_tokens),
        )
    }

    /// How long one stream may take before it is abandoned.
    pub fn stream_timeout(&self) -> Duration {
        match self.load.stream_timeout_secs {
            Some(s) => Duration::from_secs_f64(s),
            None => self.nominal_stream() * 2 + Duration::from_secs(30),
        }
    }

    /// Whether emit times are requested and required.
    pub fn emit_times(&self) -> bool {
        !self.load.no_emit_times
    }
}

/// The single kind a non-mixed scenario runs.
fn scenario_kind(s: Scenario) -> Kind {
    match s {
        Scenario::Chat => Kind::Chat,
        Scenario::Native | Scenario::Mixed => Kind::Native,
        Scenario::Watch => Kind::Watch,
        Scenario::Ws => Kind::Ws,
        Scenario::Longpoll => Kind::Longpoll,
        Scenario::Shortpoll => Kind::Shortpoll,
        Scenario::Grpc => Kind::Grpc,
    }
}

/// `native=4,chat=2` → weights; every name must be a kind the mix can run.
pub fn parse_mix(spec: &str) -> anyhow::Result<Vec<(Kind, u32)>> {
    let mut out: Vec<(Kind, u32)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .with_context(|| format!("--mix: {part:?} is not name=weight"))?;
        let kind = Kind::from_name(name.trim())
            .filter(|k| *k != Kind::Grpc)
            .with_context(|| {
                format!(
                    "--mix: {name:?} is not one of chat, native, watch, ws, longpoll, shortpoll"
                )
            })?;
        let weight: u32 = weight
            .trim()
            .parse()
            .with_context(|| format!("--mix: weight of {name} must be an integer ≥ 0"))?;
        if out.iter().any(|(k, _)| *k == kind) {
            bail!("--mix: {name} appears twice");
        }
        if weight > 0 {
            out.push((kind, weight));
        }
    }
    if out.is_empty() {
        bail!("--mix: give at least one scenario with a weight above 0");
    }
    Ok(out)
}

/// Checks each target is an `http://` or `https://` URL and strips the trailing `/`.
pub fn normalise_targets(given: &[String], default: &str) -> anyhow::Result<Vec<String>> {
    let list: Vec<String> = given
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    let list = if list.is_empty() {
        vec![default.to_owned()]
    } else {
        list
    };
    list.into_iter()
        .map(|t| {
            let t = t.trim_end_matches('/').to_owned();
            authority(&t)?;
            Ok(t)
        })
        .collect()
}

/// `--start-at`: RFC 3339 (`2026-12-02T21:00:00Z`, `…T22:00:00.5+01:00`) or Unix seconds
/// (`1796245200`, `1796245200.25`) → Unix ns.
pub fn parse_start_at(text: &str) -> anyhow::Result<i64> {
    let t = text.trim();
    let bad = || {
        anyhow::anyhow!(
            "--start-at {text:?} is neither RFC 3339 (2026-12-02T21:00:00Z) nor Unix seconds"
        )
    };
    if let Ok(secs) = t.parse::<f64>() {
        if !(0.0..1e11).contains(&secs) {
            return Err(bad());
        }
        return Ok((secs * 1e9).round() as i64);
    }
    rfc3339_ns(t).ok_or_else(bad)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (`t` or a space also separate date and time).
fn rfc3339_ns(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ns = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = t.get(start..i)?;
        if digits.is_empty() {
            return None;
        }
        let kept: String = digits.chars().take(9).collect();
        frac_ns = kept.parse::<i64>().ok()? * 10i64.pow(9 - kept.len() as u32);
    }
    let offset_secs = match t.get(i..)? {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && matches!(zone.as_bytes()[0], b'+' | b'-') => {
            if zone.as_bytes()[3] != b':' {
                return None;
            }
            let h = num(i + 1..i + 3)?;
            let m = num(i + 4..i + 6)?;
            if h > 23 || m > 59 {
                return None;
            }
            let sign = if zone.as_bytes()[0] == b'-' { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1_000_000_000 + frac_ns)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `host:port` of an `http://` or `https://` target.
pub fn authority(target: &str) -> anyhow::Result<String> {
    let uri: http::Uri = target
        .parse()
        .with_context(|| format!("--target {target:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => bail!("--target must be an http:// or https:// URL, got {target:?}"),
    }
    if !matches!(uri.path(), "" | "/") {
        bail!("--target must be a base URL without a path, got {target:?}");
    }
    let auth = uri
        .authority()
        .with_context(|| format!("--target {target:?} has no host"))?;
    Ok(auth.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_rejects() {
        let m = parse_mix("native=4, chat=2,ws=0").expect("parses");
        assert_eq!(m, vec![(Kind::Native, 4), (Kind::Chat, 2)]);
        assert!(parse_mix("grpc=1").is_err());
        assert!(parse_mix("native").is_err());
        assert!(parse_mix("native=1,native=2").is_err());
        assert!(parse_mix("native=0").is_err());
    }

    #[test]
    fn targets_are_checked() {
        let t =
            normalise_targets(&["http://127.0.0.1:1/".into()], DEFAULT_HTTP_TARGET).expect("ok");
        assert_eq!(t, vec!["http://127.0.0.1:1".to_owned()]);
        assert!(normalise_targets(&["ftp://x".into()], DEFAULT_HTTP_TARGET).is_err());
        assert!(normalise_targets(&["https://x:8443".into()], DEFAULT_HTTP_TARGET).is_ok());
        assert!(normalise_targets(&["http://x/v1".into()], DEFAULT_HTTP_TARGET).is_err());
        assert_eq!(
            normalise_targets(&[], DEFAULT_HTTP_TARGET).expect("default"),
            vec![DEFAULT_HTTP_TARGET.to_owned()]
        );
    }

    #[test]
    fn start_at_parses_both_forms() {
        let z = parse_start_at("2026-12-02T21:00:00Z").expect("rfc 3339");
        assert_eq!(z, 1_796_245_200 * 1_000_000_000);
        assert_eq!(parse_start_at("1796245200").expect("unix"), z);
        assert_eq!(
            parse_start_at("2026-12-02T22:30:00.25+01:30").expect("offset"),
            z + 250_000_000
        );
        assert_eq!(parse_start_at("1970-01-01T00:00:00Z").expect("epoch"), 0);
        assert_eq!(
            parse_start_at("2000-03-01 00:00:00z").expect("leap year"),
            951_868_800 * 1_000_000_000
        );
        assert_eq!(parse_start_at("1.5").expect("fraction"), 1_500_000_000);
        for bad in [
            "",
            "tomorrow",
            "2026-13-01T00:00:00Z",
            "2026-12-02T21:00:00",
            "2026-12-02T21:00:00+0100",
            "-5",
            "NaN",
        ] {
            assert!(parse_start_at(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn bad_numbers_are_refused() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).expect("clap");
            Plan::from_command(&cli.command)
        };
        assert!(parse(&["x", "native", "--concurrency", "0"]).is_err());
        assert!(parse(&["x", "native", "--rate", "0"]).is_err());
        assert!(parse(&["x", "native", "--rate=-1"]).is_err());
        assert!(parse(&["x", "native", "--duration", "0"]).is_err());
        assert!(parse(&["x", "watch", "--viewers", "0"]).is_err());
        assert!(parse(&["x", "native", "--metrics-url", "http://a:1"]).is_err());
        assert!(parse(&["x", "native", "--start-at", "soon"]).is_err());
        assert!(parse(&["x", "grpc", "--target", "https://a:1"]).is_err());
        let plan = parse(&[
            "x",
            "native",
            "--streams",
            "7",
            "--target",
            "http://a:1,http://b:2",
        ])
        .expect("ok")
        .expect("plan");
        assert_eq!(plan.load.concurrency, 7);
        assert_eq!(plan.targets.len(), 2);
    }
}
