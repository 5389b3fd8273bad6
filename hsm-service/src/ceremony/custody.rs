//! Custody of backup KEK shares handed in with approvals: checked against the backup
//! files the ceremony restores from, held in memory only (per ceremony and officer),
//! counted only while their officer's approval counts, taken out once at execution.

use std::collections::BTreeSet;

use super::backup_file::BackupFile;
use super::plan::{self, Plan, Step};
use super::record::CeremonyRecord;
use super::shares::ShareFile;
use super::Ceremonies;
use crate::error::{Error, Result};

impl Ceremonies {
    /// Parse a share handed in for ceremony `id` and check that it is a share of the KEK
    /// of a backup file the ceremony restores from. Errors never quote the share.
    pub(super) async fn check_share(&self, id: &str, text: &str) -> Result<ShareFile> {
        let rec = self.load(id).await?;
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

    /// Hold `share` for ceremony `id` from the officer with certificate `fingerprint`
    /// (replacing that officer's earlier share).
    pub(super) fn hold_share(&self, id: &str, fingerprint: String, share: ShareFile) {
        self.shares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .insert(fingerprint, share);
    }

    /// Fingerprints of the officers holding a share for ceremony `id` (approvals
    /// counting or not).
    pub(super) fn share_holders(&self, id: &str) -> BTreeSet<String> {
        let held = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        held.get(id)
            .map(|by_officer| by_officer.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The shares held for `rec` from officers whose approvals count at `now`, by
    /// officer fingerprint.
    pub(super) fn valid_shares(&self, rec: &CeremonyRecord, now: u64) -> Vec<ShareFile> {
        let counting: BTreeSet<&str> = self
            .quorum
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

    /// The ceremony runs once: the shares that count are handed to the execution and
    /// every share held for it is dropped from the map (zeroized when the execution
    /// ends, whatever its outcome).
    pub(super) fn take_shares(&self, rec: &CeremonyRecord, now: u64) -> Vec<ShareFile> {
        let counting = self.valid_shares(rec, now);
        self.shares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.id);
        counting
    }

    /// The backup files the `restore` steps of `plan` read, checked against their
    /// hashes.
    pub(super) fn restore_sources(&self, plan: &Plan) -> Result<Vec<BackupFile>> {
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
    pub(super) fn shares_problem(
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
}
