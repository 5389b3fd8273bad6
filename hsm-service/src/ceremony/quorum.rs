//! The quorum: who is an officer, which approvals count, and recording an approval.
//!
//! An officer-set entry is one person: approvals from two certificates that match the
//! same entry count once. An approval counts while it is unexpired and its certificate
//! still matches an entry.

use std::collections::BTreeSet;

use serde_json::json;

use super::events::{CeremonyEvent, Who};
use super::record::{self, Approval, CeremonyRecord, CeremonyState, Change};
use super::{officer_of, parse_id, store_err, Ceremonies, CeremonyView};
use crate::auth::Identity;
use crate::config::{CeremonyConfig, OfficerRule};
use crate::error::{Error, Result};

/// Index of the officer-set entry that a certificate (`subject`, `fingerprint`) matches.
pub(super) fn officer_index(
    officers: &[OfficerRule],
    subject: &str,
    fingerprint: &str,
) -> Option<usize> {
    officers.iter().position(|o| {
        o.cn.as_deref()
            .is_some_and(|cn| !subject.is_empty() && cn == subject)
            || o.fingerprint
                .as_deref()
                .is_some_and(|fp| fp.eq_ignore_ascii_case(fingerprint))
    })
}

/// Which approvals count: the `[ceremony]` rules, owned, so that a store write job (on
/// the committer thread) can check the quorum again inside its transaction.
#[derive(Debug, Clone)]
pub(super) struct Quorum {
    officers: Vec<OfficerRule>,
    ttl: u64,
    proposer_counts: bool,
    threshold: u32,
}

impl Quorum {
    /// The rules of `config`.
    pub fn of(config: &CeremonyConfig) -> Quorum {
        Quorum {
            officers: config.officers.clone(),
            ttl: config.approval_ttl_seconds,
            proposer_counts: config.proposer_counts,
            threshold: config.threshold,
        }
    }

    /// M.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// The approvals of `rec` that count at `now` (unexpired, of an officer of the set,
    /// and not the proposer's when `proposer_counts` is false), with the index of that
    /// officer's entry.
    pub fn counting_approvals<'a>(
        &'a self,
        rec: &'a CeremonyRecord,
        now: u64,
    ) -> impl Iterator<Item = (usize, &'a Approval)> + 'a {
        // The proposer is a person (an entry), whichever of their certificates approves.
        let proposer = officer_index(
            &self.officers,
            &rec.proposed_by.subject,
            &rec.proposed_by.fingerprint,
        );
        let excluded = if self.proposer_counts { None } else { proposer };
        rec.approvals
            .iter()
            .filter(move |a| now < a.approved_at.saturating_add(self.ttl))
            .filter_map(|a| {
                officer_index(&self.officers, &a.officer.subject, &a.officer.fingerprint)
                    .map(|i| (i, a))
            })
            .filter(move |(i, _)| Some(*i) != excluded)
    }

    /// Distinct officer-set entries whose approvals of `rec` count at `now`.
    pub fn counting_officers(&self, rec: &CeremonyRecord, now: u64) -> BTreeSet<usize> {
        self.counting_approvals(rec, now).map(|(i, _)| i).collect()
    }

    /// Why `rec` cannot run at `now` for lack of approvals (None: it has its quorum).
    pub fn problem(&self, rec: &CeremonyRecord, now: u64) -> Option<String> {
        let valid = self.counting_officers(rec, now).len();
        let need = self.threshold as usize;
        (valid < need).then(|| {
            format!(
                "ceremony {} has {valid} valid approval(s) from distinct officers; it needs {need} \
                 (approvals expire after {} seconds{})",
                rec.id,
                self.ttl,
                if self.proposer_counts {
                    ""
                } else {
                    "; the proposer's own approval does not count"
                }
            )
        })
    }
}

impl Ceremonies {
    pub(super) fn require_officer(&self, actor: &Identity) -> Result<usize> {
        if self.config.officers.is_empty() {
            return Err(Error::FailedPrecondition(
                "key ceremonies are not configured ([ceremony] has no officer)".into(),
            ));
        }
        officer_index(&self.config.officers, &actor.subject, &actor.fingerprint).ok_or_else(|| {
            Error::PermissionDenied(format!(
                "certificate {:?} is not in the ceremony officer set",
                actor.subject
            ))
        })
    }

    /// Record the caller's approval of ceremony `id`. Approving again replaces the
    /// earlier approval (it still counts once). `kek_share`, the text of the officer's
    /// backup KEK share file, is for a ceremony with a `restore` step: it must be a share
    /// of the KEK its backup file names, and is held in memory only (replacing an
    /// earlier share of the same officer). The approval and its audit record are one
    /// write; a refusal is recorded before it is returned.
    pub async fn approve(
        &self,
        actor: &Identity,
        id: &str,
        kek_share: Option<&str>,
    ) -> Result<CeremonyView> {
        match self.approve_inner(actor, id, kek_share).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.refuse(actor, "ceremony.approve", id, e).await),
        }
    }

    async fn approve_inner(
        &self,
        actor: &Identity,
        id: &str,
        kek_share: Option<&str>,
    ) -> Result<CeremonyView> {
        let id = parse_id(id)?;
        self.require_officer(actor)?;
        let share = match kek_share {
            None => None,
            Some(text) => Some(self.check_share(&id, text).await?),
        };
        let officer = officer_of(actor);
        let fingerprint = officer.fingerprint.clone();
        // Officers whose shares will be held once this approval is in.
        let mut with_shares = self.share_holders(&id);
        if share.is_some() {
            with_shares.insert(fingerprint.clone());
        }
        let now = self.clock.now();
        let (key, trail, who, now_ms) = (
            id.clone(),
            self.trail(),
            Who::of(actor),
            self.clock.now_ms(),
        );
        let quorum = self.quorum.clone();
        let given = share.is_some();
        let outcome = self
            .store
            .write(move |txn| {
                let outcome = record::update(txn, &key, |current| match current {
                    None => Change::Keep(Err(None)),
                    Some(rec) if rec.state != CeremonyState::Proposed => {
                        Change::Keep(Err(Some(rec.state)))
                    }
                    Some(mut rec) => {
                        rec.approvals
                            .retain(|a| a.officer.fingerprint != officer.fingerprint);
                        rec.approvals.push(Approval {
                            officer,
                            approved_at: now,
                        });
                        Change::Write(Box::new(rec.clone()), Ok(rec))
                    }
                })?;
                let rec = match outcome {
                    Ok(rec) => rec,
                    Err(refused) => return Ok(Err(refused)),
                };
                let (valid, held) = {
                    let counting: Vec<_> = quorum.counting_approvals(&rec, now).collect();
                    let valid: BTreeSet<usize> = counting.iter().map(|(i, _)| *i).collect();
                    let held = counting
                        .iter()
                        .filter(|(_, a)| with_shares.contains(&a.officer.fingerprint))
                        .count();
                    (valid.len(), held)
                };
                let event = CeremonyEvent::new(
                    now_ms,
                    &who,
                    "ceremony.approve",
                    &key,
                    "ok",
                    json!({
                        "valid_approvals": valid,
                        "threshold": quorum.threshold(),
                        "kek_share_given": given,
                        "kek_shares_held": held,
                    }),
                );
                trail.append(txn, std::slice::from_ref(&event))?;
                Ok(Ok((Box::new(rec), event)))
            })
            .await
            .map_err(store_err)?;
        match outcome {
            Ok((rec, event)) => {
                if let Some(share) = share {
                    self.hold_share(&id, fingerprint, share);
                }
                self.emitted(&[event]);
                self.view(*rec)
            }
            Err(None) => Err(Error::NotFound(format!("no ceremony {id}"))),
            Err(Some(state)) => Err(Error::FailedPrecondition(format!(
                "ceremony {id} is {}; only a proposed ceremony can be approved",
                state.as_str()
            ))),
        }
    }
}
