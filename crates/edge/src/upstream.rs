//! Where token streams come from: the [`Generators`] trait, with two implementations.
//!
//! - [`GeneratorPool`], for clusters: a few lazily connected gRPC channels (HTTP/2
//!   connections) per configured generator, round-robin for new calls, and the next generator
//!   on failure. Thousands of token streams on one HTTP/2 connection hit h2's limit on pending
//!   small frames (the peer answers `ENHANCE_YOUR_CALM`), so calls are spread over several
//!   connections with large flow-control windows.
//! - [`InProcess`], the embedded default: the mock generator's service called directly, with
//!   no HTTP/2 encoding and no loopback socket between the edge and its generator.

use std::{
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use futures::Stream;
use tokenfan_proto::v1::{
    GenerateRequest, GenerateResponse, generator_client::GeneratorClient,
    generator_server::Generator as _,
};
use tonic::{Code, Status, transport::Channel};

/// One generator call's messages, in order; it ends after `Finished` (or early on failure).
/// Dropping it cancels the call.
pub type Generation = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

/// The generators an edge calls.
#[async_trait::async_trait]
pub trait Generators: Send + Sync + 'static {
    /// A turn for a new stream: where its first call goes. Pass `turn + attempt` to
    /// [`Generators::generate`], so each retry of the stream moves to the next generator.
    fn next_turn(&self) -> usize;
    /// Starts a call on the generator of `turn`; `span`'s context travels as `traceparent`.
    async fn generate(
        &self,
        req: GenerateRequest,
        turn: usize,
        span: &tracing::Span,
    ) -> Result<Generation, Status>;
    /// How many generators there are.
    fn count(&self) -> usize;
    /// How many generators answer their health check as serving.
    async fn serving(&self) -> usize;
}

/// The mock generator in this process, called directly (the embedded default).
#[derive(Debug)]
pub(crate) struct InProcess {
    service: tokenfan_generator::GeneratorService,
}

impl InProcess {
    /// Calls `service` for every stream.
    pub(crate) fn new(service: tokenfan_generator::GeneratorService) -> Self {
        Self { service }
    }
}

#[async_trait::async_trait]
impl Generators for InProcess {
    fn next_turn(&self) -> usize {
        0
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        _turn: usize,
        span: &tracing::Span,
    ) -> Result<Generation, Status> {
        // The generator's span continues the stream's trace as it would over gRPC.
        let mut request = tonic::Request::new(req);
        tokenfan_telemetry::propagation::inject_span_grpc(span, request.metadata_mut());
        let response = self.service.generate(request).await?;
        Ok(Box::pin(response.into_inner()))
    }

    fn count(&self) -> usize {
        1
    }

    async fn serving(&self) -> usize {
        1
    }
}

/// Flow-control windows of each generator connection.
const CONNECTION_WINDOW: u32 = 16 << 20;
const STREAM_WINDOW: u32 = 1 << 20;

/// Generators this edge calls.
#[derive(Debug)]
pub struct GeneratorPool {
    /// Per generator: its URL and its channels.
    endpoints: Vec<(String, Vec<Channel>)>,
    next: AtomicUsize,
}

impl GeneratorPool {
    /// `connections` channels to each of `urls` (connected on first use, reconnected by tonic
    /// when they drop).
    pub fn new(urls: &[String], connections: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "at least one generator URL is needed");
        let endpoints = urls
            .iter()
            .map(|url| {
                let channels = (0..connections.max(1))
                    .map(|_| {
                        Ok(Channel::from_shared(url.clone())?
                            .connect_timeout(Duration::from_secs(2))
                            .tcp_nodelay(true)
                            .initial_connection_window_size(CONNECTION_WINDOW)
                            .initial_stream_window_size(STREAM_WINDOW)
                            .http2_keep_alive_interval(Duration::from_secs(20))
                            .keep_alive_while_idle(true)
                            .connect_lazy())
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok((url.clone(), channels))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            endpoints,
            next: AtomicUsize::new(0),
        })
    }
}

#[async_trait::async_trait]
impl Generators for GeneratorPool {
    fn next_turn(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Round robin over generators, then over each generator's connections.
    async fn generate(
        &self,
        req: GenerateRequest,
        turn: usize,
        span: &tracing::Span,
    ) -> Result<Generation, Status> {
        let generators = self.endpoints.len();
        let (_, channels) = &self.endpoints[turn % generators];
        let channel = &channels[(turn / generators) % channels.len()];
        let mut request = tonic::Request::new(req);
        tokenfan_telemetry::propagation::inject_span_grpc(span, request.metadata_mut());
        let response = GeneratorClient::new(channel.clone())
            .generate(request)
            .await?;
        Ok(Box::pin(response.into_inner()))
    }

    fn count(&self) -> usize {
        self.endpoints.len()
    }

    /// Checked at once, each within 1 s.
    async fn serving(&self) -> usize {
        let checks = self.endpoints.iter().map(|(url, channels)| async move {
            let mut health =
                tonic_health::pb::health_client::HealthClient::new(channels[0].clone());
            let check = health.check(tonic_health::pb::HealthCheckRequest {
                service: "tokenfan.v1.Generator".into(),
            });
            match tokio::time::timeout(std::time::Duration::from_secs(1), check).await {
                Ok(Ok(r)) if r.get_ref().status == 1 => true,
                Ok(Ok(r)) => {
                    tracing::debug!(%url, status = r.get_ref().status, "generator not serving");
                    false
                }
                Ok(Err(err)) => {
                    tracing::debug!(%url, %err, "generator health check failed");
                    false
                }
                Err(_) => {
                    tracing::debug!(%url, "generator health check timed out");
                    false
                }
            }
        });
        futures::future::join_all(checks)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count()
    }
}

/// Whether a failed call is worth retrying on another generator (from the next token).
pub(crate) fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Cancelled
    )
}
