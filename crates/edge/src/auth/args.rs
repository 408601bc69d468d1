//! The authentication options: the `--auth` mode, its keys, tickets and the cookie.

use std::path::PathBuf;

use crate::secret::Secret;

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

/// Authentication options (the `auth` section of [`crate::EdgeConfig`]).
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
