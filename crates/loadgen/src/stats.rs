//! What a run counts: per transport kind, HDR histograms (microseconds) of time to first token,
//! gap between tokens as received, added delay and stream time, plus counters; run-wide errors
//! and violations by kind, and the load generator's own lag ([`Lag`]). [`Reader`] is the
//! per-reader front: it verifies each event ([`Checker`]) and records its timing in a small
//! batch of its own, flushed to the shared histograms and counters every [`FLUSH_SAMPLES`]
//! samples or [`FLUSH_NS`] (one lock per batch instead of one per token, so threads reading
//! thousands of sockets do not queue on the histograms' lock).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::verify::{CheckOptions, Checker, Terminal, Violation};

/// The transport kinds a run measures (a scenario runs one, `mixed` several).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Chat,
    Native,
    Watch,
    Ws,
    Longpoll,
    Shortpoll,
    Grpc,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Chat,
        Kind::Native,
        Kind::Watch,
        Kind::Ws,
        Kind::Longpoll,
        Kind::Shortpoll,
        Kind::Grpc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Native => "native",
            Kind::Watch => "watch",
            Kind::Ws => "ws",
            Kind::Longpoll => "longpoll",
            Kind::Shortpoll => "shortpoll",
            Kind::Grpc => "grpc",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// What goes over the wire, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Chat => "OpenAI POST /v1/chat/completions SSE",
            Kind::Native => "POST-SSE (POST /v1/streams, Accept: text/event-stream)",
            Kind::Watch => "GET /v1/streams/{id}/events SSE viewers of 201-created streams",
            Kind::Ws => "WebSocket /v1/ws (start)",
            Kind::Longpoll => "long-poll GET /v1/streams/{id}/poll",
            Kind::Shortpoll => "short-poll GET /v1/streams/{id}",
            Kind::Grpc => "gRPC Generate (tokenfan.v1.Generator)",
        }
    }

    fn index(self) -> usize {
        Kind::ALL
            .iter()
            .position(|k| *k == self)
            .unwrap_or_default()
    }
}

/// Nanoseconds since the Unix epoch, as the wall clock says now (one clock with the server's
/// `emitted_at_unix_nanos` on the same host).
pub fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Highest value a histogram holds: one hour in microseconds.
const HIST_MAX_US: u64 = 3_600_000_000;

/// An empty histogram of microseconds, 1 µs to one hour, 3 significant digits (~0.1 %).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant bounds are valid")
}

/// Most bytes of one encoded histogram a report may carry (a full histogram of our bounds,
/// compressed, is a few KiB; this only stops a corrupt file from asking for gigabytes).
const ENCODED_MAX: usize = 4 << 20;

/// A histogram in HdrHistogram's compressed V2 format, base64 (standard alphabet): the
/// encoding of HdrHistogram's interval logs, readable by its tools in every language.
pub fn encode_hist(h: &Histogram<u64>) -> anyhow::Result<String> {
    use base64::Engine as _;
    use hdrhistogram::serialization::Serializer as _;
    let mut bytes = Vec::new();
    hdrhistogram::serialization::V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("encoding a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Reads back [`encode_hist`]; the histogram must have the bounds every run uses (1 µs to one
/// hour, 3 significant digits), so histograms of different runs add exactly.
pub fn decode_hist(text: &str) -> anyhow::Result<Histogram<u64>> {
    use base64::Engine as _;
    if text.len() > ENCODED_MAX {
        anyhow::bail!("an encoded histogram is larger than {ENCODED_MAX} bytes");
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| anyhow::anyhow!("a histogram is not base64: {e}"))?;
    let h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("a histogram is not in HdrHistogram V2 format: {e:?}"))?;
    let reference = new_hist();
    if h.low() != reference.low()
        || h.high() != reference.high()
        || h.sigfig() != reference.sigfig()
    {
        anyhow::bail!(
            "a histogram has bounds {}..{} µs at {} digits, not {}..{} at {} (not written by \
             tokenfan-loadgen?)",
            h.low(),
            h.high(),
            h.sigfig(),
            reference.low(),
            reference.high(),
            reference.sigfig()
        );
    }
    Ok(h)
}

/// The histograms of a transport as a report carries them (see [`encode_hist`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedHists {
    pub ttft: String,
    pub inter_token: String,
    pub added_delay: String,
    pub added_delay_all: String,
    /// Stream time; absent in reports of loadgens that did not measure it (read as empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_time: Option<String>,
}

/// The histograms of one kind, microseconds.
#[derive(Debug, Clone)]
pub struct Hists {
    /// First token receipt − request sent, for first tokens received in the window.
    pub ttft: Histogram<u64>,
    /// The same over the whole run (for the progress line).
    pub ttft_all: Histogram<u64>,
    /// Receipt gap between consecutive token events of a reader, in the window.
    pub itl: Histogram<u64>,
    /// Receipt − `emitted_at_unix_nanos`, token events received in the window.
    pub delay: Histogram<u64>,
    /// The same over the whole run (ramp, warm-up and drain too).
    pub delay_all: Histogram<u64>,
    /// Stream time: terminal event's receipt − request sent, for terminals received in the
    /// window (per reader: a `watch` viewer counts from the creation request).
    pub stream: Histogram<u64>,
}

impl Hists {
    pub fn new() -> Self {
        Self {
            ttft: new_hist(),
            ttft_all: new_hist(),
            itl: new_hist(),
            delay: new_hist(),
            delay_all: new_hist(),
            stream: new_hist(),
        }
    }

    /// Encodes the histograms of the report (not `ttft_all`, which only feeds the progress
    /// line).
    pub fn encode(&self) -> anyhow::Result<EncodedHists> {
        Ok(EncodedHists {
            ttft: encode_hist(&self.ttft)?,
            inter_token: encode_hist(&self.itl)?,
            added_delay: encode_hist(&self.delay)?,
            added_delay_all: encode_hist(&self.delay_all)?,
            stream_time: Some(encode_hist(&self.stream)?),
        })
    }

    /// Reads back [`Hists::encode`] (`ttft_all` stays empty).
    pub fn decode(e: &EncodedHists) -> anyhow::Result<Hists> {
        Ok(Hists {
            ttft: decode_hist(&e.ttft)?,
            ttft_all: new_hist(),
            itl: decode_hist(&e.inter_token)?,
            delay: decode_hist(&e.added_delay)?,
            delay_all: decode_hist(&e.added_delay_all)?,
            stream: match &e.stream_time {
                Some(text) => decode_hist(text)?,
                None => new_hist(),
            },
        })
    }

    pub fn add(&mut self, other: &Hists) {
        // Same bounds everywhere: adding cannot fail.
        let _ = self.ttft.add(&other.ttft);
        let _ = self.ttft_all.add(&other.ttft_all);
        let _ = self.itl.add(&other.itl);
        let _ = self.delay.add(&other.delay);
        let _ = self.delay_all.add(&other.delay_all);
        let _ = self.stream.add(&other.stream);
    }
}

impl Default for Hists {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters and histograms of one kind.
#[derive(Debug, Default)]
pub struct KindStats {
    /// Created lazily: only kinds in use cost memory.
    hists: Mutex<Option<Hists>>,
    pub streams_started: AtomicU64,
    /// Streams whose readers all got `done` with `stop` or `length`.
    pub streams_completed: AtomicU64,
    pub readers_started: AtomicU64,
    /// Readers that got a terminal event and no violation.
    pub readers_clean: AtomicU64,
    pub tokens_all: AtomicU64,
    pub tokens_window: AtomicU64,
    pub token_events_window: AtomicU64,
    /// Token and terminal events received in the window.
    pub events_window: AtomicU64,
    /// Tokens emitted before their reader subscribed (history replay): no added delay taken.
    pub replayed_tokens: AtomicU64,
    /// Receipt before emit time (clock anomalies), counted as 0.
    pub negative_delays: AtomicU64,
    pub coalesced_events: AtomicU64,
}

impl KindStats {
    fn hists(&self) -> MutexGuard<'_, Option<Hists>> {
        self.hists.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the histograms (None when nothing was recorded).
    pub fn snapshot(&self) -> Option<Hists> {
        self.hists().clone()
    }
}

/// Everything a run counts, shared by all its tasks.
#[derive(Debug)]
pub struct Stats {
    /// When the run began.
    pub t0: Instant,
    pub t0_unix: i64,
    /// The measured window, Unix ns.
    pub window: (i64, i64),
    /// No stream starts after this (the end of the window).
    pub deadline: Instant,
    pub window_start: Instant,
    kinds: [KindStats; 7],
    /// Streams in flight.
    pub in_flight: AtomicUsize,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Responses by HTTP version.
    http_versions: Mutex<BTreeMap<&'static str, u64>>,
    /// Dropped connections re-attached with `Last-Event-ID`, by what ended them.
    resumes: Mutex<BTreeMap<String, u64>>,
    violations: Mutex<BTreeMap<Violation, u64>>,
    finish_reasons: Mutex<BTreeMap<String, u64>>,
    examples: Mutex<Vec<String>>,
    /// Streams abandoned for a timeout: (kind, stream id, tokens received), for diagnostics.
    stalled: Mutex<Vec<(Kind, String, u64)>>,
    /// What the end-of-run checks on stalled streams found.
    notes: Mutex<Vec<String>>,
    /// The load generator's own lag, in the window.
    lag: Mutex<Lag>,
}

/// The load generator's own lag over the window, microseconds: what it adds to every figure
/// it measures. Both should stay far below the delays it reports, or it measures itself.
#[derive(Debug, Clone)]
pub struct Lag {
    /// How late a ticker task wakes from a timer (10 ms period, one ticker per runtime
    /// thread): how long a task that became ready waits for a worker.
    pub event_loop: Histogram<u64>,
    /// From a read returning bytes to its last event parsed, verified and recorded (SSE
    /// transports): the reader's own processing, per read.
    pub read_to_parsed: Histogram<u64>,
}

impl Default for Lag {
    fn default() -> Self {
        Self {
            event_loop: new_hist(),
            read_to_parsed: new_hist(),
        }
    }
}

/// Examples of errors and violations kept for the report.
const EXAMPLES: usize = 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stats {
    /// A run starting now whose window is `[start, start + len)` seconds from now.
    pub fn new(window_start_secs: f64, window_secs: f64) -> Self {
        Self::starting(Instant::now(), unix_nanos(), window_start_secs, window_secs)
    }

    /// A run whose clock started at `t0` (wall clock `t0_unix`, ns; with `--start-at`, `t0`
    /// may be a moment ago), its window `[start, start + len)` seconds after it.
    pub fn starting(t0: Instant, t0_unix: i64, window_start_secs: f64, window_secs: f64) -> Self {
        let ns = |s: f64| t0_unix + (s * 1e9) as i64;
        let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
        Self {
            t0,
            t0_unix,
            window: (ns(window_start_secs), ns(window_start_secs + window_secs)),
            deadline: t0 + secs(window_start_secs + window_secs),
            window_start: t0 + secs(window_start_secs),
            kinds: Default::default(),
            in_flight: AtomicUsize::new(0),
            errors: Mutex::default(),
            http_versions: Mutex::default(),
            resumes: Mutex::default(),
            violations: Mutex::default(),
            finish_reasons: Mutex::default(),
            examples: Mutex::default(),
            stalled: Mutex::default(),
            notes: Mutex::default(),
            lag: Mutex::default(),
        }
    }

    /// A ticker woke `late_us` after its deadline, at `at_ns` (kept when in the window).
    pub fn event_loop_delay(&self, at_ns: i64, late_us: u64) {
        if self.in_window(at_ns) {
            lock(&self.lag)
                .event_loop
                .saturating_record(late_us.clamp(1, HIST_MAX_US));
        }
    }

    /// Read-to-parsed times of a batch of reads, µs (only those read in the window).
    pub fn read_to_parsed(&self, us: &[u64]) {
        let mut lag = lock(&self.lag);
        for v in us {
            lag.read_to_parsed
                .saturating_record((*v).clamp(1, HIST_MAX_US));
        }
    }

    pub fn lag(&self) -> Lag {
        lock(&self.lag).clone()
    }

    pub fn kind(&self, kind: Kind) -> &KindStats {
        &self.kinds[kind.index()]
    }

    pub fn in_window(&self, t: i64) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    /// Counts an error of `kind` (a stable tag such as `http_503` or `timeout_body`).
    pub fn error(&self, kind: impl Into<String>, detail: impl FnOnce() -> String) {
        let kind = kind.into();
        let seen = {
            let mut errors = lock(&self.errors);
            let n = errors.entry(kind.clone()).or_default();
            *n += 1;
            *n
        };
        // The first two of each kind are enough to see what happened.
        if seen <= 2 {
            self.example(|| format!("error {kind}: {}", detail()));
        }
    }

    /// Counts a response by its HTTP version.
    pub fn http_version(&self, version: http::Version) {
        let name = match version {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_11 => "HTTP/1.1",
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_3 => "HTTP/3.0",
            _ => "other",
        };
        *lock(&self.http_versions).entry(name).or_default() += 1;
    }

    pub fn http_versions(&self) -> BTreeMap<String, u64> {
        lock(&self.http_versions)
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect()
    }

    /// Counts a dropped connection that was re-attached with `Last-Event-ID`; `cause` is the
    /// error kind that ended it.
    pub fn resumed(&self, cause: &str) {
        *lock(&self.resumes).entry(cause.to_owned()).or_default() += 1;
    }

    pub fn resumes(&self) -> BTreeMap<String, u64> {
        lock(&self.resumes).clone()
    }

    pub fn example(&self, text: impl FnOnce() -> String) {
        let mut ex = lock(&self.examples);
        if ex.len() < EXAMPLES {
            ex.push(text());
        }
    }

    pub fn add_violations(&self, counts: impl Iterator<Item = (Violation, u64)>) {
        let mut v = lock(&self.violations);
        for (kind, n) in counts {
            *v.entry(kind).or_default() += n;
        }
    }

    pub fn stalled(&self, kind: Kind, stream_id: String, tokens: u64) {
        lock(&self.stalled).push((kind, stream_id, tokens));
    }

    pub fn note(&self, text: String) {
        lock(&self.notes).push(text);
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        lock(&self.errors).clone()
    }

    pub fn error_total(&self) -> u64 {
        lock(&self.errors).values().sum()
    }

    pub fn violations(&self) -> BTreeMap<Violation, u64> {
        lock(&self.violations).clone()
    }

    pub fn violation_total(&self) -> u64 {
        lock(&self.violations).values().sum()
    }

    pub fn finish_reasons(&self) -> BTreeMap<String, u64> {
        lock(&self.finish_reasons).clone()
    }

    pub fn examples(&self) -> Vec<String> {
        lock(&self.examples).clone()
    }

    pub fn stalled_streams(&self) -> Vec<(Kind, String, u64)> {
        lock(&self.stalled).clone()
    }

    pub fn notes(&self) -> Vec<String> {
        lock(&self.notes).clone()
    }

    /// Kinds that started anything, in report order.
    pub fn used_kinds(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| self.kind(*k).readers_started.load(Ordering::Relaxed) > 0)
            .collect()
    }

    /// Every kind's histograms merged.
    pub fn merged(&self) -> Option<Hists> {
        let mut out: Option<Hists> = None;
        for k in Kind::ALL {
            if let Some(h) = self.kind(k).hists().as_ref() {
                match &mut out {
                    Some(o) => o.add(h),
                    None => out = Some(h.clone()),
                }
            }
        }
        out
    }

    /// A cheap sum of a counter over every kind.
    pub fn sum(&self, f: impl Fn(&KindStats) -> &AtomicU64) -> u64 {
        Kind::ALL
            .into_iter()
            .map(|k| f(self.kind(k)).load(Ordering::Relaxed))
            .sum()
    }
}

/// How one reader ended.
#[derive(Debug, Clone)]
pub struct ReaderEnd {
    /// Got `done` with `stop` or `length`.
    pub completed: bool,
    /// Got a terminal event and no violation.
    pub clean: bool,
    pub hash: u64,
    pub tokens: u64,
    pub terminal: bool,
}

/// Samples a reader holds before it flushes them (see the module docs).
pub const FLUSH_SAMPLES: usize = 64;
/// Longest a reader holds samples (so the progress line stays current).
pub const FLUSH_NS: i64 = 250_000_000;

/// Where a batched sample goes.
#[derive(Debug, Clone, Copy)]
enum Sample {
    TtftAll(u64),
    Ttft(u64),
    Itl(u64),
    DelayAll(u64),
    Delay(u64),
    Stream(u64),
}

/// What a reader recorded and has not flushed yet.
#[derive(Debug, Default)]
struct Pending {
    samples: Vec<Sample>,
    tokens_all: u64,
    tokens_window: u64,
    token_events_window: u64,
    events_window: u64,
    replayed_tokens: u64,
    negative_delays: u64,
    coalesced_events: u64,
    /// When the batch was last flushed (Unix ns; 0 = never).
    flushed_ns: i64,
}

/// One reader of one stream: verifies its events and records their timing. Samples and
/// counters are batched ([`FLUSH_SAMPLES`], [`FLUSH_NS`]) and flushed at the terminal event
/// and when the reader is dropped.
#[derive(Debug)]
pub struct Reader {
    stats: Arc<Stats>,
    kind: Kind,
    pub label: String,
    /// When the request that started the stream was sent (TTFT is measured from it).
    sent_ns: i64,
    /// When this reader's own request was sent: tokens emitted before it are replay.
    subscribed_ns: i64,
    last_recv: Option<i64>,
    check: Checker,
    pending: Pending,
}

impl Reader {
    pub fn new(
        stats: Arc<Stats>,
        kind: Kind,
        label: String,
        opts: CheckOptions,
        sent_ns: i64,
        subscribed_ns: i64,
    ) -> Self {
        stats
            .kind(kind)
            .readers_started
            .fetch_add(1, Ordering::Relaxed);
        Self {
            stats,
            kind,
            label,
            sent_ns,
            subscribed_ns,
            last_recv: None,
            check: Checker::new(opts),
            pending: Pending::default(),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn tokens(&self) -> u64 {
        self.check.tokens()
    }

    pub fn next_seq(&self) -> u64 {
        self.check.next_seq()
    }

    pub fn has_terminal(&self) -> bool {
        self.check.terminal().is_some()
    }

    pub fn violation(&mut self, v: Violation, detail: impl FnOnce() -> String) {
        self.check.violation(v, 1, detail);
    }

    /// A native event (`{"type":…,"seq":…}`) received at `recv_ns`.
    pub fn native(&mut self, ev: &crate::event::Ev<'_>, recv_ns: i64) {
        match ev.kind.as_deref() {
            Some("token") => self.token(
                ev.seq,
                ev.text.as_deref(),
                ev.emitted_at_unix_nanos,
                recv_ns,
            ),
            Some("done") => self.done(
                ev.seq,
                ev.finish_reason.as_deref().unwrap_or("?"),
                ev.usage.as_ref().map(|u| u.completion_tokens),
                recv_ns,
            ),
            Some("error") => self.error_event(
                ev.seq,
                ev.code.as_deref().unwrap_or("?"),
                ev.message.as_deref().unwrap_or(""),
                recv_ns,
            ),
            other => {
                let other = other.map(str::to_owned);
                self.check
                    .violation(Violation::UnknownEventType, 1, || format!("type {other:?}"));
            }
        }
    }

    /// A token event.
    pub fn token(
        &mut self,
        seq: Option<u64>,
        text: Option<&str>,
        emitted_at: Option<i64>,
        recv_ns: i64,
    ) {
        let first = self.check.tokens() == 0;
        let advance = self.check.token(seq, text, emitted_at);
        if advance == 0 {
            return;
        }
        let in_window = self.stats.in_window(recv_ns);
        let p = &mut self.pending;
        p.tokens_all += advance;
        if advance > 1 {
            p.coalesced_events += 1;
        }
        if in_window {
            p.tokens_window += advance;
            p.token_events_window += 1;
            p.events_window += 1;
        }
        if let Some(emitted) = emitted_at {
            if emitted < self.subscribed_ns {
                p.replayed_tokens += advance;
            } else {
                let ns = recv_ns - emitted;
                if ns < 0 {
                    p.negative_delays += 1;
                }
                p.samples.push(Sample::DelayAll(us(ns)));
                if in_window {
                    p.samples.push(Sample::Delay(us(ns)));
                }
            }
        }
        let gap = self.last_recv.map(|prev| us(recv_ns - prev));
        self.last_recv = Some(recv_ns);
        if first {
            let ttft = us(recv_ns - self.sent_ns);
            p.samples.push(Sample::TtftAll(ttft));
            if in_window {
                p.samples.push(Sample::Ttft(ttft));
            }
        } else if let Some(gap) = gap
            && in_window
        {
            p.samples.push(Sample::Itl(gap));
        }
        if p.samples.len() >= FLUSH_SAMPLES || recv_ns - p.flushed_ns >= FLUSH_NS {
            self.flush(recv_ns);
        }
    }

    /// Moves the batch into the run's histograms and counters.
    fn flush(&mut self, now_ns: i64) {
        let p = &mut self.pending;
        p.flushed_ns = now_ns;
        let ks = self.stats.kind(self.kind);
        for (counter, n) in [
            (&ks.tokens_all, &mut p.tokens_all),
            (&ks.tokens_window, &mut p.tokens_window),
            (&ks.token_events_window, &mut p.token_events_window),
            (&ks.events_window, &mut p.events_window),
            (&ks.replayed_tokens, &mut p.replayed_tokens),
            (&ks.negative_delays, &mut p.negative_delays),
            (&ks.coalesced_events, &mut p.coalesced_events),
        ] {
            if *n > 0 {
                counter.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
        if p.samples.is_empty() {
            return;
        }
        let mut guard = ks.hists();
        let h = guard.get_or_insert_with(Hists::new);
        for sample in p.samples.drain(..) {
            match sample {
                Sample::TtftAll(v) => h.ttft_all.saturating_record(v),
                Sample::Ttft(v) => h.ttft.saturating_record(v),
                Sample::Itl(v) => h.itl.saturating_record(v),
                Sample::DelayAll(v) => h.delay_all.saturating_record(v),
                Sample::Delay(v) => h.delay.saturating_record(v),
                Sample::Stream(v) => h.stream.saturating_record(v),
            }
        }
    }

    /// The `done` event.
    pub fn done(&mut self, seq: Option<u64>, reason: &str, completion: Option<u64>, recv_ns: i64) {
        let had = self.has_terminal();
        self.check.done(seq, reason, completion);
        if had {
            return;
        }
        self.terminal_event(recv_ns);
        *lock(&self.stats.finish_reasons)
            .entry(reason.to_owned())
            .or_default() += 1;
        if reason != "stop" && reason != "length" {
            let label = self.label.clone();
            self.stats.error(format!("finish_{reason}"), || label);
        }
    }

    /// The terminal `error` event.
    pub fn error_event(&mut self, seq: Option<u64>, code: &str, message: &str, recv_ns: i64) {
        let had = self.has_terminal();
        self.check.error(seq, code);
        if had {
            return;
        }
        self.terminal_event(recv_ns);
        let detail = format!("{}: {message}", self.label);
        self.stats.error(format!("stream_error_{code}"), || detail);
    }

    fn terminal_event(&mut self, recv_ns: i64) {
        if self.stats.in_window(recv_ns) {
            self.pending.events_window += 1;
            self.pending
                .samples
                .push(Sample::Stream(us(recv_ns - self.sent_ns)));
        }
        self.flush(recv_ns);
    }

    /// A reader whose stream never started (refused at once): it counts for nothing.
    pub fn discard(self) {
        self.stats
            .kind(self.kind)
            .readers_started
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// The reader's transport ended: final checks, counts flushed to the run.
    pub fn end(mut self) -> ReaderEnd {
        self.flush(unix_nanos());
        self.check.finish();
        let counts: Vec<(Violation, u64)> = self.check.counts().collect();
        if !counts.is_empty() {
            self.stats.add_violations(counts.into_iter());
            for d in self.check.details() {
                let label = &self.label;
                self.stats
                    .example(|| format!("violation in {} {label}: {d}", self.kind.name()));
            }
        }
        let terminal = self.check.terminal().cloned();
        let clean = terminal.is_some() && self.check.violations() == 0;
        if clean {
            self.stats
                .kind(self.kind)
                .readers_clean
                .fetch_add(1, Ordering::Relaxed);
        }
        ReaderEnd {
            completed: matches!(&terminal, Some(Terminal::Done(r)) if r == "stop" || r == "length"),
            clean,
            hash: self.check.hash(),
            tokens: self.check.tokens(),
            terminal: terminal.is_some(),
        }
    }
}

impl Drop for Reader {
    /// A reader dropped without [`Reader::end`] (its task was cancelled) still counts what it
    /// received.
    fn drop(&mut self) {
        self.flush(unix_nanos());
    }
}

/// Nanoseconds to whole microseconds, clamped to the histogram's range.
fn us(ns: i64) -> u64 {
    u64::try_from(ns.max(0) / 1000)
        .unwrap_or(0)
        .clamp(1, HIST_MAX_US)
}

/// Percentile summary of a histogram, milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    /// (percentile, ms) points for charts: 50 … 99.99 on a log-ish scale, then the max.
    pub quantiles: Vec<(f64, f64)>,
}

/// The percentiles of the chart series: 1 − 10^(−x) for x from 0.3 (≈ 50 %) to 4 (99.99 %).
pub fn chart_percentiles() -> Vec<f64> {
    let mut out = Vec::new();
    let mut x = std::f64::consts::LOG10_2; // p50
    while x <= 4.0 + 1e-9 {
        out.push(100.0 * (1.0 - 10f64.powf(-x)));
        x += 0.1;
    }
    out.push(99.99);
    out.dedup_by(|a, b| (*a - *b).abs() < 1e-6);
    out
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Option<Summary> {
        if h.is_empty() {
            return None;
        }
        let ms = |v: u64| v as f64 / 1000.0;
        let q = |p: f64| ms(h.value_at_quantile(p));
        let mut quantiles: Vec<(f64, f64)> = chart_percentiles()
            .into_iter()
            .map(|p| (round(p, 4), q(p / 100.0)))
            .collect();
        quantiles.push((100.0, ms(h.max())));
        Some(Summary {
            count: h.len(),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: ms(h.max()),
            mean: round(h.mean() / 1000.0, 3),
            quantiles,
        })
    }

    /// `n=… p50 … ms, …` as the text report prints it.
    pub fn line(s: Option<&Summary>) -> String {
        match s {
            None => "no samples".to_owned(),
            Some(s) => format!(
                "n={} p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, mean {:.3} ms",
                s.count, s.p50, s.p90, s.p99, s.p999, s.max, s.mean
            ),
        }
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_series() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v * 1000).expect("in range");
        }
        let s = Summary::of(&h).expect("samples");
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 500.0).abs() < 1.0, "p50 {}", s.p50);
        assert!((s.p99 - 990.0).abs() < 2.0, "p99 {}", s.p99);
        assert!((s.max - 1000.0).abs() < 1.0);
        let first = s.quantiles.first().expect("points");
        let last = s.quantiles.last().expect("points");
        assert!(
            (first.0 - 50.0).abs() < 0.01,
            "series starts at p50: {first:?}"
        );
        assert_eq!(last.0, 100.0);
        assert!(
            s.quantiles
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "increasing: {:?}",
            s.quantiles
        );
        assert!(Summary::of(&new_hist()).is_none());
    }
}
