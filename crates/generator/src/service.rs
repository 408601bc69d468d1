//! The `tokenfan.v1.Generator` gRPC service: validates a request, plans the generation and
//! hands tonic a [`Generation`] stream.

use std::{sync::Arc, time::Duration};

use tokenfan_proto::v1::{
    ChatMessage, FinishReason, GenerateRequest, Usage, generator_server::Generator,
};
use tonic::{Request, Response, Status};

use crate::{
    config::Limits,
    corpus::{self, Corpus},
    generation::{ActiveGuard, FaultPlan, Generation, Plan, Schedule},
    stats::Stats,
};

/// Roles a chat message may have.
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// The gRPC service; cheap to clone (shared state behind an `Arc`).
#[derive(Debug, Clone)]
pub struct GeneratorService {
    limits: Arc<Limits>,
    allow_faults: bool,
    stats: Arc<Stats>,
}

impl GeneratorService {
    /// A service with these limits that counts into `stats`.
    pub fn new(limits: Limits, allow_faults: bool, stats: Arc<Stats>) -> Self {
        Self {
            limits: Arc::new(limits),
            allow_faults,
            stats,
        }
    }

    /// Turns a request into a plan, or INVALID_ARGUMENT naming the offending field.
    pub fn plan(&self, req: &GenerateRequest) -> Result<Plan, Status> {
        let limits = &*self.limits;
        validate_messages(&req.messages)?;
        let max_tokens = match req.max_tokens {
            0 => limits.default_max_tokens,
            n if n > limits.max_tokens_cap => {
                return Err(invalid(format!(
                    "max_tokens: {n} exceeds the server cap {}",
                    limits.max_tokens_cap
                )));
            }
            n => n,
        };
        let schedule = self.schedule(req)?;
        let fault = self.fault(req)?;

        let answer = Corpus::get().answer(&req.messages, req.seed);
        let (end, finish) = if answer.len() > max_tokens {
            (max_tokens, FinishReason::Length)
        } else {
            (answer.len(), FinishReason::Stop)
        };
        if req.start_index > end {
            return Err(invalid(format!(
                "start_index: {} is past the end of the answer ({end} tokens)",
                req.start_index
            )));
        }
        Ok(Plan {
            tokens: answer.into_tokens_from(req.start_index),
            start_index: req.start_index,
            end,
            finish,
            usage: Usage {
                prompt_tokens: corpus::prompt_tokens(&req.messages),
                completion_tokens: end,
            },
            schedule,
            seed: req.seed,
            fault,
        })
    }

    fn schedule(&self, req: &GenerateRequest) -> Result<Schedule, Status> {
        let limits = &*self.limits;
        let timing = req.timing.unwrap_or_default();
        let pick = |field: &str, asked: Option<u32>, default: u32, max: u32| match asked {
            Some(ms) if ms > max => Err(invalid(format!(
                "timing.{field}: {ms} exceeds the server bound {max}"
            ))),
            Some(ms) => Ok(Duration::from_millis(u64::from(ms))),
            None => Ok(Duration::from_millis(u64::from(default))),
        };
        Ok(Schedule {
            ttft: pick(
                "ttft_ms",
                timing.ttft_ms,
                limits.ttft_ms,
                limits.max_ttft_ms,
            )?,
            inter_token: pick(
                "inter_token_ms",
                timing.inter_token_ms,
                limits.inter_token_ms,
                limits.max_inter_token_ms,
            )?,
            jitter: pick(
                "jitter_ms",
                timing.jitter_ms,
                limits.jitter_ms,
                limits.max_jitter_ms,
            )?,
        })
    }

    fn fault(&self, req: &GenerateRequest) -> Result<Option<FaultPlan>, Status> {
        let Some(fault) = req.fault else {
            return Ok(None);
        };
        if fault.fail_after_tokens.is_none() && fault.stall_after_tokens.is_none() {
            return Ok(None);
        }
        if !self.allow_faults {
            return Err(invalid(
                "fault: fault injection is disabled (start the generator with --allow-faults)",
            ));
        }
        let code = match fault.grpc_code {
            0 => tonic::Code::Unavailable,
            c @ 1..=16 => tonic::Code::from_i32(c),
            c => {
                return Err(invalid(format!(
                    "fault.grpc_code: {c} is not a gRPC status code (0 = UNAVAILABLE, 1..=16)"
                )));
            }
        };
        Ok(Some(FaultPlan {
            fail_after: fault.fail_after_tokens,
            stall_after: fault.stall_after_tokens,
            code,
        }))
    }
}

fn validate_messages(messages: &[ChatMessage]) -> Result<(), Status> {
    if messages.is_empty() {
        return Err(invalid("messages: at least one message is required"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(invalid(format!(
                "messages[{i}].role: {:?} is not one of {}",
                m.role,
                ROLES.join(", ")
            )));
        }
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

#[tonic::async_trait]
impl Generator for GeneratorService {
    type GenerateStream = Generation;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let parent = tokenfan_telemetry::propagation::extract_grpc(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!(
            "generate",
            otel.name = "tokenfan.v1.Generator/Generate",
            otel.kind = "server",
            rpc.system = "grpc",
            request_id = %req.request_id,
            seed = req.seed,
            start_index = i64::from(req.start_index),
            max_tokens = i64::from(req.max_tokens),
            tokens = tracing::field::Empty,
            ttft_ms = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
        );
        tokenfan_telemetry::propagation::set_parent(&span, parent);

        let plan = self.plan(&req).inspect_err(|status| {
            self.stats.rejected();
            span.record("finish_reason", "invalid_argument");
            tracing::debug!(parent: &span, message = status.message(), "rejected");
        })?;
        let guard = ActiveGuard::acquire(self.stats.clone(), self.limits.max_generations)
            .ok_or_else(|| {
                self.stats.rejected();
                Status::resource_exhausted(format!(
                    "the generator already runs {} generations",
                    self.limits.max_generations
                ))
            })?;
        Ok(Response::new(Generation::new(plan, span, guard)))
    }
}
