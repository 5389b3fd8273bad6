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
//! Every proposal, approval, refusal, step and key state change is audited ([`events`]):
//! in the same store write as the change it describes, or durably before the ceremony
//! goes on or the caller hears back.
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
mod custody;
mod events;
mod execute;
pub mod plan;
mod propose;
mod quorum;
pub mod record;
mod recovery;
pub mod shares;
mod steps;
pub mod transcript;
pub mod words;

#[cfg(test)]
mod backup_restore_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use crate::audit::log::AuditLog;
use crate::auth::Identity;
use crate::common::Clock;
use crate::config::CeremonyConfig;
use crate::credentials::rotation::SeedRotator;
use crate::error::{Error, Result};
use crate::signing::Signer;
use crate::store::{Store, StoreError};
pub use plan::{Plan, Step, Usage};
pub use record::{Approval, CeremonyRecord, CeremonyState, Officer};
pub use recovery::INTERRUPTED;
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
    store: Arc<Store>,
    config: CeremonyConfig,
    /// Which approvals count (from `config`).
    quorum: quorum::Quorum,
    transcript_dir: PathBuf,
    backup_dir: PathBuf,
    clock: Clock,
    /// One execution at a time: validation and execution see the same keys.
    executing: tokio::sync::Mutex<()>,
    /// Where events are recorded.
    audit: Option<Arc<AuditLog>>,
    /// The credential service's seed master key rotation (see
    /// [`crate::credentials::Credentials::seed_rotator`]).
    seed_master: Option<SeedRotator>,
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
    crate::error::store_failure("ceremony store", e)
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
        store: Arc<Store>,
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
            quorum: quorum::Quorum::of(&config),
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

    /// Record every event in `log` as well.
    pub fn with_audit(mut self, log: Arc<AuditLog>) -> Self {
        self.audit = Some(log);
        self
    }

    /// Allow `rotate-seed-master-key`, run by the credential service's `rotator`.
    pub fn with_seed_master(mut self, rotator: SeedRotator) -> Self {
        self.seed_master = Some(rotator);
        self
    }

    fn view(&self, record: CeremonyRecord) -> Result<CeremonyView> {
        let plan = plan::from_canonical(&record.canonical_plan)?;
        let now = self.clock.now();
        let valid = self.quorum.counting_officers(&record, now);
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

    async fn context(&self) -> Result<plan::Context> {
        // Validate against the keys every instance made (a ceremony executed on another
        // instance a moment ago), not only those this one has loaded.
        self.signer.refresh().await?;
        let mut existing: BTreeMap<String, Vec<plan::ExistingKey>> = BTreeMap::new();
        for k in self.signer.list(None) {
            existing
                .entry(k.name.clone())
                .or_default()
                .push(plan::ExistingKey {
                    version: k.version,
                    state: k.state,
                    origin: k.origin,
                    usage: k.usage,
                });
        }
        Ok(plan::Context {
            max_validity_days: self.config.max_validity_days,
            existing,
            seed_rotation: self.seed_master.is_some(),
            keks: shares::load_keks(&self.store).await?,
            backup_dir: self.backup_dir.clone(),
        })
    }

    async fn load(&self, id: &str) -> Result<CeremonyRecord> {
        let key = id.to_owned();
        self.store
            .read(move |txn| record::load(txn, &key))
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("no ceremony {id}")))
    }

    /// One ceremony.
    pub async fn get(&self, id: &str) -> Result<CeremonyView> {
        let id = parse_id(id)?;
        self.view(self.load(&id).await?)
    }

    /// Every ceremony, in id order.
    pub async fn list(&self) -> Result<Vec<CeremonyView>> {
        self.store
            .read(|txn| record::load_all(txn))
            .await
            .map_err(store_err)?
            .into_iter()
            .map(|r| self.view(r))
            .collect()
    }

    /// Which ceremony created each key version (`(name, version)` -> ceremony id).
    pub async fn key_origins(&self) -> Result<HashMap<(String, u32), String>> {
        self.store
            .read(|txn| record::key_origins(txn))
            .await
            .map_err(store_err)
    }

    /// `<transcript_dir>/<id>.json` and `.txt`.
    pub fn transcript_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.transcript_dir.join(format!("{id}.json")),
            self.transcript_dir.join(format!("{id}.txt")),
        )
    }
}
