//! Wire formats as the load generator reads them: the native event JSON (every transport),
//! WebSocket control messages, poll answers, OpenAI chunks, and an incremental SSE parser.
//! Only the documented fields are read, and unknown ones are ignored, so any server speaking
//! the native wire format can be measured.

use std::borrow::Cow;

use serde::Deserialize;

/// A native event, or a WebSocket message (`started`, `pong`, protocol `error`).
#[derive(Debug, Deserialize)]
pub struct Ev<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    pub seq: Option<u64>,
    #[serde(borrow)]
    pub text: Option<Cow<'a, str>>,
    pub emitted_at_unix_nanos: Option<i64>,
    #[serde(borrow)]
    pub finish_reason: Option<Cow<'a, str>>,
    pub usage: Option<Usage>,
    #[serde(borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub message: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub stream_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub request_id: Option<Cow<'a, str>>,
    /// `pong`'s echo of the ping's id.
    pub id: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Usage {
    pub completion_tokens: u64,
}

/// Long-poll and short-poll answer.
#[derive(Debug, Deserialize)]
pub struct PollAnswer<'a> {
    #[serde(borrow)]
    pub status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub events: Vec<Ev<'a>>,
    pub next_after: Option<u64>,
}

/// An OpenAI `chat.completion.chunk` (or a `{"error":…}` frame).
#[derive(Debug, Deserialize)]
pub struct Chunk<'a> {
    #[serde(borrow, default)]
    pub choices: Vec<Choice<'a>>,
    pub usage: Option<Usage>,
    #[serde(borrow)]
    pub error: Option<ChunkError<'a>>,
    /// tokenfan extension on token chunks of requests with `"emit_times": true`.
    pub emitted_at_unix_nanos: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct Choice<'a> {
    #[serde(borrow)]
    pub delta: Option<Delta<'a>>,
    #[serde(borrow)]
    pub finish_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct Delta<'a> {
    #[serde(borrow)]
    pub role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub content: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct ChunkError<'a> {
    #[serde(borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub message: Option<Cow<'a, str>>,
}

/// The fields of a native token event read by a byte scan instead of a JSON parser: the hot
/// path of the SSE readers, where one reader process may handle hundreds of thousands of
/// events a second. It reads only the compact form every server of these benchmarks writes
/// (`"type":"token"`, `"seq":N`, `"text":"…"`, `"emitted_at_unix_nanos":N`, no space around
/// the colon, in any order) and gives up — the caller then parses the event as JSON — on
/// anything else: another type, a missing or non-integer seq, a text with escapes (so the text
/// checked is always the decoded one). A key cannot be matched inside a string value: a quote
/// there is always escaped.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenScan<'a> {
    pub seq: u64,
    pub text: Option<&'a str>,
    pub emitted_at: Option<i64>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The integer right after `key`, which must end at `,` or `}`; None when the key is absent,
/// Some(None) when its value is not such an integer.
fn integer_after(data: &[u8], key: &[u8]) -> Option<Option<i64>> {
    let at = find(data, key)? + key.len();
    let rest = &data[at..];
    let sign = usize::from(rest.first() == Some(&b'-'));
    let digits = rest[sign..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || !matches!(rest.get(sign + digits), Some(b',' | b'}')) {
        return Some(None);
    }
    Some(
        std::str::from_utf8(&rest[..sign + digits])
            .ok()
            .and_then(|n| n.parse().ok()),
    )
}

impl<'a> TokenScan<'a> {
    pub fn of(data: &'a [u8]) -> Option<Self> {
        if data.first() != Some(&b'{') || data.last() != Some(&b'}') {
            return None;
        }
        find(data, br#""type":"token""#)?;
        let seq = u64::try_from(integer_after(data, br#""seq":"#)??).ok()?;
        let emitted_at = match integer_after(data, br#""emitted_at_unix_nanos":"#) {
            None => None,
            Some(v) => Some(v?),
        };
        const TEXT: &[u8] = br#""text":""#;
        let text = match find(data, TEXT) {
            None => None,
            Some(i) => {
                let rest = &data[i + TEXT.len()..];
                let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
                if rest[end] == b'\\' {
                    return None;
                }
                Some(std::str::from_utf8(&rest[..end]).ok()?)
            }
        };
        Some(TokenScan {
            seq,
            text,
            emitted_at,
        })
    }
}

/// One SSE event as dispatched by the parser.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub id: Option<&'a [u8]>,
    pub event: Option<&'a [u8]>,
    pub data: &'a [u8],
}

impl Frame<'_> {
    /// The `id:` as a seq, when it is one.
    pub fn id_seq(&self) -> Option<u64> {
        std::str::from_utf8(self.id?).ok()?.trim().parse().ok()
    }
}

/// Incremental SSE parser (the parts of the WHATWG algorithm a client of a stream needs):
/// `id`, `event`, `data` (multi-line joined with `\n`), comments and `retry:` skipped, `\n` or
/// `\r\n` line ends.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of an incomplete line.
    partial: Vec<u8>,
    id: Option<Vec<u8>>,
    event: Option<Vec<u8>>,
    data: Vec<u8>,
    has_data: bool,
}

/// A line grew past the longest accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

/// Longest line accepted (a guard against a server that never ends a line).
const MAX_LINE: usize = 4 << 20;

impl SseParser {
    /// Feeds bytes; calls `on_frame` for every complete event. Errors when a line grows past
    /// 4 MiB.
    pub fn push(
        &mut self,
        bytes: &[u8],
        mut on_frame: impl FnMut(Frame<'_>),
    ) -> Result<(), LineTooLong> {
        let mut rest = bytes;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(pos);
            rest = &tail[1..];
            if self.partial.is_empty() {
                self.line(line, &mut on_frame);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole, &mut on_frame);
                whole.clear();
                self.partial = whole;
            }
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            return Err(LineTooLong);
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8], on_frame: &mut impl FnMut(Frame<'_>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_data {
                on_frame(Frame {
                    id: self.id.as_deref(),
                    event: self.event.as_deref(),
                    data: &self.data,
                });
            }
            // `id` persists across events in the WHATWG algorithm, but every stream event of
            // these servers carries its own; a frame without one must not inherit the last.
            self.id = None;
            self.event = None;
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"id" => self.id = Some(value.to_vec()),
            b"event" => self.event = Some(value.to_vec()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<(Option<String>, Option<String>, String)> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, |f| {
                out.push((
                    f.id.map(|b| String::from_utf8_lossy(b).into_owned()),
                    f.event.map(|b| String::from_utf8_lossy(b).into_owned()),
                    String::from_utf8_lossy(f.data).into_owned(),
                ))
            })
            .expect("lines are short");
        }
        out
    }

    #[test]
    fn parses_split_frames_comments_and_crlf() {
        let got = frames(&[
            b"retry: 1000\n\nid: 1\nevent: tok",
            b"en\ndata: {\"a\":1}\n\n: heartbeat\n\n",
            b"id: 2\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n",
        ]);
        assert_eq!(
            got,
            vec![
                (Some("1".into()), Some("token".into()), "{\"a\":1}".into()),
                (Some("2".into()), None, "x\ny".into()),
                (None, None, "[DONE]".into()),
            ]
        );
    }

    #[test]
    fn token_scan_reads_the_compact_form_and_gives_up_on_the_rest() {
        fn scan(s: &str) -> Option<TokenScan<'_>> {
            TokenScan::of(s.as_bytes())
        }
        assert_eq!(
            scan(r#"{"type":"token","seq":3,"text":" 流 ✨","emitted_at_unix_nanos":5}"#),
            Some(TokenScan {
                seq: 3,
                text: Some(" 流 ✨"),
                emitted_at: Some(5)
            })
        );
        // Any key order; no emit time; no text (the checker counts it missing).
        assert_eq!(
            scan(r#"{"seq":7,"text":"a","type":"token"}"#),
            Some(TokenScan {
                seq: 7,
                text: Some("a"),
                emitted_at: None
            })
        );
        assert_eq!(
            scan(r#"{"type":"token","seq":1}"#).map(|t| t.text),
            Some(None)
        );
        // Left to the JSON parser.
        for other in [
            r#"{"type":"done","seq":4,"finish_reason":"stop","usage":{"completion_tokens":3}}"#,
            r#"{"type":"token","text":"a"}"#,
            r#"{"type":"token","seq":null,"text":"a"}"#,
            r#"{"type":"token","seq":-1,"text":"a"}"#,
            r#"{"type":"token","seq":1.5,"text":"a"}"#,
            r#"{"type":"token","seq":1,"text":"a\"b"}"#,
            r#"{"type":"token","seq":1,"text":"a","emitted_at_unix_nanos":"x"}"#,
            r#"{"type" : "token","seq":1,"text":"a"}"#,
            r#"{"type":"token","seq":1,"text":"a"#,
            r#"{"type":"error","seq":1,"text":"\"type\":\"token\""}"#,
        ] {
            assert_eq!(scan(other), None, "{other}");
        }
    }

    #[test]
    fn native_event_json() {
        let ev: Ev<'_> = serde_json::from_str(
            r#"{"type":"token","seq":3,"text":"a\"b","emitted_at_unix_nanos":5,"extra":1}"#,
        )
        .expect("parses");
        assert_eq!(ev.kind.as_deref(), Some("token"));
        assert_eq!(ev.text.as_deref(), Some("a\"b"));
        assert_eq!(ev.emitted_at_unix_nanos, Some(5));
    }
}
