//! Every NATS subject the edge uses, in one place. Versioned (`tokenfan.v1`) so a future
//! incompatible message format can run beside this one during a rolling upgrade.
//!
//! | subject | payload |
//! |---|---|
//! | `tokenfan.v1.stream.<stream_id>.events` | one batch of a stream's events: their native JSON joined with `\n`; headers `tokenfan-first-seq`, `tokenfan-last-seq`, `traceparent` (optional) |
//! | `tokenfan.v1.control.cancel` | a stream id (UTF-8) whose owner should cancel it |
//! | `tokenfan.v1.control.touch` | a stream id (UTF-8) with subscribers on another replica (the owner restarts its detach grace) |

use super::BusError;
use crate::ids::StreamId;

/// Cancel requests for any stream; the payload is the stream id.
pub const CANCEL: &str = "tokenfan.v1.control.cancel";

/// "Subscribers of this stream are attached elsewhere" (restarts the owner's detach grace);
/// the payload is the stream id.
pub(crate) const TOUCH: &str = "tokenfan.v1.control.touch";

/// Header: the seq of the first event in the batch.
pub const HEADER_FIRST_SEQ: &str = "tokenfan-first-seq";
/// Header: the seq of the last event in the batch.
pub const HEADER_LAST_SEQ: &str = "tokenfan-last-seq";
/// Header: the W3C trace context of the stream's span.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// Whether `token` can stand as one NATS subject token: not empty, and no `.` (separator),
/// `*` / `>` (wildcards), whitespace or control characters.
pub(crate) fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && !token
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
}

/// `tokenfan.v1.stream.<id>.events`. Ids from [`StreamId`] are URL-safe base64 and always
/// valid; anything else is refused rather than turned into a wildcard or another subject.
pub fn stream_events(id: &StreamId) -> Result<String, BusError> {
    let token = id.as_str();
    if !is_valid_token(token) {
        debug_assert!(
            false,
            "stream id {token:?} is not a valid NATS subject token"
        );
        return Err(BusError(format!(
            "stream id {token:?} cannot be used in a NATS subject"
        )));
    }
    Ok(format!("tokenfan.v1.stream.{token}.events"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_built_from_valid_tokens_only() {
        let id = StreamId::random();
        assert_eq!(
            stream_events(&id).expect("valid"),
            format!("tokenfan.v1.stream.{id}.events")
        );
        assert!(is_valid_token("AZaz09-_AZaz09-_AZaz09"));
        for bad in ["", "a.b", "a*", ">", "a b", "a\tb", "a\nb", "a\0b"] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
        assert!(CANCEL.split('.').all(is_valid_token));
        assert!(TOUCH.split('.').all(is_valid_token));
    }
}
