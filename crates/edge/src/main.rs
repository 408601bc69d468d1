//! The `tokenfan-edge` binary: configuration, telemetry, listener, signals.

use anyhow::Context as _;
use clap::Parser as _;
use tokenfan_edge::EdgeConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = EdgeConfig::parse();
    if let Err(err) = config.validate() {
        eprintln!("tokenfan-edge: invalid configuration: {err:#}");
        std::process::exit(2);
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    let replica = tokenfan_edge::replica_id(&config, listener.local_addr()?);
    let telemetry =
        tokenfan_telemetry::init_instance("tokenfan-edge", Some(&replica), &config.telemetry)?;
    tokenfan_telemetry::metrics::install();
    let shutdown = CancellationToken::new();
    let tls = config.tls_cert.is_some();
    let embedded = config.generator.is_empty();
    let running = tokenfan_edge::start(config, listener, shutdown.clone()).await?;
    let scheme = if tls { "https" } else { "http" };
    tracing::info!(
        addr = %running.addr,
        admin_addr = %running.admin_addr,
        url = %format!("{scheme}://{}/", running.addr),
        embedded_generator = embedded,
        "tokenfan-edge listening"
    );
    let mut stopped = running.task;
    tokio::select! {
        result = &mut stopped => result?,
        () = tokenfan_telemetry::signals::terminated() => {
            shutdown.cancel();
            stopped.await?;
        }
    }
    telemetry.shutdown().await;
    Ok(())
}
