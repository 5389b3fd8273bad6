//! Proposing a plan: parse, validate, record it under its id.

use serde_json::json;

use super::plan::{self, Step};
use super::record::{self, CeremonyRecord, CeremonyState, Change};
use super::{officer_of, store_err, Ceremonies, CeremonyView};
use crate::auth::Identity;
use crate::error::{Error, Result};

impl Ceremonies {
    /// Parse and validate a plan and record it as proposed. The same plan proposed twice
    /// is ALREADY_EXISTS (its id is taken).
    /// The proposal and its audit record are one write; a refusal is recorded before
    /// it is returned.
    pub async fn propose(&self, actor: &Identity, plan_toml: &str) -> Result<CeremonyView> {
        match self.propose_inner(actor, plan_toml).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.refuse(actor, "ceremony.propose", "", e).await),
        }
    }

    async fn propose_inner(&self, actor: &Identity, plan_toml: &str) -> Result<CeremonyView> {
        self.require_officer(actor)?;
        let parsed = plan::parse(plan_toml)?;
        plan::validate(&parsed, &self.context().await?)?;
        let canonical = plan::canonical(&parsed)?;
        let id = plan::id_of(&canonical);
        let rec = CeremonyRecord {
            id: id.clone(),
            canonical_plan: canonical,
            plan_toml: plan_toml.to_owned(),
            proposed_by: officer_of(actor),
            proposed_at: self.clock.now(),
            approvals: Vec::new(),
            state: CeremonyState::Proposed,
            executed_by: None,
            executed_at: 0,
            executed_on: String::new(),
            failure: String::new(),
            transcript_json: String::new(),
        };
        let events = [self.note(
            actor,
            "ceremony.propose",
            &id,
            "ok",
            json!({
                "description": parsed.description,
                "steps": parsed.steps.iter().map(Step::summary).collect::<Vec<_>>(),
            }),
        )];
        let (key, trail, audited) = (id.clone(), self.trail(), events.clone());
        let stored = self
            .store
            .write(move |txn| {
                let stored = record::update(txn, &key, |current| match current {
                    Some(existing) => Change::Keep(Err(existing.state)),
                    None => Change::Write(Box::new(rec.clone()), Ok(Box::new(rec))),
                })?;
                if stored.is_ok() {
                    trail.append(txn, &audited)?;
                }
                Ok(stored)
            })
            .await
            .map_err(store_err)?;
        match stored {
            Ok(rec) => {
                self.emitted(&events);
                self.view(*rec)
            }
            Err(state) => Err(Error::AlreadyExists(format!(
                "ceremony {id} was proposed already (it is {}); a changed plan has another id",
                state.as_str()
            ))),
        }
    }
}
