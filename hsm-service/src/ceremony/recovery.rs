//! Start-up recovery: a ceremony found `executing` was cut short (the service stopped
//! or crashed mid-run). It cannot be resumed (which steps ran is not known for sure, and
//! a ceremony runs once), so it becomes `failed` with the reason [`INTERRUPTED`] and a
//! transcript of what it had created: the key versions recorded for it so far (each is
//! recorded in the write that audits its creation, see `steps`). The change and its
//! audit record are one write; the transcript files follow.

use serde_json::json;

use super::events::{CeremonyEvent, Who};
use super::execute::write_new;
use super::plan;
use super::record::{self, CeremonyRecord, CeremonyState, Change};
use super::{store_err, Ceremonies, Transcript};
use crate::error::Result;
use crate::signing::{KeyRef, KeyVersion};

/// The failure of a ceremony found `executing` at start-up.
pub const INTERRUPTED: &str = "interrupted";

impl Ceremonies {
    /// Mark every ceremony found `executing` as failed ("interrupted"), with its
    /// transcript; returns their ids. Run once at start-up, before the service serves.
    pub async fn recover_interrupted(&self) -> Result<Vec<String>> {
        let interrupted: Vec<CeremonyRecord> = self
            .store
            .read(record::load_all)
            .map_err(store_err)?
            .into_iter()
            .filter(|r| r.state == CeremonyState::Executing)
            .collect();
        let mut ids = Vec::with_capacity(interrupted.len());
        for rec in interrupted {
            ids.push(self.fail_interrupted(rec).await?);
        }
        Ok(ids)
    }

    /// The key versions recorded as created by ceremony `id`, in name and version order.
    fn keys_created_by(&self, id: &str) -> Result<Vec<KeyVersion>> {
        let mut created: Vec<(String, u32)> = self
            .key_origins()?
            .into_iter()
            .filter(|(_, ceremony)| ceremony == id)
            .map(|(key, _)| key)
            .collect();
        created.sort();
        Ok(created
            .into_iter()
            .filter_map(|(name, version)| {
                let found = self.signer.get(&KeyRef::new(&name, version));
                if found.is_err() {
                    tracing::warn!(ceremony = id, key = %name, version, "interrupted ceremony: a key it recorded is unknown to the signer");
                }
                found.ok()
            })
            .collect())
    }

    async fn fail_interrupted(&self, mut rec: CeremonyRecord) -> Result<String> {
        let id = rec.id.clone();
        let parsed = plan::from_canonical(&rec.canonical_plan)?;
        let keys = self.keys_created_by(&id)?;
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
