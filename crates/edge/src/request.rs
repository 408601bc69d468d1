//! Request bodies: reading them safely and turning them into a validated [`StreamSpec`].

use axum::{
    body::Body,
    http::{HeaderMap, header},
};
use serde::{Deserialize, Serialize};

use crate::{config::StreamLimits, error::ApiError};

/// The models this edge serves (all backed by the mock generator).
pub(crate) const MODELS: &[Model] = &[
    Model {
        id: "tokenfan-mock",
        timing: None,
    },
    Model {
        id: "tokenfan-mock-fast",
        timing: Some((50, 5)),
    },
];

/// The model used when a request names none.
pub(crate) const DEFAULT_MODEL: &str = "tokenfan-mock";

/// A mock model: a name and, optionally, its own default (ttft, inter-token) in ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Model {
    /// The model id clients send.
    pub id: &'static str,
    /// Default timing when the request gives none; `None` = the generator's defaults.
    pub timing: Option<(u32, u32)>,
}

/// Roles a message may have.
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// A chat message.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Timing overrides in milliseconds.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// Time to first token.
    pub ttft_ms: Option<u32>,
    /// Delay between two tokens.
    pub inter_token_ms: Option<u32>,
    /// ± jitter on each delay.
    pub jitter_ms: Option<u32>,
}

/// The native `POST /v1/streams` body (and the WebSocket `start` request).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRequest {
    /// The chat so far.
    pub messages: Option<Vec<Message>>,
    /// Shorthand for one user message.
    pub prompt: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Decides the answer; random when absent.
    pub seed: Option<u64>,
    /// Timing overrides.
    pub timing: Option<Timing>,
    /// Model id.
    pub model: Option<String>,
    /// Token events also carry `emitted_at_unix_nanos` (the generator's emit time), so load
    /// tests can measure the delay the edge adds.
    pub emit_times: Option<bool>,
}

/// A validated request, ready for the generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// At least one message.
    pub messages: Vec<Message>,
    /// Within 1..=cap.
    pub max_tokens: u32,
    /// Chosen by the client or at random.
    pub seed: u64,
    /// Within the configured bounds.
    pub timing: Timing,
    /// A known model id.
    pub model: &'static str,
    /// Token events carry the generator's emit time.
    pub emit_times: bool,
    /// The tenant that owns the stream ([`crate::tenant::DEFAULT_TENANT`] until the caller's
    /// tenant is set by [`crate::state::AppState::create_stream`]).
    pub tenant: String,
}

impl StreamRequest {
    /// Validates against `limits`; every refusal names the field.
    pub fn validate(self, limits: &StreamLimits) -> Result<StreamSpec, ApiError> {
        let messages = match (self.messages, self.prompt) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_field(
                    "prompt",
                    "give either `messages` or `prompt`, not both",
                ));
            }
            (None, None) => {
                return Err(ApiError::invalid_field(
                    "messages",
                    "`messages` (or `prompt`) is required",
                ));
            }
            (None, Some(prompt)) => vec![Message {
                role: "user".into(),
                content: prompt,
            }],
            (Some(messages), None) => messages,
        };
        validate_messages(&messages)?;
        let max_tokens = match self.max_tokens {
            None => limits.default_max_tokens,
            Some(n) if (1..=limits.max_tokens_cap).contains(&n) => n,
            Some(n) => {
                return Err(ApiError::invalid_field(
                    "max_tokens",
                    format!("{n} is out of range 1..={}", limits.max_tokens_cap),
                ));
            }
        };
        let model = resolve_model(self.model.as_deref())?;
        let mut timing = self.timing.unwrap_or_default();
        check_bound("timing.ttft_ms", timing.ttft_ms, limits.max_ttft_ms)?;
        check_bound(
            "timing.inter_token_ms",
            timing.inter_token_ms,
            limits.max_inter_token_ms,
        )?;
        check_bound("timing.jitter_ms", timing.jitter_ms, limits.max_jitter_ms)?;
        if let Some((ttft, itl)) = model.timing {
            timing.ttft_ms = timing.ttft_ms.or(Some(ttft.min(limits.max_ttft_ms)));
            timing.inter_token_ms = timing
                .inter_token_ms
                .or(Some(itl.min(limits.max_inter_token_ms)));
        }
        Ok(StreamSpec {
            messages,
            max_tokens,
            seed: self.seed.unwrap_or_else(random_seed),
            timing,
            model: model.id,
            emit_times: self.emit_times.unwrap_or(false),
            tenant: crate::tenant::DEFAULT_TENANT.to_owned(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct SpecJson {
    messages: Vec<Message>,
    max_tokens: u32,
    seed: u64,
    timing: Timing,
    model: String,
    emit_times: bool,
    /// Absent in specs written before tenants existed.
    #[serde(default = "default_tenant")]
    tenant: String,
}

fn default_tenant() -> String {
    crate::tenant::DEFAULT_TENANT.to_owned()
}

impl StreamSpec {
    /// The spec as JSON, kept with the stream's metadata so another replica can take over.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&SpecJson {
            messages: self.messages.clone(),
            max_tokens: self.max_tokens,
            seed: self.seed,
            timing: self.timing,
            model: self.model.to_owned(),
            emit_times: self.emit_times,
            tenant: self.tenant.clone(),
        })
        .unwrap_or_default()
    }

    /// Reads back [`StreamSpec::to_json`]; `None` for anything else.
    pub fn from_json(json: &str) -> Option<Self> {
        let s: SpecJson = serde_json::from_str(json).ok()?;
        Some(Self {
            messages: s.messages,
            max_tokens: s.max_tokens,
            seed: s.seed,
            timing: s.timing,
            model: resolve_model(Some(&s.model)).ok()?.id,
            emit_times: s.emit_times,
            tenant: s.tenant,
        })
    }
}

/// Checks roles and that there is at least one message.
pub fn validate_messages(messages: &[Message]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_field(
            "messages",
            "at least one message is required",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid_field(
                &format!("messages[{i}].role"),
                format!("{:?} is not one of {}", m.role, ROLES.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The model a request names, or the default; unknown → 404 `model_not_found`.
pub(crate) fn resolve_model(name: Option<&str>) -> Result<&'static Model, ApiError> {
    let name = name.unwrap_or(DEFAULT_MODEL);
    MODELS
        .iter()
        .find(|m| m.id == name)
        .ok_or_else(|| ApiError::ModelNotFound(name.to_owned()))
}

fn check_bound(field: &str, value: Option<u32>, max: u32) -> Result<(), ApiError> {
    match value {
        Some(v) if v > max => Err(ApiError::invalid_field(
            field,
            format!("{v} exceeds the server bound {max}"),
        )),
        _ => Ok(()),
    }
}

/// A random seed for requests that give none.
pub(crate) fn random_seed() -> u64 {
    let mut buf = [0u8; 8];
    // The OS RNG failing is not something a request can cause; fall back to the clock.
    if getrandom::fill(&mut buf).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    }
    u64::from_le_bytes(buf)
}

/// Reads a JSON body: checks the content type (415), the size (413), UTF-8 and syntax (400).
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::BodyTooLarge(limit))?;
    parse_json(&bytes)
}

/// Parses JSON bytes into `T` with a precise 400 on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::InvalidJson("the body is not valid UTF-8".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() {
            ApiError::InvalidRequest {
                message: format!("{path}: {inner}"),
                param: (path != ".").then_some(path),
            }
        } else {
            ApiError::InvalidJson(inner.to_string())
        }
    })?;
    de.end().map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EdgeConfig;

    fn limits() -> StreamLimits {
        EdgeConfig::defaults().streams
    }

    fn parse(body: &str) -> Result<StreamSpec, ApiError> {
        parse_json::<StreamRequest>(body.as_bytes())?.validate(&limits())
    }

    #[test]
    fn prompt_is_shorthand_for_one_user_message() {
        let spec = parse(r#"{"prompt":"hi","seed":7}"#).expect("valid");
        assert_eq!(
            spec.messages,
            [Message {
                role: "user".into(),
                content: "hi".into()
            }]
        );
        assert_eq!(
            (spec.seed, spec.max_tokens, spec.model),
            (7, 256, "tokenfan-mock")
        );
    }

    #[test]
    fn specs_round_trip_through_json() {
        let spec = parse(r#"{"prompt":"hi","seed":7,"timing":{"ttft_ms":3}}"#).expect("valid");
        assert_eq!(StreamSpec::from_json(&spec.to_json()), Some(spec));
        assert_eq!(StreamSpec::from_json("{}"), None);
    }

    #[test]
    fn each_bad_field_is_named() {
        for (body, code, needle) in [
            (
                r#"{"prompt":"a","messages":[]}"#,
                "invalid_request",
                "prompt",
            ),
            (r#"{}"#, "invalid_request", "messages"),
            (r#"{"messages":[]}"#, "invalid_request", "messages"),
            (
                r#"{"prompt":"a","max_tokens":0}"#,
                "invalid_request",
                "max_tokens",
            ),
            (
                r#"{"prompt":"a","max_tokens":100000}"#,
                "invalid_request",
                "max_tokens",
            ),
            (
                r#"{"prompt":"a","max_tokens":-1}"#,
                "invalid_request",
                "max_tokens",
            ),
            (
                r#"{"prompt":"a","timing":{"ttft_ms":999999}}"#,
                "invalid_request",
                "timing.ttft_ms",
            ),
            (r#"{"prompt":"a","bogus":1}"#, "invalid_request", "bogus"),
            (r#"{"prompt":5}"#, "invalid_request", "string"),
            (r#"{"prompt":"a""#, "invalid_json", "EOF"),
            (
                r#"{"messages":[{"role":"x","content":"a"}]}"#,
                "invalid_request",
                "messages[0].role",
            ),
        ] {
            let err = parse(body).expect_err(body);
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.code(), code, "{body}");
            assert!(err.message().contains(needle), "{body}: {}", err.message());
        }
        let err = parse(r#"{"prompt":"a","model":"gpt-9"}"#).expect_err("unknown model");
        assert_eq!(
            (err.status().as_u16(), err.code()),
            (404, "model_not_found")
        );
        let err = parse_json::<StreamRequest>(b"{\"prompt\":\"\xff\"}").expect_err("utf-8");
        assert_eq!(err.code(), "invalid_json");
    }
}
