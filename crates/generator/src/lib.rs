//! `tokenfan-generator`: a mock LLM that behaves like a model server.
//!
//! It streams a deterministic answer, chosen from an embedded multilingual corpus by
//! (messages, seed), as real BPE tokens over gRPC server streaming: a time to first token, then
//! a steady inter-token gap with jitter, on tokio time. A call can resume from any token index,
//! stops the moment its caller goes away, and can fail or stall on demand when the server runs
//! with `--allow-faults`.
//!
//! The library is what the edge embeds (its default mode) and what tests drive; the binary in
//! `main.rs` only parses configuration and calls [`serve_grpc`] and [`serve_metrics`].

pub mod config;
pub mod corpus;
pub mod generation;
pub mod rng;
pub mod server;
pub mod service;
pub mod stats;

pub use config::{GeneratorConfig, Limits};
pub use server::{serve_grpc, serve_metrics};
pub use service::GeneratorService;
pub use stats::Stats;
