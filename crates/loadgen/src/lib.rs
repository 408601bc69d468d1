//! `tokenfan-loadgen`: a horizontal load tester for LLM token streaming. It drives tokenfan
//! (or any server speaking its native wire format, or the generator over gRPC) with many
//! concurrent streams over every transport (HTTP/1.1, HTTP/2, TLS), verifies every stream, and
//! reports latency, throughput, errors and CPU as text, JSON and SVG charts. The JSON carries
//! the HDR histograms, so the results of many load generators that shared one window
//! (`--start-at`) merge into one exact report ([`merge`]).
//!
//! The binary is a thin wrapper around [`run`], so tests drive the same code with a parsed
//! [`Cli`].

pub mod chart;
pub mod cli;
pub mod ctx;
pub mod event;
pub mod merge;
pub mod metrics;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod scenarios;
pub mod stats;
pub mod tls;
pub mod transports;
pub mod verify;

use anyhow::Context as _;

pub use cli::Cli;
use cli::{Command, Plan};
pub use report::{Outcome, Report};

/// Runs what the command line asks for.
pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match &cli.command {
        Command::Chart(args) => {
            chart::run(args)?;
            Ok(Outcome {
                ok: true,
                report: None,
            })
        }
        Command::Merge(args) => merge::run(args),
        Command::Idle(args) => scenarios::idle::run(args.clone()).await,
        other => {
            let plan = Plan::from_command(other)?.context("not a streaming scenario")?;
            scenarios::run(plan, cli.threads).await
        }
    }
}
