//! The generator client: one lazily connected gRPC channel per configured generator,
//! round-robin for new calls, and the next one on failure.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokenfan_proto::v1::{GenerateRequest, GenerateResponse, generator_client::GeneratorClient};
use tonic::{Code, Status, Streaming, transport::Channel};

/// Generators this edge calls.
#[derive(Debug)]
pub struct GeneratorPool {
    endpoints: Vec<(String, Channel)>,
    next: AtomicUsize,
}

impl GeneratorPool {
    /// Channels to `urls` (connected on first use, reconnected by tonic when they drop).
    pub fn new(urls: &[String]) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "at least one generator URL is needed");
        let endpoints = urls
            .iter()
            .map(|url| {
                let channel = Channel::from_shared(url.clone())?
                    .connect_timeout(std::time::Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(std::time::Duration::from_secs(20))
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                Ok((url.clone(), channel))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            endpoints,
            next: AtomicUsize::new(0),
        })
    }

    /// Number of generators.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether the pool is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Starts a call on the next generator in turn (`attempt` shifts the choice, so a retry
    /// lands on another generator when there is one). The request's span context is sent as
    /// `traceparent` metadata.
    pub async fn generate(
        &self,
        req: GenerateRequest,
        attempt: u32,
        span: &tracing::Span,
    ) -> Result<(String, Streaming<GenerateResponse>), Status> {
        let base = if attempt == 0 {
            self.next.fetch_add(1, Ordering::Relaxed)
        } else {
            self.next.load(Ordering::Relaxed) + attempt as usize
        };
        let (url, channel) = &self.endpoints[base % self.endpoints.len()];
        let mut request = tonic::Request::new(req);
        tokenfan_telemetry::propagation::inject_span_grpc(span, request.metadata_mut());
        let response = GeneratorClient::new(channel.clone())
            .generate(request)
            .await?;
        Ok((url.clone(), response.into_inner()))
    }

    /// Whether every generator answers its health check (readiness).
    pub async fn ready(&self) -> bool {
        for (_, channel) in &self.endpoints {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let check = health.check(tonic_health::pb::HealthCheckRequest {
                service: "tokenfan.v1.Generator".into(),
            });
            match tokio::time::timeout(std::time::Duration::from_secs(1), check).await {
                Ok(Ok(r)) if r.get_ref().status == 1 => {}
                _ => return false,
            }
        }
        true
    }
}

/// Whether a failed call is worth retrying on another generator (from the next token).
pub fn retryable(status: &Status) -> bool {
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
