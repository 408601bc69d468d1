//! `tokenfan-edge`: re-exposes generator token streams over every web transport.
//!
//! - [`hub`] owns streams and their generator calls; [`stream`] is one stream's shared state
//!   and the subscriptions to it; [`event`] the events and their wire forms.
//! - [`transports`] adapt subscriptions to SSE, the OpenAI format, long-poll, short-poll and
//!   WebSocket; [`app`] is the router; [`server`] the listener (HTTP/1.1, h2c, TLS);
//!   [`admin`] the private listener for `/metrics` and `/readyz`.
//! - [`store`] and [`bus`] are the history and fan-out backends behind small traits.
//! - [`upstream`] is where token streams come from: gRPC generators, or with no
//!   `--generator` the mock generator called in this process.

#![warn(unreachable_pub)]

mod admin;
pub mod app;
pub mod auth;
mod body_deadline;
pub mod bus;
pub mod config;
mod conn_limits;
mod context;
pub mod error;
pub mod event;
pub mod hub;
pub mod ids;
mod lifecycle;
pub mod limits;
mod mirror;
mod observability;
mod owner;
pub mod redis_conn;
pub mod redis_keys;
pub mod request;
mod routes;
pub mod secret;
mod server;
pub mod state;
pub mod store;
pub mod stream;
pub mod tenant;
pub mod transports;
pub mod upstream;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use config::EdgeConfig;
pub use lifecycle::Lifecycle;

use crate::{
    auth::Security,
    bus::{Bus, memory::MemoryBus, nats::NatsBus},
    hub::Hub,
    limits::{Limiter, Limits, memory::MemoryLimits, redis::RedisLimits},
    redis_conn::RedisConn,
    state::AppState,
    store::{Store, memory::MemoryStore, redis::RedisStore},
    upstream::{GeneratorPool, Generators, InProcess},
};

/// A started edge.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where the admin listener (`/metrics`, `/readyz`, `/healthz`) listens.
    pub admin_addr: SocketAddr,
    /// The hub (for tests and embedding).
    pub hub: Arc<Hub>,
    /// Counters of the embedded generator, when there is one.
    pub embedded_generator: Option<Arc<tokenfan_generator::Stats>>,
    /// Resolves when the edge stopped (after `shutdown`, the drain and every task).
    pub task: JoinHandle<()>,
}

/// How long the tasks still running after the drain get to finish.
const TASKS_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the edge on `listener` and returns once it accepts connections; cancel `shutdown`
/// to stop it (then await [`Running::task`]).
pub async fn start(
    config: EdgeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    config.validate()?;
    let config = Arc::new(config);
    let addr = listener.local_addr()?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding --admin-listen {}", config.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;
    // Before anything counts (the embedded generator's series too).
    let metrics = tokenfan_telemetry::metrics::install();
    observability::register_metrics();
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(server::tls_acceptor(cert, key)?),
        _ => None,
    };
    let (generators, embedded_generator) = generators(&config).await?;
    let replica = replica_id(&config, addr);
    let (store, bus, redis) = backends(&config, &replica).await?;
    let lifecycle = Lifecycle::default();
    let hub = Hub::new(
        config.clone(),
        replica,
        generators,
        store,
        bus,
        redis.is_some(),
        &lifecycle,
    );
    let limiter = limiter(&config, redis);
    let router = app::router(AppState {
        hub: hub.clone(),
        config: config.clone(),
        security: Arc::new(Security::from_args(
            &config.auth,
            config.tls_cert.is_some(),
        )?),
        limiter: limiter.clone(),
    });
    let readiness = admin::Readiness::default();
    let admin_router = admin::router(admin::AdminState {
        metrics,
        readiness: readiness.clone(),
        shutdown: lifecycle.accepting.clone(),
    });
    let admin = (admin_listener, admin_router, readiness);
    spawn_background(&lifecycle, &hub, &limiter, admin);
    let serving = lifecycle.tasks.spawn(server::serve(
        listener,
        router,
        tls,
        server::ConnectionLimits::from_config(&config),
        lifecycle.clone(),
    ));
    let task = tokio::spawn(stop(lifecycle, shutdown, serving, hub.clone(), config));
    Ok(Running {
        addr,
        admin_addr,
        hub,
        embedded_generator,
        task,
    })
}

/// Waits for `shutdown`, then stops the edge in order: stop accepting (and let open
/// connections finish, bounded), drain or hand over the streams, stop the background loops,
/// wait (bounded) for every task left. The embedded generator has nothing of its own to
/// stop: its generations run inside the owners' tasks.
async fn stop(
    lifecycle: Lifecycle,
    shutdown: CancellationToken,
    serving: JoinHandle<()>,
    hub: Arc<Hub>,
    config: Arc<EdgeConfig>,
) {
    shutdown.cancelled().await;
    lifecycle.accepting.cancel();
    let _ = serving.await;
    hub.drain(config.shutdown_grace()).await;
    lifecycle.background.cancel();
    lifecycle.tasks.close();
    if tokio::time::timeout(TASKS_GRACE, lifecycle.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks still running after the shutdown; leaving them");
    }
    lifecycle.root.cancel();
}

/// The background loops, on the lifecycle's tracker until its `background` phase.
fn spawn_background(
    lifecycle: &Lifecycle,
    hub: &Arc<Hub>,
    limiter: &Arc<Limiter>,
    (admin_listener, admin_router, readiness): (TcpListener, axum::Router, admin::Readiness),
) {
    let (tasks, stop) = (&lifecycle.tasks, &lifecycle.background);
    tasks.spawn(readiness.keep_checking(hub.clone(), stop.clone()));
    let admin_stop = stop.clone();
    tasks.spawn(async move {
        let serve = axum::serve(admin_listener, admin_router)
            .with_graceful_shutdown(async move { admin_stop.cancelled().await });
        if let Err(err) = serve.await {
            tracing::error!(%err, "the admin listener failed");
        }
    });
    tasks.spawn(hub.clone().sweep(stop.clone()));
    tasks.spawn(hub.clone().serve_control(stop.clone()));
    tasks.spawn(hub.clone().watch_store(stop.clone()));
    let owner = hub.clone();
    tasks.spawn(
        limiter
            .clone()
            .keep(move || owner.owned_running(), lifecycle.clone()),
    );
}

/// The generators: the configured ones, else the embedded mock generator (and its counters).
async fn generators(
    config: &EdgeConfig,
) -> anyhow::Result<(Arc<dyn Generators>, Option<Arc<tokenfan_generator::Stats>>)> {
    if config.generator.is_empty() {
        let (generator, stats) = embedded_generator(config).await?;
        return Ok((Arc::new(generator), Some(stats)));
    }
    let pool = GeneratorPool::new(&config.generator, config.streams.generator_connections)?;
    Ok((Arc::new(pool), None))
}

/// The history store and the bus: Redis and NATS when both are configured (a cluster; then
/// also the store's Redis connection, which the tenant limiter shares), else in memory.
async fn backends(
    config: &EdgeConfig,
    replica: &str,
) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn Bus>, Option<RedisConn>)> {
    Ok(match (&config.nats_url, &config.redis_url) {
        (Some(nats), Some(redis)) => {
            let store = RedisStore::connect_with(redis, &config.redis).await?;
            let conn = store.connection();
            (
                Arc::new(store),
                Arc::new(NatsBus::connect_with(nats, &config.nats, replica).await?),
                Some(conn),
            )
        }
        _ => (
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryBus::default()),
            None,
        ),
    })
}

/// The tenant limiter: in Redis (shared by every replica) in a cluster, else in memory.
fn limiter(config: &EdgeConfig, redis: Option<RedisConn>) -> Arc<Limiter> {
    let policy = config.limits.policy();
    let limits: Arc<dyn Limits> = match redis {
        Some(conn) if policy.enabled() => Arc::new(RedisLimits::new(conn, policy)),
        _ => Arc::new(MemoryLimits::new(policy)),
    };
    Arc::new(Limiter::new(policy, limits))
}

/// This replica's id (in leases, logs and traces): `--replica-id`, else the host name (the pod
/// name on Kubernetes, the container id under compose: unique per replica even when every
/// replica listens on the same port), else `edge-<port>`.
pub fn replica_id(config: &EdgeConfig, addr: SocketAddr) -> String {
    config
        .replica_id
        .clone()
        .or_else(hostname)
        .unwrap_or_else(|| format!("edge-{}", addr.port()))
}

/// `$HOSTNAME`, else the kernel's host name.
fn hostname() -> Option<String> {
    let valid = |name: String| {
        let name = name.trim().to_owned();
        (!name.is_empty() && name.len() <= 253 && !name.chars().any(char::is_control))
            .then_some(name)
    };
    std::env::var("HOSTNAME").ok().and_then(valid).or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .and_then(valid)
    })
}

/// The mock generator in this process, called directly (no socket, no HTTP/2), within the
/// edge's bounds; and its counters.
async fn embedded_generator(
    config: &EdgeConfig,
) -> anyhow::Result<(InProcess, Arc<tokenfan_generator::Stats>)> {
    let mut gen_config =
        <tokenfan_generator::GeneratorConfig as clap::Parser>::parse_from(["tokenfan-generator"]);
    let s = &config.streams;
    gen_config.limits.ttft_ms = config.embedded.embedded_ttft_ms.min(s.max_ttft_ms);
    gen_config.limits.inter_token_ms = config
        .embedded
        .embedded_inter_token_ms
        .min(s.max_inter_token_ms);
    gen_config.limits.jitter_ms = gen_config.limits.jitter_ms.min(s.max_jitter_ms);
    gen_config.limits.max_ttft_ms = s.max_ttft_ms;
    gen_config.limits.max_inter_token_ms = s.max_inter_token_ms;
    gen_config.limits.max_jitter_ms = s.max_jitter_ms;
    gen_config.limits.max_tokens_cap = s.max_tokens_cap;
    gen_config.limits.default_max_tokens = s.default_max_tokens;
    gen_config.limits.max_generations = s.max_streams;
    gen_config.validate()?;
    // Load the tokenizer and corpus now, so the first stream does not wait for them.
    tokio::task::spawn_blocking(|| tokenfan_generator::corpus::Corpus::get().passages()).await?;
    let stats = Arc::new(tokenfan_generator::Stats::default());
    let service = tokenfan_generator::GeneratorService::new(
        gen_config.limits,
        gen_config.allow_faults,
        stats.clone(),
    );
    Ok((InProcess::new(service), stats))
}
