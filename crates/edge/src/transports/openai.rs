//! OpenAI Chat Completions compatibility: `POST /v1/chat/completions` (streaming and not) and
//! the OpenAI framing used by `GET …/events?format=openai`.
//!
//! Chunks depend on per-request options (`include_usage`), so they are built per subscriber;
//! the native frames are the shared, serialize-once path.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    auth,
    error::{ApiError, OpenAiError},
    event::{Event, EventKind, Usage},
    request::{self, Message, StreamRequest, Timing},
    state::AppState,
    stream::{Closed, StreamState},
    tenant::Caller,
    transports::{
        request_span,
        sse::{self, Framer},
    },
};

/// The subset of the Chat Completions request the mock understands; other fields are
/// accepted and ignored, as SDKs send many. Options that cannot change a mock's answer are
/// accepted like the real API does (`temperature`, `top_p`, `frequency_penalty`,
/// `presence_penalty`, `logit_bias`, `user`, `stop`, `logprobs: false`, …); options that would
/// change the answer's shape are refused with OpenAI's 400 (`n > 1`, `tools`/`functions`,
/// `response_format` other than `text`, `logprobs: true`).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    /// `null` counts as absent (false), as in the real API.
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    /// Any integer; see [`seed_of`].
    seed: Option<serde_json::Number>,
    n: Option<u32>,
    tools: Option<Value>,
    functions: Option<Value>,
    response_format: Option<ResponseFormat>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    /// tokenfan extension: generator timing overrides.
    timing: Option<Timing>,
    /// tokenfan extension: token chunks also carry `emitted_at_unix_nanos` (the generator's
    /// emit time), as native token events do, so load tests can measure the added delay.
    /// SDKs ignore the unknown chunk field.
    emit_times: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

/// OpenAI's `seed` is any integer (the API takes 64-bit signed ones); the generator's is
/// unsigned. Non-negative seeds are used as they are; a negative one is mapped to its two's
/// complement bit pattern, which is deterministic and keeps different seeds different.
pub(crate) fn seed_of(seed: &serde_json::Number) -> Option<u64> {
    seed.as_u64().or_else(|| seed.as_i64().map(|n| n as u64))
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl ChatRequest {
    /// The native request, and how the answer is to be delivered.
    fn into_native(mut self) -> Result<(StreamRequest, Delivery), ApiError> {
        let model = self.model.take().ok_or_else(|| {
            ApiError::invalid_field("model", "you must provide a model parameter")
        })?;
        self.check_supported()?;
        let seed = match &self.seed {
            None => None,
            Some(n) => Some(seed_of(n).ok_or_else(|| {
                ApiError::invalid_field("seed", format!("{n} is not an integer"))
            })?),
        };
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid_field(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        let messages = self
            .messages
            .ok_or_else(|| ApiError::invalid_field("messages", "messages is required"))?
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_native(i))
            .collect::<Result<Vec<_>, _>>()?;
        let delivery = if stream {
            Delivery::Chunks {
                include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            }
        } else {
            Delivery::Whole
        };
        let native = StreamRequest {
            messages: Some(messages),
            prompt: None,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            seed,
            timing: self.timing,
            model: Some(model),
            emit_times: self.emit_times,
        };
        Ok((native, delivery))
    }

    /// Refuses what the mock models cannot do (several choices, tools, structured output,
    /// logprobs).
    fn check_supported(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid_field("n", "only n=1 is supported"));
        }
        if self.tools.as_ref().is_some_and(non_empty)
            || self.functions.as_ref().is_some_and(non_empty)
        {
            return Err(ApiError::invalid_field(
                "tools",
                "tool calling is not supported by the mock models",
            ));
        }
        if let Some(format) = &self.response_format
            && format.kind != "text"
        {
            return Err(ApiError::invalid_field(
                "response_format",
                format!(
                    "response_format type {:?} is not supported by the mock models (only \"text\")",
                    format.kind
                ),
            ));
        }
        if self.logprobs == Some(true) || self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::invalid_field(
                "logprobs",
                "logprobs are not supported by the mock models",
            ));
        }
        Ok(())
    }
}

impl ChatMessage {
    /// The native message (`i`: its index, for errors).
    fn into_native(self, i: usize) -> Result<Message, ApiError> {
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid_field(
                            &format!("messages[{i}].content"),
                            format!("content parts of type {:?} are not supported", p.kind),
                        ));
                    }
                    text.push_str(p.text.as_deref().unwrap_or(""));
                }
                text
            }
        };
        // The deprecated `function` role (a function's result) is text, like `tool`.
        let role = if self.role == "function" {
            "tool".to_owned()
        } else {
            self.role
        };
        Ok(Message { role, content })
    }
}

/// How a chat completion is answered (`stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// `stream: false`: one completion object once the answer is whole.
    Whole,
    /// `stream: true`: SSE chunks; `include_usage` (`stream_options`) adds the usage chunk.
    Chunks { include_usage: bool },
}

fn non_empty(v: &Value) -> bool {
    !(v.is_null() || v.as_array().is_some_and(|a| a.is_empty()))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(app): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    expires: Option<axum::Extension<auth::CredentialExpiry>>,
    body: Body,
) -> Result<Response, OpenAiError> {
    let chat: ChatRequest =
        request::read_json(&headers, body, app.config.http.max_body_bytes).await?;
    let (native, delivery) = chat.into_native()?;
    let spec = native.validate(&app.config.streams)?;
    let span = request_span(&headers, "POST /v1/chat/completions");
    let stream = app.create_stream(&caller, spec, &span, "openai").await?;
    let sub = stream.subscribe(0)?;
    if let Delivery::Chunks { include_usage } = delivery {
        let framing = OpenAiFraming {
            role_chunk: true,
            retry_hint: false,
            include_usage,
        };
        let framer = OpenAiFramer::new(&stream, framing);
        let expires = expires.map(|axum::Extension(e)| e);
        let mut response = sse::response_until(&app, sub, framer, "openai", expires);
        let ticket = app.security.ticket_for(&stream);
        let out = response.headers_mut();
        app.security
            .add_ticket_headers(ticket.as_ref(), &stream, &headers, out);
        return Ok(response);
    }
    complete(&stream, sub).await
}

/// `stream: false`: waits for the whole answer and returns one completion object.
async fn complete(
    stream: &Arc<StreamState>,
    mut sub: crate::stream::Subscription,
) -> Result<Response, OpenAiError> {
    let mut text = String::new();
    let terminal = 'read: loop {
        let batch = sub
            .next_batch()
            .await
            .map_err(|_| OpenAiError(ApiError::Internal))?;
        for event in batch {
            match event.text() {
                Some(t) => text.push_str(t),
                None => break 'read event,
            }
        }
    };
    let (finish_reason, usage) = match &terminal.kind {
        EventKind::Done {
            finish_reason: crate::event::FinishReason::Cancelled,
            ..
        } => {
            return Err(ApiError::CancelledBeforeFinish.into());
        }
        EventKind::Done {
            finish_reason,
            usage,
        } => (finish_reason.as_str(), *usage),
        EventKind::Error { code, message } => {
            // The generator refused the request: the request's fault (400).
            let error = if *code == "invalid_request" {
                ApiError::InvalidRequest {
                    message: message.clone(),
                    param: None,
                }
            } else {
                ApiError::GeneratorFailed {
                    code,
                    message: message.clone(),
                }
            };
            return Err(error.into());
        }
        EventKind::Token { .. } => return Err(ApiError::Internal.into()),
    };
    let body = json!({
        "id": format!("chatcmpl-{}", stream.id),
        "object": "chat.completion",
        "created": stream.created_unix,
        "model": stream.model,
        "system_fingerprint": "tokenfan",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": usage_json(usage),
    });
    let mut response = (StatusCode::OK, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(stream.id.as_str()) {
        response.headers_mut().insert("x-stream-id", v);
    }
    Ok(response)
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// Writes Chat Completions chunks: the role chunk, one chunk per token event, the finish
/// chunk, the usage chunk if asked, then `data: [DONE]`; a failure or cancel mid-stream sends
/// `data: {"error":…}` and no `[DONE]`.
pub(crate) struct OpenAiFramer {
    id: String,
    model: &'static str,
    created: u64,
    framing: OpenAiFraming,
    failed: bool,
    last_seq: u64,
}

/// What an OpenAI chunk stream sends besides the answer's chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenAiFraming {
    /// The role chunk first (the answer is read from its beginning).
    pub role_chunk: bool,
    /// The EventSource `retry:` hint first (`GET …/events?format=openai`).
    pub retry_hint: bool,
    /// The usage chunk at the end (`stream_options.include_usage`).
    pub include_usage: bool,
}

impl OpenAiFramer {
    /// A framer for `stream`.
    pub(crate) fn new(stream: &StreamState, framing: OpenAiFraming) -> Self {
        Self {
            id: format!("chatcmpl-{}", stream.id),
            model: stream.model,
            created: stream.created_unix,
            framing,
            failed: false,
            last_seq: 0,
        }
    }

    fn chunk(&self, out: &mut BytesMut, seq: Option<u64>, delta: Value, finish: Option<&str>) {
        self.chunk_at(out, seq, delta, finish, None);
    }

    /// A chunk; `emitted_at` (streams started with `emit_times`) adds the tokenfan extension
    /// field `emitted_at_unix_nanos`.
    fn chunk_at(
        &self,
        out: &mut BytesMut,
        seq: Option<u64>,
        delta: Value,
        finish: Option<&str>,
        emitted_at: Option<i64>,
    ) {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "tokenfan",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.framing.include_usage {
            chunk["usage"] = Value::Null;
        }
        if let Some(t) = emitted_at {
            chunk["emitted_at_unix_nanos"] = json!(t);
        }
        write_data(out, seq, &chunk);
    }
}

fn write_data(out: &mut BytesMut, seq: Option<u64>, value: &Value) {
    if let Some(seq) = seq {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

impl Framer for OpenAiFramer {
    fn start(&mut self, out: &mut BytesMut) {
        if self.framing.retry_hint {
            out.extend_from_slice(sse::RETRY);
        }
        if self.framing.role_chunk {
            self.chunk(
                out,
                Some(0),
                json!({"role": "assistant", "content": ""}),
                None,
            );
        }
    }

    fn event(&mut self, event: &Event, out: &mut BytesMut) {
        self.last_seq = event.seq;
        match &event.kind {
            EventKind::Token { text } => self.chunk_at(
                out,
                Some(event.seq),
                json!({"content": text}),
                None,
                event.emitted_at,
            ),
            EventKind::Done {
                finish_reason,
                usage,
            } if finish_reason.as_str() != "cancelled" => {
                // Only the last chunk of the ending carries the terminal `id:`, so a client
                // cut off between the finish and usage chunks resumes and gets both.
                let finish_id = (!self.framing.include_usage).then_some(event.seq);
                self.chunk(out, finish_id, json!({}), Some(finish_reason.as_str()));
                if self.framing.include_usage {
                    let chunk = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "system_fingerprint": "tokenfan",
                        "choices": [],
                        "usage": usage_json(*usage),
                    });
                    write_data(out, Some(event.seq), &chunk);
                }
            }
            EventKind::Done { .. } => {
                self.failed = true;
                let error = OpenAiError(ApiError::StreamCancelled);
                write_data(out, Some(event.seq), &error.body());
            }
            EventKind::Error { code, message } => {
                self.failed = true;
                let error = OpenAiError(ApiError::GeneratorFailed {
                    code,
                    message: message.clone(),
                });
                write_data(out, Some(event.seq), &error.body());
            }
        }
    }

    fn interrupted(&mut self, out: &mut BytesMut) {
        // Without this the client would see the answer end without `[DONE]` or an error, and
        // SDKs would take the cut answer as complete.
        let error = OpenAiError(ApiError::ServerShutdown(format!(
            "the server is restarting and the answer was cut; resume with GET /v1/streams/{}/events?format=openai&after={}",
            self.id.trim_start_matches("chatcmpl-"),
            self.last_seq
        )));
        write_data(out, None, &error.body());
    }

    fn credentials_expired(&mut self, out: &mut BytesMut) {
        let error = OpenAiError(ApiError::CredentialsExpired(
            "the credential this stream was opened with has expired",
        ));
        write_data(out, None, &error.body());
    }

    fn closed(&mut self, reason: Closed, out: &mut BytesMut) {
        match reason {
            Closed::Finished if !self.failed => out.extend_from_slice(b"data: [DONE]\n\n"),
            Closed::Finished => {}
            Closed::SlowConsumer { last_seq } => {
                let error = OpenAiError(ApiError::SlowConsumer(format!(
                    "the client fell too far behind; resume with GET /v1/streams/<id>/events?format=openai&after={last_seq}"
                )));
                write_data(out, None, &error.body());
            }
        }
    }
}
