//! Who is calling, and what they may touch.
//!
//! - `--auth none` (the default): every request is the tenant
//!   [`DEFAULT_TENANT`](crate::tenant::DEFAULT_TENANT); nothing is checked and no tickets are
//!   issued.
//! - `--auth api-keys` ([`apikeys`]) or `--auth jwt` ([`jwt`]): every `/v1/…` request carries a
//!   credential (`Authorization: Bearer …`, or the `--auth-cookie` cookie, [`cookies`]) naming a
//!   tenant, or a stream [`ticket`] (`?ticket=` or the cookie) that lets a browser read one
//!   stream, on the routes [`crate::routes`] marks.
//!
//! [`authenticate`] is the middleware: it asks [`Security`] to turn the request's credentials
//! into a [`Caller`](crate::tenant::Caller) (or answers 401/403 itself) and puts it in the
//! request's extensions, where handlers take it as an extractor. What a caller may do with a
//! stream (another tenant's is 404, a ticket only reads) is checked by
//! [`AppState`](crate::state::AppState)'s stream look-ups.
//!
//! | file | what |
//! |---|---|
//! | [`args`] | the options ([`AuthArgs`], [`AuthMode`]) |
//! | [`credentials`] | API keys or JWTs, by mode ([`apikeys`], [`jwt`]) |
//! | [`ticket`] | stream tickets: format, signing, issuing |
//! | [`cookies`] | reading the auth cookie, setting a ticket cookie |
//! | [`security`] | [`Security`]: request → caller, new stream → ticket |
//! | [`middleware`] | [`authenticate`], the `Caller` extractor, [`CredentialExpiry`] |

pub mod apikeys;
pub mod args;
pub mod cookies;
pub mod credentials;
pub mod jwt;
pub mod middleware;
pub mod security;
pub mod ticket;

pub use args::{AuthArgs, AuthMode};
pub use middleware::{CredentialExpiry, authenticate};
pub use security::Security;
pub use ticket::TICKET_HEADER;
