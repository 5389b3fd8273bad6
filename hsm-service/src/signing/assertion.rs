//! Assertions (JWS) signed for login services: [`Signer::sign_assertion`].
//!
//! Signing never waits for the store, except when an assertion would expire later than
//! the durable `last_expiry` of its key: then that mark is raised first, in steps of
//! [`EXPIRY_MARK_STEP`], so it costs one store write per key and step.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ring::rand::SecureRandom;

use super::signer::{invalid, store_err, Grant, Signer};
use super::versions::{self, KeyVersion};
use super::{prepare_assertion, AssertionParams};
use crate::error::{Error, Result};

/// Granularity of the durable `last_expiry` mark, in seconds.
pub const EXPIRY_MARK_STEP: u64 = 60;
/// Clock skew tolerated for `auth_time` in the future, in seconds.
const AUTH_TIME_SKEW: u64 = 60;
/// Bounds on assertion fields, so that a token stays small.
const MAX_FIELD_LEN: usize = 1024;
const MAX_LIST_LEN: usize = 32;

/// A request for an assertion, as the caller gave it (empty/zero: defaults).
#[derive(Debug, Clone, Default)]
pub struct AssertionRequest {
    /// Key name; empty: the default assertion key.
    pub key: String,
    /// `sub`.
    pub subject: String,
    /// `aud`.
    pub audience: Vec<String>,
    /// `nonce`.
    pub nonce: String,
    /// `acr`.
    pub acr: String,
    /// `amr`.
    pub amr: Vec<String>,
    /// Lifetime in seconds; 0: the configured default.
    pub ttl_seconds: u32,
    /// `auth_time` (Unix seconds); 0: now.
    pub auth_time: u64,
    /// Extra claims, a JSON object text (may be empty).
    pub extra_claims_json: String,
    /// The evidence of the authentication this assertion reports (empty: none, only
    /// for a caller whose grant allows unbound assertions).
    pub evidence_id: String,
}

/// A signed assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAssertion {
    /// Compact JWS.
    pub jws: String,
    /// `kid` of the signing key version.
    pub kid: String,
    /// `exp`.
    pub expires_at: u64,
}

fn check_len(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_FIELD_LEN {
        return Err(invalid(format!(
            "{field} is {} bytes, the limit is {MAX_FIELD_LEN}",
            value.len()
        )));
    }
    Ok(())
}

fn check_list(field: &str, values: &[String]) -> Result<()> {
    if values.len() > MAX_LIST_LEN {
        return Err(invalid(format!(
            "{field} has {} entries, the limit is {MAX_LIST_LEN}",
            values.len()
        )));
    }
    for v in values {
        if v.is_empty() {
            return Err(invalid(format!("{field} entries must not be empty")));
        }
        check_len(field, v)?;
    }
    Ok(())
}

impl Signer {
    /// Make sure the durable `last_expiry` of `k` covers `exp` before an assertion
    /// with that expiry leaves the service.
    async fn cover_expiry(&self, k: &KeyVersion, exp: u64) -> Result<()> {
        let current = self
            .read_keys()
            .get(&(k.name.clone(), k.version))
            .map_or(0, |k| k.last_expiry);
        if current >= exp {
            return Ok(());
        }
        let _w = self.writes.lock().await;
        let mark = (exp / EXPIRY_MARK_STEP + 1) * EXPIRY_MARK_STEP;
        let (name, version) = (k.name.clone(), k.version);
        let updated = self
            .store
            .write(move |txn| versions::raise_last_expiry(txn, &name, version, mark))
            .await
            .and_then(|r| r)
            .map_err(store_err)?;
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.insert((updated.name.clone(), updated.version), updated);
        Ok(())
    }

    /// Sign an assertion for a caller with `grant`: bound to the evidence it cites
    /// (`amr` and `auth_time` from it, `acr` only as far as `[[signing.acr]]` lets its
    /// method reach, spent durably before the assertion leaves), or unbound when the
    /// grant allows it.
    pub async fn sign_assertion(
        &self,
        grant: &Grant,
        req: &AssertionRequest,
    ) -> Result<SignedAssertion> {
        if self.config.issuer.is_empty() {
            return Err(Error::FailedPrecondition(
                "assertion signing is not configured (signing.issuer is empty)".into(),
            ));
        }
        let name = self.granted(grant, &req.key)?;
        if req.subject.is_empty() {
            return Err(invalid("subject must not be empty"));
        }
        check_len("subject", &req.subject)?;
        check_len("nonce", &req.nonce)?;
        check_list("audience", &req.audience)?;
        check_list("amr", &req.amr)?;
        if req.acr.is_empty() {
            return Err(invalid("acr must not be empty"));
        }
        let t = self.clock.now();
        let basis = self.basis(grant, req, t)?;
        let claims = Self::claims(&basis, req)?;
        if let Some(allowed) = &grant.acr {
            if !allowed.contains(&req.acr) {
                return Err(Error::PermissionDenied(format!(
                    "this client may not assert acr {:?}",
                    req.acr
                )));
            }
        }
        let ttl = match req.ttl_seconds {
            0 => self.config.default_ttl_seconds,
            t if t > self.config.max_ttl_seconds => {
                return Err(invalid(format!(
                    "ttl_seconds {t} exceeds the maximum of {}",
                    self.config.max_ttl_seconds
                )))
            }
            t => t,
        };
        let auth_time = match claims.auth_time {
            0 => t,
            a if a > t + AUTH_TIME_SKEW => {
                return Err(invalid(format!("auth_time {a} is in the future")))
            }
            a if a + self.config.max_auth_age_seconds < t => {
                return Err(invalid(format!(
                    "auth_time {a} is more than {} seconds ago",
                    self.config.max_auth_age_seconds
                )))
            }
            a => a,
        };
        let k = self.signing_version(&name)?;
        let mut jti = [0u8; 16];
        self.rng
            .fill(&mut jti)
            .map_err(|_| Error::Internal("system RNG failed".into()))?;
        let jti = URL_SAFE_NO_PAD.encode(jti);
        let params = AssertionParams {
            issuer: &self.config.issuer,
            subject: &req.subject,
            audience: &req.audience,
            nonce: &req.nonce,
            acr: &req.acr,
            amr: &claims.amr,
            auth_time,
            now: t,
            ttl_seconds: ttl,
            jti: &jti,
            extra_claims_json: &req.extra_claims_json,
        };
        let input = prepare_assertion(k.algorithm, &k.kid, &params)?;
        let expires_at = input.expires_at();
        let signature = self.hsm_sign(&k, input.bytes()).await?;
        self.cover_expiry(&k, expires_at).await?;
        // Released only to the one request that spent the evidence.
        self.spend(&basis, &grant.tenant, &req.subject).await?;
        Ok(SignedAssertion {
            jws: input.finish(&signature),
            kid: k.kid,
            expires_at,
        })
    }
}
