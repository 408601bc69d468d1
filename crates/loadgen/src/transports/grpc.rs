//! Direct consumption of `tokenfan-generator` over gRPC (`tokenfan.v1.Generator/Generate`):
//! the floor an HTTP edge is compared against. Token seq = index + 1, the emit time is the
//! token's `emitted_at_unix_nanos`, and `Finished` is the terminal event.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokenfan_proto::v1::{
    ChatMessage, FinishReason, GenerateRequest, Timing, generate_response::Event,
    generator_client::GeneratorClient,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::{
    ctx::{Ctx, Ended},
    stats::{Kind, Reader, unix_nanos},
};

/// Channels (HTTP/2 connections) over every target; streams take them round-robin.
pub struct GrpcPool {
    clients: Vec<GeneratorClient<Channel>>,
    next: AtomicUsize,
}

impl GrpcPool {
    /// Opens `per_target` connections to each target.
    pub async fn connect(
        targets: &[String],
        per_target: usize,
        window_kib: u32,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::with_capacity(targets.len() * per_target);
        for _ in 0..per_target {
            for t in targets {
                let channel = Endpoint::from_shared(t.clone())
                    .with_context(|| format!("--target {t}"))?
                    .tcp_nodelay(true)
                    .initial_connection_window_size(window_kib.saturating_mul(1024))
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .with_context(|| format!("connecting to the generator at {t}"))?;
                clients.push(GeneratorClient::new(channel).max_decoding_message_size(4 << 20));
            }
        }
        Ok(Self {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    /// One `Generate` call read to its end.
    pub async fn run(&self, ctx: &Ctx, label: String, seed: u64) -> Ended {
        let stats = &ctx.stats;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let mut client = self.clients[i].clone();
        let l = &ctx.plan.load;
        let request = GenerateRequest {
            request_id: label.clone(),
            messages: vec![ChatMessage {
                role: "user".to_owned(),
                content: format!("{} {seed}", l.prompt),
            }],
            max_tokens: l.max_tokens,
            seed,
            start_index: 0,
            timing: Some(Timing {
                ttft_ms: Some(l.ttft_ms),
                inter_token_ms: Some(l.inter_token_ms),
                jitter_ms: Some(l.jitter_ms),
            }),
            fault: None,
            model: l.model.clone().unwrap_or_default(),
        };
        let deadline = Instant::now() + ctx.stream_timeout;
        let sent_ns = unix_nanos();
        let mut stream = match tokio::time::timeout_at(deadline, client.generate(request)).await {
            Err(_) => {
                stats.error("timeout_response", || label);
                return Ended::default();
            }
            Ok(Err(status)) => {
                stats.error(format!("grpc_{:?}", status.code()), || {
                    status.message().to_owned()
                });
                return Ended::default();
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let mut reader = Reader::new(
            stats.clone(),
            Kind::Grpc,
            label.clone(),
            ctx.check_options(),
            sent_ns,
            sent_ns,
        );
        let mut ok = true;
        loop {
            match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => {
                    stats.error("timeout_body", || label.clone());
                    ok = false;
                    break;
                }
                Ok(Err(status)) => {
                    stats.error(format!("grpc_{:?}", status.code()), || {
                        status.message().to_owned()
                    });
                    ok = false;
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(msg))) => {
                    let recv = unix_nanos();
                    match msg.event {
                        Some(Event::Token(t)) => {
                            let emitted =
                                (t.emitted_at_unix_nanos != 0).then_some(t.emitted_at_unix_nanos);
                            reader.token(
                                Some(u64::from(t.index) + 1),
                                Some(&t.text),
                                emitted,
                                recv,
                            );
                        }
                        Some(Event::Finished(f)) => {
                            let reason = match f.reason() {
                                FinishReason::Stop => "stop",
                                FinishReason::Length => "length",
                                FinishReason::Cancelled => "cancelled",
                                FinishReason::Error => "error",
                                FinishReason::Unspecified => "unspecified",
                            };
                            let usage = f.usage.map(|u| u64::from(u.completion_tokens));
                            let seq = Some(reader.next_seq());
                            reader.done(seq, reason, usage, recv);
                        }
                        None => {}
                    }
                }
            }
        }
        if ok && !reader.has_terminal() {
            stats.error("eof_before_terminal", || label.clone());
        }
        let end = reader.end();
        Ended {
            ok: ok && end.terminal,
            completed: end.completed,
        }
    }
}
