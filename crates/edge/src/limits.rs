//! Limits against abusive or runaway clients: per-tenant stream limits, per-address
//! connection caps, and the request body deadline.
//!
//! # Per-tenant stream limits
//!
//! - **Creations per second**: a token bucket per tenant holding up to
//!   `--tenant-streams-burst` tokens, refilled at `--tenant-streams-per-sec`; each new stream
//!   (native 201, POST-SSE, OpenAI, WebSocket `start`) takes one. Empty → 429
//!   `rate_limited`, `Retry-After` = seconds until the next token.
//! - **Concurrent streams**: at most `--tenant-max-concurrent-streams` running streams per
//!   tenant. Each counted stream is an entry with a lease (`LEASE`, 30 s). The replica that
//!   owns the stream renews it every `KEEP_EVERY` (10 s) while it runs and removes it the
//!   moment the stream ends. A stream whose owner crashed is renewed by the replica that takes
//!   it over; one nobody takes over stops counting when its lease runs out, so nothing leaks.
//!   Full → 429 `concurrency_limited`, `Retry-After: 1`.
//!
//! In cluster mode both live in Redis and are checked and updated atomically by one Lua
//! script ([`LIMIT_LUA`], run with `EVALSHA`, loaded on `NOSCRIPT`) using Redis's clock, so
//! every replica enforces the same totals. Keys carry the tenant as their hash tag (one slot
//! per tenant): `tokenfan:{tenant:<base64url tenant>}:bucket` (HASH `tokens`, `at`) and
//! `tokenfan:{tenant:<base64url tenant>}:active` (ZSET stream id → lease expiry, ms), so on a
//! Redis Cluster the script runs on the one master that holds the tenant's slot. Alone, the
//! same logic runs in memory.
//!
//! With both flags at 0 (the default) nothing is counted and no call is made.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, header},
    middleware::Next,
    response::Response,
};
use redis::Script;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    app::AppState,
    auth::error_response,
    config::EdgeConfig,
    error::ApiError,
    hub::Hub,
    ids::StreamId,
    redis_conn::{RedisArgs, RedisConn},
    stream::StreamState,
};

/// How long a counted stream stays counted without a renewal.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often owners renew their streams' entries.
pub const KEEP_EVERY: Duration = Duration::from_secs(10);

/// Limit options (flattened into [`EdgeConfig`]).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Streams each tenant may start per second, on average (a token bucket refilled at this
    /// rate; cluster-wide in cluster mode). 0 = no limit. With `--auth none` every client is
    /// the same tenant, so this becomes a global limit.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_TENANT_STREAMS_PER_SEC",
        default_value_t = 0.0
    )]
    pub tenant_streams_per_sec: f64,

    /// Streams a tenant may start at once before the per-second rate applies (the bucket's
    /// size). Default: the rate, rounded up (at least 1).
    #[arg(long, env = "TOKENFAN_EDGE_TENANT_STREAMS_BURST")]
    pub tenant_streams_burst: Option<u32>,

    /// Running streams a tenant may have at once (cluster-wide in cluster mode). 0 = no limit.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_TENANT_MAX_CONCURRENT_STREAMS",
        default_value_t = 0
    )]
    pub tenant_max_concurrent_streams: u32,

    /// Open connections one client address may hold on this replica; past it the connection is
    /// answered 429 and closed. 0 = no cap. Meant for `--auth none`; behind a load balancer
    /// every connection comes from the balancer, so cap there instead.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_MAX_CONNECTIONS_PER_IP",
        default_value_t = 0
    )]
    pub max_connections_per_ip: usize,

    /// Seconds a client may take to send a whole request body (POST); past it 408.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_BODY_READ_TIMEOUT_SECS",
        default_value_t = 15
    )]
    pub body_read_timeout_secs: u64,

    /// Seconds a client may take to send a request's headers (HTTP/1.1), and the TLS
    /// handshake; past it the connection is closed.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_HEADER_READ_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub header_read_timeout_secs: u64,
}

impl LimitArgs {
    /// Checks the values.
    pub fn validate(&self) -> anyhow::Result<()> {
        let rate = self.tenant_streams_per_sec;
        anyhow::ensure!(
            rate.is_finite() && (0.0..=1_000_000.0).contains(&rate),
            "--tenant-streams-per-sec must be between 0 and 1000000"
        );
        if let Some(burst) = self.tenant_streams_burst {
            anyhow::ensure!(burst >= 1, "--tenant-streams-burst must be at least 1");
        }
        anyhow::ensure!(
            self.body_read_timeout_secs >= 1,
            "--body-read-timeout-secs must be at least 1"
        );
        anyhow::ensure!(
            self.header_read_timeout_secs >= 1,
            "--header-read-timeout-secs must be at least 1"
        );
        Ok(())
    }

    /// The bucket size.
    pub fn burst(&self) -> u32 {
        self.tenant_streams_burst
            .unwrap_or_else(|| (self.tenant_streams_per_sec.ceil() as u32).max(1))
    }
}

/// `KEYS`: the tenant's bucket, its active set. `ARGV`: op (`admit`, `renew`, `release`),
/// stream id, lease ms, rate per second, burst, max concurrent.
///
/// `admit`: drops lapsed entries; refuses `{0, retry_ms}` when the tenant has `max` running
/// streams (max > 0), `{-1, retry_ms}` when its bucket holds less than one token (rate > 0);
/// else takes a token, adds the stream with a lease, and returns `{1, 0}`. `renew` pushes the
/// lease of a stream still counted; `release` removes it. Time is Redis's (`TIME`), so
/// replicas with skewed clocks agree.
pub const LIMIT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, id, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
if op == 'release' then
  redis.call('ZREM', KEYS[2], id)
  return {1, 0}
end
if op == 'renew' then
  if redis.call('ZADD', KEYS[2], 'XX', 'CH', now + lease, id) == 1 then
    redis.call('PEXPIRE', KEYS[2], lease)
  end
  return {1, 0}
end
local rate, burst, max = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max then
    return {0, 1000}
  end
end
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  if now > at then
    tokens = math.min(burst, tokens + (now - at) * rate / 1000)
  end
  if tokens < 1 then
    return {-1, math.ceil((1 - tokens) * 1000 / rate)}
  end
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens - 1), 'at', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
end
if max > 0 then
  redis.call('ZADD', KEYS[2], string.format('%d', now + lease), id)
  redis.call('PEXPIRE', KEYS[2], lease)
end
return {1, 0}
";

static LIMIT: LazyLock<Script> = LazyLock::new(|| Script::new(LIMIT_LUA));

/// The Redis keys of a tenant's limits. The only place that knows their names.
pub mod keys {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

    fn tag(tenant: &str) -> String {
        format!("tokenfan:{{tenant:{}}}", URL_SAFE_NO_PAD.encode(tenant))
    }

    /// `tokenfan:{tenant:<b64>}:bucket`, a HASH (`tokens`, `at` in ms).
    pub fn bucket(tenant: &str) -> String {
        format!("{}:bucket", tag(tenant))
    }

    /// `tokenfan:{tenant:<b64>}:active`, a ZSET of stream ids scored by lease expiry (ms).
    pub fn active(tenant: &str) -> String {
        format!("{}:active", tag(tenant))
    }
}

struct TenantState {
    tokens: f64,
    refilled: Instant,
    /// Counted streams and their lease expiry.
    active: HashMap<StreamId, Instant>,
}

enum Backend {
    Memory(Mutex<HashMap<Arc<str>, TenantState>>),
    Redis(RedisConn),
}

/// Per-tenant stream limits (see the module docs).
pub struct Limiter {
    rate: f64,
    burst: u32,
    max_concurrent: u32,
    lease: Duration,
    backend: Backend,
    /// Streams with a task that releases them when they end.
    tracked: Mutex<HashSet<StreamId>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("max_concurrent", &self.max_concurrent)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Limiter {
    /// In memory (one replica), or in Redis in cluster mode when a limit is set.
    pub async fn from_config(config: &EdgeConfig) -> anyhow::Result<Arc<Self>> {
        let l = &config.limits;
        let (rate, burst, max) = (
            l.tenant_streams_per_sec,
            l.burst(),
            l.tenant_max_concurrent_streams,
        );
        let enabled = rate > 0.0 || max > 0;
        Ok(Arc::new(match (&config.redis_url, &config.nats_url) {
            (Some(url), Some(_)) if enabled => {
                Self::redis_with(url, &config.redis, rate, burst, max, LEASE).await?
            }
            _ => Self::memory(rate, burst, max, LEASE),
        }))
    }

    /// In-memory limits.
    pub fn memory(rate: f64, burst: u32, max_concurrent: u32, lease: Duration) -> Self {
        Self {
            rate,
            burst,
            max_concurrent,
            lease,
            backend: Backend::Memory(Mutex::new(HashMap::new())),
            tracked: Mutex::new(HashSet::new()),
        }
    }

    /// Limits shared through the Redis at `url`.
    pub async fn redis(
        url: &str,
        rate: f64,
        burst: u32,
        max_concurrent: u32,
        lease: Duration,
    ) -> anyhow::Result<Self> {
        Self::redis_with(
            url,
            &RedisArgs::default(),
            rate,
            burst,
            max_concurrent,
            lease,
        )
        .await
    }

    /// Limits shared through the Redis (one server or a cluster) at `url`, connected with
    /// the options of `args` (TLS, credentials; see [`crate::redis_conn`]).
    pub async fn redis_with(
        url: &str,
        args: &RedisArgs,
        rate: f64,
        burst: u32,
        max_concurrent: u32,
        lease: Duration,
    ) -> anyhow::Result<Self> {
        let conn = RedisConn::connect(url, args).await?;
        Ok(Self {
            rate,
            burst,
            max_concurrent,
            lease,
            backend: Backend::Redis(conn),
            tracked: Mutex::new(HashSet::new()),
        })
    }

    fn enabled(&self) -> bool {
        self.rate > 0.0 || self.max_concurrent > 0
    }

    /// Counts a new stream `id` of `tenant`, or refuses it with 429.
    pub async fn admit(&self, tenant: &str, id: &StreamId) -> Result<(), ApiError> {
        if !self.enabled() {
            return Ok(());
        }
        let (verdict, retry_ms) = match &self.backend {
            Backend::Memory(tenants) => self.admit_memory(&mut lock(tenants), tenant, id),
            Backend::Redis(conn) => {
                let result = self.script(conn, "admit", tenant, id).await;
                result.map_err(|err| {
                    tracing::warn!(%err, "redis: checking tenant limits failed");
                    ApiError::unavailable(
                        "store_unavailable",
                        "stream limits are unreachable right now; retry shortly",
                    )
                })?
            }
        };
        let retry_after = u64::try_from(retry_ms).unwrap_or(0).div_ceil(1000).max(1);
        match verdict {
            1 => Ok(()),
            0 => {
                metrics::counter!("tokenfan_edge_rate_limited_total", "limit" => "concurrent")
                    .increment(1);
                Err(ApiError::rate_limited(
                    "concurrency_limited",
                    format!(
                        "this tenant already has {} running streams; stop one or wait",
                        self.max_concurrent
                    ),
                    retry_after,
                ))
            }
            _ => {
                metrics::counter!("tokenfan_edge_rate_limited_total", "limit" => "rate")
                    .increment(1);
                Err(ApiError::rate_limited(
                    "rate_limited",
                    format!(
                        "this tenant may start {} streams per second (bursts of {}); retry later",
                        self.rate, self.burst
                    ),
                    retry_after,
                ))
            }
        }
    }

    fn admit_memory(
        &self,
        tenants: &mut HashMap<Arc<str>, TenantState>,
        tenant: &str,
        id: &StreamId,
    ) -> (i64, i64) {
        let now = Instant::now();
        let burst = f64::from(self.burst);
        let state = match tenants.get_mut(tenant) {
            Some(s) => s,
            None => tenants.entry(Arc::from(tenant)).or_insert(TenantState {
                tokens: burst,
                refilled: now,
                active: HashMap::new(),
            }),
        };
        if self.max_concurrent > 0 {
            state.active.retain(|_, until| *until > now);
            if state.active.len() >= self.max_concurrent as usize {
                return (0, 1000);
            }
        }
        if self.rate > 0.0 {
            let elapsed = now.duration_since(state.refilled).as_secs_f64();
            state.tokens = (state.tokens + elapsed * self.rate).min(burst);
            state.refilled = now;
            if state.tokens < 1.0 {
                return (
                    -1,
                    ((1.0 - state.tokens) * 1000.0 / self.rate).ceil() as i64,
                );
            }
            state.tokens -= 1.0;
        }
        if self.max_concurrent > 0 {
            state.active.insert(id.clone(), now + self.lease);
        }
        (1, 0)
    }

    async fn script(
        &self,
        conn: &RedisConn,
        op: &str,
        tenant: &str,
        id: &StreamId,
    ) -> Result<(i64, i64), redis::RedisError> {
        let mut invocation = LIMIT.prepare_invoke();
        invocation
            .key(keys::bucket(tenant))
            .key(keys::active(tenant))
            .arg(op)
            .arg(id.as_str())
            .arg(millis(self.lease))
            .arg(self.rate.to_string())
            .arg(self.burst)
            .arg(self.max_concurrent);
        let mut conn = conn.clone();
        let result = invocation.invoke_async(&mut conn).await;
        if result.is_err() {
            // Counted once, here, like the store's own Redis calls.
            metrics::counter!("tokenfan_edge_backend_errors_total", "backend" => "redis")
                .increment(1);
        }
        result
    }

    /// Stops counting stream `id` (it ended, or was never created).
    pub async fn release(&self, tenant: &str, id: &StreamId) {
        if self.max_concurrent == 0 {
            return;
        }
        match &self.backend {
            Backend::Memory(tenants) => {
                if let Some(state) = lock(tenants).get_mut(tenant) {
                    state.active.remove(id);
                }
            }
            Backend::Redis(conn) => {
                if let Err(err) = self.script(conn, "release", tenant, id).await {
                    tracing::warn!(%err, "redis: releasing a stream's limit entry failed; it lapses by itself");
                }
            }
        }
    }

    /// Extends the lease of a stream still counted.
    async fn renew(&self, tenant: &str, id: &StreamId) {
        match &self.backend {
            Backend::Memory(tenants) => {
                if let Some(until) = lock(tenants)
                    .get_mut(tenant)
                    .and_then(|s| s.active.get_mut(id))
                {
                    *until = Instant::now() + self.lease;
                }
            }
            Backend::Redis(conn) => {
                if let Err(err) = self.script(conn, "renew", tenant, id).await {
                    tracing::warn!(%err, "redis: renewing a stream's limit entry failed");
                }
            }
        }
    }

    /// How many streams of `tenant` are counted now (memory backend; tests).
    pub fn counted(&self, tenant: &str) -> usize {
        match &self.backend {
            Backend::Memory(tenants) => {
                let now = Instant::now();
                lock(tenants)
                    .get(tenant)
                    .map_or(0, |s| s.active.values().filter(|t| **t > now).count())
            }
            Backend::Redis(_) => 0,
        }
    }

    /// Releases `stream` as soon as it ends here. If this replica stops owning it (handed
    /// over, or taken over by another replica), the task ends and the new owner's
    /// [`Limiter::keep`] takes over.
    pub fn track(self: &Arc<Self>, stream: &Arc<StreamState>) {
        if self.max_concurrent == 0 || !lock(&self.tracked).insert(stream.id.clone()) {
            return;
        }
        let limiter = self.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            let mut check = tokio::time::interval(KEEP_EVERY);
            loop {
                tokio::select! {
                    () = stream.wait_finished() => {
                        limiter.release(stream.tenant(), &stream.id).await;
                        break;
                    }
                    _ = check.tick() => {
                        if !stream.is_owned() {
                            break;
                        }
                    }
                }
            }
            lock(&limiter.tracked).remove(&stream.id);
        });
    }

    /// Every [`KEEP_EVERY`] until `shutdown`: renews the entries of the running streams this
    /// replica owns (including ones taken over from a dead replica, which it then tracks), and
    /// forgets idle tenants' in-memory state.
    pub async fn keep(self: Arc<Self>, hub: Arc<Hub>, shutdown: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let mut tick = tokio::time::interval(KEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if self.max_concurrent > 0 {
                let owned = hub.owned_running();
                for chunk in owned.chunks(256) {
                    futures::future::join_all(chunk.iter().map(|s| self.renew(s.tenant(), &s.id)))
                        .await;
                }
                for stream in &owned {
                    self.track(stream);
                }
            }
            if let Backend::Memory(tenants) = &self.backend {
                let now = Instant::now();
                let full = f64::from(self.burst);
                let rate = self.rate;
                lock(tenants).retain(|_, s| {
                    s.active.retain(|_, until| *until > now);
                    let tokens = s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate;
                    !s.active.is_empty() || (rate > 0.0 && tokens < full)
                });
            }
        }
    }
}

/// Open connections per client address (see `--max-connections-per-ip`).
#[derive(Clone, Debug, Default)]
pub struct PerIp {
    max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection counted against its address; uncounted on drop.
#[derive(Debug)]
pub struct IpPermit {
    ip: IpAddr,
    counts: Option<Arc<Mutex<HashMap<IpAddr, usize>>>>,
}

impl PerIp {
    /// A cap of `max` connections per address (0 = none).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: Arc::default(),
        }
    }

    /// Counts a connection from `ip`; `None` when the address is at its cap.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<IpPermit> {
        if self.max == 0 {
            return Some(IpPermit { ip, counts: None });
        }
        let mut counts = lock(&self.counts);
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpPermit {
            ip,
            counts: Some(self.counts.clone()),
        })
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        if let Some(counts) = &self.counts {
            let mut counts = lock(counts);
            if let Some(n) = counts.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.ip);
                }
            }
        }
    }
}

/// Middleware: reads a POST/PUT/PATCH body whole within `--body-read-timeout-secs` and
/// `--max-body-bytes` before the handler runs (408 / 413 otherwise, and the connection is
/// closed), so a client trickling a body cannot hold a handler.
pub async fn body_deadline(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if !matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    ) {
        return next.run(request).await;
    }
    let limit = app.config.http.max_body_bytes;
    let secs = app.config.limits.body_read_timeout_secs;
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, limit);
    let error = match tokio::time::timeout(Duration::from_secs(secs), read).await {
        Ok(Ok(bytes)) => {
            return next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
        }
        Ok(Err(err)) if too_large(&err) => ApiError::body_too_large(limit),
        Ok(Err(_)) => ApiError::bad_request("invalid_body", "the request body could not be read"),
        Err(_) => {
            metrics::counter!("tokenfan_edge_body_timeouts_total").increment(1);
            ApiError::body_timeout(secs)
        }
    };
    let mut response = error_response(parts.uri.path(), error);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn too_large(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn memory_bucket_refills_at_the_rate_and_concurrency_lapses() {
        let limiter = Limiter::memory(2.0, 3, 0, LEASE);
        for _ in 0..3 {
            limiter
                .admit("a", &StreamId::random())
                .await
                .expect("burst");
        }
        let refused = limiter
            .admit("a", &StreamId::random())
            .await
            .expect_err("empty");
        assert_eq!(
            (refused.status.as_u16(), refused.code),
            (429, "rate_limited")
        );
        assert_eq!(refused.retry_after, Some(1));
        limiter
            .admit("b", &StreamId::random())
            .await
            .expect("other tenant");
        tokio::time::advance(Duration::from_millis(500)).await;
        limiter
            .admit("a", &StreamId::random())
            .await
            .expect("one token back");
        assert!(limiter.admit("a", &StreamId::random()).await.is_err());

        let limiter = Arc::new(Limiter::memory(0.0, 1, 2, Duration::from_secs(5)));
        let (one, two) = (StreamId::random(), StreamId::random());
        limiter.admit("a", &one).await.expect("1");
        limiter.admit("a", &two).await.expect("2");
        let refused = limiter
            .admit("a", &StreamId::random())
            .await
            .expect_err("full");
        assert_eq!(refused.code, "concurrency_limited");
        limiter.release("a", &one).await;
        assert_eq!(limiter.counted("a"), 1);
        limiter
            .admit("a", &StreamId::random())
            .await
            .expect("released");
        // Entries nobody renews lapse.
        tokio::time::advance(Duration::from_secs(4)).await;
        limiter.renew("a", &two).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(limiter.counted("a"), 1, "only the renewed one is left");
    }
}
