//! Tenants and callers: who owns a stream, and who is asking.
//!
//! A leaf module (it imports nothing of the crate) so that every other module may use it: the
//! stream state and the store record a stream's tenant, request validation fills in the
//! default one, and authentication ([`crate::auth`]) turns a request's credentials into a
//! [`Caller`].

use std::sync::Arc;

/// The tenant of every stream when authentication is off (and of streams recorded before
/// tenants existed).
pub(crate) const DEFAULT_TENANT: &str = "default";

/// Checks a tenant name from a key file, a JWT or a ticket: 1 to 256 bytes, no control
/// characters. `Err` says what is wrong with it.
pub fn check_tenant(tenant: &str) -> Result<(), &'static str> {
    if tenant.is_empty() {
        return Err("is empty");
    }
    if tenant.len() > 256 {
        return Err("is longer than 256 bytes");
    }
    if tenant.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    Ok(())
}

/// Who is calling, as the handlers see it (set on every `/v1/…` request by
/// [`crate::auth::authenticate`], taken by handlers as an extractor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A credential of this tenant: it may create streams and use every stream of its own.
    Tenant(Arc<str>),
    /// A ticket: it may read one stream of one tenant (SSE, polls, WebSocket `subscribe`).
    Ticket {
        /// The stream's tenant.
        tenant: Arc<str>,
        /// The id of the one stream it may read.
        stream: Arc<str>,
    },
}

impl Caller {
    /// The tenant whose streams this caller sees.
    pub fn tenant(&self) -> &str {
        match self {
            Self::Tenant(t) | Self::Ticket { tenant: t, .. } => t,
        }
    }

    /// The default tenant (authentication off).
    pub fn anonymous() -> Self {
        Self::Tenant(Arc::from(DEFAULT_TENANT))
    }

    /// Whether this caller may read stream `id` at all (a ticket reads only its own stream).
    pub(crate) fn may_read(&self, id: &str) -> bool {
        match self {
            Self::Tenant(_) => true,
            Self::Ticket { stream, .. } => &**stream == id,
        }
    }
}
