//! Assertions (JWS) signed for login services: [`Signer::sign_assertion`].
//!
//! Signing never waits for the store, except when an assertion would expire later than
//! the durable `last_expiry` of its key: then that mark is raised first, in steps of
//! [`EXPIRY_MARK_STEP`], so it costs one store write per key and step.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ring::rand::SecureRandom;

use super::evidence::{spend_checked_in, Basis};
use super::signer::{invalid, store_err, Caller, Signer};
use super::versions::{self, KeyVersion, Usage};
use super::{prepare_assertion, AssertionParams};
use crate::audit::log::append_in;
use crate::audit::{Details, Event};
use crate::common::EventKind;
use crate::error::{Error, Result};
use crate::store::events;

/// Audit action of a signed assertion (object: its `jti`).
pub const ASSERTION_ACTION: &str = "assertion.sign";

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

/// The `auth_time` to assert: `requested` (0: `now`) unless it is more than
/// [`AUTH_TIME_SKEW`] in the future or more than `max_age` seconds ago. Checked
/// arithmetic: no value of the request or the config can overflow.
fn checked_auth_time(requested: u64, now: u64, max_age: u64) -> Result<u64> {
    match requested {
        0 => Ok(now),
        a if a > now.saturating_add(AUTH_TIME_SKEW) => {
            Err(invalid(format!("auth_time {a} is in the future")))
        }
        // `a + max_age < now`, where an overflowing sum is later than any `now`.
        a if a.checked_add(max_age).is_some_and(|oldest| oldest < now) => Err(invalid(format!(
            "auth_time {a} is more than {max_age} seconds ago"
        ))),
        a => Ok(a),
    }
}

impl Signer {
    /// Sign an assertion for `caller`, with the active version of a `signing` key the
    /// caller's grant names: bound to the evidence it cites (`amr` and `auth_time` from
    /// it, `acr` only as far as `[[signing.acr]]` lets its method reach), or unbound when
    /// the grant allows it. The assertion leaves only once, in one store write job
    /// (shared with other requests by group commit), its evidence is spent, its record
    /// (kid, jti, exp, acr, evidence, tenant, subject) is in the audit trail and its
    /// key's durable `last_expiry` covers it.
    pub async fn sign_assertion(
        &self,
        caller: &Caller,
        req: &AssertionRequest,
    ) -> Result<SignedAssertion> {
        if self.config.issuer.is_empty() {
            return Err(Error::FailedPrecondition(
                "assertion signing is not configured (signing.issuer is empty)".into(),
            ));
        }
        let grant = &caller.grant;
        let k = self
            .looked_up(|s| {
                let name = s.granted(grant, &req.key, Usage::Signing)?;
                s.signing_version(&name, Usage::Signing)
            })
            .await?;
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
        let basis = self.basis(grant, req, t).await?;
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
        let auth_time = checked_auth_time(claims.auth_time, t, self.config.max_auth_age_seconds)?;
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
            txn_text_sha256: claims.txn_text_sha256.as_deref(),
        };
        let input = prepare_assertion(k.algorithm, &k.kid, &params)?;
        let expires_at = input.expires_at();
        let signature = self.hsm_sign(&k, input.bytes()).await?;
        let event = self
            .event(&caller.actor, ASSERTION_ACTION, &jti)
            .with_details(
                Details::new()
                    .str("kid", &k.kid)
                    .str("key", &k.name)
                    .u64("version", u64::from(k.version))
                    .u64("exp", expires_at)
                    .str("acr", &req.acr)
                    .str("evidence_id", &req.evidence_id)
                    .str("tenant", &grant.tenant)
                    .str("subject", &req.subject),
            );
        let spend = match &basis {
            Basis::Evidence(e) => Some(Spend {
                id: e.id.clone(),
                tenant: grant.tenant.clone(),
                subject: req.subject.clone(),
                now: self.clock.now(),
            }),
            Basis::Unbound => None,
        };
        let details = serde_json::json!({"acr": &req.acr, "aud": &req.audience, "kid": &k.kid});
        let notice = (
            self.clock.now_ms(),
            grant.tenant.clone(),
            req.subject.clone(),
            k.name.clone(),
            details.to_string(),
        );
        // Released only to the one request that spent the evidence.
        self.commit_assertion(&k, expires_at, spend, event, notice)
            .await?;
        Ok(SignedAssertion {
            jws: input.finish(&signature),
            kid: k.kid,
            expires_at,
        })
    }

    /// The one write job of an assertion: spend its evidence (decided on the committer;
    /// a refusal writes nothing), raise the durable `last_expiry` of `k` when it does
    /// not cover `exp` yet, and append the assertion's audit record and its
    /// `assertion.signed` event (`notice`: time, tenant, subject, key name, details).
    async fn commit_assertion(
        &self,
        k: &KeyVersion,
        exp: u64,
        spend: Option<Spend>,
        event: Event,
        notice: (u64, String, String, String, String),
    ) -> Result<()> {
        let current = self
            .read_keys()
            .get(&(k.name.clone(), k.version))
            .map_or(0, |k| k.last_expiry);
        let raise = current < exp;
        // Memory follows the store in order: hold `writes` across a raising job.
        let _w = if raise {
            Some(self.writes.lock().await)
        } else {
            None
        };
        let mark = (exp / EXPIRY_MARK_STEP + 1) * EXPIRY_MARK_STEP;
        let (name, version) = (k.name.clone(), k.version);
        let chain = self.audit.chain();
        let (updated, spent) = self
            .store
            .write(move |txn| {
                // The raise first: a refusal of the spend after it leaves only a harmlessly
                // higher mark (memory follows below), whereas a refusal after a spend would
                // lose the evidence.
                let updated = if raise {
                    match versions::raise_last_expiry(txn, &name, version, mark)? {
                        Ok(k) => Some(k),
                        Err(e) => return Ok(Err(store_err(e))),
                    }
                } else {
                    None
                };
                if let Some(s) = spend {
                    if let Err(refused) =
                        spend_checked_in(txn, &s.id, &s.tenant, &s.subject, s.now)?
                    {
                        return Ok(Ok((updated, Err(refused))));
                    }
                }
                append_in(txn, &chain, event)?;
                let (time_ms, tenant, subject, key, details) = notice;
                let kind = EventKind::AssertionSigned;
                events::emit_in(txn, time_ms, kind, &tenant, &subject, &key, details)?;
                Ok(Ok((updated, Ok(()))))
            })
            .await
            .map_err(store_err)??;
        if let Some(updated) = updated {
            let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
            keys.insert((updated.name.clone(), updated.version), updated);
        }
        spent?;
        self.audit.appended(1);
        Ok(())
    }
}

/// The evidence an assertion spends: decided again on the committer at `now`.
struct Spend {
    id: String,
    tenant: String,
    subject: String,
    now: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_time_bounds_use_checked_arithmetic() {
        let now = 1_700_000_000;
        assert_eq!(checked_auth_time(0, now, 60).unwrap(), now);
        assert_eq!(checked_auth_time(now - 60, now, 60).unwrap(), now - 60);
        assert!(checked_auth_time(now - 61, now, 60).is_err());
        assert_eq!(
            checked_auth_time(now + AUTH_TIME_SKEW, now, 60).unwrap(),
            now + AUTH_TIME_SKEW
        );
        assert!(checked_auth_time(now + AUTH_TIME_SKEW + 1, now, 60).is_err());
        // Values where `auth_time + max_age` (or `now + skew`) would overflow u64.
        assert_eq!(checked_auth_time(1, now, u64::MAX).unwrap(), 1);
        assert_eq!(checked_auth_time(now, now, u64::MAX).unwrap(), now);
        assert!(checked_auth_time(u64::MAX, now, u64::MAX).is_err());
        assert!(checked_auth_time(u64::MAX - 1, now, u64::MAX - 1).is_err());
        assert_eq!(
            checked_auth_time(u64::MAX, u64::MAX, u64::MAX).unwrap(),
            u64::MAX
        );
        assert_eq!(
            checked_auth_time(u64::MAX - 5, u64::MAX - 1, 10).unwrap(),
            u64::MAX - 5
        );
        assert!(checked_auth_time(1, u64::MAX, u64::MAX - 2).is_err());
    }
}
