//! Serving: the generator service with gRPC health and reflection on one listener, the
//! Prometheus endpoint on another, and a graceful stop.

use std::{sync::Arc, time::Duration};

use tokenfan_proto::v1::generator_server::GeneratorServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{GeneratorConfig, corpus::Corpus, service::GeneratorService, stats::Stats};

/// Serves gRPC on `listener` until `shutdown` is cancelled, then stops accepting, marks health
/// NOT_SERVING, lets running generations finish for up to `grace`, and returns.
///
/// `stats` receives this server's counters (pass a fresh `Arc` per server).
pub async fn serve_grpc(
    config: &GeneratorConfig,
    listener: TcpListener,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Tokenize the corpus before the first request, not inside it.
    let passages = tokio::task::spawn_blocking(|| Corpus::get().passages()).await?;
    tracing::debug!(passages, "corpus ready");

    let service = GeneratorService::new(config.limits.clone(), config.allow_faults, stats.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GeneratorServer<GeneratorService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tokenfan_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tokenfan_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Token frames are small: without TCP_NODELAY, Nagle holds them back by tens of ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let stop_accepting = shutdown.clone();
    let reporter = health_reporter.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(GeneratorServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            stop_accepting.cancelled().await;
            reporter
                .set_not_serving::<GeneratorServer<GeneratorService>>()
                .await;
            tracing::info!("shutting down: no new calls, draining running generations");
        });

    let grace = config.shutdown_grace();
    tokio::select! {
        result = server => result?,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(
                active = stats.active(),
                "shutdown grace elapsed: cutting the remaining generations"
            );
        }
    }
    Ok(())
}

/// Serves `/metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve_metrics(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let handle = tokenfan_telemetry::metrics::install();
    tokenfan_telemetry::metrics::serve(listener, handle, shutdown.cancelled_owned()).await?;
    Ok(())
}
