//! The audit records of the credential domain: what a verification, a resync and a
//! lifecycle change write, and how an attempt that ends before its store update (unknown
//! id, malformed code, locked or disabled credential) still gets exactly one record, in
//! one audit-only write job, before the reply.

use crate::audit::{Details, Event};
use crate::error::Error;
use crate::store::CredentialRecord;

use super::{Action, LockChange, Outcome, Verdict};

/// Why a verification (or resync) ended without its store update deciding it.
pub(super) enum Stop {
    /// Refused before any HSM work (disabled, locked): not yet recorded.
    Gate(Outcome),
    /// Failed before the decision (unknown id, malformed code, HSM error): not yet
    /// recorded.
    Error(Error),
    /// Failed in the decision's own commit, which already holds the record.
    Recorded(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Error(e)
    }
}

impl Stop {
    /// The record still to write for this stop of a call on `tenant`'s credential
    /// (`None`: written already, or no log), and what the caller is answered.
    pub(super) fn into_record(
        self,
        event: Option<Event>,
        tenant: &str,
    ) -> (Option<Event>, Result<Outcome, Error>) {
        match self {
            Stop::Gate(o) => (
                event.map(|e| verdict_event(e, tenant, &o, None, None)),
                Ok(o),
            ),
            Stop::Error(err) => (event.map(|e| error_event(e, tenant, &err)), Err(err)),
            Stop::Recorded(err) => (None, Err(err)),
        }
    }
}

/// Details every credential record starts from: the tenant the call acted on.
fn base(tenant: &str) -> Details {
    Details::new().str("tenant", tenant)
}

/// The verdict as a record: ACCEPTED is "ok", anything else "denied", with the tenant,
/// the verdict, the lock state and the evidence an accepted code left as details (never
/// the code). A decision that locked the credential says so in the same record (`lock`
/// `temporary` with `locked_until`, or `hard`, and the failures counted): the lock is
/// audited in the commit that sets it.
pub(super) fn verdict_event(
    event: Event,
    tenant: &str,
    o: &Outcome,
    evidence_id: Option<&str>,
    lock: Option<LockChange>,
) -> Event {
    let name = match o.verdict {
        Verdict::Accepted => "accepted",
        Verdict::Rejected => "rejected",
        Verdict::Replayed => "replayed",
        Verdict::Locked => "locked",
        Verdict::Disabled => "disabled",
    };
    let details = base(tenant)
        .str("result", name)
        .u64("remaining_attempts", u64::from(o.remaining_attempts))
        .u64("retry_after_seconds", u64::from(o.retry_after_seconds));
    let details = match evidence_id {
        Some(id) => details.str("evidence_id", id),
        None => details,
    };
    let details = match lock {
        None => details,
        Some(LockChange::Temporary { until, failures }) => details
            .str("lock", "temporary")
            .u64("locked_until", until)
            .u64("failures", u64::from(failures)),
        Some(LockChange::Hard { failures }) => details
            .str("lock", "hard")
            .u64("failures", u64::from(failures)),
    };
    let event = event.with_details(details);
    if o.verdict == Verdict::Accepted {
        event
    } else {
        event.denied()
    }
}

/// An attempt that ended in an error: an unknown id or a malformed request is "denied"
/// (`result` `not_found` / `invalid`, the latter with the message, which names a field
/// and never quotes its value); anything else "failed" with the error's kind only (its
/// detail may describe the token or the store and goes to the server log).
pub(super) fn error_event(event: Event, tenant: &str, e: &Error) -> Event {
    let (result, reason) = match e {
        Error::NotFound(_) => ("not_found", None),
        Error::InvalidArgument(m) => ("invalid", Some(m.as_str())),
        Error::FailedPrecondition(_) => ("failed_precondition", None),
        Error::Hsm(_) => ("hsm_error", None),
        Error::Integrity(_) => ("tampered", None),
        Error::Unavailable(_) => ("unavailable", None),
        _ => ("internal", None),
    };
    let details = base(tenant).str("result", result);
    let details = match reason {
        Some(r) => details.str("reason", r),
        None => details,
    };
    let event = event.with_details(details);
    match e {
        Error::NotFound(_) | Error::InvalidArgument(_) => event.denied(),
        _ => event.failed(result),
    }
}

/// A verification whose credential changed (its seed was re-wrapped) between the read
/// and the decision: nothing was decided, the caller retries.
pub(super) fn changed_event(event: Event, tenant: &str) -> Event {
    event
        .with_details(base(tenant).str("result", "changed"))
        .failed("credential changed during verification")
}

/// The record of an enrolment.
pub(super) fn created_event(event: Event, rec: &CredentialRecord, revealed: bool) -> Event {
    event.with_details(
        base(&rec.tenant)
            .bool("subject", rec.subject.is_some())
            .str("kind", rec.kind.uri_name())
            .str("algorithm", rec.algorithm.uri_name())
            .u64("digits", u64::from(rec.digits))
            .u64("master_key_version", u64::from(rec.master_key_version))
            .bool("revealed", revealed),
    )
}

/// The action name of a state change.
pub(super) fn state_action(action: Action) -> &'static str {
    match action {
        Action::Enable => "credential.enable",
        Action::Disable => "credential.disable",
        Action::Unlock => "credential.unlock",
    }
}

/// The record of a state change, with the state it leaves.
pub(super) fn state_event(event: Event, rec: &CredentialRecord) -> Event {
    event.with_details(
        base(&rec.tenant)
            .bool("disabled", rec.disabled)
            .bool("hard_locked", rec.hard_locked)
            .u64("locked_until", rec.locked_until)
            .u64("failures", u64::from(rec.failures)),
    )
}
