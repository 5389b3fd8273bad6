//! Key ceremonies under an M-of-N officer quorum.
//!
//! An officer proposes a plan ([`plan`]); its id is the SHA-256 of its canonical form, so
//! an approval of the id is an approval of exactly that plan. Officers of the
//! `[ceremony]` officer set approve the id with their own certificates; approvals are
//! stored with the certificate's fingerprint and expire. With `threshold` distinct
//! officers' unexpired approvals the ceremony may be executed, once: the steps run in
//! order through [`Signer`], every generated key is checked, and a transcript
//! ([`transcript`]) is written and returned whatever happens.
//!
//! Every proposal, approval, refusal, step and key state change goes through
//! [`Ceremonies::event`], the one place to route them into the audit log.
//!
//! # Backups and restores
//!
//! A `backup` step wraps keys generated for backup under a trusted KEK that
//! `hsm-service backup-kek` provisioned offline and split into one share per officer.
//! A `restore` step needs that KEK back: each approving officer hands in their share
//! with the approval (`ApproveCeremony.kek_share`). Shares are held in memory only, per
//! ceremony and officer, never written or logged; they count only while their officer's
//! approval counts, and they are dropped when the ceremony is executed (whatever the
//! outcome). After a restart officers approve again with their shares. Execution is
//! refused before anything runs while fewer shares than the KEK's threshold are held.

pub mod backup_file;
pub mod plan;
pub mod record;
pub mod shares;
pub mod transcript;
pub mod words;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::audit::log::AuditLog;
use crate::audit::{Details, Event};
use crate::auth::Identity;
use crate::common::Clock;
use crate::config::CeremonyConfig;
use crate::credentials::MASTER_KEY_VERSION_META;
use crate::error::{Error, Result};
use crate::hsm::seeds::master_key_label;
use crate::signing::{CertificateRequest, KeyRef, KeyState, Signer};
use crate::store::{CredentialRecord, CredentialStore, EmbeddedStore, StoreError, Update};
use backup_file::{BackupEntry, BackupFile};
pub use plan::{Plan, Step, Usage};
use record::Change;
pub use record::{Approval, CeremonyRecord, CeremonyState, Officer};
use shares::ShareFile;
pub use transcript::{SeedRotation, Transcript};

/// A ceremony as callers see it: the record plus what the quorum looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CeremonyView {
    /// The durable record.
    pub record: CeremonyRecord,
    /// The plan's description.
    pub description: String,
    /// One line per step.
    pub steps: Vec<String>,
    /// Approvals that count now (configured officer, unexpired), distinct officers.
    pub valid_approvals: u32,
    /// Backup KEK shares held (in memory) for a `restore` step, from officers whose
    /// approvals count now.
    pub kek_shares_held: u32,
    /// M.
    pub threshold: u32,
    /// Seconds an approval counts.
    pub approval_ttl_seconds: u64,
}

/// The outcome of an execution: the final record and the transcript.
#[derive(Debug, Clone)]
pub struct Execution {
    /// The ceremony after execution.
    pub view: CeremonyView,
    /// The transcript (also in the record and in the transcript files).
    pub transcript: Transcript,
    /// Its JSON form, as written to `<id>.json`.
    pub transcript_json: String,
    /// Its text form, as written to `<id>.txt`.
    pub transcript_text: String,
}

/// Ceremonies: proposals, approvals, execution.
pub struct Ceremonies {
    signer: Arc<Signer>,
    store: Arc<EmbeddedStore>,
    config: CeremonyConfig,
    transcript_dir: PathBuf,
    backup_dir: PathBuf,
    clock: Clock,
    /// One execution at a time: validation and execution see the same keys.
    executing: tokio::sync::Mutex<()>,
    /// Where events are recorded.
    audit: Option<Arc<AuditLog>>,
    /// The credentials' current seed master key version (see
    /// [`crate::credentials::Credentials::master_key_version`]).
    seed_master: Option<Arc<AtomicU32>>,
    /// Backup KEK shares handed in with approvals: ceremony id -> officer certificate
    /// fingerprint -> share. Memory only (see the module documentation).
    shares: std::sync::Mutex<HashMap<String, BTreeMap<String, ShareFile>>>,
}

impl std::fmt::Debug for Ceremonies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ceremonies")
            .field("officers", &self.config.officers.len())
            .field("threshold", &self.config.threshold)
            .finish_non_exhaustive()
    }
}

fn store_err(e: StoreError) -> Error {
    Error::Internal(format!("ceremony store: {e}"))
}

/// A ceremony id as given by a caller: 64 hex digits (upper case accepted).
pub fn parse_id(id: &str) -> Result<String> {
    let id = id.trim();
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidArgument(format!(
            "ceremony_id must be 64 hex digits (the SHA-256 of the plan), got {} characters",
            id.len()
        )));
    }
    Ok(id.to_ascii_lowercase())
}

fn officer_of(actor: &Identity) -> Officer {
    Officer {
        subject: actor.subject.clone(),
        fingerprint: actor.fingerprint.clone(),
    }
}

impl Ceremonies {
    /// Ceremonies over the signer and store. `config.transcript_dir`, when relative, is
    /// taken relative to `data_dir`.
    pub fn new(
        signer: Arc<Signer>,
        store: Arc<EmbeddedStore>,
        config: CeremonyConfig,
        data_dir: &std::path::Path,
        clock: Clock,
    ) -> Ceremonies {
        let under_data_dir = |p: &PathBuf| {
            if p.is_relative() {
                data_dir.join(p)
            } else {
                p.clone()
            }
        };
        let transcript_dir = under_data_dir(&config.transcript_dir);
        let backup_dir = under_data_dir(&config.backup_dir);
        Ceremonies {
            signer,
            store,
            config,
            transcript_dir,
            backup_dir,
            clock,
            executing: tokio::sync::Mutex::new(()),
            audit: None,
            seed_master: None,
            shares: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Where transcripts are written.
    pub fn transcript_dir(&self) -> &std::path::Path {
        &self.transcript_dir
    }

    /// Where backup files are written and read.
    pub fn backup_dir(&self) -> &std::path::Path {
        &self.backup_dir
    }

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

    /// Record every event in `log` as well.
    pub fn with_audit(mut self, log: Arc<AuditLog>) -> Self {
        self.audit = Some(log);
        self
    }

    /// Allow `rotate-seed-master-key`: `version` is the credential service's current
    /// seed master key version, moved on by a rotation.
    pub fn with_seed_master(mut self, version: Arc<AtomicU32>) -> Self {
        self.seed_master = Some(version);
        self
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

    /// Index of the officer-set entry that `who` matches.
    fn officer_index(&self, subject: &str, fingerprint: &str) -> Option<usize> {
        self.config.officers.iter().position(|o| {
            o.cn.as_deref()
                .is_some_and(|cn| !subject.is_empty() && cn == subject)
                || o.fingerprint
                    .as_deref()
                    .is_some_and(|fp| fp.eq_ignore_ascii_case(fingerprint))
        })
    }

    fn require_officer(&self, actor: &Identity) -> Result<usize> {
        if self.config.officers.is_empty() {
            return Err(Error::FailedPrecondition(
                "key ceremonies are not configured ([ceremony] has no officer)".into(),
            ));
        }
        self.officer_index(&actor.subject, &actor.fingerprint)
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "certificate {:?} is not in the ceremony officer set",
                    actor.subject
                ))
            })
    }

    /// Distinct officers whose approvals count at `now`.
    fn valid_officers(&self, rec: &CeremonyRecord, now: u64) -> BTreeSet<usize> {
        self.counting_approvals(rec, now).map(|(i, _)| i).collect()
    }

    /// The approvals of `rec` that count at `now` (unexpired, of an officer of the set),
    /// with the index of that officer's entry.
    fn counting_approvals<'a>(
        &'a self,
        rec: &'a CeremonyRecord,
        now: u64,
    ) -> impl Iterator<Item = (usize, &'a Approval)> + 'a {
        let ttl = self.config.approval_ttl_seconds;
        rec.approvals
            .iter()
            .filter(move |a| now < a.approved_at.saturating_add(ttl))
            .filter_map(|a| {
                self.officer_index(&a.officer.subject, &a.officer.fingerprint)
                    .map(|i| (i, a))
            })
    }

    fn view(&self, record: CeremonyRecord) -> Result<CeremonyView> {
        let plan = plan::from_canonical(&record.canonical_plan)?;
        let now = self.clock.now();
        let valid = self.valid_officers(&record, now);
        let held = self.valid_shares(&record, now).len();
        Ok(CeremonyView {
            description: plan.description.clone(),
            steps: plan.steps.iter().map(Step::summary).collect(),
            valid_approvals: u32::try_from(valid.len()).unwrap_or(u32::MAX),
            kek_shares_held: u32::try_from(held).unwrap_or(u32::MAX),
            threshold: self.config.threshold,
            approval_ttl_seconds: self.config.approval_ttl_seconds,
            record,
        })
    }

    fn context(&self) -> Result<plan::Context> {
        let mut existing: BTreeMap<String, Vec<plan::ExistingKey>> = BTreeMap::new();
        for k in self.signer.list(None) {
            existing
                .entry(k.name.clone())
                .or_default()
                .push(plan::ExistingKey {
                    version: k.version,
                    state: k.state,
                    origin: k.origin,
                });
        }
        Ok(plan::Context {
            max_validity_days: self.config.max_validity_days,
            existing,
            seed_rotation: self.seed_master.is_some(),
            keks: shares::load_keks(&self.store)?,
            backup_dir: self.backup_dir.clone(),
        })
    }

    /// The shares held for `rec` from officers whose approvals count at `now`, by
    /// officer fingerprint.
    fn valid_shares(&self, rec: &CeremonyRecord, now: u64) -> Vec<ShareFile> {
        let counting: BTreeSet<&str> = self
            .counting_approvals(rec, now)
            .map(|(_, a)| a.officer.fingerprint.as_str())
            .collect();
        let held = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&rec.id)
            .map(|by_officer| {
                by_officer
                    .iter()
                    .filter(|(fp, _)| counting.contains(fp.as_str()))
                    .map(|(_, s)| s.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The backup files the `restore` steps of `plan` read, checked against their
    /// hashes.
    fn restore_sources(&self, plan: &Plan) -> Result<Vec<BackupFile>> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                Step::Restore { file, sha256, .. } => {
                    Some(plan::read_backup_file(&self.backup_dir, file, sha256))
                }
                _ => None,
            })
            .collect()
    }

    /// Why the shares held for `rec` cannot restore every backup file in `sources`
    /// (None: they can, as far as can be told without recombining).
    fn shares_problem(
        &self,
        rec: &CeremonyRecord,
        sources: &[BackupFile],
        now: u64,
    ) -> Option<String> {
        let held = self.valid_shares(rec, now);
        sources.iter().find_map(|b| {
            let of_kek: Vec<&ShareFile> = held
                .iter()
                .filter(|s| s.label == b.kek_label && s.check == b.kek_check)
                .collect();
            let mut indices: Vec<u8> = of_kek.iter().map(|s| s.index).collect();
            indices.sort_unstable();
            indices.dedup();
            // The threshold is written in the shares; with none held, only its minimum
            // is known.
            let (need, words) = of_kek.first().map_or((2, "at least 2".to_owned()), |s| {
                (usize::from(s.threshold), s.threshold.to_string())
            });
            (indices.len() < need).then(|| {
                format!(
                    "restoring from a backup under KEK {:?} (check {}) needs {words} distinct shares \
                     of it; {} held from officers whose approvals count (each officer approves \
                     with --share FILE; shares are held in memory only, so approve again after a \
                     service restart)",
                    b.kek_label,
                    b.kek_check,
                    indices.len()
                )
            })
        })
    }

    fn load(&self, id: &str) -> Result<CeremonyRecord> {
        self.store
            .read(|txn| record::load(txn, id))
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("no ceremony {id}")))
    }

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

    /// Record the caller's approval of ceremony `id`. Approving again replaces the
    /// earlier approval (it still counts once). `kek_share`, the text of the officer's
    /// backup KEK share file, is for a ceremony with a `restore` step: it must be a share
    /// of the KEK its backup file names, and is held in memory only (replacing an
    /// earlier share of the same officer).
    pub async fn approve(
        &self,
        actor: &Identity,
        id: &str,
        kek_share: Option<&str>,
    ) -> Result<CeremonyView> {
        let r = self.approve_inner(actor, id, kek_share).await;
        match &r {
            Ok(v) => self.event(
                actor,
                "ceremony.approve",
                &v.record.id,
                "ok",
                &json!({
                    "valid_approvals": v.valid_approvals,
                    "threshold": v.threshold,
                    "kek_share_given": kek_share.is_some(),
                    "kek_shares_held": v.kek_shares_held,
                }),
            ),
            Err(e) => {
                self.event(
                    actor,
                    "ceremony.approve",
                    id,
                    "refused",
                    &json!({ "reason": e.to_string() }),
                );
            }
        }
        r
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
            Some(text) => Some(self.check_share(&id, text)?),
        };
        let officer = officer_of(actor);
        let fingerprint = officer.fingerprint.clone();
        let now = self.clock.now();
        let key = id.clone();
        let outcome = self
            .store
            .write(move |txn| {
                record::update(txn, &key, |current| match current {
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
                        Change::Write(Box::new(rec.clone()), Ok(Box::new(rec)))
                    }
                })
            })
            .await
            .map_err(store_err)?;
        match outcome {
            Ok(rec) => {
                if let Some(share) = share {
                    self.shares
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(id.clone())
                        .or_default()
                        .insert(fingerprint, share);
                }
                self.view(*rec)
            }
            Err(None) => Err(Error::NotFound(format!("no ceremony {id}"))),
            Err(Some(state)) => Err(Error::FailedPrecondition(format!(
                "ceremony {id} is {}; only a proposed ceremony can be approved",
                state.as_str()
            ))),
        }
    }

    /// Parse a share handed in for ceremony `id` and check that it is a share of the KEK
    /// of a backup file the ceremony restores from. Errors never quote the share.
    fn check_share(&self, id: &str, text: &str) -> Result<ShareFile> {
        let rec = self.load(id)?;
        let parsed = plan::from_canonical(&rec.canonical_plan)?;
        let sources = self.restore_sources(&parsed)?;
        if sources.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "ceremony {id} has no restore step; it takes no KEK share"
            )));
        }
        let share = ShareFile::parse(text)?;
        if !sources
            .iter()
            .any(|b| b.kek_label == share.label && b.kek_check == share.check)
        {
            return Err(Error::InvalidArgument(format!(
                "the share is of KEK {:?} (check {}); ceremony {id} restores from {}",
                share.label,
                share.check,
                sources
                    .iter()
                    .map(|b| format!("KEK {:?} (check {})", b.kek_label, b.kek_check))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(share)
    }

    /// One ceremony.
    pub fn get(&self, id: &str) -> Result<CeremonyView> {
        let id = parse_id(id)?;
        self.view(self.load(&id)?)
    }

    /// Every ceremony, in id order.
    pub fn list(&self) -> Result<Vec<CeremonyView>> {
        self.store
            .read(record::load_all)
            .map_err(store_err)?
            .into_iter()
            .map(|r| self.view(r))
            .collect()
    }

    /// Which ceremony created each key version (`(name, version)` -> ceremony id).
    pub fn key_origins(&self) -> Result<HashMap<(String, u32), String>> {
        self.store.read(record::key_origins).map_err(store_err)
    }

    /// Execute ceremony `id`: only with `threshold` distinct officers' unexpired
    /// approvals, only once. Validation runs again first, before the HSM is touched.
    /// A failing step ends the ceremony (state `failed`); the transcript is written and
    /// returned either way.
    pub async fn execute(&self, actor: &Identity, id: &str) -> Result<Execution> {
        let r = self.execute_inner(actor, id).await;
        match &r {
            Ok(x) => self.event(
                actor,
                "ceremony.execute",
                &x.view.record.id,
                x.view.record.state.as_str(),
                &json!({ "failure": x.view.record.failure }),
            ),
            Err(e) => {
                self.event(
                    actor,
                    "ceremony.execute",
                    id,
                    "refused",
                    &json!({ "reason": e.to_string() }),
                );
            }
        }
        r
    }

    fn quorum_problem(&self, rec: &CeremonyRecord, now: u64) -> Option<String> {
        let valid = self.valid_officers(rec, now).len();
        let need = self.config.threshold as usize;
        (valid < need).then(|| {
            format!(
                "ceremony {} has {valid} valid approval(s) from distinct officers; it needs {need} \
                 (approvals expire after {} seconds)",
                rec.id, self.config.approval_ttl_seconds
            )
        })
    }

    async fn execute_inner(&self, actor: &Identity, id: &str) -> Result<Execution> {
        let id = parse_id(id)?;
        self.require_officer(actor)?;
        let _one = self.executing.lock().await;
        let rec = self.load(&id)?;
        if rec.state != CeremonyState::Proposed {
            return Err(Error::FailedPrecondition(format!(
                "ceremony {id} is {}; a ceremony runs once",
                rec.state.as_str()
            )));
        }
        let now = self.clock.now();
        if let Some(p) = self.quorum_problem(&rec, now) {
            return Err(Error::FailedPrecondition(p));
        }
        let parsed = plan::from_canonical(&rec.canonical_plan)?;
        plan::validate(&parsed, &self.context()?)?;
        let sources = self.restore_sources(&parsed)?;
        if let Some(p) = self.shares_problem(&rec, &sources, now) {
            return Err(Error::FailedPrecondition(p));
        }
        let (json_path, text_path) = self.transcript_paths(&id);
        for p in [&json_path, &text_path] {
            if p.exists() {
                return Err(Error::FailedPrecondition(format!(
                    "transcript {} exists already; refusing to overwrite it",
                    p.display()
                )));
            }
        }
        std::fs::create_dir_all(&self.transcript_dir).map_err(|e| {
            Error::Internal(format!(
                "transcript directory {}: {e}",
                self.transcript_dir.display()
            ))
        })?;

        // Claim the ceremony atomically: state and quorum checked again in the write.
        let executor = officer_of(actor);
        let ttl = self.config.approval_ttl_seconds;
        let need = self.config.threshold as usize;
        let officers = self.config.officers.clone();
        let key = id.clone();
        let claimed = self
            .store
            .write(move |txn| {
                record::update(txn, &key, |current| match current {
                    Some(mut rec) if rec.state == CeremonyState::Proposed => {
                        let valid: BTreeSet<usize> = rec
                            .approvals
                            .iter()
                            .filter(|a| now < a.approved_at.saturating_add(ttl))
                            .filter_map(|a| {
                                officers.iter().position(|o| {
                                    o.cn.as_deref().is_some_and(|cn| {
                                        !a.officer.subject.is_empty() && cn == a.officer.subject
                                    }) || o.fingerprint.as_deref().is_some_and(|fp| {
                                        fp.eq_ignore_ascii_case(&a.officer.fingerprint)
                                    })
                                })
                            })
                            .collect();
                        if valid.len() < need {
                            return Change::Keep(None);
                        }
                        rec.state = CeremonyState::Executing;
                        rec.executed_by = Some(executor);
                        rec.executed_at = now;
                        Change::Write(Box::new(rec.clone()), Some(Box::new(rec)))
                    }
                    _ => Change::Keep(None),
                })
            })
            .await
            .map_err(store_err)?;
        let Some(mut rec) = claimed.map(|b| *b) else {
            return Err(Error::FailedPrecondition(format!(
                "ceremony {id} changed while it was being claimed; it was not executed"
            )));
        };
        // The ceremony runs once: its shares are taken out of the map now and dropped
        // (zeroized) when the execution ends, whatever its outcome.
        let kek_shares = self.valid_shares(&rec, now);
        self.shares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.event(
            actor,
            "ceremony.execute",
            &id,
            "started",
            &json!({ "steps": parsed.steps.len() }),
        );

        let mut t = Transcript::start(&rec, &parsed, now);
        let mut created: Vec<(String, u32)> = Vec::new();
        let mut plan_keys: HashMap<String, u32> = HashMap::new();
        for (i, step) in parsed.steps.iter().enumerate() {
            let index = t.begin_step(i, step);
            let outcome = self
                .run_step(
                    actor,
                    &id,
                    i,
                    step,
                    &kek_shares,
                    &mut plan_keys,
                    &mut created,
                    &mut t,
                )
                .await;
            match outcome {
                Ok(()) => {
                    t.end_step(index, None);
                    self.event(
                        actor,
                        "ceremony.step",
                        &id,
                        "ok",
                        &json!({ "step": i + 1, "kind": step.kind(), "summary": step.summary() }),
                    );
                }
                Err(e) => {
                    let why = format!("step {} ({}) failed: {e}", i + 1, step.kind());
                    t.end_step(index, Some(e.to_string()));
                    self.event(
                        actor,
                        "ceremony.step",
                        &id,
                        "failed",
                        &json!({ "step": i + 1, "kind": step.kind(), "error": e.to_string() }),
                    );
                    rec.failure = why;
                    break;
                }
            }
        }
        rec.state = if rec.failure.is_empty() {
            CeremonyState::Succeeded
        } else {
            CeremonyState::Failed
        };
        t.finish(&rec, self.clock.now());
        let transcript_json = t.to_json()?;
        let transcript_text = t.to_text();
        rec.transcript_json = transcript_json.clone();

        let final_rec = rec.clone();
        let origins = created.clone();
        let key = id.clone();
        self.store
            .write(move |txn| {
                record::put_key_origins(txn, &key, &origins)?;
                record::update(txn, &key, |_| Change::Write(Box::new(final_rec), ()))
            })
            .await
            .map_err(store_err)?;
        write_new(&json_path, transcript_json.as_bytes())?;
        write_new(&text_path, transcript_text.as_bytes())?;
        Ok(Execution {
            view: self.view(rec)?,
            transcript: t,
            transcript_json,
            transcript_text,
        })
    }

    /// `<transcript_dir>/<id>.json` and `.txt`.
    pub fn transcript_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.transcript_dir.join(format!("{id}.json")),
            self.transcript_dir.join(format!("{id}.txt")),
        )
    }

    fn key_ref(plan_keys: &HashMap<String, u32>, name: &str, version: Option<u32>) -> KeyRef {
        KeyRef::new(
            name,
            plan_keys.get(name).copied().or(version).unwrap_or_default(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        actor: &Identity,
        id: &str,
        index: usize,
        step: &Step,
        kek_shares: &[ShareFile],
        plan_keys: &mut HashMap<String, u32>,
        created: &mut Vec<(String, u32)>,
        t: &mut Transcript,
    ) -> Result<()> {
        let changed = |k: &crate::signing::KeyVersion| {
            self.event(
                actor,
                "key.state",
                &format!("{}/v{}", k.name, k.version),
                k.state.as_str(),
                &json!({ "ceremony": id, "step": index + 1, "kid": k.kid }),
            );
        };
        match step {
            Step::GenerateKey {
                name,
                algorithm,
                backup,
                ..
            } => {
                let alg = algorithm.parse()?;
                let k = if *backup {
                    self.signer.create_backup_version(name, alg).await?
                } else {
                    self.signer.create_version(name, alg).await?
                };
                plan_keys.insert(name.clone(), k.version);
                created.push((name.clone(), k.version));
                // Listed before the check, so a key that fails it is in the transcript.
                t.key_created(index, &k);
                changed(&k);
                self.check_new_key(id, index, &k, t).await?;
            }
            Step::Backup { keys, kek, file } => {
                let record = shares::load_keks(&self.store)?.remove(kek).ok_or_else(|| {
                    Error::FailedPrecondition(format!("KEK {kek:?} is not provisioned"))
                })?;
                let mut entries = Vec::with_capacity(keys.len());
                for name in keys {
                    let r = Self::key_ref(plan_keys, name, None);
                    let (k, wrapped) = self.signer.wrap_for_backup(&r, kek).await?;
                    entries.push(BackupEntry::new(&k, &wrapped));
                }
                let backup = BackupFile {
                    format: backup_file::FORMAT.to_owned(),
                    plan_id: id.to_owned(),
                    kek_label: kek.clone(),
                    kek_check: record.check,
                    keys: entries,
                };
                let text = backup.to_text()?;
                std::fs::create_dir_all(&self.backup_dir).map_err(|e| {
                    Error::Internal(format!(
                        "backup directory {}: {e}",
                        self.backup_dir.display()
                    ))
                })?;
                backup_file::write_new(&self.backup_dir.join(file), &text)?;
                let sha256 = backup_file::sha256_hex(&text);
                self.event(
                    actor,
                    "ceremony.backup",
                    file,
                    "ok",
                    &json!({
                        "ceremony": id,
                        "step": index + 1,
                        "sha256": sha256,
                        "kek": kek,
                        "keys": backup.keys.iter().map(|k| format!("{}/v{}", k.name, k.version)).collect::<Vec<_>>(),
                    }),
                );
                t.backup_written(index, file, &backup, &sha256);
            }
            Step::Restore { file, sha256, keys } => {
                let backup = plan::read_backup_file(&self.backup_dir, file, sha256)?;
                let held: Vec<ShareFile> = kek_shares
                    .iter()
                    .filter(|s| s.label == backup.kek_label && s.check == backup.kek_check)
                    .cloned()
                    .collect();
                let kek = shares::combine_share_files(&backup.kek_label, &held)?;
                let entries: Vec<&BackupEntry> = if keys.is_empty() {
                    backup.keys.iter().collect()
                } else {
                    keys.iter()
                        .map(|n| backup.key(n, None))
                        .collect::<Result<_>>()?
                };
                for e in entries {
                    let k = self
                        .signer
                        .restore_version(
                            &e.name,
                            e.version,
                            e.algorithm.parse()?,
                            &e.wrapped()?,
                            e.chain()?,
                            kek.clone(),
                        )
                        .await?;
                    plan_keys.insert(k.name.clone(), k.version);
                    created.push((k.name.clone(), k.version));
                    t.key_created(index, &k);
                    changed(&k);
                    self.event(
                        actor,
                        "ceremony.restore",
                        &format!("{}/v{}", k.name, k.version),
                        "ok",
                        &json!({
                            "ceremony": id,
                            "step": index + 1,
                            "file": file,
                            "sha256": sha256,
                            "kek": backup.kek_label,
                            "kid": k.kid,
                            "shares_used": held.len(),
                        }),
                    );
                    self.check_new_key(id, index, &k, t).await?;
                }
            }
            Step::SelfSign {
                key,
                version,
                subject,
                validity_days,
            } => {
                let r = Self::key_ref(plan_keys, key, *version);
                let req = CertificateRequest {
                    subject: subject.clone(),
                    validity_days: *validity_days,
                    is_ca: true,
                    dns_names: Vec::new(),
                };
                let cert = self.signer.self_sign(&r, &req).await?;
                let k = self.signer.get(&r)?;
                t.certificate(index, &k, &[cert]);
            }
            Step::IssueCertificate {
                issuer,
                issuer_version,
                key,
                version,
                subject,
                validity_days,
                usage,
                dns_names,
            } => {
                let r = Self::key_ref(plan_keys, key, *version);
                let ri = Self::key_ref(plan_keys, issuer, *issuer_version);
                let req = CertificateRequest {
                    subject: subject.clone(),
                    validity_days: *validity_days,
                    is_ca: *usage == Usage::Ca,
                    dns_names: dns_names.clone(),
                };
                let chain = self.signer.issue_certificate(&r, &ri, &req).await?;
                let k = self.signer.get(&r)?;
                t.certificate(index, &k, &chain);
            }
            Step::Publish { key, version }
            | Step::Activate { key, version }
            | Step::Retire { key, version } => {
                let r = self.signer.get(&Self::key_ref(plan_keys, key, *version))?;
                let before: Vec<_> = self.signer.list(Some(key));
                let k = match step {
                    Step::Publish { .. } => self.signer.publish(key, r.version).await?,
                    Step::Activate { .. } => self.signer.activate(key, r.version).await?,
                    _ => self.signer.retire(key, r.version).await?,
                };
                // Activation may retire the version active until now: report every change.
                for after in self.signer.list(Some(key)) {
                    let was = before
                        .iter()
                        .find(|b| b.version == after.version)
                        .map(|b| b.state);
                    if was != Some(after.state) {
                        changed(&after);
                        t.state_change(index, &after, was);
                    }
                }
                debug_assert_eq!(k.version, r.version);
            }
            Step::Destroy {
                key,
                version,
                force,
            } => {
                let before = self.signer.get(&KeyRef::new(key, *version))?;
                if before.state == KeyState::Destroyed {
                    return Err(Error::FailedPrecondition(format!(
                        "{key} v{version} is already destroyed"
                    )));
                }
                let k = self.signer.destroy(key, *version, *force).await?;
                changed(&k);
                t.state_change(index, &k, Some(before.state));
            }
            Step::RotateSeedMasterKey { batch_size } => {
                let r = self.rotate_seed_master_key(*batch_size as usize).await?;
                self.event(
                    actor,
                    "ceremony.event",
                    &r.new_key_label,
                    "ok",
                    &json!({
                        "ceremony": id,
                        "step": index + 1,
                        "old_key": r.old_key_label,
                        "new_key": r.new_key_label,
                        "rewrapped": r.rewrapped,
                    }),
                );
                t.seed_rotation(index, r);
            }
        }
        Ok(())
    }

    /// The check after a key was generated or restored, into the transcript; a failed
    /// check fails the step.
    async fn check_new_key(
        &self,
        id: &str,
        index: usize,
        k: &crate::signing::KeyVersion,
        t: &mut Transcript,
    ) -> Result<()> {
        let context = format!(
            "ceremony {id} step {} key {}/v{}",
            index + 1,
            k.name,
            k.version
        );
        let check = self
            .signer
            .self_test(&KeyRef::new(&k.name, k.version), &context)
            .await?;
        t.key_checked(index, &check);
        if let Some(problem) = check.problem() {
            return Err(Error::Internal(format!(
                "the check of {} v{} failed: {problem}",
                k.name, k.version
            )));
        }
        Ok(())
    }

    /// Create seed master key N+1, point new enrolments at it, re-wrap every stored
    /// seed under it inside the HSM, `batch` per job, and record N+1 as the store's
    /// master key version. Each record is updated with a compare (its blob and version
    /// unchanged), so a credential changed meanwhile is re-read and done again, and a
    /// deleted one is skipped. Resumable: records already under N+1 are left alone.
    async fn rotate_seed_master_key(&self, batch: usize) -> Result<SeedRotation> {
        let cell = self.seed_master.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("no credential seed master key to rotate".into())
        })?;
        let hsm = self.signer.hsm();
        let old = cell.load(Ordering::SeqCst);
        let new = old
            .checked_add(1)
            .ok_or_else(|| Error::Internal("seed master key version overflow".into()))?;
        hsm.ensure_seed_master_key(new).await?;
        // From now on new enrolments wrap under the new key; a rotation that fails
        // half-way leaves records under either key, both kept and both usable.
        cell.store(new, Ordering::SeqCst);
        tracing::info!(
            old = %master_key_label(old),
            new = %master_key_label(new),
            "seed master key rotation started"
        );
        let mut rewrapped = 0u64;
        let mut already = 0u64;
        // Two passes: the second catches an enrolment that read the old version just
        // before the switch and was stored behind the first pass's cursor.
        for pass in 0..2 {
            let mut after: Option<crate::store::CredentialKey> = None;
            loop {
                let page = self
                    .store
                    .list(None, after.as_ref(), batch)
                    .await
                    .map_err(store_err)?;
                let Some(last) = page.last() else {
                    break;
                };
                after = Some(crate::store::CredentialKey {
                    tenant: last.tenant.clone(),
                    id: last.id.clone(),
                });
                let (done, todo): (Vec<_>, Vec<_>) =
                    page.into_iter().partition(|r| r.master_key_version == new);
                if pass == 0 {
                    already += done.len() as u64;
                }
                rewrapped += self.rewrap_batch(new, todo).await?;
            }
        }
        self.store
            .put_meta(MASTER_KEY_VERSION_META, new.to_be_bytes().to_vec())
            .await
            .map_err(store_err)?;
        tracing::info!(
            old = %master_key_label(old),
            new = %master_key_label(new),
            rewrapped,
            "seed master key rotated; the old key is kept"
        );
        Ok(SeedRotation {
            old_key_label: master_key_label(old),
            new_key_label: master_key_label(new),
            rewrapped,
            already_rewrapped: already,
        })
    }

    /// Re-wrap `records` (none of them under `new`) and store each with a compare;
    /// a record changed meanwhile is re-read and redone (a few rounds at most).
    async fn rewrap_batch(&self, new: u32, mut records: Vec<CredentialRecord>) -> Result<u64> {
        const ROUNDS: usize = 5;
        let hsm = self.signer.hsm();
        let mut count = 0u64;
        for _ in 0..ROUNDS {
            if records.is_empty() {
                return Ok(count);
            }
            let mut redo = Vec::new();
            // Grouped by the version each is wrapped under (normally all the old one).
            let mut by_version: BTreeMap<u32, Vec<CredentialRecord>> = BTreeMap::new();
            for r in records.drain(..) {
                by_version.entry(r.master_key_version).or_default().push(r);
            }
            for (from, recs) in by_version {
                let blobs: Vec<Arc<[u8]>> = recs
                    .iter()
                    .map(|r| Arc::from(r.wrapped_seed.as_slice()))
                    .collect();
                let rewrapped = hsm.rewrap_seeds(from, new, blobs).await?;
                for (rec, blob) in recs.into_iter().zip(rewrapped) {
                    let expect = rec.wrapped_seed.clone();
                    let stored = self
                        .store
                        .update(&rec.tenant, &rec.id, move |r| {
                            if r.master_key_version != from || r.wrapped_seed != expect {
                                return Update::Keep(false);
                            }
                            r.wrapped_seed = blob;
                            r.master_key_version = new;
                            Update::Write(true)
                        })
                        .await;
                    match stored {
                        Ok(true) => count += 1,
                        Ok(false) => {
                            if let Some(now) = self
                                .store
                                .get(&rec.tenant, &rec.id)
                                .await
                                .map_err(store_err)?
                            {
                                if now.master_key_version != new {
                                    redo.push(now);
                                }
                            }
                        }
                        Err(StoreError::NotFound) => {}
                        Err(e) => return Err(store_err(e)),
                    }
                }
            }
            records = redo;
        }
        if records.is_empty() {
            Ok(count)
        } else {
            Err(Error::FailedPrecondition(format!(
                "{} credential(s) kept changing during the re-wrap; run the rotation again",
                records.len()
            )))
        }
    }
}

/// Write a new file; never overwrite one.
fn write_new(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::Internal(format!("transcript {}: {e}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::Internal(format!("transcript {}: {e}", path.display())))
}
