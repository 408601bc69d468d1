//! `tokenfan-edge` configuration: every option is a flag with an environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail, ensure};

/// The edge's whole configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "tokenfan-edge",
    version,
    about = "The tokenfan edge: LLM token streams over SSE, WebSocket, long-poll and short-poll"
)]
pub struct EdgeConfig {
    /// Address the HTTP server listens on (HTTP/1.1 and HTTP/2 on one port).
    #[arg(long, env = "TOKENFAN_EDGE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Generator gRPC URLs, comma-separated (client-side round robin with failover). Absent:
    /// run the mock generator in-process (still through the gRPC client).
    #[arg(long, env = "TOKENFAN_EDGE_GENERATOR", value_delimiter = ',')]
    pub generator: Vec<String>,

    /// NATS URLs for fan-out between replicas (cluster mode, with `--redis-url`):
    /// comma-separated seed nodes of one NATS cluster (`nats://` or `tls://`); the first
    /// connect tries each. Credentials and TLS: the `--nats-*` options.
    #[arg(long, env = "TOKENFAN_EDGE_NATS_URL")]
    pub nats_url: Option<String>,

    /// Redis URL for stream history and owner leases (cluster mode, with `--nats-url`):
    /// `redis://`, `rediss://` (TLS), or a Redis Cluster's `redis+cluster://host:port,…`.
    /// Credentials, TLS files and cluster mode: the `--redis-*` options.
    #[arg(long, env = "TOKENFAN_EDGE_REDIS_URL")]
    pub redis_url: Option<String>,

    #[command(flatten)]
    pub nats: crate::bus::nats::NatsArgs,

    #[command(flatten)]
    pub redis: crate::redis_conn::RedisArgs,

    /// This replica's name in logs, metrics and leases (default: the host name, which is the
    /// pod name on Kubernetes; without one, `edge-<listen port>`).
    #[arg(long, env = "TOKENFAN_EDGE_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Address of the admin listener: `/metrics`, `/readyz` and `/healthz`, never served on the
    /// public port. Keep it private (loopback, or a pod port no Ingress routes).
    #[arg(
        long,
        env = "TOKENFAN_EDGE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub admin_listen: SocketAddr,

    /// Allowed CORS origins, comma-separated; `*` allows any. Empty: no CORS headers.
    #[arg(long, env = "TOKENFAN_EDGE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Origins allowed to open a WebSocket, comma-separated; `*` allows any. Default: the CORS
    /// origins; with neither, only same-origin pages and clients without an Origin header.
    #[arg(long, env = "TOKENFAN_EDGE_WS_ORIGINS", value_delimiter = ',')]
    pub ws_origins: Option<Vec<String>>,

    /// PEM certificate chain: serve HTTPS (ALPN h2, http/1.1) instead of plain HTTP.
    #[arg(long, env = "TOKENFAN_EDGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "TOKENFAN_EDGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    #[command(flatten)]
    pub streams: StreamLimits,

    #[command(flatten)]
    pub http: HttpLimits,

    #[command(flatten)]
    pub embedded: EmbeddedGenerator,

    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,

    #[command(flatten)]
    pub limits: crate::limits::LimitArgs,

    /// How long to let owned streams finish after SIGTERM before exiting.
    #[arg(long, env = "TOKENFAN_EDGE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    #[command(flatten)]
    pub telemetry: tokenfan_telemetry::TelemetryArgs,
}

/// What a stream request may ask for and how streams live.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamLimits {
    /// `max_tokens` when a request does not say.
    #[arg(long, env = "TOKENFAN_EDGE_DEFAULT_MAX_TOKENS", default_value_t = 256)]
    pub default_max_tokens: u32,

    /// Largest `max_tokens` a request may ask for.
    #[arg(long, env = "TOKENFAN_EDGE_MAX_TOKENS_CAP", default_value_t = 4096)]
    pub max_tokens_cap: u32,

    /// Largest `timing.ttft_ms` a request may ask for.
    #[arg(long, env = "TOKENFAN_EDGE_MAX_TTFT_MS", default_value_t = 30_000)]
    pub max_ttft_ms: u32,

    /// Largest `timing.inter_token_ms` a request may ask for.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_MAX_INTER_TOKEN_MS",
        default_value_t = 5_000
    )]
    pub max_inter_token_ms: u32,

    /// Largest `timing.jitter_ms` a request may ask for.
    #[arg(long, env = "TOKENFAN_EDGE_MAX_JITTER_MS", default_value_t = 1_000)]
    pub max_jitter_ms: u32,

    /// Seconds a stream keeps generating after its last subscriber left.
    #[arg(long, env = "TOKENFAN_EDGE_DETACH_GRACE_SECS", default_value_t = 15)]
    pub detach_grace_secs: u64,

    /// Seconds a finished stream's history stays readable.
    #[arg(long, env = "TOKENFAN_EDGE_HISTORY_TTL_SECS", default_value_t = 600)]
    pub history_ttl_secs: u64,

    /// Most streams this replica keeps (running and finished within the history TTL).
    #[arg(long, env = "TOKENFAN_EDGE_MAX_STREAMS", default_value_t = 100_000)]
    pub max_streams: usize,

    /// Events a subscriber may have queued before pending tokens are coalesced.
    #[arg(long, env = "TOKENFAN_EDGE_SUBSCRIBER_QUEUE", default_value_t = 256)]
    pub subscriber_queue: usize,

    /// Bytes a subscriber may have queued before it is closed with `slow_consumer`.
    #[arg(long, env = "TOKENFAN_EDGE_SUBSCRIBER_MAX_BYTES", default_value_t = 1 << 20)]
    pub subscriber_max_bytes: usize,

    /// Seconds without a message from the generator before the call is retried.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_GENERATOR_IDLE_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub generator_idle_timeout_secs: u64,

    /// Attempts on other generators (resuming at the next token) before a stream fails.
    #[arg(long, env = "TOKENFAN_EDGE_GENERATOR_RETRIES", default_value_t = 3)]
    pub generator_retries: u32,

    /// HTTP/2 connections to each generator (calls are spread over them).
    #[arg(long, env = "TOKENFAN_EDGE_GENERATOR_CONNECTIONS", default_value_t = 4)]
    pub generator_connections: usize,

    /// Owner lease TTL in milliseconds (cluster mode): a dead owner's streams are taken over
    /// by another replica about this long after its last renewal.
    #[arg(long, env = "TOKENFAN_EDGE_LEASE_TTL_MS", default_value_t = 3000)]
    pub lease_ttl_ms: u64,
}

/// Limits on HTTP and WebSocket traffic.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpLimits {
    /// Largest request body, in bytes (413 past it).
    #[arg(long, env = "TOKENFAN_EDGE_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Largest WebSocket message, in bytes (close 1009 past it).
    #[arg(long, env = "TOKENFAN_EDGE_WS_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub ws_max_message_bytes: usize,

    /// Streams one WebSocket may be subscribed to at once.
    #[arg(long, env = "TOKENFAN_EDGE_WS_MAX_SUBSCRIPTIONS", default_value_t = 64)]
    pub ws_max_subscriptions: usize,

    /// Seconds between server pings on a WebSocket; two unanswered pings close it.
    #[arg(long, env = "TOKENFAN_EDGE_WS_PING_SECS", default_value_t = 20)]
    pub ws_ping_secs: u64,

    /// Seconds between SSE heartbeat comments.
    #[arg(long, env = "TOKENFAN_EDGE_SSE_HEARTBEAT_SECS", default_value_t = 15)]
    pub sse_heartbeat_secs: u64,

    /// Longest long-poll wait a client may ask for, in milliseconds.
    #[arg(long, env = "TOKENFAN_EDGE_LONGPOLL_MAX_MS", default_value_t = 55_000)]
    pub longpoll_max_ms: u64,

    /// Most open connections; past it new connections are refused with 503. A WebSocket
    /// counts until it closes; an HTTP/2 connection counts once per request in flight.
    #[arg(long, env = "TOKENFAN_EDGE_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Seconds a write to a client may make no progress (the client stopped reading) before
    /// the connection is closed (WebSocket: close 1008 if it can still be written). Counted in
    /// `tokenfan_edge_write_timeouts_total`.
    #[arg(long, env = "TOKENFAN_EDGE_WRITE_TIMEOUT_SECS", default_value_t = 30)]
    pub write_timeout_secs: u64,

    /// Messages per second a WebSocket client may send, on average (bursts of twice this).
    /// Past it the message is refused with error `rate_limited`; a client still over it after
    /// `WS_STRIKES` refusals in a row is closed with 1008.
    #[arg(long, env = "TOKENFAN_EDGE_WS_MESSAGES_PER_SEC", default_value_t = 50)]
    pub ws_messages_per_sec: u32,

    /// `cancel`s one WebSocket may have in flight; past it the cancel is refused with error
    /// `too_many_cancels` (and counts as a strike, like `rate_limited`).
    #[arg(
        long,
        env = "TOKENFAN_EDGE_WS_MAX_PENDING_CANCELS",
        default_value_t = 16
    )]
    pub ws_max_pending_cancels: usize,
}

/// Settings of the in-process generator (used when `--generator` is absent).
#[derive(Debug, Clone, clap::Args)]
pub struct EmbeddedGenerator {
    /// Default time to first token of the embedded generator, in milliseconds.
    #[arg(long, env = "TOKENFAN_EDGE_EMBEDDED_TTFT_MS", default_value_t = 300)]
    pub embedded_ttft_ms: u32,

    /// Default inter-token delay of the embedded generator, in milliseconds.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_EMBEDDED_INTER_TOKEN_MS",
        default_value_t = 20
    )]
    pub embedded_inter_token_ms: u32,
}

impl EdgeConfig {
    /// Checks the configuration; a bad one exits with this message.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.telemetry.validate()?;
        self.auth.validate()?;
        self.limits.validate()?;
        self.nats.validate(self.nats_url.as_deref())?;
        self.redis.validate(self.redis_url.as_deref())?;
        if self.nats_url.is_some() != self.redis_url.is_some() {
            bail!(
                "--nats-url and --redis-url go together: cluster mode needs both \
                 (neither = one replica with in-memory fan-out and history)"
            );
        }
        for url in &self.generator {
            let uri: http::Uri = url
                .parse()
                .with_context(|| format!("--generator: {url:?} is not a URL"))?;
            ensure!(
                uri.scheme().is_some() && uri.authority().is_some(),
                "--generator: {url:?} must be an absolute http:// URL"
            );
        }
        let s = &self.streams;
        ensure!(s.max_tokens_cap >= 1, "--max-tokens-cap must be at least 1");
        ensure!(
            (1..=s.max_tokens_cap).contains(&s.default_max_tokens),
            "--default-max-tokens must be between 1 and --max-tokens-cap"
        );
        ensure!(
            s.subscriber_queue >= 2,
            "--subscriber-queue must be at least 2"
        );
        ensure!(s.max_streams >= 1, "--max-streams must be at least 1");
        ensure!(s.lease_ttl_ms >= 300, "--lease-ttl-ms must be at least 300");
        ensure!(
            (1..=64).contains(&s.generator_connections),
            "--generator-connections must be between 1 and 64"
        );
        ensure!(
            self.http.ws_ping_secs >= 1,
            "--ws-ping-secs must be at least 1"
        );
        ensure!(
            self.http.sse_heartbeat_secs >= 1,
            "--sse-heartbeat-secs must be at least 1"
        );
        ensure!(
            self.http.write_timeout_secs >= 1,
            "--write-timeout-secs must be at least 1"
        );
        ensure!(
            self.http.ws_messages_per_sec >= 1,
            "--ws-messages-per-sec must be at least 1"
        );
        ensure!(
            self.http.ws_max_pending_cancels >= 1,
            "--ws-max-pending-cancels must be at least 1"
        );
        for origin in self
            .cors_origins
            .iter()
            .chain(self.ws_origins.iter().flatten())
        {
            if origin != "*" && origin.parse::<http::HeaderValue>().is_err() {
                bail!("origin {origin:?} is not a valid header value");
            }
        }
        Ok(())
    }

    /// Seconds → durations.
    pub(crate) fn detach_grace(&self) -> Duration {
        Duration::from_secs(self.streams.detach_grace_secs)
    }

    /// How long history stays after a stream ends.
    pub fn history_ttl(&self) -> Duration {
        Duration::from_secs(self.streams.history_ttl_secs)
    }

    /// The owner lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.streams.lease_ttl_ms)
    }

    /// The SIGTERM grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The Origin allowlist for WebSocket upgrades.
    pub(crate) fn ws_origins(&self) -> &[String] {
        self.ws_origins.as_deref().unwrap_or(&self.cors_origins)
    }

    /// A configuration with every default, for tests and embedding, except that the admin
    /// listener takes a free loopback port (see [`crate::Running::admin_addr`]), so that
    /// several embedded edges can run in one process.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["tokenfan-edge", "--admin-listen", "127.0.0.1:0"])
    }
}
