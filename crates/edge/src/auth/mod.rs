//! Who is calling, and what they may touch.
//!
//! - `--auth none` (the default): every request is the tenant [`DEFAULT_TENANT`]; nothing is
//!   checked and no tickets are issued.
//! - `--auth api-keys` ([`apikeys`]) or `--auth jwt` ([`jwt`]): every `/v1/…` request carries a
//!   credential (`Authorization: Bearer …`, or the `--auth-cookie` cookie) naming a tenant, or
//!   a stream [`ticket`] (`?ticket=` or the cookie) that lets a browser read one stream.
//!
//! [`authenticate`] is the middleware: it turns the request's credentials into a [`Caller`]
//! (or answers 401/403 itself) and puts it in the request's extensions, where handlers take
//! it as an extractor. A stream belongs to the tenant that created it: [`stream_for`] answers
//! every other tenant exactly as if the stream did not exist (404), and [`create_stream`]
//! records the caller's tenant and applies its limits ([`crate::limits`]).

pub mod apikeys;
pub mod jwt;
pub mod ticket;

use std::{
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{FromRequestParts, Request, State},
    http::{HeaderMap, HeaderValue, Method, Uri, header, request::Parts},
    middleware::Next,
    response::Response,
};

use self::{
    apikeys::ApiKeys,
    jwt::JwtAuth,
    ticket::{TicketError, TicketKey},
};
use crate::{
    app::AppState,
    config::EdgeConfig,
    error::{ApiError, ErrorFormat},
    ids::StreamId,
    limits::Limiter,
    request::StreamSpec,
    stream::StreamState,
};

/// The tenant of every stream when authentication is off.
pub const DEFAULT_TENANT: &str = "default";

/// Response header carrying a new stream's ticket.
pub const TICKET_HEADER: &str = "x-stream-ticket";

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// No authentication: one implicit tenant, every stream readable by anyone with its id.
    None,
    /// `Authorization: Bearer <key>`; each key maps to a tenant.
    ApiKeys,
    /// `Authorization: Bearer <JWT>` (HS256 or RS256); a claim names the tenant.
    Jwt,
}

/// A secret from the command line or the environment; `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Authentication options (flattened into [`EdgeConfig`]).
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// How clients authenticate: `none` (anyone may use every stream; one implicit tenant),
    /// `api-keys` (`Authorization: Bearer <key>`, each key maps to a tenant) or `jwt`
    /// (`Authorization: Bearer <JWT>`, HS256 or RS256, a claim names the tenant). With auth on,
    /// every `/v1/…` request needs a credential or a stream ticket.
    #[arg(long = "auth", env = "TOKENFAN_EDGE_AUTH", value_enum, default_value_t = AuthMode::None)]
    pub mode: AuthMode,

    /// File of API keys for `--auth api-keys`: one `KEY TENANT` pair per line (separated by
    /// spaces or tabs); blank lines and lines starting with `#` are ignored.
    #[arg(long, env = "TOKENFAN_EDGE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// API keys for `--auth api-keys`, comma-separated `KEY:TENANT` pairs (prefer the
    /// environment variable or the file: flags show in the process list).
    #[arg(
        long,
        env = "TOKENFAN_EDGE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// `--auth jwt`: accept HS256 tokens signed with this shared secret (at least 32 bytes).
    #[arg(long, env = "TOKENFAN_EDGE_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<Secret>,

    /// `--auth jwt`: accept RS256 tokens signed by this RSA public key (PEM file, `PUBLIC KEY`
    /// or `RSA PUBLIC KEY`).
    #[arg(long, env = "TOKENFAN_EDGE_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,

    /// `--auth jwt`: accept RS256 tokens signed by a key of this JWKS file (`{"keys":[…]}`;
    /// the token's `kid` picks the key). Read once at start.
    #[arg(long, env = "TOKENFAN_EDGE_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// `--auth jwt`: required audience(s), comma-separated; a token's `aud` must name one.
    /// Empty: `aud` is not checked.
    #[arg(long, env = "TOKENFAN_EDGE_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    /// `--auth jwt`: required issuer (`iss`). Absent: `iss` is not checked.
    #[arg(long, env = "TOKENFAN_EDGE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// `--auth jwt` with RS256 (`--jwt-rs256-public-key`, `--jwt-jwks-file`): accept tokens
    /// whatever their `aud` and `iss`. UNSAFE with a shared identity provider: every token it
    /// issues, for any application, then names a tenant here. Without this flag RS256 needs
    /// both `--jwt-audience` and `--jwt-issuer`.
    #[arg(long, env = "TOKENFAN_EDGE_JWT_ALLOW_ANY_AUDIENCE")]
    pub jwt_allow_any_audience: bool,

    /// `--auth jwt`: the string claim naming the tenant (falls back to `sub`).
    #[arg(long, env = "TOKENFAN_EDGE_JWT_TENANT_CLAIM", default_value = "tenant")]
    pub jwt_tenant_claim: String,

    /// `--auth jwt`: clock skew tolerated on `exp` and `nbf`, in seconds.
    #[arg(long, env = "TOKENFAN_EDGE_JWT_LEEWAY_SECS", default_value_t = 30)]
    pub jwt_leeway_secs: u64,

    /// Secret that signs stream tickets (HMAC-SHA256, at least 32 bytes). Every replica of a
    /// cluster must share it. Absent: a random one, so tickets only work on this replica.
    #[arg(long, env = "TOKENFAN_EDGE_TICKET_SECRET", hide_env_values = true)]
    pub ticket_secret: Option<Secret>,

    /// Seconds a stream ticket stays valid after it is issued.
    #[arg(long, env = "TOKENFAN_EDGE_TICKET_TTL_SECS", default_value_t = 300)]
    pub ticket_ttl_secs: u64,

    /// Cookie the edge also reads a credential or a stream ticket from; with auth on, creating
    /// a stream sets it (the stream's ticket; HttpOnly, SameSite=Strict, Path=/v1/streams/<id>,
    /// Secure under TLS). Absent: no cookie is read or set.
    #[arg(long, env = "TOKENFAN_EDGE_AUTH_COOKIE")]
    pub auth_cookie: Option<String>,
}

impl AuthArgs {
    /// Checks the options fit together (files are read later, at start).
    pub fn validate(&self) -> anyhow::Result<()> {
        let jwt_flags = self.jwt_hs256_secret.is_some()
            || self.jwt_rs256_public_key.is_some()
            || self.jwt_jwks_file.is_some();
        let key_flags = self.api_keys_file.is_some() || !self.api_keys.is_empty();
        match self.mode {
            AuthMode::None => anyhow::ensure!(
                !jwt_flags && !key_flags,
                "API keys or JWT keys are configured but --auth is `none`: \
                 add --auth api-keys or --auth jwt (or remove them)"
            ),
            AuthMode::ApiKeys => anyhow::ensure!(
                key_flags && !jwt_flags,
                "--auth api-keys needs --api-keys-file or --api-keys (and no JWT keys)"
            ),
            AuthMode::Jwt => {
                anyhow::ensure!(
                    jwt_flags && !key_flags,
                    "--auth jwt needs --jwt-hs256-secret, --jwt-rs256-public-key or \
                     --jwt-jwks-file (and no API keys)"
                );
                anyhow::ensure!(
                    !self.jwt_tenant_claim.is_empty(),
                    "--jwt-tenant-claim must not be empty"
                );
                if let Some(secret) = &self.jwt_hs256_secret {
                    anyhow::ensure!(
                        secret.expose().len() >= 32,
                        "--jwt-hs256-secret must be at least 32 bytes"
                    );
                }
                let rs256 = self.jwt_rs256_public_key.is_some() || self.jwt_jwks_file.is_some();
                anyhow::ensure!(
                    !rs256
                        || self.jwt_allow_any_audience
                        || (!self.jwt_audience.is_empty() && self.jwt_issuer.is_some()),
                    "RS256 keys (--jwt-rs256-public-key, --jwt-jwks-file) usually belong to an \
                     identity provider that issues tokens for other applications too: give \
                     --jwt-audience and --jwt-issuer so only tokens meant for tokenfan are \
                     accepted (or --jwt-allow-any-audience, unsafe)"
                );
            }
        }
        if let Some(secret) = &self.ticket_secret {
            anyhow::ensure!(
                secret.expose().len() >= 32,
                "--ticket-secret must be at least 32 bytes"
            );
        }
        anyhow::ensure!(
            (1..=86_400).contains(&self.ticket_ttl_secs),
            "--ticket-ttl-secs must be between 1 and 86400"
        );
        if let Some(name) = &self.auth_cookie {
            anyhow::ensure!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "--auth-cookie: {name:?} is not a cookie name (letters, digits, `-`, `_`, `.`)"
            );
        }
        Ok(())
    }
}

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

/// Who is calling, as the handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A credential of this tenant: it may create streams and use every stream of its own.
    Tenant(Arc<str>),
    /// A ticket: it may read one stream of one tenant (SSE, polls, WebSocket `subscribe`).
    Ticket {
        /// The stream's tenant.
        tenant: Arc<str>,
        /// The one stream it may read.
        stream: StreamId,
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
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    /// Set by [`authenticate`] on every `/v1/…` request; its absence is a wiring bug.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::error!("no caller on the request: the auth middleware is not installed");
            ApiError::Internal
        })
    }
}

/// What the edge checks credentials with.
enum Verifier {
    None,
    ApiKeys(ApiKeys),
    Jwt(Box<JwtAuth>),
}

/// A ticket just issued.
#[derive(Debug, Clone)]
pub struct IssuedTicket {
    /// The ticket.
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Authentication, tickets and tenant limits; shared by every handler through
/// [`AppState::security`].
pub struct Security {
    mode: AuthMode,
    verifier: Verifier,
    tickets: TicketKey,
    ticket_ttl: Duration,
    cookie: Option<String>,
    /// Whether this edge serves TLS itself (cookies get `Secure`).
    tls: bool,
    /// Per-tenant stream limits.
    pub limits: Arc<Limiter>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("mode", &self.mode)
            .field("cookie", &self.cookie)
            .finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Security {
    /// Loads keys and connects the limiter as the configuration says.
    pub async fn from_config(config: &EdgeConfig) -> anyhow::Result<Self> {
        let args = &config.auth;
        let verifier = match args.mode {
            AuthMode::None => Verifier::None,
            AuthMode::ApiKeys => Verifier::ApiKeys(ApiKeys::load(
                args.api_keys_file.as_deref(),
                &args.api_keys,
            )?),
            AuthMode::Jwt => Verifier::Jwt(Box::new(JwtAuth::from_args(args)?)),
        };
        let tickets = match &args.ticket_secret {
            Some(secret) => TicketKey::new(secret.expose().as_bytes()),
            None => {
                if args.mode != AuthMode::None {
                    tracing::warn!(
                        "no --ticket-secret: stream tickets are signed with a random key and \
                         work on this replica only; give every replica the same secret"
                    );
                }
                TicketKey::random()
            }
        };
        Ok(Self {
            mode: args.mode,
            verifier,
            tickets,
            ticket_ttl: Duration::from_secs(args.ticket_ttl_secs),
            cookie: args.auth_cookie.clone(),
            tls: config.tls_cert.is_some(),
            limits: Limiter::from_config(config).await?,
        })
    }

    /// The configured mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// A credential (API key or JWT) → its tenant and, for a JWT, when it expires; or a 401.
    fn verify_credential(&self, credential: &str) -> Result<(Caller, Option<u64>), ApiError> {
        let (tenant, expires) = match &self.verifier {
            Verifier::None => return Ok((Caller::anonymous(), None)),
            Verifier::ApiKeys(keys) => (
                keys.tenant(credential)
                    .ok_or_else(|| ApiError::InvalidCredentials("unknown API key".into()))?
                    .to_owned(),
                None,
            ),
            Verifier::Jwt(jwt) => {
                let (tenant, until) = jwt.verify_until(credential)?;
                (tenant, Some(until))
            }
        };
        Ok((Caller::Tenant(Arc::from(tenant)), expires))
    }

    fn verify_ticket(&self, ticket: &str) -> Result<ticket::TicketClaims, ApiError> {
        self.tickets
            .verify(ticket, unix_now())
            .map_err(|e| match e {
                TicketError::Invalid => ApiError::InvalidTicket(
                    "the stream ticket is malformed or its signature does not match".into(),
                ),
                TicketError::Expired => ApiError::ExpiredTicket,
            })
    }

    /// Identifies the caller of a `/v1/…` request. Precedence: the `Authorization` header,
    /// then credentials in the cookie, then a ticket (`?ticket=` or the cookie). Tickets
    /// count only on the routes that read a stream; one for another stream is 403.
    pub fn identify(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Caller, ApiError> {
        self.identify_until(method, uri, headers)
            .map(|(caller, _)| caller)
    }

    /// [`Security::identify`], with the Unix second the credential or ticket stops being
    /// accepted (None: API keys and no authentication do not expire).
    pub fn identify_until(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<(Caller, Option<u64>), ApiError> {
        if self.mode == AuthMode::None {
            return Ok((Caller::anonymous(), None));
        }
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let credential = value
                .to_str()
                .ok()
                .and_then(|v| {
                    let (scheme, token) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    ApiError::InvalidCredentials(
                        "the Authorization header must be `Bearer <credential>`".into(),
                    )
                })?;
            return self.verify_credential(credential);
        }
        let route = ReadRoute::of(method, uri.path());
        let mut tickets: Vec<String> = Vec::new();
        let mut credentials: Vec<String> = Vec::new();
        if let Some(query) = uri.query() {
            let parsed: Result<axum::extract::Query<TicketQuery>, _> =
                axum::extract::Query::try_from_uri(uri);
            match parsed {
                Ok(q) => tickets.extend(q.0.ticket),
                Err(_) if query.contains("ticket=") => {
                    return Err(ApiError::InvalidTicket(
                        "`ticket` must appear once in the query".into(),
                    ));
                }
                Err(_) => {}
            }
        }
        if let Some(name) = &self.cookie {
            for value in cookies(headers, name) {
                if value.starts_with(ticket::PREFIX) {
                    tickets.push(value.to_owned());
                } else {
                    credentials.push(value.to_owned());
                }
            }
        }
        let mut error: Option<ApiError> = None;
        for credential in &credentials {
            match self.verify_credential(credential) {
                Ok(identified) => return Ok(identified),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        let mut out_of_scope = false;
        for ticket in &tickets {
            match self.verify_ticket(ticket) {
                Ok(claims) => {
                    let in_scope =
                        route.is_some_and(|r| r.stream.is_none_or(|s| s == claims.stream.as_str()));
                    if in_scope {
                        return Ok((
                            Caller::Ticket {
                                tenant: Arc::from(claims.tenant),
                                stream: claims.stream,
                            },
                            Some(claims.expires_at),
                        ));
                    }
                    out_of_scope = true;
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if out_of_scope {
            return Err(ticket_scope());
        }
        Err(error.unwrap_or(ApiError::MissingCredentials))
    }

    /// A ticket for reading `stream`, when authentication is on.
    pub fn ticket_for(&self, stream: &StreamState) -> Option<IssuedTicket> {
        if self.mode == AuthMode::None {
            return None;
        }
        let expires_at = unix_now() + self.ticket_ttl.as_secs();
        Some(IssuedTicket {
            token: self.tickets.sign(&stream.id, stream.tenant(), expires_at),
            expires_at,
        })
    }

    /// Puts `ticket` on a response: the `x-stream-ticket` header and, with `--auth-cookie`,
    /// a cookie scoped to the stream's URLs.
    pub fn add_ticket_headers(
        &self,
        ticket: Option<&IssuedTicket>,
        stream: &StreamState,
        request: &HeaderMap,
        response: &mut HeaderMap,
    ) {
        let Some(ticket) = ticket else { return };
        if let Ok(v) = HeaderValue::from_str(&ticket.token) {
            response.insert(TICKET_HEADER, v);
        }
        if let Some(name) = &self.cookie {
            let https = self.tls
                || request
                    .get("x-forwarded-proto")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
            let cookie = format!(
                "{name}={}; Path=/v1/streams/{}; Max-Age={}; HttpOnly; SameSite=Strict{}",
                ticket.token,
                stream.id,
                self.ticket_ttl.as_secs(),
                if https { "; Secure" } else { "" }
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.append(header::SET_COOKIE, v);
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

/// A route on which a ticket may stand in for a credential.
#[derive(Clone, Copy)]
struct ReadRoute<'a> {
    /// The stream in the path (`None` for `/v1/ws`, where each `subscribe` is checked).
    stream: Option<&'a str>,
}

impl<'a> ReadRoute<'a> {
    fn of(method: &Method, path: &'a str) -> Option<Self> {
        if path == "/v1/ws" {
            return Some(Self { stream: None });
        }
        if !(method == Method::GET || method == Method::HEAD) {
            return None;
        }
        let rest = path.strip_prefix("/v1/streams/")?;
        let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
        matches!(tail, "" | "events" | "poll").then_some(Self { stream: Some(id) })
    }
}

/// The values of cookie `name` in the request's `Cookie` headers.
fn cookies<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
        .filter(|v| !v.is_empty())
}

fn ticket_scope() -> ApiError {
    ApiError::TicketScope
}

/// Whether `path` answers in the OpenAI error shape.
pub fn openai_route(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/v1/models" || path.starts_with("/v1/models/")
}

/// `error` in the shape the route uses (OpenAI's on the OpenAI routes, native elsewhere).
pub fn error_response(path: &str, error: ApiError) -> Response {
    let format = if openai_route(path) {
        ErrorFormat::OpenAi
    } else {
        ErrorFormat::Native
    };
    error.into_response_as(format)
}

/// Middleware: authenticates every `/v1/…` request and hands the [`Caller`] to the handler;
/// other paths (the demo page, health, metrics) pass untouched.
pub async fn authenticate(
    State(app): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    if !request.uri().path().starts_with("/v1/") {
        return next.run(request).await;
    }
    match app
        .security
        .identify_until(request.method(), request.uri(), request.headers())
    {
        Ok((caller, expires)) => {
            request.extensions_mut().insert(caller);
            if let Some(at) = expires {
                request.extensions_mut().insert(CredentialExpiry(at));
            }
            next.run(request).await
        }
        Err(error) => {
            metrics::counter!("tokenfan_edge_auth_refusals_total", "code" => error.code())
                .increment(1);
            error_response(request.uri().path(), error)
        }
    }
}

/// When the credential (JWT) or ticket of a request stops being accepted, in Unix seconds; in
/// the request's extensions when it has one. A WebSocket or SSE response opened with it ends
/// then (WebSocket close 1008, SSE `error` event `credentials_expired`): reconnecting with a
/// fresh credential resumes where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialExpiry(pub u64);

impl CredentialExpiry {
    /// The same moment on the runtime's clock.
    pub fn deadline(self) -> tokio::time::Instant {
        let left = self.0.saturating_sub(unix_now());
        tokio::time::Instant::now() + Duration::from_secs(left)
    }
}

/// The stream `id` as `caller` may see it: another tenant's stream is 404 exactly like an
/// unknown one, everywhere; a ticket for another stream is 403.
pub async fn stream_for(
    app: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<Arc<StreamState>, ApiError> {
    if let Caller::Ticket { stream, .. } = caller
        && stream.as_str() != id
    {
        return Err(ticket_scope());
    }
    app.hub.get_for(id, Some(caller.tenant())).await
}

/// [`stream_for`] for stopping a stream or minting a ticket for it: needs a credential of
/// the tenant; a ticket only reads (403).
pub async fn stream_to_manage(
    app: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<Arc<StreamState>, ApiError> {
    if matches!(caller, Caller::Ticket { .. }) {
        return Err(ticket_scope());
    }
    stream_for(app, caller, id).await
}

/// Creates a stream owned by the caller's tenant, within the tenant's limits (429 past
/// them); `transport` is the one starting it. Tickets cannot create streams (403).
pub async fn create_stream(
    app: &AppState,
    caller: &Caller,
    mut spec: StreamSpec,
    parent: &tracing::Span,
    transport: &'static str,
) -> Result<Arc<StreamState>, ApiError> {
    let Caller::Tenant(tenant) = caller else {
        return Err(ticket_scope());
    };
    spec.tenant = tenant.to_string();
    let id = StreamId::random();
    let limits = &app.security.limits;
    limits.admit(tenant, &id).await?;
    match app
        .hub
        .create_with_id(id.clone(), spec, parent, transport)
        .await
    {
        Ok(stream) => {
            limits.track(&app.hub, &stream);
            Ok(stream)
        }
        Err(error) => {
            limits.release(tenant, &id).await;
            Err(error)
        }
    }
}
