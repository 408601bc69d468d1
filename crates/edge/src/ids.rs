//! Stream ids: 128 random bits, URL-safe base64 without padding (22 characters).

use std::{fmt, sync::Arc};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

/// A stream id; cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

impl StreamId {
    /// A fresh unguessable id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            // No OS randomness means no safe ids: refuse to run rather than mint guessable ones.
            panic!("the operating system's random number generator is unavailable");
        }
        Self(URL_SAFE_NO_PAD.encode(bytes).into())
    }

    /// Parses a client-supplied id; anything that is not 22 URL-safe base64 characters is
    /// `None` (and answered like an unknown id).
    pub fn parse(s: &str) -> Option<Self> {
        let ok = s.len() == 22
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && URL_SAFE_NO_PAD.decode(s).is_ok_and(|b| b.len() == 16);
        ok.then(|| Self(s.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_parse_and_garbage_does_not() {
        let id = StreamId::random();
        assert_eq!(id.as_str().len(), 22);
        assert_eq!(StreamId::parse(id.as_str()), Some(id.clone()));
        assert_ne!(StreamId::random(), id);
        for bad in [
            "",
            "short",
            "../../etc/passwd",
            "ééééééééééééééééééééé",
            &"A".repeat(23),
        ] {
            assert!(StreamId::parse(bad).is_none(), "{bad}");
        }
    }
}
