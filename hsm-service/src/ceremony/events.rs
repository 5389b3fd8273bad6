//! Ceremony events: proposals, approvals, refusals, steps and their outcomes, key state
//! changes.
//!
//! An event is appended to the audit trail inside the store write job that makes the
//! change it describes (a proposal, an approval, the claim, the outcome, a key the
//! ceremony created), so neither exists without the other. Events of no store change
//! (a refusal, a step's end, an HSM state change) get their own write, awaited before
//! the ceremony goes on or the caller hears back. The log line (target
//! `hsm_service::ceremony::event`) follows the commit. Details never hold a secret.

use serde_json::{json, Value};

use super::{store_err, Ceremonies};
use crate::audit::log::append_in;
use crate::audit::{Actor, Details, Event};
use crate::auth::Identity;
use crate::error::{Error, Result};
use std::sync::Arc;

use crate::store::{Rollback, Txn};

/// Who caused a ceremony event: an officer's certificate, or the service itself.
#[derive(Debug, Clone)]
pub(super) struct Who {
    actor: Actor,
    role: &'static str,
}

impl Who {
    /// The caller `id`.
    pub fn of(id: &Identity) -> Who {
        Who {
            actor: id.actor(),
            role: id.role.as_str(),
        }
    }

    /// The service acting on its own (start-up recovery).
    pub fn service() -> Who {
        Who {
            actor: Actor::service(),
            role: "service",
        }
    }
}

/// One ceremony event, before it is recorded.
#[derive(Debug, Clone)]
pub(super) struct CeremonyEvent {
    time_ms: u64,
    who: Who,
    action: &'static str,
    object: String,
    outcome: String,
    details: Value,
}

impl CeremonyEvent {
    /// `actor` did `action` on `object` with `outcome` at `time_ms`. An outcome of
    /// `refused` is recorded as denied, `failed` as failed.
    pub fn new(
        time_ms: u64,
        who: &Who,
        action: &'static str,
        object: &str,
        outcome: &str,
        details: Value,
    ) -> CeremonyEvent {
        CeremonyEvent {
            time_ms,
            who: who.clone(),
            action,
            object: object.to_owned(),
            outcome: outcome.to_owned(),
            details,
        }
    }

    /// A refusal of `action` on `object` because of `err`.
    pub fn refusal(
        time_ms: u64,
        who: &Who,
        action: &'static str,
        object: &str,
        err: &Error,
    ) -> CeremonyEvent {
        Self::new(
            time_ms,
            who,
            action,
            object,
            "refused",
            json!({ "reason": err.to_string() }),
        )
    }

    /// The audit record.
    fn audit(&self) -> Event {
        let event = Event::new(
            self.time_ms,
            self.who.actor.clone(),
            self.action,
            &self.object,
        )
        .with_details(
            Details::new()
                .str("outcome", &self.outcome)
                .str("details", &self.details.to_string()),
        );
        match self.outcome.as_str() {
            "refused" => event.denied(),
            "failed" => event.failed(
                self.details
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("step failed"),
            ),
            _ => event,
        }
    }

    /// The log line, once recorded.
    fn log(&self) {
        tracing::info!(
            target: "hsm_service::ceremony::event",
            actor_subject = %self.who.actor.subject,
            actor_fingerprint = %self.who.actor.fingerprint,
            actor_role = self.who.role,
            action = self.action,
            object = %self.object,
            outcome = %self.outcome,
            details = %self.details,
            "ceremony event"
        );
    }
}

/// Where events go: the audit chain of the configured audit log (none without one).
/// Moved into store write jobs, which run on the committer thread.
#[derive(Debug, Clone)]
pub(super) struct Trail {
    chain: Option<Arc<str>>,
}

impl Trail {
    /// Whether events are recorded at all.
    pub fn on(&self) -> bool {
        self.chain.is_some()
    }

    /// Append `events` to the audit chain in `txn` (nothing without an audit log).
    pub fn append(
        &self,
        txn: &mut dyn Txn,
        events: &[CeremonyEvent],
    ) -> std::result::Result<(), Rollback> {
        if let Some(chain) = &self.chain {
            for e in events {
                append_in(txn, chain, e.audit())?;
            }
        }
        Ok(())
    }
}

impl Ceremonies {
    /// Where this service's events go, for a store write job.
    /// This instance's name in ceremony records: its audit chain (empty without one).
    pub(super) fn instance(&self) -> String {
        self.audit
            .as_ref()
            .map(|log| log.chain().to_string())
            .unwrap_or_default()
    }

    pub(super) fn trail(&self) -> Trail {
        Trail {
            chain: self.audit.as_ref().map(|log| log.chain()),
        }
    }

    /// An event by `actor` now.
    pub(super) fn note(
        &self,
        actor: &Identity,
        action: &'static str,
        object: &str,
        outcome: &str,
        details: Value,
    ) -> CeremonyEvent {
        CeremonyEvent::new(
            self.clock.now_ms(),
            &Who::of(actor),
            action,
            object,
            outcome,
            details,
        )
    }

    /// `events` were committed with their change: log them and count them towards the
    /// next audit checkpoint.
    pub(super) fn emitted(&self, events: &[CeremonyEvent]) {
        for e in events {
            e.log();
        }
        if let Some(log) = &self.audit {
            log.appended(events.len() as u64);
        }
    }

    /// Record `event`, which goes with no store change, in its own durable write.
    pub(super) async fn emit(&self, event: CeremonyEvent) -> Result<()> {
        let trail = self.trail();
        let events = [event];
        if trail.on() {
            let batch = events.clone();
            self.store
                .write(move |txn| trail.append(txn, &batch))
                .await
                .map_err(store_err)?;
        }
        self.emitted(&events);
        Ok(())
    }

    /// Record the refusal of `action` on `object` because of `err` (durably, before the
    /// caller hears of it) and hand `err` back. A refusal that cannot be recorded is
    /// still a refusal: the recording error is logged and `err` returned.
    pub(super) async fn refuse(
        &self,
        actor: &Identity,
        action: &'static str,
        object: &str,
        err: Error,
    ) -> Error {
        let event =
            CeremonyEvent::refusal(self.clock.now_ms(), &Who::of(actor), action, object, &err);
        if let Err(e) = self.emit(event).await {
            tracing::error!(error = %e, action, "audit: cannot record a ceremony refusal");
        }
        err
    }
}
