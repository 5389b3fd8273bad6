//! Approval challenges: [`Devices::create_challenge`], [`Devices::get_challenge`],
//! [`Devices::list_pending`], [`Devices::answer_challenge`].
//!
//! Rules (all decided inside the store job, under the subject's row lock):
//! * at most one PENDING challenge per subject: a new one cancels the older;
//! * at most `[devices] max_challenges_per_minute` created per subject and minute;
//! * an answer moves a PENDING challenge exactly once (the job re-reads it with a
//!   locking read): of concurrent answers one wins, the rest are FAILED_PRECONDITION;
//! * only an active device of the challenge's subject answers, with a signature over
//!   the payload, the decision and the binding code; a signature that does not verify
//!   changes nothing;
//! * a wrong binding code with APPROVE cancels the challenge and counts toward the
//!   subject's approval lock (`max_binding_failures` within `binding_lockout_seconds`);
//! * NOT_ME reports it (critical event) and, with `suspend_on_report`, suspends the
//!   subject's approvals for `report_suspend_seconds`;
//! * past `expires_at` a challenge is EXPIRED (written, with its event, when a job
//!   meets it).

use serde_json::json;
use subtle::ConstantTimeEq;

use super::payload::{self, ChallengeFields};
use super::records::{self, key, ChallengeRecord, ChallengeState, DeviceRecord, Purpose};
use super::signature::DeviceSignature;
use super::{
    check_id, check_subject, check_text, emit, invalid, nonce, precondition, registry, store_error,
    Caller, Devices, DEFAULT_CHALLENGE_TTL_SECONDS, LIST_CLOCK_SKEW_SECONDS,
    MAX_CHALLENGE_TTL_SECONDS, MAX_SERVICE_PROVIDER_CHARS, MAX_TEXT_CHARS,
};
use crate::audit::Details;
use crate::common::{AuthMethod, EventKind};
use crate::error::{Error, Result};
use crate::store::evidence::{insert_in as insert_evidence, EvidenceRecord};
use crate::store::{Rollback, Table, Txn};

/// A challenge to create.
#[derive(Debug, Clone)]
pub struct NewChallenge {
    /// The citizen.
    pub subject: String,
    /// What they approve.
    pub text: String,
    /// Who asks.
    pub service_provider: String,
    /// Why.
    pub purpose: Purpose,
    /// Seconds; 0 = 120.
    pub ttl_seconds: u32,
}

/// The citizen's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Approve (binding code required).
    Approve,
    /// Deny.
    Deny,
    /// Report: not initiated by the citizen.
    NotMe,
}

impl Decision {
    /// The ASCII name in the signed answer.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "APPROVE",
            Decision::Deny => "DENY",
            Decision::NotMe => "NOT_ME",
        }
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The challenge.
    pub challenge_id: String,
    /// The answering device.
    pub device_id: String,
    /// The decision.
    pub decision: Decision,
    /// Two digits for APPROVE, empty otherwise.
    pub binding_code: String,
    /// DER signature.
    pub signature: Vec<u8>,
}

/// The payload of `c`.
pub fn payload_of(c: &ChallengeRecord) -> Vec<u8> {
    payload::challenge(&ChallengeFields {
        challenge_id: &c.id,
        tenant: &c.tenant,
        subject: &c.subject,
        text: &c.text,
        service_provider: &c.service_provider,
        purpose: c.purpose.as_str(),
        created_at: c.created_at,
        expires_at: c.expires_at,
        nonce: &c.nonce,
    })
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no challenge {id:?}"))
}

/// Writes `c` as EXPIRED with its event when it is pending past its expiry at `now`;
/// whether it did.
fn expire_in(
    txn: &mut dyn Txn,
    c: &mut ChallengeRecord,
    now: u64,
    time_ms: u64,
) -> std::result::Result<bool, Rollback> {
    if c.state != ChallengeState::Pending || now < c.expires_at {
        return Ok(false);
    }
    c.state = ChallengeState::Expired;
    records::put(txn, Table::Challenges, &key(&c.tenant, &c.id), c)?;
    emit(
        txn,
        time_ms,
        EventKind::ChallengeExpired,
        &c.tenant,
        &c.subject,
        &c.id,
        json!({"purpose": c.purpose.as_str()}),
    )?;
    crate::metrics::challenge_state(metric_label(c.state));
    Ok(true)
}

/// The `state` label of `hsm_challenges_total` (counted in the transaction that makes the
/// change, after its writes: only a batch that then fails to commit, itself counted in
/// `hsm_store_failed_batches_total`, leaves a count without its change).
fn metric_label(state: ChallengeState) -> &'static str {
    match state {
        ChallengeState::Pending => "pending",
        ChallengeState::Approved => "approved",
        ChallengeState::Denied => "denied",
        ChallengeState::Reported => "reported",
        ChallengeState::Expired => "expired",
        ChallengeState::Cancelled => "cancelled",
    }
}

impl Devices {
    /// CreateChallenge.
    pub async fn create_challenge(
        &self,
        caller: &Caller,
        new: NewChallenge,
    ) -> Result<ChallengeRecord> {
        check_subject(&new.subject)?;
        check_text("text", &new.text, MAX_TEXT_CHARS, true)?;
        check_text(
            "service_provider",
            &new.service_provider,
            MAX_SERVICE_PROVIDER_CHARS,
            false,
        )?;
        let ttl = match new.ttl_seconds {
            0 => DEFAULT_CHALLENGE_TTL_SECONDS,
            t if t > MAX_CHALLENGE_TTL_SECONDS => {
                return Err(invalid(format!(
                    "ttl_seconds must be at most {MAX_CHALLENGE_TTL_SECONDS} (0 = {DEFAULT_CHALLENGE_TTL_SECONDS})"
                )))
            }
            t => t,
        };
        let id = self.new_id().await?;
        let binding_code = binding_code(&self.hsm).await?;
        let now = self.clock.now();
        let mut c = ChallengeRecord {
            tenant: caller.tenant.clone(),
            id: id.clone(),
            subject: new.subject,
            text: new.text,
            service_provider: new.service_provider,
            purpose: new.purpose,
            state: ChallengeState::Pending,
            binding_code,
            created_at: now,
            expires_at: now + u64::from(ttl),
            nonce: nonce(&self.hsm).await?,
            server_signature: Vec::new(),
            server_kid: String::new(),
            answered_by: String::new(),
            answered_at: 0,
            evidence_id: String::new(),
            used: false,
        };
        let signed = self.signer.sign_challenge(&payload_of(&c)).await?;
        c.server_signature = signed.der;
        c.server_kid = signed.kid;
        let per_minute = self.config.max_challenges_per_minute as usize;
        let time_ms = self.clock.now_ms();
        let audit = self.audit_event(caller, "challenge.create", &id);
        self.write(move |txn| {
            let sk = key(&c.tenant, &c.subject);
            let mut s = records::subject(txn, &c.tenant, &c.subject)?;
            if !records::devices_of(txn, &c.tenant, &s)?
                .iter()
                .any(DeviceRecord::active)
            {
                return Ok(Err(precondition(
                    "the subject has no active device to approve with",
                )));
            }
            s.recent_challenges.retain(|&t| t + 60 > now);
            if s.recent_challenges.len() >= per_minute {
                return Ok(Err(Error::ResourceExhausted(format!(
                    "the subject was sent {per_minute} challenges within a minute ([devices] max_challenges_per_minute); retry later"
                ))));
            }
            s.recent_challenges.push(now);
            let mut cancelled = String::new();
            if !s.pending.is_empty() {
                let pk = key(&c.tenant, &s.pending);
                if let Some(mut old) = records::get::<ChallengeRecord, _>(txn, Table::Challenges, &pk)? {
                    if !expire_in(txn, &mut old, now, time_ms)?
                        && old.state == ChallengeState::Pending
                    {
                        old.state = ChallengeState::Cancelled;
                        records::put(txn, Table::Challenges, &pk, &old)?;
                        cancelled = old.id.clone();
                    }
                }
            }
            s.pending = c.id.clone();
            records::put(txn, Table::DeviceSubjects, &sk, &s)?;
            records::insert_expiring(
                txn,
                records::Expiring::Challenge,
                &c.tenant,
                &c.id,
                c.expires_at,
                now,
                &c,
            )?;
            audit.append(
                txn,
                Details::new()
                    .str("subject", &c.subject)
                    .str("purpose", c.purpose.as_str())
                    .str("service_provider", &c.service_provider)
                    .str("text_sha256", &crate::audit::sha256_hex(c.text.as_bytes()))
                    .u64("expires_at", c.expires_at)
                    .str("cancelled", &cancelled),
            )?;
            emit(
                txn,
                time_ms,
                EventKind::ChallengeCreated,
                &c.tenant,
                &c.subject,
                &c.id,
                json!({
                    "purpose": c.purpose.as_str(),
                    "service_provider": c.service_provider,
                    "expires_at": c.expires_at,
                }),
            )?;
            if !cancelled.is_empty() {
                crate::metrics::challenge_state(metric_label(ChallengeState::Cancelled));
            }
            crate::metrics::challenge_state(metric_label(c.state));
            Ok(Ok(c))
        })
        .await
    }

    /// GetChallenge (state as of now).
    pub async fn get_challenge(&self, tenant: &str, id: &str) -> Result<ChallengeRecord> {
        check_id("challenge_id", id)?;
        let k = key(tenant, id);
        let mut c: ChallengeRecord = self
            .store
            .read(move |txn| records::get(txn, Table::Challenges, &k).map_err(|Rollback(e)| e))
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(id))?;
        c.state = c.state_at(self.clock.now());
        Ok(c)
    }

    /// ListPendingChallenges: the device's subject's pending challenge (at most one),
    /// for a signed, fresh, never-seen request of an active device.
    pub async fn list_pending(
        &self,
        tenant: &str,
        device_id: &str,
        timestamp: u64,
        signature: &[u8],
    ) -> Result<Vec<ChallengeRecord>> {
        check_id("device_id", device_id)?;
        let sig = DeviceSignature::parse("signature", signature)?;
        let now = self.clock.now();
        if timestamp.abs_diff(now) > LIST_CLOCK_SKEW_SECONDS {
            return Err(precondition(format!(
                "timestamp is more than {LIST_CLOCK_SKEW_SECONDS} s from the service's clock"
            )));
        }
        let d = self.device(tenant, device_id).await?;
        if !d.active() {
            return Err(precondition("the device is revoked"));
        }
        let key_ok = super::signature::DeviceKey::parse(&d.public_key)?
            .verifies(&payload::list_pending(device_id, timestamp), &sig);
        if !key_ok {
            return Err(Error::PermissionDenied(
                "signature does not verify with the device key".into(),
            ));
        }
        let dk = key(tenant, device_id);
        let time_ms = self.clock.now_ms();
        let tenant = tenant.to_owned();
        let id = device_id.to_owned();
        let out = self
            .store
            .write(move |txn| {
                let Some(mut d) = records::get::<DeviceRecord, _>(txn, Table::Devices, &dk)? else {
                    return Ok(Err(registry::not_found(&id)));
                };
                if !d.active() {
                    return Ok(Err(precondition("the device is revoked")));
                }
                if timestamp <= d.last_list_timestamp {
                    return Ok(Err(precondition(
                        "replayed request: timestamp must be later than the device's previous listing",
                    )));
                }
                d.last_list_timestamp = timestamp;
                d.last_used_at = now;
                records::put(txn, Table::Devices, &dk, &d)?;
                let s = records::subject(txn, &tenant, &d.subject)?;
                let mut out = Vec::new();
                if !s.pending.is_empty() {
                    let pk = key(&tenant, &s.pending);
                    if let Some(mut c) = records::get::<ChallengeRecord, _>(txn, Table::Challenges, &pk)? {
                        if !expire_in(txn, &mut c, now, time_ms)?
                            && c.state == ChallengeState::Pending
                        {
                            out.push(c);
                        }
                    }
                }
                Ok(Ok(out))
            })
            .await
            .map_err(store_error)?;
        out
    }

    /// AnswerChallenge.
    pub async fn answer_challenge(&self, caller: &Caller, a: Answer) -> Result<ChallengeRecord> {
        check_id("challenge_id", &a.challenge_id)?;
        check_id("device_id", &a.device_id)?;
        match a.decision {
            Decision::Approve => {
                if a.binding_code.len() != 2 || !a.binding_code.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(invalid(
                        "binding_code must be the two digits the citizen picked (APPROVE)",
                    ));
                }
            }
            Decision::Deny | Decision::NotMe => {
                if !a.binding_code.is_empty() {
                    return Err(invalid("binding_code must be empty for DENY and NOT_ME"));
                }
            }
        }
        let sig = DeviceSignature::parse("signature", &a.signature)?;
        let c = self.get_challenge(&caller.tenant, &a.challenge_id).await?;
        let d = self.device(&caller.tenant, &a.device_id).await?;
        let refusal = if d.subject != c.subject {
            Some("the device is not a device of the challenge's subject")
        } else {
            let message = payload::answer(&payload_of(&c), a.decision.as_str(), &a.binding_code);
            (!super::signature::DeviceKey::parse(&d.public_key)?.verifies(&message, &sig)).then_some(
                "signature does not verify with the device key over the payload, the decision and the binding code",
            )
        };
        if let Some(why) = refusal {
            // Nothing changes, but a forged or misdirected answer is on the record.
            self.record_refusal(
                caller,
                "challenge.answer",
                &c.id,
                Details::new()
                    .str("subject", &c.subject)
                    .str("device_id", &d.id)
                    .str("decision", a.decision.as_str())
                    .str("result", "REFUSED")
                    .str("reason", why),
            )
            .await?;
            return Err(Error::PermissionDenied(why.into()));
        }
        let evidence_id = if a.decision == Decision::Approve && c.purpose.gives_evidence() {
            self.new_id().await?
        } else {
            String::new()
        };
        let now = self.clock.now();
        let time_ms = self.clock.now_ms();
        let cfg = self.config.clone();
        let evidence_ttl = self.evidence_ttl_seconds;
        let audit = self.audit_event(caller, "challenge.answer", &a.challenge_id);
        let ck = key(&caller.tenant, &a.challenge_id);
        let dk = key(&caller.tenant, &a.device_id);
        let out = self.write(move |txn| {
            let Some(mut c) = records::get::<ChallengeRecord, _>(txn, Table::Challenges, &ck)? else {
                return Ok(Err(not_found(&a.challenge_id)));
            };
            if expire_in(txn, &mut c, now, time_ms)? {
                audit.append(txn, Details::new().str("subject", &c.subject).str("result", "EXPIRED"))?;
                return Ok(Err(precondition("the challenge has expired")));
            }
            if c.state != ChallengeState::Pending {
                return Ok(Err(precondition(format!(
                    "the challenge was already answered or closed: it is {}",
                    c.state.as_str()
                ))));
            }
            let Some(mut d) = records::get::<DeviceRecord, _>(txn, Table::Devices, &dk)? else {
                return Ok(Err(registry::not_found(&a.device_id)));
            };
            if !d.active() {
                return Ok(Err(precondition("the device is revoked")));
            }
            let sk = key(&c.tenant, &c.subject);
            let mut s = records::subject(txn, &c.tenant, &c.subject)?;
            if a.decision == Decision::Approve {
                if now < s.suspended_until {
                    return Ok(Err(precondition(format!(
                        "approvals of this subject are suspended after a NOT_ME report ([devices] report_suspend_seconds) for {} s more",
                        s.suspended_until - now
                    ))));
                }
                if now < s.locked_until {
                    return Ok(Err(precondition(format!(
                        "approvals of this subject are locked after wrong binding codes ([devices] max_binding_failures) for {} s more",
                        s.locked_until - now
                    ))));
                }
            }
            let mut details = Details::new()
                .str("subject", &c.subject)
                .str("device_id", &d.id)
                .str("decision", a.decision.as_str());
            let (state, kind) = match a.decision {
                Decision::Approve => {
                    let right = bool::from(a.binding_code.as_bytes().ct_eq(c.binding_code.as_bytes()));
                    if right {
                        (ChallengeState::Approved, EventKind::ChallengeApproved)
                    } else {
                        let window = cfg.binding_lockout_seconds;
                        s.binding_failures.retain(|&t| t + window > now);
                        s.binding_failures.push(now);
                        if s.binding_failures.len() >= cfg.max_binding_failures as usize {
                            s.locked_until = now + window;
                            s.binding_failures.clear();
                            details = details.u64("locked_until", s.locked_until);
                        }
                        (ChallengeState::Cancelled, EventKind::ChallengeDenied)
                    }
                }
                Decision::Deny => (ChallengeState::Denied, EventKind::ChallengeDenied),
                Decision::NotMe => {
                    if cfg.suspend_on_report {
                        s.suspended_until = now + cfg.report_suspend_seconds;
                        details = details.u64("suspended_until", s.suspended_until);
                    }
                    (ChallengeState::Reported, EventKind::ChallengeReported)
                }
            };
            c.state = state;
            c.answered_by = d.id.clone();
            c.answered_at = now;
            if state == ChallengeState::Approved && c.purpose.gives_evidence() {
                c.evidence_id = evidence_id;
                let e = EvidenceRecord {
                    id: c.evidence_id.clone(),
                    tenant: c.tenant.clone(),
                    credential_id: d.id.clone(),
                    subject: c.subject.clone(),
                    method: AuthMethod::App,
                    auth_time: now,
                    expires_at: now + evidence_ttl,
                    spent_at: None,
                    txn_text_sha256: (c.purpose == Purpose::Transaction).then(|| {
                        let h = ring::digest::digest(&ring::digest::SHA256, c.text.as_bytes());
                        let mut out = [0u8; 32];
                        out.copy_from_slice(h.as_ref());
                        out
                    }),
                };
                insert_evidence(txn, &e, now)?;
                details = details.str("evidence_id", &c.evidence_id);
            }
            if s.pending == c.id {
                s.pending.clear();
            }
            records::put(txn, Table::DeviceSubjects, &sk, &s)?;
            records::put(txn, Table::Challenges, &ck, &c)?;
            d.last_used_at = now;
            records::put(txn, Table::Devices, &dk, &d)?;
            audit.append(txn, details.str("result", state.as_str()))?;
            let mut ev = json!({"purpose": c.purpose.as_str(), "device_id": d.id});
            if state == ChallengeState::Cancelled {
                ev["reason"] = json!("wrong_binding_code");
            }
            emit(txn, time_ms, kind, &c.tenant, &c.subject, &c.id, ev)?;
            crate::metrics::challenge_state(metric_label(state));
            Ok(Ok(c))
        });
        out.await
    }
}

/// Two decimal digits, uniform (rejection sampling of HSM random bytes).
async fn binding_code(hsm: &crate::hsm::Hsm) -> Result<String> {
    loop {
        for &b in hsm.random(8).await?.iter() {
            if b < 200 {
                return Ok(format!("{:02}", b % 100));
            }
        }
    }
}
