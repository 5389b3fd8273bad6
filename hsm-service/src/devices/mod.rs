//! The app authenticator: citizens' phones holding a device key (ECDSA P-256 in their
//! secure hardware), activated with proof of possession, and approve-with-a-swipe
//! challenges carrying the exact text the citizen approves (`proto/hsm/v1/devices.proto`).
//!
//! One file per job: [`activation`] (begin, complete), [`registry`] (list, revoke),
//! [`challenges`] (create, get, list pending, answer), [`signature`] (device signature
//! verification), [`payload`] (the exact signed bytes), [`records`] (stored records).
//!
//! Every change, its audit record and its event are written in one store job, durable
//! before the reply. Every job that touches a subject's devices or challenges first
//! locks the subject's row (see [`records`]), so the per-subject rules hold exactly
//! across concurrent requests and instances. Everything is tenant-scoped: another
//! tenant's id answers NOT_FOUND exactly like an unknown id.

pub mod activation;
pub mod challenges;
pub mod payload;
pub mod records;
pub mod registry;
pub mod signature;

use std::sync::Arc;

use crate::audit::log::{append_in, AuditLog};
use crate::audit::{Actor, Details, Event};
use crate::common::{Clock, EventKind};
use crate::config::DevicesConfig;
use crate::error::{Error, Result};
use crate::hsm::Hsm;
use crate::signing::Signer;
use crate::store::{events, Rollback, Store, StoreError, Txn};

pub use records::{
    ActivationRecord, ChallengeRecord, ChallengeState, DeviceRecord, Purpose, SubjectRecord,
};

/// Longest subject.
pub const MAX_SUBJECT_LEN: usize = 128;
/// Longest device display name, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;
/// Longest challenge text, in characters.
pub const MAX_TEXT_CHARS: usize = 512;
/// Longest service provider name, in characters.
pub const MAX_SERVICE_PROVIDER_CHARS: usize = 128;
/// Wrong activation codes after which an activation is cancelled.
pub const MAX_ACTIVATION_FAILURES: u32 = 5;
/// Challenge lifetime when the request gives none, in seconds.
pub const DEFAULT_CHALLENGE_TTL_SECONDS: u32 = 120;
/// Longest challenge lifetime, in seconds.
pub const MAX_CHALLENGE_TTL_SECONDS: u32 = 600;
/// Tolerated distance of a listing's timestamp from the service's clock, in seconds.
pub const LIST_CLOCK_SKEW_SECONDS: u64 = 60;

/// Who calls: the audit actor, the tenant acted on, and whether the caller is an
/// officer (in-person identity checks: activations without an approving challenge).
#[derive(Debug, Clone)]
pub struct Caller {
    /// For the audit record.
    pub actor: Actor,
    /// The tenant acted on.
    pub tenant: String,
    /// Role officer.
    pub officer: bool,
}

/// The app authenticator service.
pub struct Devices {
    hsm: Hsm,
    store: Arc<Store>,
    signer: Arc<Signer>,
    config: DevicesConfig,
    evidence_ttl_seconds: u64,
    clock: Clock,
    audit: Arc<AuditLog>,
}

impl Devices {
    /// The service over the token, the store, the challenge signer and the audit log.
    pub fn new(
        hsm: Hsm,
        store: Arc<Store>,
        signer: Arc<Signer>,
        config: DevicesConfig,
        clock: Clock,
        audit: Arc<AuditLog>,
    ) -> Devices {
        let evidence_ttl_seconds = signer.config().evidence_ttl_seconds;
        Devices {
            hsm,
            store,
            signer,
            config,
            evidence_ttl_seconds,
            clock,
            audit,
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &DevicesConfig {
        &self.config
    }

    /// A fresh random id: 32 lower-case hex digits (128 bits from the HSM).
    async fn new_id(&self) -> Result<String> {
        Ok(crate::common::hex(&self.hsm.random(16).await?))
    }

    /// The audit record of `action` on `object` by `caller`, appended (with its details)
    /// inside the job.
    fn audit_event(&self, caller: &Caller, action: &'static str, object: &str) -> PendingAudit {
        PendingAudit {
            event: Event::new(self.clock.now_ms(), caller.actor.clone(), action, object),
            tenant: caller.tenant.clone(),
            chain: self.audit.chain(),
        }
    }

    /// An audit-only write: a refused request that changed nothing (a signature that
    /// does not verify, a device of another subject).
    async fn record_refusal(
        &self,
        caller: &Caller,
        action: &'static str,
        object: &str,
        details: Details,
    ) -> Result<()> {
        let audit = self.audit_event(caller, action, object);
        self.write(move |txn| {
            audit.append(txn, details)?;
            Ok(Ok(()))
        })
        .await
    }

    /// Runs `job` in one store write; `Ok(Err(e))` from the job is a refusal that still
    /// commits what the job wrote (a counted failure, an expiry).
    async fn write<T, F>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Txn) -> std::result::Result<Result<T>, Rollback> + Send + 'static,
    {
        let out = self.store.write(job).await.map_err(store_error)?;
        self.audit.appended(1);
        out
    }
}

/// An audit record waiting for its details and its transaction.
struct PendingAudit {
    event: Event,
    tenant: String,
    chain: Arc<str>,
}

impl PendingAudit {
    /// Appends it with `details` (and the tenant) in `txn`.
    fn append(self, txn: &mut dyn Txn, details: Details) -> std::result::Result<(), Rollback> {
        let event = self.event.with_details(details.str("tenant", &self.tenant));
        append_in(txn, &self.chain, event).map(drop)
    }
}

/// Appends an event of `kind` about `object_id` of `subject`.
fn emit(
    txn: &mut dyn Txn,
    time_ms: u64,
    kind: EventKind,
    tenant: &str,
    subject: &str,
    object_id: &str,
    details: serde_json::Value,
) -> std::result::Result<(), Rollback> {
    events::emit_in(
        txn,
        time_ms,
        kind,
        tenant,
        subject,
        object_id,
        details.to_string(),
    )
    .map(drop)
}

/// Store failures are the service's problem, not the caller's.
pub(crate) fn store_error(e: StoreError) -> Error {
    crate::error::store_failure("store", e)
}

fn invalid(m: impl Into<String>) -> Error {
    Error::InvalidArgument(m.into())
}

fn precondition(m: impl Into<String>) -> Error {
    Error::FailedPrecondition(m.into())
}

/// Subjects: 1..128 characters from `[A-Za-z0-9._:@-]` (the credentials' rule).
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

/// Ids this module issues: 32 lower-case hex digits.
pub fn check_id(field: &str, id: &str) -> Result<()> {
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid(format!(
            "{field} must be 32 lower-case hex digits (an id this service issued)"
        )));
    }
    Ok(())
}

/// Text shown to the citizen: 1..=`max` characters, no control characters (`newline`
/// allows '\n').
fn check_text(field: &str, value: &str, max: usize, newline: bool) -> Result<()> {
    let n = value.chars().count();
    if n == 0 || n > max {
        return Err(invalid(format!(
            "{field} must be 1 to {max} characters, got {n}"
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !(newline && c == '\n'))
    {
        return Err(invalid(format!(
            "{field} may not contain control characters{}",
            if newline { " other than newline" } else { "" }
        )));
    }
    Ok(())
}

/// 32 random bytes from the HSM.
async fn nonce(hsm: &Hsm) -> Result<Vec<u8>> {
    Ok(hsm.random(32).await?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked() {
        assert!(check_subject("citizen-1").is_ok());
        assert!(check_subject("").is_err());
        assert!(check_subject("a b").is_err());
        assert!(check_id("x", &"a".repeat(32)).is_ok());
        assert!(check_id("x", &"A".repeat(32)).is_err());
        assert!(check_id("x", &"a".repeat(31)).is_err());
        assert!(check_text("text", "Pay\n10 DKK", 512, true).is_ok());
        assert!(check_text("text", "Pay\n10 DKK", 512, false).is_err());
        assert!(check_text("text", "a\u{7}", 512, true).is_err());
        assert!(check_text("text", &"é".repeat(512), 512, true).is_ok());
        assert!(check_text("text", &"é".repeat(513), 512, true).is_err());
        assert!(check_text("text", "", 512, true).is_err());
    }
}
