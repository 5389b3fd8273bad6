//! Start-up recovery: a ceremony found `executing` was cut short (the service stopped
//! or crashed mid-run). It cannot be resumed (which steps ran is not known for sure, and
//! a ceremony runs once), so it becomes `failed` with the reason [`INTERRUPTED`] and a
//! transcript of what it had created: the key versions recorded for it so far (each is
//! recorded in the write that audits its creation, see `steps`), and any its run made
//! without getting to record it. The change, the index of those keys and the audit
//! record are one write; the transcript files follow.

use serde_json::json;

use super::events::{CeremonyEvent, Who};
use super::execute::write_new;
use std::collections::BTreeSet;

use super::plan::{self, Plan, Step};
use super::record::{self, CeremonyRecord, CeremonyState, Change};
use super::{store_err, Ceremonies, Transcript};
use crate::error::Result;
use crate::signing::KeyVersion;

/// The failure of a ceremony found `executing` at start-up.
pub const INTERRUPTED: &str = "interrupted";

impl Ceremonies {
    /// Mark every ceremony found `executing` by this instance (or by a service that did
    /// not record its instance) as failed ("interrupted"), with its transcript; returns
    /// their ids. Run once at start-up, before the service serves. Another instance's
    /// `executing` ceremony is left alone: it may be running right now (when that
    /// instance died, its restart under the same name recovers it).
    pub async fn recover_interrupted(&self) -> Result<Vec<String>> {
        let me = self.instance();
        let interrupted: Vec<CeremonyRecord> = self
            .store
            .read(|txn| record::load_all(txn))
            .await
            .map_err(store_err)?
            .into_iter()
            .filter(|r| r.state == CeremonyState::Executing)
            .filter(|r| r.executed_on.is_empty() || r.executed_on == me)
            .collect();
        let mut ids = Vec::with_capacity(interrupted.len());
        for rec in interrupted {
            ids.push(self.fail_interrupted(rec).await?);
        }
        Ok(ids)
    }

    /// The key versions ceremony `rec` created: those recorded for it, and those its
    /// run made but did not get to record (the HSM key and the signer's record exist, the
    /// crash came before the ceremony's write): a version of a name the plan generates or
    /// restores, created since the claim, recorded for no ceremony. Keys are made only
    /// by ceremonies (and the dev bootstrap, at start-up), one ceremony at a time, so
    /// nothing else fits that description. In name and version order.
    async fn keys_created_by(
        &self,
        rec: &CeremonyRecord,
        parsed: &Plan,
    ) -> Result<Vec<KeyVersion>> {
        let origins = self.key_origins().await?;
        let names = self.names_created_by(parsed);
        Ok(self
            .signer
            .list(None)
            .into_iter()
            .filter(|k| match origins.get(&(k.name.clone(), k.version)) {
                Some(ceremony) => *ceremony == rec.id,
                None => k.created_at >= rec.executed_at && names.contains(&k.name),
            })
            .collect())
    }

    /// The key names `plan` generates or restores (a restore of a whole backup file: the
    /// names in the file, when it is still there).
    fn names_created_by(&self, parsed: &Plan) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for step in &parsed.steps {
            match step {
                Step::GenerateKey { name, .. } => {
                    names.insert(name.clone());
                }
                Step::Restore { keys, .. } if !keys.is_empty() => {
                    names.extend(keys.iter().cloned());
                }
                Step::Restore { file, sha256, .. } => {
                    if let Ok(b) = plan::read_backup_file(&self.backup_dir, file, sha256) {
                        names.extend(b.keys.into_iter().map(|e| e.name));
                    }
                }
                _ => {}
            }
        }
        names
    }

    async fn fail_interrupted(&self, mut rec: CeremonyRecord) -> Result<String> {
        let id = rec.id.clone();
        let parsed = plan::from_canonical(&rec.canonical_plan)?;
        let keys = self.keys_created_by(&rec, &parsed).await?;
        let mut t = Transcript::start(&rec, &parsed, rec.executed_at);
        t.interrupted(&keys);
        rec.state = CeremonyState::Failed;
        rec.failure = INTERRUPTED.to_owned();
        t.finish(&rec, self.clock.now());
        let transcript_json = t.to_json()?;
        rec.transcript_json = transcript_json.clone();
        let names: Vec<String> = keys
            .iter()
            .map(|k| format!("{}/v{}", k.name, k.version))
            .collect();
        let events = [CeremonyEvent::new(
            self.clock.now_ms(),
            &Who::service(),
            "ceremony.execute",
            &id,
            "failed",
            json!({ "reason": INTERRUPTED, "created_keys": names }),
        )];
        let (key, trail, audited) = (id.clone(), self.trail(), events.clone());
        let origins: Vec<(String, u32)> =
            keys.iter().map(|k| (k.name.clone(), k.version)).collect();
        let changed = self
            .store
            .write(move |txn| {
                let changed = record::update(txn, &key, |current| match current {
                    Some(c) if c.state == CeremonyState::Executing => {
                        Change::Write(Box::new(rec), true)
                    }
                    _ => Change::Keep(false),
                })?;
                if changed {
                    record::put_key_origins(txn, &key, &origins)?;
                    trail.append(txn, &audited)?;
                }
                Ok(changed)
            })
            .await
            .map_err(store_err)?;
        if !changed {
            return Ok(id);
        }
        self.emitted(&events);
        tracing::warn!(
            ceremony = %id,
            created_keys = names.len(),
            "a ceremony was interrupted mid-run (the service stopped); marked failed"
        );
        // The record holds the transcript; the files are for the officers. One left by
        // the interrupted run is kept, never overwritten.
        let (json_path, text_path) = self.transcript_paths(&id);
        let files = std::fs::create_dir_all(&self.transcript_dir)
            .map_err(|e| crate::error::Error::Internal(format!("transcript directory: {e}")))
            .and_then(|()| write_new(&json_path, transcript_json.as_bytes()))
            .and_then(|()| write_new(&text_path, t.to_text().as_bytes()));
        if let Err(e) = files {
            tracing::error!(ceremony = %id, error = %e, "interrupted ceremony: transcript file not written (the record holds it)");
        }
        Ok(id)
    }
}
