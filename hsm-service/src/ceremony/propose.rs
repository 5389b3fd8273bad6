//! Proposing a plan: parse, validate, record it under its id.

use serde_json::json;

use super::plan;
use super::record::{self, CeremonyRecord, CeremonyState, Change};
use super::{officer_of, store_err, Ceremonies, CeremonyView};
use crate::auth::Identity;
use crate::error::{Error, Result};

impl Ceremonies {
    /// Parse and validate a plan and record it as proposed. The same plan proposed twice
    /// is ALREADY_EXISTS (its id is taken).
    pub async fn propose(&self, actor: &Identity, plan_toml: &str) -> Result<CeremonyView> {
        let r = self.propose_inner(actor, plan_toml).await;
        match &r {
            Ok(v) => self.event(
                actor,
                "ceremony.propose",
                &v.record.id,
                "ok",
                &json!({ "description": v.description, "steps": v.steps }),
            ),
            Err(e) => {
                self.event(
                    actor,
                    "ceremony.propose",
                    "",
                    "refused",
                    &json!({ "reason": e.to_string() }),
                );
            }
        }
        r
    }

    async fn propose_inner(&self, actor: &Identity, plan_toml: &str) -> Result<CeremonyView> {
        self.require_officer(actor)?;
        let parsed = plan::parse(plan_toml)?;
        plan::validate(&parsed, &self.context()?)?;
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
            failure: String::new(),
            transcript_json: String::new(),
        };
        let key = id.clone();
        let stored = self
            .store
            .write(move |txn| {
                record::update(txn, &key, |current| match current {
                    Some(existing) => Change::Keep(Err(existing.state)),
                    None => Change::Write(Box::new(rec.clone()), Ok(Box::new(rec))),
                })
            })
            .await
            .map_err(store_err)?;
        match stored {
            Ok(rec) => self.view(*rec),
            Err(state) => Err(Error::AlreadyExists(format!(
                "ceremony {id} was proposed already (it is {}); a changed plan has another id",
                state.as_str()
            ))),
        }
    }
}
