//! Ceremony events: proposals, approvals, refusals, steps and their outcomes, key state
//! changes. [`Ceremonies::event`] is the one place they are routed to the log and the
//! audit trail.

use serde_json::{json, Value};

use super::Ceremonies;
use crate::audit::{Details, Event};
use crate::auth::Identity;
use crate::error::Error;

impl Ceremonies {
    /// The one place where ceremony events are emitted: proposals, approvals, refusals,
    /// steps and their outcomes, key state changes. Today they go to the log (target
    /// `hsm_service::ceremony::event`); the audit trail takes them from here. `details`
    /// never holds a secret.
    pub fn event(
        &self,
        actor: &Identity,
        action: &str,
        object: &str,
        outcome: &str,
        details: &Value,
    ) {
        self.record(actor, action, object, outcome, details);
        tracing::info!(
            target: "hsm_service::ceremony::event",
            actor_subject = %actor.subject,
            actor_fingerprint = %actor.fingerprint,
            actor_role = actor.role.as_str(),
            action,
            object,
            outcome,
            details = %details,
            "ceremony event"
        );
    }

    /// The audit record of an event, written in the background (the ceremony's own
    /// state is already durable in the store when an event is emitted).
    fn record(&self, actor: &Identity, action: &str, object: &str, outcome: &str, details: &Value) {
        let Some(log) = self.audit.clone() else {
            return;
        };
        let action: &'static str = match action {
            "ceremony.propose" => "ceremony.propose",
            "ceremony.approve" => "ceremony.approve",
            "ceremony.execute" => "ceremony.execute",
            "ceremony.step" => "ceremony.step",
            "ceremony.backup" => "ceremony.backup",
            "ceremony.restore" => "ceremony.restore",
            "key.state" => "key.state",
            _ => "ceremony.event",
        };
        let event = Event::new(self.clock.now_ms(), actor.actor(), action, object).with_details(
            Details::new()
                .str("outcome", outcome)
                .str("details", &details.to_string()),
        );
        let event = match outcome {
            "refused" => event.denied(),
            "failed" => event.failed("step failed"),
            _ => event,
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = log.record(event).await {
                    tracing::error!(error = %e, "audit: cannot record a ceremony event");
                }
            });
        }
    }

    /// Emit a refusal event for `err` and hand it back.
    pub fn refused(&self, actor: &Identity, action: &str, object: &str, err: Error) -> Error {
        self.event(
            actor,
            action,
            object,
            "refused",
            &json!({ "reason": err.to_string() }),
        );
        err
    }
}
