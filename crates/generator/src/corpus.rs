//! The embedded answer corpus, tokenized once with a real BPE (o200k_base), and the choice of
//! an answer from (messages, seed).
//!
//! The corpus (`corpus/answers.md`) is a set of passages: markdown prose, code blocks, Chinese
//! and Japanese paragraphs, emoji. An answer is a seed-chosen sequence of passages joined by a
//! blank line. Each passage is tokenized at start-up, so building an answer per request costs a
//! handful of slice references, and a resume at token `k` is exactly the suffix of a full run.

use std::sync::OnceLock;

use tokenfan_proto::v1::ChatMessage;

use crate::rng::{Fnv1a, SplitMix64};

const CORPUS: &str = include_str!("../corpus/answers.md");
const PASSAGE_SEPARATOR: &str = "\n<!-- passage -->\n";
const JOINER: &str = "\n\n";

/// Fewest and most passages in one answer.
const MIN_PASSAGES: u64 = 2;
const MAX_PASSAGES: u64 = 5;

/// One streamed token: a BPE token (or several, merged so the text ends on a character
/// boundary) and the id of its first BPE token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tok {
    /// Valid UTF-8, never empty.
    pub text: Box<str>,
    /// The BPE id of the first token merged into this one.
    pub id: u32,
}

/// The tokenized corpus, built once per process.
#[derive(Debug)]
pub struct Corpus {
    passages: Vec<Vec<Tok>>,
    joiner: Vec<Tok>,
}

impl Corpus {
    /// The process-wide corpus; the first call loads the BPE and tokenizes every passage.
    pub fn get() -> &'static Corpus {
        static CORPUS_CELL: OnceLock<Corpus> = OnceLock::new();
        CORPUS_CELL.get_or_init(|| Corpus {
            passages: CORPUS
                .split(PASSAGE_SEPARATOR)
                .map(|p| tokenize(p.trim_end_matches('\n')))
                .collect(),
            joiner: tokenize(JOINER),
        })
    }

    /// Number of passages.
    pub fn passages(&self) -> usize {
        self.passages.len()
    }

    /// The answer that (messages, seed) decide.
    pub fn answer(&'static self, messages: &[ChatMessage], seed: u64) -> Answer {
        let mut hash = Fnv1a::default();
        for m in messages {
            hash.write_field(m.role.as_bytes());
            hash.write_field(m.content.as_bytes());
        }
        hash.write(&seed.to_le_bytes());
        let mut rng = SplitMix64::new(hash.finish());

        let count = (MIN_PASSAGES + rng.below(MAX_PASSAGES - MIN_PASSAGES + 1)) as usize;
        // Partial Fisher–Yates: the first `count` slots become a random selection, in random order.
        let mut order: Vec<usize> = (0..self.passages.len()).collect();
        for i in 0..count.min(order.len()) {
            let j = i + rng.below((order.len() - i) as u64) as usize;
            order.swap(i, j);
        }
        let mut segments = Vec::with_capacity(count * 2);
        for (n, &p) in order.iter().take(count).enumerate() {
            if n > 0 {
                segments.push(self.joiner.as_slice());
            }
            segments.push(self.passages[p].as_slice());
        }
        let len = segments.iter().map(|s| s.len() as u32).sum();
        Answer { segments, len }
    }
}

/// One full answer: a sequence of token slices borrowed from the corpus.
#[derive(Debug, Clone)]
pub struct Answer {
    segments: Vec<&'static [Tok]>,
    len: u32,
}

/// The tokens of an answer from some index on.
pub type Tokens = std::iter::Skip<std::iter::Flatten<std::vec::IntoIter<&'static [Tok]>>>;

impl Answer {
    /// Number of tokens in the whole answer.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the answer has no tokens (never true for the embedded corpus).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tokens from index `start` on.
    pub fn into_tokens_from(self, start: u32) -> Tokens {
        self.segments.into_iter().flatten().skip(start as usize)
    }

    /// The whole answer text.
    pub fn text(&self) -> String {
        self.segments
            .iter()
            .flat_map(|s| s.iter())
            .map(|t| &*t.text)
            .collect()
    }
}

/// Counts BPE tokens of a prompt the way chat models bill them: content tokens plus a few
/// framing tokens per message.
pub fn prompt_tokens(messages: &[ChatMessage]) -> u32 {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let content: usize = messages
        .iter()
        .map(|m| bpe.encode_ordinary(&m.content).len() + 3)
        .sum();
    u32::try_from(content + 3).unwrap_or(u32::MAX)
}

/// Tokenizes `text` with o200k_base; a token that ends inside a character is merged with the
/// following ones until the bytes form valid UTF-8.
fn tokenize(text: &str) -> Vec<Tok> {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let ids = bpe.encode_ordinary(text);
    let mut out = Vec::with_capacity(ids.len());
    let mut pending: Vec<u8> = Vec::new();
    let mut first_id = None;
    for (id, bytes) in ids.iter().zip(bpe._decode_native_and_split(ids.clone())) {
        first_id.get_or_insert(*id);
        pending.extend_from_slice(&bytes);
        if let Ok(s) = std::str::from_utf8(&pending) {
            out.push(Tok {
                text: s.into(),
                id: first_id.take().unwrap_or(*id),
            });
            pending.clear();
        }
    }
    debug_assert!(pending.is_empty(), "corpus text is valid UTF-8");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }

    #[test]
    fn every_token_is_non_empty_utf8_and_the_corpus_round_trips() {
        let corpus = Corpus::get();
        assert!(corpus.passages() >= 15);
        let rebuilt: Vec<String> = corpus
            .passages
            .iter()
            .map(|p| p.iter().map(|t| &*t.text).collect())
            .collect();
        let original: Vec<&str> = CORPUS
            .split(PASSAGE_SEPARATOR)
            .map(|p| p.trim_end_matches('\n'))
            .collect();
        assert_eq!(rebuilt, original);
        assert!(corpus.passages.iter().flatten().all(|t| !t.text.is_empty()));
    }

    #[test]
    fn multibyte_tokens_are_merged_to_char_boundaries() {
        let toks = tokenize("流式输出 👩‍💻🇯🇵👍🏽");
        let text: String = toks.iter().map(|t| &*t.text).collect();
        assert_eq!(text, "流式输出 👩‍💻🇯🇵👍🏽");
        // Raw BPE splits some of these characters across tokens; merging leaves fewer tokens.
        let raw = tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(&text)
            .len();
        assert!(toks.len() <= raw);
    }

    #[test]
    fn answers_are_deterministic_and_seed_dependent() {
        let corpus = Corpus::get();
        let a = corpus.answer(&[msg("hi")], 1);
        let b = corpus.answer(&[msg("hi")], 1);
        let c = corpus.answer(&[msg("hi")], 2);
        let d = corpus.answer(&[msg("hello")], 1);
        assert_eq!(a.text(), b.text());
        assert_ne!(a.text(), c.text());
        assert_ne!(a.text(), d.text());
        assert_eq!(a.len() as usize, a.clone().into_tokens_from(0).count());
    }

    #[test]
    fn suffix_from_any_index_matches_the_full_run() {
        let answer = Corpus::get().answer(&[msg("resume")], 9);
        let full: Vec<&Tok> = answer.clone().into_tokens_from(0).collect();
        for k in [0, 1, 7, full.len() as u32 - 1, full.len() as u32] {
            let suffix: Vec<&Tok> = answer.clone().into_tokens_from(k).collect();
            assert_eq!(suffix, full[k as usize..]);
        }
    }
}
