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

pub mod admin;
pub mod app;
pub mod auth;
pub mod bus;
pub mod config;
pub mod error;
pub mod event;
pub mod hub;
pub mod ids;
pub mod limits;
mod mirror;
pub mod observability;
mod owner;
pub mod redis_conn;
pub mod request;
pub mod secret;
pub mod server;
pub mod store;
pub mod stream;
pub mod transports;
pub mod upstream;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use config::EdgeConfig;

use crate::{
    app::AppState,
    bus::{Bus, memory::MemoryBus, nats::NatsBus},
    hub::Hub,
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
    /// Resolves when the edge stopped (after `shutdown` and the drain).
    pub task: JoinHandle<()>,
}

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

    let (generators, embedded_generator): (Arc<dyn Generators>, _) = if config.generator.is_empty()
    {
        let (generator, stats) = embedded_generator(&config).await?;
        (Arc::new(generator), Some(stats))
    } else {
        let pool = GeneratorPool::new(&config.generator, config.streams.generator_connections)?;
        (Arc::new(pool), None)
    };
    let replica = replica_id(&config, addr);
    let (store, bus, cluster): (Arc<dyn Store>, Arc<dyn Bus>, bool) =
        match (&config.nats_url, &config.redis_url) {
            (Some(nats), Some(redis)) => (
                Arc::new(RedisStore::connect_with(redis, &config.redis).await?),
                Arc::new(NatsBus::connect_with(nats, &config.nats, &replica).await?),
                true,
            ),
            _ => (
                Arc::new(MemoryStore::default()),
                Arc::new(MemoryBus::default()),
                false,
            ),
        };
    let hub = Hub::new(config.clone(), replica, generators, store, bus, cluster);
    let security = Arc::new(auth::Security::from_config(&config).await?);
    let state = AppState {
        hub: hub.clone(),
        config: config.clone(),
        shutdown: shutdown.clone(),
        security: security.clone(),
    };
    let router = app::router(state);

    let background = CancellationToken::new();
    let readiness = admin::Readiness::default();
    tokio::spawn(
        readiness
            .clone()
            .keep_checking(hub.clone(), background.clone()),
    );
    let admin_router = admin::router(admin::AdminState {
        metrics,
        readiness,
        shutdown: shutdown.clone(),
    });
    let admin_stop = background.clone();
    tokio::spawn(async move {
        let serve = axum::serve(admin_listener, admin_router)
            .with_graceful_shutdown(async move { admin_stop.cancelled().await });
        if let Err(err) = serve.await {
            tracing::error!(%err, "the admin listener failed");
        }
    });
    tokio::spawn(hub.clone().sweep(background.clone()));
    tokio::spawn(hub.clone().serve_control(background.clone()));
    tokio::spawn(hub.clone().watch_store(background.clone()));
    tokio::spawn(
        security
            .limits
            .clone()
            .keep(hub.clone(), background.clone()),
    );

    let task = {
        let hub = hub.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let limits = server::ConnectionLimits::from_config(&config);
            server::serve(listener, router, tls, limits, shutdown).await;
            hub.drain(config.shutdown_grace()).await;
            background.cancel();
        })
    };
    Ok(Running {
        addr,
        admin_addr,
        hub,
        embedded_generator,
        task,
    })
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
