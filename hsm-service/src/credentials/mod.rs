//! Credential lifecycle and verification: enrolment (seed generated in the HSM or
//! imported, kept only wrapped), constant-time verification with replay protection and
//! lockout, resync, state changes.
//!
//! The verification hot path, in order:
//! 1. read the record (a few µs, no lock);
//! 2. refuse at once, without HSM work, when disabled or locked;
//! 3. compute the HMAC of every candidate in the window in the HSM, always all of them;
//! 4. truncate each and compare with the submitted code in constant time (`subtle`),
//!    folding without an early exit;
//! 5. decide in one atomic, durable store update (group commit): accept only a
//!    step/counter beyond the last accepted one, otherwise REPLAYED; count failures.
//!    An accepted code of a credential with a subject leaves an evidence record in the
//!    same commit (see [`crate::store::evidence`]); its id goes back to the caller.
//!
//! Every credential belongs to a tenant (the login service that created it) and every
//! operation names the tenant: another tenant's id is answered exactly like an id that
//! does not exist.

mod audit;
pub mod binding;
pub mod import;
pub mod policy;
pub mod rotation;
#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::audit::log::{append_in, AuditLog};
use crate::audit::{Actor, Event};
pub use crate::common::Clock;
use crate::common::{AuthMethod, EventKind};
use crate::error::{Error, Result};
use crate::hsm::Hsm;
use crate::otp::{self, Digits, HashAlgorithm, OtpKind, ProvisioningParams};
use crate::store::events;
use crate::store::{
    CredentialKey, CredentialRecord, CredentialStore, EvidenceRecord, ReadTxn, Rollback, Store,
    StoreError, Txn, TxnResult, Update,
};
pub use policy::{LockChange, LockState, Outcome, Policy, Verdict};

/// Store meta key holding the current seed master key version.
pub const MASTER_KEY_VERSION_META: &str = "credentials.seed_master_key_version";

/// Longest credential id.
pub const MAX_ID_LEN: usize = 128;

/// Longest subject.
pub const MAX_SUBJECT_LEN: usize = 128;

/// Evidence lifetime when none is configured, in seconds (a configuration default).
pub use crate::config::DEFAULT_EVIDENCE_TTL_SECONDS;

/// Import seeds: at least 80 bits (the shortest seeds in circulation), at most 64 bytes.
pub const SEED_LEN: std::ops::RangeInclusive<usize> = 10..=64;

/// A credential to enrol, validated by [`Credentials::create`].
pub struct NewCredential {
    /// Caller's id; `None` to generate one.
    pub id: Option<String>,
    /// HOTP or TOTP.
    pub kind: OtpKind,
    /// HMAC hash.
    pub algorithm: HashAlgorithm,
    /// Code length, 6..8.
    pub digits: u32,
    /// TOTP step in seconds (0 = 30); must be 0 for HOTP.
    pub period_seconds: u32,
    /// Seed to import; `None` to have the HSM generate one.
    pub seed: Option<Zeroizing<Vec<u8>>>,
    /// Return the provisioning URI (generated seeds only).
    pub reveal_seed: bool,
    /// Issuer for authenticator apps.
    pub issuer: String,
    /// Account name for authenticator apps.
    pub account_name: String,
    /// HOTP: the token's current counter.
    pub initial_counter: u64,
    /// The citizen's pseudonymous id at the login service; `None`: the credential
    /// produces no evidence.
    pub subject: Option<String>,
}

impl std::fmt::Debug for NewCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewCredential")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("algorithm", &self.algorithm)
            .field("digits", &self.digits)
            .field("seed", &self.seed.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// An enrolled credential.
pub struct Created {
    /// The stored record (its seed wrapped).
    pub record: CredentialRecord,
    /// The otpauth:// URI, when a reveal was asked for.
    pub provisioning_uri: Option<Zeroizing<String>>,
}

/// The answer to a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The verdict.
    pub outcome: Outcome,
    /// The evidence of an ACCEPTED code of a credential with a subject.
    pub evidence_id: Option<String>,
}

/// State changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Verify codes again.
    Enable,
    /// Refuse every code.
    Disable,
    /// Lift any lock and reset the failure count.
    Unlock,
}

/// The credential service.
pub struct Credentials<S: CredentialStore> {
    hsm: Hsm,
    store: Arc<S>,
    policy: Policy,
    /// The master key new seeds are wrapped under, as last seen: a cache of the store's
    /// [`MASTER_KEY_VERSION_META`], which a rotation (on any instance) moves on while the
    /// service runs; every enrolment checks it in its own unit of work and moves this on
    /// when it was stale (verification uses each record's own version).
    master_key_version: Arc<AtomicU32>,
    clock: Clock,
    audit: Option<Arc<AuditLog>>,
    evidence_ttl_seconds: u64,
    rng: ring::rand::SystemRandom,
}

impl<S: CredentialStore> Credentials<S> {
    /// Record every verification and resync in `log`, in the same commit as its state.
    pub fn with_audit(mut self, log: Arc<AuditLog>) -> Self {
        self.audit = Some(log);
        self
    }

    /// Evidence of accepted codes expires `seconds` after the verification.
    pub fn with_evidence_ttl(mut self, seconds: u64) -> Self {
        self.evidence_ttl_seconds = seconds;
        self
    }

    /// Wire the service. `master_key_version` must exist on the token (see
    /// [`ensure_master_key`]).
    pub fn new(
        hsm: Hsm,
        store: Arc<S>,
        policy: Policy,
        master_key_version: u32,
        clock: Clock,
    ) -> Self {
        Credentials {
            hsm,
            store,
            policy,
            master_key_version: Arc::new(AtomicU32::new(master_key_version)),
            clock,
            audit: None,
            evidence_ttl_seconds: DEFAULT_EVIDENCE_TTL_SECONDS,
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// The master key version new enrolments try first (the store's is authoritative),
    /// shared with this instance's rotator.
    pub fn master_key_version(&self) -> Arc<AtomicU32> {
        self.master_key_version.clone()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Enrol a credential for `tenant` (recorded as done by the service; see
    /// [`Credentials::create_by`]).
    pub async fn create(&self, tenant: &str, new: NewCredential) -> Result<Created> {
        self.create_by(None, tenant, new).await
    }

    /// Enrol a credential of `tenant` for `actor`; with an audit log, the record is
    /// written in the same commit as the credential.
    pub async fn create_by(
        &self,
        actor: Option<&Actor>,
        tenant: &str,
        new: NewCredential,
    ) -> Result<Created> {
        check_tenant(tenant)?;
        if let Some(subject) = &new.subject {
            check_subject(subject)?;
        }
        let digits = Digits::new(new.digits).map_err(|_| invalid("digits must be 6, 7 or 8"))?;
        let period_seconds = match (new.kind, new.period_seconds) {
            (OtpKind::Totp, 0) => 30,
            (OtpKind::Totp, p @ 1..=300) => p,
            (OtpKind::Totp, _) => {
                return Err(invalid("period_seconds must be 1..300 (0 means 30)"))
            }
            (OtpKind::Hotp, 0) => 0,
            (OtpKind::Hotp, _) => return Err(invalid("period_seconds is for TOTP only")),
        };
        if new.kind == OtpKind::Totp && new.initial_counter != 0 {
            return Err(invalid("initial_counter is for HOTP only"));
        }
        if new.initial_counter == u64::MAX {
            return Err(invalid("initial_counter is out of range"));
        }
        check_label("issuer", &new.issuer, 64)?;
        check_label("account_name", &new.account_name, 128)?;
        if let Some(seed) = &new.seed {
            if !SEED_LEN.contains(&seed.len()) {
                return Err(invalid(format!(
                    "seed must be {} to {} bytes, got {}",
                    SEED_LEN.start(),
                    SEED_LEN.end(),
                    seed.len()
                )));
            }
            if new.reveal_seed {
                return Err(invalid("reveal_seed is for generated seeds only"));
            }
        }
        let id = match new.id {
            Some(id) => {
                check_id(&id)?;
                id
            }
            None => generated_id(&self.hsm).await?,
        };
        let issuer = if new.issuer.is_empty() {
            self.policy.default_issuer.clone()
        } else {
            new.issuer
        };

        // A cached guess: the unit of work that inserts the record checks it (below).
        let version = self.master_key_version.load(Ordering::SeqCst);
        let alg = new.algorithm;
        let params = ProvisioningParams {
            kind: new.kind,
            algorithm: alg,
            digits,
            period: period_seconds,
            counter: new.initial_counter,
            issuer: &issuer,
            account_name: &new.account_name,
        };
        let (wrapped_seed, mut provisioning_uri) = self
            .wrap_new_seed(version, new.seed.as_ref(), new.reveal_seed, &params)
            .await?;
        let now = self.clock.now();
        let mut record = CredentialRecord {
            tenant: tenant.to_owned(),
            id,
            subject: new.subject,
            kind: new.kind,
            algorithm: alg,
            digits: digits.get(),
            period_seconds,
            t0: self.policy.totp_t0,
            wrapped_seed,
            master_key_version: version,
            seed_binding: None,
            issuer,
            account_name: new.account_name,
            last_accepted: None,
            next_counter: new.initial_counter,
            drift_steps: 0,
            failures: 0,
            failure_times: Vec::new(),
            locked_until: 0,
            hard_locked: false,
            disabled: false,
            created_at: now,
            updated_at: now,
        };
        record.seed_binding = Some(binding::compute(&self.hsm, &record).await?);
        // The unit of work that inserts the record reads the current master key version
        // again (a locking read of its meta row): a rotation switched meanwhile, on this
        // instance or another, is seen there, and the seed is wrapped again under the
        // current key. So nothing commits under a key a rotation has switched away from,
        // and the rotation's one pass over the records misses nothing.
        let mut moves = 0;
        loop {
            let expected = record.master_key_version;
            let check = move |txn: &mut dyn Txn| {
                Ok(master_key_version_in(txn)?.map(|v| (v != expected).then_some(v)))
            };
            let audit = self
                .audit_event(actor, "credential.create", &record.id)
                .map(|(e, chain)| {
                    (
                        audit::created_event(e, &record, provisioning_uri.is_some()),
                        chain,
                    )
                });
            let notice = Notice::of(&record, self.clock.now_ms());
            let details = format!(r#"{{"kind":"{}"}}"#, record.kind.uri_name());
            let inserted = self
                .store
                .insert_unless(record.clone(), check, move |txn| {
                    if let Some((event, chain)) = audit {
                        append_in(txn, &chain, event)?;
                    }
                    notice.emit(txn, EventKind::CredentialCreated, details)
                })
                .await;
            let moved = inserted.map_err(|e| match e {
                StoreError::AlreadyExists => {
                    Error::AlreadyExists(format!("credential {:?} exists", record.id))
                }
                other => store_error(other),
            })?;
            let Some(current) = moved else { break };
            moves += 1;
            if moves > 3 {
                return Err(Error::Unavailable(
                    "the seed master key version kept moving during the enrolment; retry".into(),
                ));
            }
            self.master_key_version.fetch_max(current, Ordering::SeqCst);
            let params = ProvisioningParams {
                kind: record.kind,
                algorithm: record.algorithm,
                digits,
                period: record.period_seconds,
                counter: new.initial_counter,
                issuer: &record.issuer,
                account_name: &record.account_name,
            };
            let (blob, uri) = self
                .wrap_new_seed(current, new.seed.as_ref(), new.reveal_seed, &params)
                .await?;
            record.wrapped_seed = blob;
            record.master_key_version = current;
            record.seed_binding = Some(binding::compute(&self.hsm, &record).await?);
            provisioning_uri = uri;
        }
        self.audited();
        tracing::info!(tenant, credential = %record.id, kind = ?record.kind, "credential created");
        Ok(Created {
            record,
            provisioning_uri,
        })
    }

    /// Verify a code of `tenant`'s credential (recorded as done by the service; see
    /// [`Credentials::verify_by`]).
    pub async fn verify(&self, tenant: &str, id: &str, code: &str) -> Result<Outcome> {
        Ok(self.verify_by(None, tenant, id, code).await?.outcome)
    }

    /// Verify a code of `tenant`'s credential for `actor`. With an audit log every
    /// attempt is recorded, once, before the answer: a decided verification in the same
    /// commit as the state it leaves (and, for an accepted code of a credential with a
    /// subject, as its evidence), any other end (unknown id, malformed code, locked,
    /// disabled) in one audit-only write.
    pub async fn verify_by(
        &self,
        actor: Option<&Actor>,
        tenant: &str,
        id: &str,
        code: &str,
    ) -> Result<Verified> {
        let event = self.audit_event(actor, "credential.verify", id);
        match self.decide_verify(tenant, id, code, event.clone()).await {
            Ok((verified, lock)) => {
                self.audited();
                log_lock(tenant, id, lock);
                Ok(verified)
            }
            Err(stop) => Ok(Verified {
                outcome: self.record_stop(event, tenant, stop).await?,
                evidence_id: None,
            }),
        }
    }

    /// A fresh evidence id: 128 bits from the system RNG, 32 lower-case hex digits.
    fn evidence_id(&self) -> Result<String> {
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut bytes)
            .map_err(|_| Error::Internal("system RNG failed".into()))?;
        Ok(crate::common::hex(&bytes))
    }

    /// The evidence an accepted code of `rec` at `now` leaves (`None` without a subject).
    /// Drawn before the commit (the committer must not wait for an RNG), kept only if
    /// the code is accepted.
    fn evidence_of(&self, rec: &CredentialRecord, now: u64) -> Result<Option<EvidenceRecord>> {
        let Some(subject) = &rec.subject else {
            return Ok(None);
        };
        Ok(Some(EvidenceRecord {
            id: self.evidence_id()?,
            tenant: rec.tenant.clone(),
            credential_id: rec.id.clone(),
            subject: subject.clone(),
            method: AuthMethod::Otp,
            auth_time: now,
            expires_at: now.saturating_add(self.evidence_ttl_seconds),
            spent_at: None,
            txn_text_sha256: None,
        }))
    }

    /// The verification up to its decision, which commits with `event`'s record and,
    /// when the code is accepted, the evidence.
    async fn decide_verify(
        &self,
        tenant: &str,
        id: &str,
        code: &str,
        event: Option<(Event, Arc<str>)>,
    ) -> std::result::Result<(Verified, Option<LockChange>), audit::Stop> {
        let rec = self.get(tenant, id).await?;
        let digits = Digits::new(u32::from(rec.digits))
            .map_err(|_| Error::Internal("stored digits out of range".into()))?;
        let submitted = otp::parse_code(code, digits)
            .map_err(|_| invalid(format!("code must be exactly {} digits", digits.get())))?;
        let now = self.clock.now();
        if let Some(refused) = policy::gate(&rec, now, &self.policy) {
            return Err(audit::Stop::Gate(refused));
        }
        let window = policy::verify_window(&rec, now, &self.policy).map_err(otp_state)?;
        let codes = self.codes(&rec, window.clone(), digits).await?;
        let matched =
            ct_to_option(otp::find_match(submitted, &codes)).map(|i| window.start() + u64::from(i));
        let policy = self.policy.clone();
        let evidence = self.evidence_of(&rec, now)?;
        let evidence_id = evidence.as_ref().map(|e| e.id.clone());
        let audit_tenant = tenant.to_owned();
        let notice = Notice::of(&rec, self.clock.now_ms());
        let seed = rec.wrapped_seed;
        let (outcome, lock, _) = self
            .store
            .update_with(
                tenant,
                id,
                move |r| {
                    if r.wrapped_seed != seed {
                        return Update::Keep(None);
                    }
                    let before = LockState::of(r);
                    match policy::apply_verify(r, matched, now, &policy) {
                        Update::Write(o) => Update::Write(Some((o, before.change(r), r.failures))),
                        Update::Keep(o) => Update::Keep(Some((o, None, r.failures))),
                        Update::Delete(o) => Update::Delete(Some((o, None, r.failures))),
                    }
                },
                move |d: &Option<(Outcome, Option<LockChange>, u32)>, txn: &mut dyn Txn| {
                    let decided = d.map(|(o, l, _)| (o, l));
                    let accepted = decided.is_some_and(|(o, _)| o.verdict == Verdict::Accepted);
                    let evidence = evidence.filter(|_| accepted);
                    let evidence_id = evidence.as_ref().map(|e| e.id.as_str());
                    record_decision(txn, event, &audit_tenant, decided.as_ref(), evidence_id)?;
                    if let Some(e) = evidence {
                        crate::store::evidence::insert_in(txn, &e, e.auth_time)?;
                    }
                    if let Some((o, lock, failures)) = d {
                        notice.decision(txn, o.verdict, *lock, *failures)?;
                    }
                    Ok(())
                },
            )
            .await
            .map_err(|e| not_found_or(e, id))?
            .ok_or(audit::Stop::Recorded(changed()))?;
        let verified = Verified {
            outcome,
            evidence_id: evidence_id.filter(|_| outcome.verdict == Verdict::Accepted),
        };
        Ok((verified, lock))
    }

    /// Record an attempt that `stop` ended before its decision (one audit-only write),
    /// then answer it.
    async fn record_stop(
        &self,
        event: Option<(Event, Arc<str>)>,
        tenant: &str,
        stop: audit::Stop,
    ) -> Result<Outcome> {
        let (record, answer) = stop.into_record(event.map(|(e, _)| e), tenant);
        if let (Some(record), Some(log)) = (record, &self.audit) {
            log.record(record).await?;
        }
        answer
    }

    /// Resynchronise `tenant`'s credential from two consecutive codes (recorded as done by
    /// the service).
    pub async fn resync(
        &self,
        tenant: &str,
        id: &str,
        code1: &str,
        code2: &str,
    ) -> Result<(Outcome, CredentialRecord)> {
        self.resync_by(None, tenant, id, code1, code2).await
    }

    /// Resynchronise `tenant`'s credential for `actor`, recorded like a verification.
    pub async fn resync_by(
        &self,
        actor: Option<&Actor>,
        tenant: &str,
        id: &str,
        code1: &str,
        code2: &str,
    ) -> Result<(Outcome, CredentialRecord)> {
        let event = self.audit_event(actor, "credential.resync", id);
        match self
            .decide_resync(tenant, id, code1, code2, event.clone())
            .await
        {
            Ok((outcome, lock, rec)) => {
                self.audited();
                log_lock(tenant, id, lock);
                if outcome.verdict == Verdict::Accepted {
                    tracing::info!(tenant, credential = id, "credential resynchronised");
                }
                Ok((outcome, rec))
            }
            Err((stop, rec)) => {
                let outcome = self.record_stop(event, tenant, stop).await?;
                // A gate refusal answers with the record as read.
                rec.map(|rec| (outcome, rec))
                    .ok_or_else(|| Error::Internal("resync refused without a record".into()))
            }
        }
    }

    /// The resync up to its decision, which commits with `event`'s record. A stop carries
    /// the record it read, when it got that far.
    async fn decide_resync(
        &self,
        tenant: &str,
        id: &str,
        code1: &str,
        code2: &str,
        event: Option<(Event, Arc<str>)>,
    ) -> std::result::Result<
        (Outcome, Option<LockChange>, CredentialRecord),
        (audit::Stop, Option<CredentialRecord>),
    > {
        let stop = |e: Error| (audit::Stop::Error(e), None);
        let rec = self.get(tenant, id).await.map_err(stop)?;
        let digits = Digits::new(u32::from(rec.digits))
            .map_err(|_| stop(Error::Internal("stored digits out of range".into())))?;
        let c1 = otp::parse_code(code1, digits).map_err(|_| {
            stop(invalid(format!(
                "code1 must be exactly {} digits",
                digits.get()
            )))
        })?;
        let c2 = otp::parse_code(code2, digits).map_err(|_| {
            stop(invalid(format!(
                "code2 must be exactly {} digits",
                digits.get()
            )))
        })?;
        let now = self.clock.now();
        if let Some(refused) = policy::gate(&rec, now, &self.policy) {
            return Err((audit::Stop::Gate(refused), Some(rec)));
        }
        let window =
            policy::resync_window(&rec, now, &self.policy).map_err(|e| stop(otp_state(e)))?;
        let current_step = match rec.kind {
            OtpKind::Totp => {
                otp::totp_step(now, rec.t0, rec.period_seconds).map_err(|e| stop(otp_state(e)))?
            }
            OtpKind::Hotp => 0,
        };
        let codes = self
            .codes(&rec, window.clone(), digits)
            .await
            .map_err(stop)?;
        let matched = ct_to_option(otp::find_consecutive(c1, c2, &codes))
            .map(|i| window.start() + u64::from(i) + 1);
        let policy = self.policy.clone();
        let notice = Notice::of(&rec, self.clock.now_ms());
        let seed = rec.wrapped_seed;
        let audit_tenant = tenant.to_owned();
        self.store
            .update_with(
                tenant,
                id,
                move |r| {
                    if r.wrapped_seed != seed {
                        return Update::Keep(None);
                    }
                    let before = LockState::of(r);
                    let decided = policy::apply_resync(r, matched, current_step, now, &policy);
                    let lock = before.change(r);
                    let snapshot = r.clone();
                    match decided {
                        Update::Write(o) => Update::Write(Some((o, lock, snapshot))),
                        Update::Keep(o) => Update::Keep(Some((o, None, snapshot))),
                        Update::Delete(o) => Update::Delete(Some((o, None, snapshot))),
                    }
                },
                move |r: &Option<(Outcome, Option<LockChange>, CredentialRecord)>,
                      txn: &mut dyn Txn| {
                    let decided = r.as_ref().map(|(o, l, _)| (*o, *l));
                    record_decision(txn, event, &audit_tenant, decided.as_ref(), None)?;
                    if let Some((_, Some(_), _)) = r {
                        let reason = r#"{"reason":"failures"}"#.into();
                        notice.emit(txn, EventKind::CredentialLocked, reason)?;
                    }
                    Ok(())
                },
            )
            .await
            .map_err(|e| stop(not_found_or(e, id)))?
            .ok_or((audit::Stop::Recorded(changed()), None))
    }

    /// One credential of `tenant`.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<CredentialRecord> {
        check_id(id)?;
        check_tenant(tenant)?;
        self.store
            .get(tenant, id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(id))
    }

    /// A page of credentials after `after`: of `tenant` only, or of every tenant.
    pub async fn list(
        &self,
        tenant: Option<&str>,
        after: Option<&CredentialKey>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>> {
        if let Some(t) = tenant {
            check_tenant(t)?;
        }
        self.store
            .list(tenant, after, limit)
            .await
            .map_err(store_error)
    }

    /// Enable, disable or unlock `tenant`'s credential (recorded as done by the service;
    /// see [`Credentials::update_state_by`]).
    pub async fn update_state(
        &self,
        tenant: &str,
        id: &str,
        action: Action,
    ) -> Result<CredentialRecord> {
        self.update_state_by(None, "service", tenant, id, action)
            .await
    }

    /// Enable, disable or unlock `tenant`'s credential for `actor` (whose role is `by`,
    /// named in the event), recorded in the same commit as the change.
    pub async fn update_state_by(
        &self,
        actor: Option<&Actor>,
        by: &str,
        tenant: &str,
        id: &str,
        action: Action,
    ) -> Result<CredentialRecord> {
        check_id(id)?;
        check_tenant(tenant)?;
        let now = self.clock.now();
        let event = self.audit_event(actor, audit::state_action(action), id);
        let (time_ms, details) = (self.clock.now_ms(), format!(r#"{{"by":"{by}"}}"#));
        let kind = match action {
            Action::Enable => EventKind::CredentialEnabled,
            Action::Disable => EventKind::CredentialDisabled,
            Action::Unlock => EventKind::CredentialUnlocked,
        };
        let rec = self
            .store
            .update_with(
                tenant,
                id,
                move |r| {
                    match action {
                        Action::Enable => r.disabled = false,
                        Action::Disable => r.disabled = true,
                        Action::Unlock => policy::forget_failures(r),
                    }
                    r.updated_at = now;
                    Update::Write(r.clone())
                },
                move |r: &CredentialRecord, txn: &mut dyn Txn| {
                    if let Some((e, chain)) = event {
                        append_in(txn, &chain, audit::state_event(e, r))?;
                    }
                    Notice::of(r, time_ms).emit(txn, kind, details)
                },
            )
            .await
            .map_err(|e| not_found_or(e, id))?;
        self.audited();
        tracing::info!(tenant, credential = id, ?action, "credential state changed");
        Ok(rec)
    }

    /// Remove `tenant`'s credential (recorded as done by the service; see
    /// [`Credentials::delete_by`]).
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<()> {
        self.delete_by(None, tenant, id).await
    }

    /// Remove `tenant`'s credential for `actor` (its wrapped seed goes with it), recorded
    /// in the same commit.
    pub async fn delete_by(&self, actor: Option<&Actor>, tenant: &str, id: &str) -> Result<()> {
        check_id(id)?;
        check_tenant(tenant)?;
        // The subject for the event (it never changes, so reading it first is exact).
        let rec = self.get(tenant, id).await?;
        let notice = Notice::of(&rec, self.clock.now_ms());
        let audit = self
            .audit_event(actor, "credential.delete", id)
            .map(|(e, chain)| {
                let tenant = crate::audit::Details::new().str("tenant", tenant);
                (e.with_details(tenant), chain)
            });
        let existed = self
            .store
            .delete_with(tenant, id, move |txn| {
                if let Some((event, chain)) = audit {
                    append_in(txn, &chain, event)?;
                }
                notice.emit(txn, EventKind::CredentialDeleted, "{}".into())
            })
            .await
            .map_err(store_error)?;
        if existed {
            self.audited();
            // Its unwrapped seed goes from the HSM's session objects too. (A blob is its
            // credential's own: a re-created id gets a new one.)
            if let Some(bound) = binding::cached_under(&rec) {
                self.hsm
                    .forget_seed(Arc::from(rec.wrapped_seed.as_slice()), bound);
            }
            tracing::info!(tenant, credential = id, "credential deleted");
            Ok(())
        } else {
            Err(not_found(id))
        }
    }

    /// The event a call by `actor` on credential `id` will record, and the audit chain it
    /// goes to, when there is an audit log (the builders in `audit` add the tenant to its
    /// details).
    fn audit_event(
        &self,
        actor: Option<&Actor>,
        action: &'static str,
        id: &str,
    ) -> Option<(Event, Arc<str>)> {
        let log = self.audit.as_ref()?;
        let actor = actor.cloned().unwrap_or_else(Actor::service);
        Some((
            Event::new(self.clock.now_ms(), actor, action, id),
            log.chain(),
        ))
    }

    /// A new seed wrapped under master key `version`: `seed` imported, or generated in
    /// the HSM (`reveal`: generated here and returned once, as its provisioning URI).
    async fn wrap_new_seed(
        &self,
        version: u32,
        seed: Option<&Zeroizing<Vec<u8>>>,
        reveal: bool,
        params: &ProvisioningParams<'_>,
    ) -> Result<(Vec<u8>, Option<Zeroizing<String>>)> {
        let alg = params.algorithm;
        Ok(match (seed, reveal) {
            (Some(seed), _) => (
                self.hsm
                    .wrap_seed(version, otp::pad_seed(seed, alg))
                    .await?,
                None,
            ),
            (None, false) => (
                self.hsm
                    .generate_wrapped_seed(version, alg.digest_len())
                    .await?,
                None,
            ),
            (None, true) => {
                // The one moment a generated seed is in host memory: the enrolment reveal.
                let seed = self.hsm.random(alg.digest_len()).await?;
                let uri = otp::provisioning_uri(&seed, params);
                let wrapped = self
                    .hsm
                    .wrap_seed(version, otp::pad_seed(&seed, alg))
                    .await?;
                (wrapped, Some(uri))
            }
        })
    }

    /// Tell the audit log that a record was appended through the store.
    fn audited(&self) {
        if let Some(log) = &self.audit {
            log.appended(1);
        }
    }

    /// Candidate codes for every factor of `window`, all computed by the HSM.
    async fn codes(
        &self,
        rec: &CredentialRecord,
        window: std::ops::RangeInclusive<u64>,
        digits: Digits,
    ) -> Result<Vec<u32>> {
        let factors: Vec<[u8; 8]> = window.map(otp::moving_factor).collect();
        let len = rec.algorithm.digest_len();
        // The HSM checks the binding before it unwraps (once per cached handle).
        let bound = binding::expected(rec)?;
        let macs = self
            .hsm
            .seed_macs(
                rec.master_key_version,
                Arc::from(rec.wrapped_seed.as_slice()),
                bound,
                rec.algorithm,
                factors,
            )
            .await
            .map_err(|e| binding::refused(rec, e))?;
        Ok(macs
            .chunks_exact(len)
            .map(|mac| otp::truncate(mac, digits))
            .collect())
    }
}

impl Credentials<Store> {
    /// The seed master key rotation of this service (the `rotate-seed-master-key`
    /// ceremony step runs it): it moves [`Credentials::master_key_version`] on.
    pub fn seed_rotator(&self) -> rotation::SeedRotator {
        rotation::SeedRotator::new(
            self.hsm.clone(),
            self.store.clone(),
            self.master_key_version.clone(),
        )
    }
}

/// The seed master key version new enrolments wrap under, as `txn` sees it (inside a
/// write transaction a locking read, so no rotation's switch can commit between it and
/// the commit). Absent: 1, what the service records on its first start.
pub(crate) fn master_key_version_in<T: ReadTxn + ?Sized>(txn: &mut T) -> TxnResult<u32> {
    Ok(decode_version(
        MASTER_KEY_VERSION_META,
        crate::store::ops::get_meta(txn, MASTER_KEY_VERSION_META)?,
    )
    .map(|v| v.unwrap_or(1)))
}

/// A stored master key version (4 bytes, big-endian).
pub(crate) fn decode_version(
    key: &str,
    bytes: Option<Vec<u8>>,
) -> std::result::Result<Option<u32>, StoreError> {
    bytes
        .map(|b| {
            <[u8; 4]>::try_from(b.as_slice())
                .map(u32::from_be_bytes)
                .map_err(|_| StoreError::Corrupt(format!("{key} is not a 4-byte version")))
        })
        .transpose()
}

/// Make sure the store's seed master key exists on the token, creating it on first start.
/// Refuses when the store holds credentials but the token lacks their master key (a
/// wrong token): creating a new key then would make every stored seed unusable.
pub async fn ensure_master_key<S: CredentialStore>(
    hsm: &Hsm,
    store: &S,
    version: u32,
) -> Result<()> {
    let label = crate::hsm::seeds::master_key_label(version);
    let present = hsm
        .find_object(crate::hsm::objects::ObjectClass::SECRET_KEY, &label)
        .await?
        .is_some();
    if !present {
        let count = store.count().await.map_err(store_error)?;
        if count > 0 {
            return Err(Error::FailedPrecondition(format!(
                "the token has no {label} but the store holds {count} credentials wrapped under it: wrong token?"
            )));
        }
        hsm.ensure_seed_master_key(version).await?;
    }
    if !hsm.seed_master_key_confined(version).await? {
        tracing::warn!(
            key = %label,
            "the seed master key predates the unwrap template: the user PIN alone can unwrap its seeds as extractable; run the rotate-seed-master-key ceremony to move them under a key that has it"
        );
    }
    Ok(())
}

/// The citizen-notification events of one credential (see `store::events`), written in
/// the transaction of the change they report.
struct Notice {
    time_ms: u64,
    tenant: String,
    subject: String,
    id: String,
}

impl Notice {
    fn of(rec: &CredentialRecord, time_ms: u64) -> Notice {
        Notice {
            time_ms,
            tenant: rec.tenant.clone(),
            subject: rec.subject.clone().unwrap_or_default(),
            id: rec.id.clone(),
        }
    }

    fn emit(
        &self,
        txn: &mut dyn Txn,
        kind: EventKind,
        details_json: String,
    ) -> std::result::Result<(), Rollback> {
        let n = &self;
        events::emit_in(
            txn,
            n.time_ms,
            kind,
            &n.tenant,
            &n.subject,
            &n.id,
            details_json,
        )
        .map(drop)
    }

    /// A verification's (or resync's) decision: `credential.used` for an accepted code,
    /// `credential.rejected` for a rejected or replayed one, then `credential.locked`
    /// when the decision set a lock.
    fn decision(
        &self,
        txn: &mut dyn Txn,
        verdict: Verdict,
        lock: Option<LockChange>,
        failures: u32,
    ) -> std::result::Result<(), Rollback> {
        match verdict {
            Verdict::Accepted => self.emit(txn, EventKind::CredentialUsed, "{}".into())?,
            Verdict::Rejected | Verdict::Replayed => self.emit(
                txn,
                EventKind::CredentialRejected,
                format!(r#"{{"failures":{failures}}}"#),
            )?,
            Verdict::Locked | Verdict::Disabled => {}
        }
        if lock.is_some() {
            self.emit(
                txn,
                EventKind::CredentialLocked,
                r#"{"reason":"failures"}"#.into(),
            )?;
        }
        Ok(())
    }
}

/// The record of a decision made in the store update: the verdict, or (`None`) that the
/// credential changed under the verification.
fn decision_event(
    event: Event,
    tenant: &str,
    decided: Option<&(Outcome, Option<LockChange>)>,
    evidence_id: Option<&str>,
) -> Event {
    match decided {
        Some((o, lock)) => audit::verdict_event(event, tenant, o, evidence_id, *lock),
        None => audit::changed_event(event, tenant),
    }
}

/// Appends the record of a decision (when there is an audit log) inside the decision's
/// own transaction.
fn record_decision(
    txn: &mut dyn Txn,
    event: Option<(Event, Arc<str>)>,
    tenant: &str,
    decided: Option<&(Outcome, Option<LockChange>)>,
    evidence_id: Option<&str>,
) -> std::result::Result<(), Rollback> {
    if let Some((event, chain)) = event {
        append_in(
            txn,
            &chain,
            decision_event(event, tenant, decided, evidence_id),
        )?;
    }
    Ok(())
}

/// A lock a decision set, in the server log (its audit record is the decision's).
fn log_lock(tenant: &str, id: &str, lock: Option<LockChange>) {
    match lock {
        Some(LockChange::Temporary { until, failures }) => tracing::info!(
            tenant,
            credential = id,
            locked_until = until,
            failures,
            "credential temporarily locked after failed verifications"
        ),
        Some(LockChange::Hard { failures }) => tracing::warn!(
            tenant,
            credential = id,
            failures,
            "credential hard-locked after failed verifications; an officer must unlock it"
        ),
        None => {}
    }
}

fn ct_to_option(c: subtle::CtOption<u32>) -> Option<u32> {
    Option::from(c)
}

fn invalid(m: impl Into<String>) -> Error {
    Error::InvalidArgument(m.into())
}

fn changed() -> Error {
    Error::FailedPrecondition("the credential changed during verification; retry".into())
}

fn otp_state(e: otp::OtpError) -> Error {
    Error::FailedPrecondition(format!("credential cannot verify: {e}"))
}

/// The one answer for an id the caller's tenant does not hold, whether another tenant
/// holds it or nobody does.
fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no credential {id:?}"))
}

fn not_found_or(e: StoreError, id: &str) -> Error {
    match e {
        StoreError::NotFound => not_found(id),
        other => store_error(other),
    }
}

/// Store failures are the service's problem, not the caller's: detail to the log.
pub(crate) fn store_error(e: StoreError) -> Error {
    crate::error::store_failure("store", e)
}

/// Ids: 1..128 characters from `[A-Za-z0-9._:@-]`, so they are safe in logs and URIs.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "credential_id must be 1 to {MAX_ID_LEN} characters"
        )));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
    {
        return Err(invalid(
            "credential_id may contain only A-Z a-z 0-9 . _ : @ -",
        ));
    }
    Ok(())
}

/// Subjects: 1..128 characters from `[A-Za-z0-9._:@-]` (a pseudonym, safe in logs).
pub fn check_subject(subject: &str) -> Result<()> {
    if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN {
        return Err(invalid(format!(
            "subject must be 1 to {MAX_SUBJECT_LEN} characters"
        )));
    }
    if !subject
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
    {
        return Err(invalid("subject may contain only A-Z a-z 0-9 . _ : @ -"));
    }
    Ok(())
}

/// Tenants as the store accepts them (they come from the config, or from an officer's
/// request).
pub fn check_tenant(tenant: &str) -> Result<()> {
    crate::store::validate_tenant(tenant).map_err(|e| match e {
        StoreError::Invalid(m) => invalid(m),
        other => store_error(other),
    })
}

fn check_label(field: &str, value: &str, max: usize) -> Result<()> {
    if value.chars().count() > max {
        return Err(invalid(format!("{field} must be at most {max} characters")));
    }
    if value.contains(':') || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} may not contain ':' or control characters"
        )));
    }
    Ok(())
}

async fn generated_id(hsm: &Hsm) -> Result<String> {
    let bytes = hsm.random(16).await?;
    Ok(crate::common::hex(&bytes))
}
