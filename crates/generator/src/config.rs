//! `tokenfan-generator` configuration: every option is a flag with an environment variable.

use std::{net::SocketAddr, time::Duration};

use anyhow::ensure;

/// The generator's whole configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "tokenfan-generator",
    version,
    about = "A mock LLM: streams deterministic BPE tokens over gRPC with model-server timing"
)]
pub struct GeneratorConfig {
    /// Address the gRPC server listens on.
    #[arg(
        long,
        env = "TOKENFAN_GENERATOR_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "TOKENFAN_GENERATOR_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,

    /// Honour the `fault` field of requests (fail or stall on demand). Off: a request with a
    /// fault gets INVALID_ARGUMENT.
    #[arg(long, env = "TOKENFAN_GENERATOR_ALLOW_FAULTS")]
    pub allow_faults: bool,

    #[command(flatten)]
    pub limits: Limits,

    /// How long in-flight generations may run after SIGTERM before they are cut.
    #[arg(
        long,
        env = "TOKENFAN_GENERATOR_SHUTDOWN_GRACE_SECS",
        default_value_t = 30
    )]
    pub shutdown_grace_secs: u64,

    #[command(flatten)]
    pub telemetry: tokenfan_telemetry::TelemetryArgs,
}

/// Defaults and bounds of what a request may ask for.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Default time to first token, in milliseconds.
    #[arg(long, env = "TOKENFAN_GENERATOR_TTFT_MS", default_value_t = 300)]
    pub ttft_ms: u32,

    /// Default delay between two tokens, in milliseconds (20 ms = 50 tokens/s).
    #[arg(long, env = "TOKENFAN_GENERATOR_INTER_TOKEN_MS", default_value_t = 20)]
    pub inter_token_ms: u32,

    /// Default jitter: each delay moves by up to ± this many milliseconds.
    #[arg(long, env = "TOKENFAN_GENERATOR_JITTER_MS", default_value_t = 5)]
    pub jitter_ms: u32,

    /// Largest `timing.ttft_ms` a request may ask for.
    #[arg(long, env = "TOKENFAN_GENERATOR_MAX_TTFT_MS", default_value_t = 30_000)]
    pub max_ttft_ms: u32,

    /// Largest `timing.inter_token_ms` a request may ask for.
    #[arg(
        long,
        env = "TOKENFAN_GENERATOR_MAX_INTER_TOKEN_MS",
        default_value_t = 5_000
    )]
    pub max_inter_token_ms: u32,

    /// Largest `timing.jitter_ms` a request may ask for.
    #[arg(
        long,
        env = "TOKENFAN_GENERATOR_MAX_JITTER_MS",
        default_value_t = 1_000
    )]
    pub max_jitter_ms: u32,

    /// `max_tokens` used when a request sends 0.
    #[arg(
        long,
        env = "TOKENFAN_GENERATOR_DEFAULT_MAX_TOKENS",
        default_value_t = 256
    )]
    pub default_max_tokens: u32,

    /// Largest `max_tokens` a request may ask for.
    #[arg(
        long,
        env = "TOKENFAN_GENERATOR_MAX_TOKENS_CAP",
        default_value_t = 4096
    )]
    pub max_tokens_cap: u32,

    /// Most generations running at once; past it calls get RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "TOKENFAN_GENERATOR_MAX_GENERATIONS",
        default_value_t = 100_000
    )]
    pub max_generations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ttft_ms: 300,
            inter_token_ms: 20,
            jitter_ms: 5,
            max_ttft_ms: 30_000,
            max_inter_token_ms: 5_000,
            max_jitter_ms: 1_000,
            default_max_tokens: 256,
            max_tokens_cap: 4096,
            max_generations: 100_000,
        }
    }
}

impl Limits {
    /// Checks that defaults sit inside their bounds.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.ttft_ms <= self.max_ttft_ms,
            "--ttft-ms ({}) exceeds --max-ttft-ms ({})",
            self.ttft_ms,
            self.max_ttft_ms
        );
        ensure!(
            self.inter_token_ms <= self.max_inter_token_ms,
            "--inter-token-ms ({}) exceeds --max-inter-token-ms ({})",
            self.inter_token_ms,
            self.max_inter_token_ms
        );
        ensure!(
            self.jitter_ms <= self.max_jitter_ms,
            "--jitter-ms ({}) exceeds --max-jitter-ms ({})",
            self.jitter_ms,
            self.max_jitter_ms
        );
        ensure!(
            self.max_tokens_cap >= 1,
            "--max-tokens-cap must be at least 1"
        );
        ensure!(
            (1..=self.max_tokens_cap).contains(&self.default_max_tokens),
            "--default-max-tokens ({}) must be between 1 and --max-tokens-cap ({})",
            self.default_max_tokens,
            self.max_tokens_cap
        );
        ensure!(
            self.max_generations >= 1,
            "--max-generations must be at least 1"
        );
        Ok(())
    }
}

impl GeneratorConfig {
    /// Checks the whole configuration; a bad one exits with this message.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.limits.validate()?;
        self.telemetry.validate()
    }

    /// The SIGTERM grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
