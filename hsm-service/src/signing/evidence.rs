//! Assertions bound to evidence: what an assertion may claim, given the authentication
//! it cites (`SignAssertionRequest.evidence_id`), and the exactly-once spend.
//!
//! The checks run twice: on a snapshot before signing, so that a refused request costs
//! no HSM work, and again inside the store's committer when the evidence is spent, so
//! that of concurrent requests citing one evidence exactly one spends it. The signature
//! is released only after that spend is durable.
//!
//! Order of the checks, so that nothing of another tenant leaks: unknown, other tenant,
//! other subject, spent, expired.

use super::signer::{invalid, store_err, Grant, Signer};
use super::AssertionRequest;
use crate::error::{Error, Result};
use crate::store::evidence::{spend_in, Spend};
use crate::store::{EvidenceRecord, Rollback, Txn, TxnResult};

/// Length of an evidence id: 32 lower-case hex digits (128 bits).
pub const EVIDENCE_ID_LEN: usize = 32;

/// What an assertion stands on: cited evidence, or (for a client whose rule allows it)
/// the caller's word.
#[derive(Debug, Clone)]
pub(super) enum Basis {
    /// The evidence as read before signing.
    Evidence(EvidenceRecord),
    /// `unbound_assertions = true`: `acr`, `amr` and `auth_time` as the request says.
    Unbound,
}

/// The claims an assertion gets from its basis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Claims {
    /// `amr`.
    pub amr: Vec<String>,
    /// `auth_time` (0: now, for unbound assertions that give none).
    pub auth_time: u64,
    /// `txn_text_sha256` (lower-case hex): app evidence of a TRANSACTION challenge.
    pub txn_text_sha256: Option<String>,
}

fn check_id(id: &str) -> Result<()> {
    if id.len() != EVIDENCE_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid(format!(
            "evidence_id must be {EVIDENCE_ID_LEN} lower-case hex digits (VerifyCodeResponse.evidence_id)"
        )));
    }
    Ok(())
}

fn unknown(id: &str) -> Error {
    Error::NotFound(format!(
        "no evidence {id:?} (never issued, or expired and purged)"
    ))
}

/// Why `e` cannot back an assertion for `subject` by `tenant` at `now`, if it cannot.
/// Messages say which rule failed and nothing of the evidence itself.
pub(super) fn refusal(e: &EvidenceRecord, tenant: &str, subject: &str, now: u64) -> Option<Error> {
    if e.tenant != tenant {
        return Some(Error::PermissionDenied(
            "evidence_id was issued to another tenant".into(),
        ));
    }
    if e.subject != subject {
        return Some(Error::PermissionDenied(
            "evidence_id is evidence for another subject than the request's subject".into(),
        ));
    }
    if e.spent_at.is_some() {
        return Some(Error::FailedPrecondition(
            "evidence_id was already used by an assertion (evidence is single use)".into(),
        ));
    }
    if now >= e.expires_at {
        return Some(Error::FailedPrecondition(
            "evidence_id has expired ([signing] evidence_ttl_seconds)".into(),
        ));
    }
    None
}

/// The spend decision on the committer: spend only what passes every check at `now`.
pub(super) fn decide(
    current: Option<&EvidenceRecord>,
    id: &str,
    tenant: &str,
    subject: &str,
    now: u64,
) -> Spend<Result<()>> {
    match current {
        None => Spend::Refuse(Err(unknown(id))),
        Some(e) => match refusal(e, tenant, subject, now) {
            Some(err) => Spend::Refuse(Err(err)),
            None => Spend::Spend(now, Ok(())),
        },
    }
}

/// Spends evidence `id` inside `txn` if it still passes every check at `now`;
/// `Ok(Err(..))` (nothing written) when it does not. Runs in the assertion's one write
/// job (`assertion::commit_assertion`), with its audit record.
pub(super) fn spend_checked_in(
    txn: &mut dyn Txn,
    id: &str,
    tenant: &str,
    subject: &str,
    now: u64,
) -> std::result::Result<Result<()>, Rollback> {
    let decided: TxnResult<Result<()>> =
        spend_in(txn, id, |current| decide(current, id, tenant, subject, now));
    Ok(decided?.unwrap_or_else(|e| Err(store_err(e))))
}

/// `requested` amr must be empty or the evidence's own (in any order).
fn claims_from(e: &EvidenceRecord, req: &AssertionRequest) -> Result<Claims> {
    let amr: Vec<String> = e.method.amr().iter().map(|m| (*m).to_owned()).collect();
    if !req.amr.is_empty() {
        let mut given = req.amr.clone();
        given.sort();
        given.dedup();
        let mut own = amr.clone();
        own.sort();
        if given != own || given.len() != req.amr.len() {
            return Err(invalid(format!(
                "amr {:?} contradicts the evidence (method {}: amr {:?}); leave amr empty",
                req.amr,
                e.method.as_str(),
                amr
            )));
        }
    }
    if req.auth_time != 0 && req.auth_time != e.auth_time {
        return Err(invalid(format!(
            "auth_time {} contradicts the evidence (authenticated at {}); leave auth_time 0",
            req.auth_time, e.auth_time
        )));
    }
    Ok(Claims {
        amr,
        auth_time: e.auth_time,
        txn_text_sha256: e.txn_text_sha256.map(|h| crate::common::hex(&h)),
    })
}

impl Signer {
    /// The basis of `req` for a caller with `grant` at `now`, with `acr` checked against
    /// it: refused before any HSM work when the evidence cannot back the request.
    pub(super) async fn basis(
        &self,
        grant: &Grant,
        req: &AssertionRequest,
        now: u64,
    ) -> Result<Basis> {
        if req.evidence_id.is_empty() {
            if !grant.unbound_assertions {
                return Err(Error::FailedPrecondition(format!(
                    "evidence_id is required: the caller's client rule {} does not allow \
                     unbound assertions (unbound_assertions = true)",
                    grant.rule
                )));
            }
            self.check_acr_known(&req.acr)?;
            return Ok(Basis::Unbound);
        }
        check_id(&req.evidence_id)?;
        let e = self
            .store
            .get_evidence(&req.evidence_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| unknown(&req.evidence_id))?;
        if let Some(err) = refusal(&e, &grant.tenant, &req.subject, now) {
            return Err(err);
        }
        self.check_acr_known(&req.acr)?;
        if !self.config.evidence_reaches(&req.acr, e.method) {
            let reached: Vec<&str> = self
                .config
                .acr
                .iter()
                .filter(|r| r.evidence.iter().any(|m| m == e.method.as_str()))
                .map(|r| r.value.as_str())
                .collect();
            return Err(Error::PermissionDenied(format!(
                "acr {:?} is not reached by {} evidence ([[signing.acr]]; it reaches: {})",
                req.acr,
                e.method.as_str(),
                if reached.is_empty() {
                    "nothing".to_owned()
                } else {
                    reached.join(", ")
                }
            )));
        }
        Ok(Basis::Evidence(e))
    }

    fn check_acr_known(&self, acr: &str) -> Result<()> {
        if !self.config.accepts_acr(acr) {
            return Err(invalid(format!(
                "acr {acr:?} is not an accepted value (accepted: {})",
                self.config.accepted_acr().join(", ")
            )));
        }
        Ok(())
    }

    /// `amr` and `auth_time` of an assertion on `basis`.
    pub(super) fn claims(basis: &Basis, req: &AssertionRequest) -> Result<Claims> {
        match basis {
            Basis::Evidence(e) => claims_from(e, req),
            Basis::Unbound => Ok(Claims {
                amr: req.amr.clone(),
                auth_time: req.auth_time,
                txn_text_sha256: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::AuthMethod;

    fn evidence() -> EvidenceRecord {
        EvidenceRecord {
            id: "0123456789abcdef0123456789abcdef".into(),
            tenant: "tenant-a".into(),
            credential_id: "c".into(),
            subject: "citizen-9".into(),
            method: AuthMethod::Otp,
            auth_time: 1_000,
            expires_at: 1_120,
            spent_at: None,
            txn_text_sha256: None,
        }
    }

    fn code(e: Option<Error>) -> &'static str {
        match e {
            None => "ok",
            Some(Error::PermissionDenied(_)) => "permission-denied",
            Some(Error::FailedPrecondition(_)) => "failed-precondition",
            Some(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_in_order_without_revealing_the_evidence() {
        let e = evidence();
        let spent = EvidenceRecord {
            spent_at: Some(1_010),
            ..evidence()
        };
        // (evidence, tenant, subject, now, expected)
        let table: [(&EvidenceRecord, &str, &str, u64, &str); 8] = [
            (&e, "tenant-a", "citizen-9", 1_000, "ok"),
            (&e, "tenant-a", "citizen-9", 1_119, "ok"),
            (&e, "tenant-a", "citizen-9", 1_120, "failed-precondition"),
            (&e, "tenant-b", "citizen-9", 1_000, "permission-denied"),
            (&e, "tenant-a", "citizen-8", 1_000, "permission-denied"),
            (
                &spent,
                "tenant-a",
                "citizen-9",
                1_011,
                "failed-precondition",
            ),
            // Another tenant learns nothing about spent or expired.
            (&spent, "tenant-b", "citizen-9", 9_999, "permission-denied"),
            (&e, "tenant-a", "citizen-8", 9_999, "permission-denied"),
        ];
        for (e, tenant, subject, now, expected) in table {
            let got = refusal(e, tenant, subject, now);
            if let Some(err) = &got {
                let m = err.to_string();
                for private in ["tenant-a", "citizen-9", "1120", "1010", "1000"] {
                    assert!(!m.contains(private), "{m}");
                }
            }
            assert_eq!(code(got), expected, "{tenant} {subject} {now}");
        }
        assert!(refusal(&e, "tenant-b", "citizen-9", 0)
            .expect("refused")
            .to_string()
            .contains("another tenant"));
        assert!(refusal(&spent, "tenant-a", "citizen-9", 0)
            .expect("refused")
            .to_string()
            .contains("already used"));
        assert!(refusal(&e, "tenant-a", "citizen-9", 2_000)
            .expect("refused")
            .to_string()
            .contains("expired"));
    }

    #[test]
    fn the_committer_spends_only_what_passes() {
        let e = evidence();
        assert_eq!(
            match decide(Some(&e), &e.id, "tenant-a", "citizen-9", 1_001) {
                Spend::Spend(at, Ok(())) => at,
                other => panic!("{other:?}"),
            },
            1_001
        );
        assert!(matches!(
            decide(Some(&e), &e.id, "tenant-b", "citizen-9", 1_001),
            Spend::Refuse(Err(Error::PermissionDenied(_)))
        ));
        assert!(matches!(
            decide(None, &e.id, "tenant-a", "citizen-9", 1_001),
            Spend::Refuse(Err(Error::NotFound(_)))
        ));
    }

    #[test]
    fn amr_and_auth_time_come_from_the_evidence() {
        let e = evidence();
        let req = |amr: &[&str], auth_time| AssertionRequest {
            amr: amr.iter().map(|s| (*s).to_owned()).collect(),
            auth_time,
            ..Default::default()
        };
        let want = Claims {
            amr: vec!["otp".into()],
            auth_time: 1_000,
            txn_text_sha256: None,
        };
        assert_eq!(claims_from(&e, &req(&[], 0)).unwrap(), want);
        assert_eq!(claims_from(&e, &req(&["otp"], 1_000)).unwrap(), want);
        for (amr, t) in [
            (&["pwd"][..], 0),
            (&["otp", "pwd"][..], 0),
            (&["otp", "otp"][..], 0),
            (&[][..], 999),
            (&["otp"][..], 1_001),
        ] {
            assert!(
                matches!(
                    claims_from(&e, &req(amr, t)),
                    Err(Error::InvalidArgument(_))
                ),
                "{amr:?} {t}"
            );
        }
    }

    #[test]
    fn evidence_ids_are_checked_before_any_lookup() {
        assert!(check_id("0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "0123456789abcdef0123456789abcde",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcdef0",
        ] {
            assert!(
                matches!(check_id(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }
}
