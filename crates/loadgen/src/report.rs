//! The result of a streaming run: built from [`Stats`], printed as text and written as JSON
//! (`--json`). The JSON has the configuration, the counts, percentile summaries and the
//! quantile series `chart` draws.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    cli::Plan,
    procfs::{self, CpuUse, Memory},
    stats::{EncodedHists, Hists, Kind, KindStats, Stats, Summary, unix_nanos},
    verify::Violation,
};

/// Why a transport has no added-delay figure.
const NO_EMIT_TIME_ASKED: &str = "n/a: emit times were not asked for (--no-emit-times)";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    /// The system measured (`--label`).
    pub label: Option<String>,
    pub scenario: String,
    pub config: Config,
    pub started_at_unix_ms: i64,
    /// Start of the measured window, Unix ms (with `--start-at`: that time + ramp + warm-up,
    /// the same in every process of a horizontal run).
    #[serde(default)]
    pub window_start_unix_ms: i64,
    pub run_secs: f64,
    pub window_secs: f64,
    /// Every transport together.
    pub total: TransportResult,
    /// One entry per transport kind used (one for every scenario but `mixed`).
    pub by_transport: BTreeMap<String, TransportResult>,
    /// Responses by HTTP version (`HTTP/1.1`, `HTTP/2.0`) of the HTTP scenarios.
    #[serde(default)]
    pub http_versions: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    /// Dropped connections re-attached with `Last-Event-ID` (`--resume-attempts`), by cause.
    #[serde(default)]
    pub resumes: BTreeMap<String, u64>,
    /// Every violation kind, zeros included.
    pub violations: BTreeMap<String, u64>,
    pub violation_total: u64,
    pub finish_reasons: BTreeMap<String, u64>,
    pub examples: Vec<String>,
    pub notes: Vec<String>,
    /// CPU over the measured window.
    pub cpu: Option<CpuUse>,
    /// The servers' CPU over the window (`--server-pid`, summed) per token received in it,
    /// microseconds: what one delivered token costs the system under test.
    #[serde(default)]
    pub server_cpu_us_per_token: Option<f64>,
    /// The load generator's own lag over the window (not summed by `merge`: each part has its
    /// own).
    #[serde(default)]
    pub loadgen_lag: Option<LoadgenLag>,
    /// Memory of each `--server-pid` at the end.
    pub server_memory: Vec<ServerMemory>,
    /// tokenfan `/metrics` counters over the run (`--metrics`), summed over the targets.
    pub server_counters: Option<BTreeMap<String, f64>>,
    /// Streams still in flight when the run ended (abandoned ones are counted as errors).
    pub left_in_flight: usize,
    /// No error and no violation.
    pub ok: bool,
    /// A merged report (`tokenfan-loadgen merge`): the runs it was made of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Part>,
}

/// The load generator's own lag over the window, milliseconds (see [`crate::stats::Lag`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadgenLag {
    /// How late the ticker tasks woke (10 ms period, one per runtime thread).
    pub event_loop_delay_ms: Option<Summary>,
    /// From a read returning to its last event handled (SSE transports).
    pub read_to_parsed_ms: Option<Summary>,
}

/// Event-loop delay p99 above which the report warns that the load generator measured itself.
pub const LAG_WARN_MS: f64 = 5.0;

/// One run of a merged report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Part {
    /// The file it was read from.
    pub source: String,
    pub label: Option<String>,
    pub seed: u64,
    pub started_at_unix_ms: i64,
    pub window_start_unix_ms: i64,
    pub tokens_per_sec: f64,
    pub streams_started: u64,
    pub error_total: u64,
    pub violation_total: u64,
    /// CPU of that load generator over the window, % of one core.
    pub loadgen_pct_of_core: Option<f64>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub targets: Vec<String>,
    /// `closed` or `open`.
    pub loop_kind: String,
    pub concurrency: usize,
    pub rate_per_sec: Option<f64>,
    pub max_in_flight: usize,
    pub duration_secs: f64,
    pub ramp_secs: f64,
    pub warmup_secs: f64,
    pub max_tokens: u32,
    pub ttft_ms: u32,
    pub inter_token_ms: u32,
    pub jitter_ms: u32,
    pub seed: u64,
    pub model: Option<String>,
    pub emit_times: bool,
    pub allow_coalescing: bool,
    pub stream_timeout_secs: f64,
    pub viewers: Option<usize>,
    pub streams_per_socket: Option<usize>,
    pub poll_timeout_ms: Option<u32>,
    pub poll_interval_ms: Option<u64>,
    pub grpc_connections: Option<usize>,
    pub mix: BTreeMap<String, u32>,
    pub threads: usize,
    pub server_pids: Vec<u32>,
    /// `--start-at`, Unix ms: when the run's clock (the ramp) began.
    #[serde(default)]
    pub start_at_unix_ms: Option<i64>,
    /// `--http`: `1.1`, `2` or `auto`.
    #[serde(default = "default_http")]
    pub http: String,
}

fn default_http() -> String {
    "1.1".to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransportResult {
    pub transport: String,
    pub streams_started: u64,
    pub streams_completed: u64,
    pub readers_started: u64,
    pub readers_clean: u64,
    pub tokens_total: u64,
    pub tokens_window: u64,
    pub token_events_window: u64,
    pub events_window: u64,
    pub tokens_per_sec: f64,
    pub events_per_sec: f64,
    pub coalesced_events: u64,
    pub replayed_tokens: u64,
    pub negative_delays: u64,
    pub ttft_ms: Option<Summary>,
    pub inter_token_ms: Option<Summary>,
    pub added_delay_ms: Option<Summary>,
    pub added_delay_all_ms: Option<Summary>,
    /// Stream time: a reader's terminal event received − the request that started its stream
    /// sent, for terminals received in the window. A stream of n tokens is on schedule at
    /// `ttft + (n − 1) × inter_token`.
    #[serde(default)]
    pub stream_time_ms: Option<Summary>,
    /// Why `added_delay_ms` is absent, when it is for a known reason.
    pub added_delay_note: Option<String>,
    /// The histograms the summaries come from, lossless, so reports merge exactly
    /// (`tokenfan-loadgen merge`). Absent in `total`, which is the sum of `by_transport`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histograms: Option<EncodedHists>,
}

/// The counters of a [`TransportResult`]; they add across transports and across runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub streams_started: u64,
    pub streams_completed: u64,
    pub readers_started: u64,
    pub readers_clean: u64,
    pub tokens_total: u64,
    pub tokens_window: u64,
    pub token_events_window: u64,
    pub events_window: u64,
    pub coalesced_events: u64,
    pub replayed_tokens: u64,
    pub negative_delays: u64,
}

impl Counts {
    fn of_kinds(kinds: &[&KindStats]) -> Counts {
        let sum = |f: fn(&KindStats) -> &AtomicU64| kinds.iter().map(|k| load(f(k))).sum::<u64>();
        Counts {
            streams_started: sum(|k| &k.streams_started),
            streams_completed: sum(|k| &k.streams_completed),
            readers_started: sum(|k| &k.readers_started),
            readers_clean: sum(|k| &k.readers_clean),
            tokens_total: sum(|k| &k.tokens_all),
            tokens_window: sum(|k| &k.tokens_window),
            token_events_window: sum(|k| &k.token_events_window),
            events_window: sum(|k| &k.events_window),
            coalesced_events: sum(|k| &k.coalesced_events),
            replayed_tokens: sum(|k| &k.replayed_tokens),
            negative_delays: sum(|k| &k.negative_delays),
        }
    }

    /// The counters of a result read back from JSON.
    pub fn of(t: &TransportResult) -> Counts {
        Counts {
            streams_started: t.streams_started,
            streams_completed: t.streams_completed,
            readers_started: t.readers_started,
            readers_clean: t.readers_clean,
            tokens_total: t.tokens_total,
            tokens_window: t.tokens_window,
            token_events_window: t.token_events_window,
            events_window: t.events_window,
            coalesced_events: t.coalesced_events,
            replayed_tokens: t.replayed_tokens,
            negative_delays: t.negative_delays,
        }
    }

    pub fn add(&mut self, o: &Counts) {
        self.streams_started += o.streams_started;
        self.streams_completed += o.streams_completed;
        self.readers_started += o.readers_started;
        self.readers_clean += o.readers_clean;
        self.tokens_total += o.tokens_total;
        self.tokens_window += o.tokens_window;
        self.token_events_window += o.token_events_window;
        self.events_window += o.events_window;
        self.coalesced_events += o.coalesced_events;
        self.replayed_tokens += o.replayed_tokens;
        self.negative_delays += o.negative_delays;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerMemory {
    pub pid: u32,
    pub memory: Option<Memory>,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// A transport's result from its counters and histograms; `encode` keeps the histograms in
/// it (per transport; `total` is their sum and carries none).
pub fn transport_result(
    name: String,
    c: Counts,
    hists: Option<&Hists>,
    window_secs: f64,
    note: Option<&str>,
    encode: bool,
) -> TransportResult {
    let added = hists.and_then(|h| Summary::of(&h.delay));
    TransportResult {
        transport: name,
        streams_started: c.streams_started,
        streams_completed: c.streams_completed,
        readers_started: c.readers_started,
        readers_clean: c.readers_clean,
        tokens_total: c.tokens_total,
        tokens_window: c.tokens_window,
        token_events_window: c.token_events_window,
        events_window: c.events_window,
        tokens_per_sec: c.tokens_window as f64 / window_secs.max(1e-9),
        events_per_sec: c.events_window as f64 / window_secs.max(1e-9),
        coalesced_events: c.coalesced_events,
        replayed_tokens: c.replayed_tokens,
        negative_delays: c.negative_delays,
        ttft_ms: hists.and_then(|h| Summary::of(&h.ttft)),
        inter_token_ms: hists.and_then(|h| Summary::of(&h.itl)),
        added_delay_note: if added.is_none() {
            note.map(str::to_owned)
        } else {
            None
        },
        added_delay_ms: added,
        added_delay_all_ms: hists.and_then(|h| Summary::of(&h.delay_all)),
        stream_time_ms: hists.and_then(|h| Summary::of(&h.stream)),
        histograms: if encode {
            // An empty set when nothing was recorded, so every transport of a report merges.
            hists.cloned().unwrap_or_default().encode().ok()
        } else {
            None
        },
    }
}

/// Server CPU per token over the window, µs (None without servers, readings or tokens).
pub fn cpu_us_per_token(cpu: Option<&CpuUse>, tokens_window: u64) -> Option<f64> {
    let cpu = cpu?;
    let pcts: Vec<f64> = cpu.servers.iter().filter_map(|s| s.pct_of_core).collect();
    if pcts.is_empty() || tokens_window == 0 {
        return None;
    }
    let cpu_secs = pcts.iter().sum::<f64>() / 100.0 * cpu.wall_secs;
    Some(cpu_secs * 1e6 / tokens_window as f64)
}

pub fn build(
    plan: &Plan,
    threads: usize,
    stats: &Stats,
    run_secs: f64,
    cpu: Option<CpuUse>,
    server_counters: Option<BTreeMap<String, f64>>,
) -> Report {
    let l = &plan.load;
    let note = |_: Kind| (!plan.emit_times()).then_some(NO_EMIT_TIME_ASKED);
    let mut by_transport = BTreeMap::new();
    let used = stats.used_kinds();
    for k in &used {
        let ks = stats.kind(*k);
        by_transport.insert(
            k.name().to_owned(),
            transport_result(
                k.describe().to_owned(),
                Counts::of_kinds(&[ks]),
                ks.snapshot().as_ref(),
                l.duration,
                note(*k),
                true,
            ),
        );
    }
    let all: Vec<&KindStats> = Kind::ALL.iter().map(|k| stats.kind(*k)).collect();
    let total_note = if used.iter().all(|k| note(*k).is_some()) {
        used.first().and_then(|k| note(*k))
    } else {
        None
    };
    let total = transport_result(
        "all".to_owned(),
        Counts::of_kinds(&all),
        stats.merged().as_ref(),
        l.duration,
        total_note,
        false,
    );
    let violations_got = stats.violations();
    let violations: BTreeMap<String, u64> = Violation::ALL
        .iter()
        .map(|v| {
            (
                v.tag().to_owned(),
                violations_got.get(v).copied().unwrap_or(0),
            )
        })
        .collect();
    let error_total = stats.error_total();
    let violation_total = stats.violation_total();
    let left_in_flight = stats.in_flight.load(Ordering::Relaxed);
    let server_memory = plan
        .report
        .server_pids
        .iter()
        .map(|pid| ServerMemory {
            pid: *pid,
            memory: procfs::proc_memory(&pid.to_string()).ok(),
        })
        .collect();
    let lag = stats.lag();
    let loadgen_lag = Some(LoadgenLag {
        event_loop_delay_ms: Summary::of(&lag.event_loop),
        read_to_parsed_ms: Summary::of(&lag.read_to_parsed),
    });
    let server_cpu_us_per_token = cpu_us_per_token(cpu.as_ref(), total.tokens_window);
    let scenario = plan.scenario;
    use crate::cli::Scenario as S;
    let only = |s: S| plan.scenario == s || plan.scenario == S::Mixed;
    Report {
        tool: "tokenfan-loadgen".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        label: plan.report.label.clone(),
        scenario: scenario.name().to_owned(),
        config: Config {
            targets: plan.targets.clone(),
            loop_kind: if l.rate.is_some() { "open" } else { "closed" }.to_owned(),
            concurrency: l.concurrency,
            rate_per_sec: l.rate,
            max_in_flight: l.max_in_flight,
            duration_secs: l.duration,
            ramp_secs: l.ramp,
            warmup_secs: l.warmup,
            max_tokens: l.max_tokens,
            ttft_ms: l.ttft_ms,
            inter_token_ms: l.inter_token_ms,
            jitter_ms: l.jitter_ms,
            seed: l.seed,
            model: l.model.clone(),
            emit_times: plan.emit_times(),
            allow_coalescing: l.allow_coalescing,
            stream_timeout_secs: plan.stream_timeout().as_secs_f64(),
            viewers: only(S::Watch).then_some(plan.viewers),
            streams_per_socket: only(S::Ws).then_some(plan.streams_per_socket),
            poll_timeout_ms: only(S::Longpoll).then_some(plan.poll_timeout_ms),
            poll_interval_ms: only(S::Shortpoll).then_some(plan.poll_interval_ms),
            grpc_connections: (scenario == S::Grpc).then_some(plan.grpc_connections),
            mix: plan
                .mix
                .iter()
                .map(|(k, w)| (k.name().to_owned(), *w))
                .collect(),
            threads,
            server_pids: plan.report.server_pids.clone(),
            start_at_unix_ms: plan.start_at_ns.map(|ns| ns / 1_000_000),
            http: plan.load.http.name().to_owned(),
        },
        started_at_unix_ms: stats.t0_unix / 1_000_000,
        window_start_unix_ms: stats.window.0 / 1_000_000,
        run_secs,
        window_secs: l.duration,
        total,
        by_transport,
        http_versions: stats.http_versions(),
        errors: stats.errors(),
        error_total,
        resumes: stats.resumes(),
        violations,
        violation_total,
        finish_reasons: stats.finish_reasons(),
        examples: stats.examples(),
        notes: stats.notes(),
        cpu,
        server_cpu_us_per_token,
        loadgen_lag,
        server_memory,
        server_counters,
        left_in_flight,
        ok: error_total == 0 && violation_total == 0 && left_in_flight == 0,
        parts: Vec::new(),
    }
}

fn delay_line(t: &TransportResult) -> String {
    match (&t.added_delay_ms, &t.added_delay_note) {
        (None, Some(note)) => note.clone(),
        (s, _) => Summary::line(s.as_ref()),
    }
}

fn transport_lines(out: &mut String, t: &TransportResult, c: &Config, indent: &str) {
    if !indent.is_empty() {
        let _ = writeln!(
            out,
            "{indent}streams: started {}, completed {}; readers {} (verified clean {})",
            t.streams_started, t.streams_completed, t.readers_started, t.readers_clean
        );
    }
    let _ = writeln!(
        out,
        "{indent}tokens: {} received in all; in the window {} = {:.0} tokens/s (in {} token \
         events; {} coalesced); events {} = {:.0} events/s",
        t.tokens_total,
        t.tokens_window,
        t.tokens_per_sec,
        t.token_events_window,
        t.tokens_window.saturating_sub(t.token_events_window),
        t.events_window,
        t.events_per_sec,
    );
    let _ = writeln!(
        out,
        "{indent}added delay (receipt − emitted_at), window: {}",
        delay_line(t)
    );
    if t.added_delay_ms.is_some() || t.added_delay_all_ms.is_some() {
        let _ = writeln!(
            out,
            "{indent}added delay, whole run (ramp and drain too): {}",
            Summary::line(t.added_delay_all_ms.as_ref())
        );
        let _ = writeln!(
            out,
            "{indent}negative delays (clock anomalies, counted as 0): {}; replayed tokens (emitted \
             before their reader subscribed, no delay sample): {}",
            t.negative_delays, t.replayed_tokens
        );
    }
    let _ = writeln!(
        out,
        "{indent}time to first token (receipt − request sent; requested {} ms), window: {}",
        c.ttft_ms,
        Summary::line(t.ttft_ms.as_ref())
    );
    let _ = writeln!(
        out,
        "{indent}inter-token gap as received (requested {} ms), window: {}",
        c.inter_token_ms,
        Summary::line(t.inter_token_ms.as_ref())
    );
    if t.stream_time_ms.is_some() {
        let _ = writeln!(
            out,
            "{indent}stream time (terminal received − request sent; {} ms on schedule for a \
             stream of max_tokens), window: {}",
            schedule_ms(c),
            Summary::line(t.stream_time_ms.as_ref())
        );
    }
}

/// How long a stream of `max_tokens` tokens takes on schedule: `ttft + (max_tokens − 1) ×
/// inter_token` (50 tokens × 20 ms with a 20 ms first token: 1,000 ms).
pub fn schedule_ms(c: &Config) -> u64 {
    u64::from(c.ttft_ms) + u64::from(c.max_tokens.saturating_sub(1)) * u64::from(c.inter_token_ms)
}

/// The text report (of one run, or of a merged one).
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    let c = &r.config;
    let load = match c.rate_per_sec {
        None => format!(
            "{} streams in flight (closed loop{})",
            c.concurrency,
            match (r.scenario.as_str(), c.viewers, c.streams_per_socket) {
                ("watch", Some(v), _) => format!(", {v} viewers each"),
                ("ws", _, Some(per)) => format!(
                    ", {} sockets × {per} streams",
                    c.concurrency.div_ceil(per.max(1))
                ),
                _ => String::new(),
            }
        ),
        Some(rate) => format!(
            "{rate} streams/s arriving (open loop, at most {} in flight)",
            c.max_in_flight
        ),
    };
    let over = if r.by_transport.len() == 1 {
        r.by_transport
            .values()
            .next()
            .map(|t| t.transport.clone())
            .unwrap_or_default()
    } else {
        format!("a mix ({:?})", c.mix)
    };
    let _ = writeln!(
        out,
        "== {}{}: {load} over {over}",
        r.scenario,
        r.label
            .as_deref()
            .map(|l| format!(" [{l}]"))
            .unwrap_or_default(),
    );
    if !r.parts.is_empty() {
        let _ = writeln!(
            out,
            "merged from {} runs (counters summed, percentiles from the merged histograms):",
            r.parts.len()
        );
        for p in &r.parts {
            let _ = writeln!(
                out,
                "  {} [{}] seed {:#x}: window from {} ms, {:.0} tokens/s, {} streams, {} errors, \
                 {} violations, loadgen CPU {}",
                p.source,
                p.label.as_deref().unwrap_or("-"),
                p.seed,
                p.window_start_unix_ms,
                p.tokens_per_sec,
                p.streams_started,
                p.error_total,
                p.violation_total,
                p.loadgen_pct_of_core
                    .map(|v| format!("{v:.0} % of a core"))
                    .unwrap_or_else(|| "n/a".to_owned()),
            );
        }
    }
    if !r.http_versions.is_empty() {
        let listed: Vec<String> = r
            .http_versions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(out, "responses by HTTP version: {}", listed.join(", "));
    }
    let _ = writeln!(
        out,
        "targets: {}; max_tokens {}, ttft {} ms, {} ms/token ({:.0} tokens/s per stream), jitter \
         {} ms; emit times {}",
        c.targets.join(", "),
        c.max_tokens,
        c.ttft_ms,
        c.inter_token_ms,
        1000.0 / f64::from(c.inter_token_ms.max(1)),
        c.jitter_ms,
        if c.emit_times { "asked" } else { "not asked" },
    );
    let _ = writeln!(
        out,
        "run {:.1} s: ramp {:.1} s, warm-up {:.1} s, measured window {:.1} s, then the streams in \
         flight were read to their end",
        r.run_secs, c.ramp_secs, c.warmup_secs, c.duration_secs
    );
    let _ = writeln!(
        out,
        "streams: started {}, completed {} (finish {:?}), readers {} (verified clean {}), \
         errors {}, left in flight at the end {}",
        r.total.streams_started,
        r.total.streams_completed,
        r.finish_reasons,
        r.total.readers_started,
        r.total.readers_clean,
        r.error_total,
        r.left_in_flight,
    );
    transport_lines(&mut out, &r.total, c, "");
    if r.by_transport.len() > 1 {
        for (name, t) in &r.by_transport {
            let _ = writeln!(out, "-- {name}: {}", t.transport);
            transport_lines(&mut out, t, c, "   ");
        }
    }
    let _ = writeln!(
        out,
        "errors by kind: {}",
        if r.errors.is_empty() {
            "none".to_owned()
        } else {
            format!("{:?}", r.errors)
        }
    );
    if !r.resumes.is_empty() {
        let _ = writeln!(
            out,
            "resumes (dropped connections re-attached with Last-Event-ID), by cause: {:?}",
            r.resumes
        );
    }
    let listed: Vec<String> = Violation::ALL
        .iter()
        .map(|v| {
            format!(
                "{} {}",
                v.tag(),
                r.violations.get(v.tag()).copied().unwrap_or(0)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "verification violations: {} ({})",
        r.violation_total,
        listed.join(", ")
    );
    for ex in &r.examples {
        let _ = writeln!(out, "  example: {ex}");
    }
    for note in &r.notes {
        let _ = writeln!(out, "{note}");
    }
    match &r.cpu {
        Some(cpu) => {
            let _ = writeln!(out, "{}", cpu.line("over the window"));
        }
        None => {
            let _ = writeln!(out, "CPU: not measured");
        }
    }
    if let Some(us) = r.server_cpu_us_per_token {
        let _ = writeln!(
            out,
            "server CPU per token received in the window: {us:.2} µs ({} tokens)",
            r.total.tokens_window
        );
    }
    if let Some(lag) = &r.loadgen_lag {
        let _ = writeln!(
            out,
            "loadgen lag, window: event-loop delay (10 ms tickers, {} thread(s)): {}",
            c.threads.max(1),
            Summary::line(lag.event_loop_delay_ms.as_ref())
        );
        let _ = writeln!(
            out,
            "loadgen lag, window: read to parsed (SSE, per read): {}",
            Summary::line(lag.read_to_parsed_ms.as_ref())
        );
        if let Some(p99) = lag.event_loop_delay_ms.as_ref().map(|s| s.p99)
            && p99 > LAG_WARN_MS
        {
            let _ = writeln!(
                out,
                "WARNING: the load generator's event loop ran {p99:.1} ms late at p99 (> \
                 {LAG_WARN_MS} ms): its delays include its own; use more --threads, more load \
                 generators, or less load per process"
            );
        }
    }
    for m in &r.server_memory {
        match &m.memory {
            Some(mem) => {
                let _ = writeln!(
                    out,
                    "server pid {} memory at the end: VmRSS {} KiB, VmHWM {} KiB, threads {}",
                    m.pid, mem.rss_kib, mem.hwm_kib, mem.threads
                );
            }
            None => {
                let _ = writeln!(out, "server pid {}: memory not readable", m.pid);
            }
        }
    }
    if let Some(counters) = &r.server_counters {
        let listed: Vec<String> = counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "server counters over the run (/metrics of the targets): {}",
            listed.join(", ")
        );
    }
    if r.ok {
        let _ = writeln!(out, "RESULT: ok (0 errors, 0 violations)");
    } else {
        let _ = writeln!(
            out,
            "RESULT: FAILED ({} errors, {} violations, {} left in flight)",
            r.error_total, r.violation_total, r.left_in_flight
        );
    }
    out
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Milliseconds since the epoch, for reports that have no [`Stats`].
pub fn now_unix_ms() -> i64 {
    unix_nanos() / 1_000_000
}

/// The end of a run.
#[derive(Debug)]
pub struct Outcome {
    /// No error and no violation (the binary exits 0).
    pub ok: bool,
    /// The full result of a streaming scenario.
    pub report: Option<Report>,
}
