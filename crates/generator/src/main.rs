//! The `tokenfan-generator` binary: configuration, telemetry, listeners, signals.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use tokenfan_generator::{GeneratorConfig, Stats, serve_grpc, serve_metrics};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = GeneratorConfig::parse();
    if let Err(err) = config.validate() {
        eprintln!("tokenfan-generator: invalid configuration: {err:#}");
        std::process::exit(2);
    }
    let telemetry = tokenfan_telemetry::init("tokenfan-generator", &config.telemetry)?;
    let metrics_handle = tokenfan_telemetry::metrics::install();
    // Register the series now so `/metrics` shows them before the first call.
    let stats = Arc::new(Stats::default());

    let grpc = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    let metrics = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", config.metrics_listen))?;
    tracing::info!(
        grpc = %grpc.local_addr()?,
        metrics = %metrics.local_addr()?,
        allow_faults = config.allow_faults,
        "tokenfan-generator listening"
    );
    drop(metrics_handle);

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokenfan_telemetry::signals::terminated().await;
            shutdown.cancel();
        }
    });
    let metrics_task = tokio::spawn(serve_metrics(metrics, shutdown.clone()));
    let result = serve_grpc(&config, grpc, stats, shutdown.clone()).await;
    shutdown.cancel();
    if let Ok(Err(err)) = metrics_task.await {
        tracing::warn!(%err, "metrics server failed");
    }
    telemetry.shutdown().await;
    result
}
