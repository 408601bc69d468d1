//! Stream events and their wire forms.
//!
//! An [`Event`] is written once, when it is created, as its SSE frame, whose `data:` is the
//! native JSON (both forms in one exact-size allocation); the WebSocket text is derived from
//! those bytes at most once. Every subscriber shares them through the `Arc<Event>` they all
//! hold.

use std::sync::OnceLock;

use bytes::{BufMut as _, Bytes, BytesMut};
use serde::Serialize;

/// Why a stream finished (`done` events) or how it stands (`status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The answer ended naturally.
    Stop,
    /// `max_tokens` cut the answer.
    Length,
    /// Stopped by a client or by the detach grace.
    Cancelled,
}

impl FinishReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts reported with `done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens in the whole answer.
    pub completion_tokens: u32,
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// Some answer text (one generator token, or several coalesced).
    Token {
        /// The text, valid UTF-8.
        text: String,
    },
    /// The terminal event of a finished stream.
    Done {
        /// Why it finished.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The terminal event of a failed stream.
    Error {
        /// Stable machine tag, e.g. `generator_unavailable`.
        code: &'static str,
        /// What went wrong, for people.
        message: String,
    },
}

/// Serializes as `{"type":…,"seq":…,<fields>}`, the order the protocol documents.
struct Wire<'a> {
    kind: &'a EventKind,
    type_name: &'static str,
    seq: u64,
    emitted_at: Option<i64>,
}

impl Serialize for Wire<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("type", self.type_name)?;
        m.serialize_entry("seq", &self.seq)?;
        match self.kind {
            EventKind::Token { text } => {
                m.serialize_entry("text", text)?;
                if let Some(t) = self.emitted_at {
                    m.serialize_entry("emitted_at_unix_nanos", &t)?;
                }
            }
            EventKind::Done {
                finish_reason,
                usage,
            } => {
                m.serialize_entry("finish_reason", finish_reason)?;
                m.serialize_entry("usage", usage)?;
            }
            EventKind::Error { code, message } => {
                m.serialize_entry("code", code)?;
                m.serialize_entry("message", message)?;
            }
        }
        m.end()
    }
}

/// One event of a stream, with its wire forms.
#[derive(Debug)]
pub struct Event {
    /// Position in the stream: 1, 2, 3, … without gaps (token seq = generator index + 1).
    pub seq: u64,
    /// The content.
    pub kind: EventKind,
    /// When the generator emitted the (last) token, for streams started with `emit_times`.
    pub emitted_at: Option<i64>,
    /// The SSE frame `id: <seq>\nevent: <type>\ndata: <json>\n\n`, whose `data:` is the native
    /// JSON: both wire forms in one exact-size allocation, written once.
    frame: Box<[u8]>,
    /// Where the JSON starts in `frame` (it ends 2 bytes before the frame does).
    json_at: usize,
    /// WebSocket text (the JSON with `"stream_id"`), built on first use.
    ws: OnceLock<Bytes>,
}

/// Most bytes an event's frame needs besides its text (escaped): `id: `, the seq, the type
/// and the JSON keys, a timestamp.
const FRAME_OVERHEAD: usize = 128;

thread_local! {
    /// Scratch space the frames are written in before they are copied to their exact size.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scratch buffers above this size are not kept for the next event.
const SCRATCH_KEEP: usize = 16 * 1024;

impl Event {
    /// Builds an event and serializes it.
    pub fn new(seq: u64, kind: EventKind) -> Self {
        Self::with_emit_time(seq, kind, None)
    }

    /// Builds an event that also carries the generator's emit time (token events only; used by
    /// load tests to measure the delay the edge adds).
    pub(crate) fn with_emit_time(seq: u64, kind: EventKind, emitted_at: Option<i64>) -> Self {
        let emitted_at = emitted_at.filter(|_| matches!(kind, EventKind::Token { .. }));
        let type_name = type_name(&kind);
        let (frame, json_at) = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (frame, json_at) = write_frame(&mut scratch, seq, &kind, type_name, emitted_at);
            if scratch.capacity() > SCRATCH_KEEP {
                *scratch = Vec::new();
            }
            (frame, json_at)
        });
        Self {
            seq,
            kind,
            emitted_at,
            frame,
            json_at,
            ws: OnceLock::new(),
        }
    }

    /// Whether this is the stream's last event.
    pub fn is_terminal(&self) -> bool {
        !matches!(self.kind, EventKind::Token { .. })
    }

    /// The native JSON.
    pub fn json(&self) -> &[u8] {
        self.frame
            .get(self.json_at..self.frame.len().saturating_sub(2))
            .unwrap_or_default()
    }

    /// Size in bytes, for queue accounting.
    pub fn size(&self) -> usize {
        self.json().len()
    }

    /// The SSE frame: `id: <seq>\nevent: <type>\ndata: <json>\n\n`.
    pub fn sse(&self) -> &[u8] {
        &self.frame
    }

    /// The WebSocket text: the native JSON with `"stream_id"` first. `stream_id` must be
    /// the id of this event's stream (ids are URL-safe, so they need no escaping).
    pub fn ws(&self, stream_id: &str) -> &Bytes {
        self.ws.get_or_init(|| {
            let mut b = BytesMut::with_capacity(self.json().len() + stream_id.len() + 16);
            b.put_slice(b"{\"stream_id\":\"");
            b.put_slice(stream_id.as_bytes());
            b.put_slice(b"\",");
            b.put_slice(self.json().get(1..).unwrap_or_default());
            b.freeze()
        })
    }

    /// The text of a token event.
    pub fn text(&self) -> Option<&str> {
        match &self.kind {
            EventKind::Token { text } => Some(text),
            _ => None,
        }
    }
}

/// Error codes an `error` event can carry; codes read back from JSON map onto these.
const ERROR_CODES: &[&str] = &["generator_unavailable", "invalid_request", "internal"];

impl Event {
    /// Parses the native JSON of an event (as stored in history or carried on the bus).
    pub fn from_json(bytes: &[u8]) -> Option<Event> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let seq = v.get("seq")?.as_u64()?;
        let kind = match v.get("type")?.as_str()? {
            "token" => EventKind::Token {
                text: v.get("text")?.as_str()?.to_owned(),
            },
            "done" => {
                let usage = v.get("usage")?;
                let count = |k: &str| {
                    usage
                        .get(k)
                        .and_then(serde_json::Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                };
                EventKind::Done {
                    finish_reason: match v.get("finish_reason")?.as_str()? {
                        "stop" => FinishReason::Stop,
                        "length" => FinishReason::Length,
                        "cancelled" => FinishReason::Cancelled,
                        _ => return None,
                    },
                    usage: Usage {
                        prompt_tokens: count("prompt_tokens")?,
                        completion_tokens: count("completion_tokens")?,
                    },
                }
            }
            "error" => {
                let code = v.get("code")?.as_str()?;
                EventKind::Error {
                    code: ERROR_CODES
                        .iter()
                        .find(|c| **c == code)
                        .copied()
                        .unwrap_or("internal"),
                    message: v.get("message")?.as_str()?.to_owned(),
                }
            }
            _ => return None,
        };
        let emitted_at = v
            .get("emitted_at_unix_nanos")
            .and_then(serde_json::Value::as_i64);
        Some(Event::with_emit_time(seq, kind, emitted_at))
    }
}

/// Writes `id: <seq>\nevent: <type>\ndata: <json>\n\n` into `scratch` and returns an
/// exact-size copy with the offset of the JSON. A token's JSON is written directly (its text
/// escaped by serde_json, so the bytes are the ones serde_json would write); the terminal
/// events go through serde.
fn write_frame(
    scratch: &mut Vec<u8>,
    seq: u64,
    kind: &EventKind,
    type_name: &'static str,
    emitted_at: Option<i64>,
) -> (Box<[u8]>, usize) {
    scratch.clear();
    if let EventKind::Token { text } = kind {
        scratch.reserve(text.len() + FRAME_OVERHEAD);
    }
    scratch.extend_from_slice(b"id: ");
    // serde_json writes integers with `itoa`, as it does inside the JSON.
    let _ = serde_json::to_writer(&mut *scratch, &seq);
    let seq_text = 4..scratch.len();
    scratch.extend_from_slice(b"\nevent: ");
    scratch.extend_from_slice(type_name.as_bytes());
    scratch.extend_from_slice(b"\ndata: ");
    let json_at = scratch.len();
    let written = match kind {
        EventKind::Token { text } => {
            scratch.extend_from_slice(b"{\"type\":\"token\",\"seq\":");
            scratch.extend_from_within(seq_text);
            scratch.extend_from_slice(b",\"text\":");
            let escaped = serde_json::to_writer(&mut *scratch, text.as_str());
            if let Some(t) = emitted_at {
                scratch.extend_from_slice(b",\"emitted_at_unix_nanos\":");
                let _ = serde_json::to_writer(&mut *scratch, &t);
            }
            scratch.push(b'}');
            escaped
        }
        _ => serde_json::to_writer(
            &mut *scratch,
            &Wire {
                kind,
                type_name,
                seq,
                emitted_at,
            },
        ),
    };
    if written.is_err() {
        // Not reachable (the values are plain strings and numbers); an empty JSON is what
        // the bus refuses to carry.
        scratch.truncate(json_at);
    }
    scratch.extend_from_slice(b"\n\n");
    (Box::from(scratch.as_slice()), json_at)
}

fn type_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::Token { .. } => "token",
        EventKind::Done { .. } => "done",
        EventKind::Error { .. } => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms_match_the_contract() {
        let t = Event::new(1, EventKind::Token { text: "Hel".into() });
        assert_eq!(t.json(), br#"{"type":"token","seq":1,"text":"Hel"}"#);
        assert_eq!(
            t.sse(),
            b"id: 1\nevent: token\ndata: {\"type\":\"token\",\"seq\":1,\"text\":\"Hel\"}\n\n"
        );
        let v: serde_json::Value = serde_json::from_slice(t.ws("abc")).expect("valid JSON");
        assert_eq!(v["stream_id"], "abc");
        assert_eq!(v["seq"], 1);

        let d = Event::new(
            42,
            EventKind::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 9,
                    completion_tokens: 41,
                },
            },
        );
        let v: serde_json::Value = serde_json::from_slice(d.json()).expect("valid JSON");
        assert_eq!(
            v,
            serde_json::json!({"type":"done","seq":42,"finish_reason":"stop",
                "usage":{"prompt_tokens":9,"completion_tokens":41}})
        );
        assert!(d.is_terminal());

        for e in [&t, &d] {
            let back = Event::from_json(e.json()).expect("parses");
            assert_eq!(
                (back.seq, &back.kind, back.json()),
                (e.seq, &e.kind, e.json())
            );
        }
        assert!(Event::from_json(br#"{"type":"nope","seq":1}"#).is_none());

        // The hand-written token JSON is byte for byte what serde_json writes.
        for text in [
            "",
            "a \"quote\" \\ back",
            "line\nbreak\ttab\u{1}\u{7f}",
            "中文 🦀 </script>",
        ] {
            for emitted_at in [None, Some(-3), Some(i64::MAX)] {
                let kind = EventKind::Token { text: text.into() };
                let wire = Wire {
                    kind: &kind,
                    type_name: "token",
                    seq: u64::MAX,
                    emitted_at,
                };
                let want = serde_json::to_vec(&wire).expect("serializes");
                let event = Event::with_emit_time(u64::MAX, kind, emitted_at);
                assert_eq!(event.json(), &want[..], "{text:?}");
                let frame = [
                    &b"id: 18446744073709551615\nevent: token\ndata: "[..],
                    &want,
                    b"\n\n",
                ]
                .concat();
                assert_eq!(event.sse(), &frame[..]);
            }
        }

        let timed = Event::with_emit_time(2, EventKind::Token { text: "x".into() }, Some(7));
        assert_eq!(
            timed.json(),
            br#"{"type":"token","seq":2,"text":"x","emitted_at_unix_nanos":7}"#
        );
    }
}
