//! Bearer JWTs: HS256 with a shared secret, RS256 with a public key (PEM) or a JWKS file.
//!
//! Checked on every token: the signature, `exp` (required), `nbf` (when present), and `aud` /
//! `iss` when the edge is configured with them (then they are required too). The tenant is the
//! string claim named by `--jwt-tenant-claim` (default `tenant`), falling back to `sub`.
//!
//! The `jsonwebtoken` crate does the parsing and claim checks; its cryptography is plugged in
//! here on top of `ring` (the TLS stack's crypto library already in the build), so no second
//! RSA/HMAC implementation is compiled in. Only HS256 and RS256 are provided.

use std::{collections::HashMap, path::Path, sync::Once};

use jsonwebtoken::{
    Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Validation,
    crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils},
    errors::{Error as JwtError, ErrorKind},
    jwk::{AlgorithmParameters, JwkSet},
    signature::{self, Signer, Verifier},
};
use ring::{hmac, rand::SystemRandom, signature as ring_sig};
use serde_json::Value;

use super::args::AuthArgs;
use crate::{error::ApiError, tenant::check_tenant};

/// Verifies bearer JWTs and names their tenant.
pub struct JwtAuth {
    hs256: Option<DecodingKey>,
    /// RS256 keys: the PEM key (no `kid`) and/or the JWKS keys by `kid`.
    rs256: Vec<(Option<String>, DecodingKey)>,
    validation: Validation,
    tenant_claim: String,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth")
            .field("hs256", &self.hs256.is_some())
            .field("rs256_keys", &self.rs256.len())
            .field("tenant_claim", &self.tenant_claim)
            .finish()
    }
}

impl JwtAuth {
    /// Loads the keys the configuration names (files are read once, at start).
    pub fn from_args(args: &AuthArgs) -> anyhow::Result<Self> {
        install_crypto();
        let hs256 = args
            .jwt_hs256_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.expose().as_bytes()));
        let mut rs256 = Vec::new();
        if let Some(path) = &args.jwt_rs256_public_key {
            let pem = read(path, "--jwt-rs256-public-key")?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "--jwt-rs256-public-key {}: not an RSA public key in PEM: {e}",
                    path.display()
                )
            })?;
            rs256.push((None, key));
        }
        if let Some(path) = &args.jwt_jwks_file {
            rs256.extend(load_jwks(path)?);
        }
        anyhow::ensure!(
            hs256.is_some() || !rs256.is_empty(),
            "--auth jwt needs --jwt-hs256-secret, --jwt-rs256-public-key or --jwt-jwks-file"
        );
        let mut algorithms = Vec::new();
        if hs256.is_some() {
            algorithms.push(Algorithm::HS256);
        }
        if !rs256.is_empty() {
            algorithms.push(Algorithm::RS256);
        }
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = args.jwt_leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if args.jwt_audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&args.jwt_audience);
            required.push("aud");
        }
        if let Some(issuer) = &args.jwt_issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            hs256,
            rs256,
            validation,
            tenant_claim: args.jwt_tenant_claim.clone(),
        })
    }

    /// The token's tenant, or a 401 saying what is wrong with it.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        self.verify_until(token).map(|(tenant, _)| tenant)
    }

    /// The token's tenant and the Unix second until which it is accepted (`exp` plus the
    /// leeway), or a 401 saying what is wrong with it.
    pub fn verify_until(&self, token: &str) -> Result<(String, u64), ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| refusal(&e))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rsa_key(header.kid.as_deref())?,
            _ => None,
        }
        .ok_or_else(|| {
            ApiError::InvalidCredentials(format!(
                "tokens signed with {:?} are not accepted",
                header.alg
            ))
        })?;
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &self.validation)
                .map_err(|e| refusal(&e))?;
        let claims = data.claims;
        let tenant = claims
            .get(&self.tenant_claim)
            .or_else(|| claims.get("sub"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::InvalidCredentials(format!(
                    "the token has no string `{}` (or `sub`) claim naming the tenant",
                    self.tenant_claim
                ))
            })?;
        check_tenant(tenant)
            .map_err(|why| ApiError::InvalidCredentials(format!("the token's tenant {why}")))?;
        // `exp` is required and checked above; a number in range.
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64)))
            .unwrap_or(0);
        Ok((
            tenant.to_owned(),
            exp.saturating_add(self.validation.leeway),
        ))
    }

    fn rsa_key(&self, kid: Option<&str>) -> Result<Option<&DecodingKey>, ApiError> {
        if self.rs256.is_empty() {
            return Ok(None);
        }
        if let Some(kid) = kid
            && let Some((_, key)) = self.rs256.iter().find(|(k, _)| k.as_deref() == Some(kid))
        {
            return Ok(Some(key));
        }
        // No `kid`, or one this server does not know: the PEM key, or the only key there is
        // (the signature check decides).
        if let Some((_, key)) = self.rs256.iter().find(|(k, _)| k.is_none()) {
            return Ok(Some(key));
        }
        match &self.rs256[..] {
            [(_, key)] => Ok(Some(key)),
            _ => Err(ApiError::InvalidCredentials(
                "the token's `kid` names no key this server knows".into(),
            )),
        }
    }
}

fn refusal(e: &JwtError) -> ApiError {
    let message = match e.kind() {
        ErrorKind::ExpiredSignature => {
            return ApiError::ExpiredCredentials("the token has expired".into());
        }
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidAudience => "the token's audience (aud) is not accepted",
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not accepted",
        ErrorKind::MissingRequiredClaim(_) => {
            "the token lacks a required claim (exp, and aud/iss when configured)"
        }
        ErrorKind::InvalidSignature => "the token's signature is invalid",
        ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted",
        _ => "the credential is neither a known API key nor a valid JWT",
    };
    ApiError::InvalidCredentials(message.into())
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
}

/// The RSA keys of a JWKS file (`{"keys":[{"kty":"RSA","kid":…,"n":…,"e":…},…]}`); other key
/// types are skipped with a warning.
fn load_jwks(path: &Path) -> anyhow::Result<Vec<(Option<String>, DecodingKey)>> {
    let bytes = read(path, "--jwt-jwks-file")?;
    let set: JwkSet = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("--jwt-jwks-file {}: not a JWKS: {e}", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone();
        match &jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => {
                let key = DecodingKey::from_rsa_components(&rsa.n, &rsa.e).map_err(|e| {
                    anyhow::anyhow!("--jwt-jwks-file: key {kid:?} has a bad n/e: {e}")
                })?;
                keys.push((kid, key));
            }
            _ => tracing::warn!(
                ?kid,
                "--jwt-jwks-file: skipping a non-RSA key (only RS256 is supported)"
            ),
        }
    }
    anyhow::ensure!(
        !keys.is_empty(),
        "--jwt-jwks-file {}: no RSA key in the set",
        path.display()
    );
    Ok(keys)
}

/// Makes `jsonwebtoken` use the ring-based HS256/RS256 implementation below (once per
/// process; tests that sign tokens call it too).
pub(crate) fn install_crypto() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err = a provider is installed already: keep it.
        let _ = RING_PROVIDER.install_default();
    });
}

static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

fn unsupported() -> JwtError {
    ErrorKind::InvalidAlgorithm.into()
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, JwtError> {
    match alg {
        Algorithm::HS256 => Ok(Box::new(Hs256(hmac::Key::new(
            hmac::HMAC_SHA256,
            key.as_bytes(),
        )))),
        Algorithm::RS256 => {
            let pair = ring_sig::RsaKeyPair::from_der(key.as_bytes())
                .map_err(|e| JwtError::from(ErrorKind::InvalidRsaKey(e.to_string())))?;
            Ok(Box::new(Rs256Signer(pair)))
        }
        _ => Err(unsupported()),
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, JwtError> {
    match alg {
        Algorithm::HS256 => {
            let DecodingKeyKind::SecretOrDer(secret) = key.kind() else {
                return Err(ErrorKind::InvalidKeyFormat.into());
            };
            Ok(Box::new(Hs256(hmac::Key::new(hmac::HMAC_SHA256, secret))))
        }
        Algorithm::RS256 => Ok(Box::new(Rs256Verifier(key.clone()))),
        _ => Err(unsupported()),
    }
}

struct Hs256(hmac::Key);

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        // Constant-time comparison of the tags.
        hmac::verify(&self.0, msg, sig).map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

struct Rs256Signer(ring_sig::RsaKeyPair);

impl Signer<Vec<u8>> for Rs256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let mut sig = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &ring_sig::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                msg,
                &mut sig,
            )
            .map_err(|_| signature::Error::new())?;
        Ok(sig)
    }
}

impl JwtSigner for Rs256Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

struct Rs256Verifier(DecodingKey);

impl Verifier<Vec<u8>> for Rs256Verifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let alg = &ring_sig::RSA_PKCS1_2048_8192_SHA256;
        let ok = match self.0.kind() {
            DecodingKeyKind::SecretOrDer(der) => {
                ring_sig::UnparsedPublicKey::new(alg, der).verify(msg, sig)
            }
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                ring_sig::RsaPublicKeyComponents { n, e }.verify(alg, msg, sig)
            }
        };
        ok.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for Rs256Verifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

/// JWT claims by name, for [`sign`].
pub type Claims = HashMap<String, Value>;

/// Signs `claims` with `alg` (HS256: `key` is the secret; RS256: a PEM private key).
pub fn sign(
    alg: Algorithm,
    key: &[u8],
    kid: Option<&str>,
    claims: &Claims,
) -> anyhow::Result<String> {
    install_crypto();
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(key),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(key)?,
        other => anyhow::bail!("{other:?} is not supported"),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    Ok(jsonwebtoken::encode(&header, claims, &key)?)
}

/// The algorithm names [`sign`] takes.
pub use jsonwebtoken::Algorithm as SigningAlgorithm;
