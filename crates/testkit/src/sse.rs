//! Server-sent events as a client reads them: an incremental parser (the WHATWG algorithm,
//! minus what the tests do not need), a whole-response reader, and checks on stream events.

use futures::StreamExt as _;
use serde_json::Value;

/// One parsed SSE event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field.
    pub id: Option<String>,
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` lines, joined by newlines.
    pub data: String,
    /// The `retry:` field.
    pub retry: Option<u64>,
}

impl SseEvent {
    /// The data, parsed as JSON (panics when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("data is JSON")
    }
}

/// An incremental SSE parser (the WHATWG algorithm, minus the parts tests don't need).
#[derive(Default)]
pub struct SseParser {
    buf: String,
    current: SseEvent,
    has_field: bool,
    /// Comment lines seen (heartbeats).
    pub comments: usize,
}

impl SseParser {
    /// Feeds bytes (whole UTF-8 chunks); returns completed events.
    pub fn feed(&mut self, chunk: &str) -> Vec<SseEvent> {
        self.buf.push_str(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.find('\n') {
            let line: String = self.buf.drain(..=pos).collect();
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            if line.is_empty() {
                if self.has_field {
                    out.push(std::mem::take(&mut self.current));
                    self.has_field = false;
                }
                continue;
            }
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => self.current.id = Some(value.to_string()),
                "event" => self.current.event = Some(value.to_string()),
                "data" => {
                    if !self.current.data.is_empty() {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                }
                "retry" => {
                    self.current.retry = value.parse().ok();
                }
                _ => {}
            }
            self.has_field = true;
        }
        out
    }
}

/// Reads a whole SSE response into events (stops at the end of the body); also the number of
/// comment lines.
pub async fn read_sse(response: reqwest::Response) -> (Vec<SseEvent>, usize) {
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.expect("body chunk"));
        // Only feed complete UTF-8 prefixes.
        let valid = match std::str::from_utf8(&pending) {
            Ok(_) => pending.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = String::from_utf8(pending.drain(..valid).collect()).expect("utf-8");
        events.extend(parser.feed(&text));
    }
    (events, parser.comments)
}

/// The JSON of the stream events among SSE events (those with an `id:`).
pub fn stream_events(events: &[SseEvent]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.id.is_some())
        .map(|e| e.json())
        .collect()
}

/// The text carried by token events.
pub fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().expect("text"))
        .collect()
}

/// Asserts the seqs are 1..=n (or start..=n) with no gap or duplicate.
pub fn assert_contiguous(events: &[Value], first: u64) {
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs exactly once, in order");
}
