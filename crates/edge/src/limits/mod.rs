//! Per-tenant stream limits: the options, the [`Limiter`] the handlers call, and the
//! [`Limits`] trait its counters sit behind ([`memory`] for one replica, [`redis`] shared by
//! every replica, like the history [`Store`](crate::store::Store) and the fan-out
//! [`Bus`](crate::bus::Bus); the edge picks one at start, as for those).
//!
//! - **Creations per second**: a token bucket per tenant holding up to
//!   `--tenant-streams-burst` tokens, refilled at `--tenant-streams-per-sec`; each new stream
//!   (native 201, POST-SSE, OpenAI, WebSocket `start`) takes one. Empty → 429
//!   `rate_limited`, `Retry-After` = seconds until the next token.
//! - **Concurrent streams**: at most `--tenant-max-concurrent-streams` running streams per
//!   tenant. Each counted stream is an entry with a lease ([`LEASE`], 30 s). The replica that
//!   owns the stream renews it every [`KEEP_EVERY`] (10 s) while it runs and removes it the
//!   moment the stream ends. A stream whose owner crashed is renewed by the replica that takes
//!   it over; one nobody takes over stops counting when its lease runs out, so nothing leaks.
//!   Full → 429 `concurrency_limited`, `Retry-After: 1`.
//!
//! With both flags at 0 (the default) nothing is counted and no call is made.
//!
//! The other limits against abusive clients live next to what they guard: per-address
//! connection caps with the listener ([`crate::conn_limits`]), the request body deadline in
//! its middleware ([`crate::body_deadline`]); their options are here, in [`LimitArgs`].

pub mod memory;
pub mod redis;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{error::ApiError, ids::StreamId, lifecycle::Lifecycle, stream::StreamState};

/// How long a counted stream stays counted without a renewal.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often owners renew their streams' entries.
pub(crate) const KEEP_EVERY: Duration = Duration::from_secs(10);

/// Limit options (the `limits` section of [`crate::EdgeConfig`]).
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

    /// The tenant limits these options set.
    pub fn policy(&self) -> Policy {
        Policy {
            rate: self.tenant_streams_per_sec,
            burst: self.burst(),
            max_concurrent: self.tenant_max_concurrent_streams,
            lease: LEASE,
        }
    }
}

/// The limits every tenant gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Creations per second (0: no rate limit).
    pub rate: f64,
    /// The bucket size.
    pub burst: u32,
    /// Running streams at once (0: no limit).
    pub max_concurrent: u32,
    /// How long a counted stream stays counted without a renewal.
    pub lease: Duration,
}

impl Policy {
    /// Whether anything is limited.
    pub fn enabled(&self) -> bool {
        self.rate > 0.0 || self.max_concurrent > 0
    }
}

/// What [`Limits::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted.
    Admitted,
    /// The tenant has `max_concurrent` running streams; retry after this many ms.
    TooManyRunning(u64),
    /// The tenant's bucket is empty; the next token comes in this many ms.
    TooFast(u64),
}

/// The counters could not be reached (Redis down); the message is for the log.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// Where the per-tenant counters live: the bucket of each tenant and its counted streams,
/// with their leases, under one [`Policy`]. Each call is atomic.
#[async_trait::async_trait]
pub trait Limits: Send + Sync + std::fmt::Debug {
    /// Drops lapsed entries, then counts stream `id` of `tenant` (takes a token and adds an
    /// entry with a lease) or says which limit refuses it.
    async fn admit(&self, tenant: &str, id: &StreamId) -> Result<Verdict, Unreachable>;

    /// Pushes back the lease of stream `id`, if it is still counted.
    async fn renew(&self, tenant: &str, id: &StreamId) -> Result<(), Unreachable>;

    /// Stops counting stream `id`.
    async fn release(&self, tenant: &str, id: &StreamId) -> Result<(), Unreachable>;

    /// Forgets the state of tenants with nothing counted and a full bucket (where entries do
    /// not expire by themselves).
    fn forget_idle(&self) {}
}

/// Per-tenant stream limits (see the module docs): the policy, its counters, and the streams
/// this replica releases when they end.
pub struct Limiter {
    policy: Policy,
    limits: Arc<dyn Limits>,
    /// Streams with a task that releases them when they end.
    tracked: Mutex<HashSet<StreamId>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("policy", &self.policy)
            .field("limits", &self.limits)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limiter {
    /// `policy` enforced with `limits`.
    pub fn new(policy: Policy, limits: Arc<dyn Limits>) -> Self {
        Self {
            policy,
            limits,
            tracked: Mutex::new(HashSet::new()),
        }
    }

    /// Counts a new stream `id` of `tenant`, or refuses it with 429.
    pub async fn admit(&self, tenant: &str, id: &StreamId) -> Result<(), ApiError> {
        if !self.policy.enabled() {
            return Ok(());
        }
        let verdict = self.limits.admit(tenant, id).await.map_err(|err| {
            tracing::warn!(%err, "redis: checking tenant limits failed");
            ApiError::LimitsUnavailable
        })?;
        let retry_after = |ms: u64| ms.div_ceil(1000).max(1);
        match verdict {
            Verdict::Admitted => Ok(()),
            Verdict::TooManyRunning(ms) => {
                metrics::counter!("tokenfan_edge_rate_limited_total", "limit" => "concurrent")
                    .increment(1);
                Err(ApiError::ConcurrencyLimited {
                    message: format!(
                        "this tenant already has {} running streams; stop one or wait",
                        self.policy.max_concurrent
                    ),
                    retry_after: retry_after(ms),
                })
            }
            Verdict::TooFast(ms) => {
                metrics::counter!("tokenfan_edge_rate_limited_total", "limit" => "rate")
                    .increment(1);
                Err(ApiError::RateLimited {
                    message: format!(
                        "this tenant may start {} streams per second (bursts of {}); retry later",
                        self.policy.rate, self.policy.burst
                    ),
                    retry_after: retry_after(ms),
                })
            }
        }
    }

    /// Stops counting stream `id` (it ended, or was never created).
    pub async fn release(&self, tenant: &str, id: &StreamId) {
        if self.policy.max_concurrent == 0 {
            return;
        }
        if let Err(err) = self.limits.release(tenant, id).await {
            tracing::warn!(%err, "redis: releasing a stream's limit entry failed; it lapses by itself");
        }
    }

    /// Extends the lease of a stream still counted.
    async fn renew(&self, tenant: &str, id: &StreamId) {
        if let Err(err) = self.limits.renew(tenant, id).await {
            tracing::warn!(%err, "redis: renewing a stream's limit entry failed");
        }
    }

    /// Releases `stream` as soon as it ends here. If this replica stops owning it (handed
    /// over, or taken over by another replica), the task ends and the new owner's
    /// [`Limiter::keep`] takes over. The task is on `lifecycle`'s tracker and ends at
    /// handover.
    pub fn track(self: &Arc<Self>, stream: &Arc<StreamState>, lifecycle: &Lifecycle) {
        if self.policy.max_concurrent == 0 || !lock(&self.tracked).insert(stream.id.clone()) {
            return;
        }
        let limiter = self.clone();
        let stream = stream.clone();
        let handover = lifecycle.handover.clone();
        lifecycle.spawn(async move {
            let mut check = tokio::time::interval(KEEP_EVERY);
            // Created once: a wait recreated every tick would leave a waker behind each time.
            let finished = stream.wait_finished();
            tokio::pin!(finished);
            let handing_over = handover.cancelled();
            tokio::pin!(handing_over);
            loop {
                tokio::select! {
                    () = &mut finished => {
                        limiter.release(stream.tenant(), &stream.id).await;
                        break;
                    }
                    () = &mut handing_over => break,
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

    /// Every [`KEEP_EVERY`] until `lifecycle`'s background phase: renews the entries of the
    /// running streams this replica owns (`owned`: the hub's, including ones taken over from a
    /// dead replica, which it then tracks), and forgets idle tenants' in-memory state.
    pub async fn keep(
        self: Arc<Self>,
        owned: impl Fn() -> Vec<Arc<StreamState>>,
        lifecycle: Lifecycle,
    ) {
        if !self.policy.enabled() {
            return;
        }
        let mut tick = tokio::time::interval(KEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = lifecycle.background.cancelled() => return,
            }
            if self.policy.max_concurrent > 0 {
                let owned = owned();
                for chunk in owned.chunks(256) {
                    futures::future::join_all(chunk.iter().map(|s| self.renew(s.tenant(), &s.id)))
                        .await;
                }
                for stream in &owned {
                    self.track(stream, &lifecycle);
                }
            }
            self.limits.forget_idle();
        }
    }
}
