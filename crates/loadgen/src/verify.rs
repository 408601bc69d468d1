//! Verification of one reader of one stream, independent of the transport: every seq exactly
//! once and in order, one terminal event one past the last token, `usage.completion_tokens`
//! equal to the tokens received, and a hash of the text so viewers of a stream can be compared.
//!
//! Lost, duplicated and out-of-order seqs are told apart: a seq that skips ahead marks the
//! skipped ones missing; a missing one that arrives later is out of order; one that arrives
//! again is duplicated; those still missing at the end are lost.

use std::collections::BTreeSet;

/// A kind of verification failure. Every benchmark figure must come with 0 of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    /// A seq never received (counted per seq).
    Lost,
    /// A seq received twice (counted per extra copy).
    Duplicated,
    /// A seq received after a later one (counted per seq).
    OutOfOrder,
    /// A stream event without `seq`, or with seq 0.
    MissingSeq,
    /// A token event without `text`.
    MissingText,
    /// A token event without `emitted_at_unix_nanos` although emit times were asked for.
    MissingEmittedAt,
    /// Anything after the terminal event.
    EventAfterTerminal,
    /// The stream ended without a terminal event.
    NoTerminal,
    /// The terminal event's seq is not one past the last token's.
    TerminalSeqMismatch,
    /// `usage.completion_tokens` differs from the tokens received (or is absent).
    UsageMismatch,
    /// A `stop`/`length` stream without a single token.
    NoTokens,
    /// An event that is not the expected JSON.
    UnparseableEvent,
    /// An event whose `type` is unknown.
    UnknownEventType,
    /// A viewer of a stream received a different text than the other viewers.
    ViewerTextMismatch,
    /// An OpenAI stream that finished without `data: [DONE]`.
    MissingDone,
    /// A poll answer whose `next_after` is not the seq of its last event (or moved back).
    PollCursorMismatch,
}

impl Violation {
    /// Every kind, in report order.
    pub const ALL: [Violation; 16] = [
        Violation::Lost,
        Violation::Duplicated,
        Violation::OutOfOrder,
        Violation::MissingSeq,
        Violation::MissingText,
        Violation::MissingEmittedAt,
        Violation::EventAfterTerminal,
        Violation::NoTerminal,
        Violation::TerminalSeqMismatch,
        Violation::UsageMismatch,
        Violation::NoTokens,
        Violation::UnparseableEvent,
        Violation::UnknownEventType,
        Violation::ViewerTextMismatch,
        Violation::MissingDone,
        Violation::PollCursorMismatch,
    ];

    /// The stable tag used in reports and JSON.
    pub fn tag(self) -> &'static str {
        match self {
            Violation::Lost => "lost",
            Violation::Duplicated => "duplicated",
            Violation::OutOfOrder => "out_of_order",
            Violation::MissingSeq => "missing_seq",
            Violation::MissingText => "missing_text",
            Violation::MissingEmittedAt => "missing_emitted_at",
            Violation::EventAfterTerminal => "event_after_terminal",
            Violation::NoTerminal => "no_terminal",
            Violation::TerminalSeqMismatch => "terminal_seq_mismatch",
            Violation::UsageMismatch => "usage_mismatch",
            Violation::NoTokens => "no_tokens",
            Violation::UnparseableEvent => "unparseable_event",
            Violation::UnknownEventType => "unknown_event_type",
            Violation::ViewerTextMismatch => "viewer_text_mismatch",
            Violation::MissingDone => "missing_done",
            Violation::PollCursorMismatch => "poll_cursor_mismatch",
        }
    }

    fn index(self) -> usize {
        Violation::ALL
            .iter()
            .position(|v| *v == self)
            .unwrap_or_default()
    }
}

/// What the checker expects of the stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// A forward seq jump is a coalesced event (its text carries the skipped tokens), not a loss.
    pub allow_coalescing: bool,
    /// Token events must carry `emitted_at_unix_nanos`.
    pub require_emit_times: bool,
}

/// How the stream ended, as far as its terminal event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminal {
    /// `done` with this finish reason.
    Done(String),
    /// `error` with this code.
    Error(String),
}

/// Seqs remembered as missing at most (a wildly wrong seq must not eat memory); beyond it
/// they are counted lost at once.
const MISSING_CAP: usize = 65_536;

/// FNV-1a, 64 bits: a stable hash of the text, to compare viewers.
#[derive(Debug, Clone, Copy)]
pub struct TextHash(u64);

impl Default for TextHash {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl TextHash {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn value(self) -> u64 {
        self.0
    }
}

/// The verification state of one reader of one stream.
#[derive(Debug)]
pub struct Checker {
    opts: CheckOptions,
    /// The seq the next token must have.
    expected: u64,
    /// Distinct token seqs received (a coalesced event counts every seq it covers).
    tokens: u64,
    missing: BTreeSet<u64>,
    terminal: Option<Terminal>,
    counts: [u64; Violation::ALL.len()],
    details: Vec<String>,
    hash: TextHash,
    text_bytes: u64,
    coalesced_events: u64,
}

/// Details kept per reader (the first few, for examples in the report).
const DETAILS: usize = 3;

impl Checker {
    pub fn new(opts: CheckOptions) -> Self {
        Self {
            opts,
            expected: 1,
            tokens: 0,
            missing: BTreeSet::new(),
            terminal: None,
            counts: [0; Violation::ALL.len()],
            details: Vec::new(),
            hash: TextHash::default(),
            text_bytes: 0,
            coalesced_events: 0,
        }
    }

    /// Counts `n` of `kind`, keeping the detail of the first few.
    pub fn violation(&mut self, kind: Violation, n: u64, detail: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        self.counts[kind.index()] += n;
        if self.details.len() < DETAILS {
            self.details.push(format!("{}: {}", kind.tag(), detail()));
        }
    }

    /// The seq the next token should have (and the terminal event, if it came now).
    pub fn next_seq(&self) -> u64 {
        self.expected
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn terminal(&self) -> Option<&Terminal> {
        self.terminal.as_ref()
    }

    pub fn hash(&self) -> u64 {
        self.hash.value()
    }

    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    pub fn coalesced_events(&self) -> u64 {
        self.coalesced_events
    }

    /// One token event. Returns the new tokens it brought (0 when it was rejected: after the
    /// terminal event, without seq, or a duplicate).
    pub fn token(&mut self, seq: Option<u64>, text: Option<&str>, emitted_at: Option<i64>) -> u64 {
        if self.terminal.is_some() {
            self.violation(Violation::EventAfterTerminal, 1, || {
                format!("token seq {seq:?} after the terminal event")
            });
            return 0;
        }
        let Some(seq) = seq.filter(|s| *s > 0) else {
            self.violation(Violation::MissingSeq, 1, || format!("token seq {seq:?}"));
            return 0;
        };
        if text.is_none() {
            self.violation(Violation::MissingText, 1, || format!("token seq {seq}"));
        }
        if emitted_at.is_none() && self.opts.require_emit_times {
            self.violation(Violation::MissingEmittedAt, 1, || {
                format!("token seq {seq}")
            });
        }
        let text = text.unwrap_or_default();
        if seq < self.expected {
            if self.missing.remove(&seq) {
                let expected = self.expected;
                self.violation(Violation::OutOfOrder, 1, || {
                    format!("seq {seq} arrived after seq {}", expected - 1)
                });
                self.tokens += 1;
                self.absorb(text);
                return 1;
            }
            let expected = self.expected;
            self.violation(Violation::Duplicated, 1, || {
                format!("seq {seq} again (next expected {expected})")
            });
            return 0;
        }
        let advance = if seq > self.expected {
            if self.opts.allow_coalescing {
                self.coalesced_events += 1;
                seq + 1 - self.expected
            } else {
                self.mark_missing(self.expected, seq);
                1
            }
        } else {
            1
        };
        self.expected = seq + 1;
        self.tokens += advance;
        self.absorb(text);
        advance
    }

    fn absorb(&mut self, text: &str) {
        self.hash.update(text.as_bytes());
        self.text_bytes += text.len() as u64;
    }

    /// Marks `from..to` missing.
    fn mark_missing(&mut self, from: u64, to: u64) {
        for s in from..to {
            if self.missing.len() >= MISSING_CAP {
                let left = to - s;
                self.violation(Violation::Lost, left, || {
                    format!("{left} seqs from {s} (too many to track)")
                });
                return;
            }
            self.missing.insert(s);
        }
    }

    fn terminal_seq(&mut self, seq: Option<u64>, what: &str) -> bool {
        if self.terminal.is_some() {
            self.violation(Violation::EventAfterTerminal, 1, || {
                format!("a second terminal event ({what})")
            });
            return false;
        }
        match seq.filter(|s| *s > 0) {
            None => self.violation(Violation::MissingSeq, 1, || format!("{what} seq {seq:?}")),
            Some(s) if s == self.expected => {}
            Some(s) if s > self.expected => {
                // The tokens before it never came.
                self.mark_missing(self.expected, s);
                self.expected = s;
            }
            Some(s) => {
                let last = self.expected - 1;
                self.violation(Violation::TerminalSeqMismatch, 1, || {
                    format!("{what} seq {s}, last token seq {last}")
                });
            }
        }
        true
    }

    /// The `done` event.
    pub fn done(&mut self, seq: Option<u64>, finish_reason: &str, completion_tokens: Option<u64>) {
        if !self.terminal_seq(seq, "done") {
            return;
        }
        self.terminal = Some(Terminal::Done(finish_reason.to_owned()));
        let tokens = self.tokens + self.missing.len() as u64;
        // Lost tokens are counted as lost; the usage must match what the stream had.
        if completion_tokens != Some(tokens) {
            let received = self.tokens;
            self.violation(Violation::UsageMismatch, 1, || {
                format!("usage.completion_tokens {completion_tokens:?}, tokens received {received}")
            });
        }
        if self.tokens == 0 && matches!(finish_reason, "stop" | "length") {
            self.violation(Violation::NoTokens, 1, || format!("finish {finish_reason}"));
        }
    }

    /// The terminal `error` event.
    pub fn error(&mut self, seq: Option<u64>, code: &str) {
        if !self.terminal_seq(seq, "error") {
            return;
        }
        self.terminal = Some(Terminal::Error(code.to_owned()));
    }

    /// The reader's transport ended: counts what is still missing as lost, and a missing
    /// terminal event.
    pub fn finish(&mut self) {
        let lost = self.missing.len() as u64;
        if lost > 0 {
            let first = self.missing.iter().next().copied().unwrap_or_default();
            self.violation(Violation::Lost, lost, || {
                format!("{lost} seqs never received, the first {first}")
            });
            self.missing.clear();
        }
        if self.terminal.is_none() {
            let tokens = self.tokens;
            self.violation(Violation::NoTerminal, 1, || {
                format!("{tokens} tokens received")
            });
        }
    }

    /// Violations counted so far, by kind (zeros left out).
    pub fn counts(&self) -> impl Iterator<Item = (Violation, u64)> + '_ {
        Violation::ALL
            .iter()
            .zip(self.counts.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(v, n)| (*v, *n))
    }

    pub fn count(&self, kind: Violation) -> u64 {
        self.counts[kind.index()]
    }

    pub fn violations(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn details(&self) -> &[String] {
        &self.details
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> Checker {
        Checker::new(CheckOptions {
            allow_coalescing: false,
            require_emit_times: true,
        })
    }

    #[test]
    fn a_clean_stream_has_no_violation() {
        let mut c = strict();
        for s in 1..=5 {
            assert_eq!(c.token(Some(s), Some("x"), Some(1)), 1);
        }
        c.done(Some(6), "length", Some(5));
        c.finish();
        assert_eq!(c.violations(), 0, "{:?}", c.details());
        assert_eq!(c.tokens(), 5);
        assert_eq!(c.terminal(), Some(&Terminal::Done("length".into())));
    }

    #[test]
    fn counts_a_duplicated_a_lost_and_an_out_of_order_seq() {
        let mut c = strict();
        c.token(Some(1), Some("a"), Some(1));
        c.token(Some(2), Some("b"), Some(1));
        assert_eq!(
            c.token(Some(2), Some("b"), Some(1)),
            0,
            "a duplicate adds nothing"
        );
        c.token(Some(4), Some("d"), Some(1)); // 3 missing for now
        assert_eq!(c.token(Some(3), Some("c"), Some(1)), 1, "3 arrives late");
        c.token(Some(6), Some("f"), Some(1)); // 5 never comes
        c.token(Some(7), Some("g"), Some(1));
        c.done(Some(8), "length", Some(7));
        c.finish();
        assert_eq!(c.count(Violation::Duplicated), 1);
        assert_eq!(c.count(Violation::OutOfOrder), 1);
        assert_eq!(c.count(Violation::Lost), 1);
        assert_eq!(
            c.count(Violation::UsageMismatch),
            0,
            "usage counts the lost one"
        );
        assert_eq!(c.violations(), 3, "{:?}", c.details());
        assert_eq!(c.tokens(), 6);
    }

    #[test]
    fn a_gap_before_the_terminal_event_is_lost() {
        let mut c = strict();
        c.token(Some(1), Some("a"), Some(1));
        c.done(Some(4), "length", Some(3));
        c.finish();
        assert_eq!(c.count(Violation::Lost), 2);
        assert_eq!(c.count(Violation::TerminalSeqMismatch), 0);
    }

    #[test]
    fn coalescing_when_allowed() {
        let mut c = Checker::new(CheckOptions {
            allow_coalescing: true,
            require_emit_times: false,
        });
        c.token(Some(1), Some("a"), None);
        assert_eq!(c.token(Some(4), Some("bcd"), None), 3);
        c.done(Some(5), "stop", Some(4));
        c.finish();
        assert_eq!(c.violations(), 0, "{:?}", c.details());
        assert_eq!(c.coalesced_events(), 1);
    }

    #[test]
    fn terminal_and_usage_rules() {
        let mut c = strict();
        c.token(Some(1), Some("a"), None);
        c.done(Some(1), "stop", Some(2));
        c.token(Some(2), Some("b"), Some(1));
        c.done(Some(3), "stop", Some(2));
        c.finish();
        assert_eq!(c.count(Violation::MissingEmittedAt), 1);
        assert_eq!(c.count(Violation::TerminalSeqMismatch), 1);
        assert_eq!(c.count(Violation::UsageMismatch), 1);
        assert_eq!(c.count(Violation::EventAfterTerminal), 2);

        let mut c = strict();
        c.token(Some(1), Some("a"), Some(1));
        c.finish();
        assert_eq!(c.count(Violation::NoTerminal), 1);
    }

    #[test]
    fn the_hash_follows_the_text() {
        let mut a = strict();
        let mut b = strict();
        a.token(Some(1), Some("he"), Some(1));
        a.token(Some(2), Some("llo"), Some(1));
        b.token(Some(1), Some("hel"), Some(1));
        b.token(Some(2), Some("lo"), Some(1));
        assert_eq!(
            a.hash(),
            b.hash(),
            "the hash is of the text, not of the events"
        );
        b.token(Some(3), Some("!"), Some(1));
        assert_ne!(a.hash(), b.hash());
    }
}
