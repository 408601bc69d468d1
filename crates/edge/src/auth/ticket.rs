//! Stream tickets: short-lived, signed permissions to read one stream, for browsers (an
//! `EventSource` or a `WebSocket` cannot send an `Authorization` header).
//!
//! A ticket is `tft1.<stream id>.<expiry, Unix seconds>.<tenant, base64url>.<tag>`, where the
//! tag is HMAC-SHA256 over everything before it, base64url without padding. Every character is
//! URL-safe, so a ticket goes into a query string or a cookie as it is. Replicas that share
//! `--ticket-secret` accept each other's tickets.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::hmac;

use crate::{error::ApiError, ids::StreamId};

/// What every ticket starts with (and how a cookie value is told apart from a credential).
pub(crate) const PREFIX: &str = "tft1.";

/// Response header carrying a new stream's ticket.
pub const TICKET_HEADER: &str = "x-stream-ticket";

/// Longer strings are not even parsed.
const MAX_LEN: usize = 1024;

/// The signing key.
pub struct TicketKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKey(<redacted>)")
    }
}

/// What a valid ticket grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketClaims {
    /// The one stream it may read.
    pub stream: StreamId,
    /// The tenant that owns that stream.
    pub tenant: String,
    /// Unix seconds after which it is refused.
    pub expires_at: u64,
}

/// Why a ticket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketError {
    /// Malformed, or the tag does not match (tampered, or signed with another secret).
    Invalid,
    /// Authentic but past its expiry.
    Expired,
}

impl TicketKey {
    /// A key from a shared secret (every replica must use the same one).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A random key: tickets then only work on this process.
    pub fn random() -> Self {
        let mut secret = [0u8; 32];
        if getrandom::fill(&mut secret).is_err() {
            // As for stream ids: without OS randomness there is no safe key.
            panic!("the operating system's random number generator is unavailable");
        }
        Self::new(&secret)
    }

    /// A ticket for reading `stream` of `tenant` until `expires_at` (Unix seconds).
    pub fn sign(&self, stream: &StreamId, tenant: &str, expires_at: u64) -> String {
        let body = format!(
            "{PREFIX}{stream}.{expires_at}.{}",
            URL_SAFE_NO_PAD.encode(tenant)
        );
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks the tag first (in constant time), then the expiry against `now` (Unix seconds).
    pub fn verify(&self, ticket: &str, now: u64) -> Result<TicketClaims, TicketError> {
        if ticket.len() > MAX_LEN || !ticket.starts_with(PREFIX) {
            return Err(TicketError::Invalid);
        }
        let (body, tag) = ticket.rsplit_once('.').ok_or(TicketError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TicketError::Invalid)?;
        hmac::verify(&self.key, body.as_bytes(), &tag).map_err(|_| TicketError::Invalid)?;
        let mut parts = body[PREFIX.len()..].split('.');
        let (Some(stream), Some(expires_at), Some(tenant), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TicketError::Invalid);
        };
        let stream = StreamId::parse(stream).ok_or(TicketError::Invalid)?;
        let expires_at: u64 = expires_at.parse().map_err(|_| TicketError::Invalid)?;
        let tenant = URL_SAFE_NO_PAD
            .decode(tenant)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(TicketError::Invalid)?;
        if now >= expires_at {
            return Err(TicketError::Expired);
        }
        Ok(TicketClaims {
            stream,
            tenant,
            expires_at,
        })
    }
}

/// The time now, in Unix seconds (what ticket and JWT expiries are written in).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A ticket just issued.
#[derive(Debug, Clone)]
pub(crate) struct IssuedTicket {
    /// The ticket.
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Issues and checks this edge's tickets: the key and how long a ticket lasts.
#[derive(Debug)]
pub(crate) struct Tickets {
    key: TicketKey,
    /// How long a new ticket stays valid.
    pub ttl: Duration,
}

impl Tickets {
    /// Tickets signed with `key`, valid for `ttl`.
    pub(crate) fn new(key: TicketKey, ttl: Duration) -> Self {
        Self { key, ttl }
    }

    /// A ticket for reading stream `id` of `tenant`, from now for the ticket TTL.
    pub(crate) fn issue(&self, id: &StreamId, tenant: &str) -> IssuedTicket {
        let expires_at = unix_now() + self.ttl.as_secs();
        IssuedTicket {
            token: self.key.sign(id, tenant, expires_at),
            expires_at,
        }
    }

    /// What `ticket` grants, or a 401 saying why it is refused.
    pub(crate) fn check(&self, ticket: &str) -> Result<TicketClaims, ApiError> {
        self.key.verify(ticket, unix_now()).map_err(|e| match e {
            TicketError::Invalid => ApiError::InvalidTicket(
                "the stream ticket is malformed or its signature does not match".into(),
            ),
            TicketError::Expired => ApiError::ExpiredTicket,
        })
    }
}

/// 403 for a ticket used beyond its one stream (or to create, stop or mint).
pub(crate) fn out_of_scope() -> ApiError {
    ApiError::TicketScope
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_verifies_until_it_expires_and_not_after_any_change() {
        let key = TicketKey::new(b"0123456789abcdef0123456789abcdef");
        let id = StreamId::random();
        let ticket = key.sign(&id, "acme:prod", 1000);
        assert!(ticket.starts_with(PREFIX));
        assert!(
            ticket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "URL-safe: {ticket}"
        );
        let claims = key.verify(&ticket, 999).expect("valid");
        assert_eq!(
            claims,
            TicketClaims {
                stream: id.clone(),
                tenant: "acme:prod".into(),
                expires_at: 1000
            }
        );
        assert_eq!(key.verify(&ticket, 1000), Err(TicketError::Expired));

        // Another secret, any flipped character, a moved expiry: all invalid.
        let other = TicketKey::new(b"another secret, just as long....");
        assert_eq!(other.verify(&ticket, 0), Err(TicketError::Invalid));
        for i in 0..ticket.len() {
            let mut bytes = ticket.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).expect("ascii");
            if tampered != ticket {
                assert!(key.verify(&tampered, 0).is_err(), "{tampered}");
            }
        }
        let later = ticket.replace(".1000.", ".9999.");
        assert_eq!(key.verify(&later, 0), Err(TicketError::Invalid));
        for junk in ["", "tft1.", "tft1....", "Bearer x", &"tft1.a".repeat(400)] {
            assert_eq!(key.verify(junk, 0), Err(TicketError::Invalid), "{junk}");
        }
    }
}
