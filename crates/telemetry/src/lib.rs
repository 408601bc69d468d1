//! Telemetry shared by every tokenfan binary: the tracing subscriber (text or JSON, `EnvFilter`),
//! optional OTLP trace export (gRPC or HTTP), the Prometheus recorder and its `/metrics` server,
//! and W3C trace-context propagation over HTTP headers and gRPC metadata.
//!
//! A binary calls [`init`] once at start-up and [`Telemetry::shutdown`] last, after its servers
//! stopped, so that buffered spans are flushed.

pub mod metrics;
pub mod propagation;
pub mod signals;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Wire protocol of the OTLP trace exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (usually port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (usually port 4318, path `/v1/traces`).
    #[value(alias = "http/protobuf")]
    Http,
}

/// Telemetry options, flattened into each binary's configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Log line format.
    #[arg(long, env = "TOKENFAN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter in `EnvFilter` syntax, e.g. `info,tokenfan_edge=debug`.
    #[arg(long, env = "TOKENFAN_LOG", default_value = "info")]
    pub log_filter: String,

    /// OTLP endpoint for traces, e.g. `http://127.0.0.1:4317` (gRPC) or
    /// `http://127.0.0.1:4318/v1/traces` (HTTP). Absent: no traces are exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// OTLP protocol used with `--otlp-endpoint`.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        value_enum,
        default_value = "grpc"
    )]
    pub otlp_protocol: OtlpProtocol,
}

impl TelemetryArgs {
    /// Checks the options without side effects.
    pub fn validate(&self) -> anyhow::Result<()> {
        EnvFilter::try_new(&self.log_filter)
            .with_context(|| format!("--log-filter: invalid filter {:?}", self.log_filter))?;
        if let Some(endpoint) = &self.otlp_endpoint {
            endpoint
                .parse::<http::Uri>()
                .ok()
                .filter(|u| u.scheme().is_some() && u.authority().is_some())
                .with_context(|| {
                    format!("--otlp-endpoint: {endpoint:?} is not an absolute http(s) URL")
                })?;
        }
        Ok(())
    }
}

/// Handle on installed telemetry; dropping it without [`Telemetry::shutdown`] may lose spans.
#[must_use = "call shutdown() at exit to flush traces"]
pub struct Telemetry {
    /// The OTLP tracer provider when an endpoint is configured; owned here until shutdown.
    provider: Option<SdkTracerProvider>,
}

/// Installs the global tracing subscriber (and the OTLP pipeline when configured) and the
/// W3C trace-context propagator. Must be called inside a tokio runtime.
pub fn init(service_name: &'static str, args: &TelemetryArgs) -> anyhow::Result<Telemetry> {
    init_instance(service_name, None, args)
}

/// [`init`], with `service.instance.id` set on every exported span's resource (the edge passes
/// its replica id, so traces show which replica did what).
pub fn init_instance(
    service_name: &'static str,
    instance_id: Option<&str>,
    args: &TelemetryArgs,
) -> anyhow::Result<Telemetry> {
    args.validate()?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_new(&args.log_filter)?;
    let provider = args
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| tracer_provider(service_name, instance_id, endpoint, args.otlp_protocol))
        .transpose()?;
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name)));
    let (text, json) = match args.log_format {
        LogFormat::Text => (
            Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(text)
        .with(json)
        .try_init()
        .context("a global tracing subscriber is already installed")?;
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    Ok(Telemetry { provider })
}

fn tracer_provider(
    service_name: &'static str,
    instance_id: Option<&str>,
    endpoint: &str,
    protocol: OtlpProtocol,
) -> anyhow::Result<SdkTracerProvider> {
    let exporter = match protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build(),
    }
    .context("building the OTLP span exporter")?;
    // The builder also reads `OTEL_RESOURCE_ATTRIBUTES` (e.g. `deployment.environment=prod`).
    let mut resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name);
    if let Some(id) = instance_id {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            id.to_owned(),
        ));
    }
    let resource = resource.build();
    // The batch processor honours `OTEL_BSP_SCHEDULE_DELAY` (ms, default 5000) and the other
    // `OTEL_BSP_*` variables.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

impl Telemetry {
    /// Flushes and stops the trace exporter. Blocking work runs off the async workers.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(err)) = result {
                tracing::warn!(%err, "flushing traces at shutdown failed");
            }
        }
    }
}
