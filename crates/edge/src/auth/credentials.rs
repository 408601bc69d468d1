//! Credentials: what `Authorization: Bearer …` (or the auth cookie) is checked against, by
//! `--auth` mode: nothing, API keys ([`super::apikeys`]) or JWTs ([`super::jwt`]).

use std::sync::Arc;

use super::{
    apikeys::ApiKeys,
    args::{AuthArgs, AuthMode},
    jwt::JwtAuth,
};
use crate::{error::ApiError, tenant::Caller};

/// What the edge checks credentials with.
#[derive(Debug)]
pub(crate) enum Verifier {
    /// Authentication off: everyone is the default tenant.
    None,
    /// `--auth api-keys`.
    ApiKeys(ApiKeys),
    /// `--auth jwt`.
    Jwt(Box<JwtAuth>),
}

impl Verifier {
    /// Loads the keys `args` name (files are read here).
    pub(crate) fn from_args(args: &AuthArgs) -> anyhow::Result<Self> {
        Ok(match args.mode {
            AuthMode::None => Self::None,
            AuthMode::ApiKeys => Self::ApiKeys(ApiKeys::load(
                args.api_keys_file.as_deref(),
                &args.api_keys,
            )?),
            AuthMode::Jwt => Self::Jwt(Box::new(JwtAuth::from_args(args)?)),
        })
    }

    /// A credential (API key or JWT) → its tenant and, for a JWT, when it expires; or a 401.
    pub(crate) fn verify(&self, credential: &str) -> Result<(Caller, Option<u64>), ApiError> {
        let (tenant, expires) = match self {
            Self::None => return Ok((Caller::anonymous(), None)),
            Self::ApiKeys(keys) => (
                keys.tenant(credential)
                    .ok_or_else(|| ApiError::InvalidCredentials("unknown API key".into()))?
                    .to_owned(),
                None,
            ),
            Self::Jwt(jwt) => {
                let (tenant, until) = jwt.verify_until(credential)?;
                (tenant, Some(until))
            }
        };
        Ok((Caller::Tenant(Arc::from(tenant)), expires))
    }
}
