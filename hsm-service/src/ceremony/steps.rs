//! The step interpreter: one function per step kind. Each runs its step through the
//! [`Signer`](crate::signing::Signer), adds what it made to the transcript and emits
//! its events; an error fails the step (and ends the ceremony).

use std::collections::HashMap;

use serde_json::json;

use super::backup_file::{self, BackupEntry, BackupFile};
use super::events::CeremonyEvent;
use super::plan::{self, Step, Usage};
use super::record;
use super::shares::{self, ShareFile};
use super::{store_err, Ceremonies, Transcript};
use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::signing::{BackedUpKey, CertificateRequest, Issuance, KeyRef, KeyState, KeyVersion};

/// One execution in progress: who runs it, and what its steps made so far.
pub(super) struct Run<'a> {
    /// The executing officer.
    pub actor: &'a Identity,
    /// The ceremony id.
    pub id: &'a str,
    /// Backup KEK shares taken for this execution (for `restore` steps).
    pub kek_shares: &'a [ShareFile],
    /// Versions of the keys the plan created so far, by name.
    pub plan_keys: HashMap<String, u32>,
    /// Every key version created so far, in order.
    pub created: Vec<(String, u32)>,
    /// The transcript being written.
    pub t: Transcript,
}

impl Run<'_> {
    /// The authority this execution gives a `ca` key to sign certificates.
    fn issuance(&self) -> Issuance {
        Issuance::Ceremony {
            id: self.id.to_owned(),
            actor: self.actor.actor(),
        }
    }

    /// The version a step's key reference means: the one the plan created, else the
    /// one the plan names (0: the current one).
    fn key_ref(&self, name: &str, version: Option<u32>) -> KeyRef {
        KeyRef::new(
            name,
            self.plan_keys
                .get(name)
                .copied()
                .or(version)
                .unwrap_or_default(),
        )
    }

    /// Step `index` created `k`.
    fn created(&mut self, index: usize, k: &KeyVersion) {
        self.plan_keys.insert(k.name.clone(), k.version);
        self.created.push((k.name.clone(), k.version));
        self.t.key_created(index, k);
    }
}

impl Ceremonies {
    /// Run step `index` of the plan.
    pub(super) async fn run_step(
        &self,
        run: &mut Run<'_>,
        index: usize,
        step: &Step,
    ) -> Result<()> {
        match step {
            Step::GenerateKey {
                name,
                algorithm,
                usage,
                backup,
                ..
            } => {
                self.generate_key(run, index, name, algorithm, *usage, *backup)
                    .await
            }
            Step::Backup { keys, kek, file } => self.backup(run, index, keys, kek, file).await,
            Step::Restore { file, sha256, keys } => {
                self.restore(run, index, file, sha256, keys).await
            }
            Step::SelfSign {
                key,
                version,
                subject,
                validity_days,
            } => {
                self.self_sign(run, index, key, *version, subject, *validity_days)
                    .await
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
                let r = run.key_ref(key, *version);
                let ri = run.key_ref(issuer, *issuer_version);
                let req = CertificateRequest {
                    subject: subject.clone(),
                    validity_days: *validity_days,
                    is_ca: *usage == Usage::Ca,
                    dns_names: dns_names.clone(),
                };
                self.issue_certificate(run, index, &r, &ri, &req).await
            }
            Step::Publish { key, version }
            | Step::Activate { key, version }
            | Step::Retire { key, version } => {
                self.change_state(run, index, step, key, *version).await
            }
            Step::Destroy {
                key,
                version,
                force,
            } => self.destroy(run, index, key, *version, *force).await,
            Step::RotateSeedMasterKey { batch_size } => {
                self.rotate_seed(run, index, *batch_size).await
            }
        }
    }

    /// The event of a key version's state change (creation included).
    fn key_state_event(&self, run: &Run<'_>, index: usize, k: &KeyVersion) -> CeremonyEvent {
        self.note(
            run.actor,
            "key.state",
            &format!("{}/v{}", k.name, k.version),
            k.state.as_str(),
            json!({ "ceremony": run.id, "step": index + 1, "kid": k.kid }),
        )
    }

    /// Record a state change of `k` made by step `index`.
    async fn key_changed(&self, run: &Run<'_>, index: usize, k: &KeyVersion) -> Result<()> {
        self.emit(self.key_state_event(run, index, k)).await
    }

    /// Step `index` created `k` (generated or restored): into the transcript, and into
    /// the index of the keys this ceremony created together with its audit record, so
    /// that an execution cut short still shows what it made (see
    /// [`Ceremonies::recover_interrupted`]).
    async fn key_created(&self, run: &mut Run<'_>, index: usize, k: &KeyVersion) -> Result<()> {
        run.created(index, k);
        let events = [self.key_state_event(run, index, k)];
        let (trail, audited) = (self.trail(), events.clone());
        let (id, origin) = (run.id.to_owned(), [(k.name.clone(), k.version)]);
        self.store
            .write(move |txn| {
                record::put_key_origins(txn, &id, &origin)?;
                trail.append(txn, &audited)
            })
            .await
            .map_err(store_err)?;
        self.emitted(&events);
        Ok(())
    }

    /// `generate-key`: a new key (or version) in the HSM, then its check.
    async fn generate_key(
        &self,
        run: &mut Run<'_>,
        index: usize,
        name: &str,
        algorithm: &str,
        usage: Usage,
        backup: bool,
    ) -> Result<()> {
        let alg = algorithm.parse()?;
        let k = if backup {
            self.signer.create_backup_version(name, alg, usage).await?
        } else {
            self.signer.create_version(name, alg, usage).await?
        };
        // Listed before the check, so a key that fails it is in the transcript.
        self.key_created(run, index, &k).await?;
        self.check_new_key(run, index, &k).await
    }

    /// `backup`: wrap the named keys under a trusted KEK into a new backup file.
    async fn backup(
        &self,
        run: &mut Run<'_>,
        index: usize,
        keys: &[String],
        kek: &str,
        file: &str,
    ) -> Result<()> {
        let record = shares::load_keks(&self.store)
            .await?
            .remove(kek)
            .ok_or_else(|| Error::FailedPrecondition(format!("KEK {kek:?} is not provisioned")))?;
        let mut entries = Vec::with_capacity(keys.len());
        for name in keys {
            let r = run.key_ref(name, None);
            let (k, wrapped) = self.signer.wrap_for_backup(&r, kek).await?;
            entries.push(BackupEntry::new(&k, &wrapped));
        }
        let backup = BackupFile {
            format: backup_file::FORMAT.to_owned(),
            plan_id: run.id.to_owned(),
            kek_label: kek.to_owned(),
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
        run.t.backup_written(index, file, &backup, &sha256);
        self.emit(self.note(
            run.actor,
            "ceremony.backup",
            file,
            "ok",
            json!({
                "ceremony": run.id,
                "step": index + 1,
                "sha256": sha256,
                "kek": kek,
                "keys": backup.keys.iter().map(|k| format!("{}/v{}", k.name, k.version)).collect::<Vec<_>>(),
            }),
        ))
        .await
    }

    /// `restore`: keys from a backup file, unwrapped under the KEK recombined from the
    /// officers' shares, each checked.
    async fn restore(
        &self,
        run: &mut Run<'_>,
        index: usize,
        file: &str,
        sha256: &str,
        keys: &[String],
    ) -> Result<()> {
        let backup = plan::read_backup_file(&self.backup_dir, file, sha256)?;
        let held: Vec<ShareFile> = run
            .kek_shares
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
                    BackedUpKey {
                        name: &e.name,
                        version: e.version,
                        algorithm: e.algorithm.parse()?,
                        usage: e.usage,
                        wrapped: &e.wrapped()?,
                        certificate_chain: e.chain()?,
                    },
                    kek.clone(),
                )
                .await?;
            self.key_created(run, index, &k).await?;
            self.emit(self.note(
                run.actor,
                "ceremony.restore",
                &format!("{}/v{}", k.name, k.version),
                "ok",
                json!({
                    "ceremony": run.id,
                    "step": index + 1,
                    "file": file,
                    "sha256": sha256,
                    "kek": backup.kek_label,
                    "kid": k.kid,
                    "shares_used": held.len(),
                }),
            ))
            .await?;
            self.check_new_key(run, index, &k).await?;
        }
        Ok(())
    }

    /// `self-sign`: a self-signed CA certificate for a key.
    async fn self_sign(
        &self,
        run: &mut Run<'_>,
        index: usize,
        key: &str,
        version: Option<u32>,
        subject: &str,
        validity_days: u32,
    ) -> Result<()> {
        let r = run.key_ref(key, version);
        let req = CertificateRequest {
            subject: subject.to_owned(),
            validity_days,
            is_ca: true,
            dns_names: Vec::new(),
        };
        let cert = self.signer.self_sign(&r, &req, &run.issuance()).await?;
        let k = self.signer.get(&r)?;
        run.t.certificate(index, &k, &[cert]);
        Ok(())
    }

    /// `issue-certificate`: a certificate for `key` by `issuer`.
    async fn issue_certificate(
        &self,
        run: &mut Run<'_>,
        index: usize,
        key: &KeyRef,
        issuer: &KeyRef,
        req: &CertificateRequest,
    ) -> Result<()> {
        let chain = self
            .signer
            .issue_certificate(key, issuer, req, &run.issuance())
            .await?;
        let k = self.signer.get(key)?;
        run.t.certificate(index, &k, &chain);
        Ok(())
    }

    /// `publish`, `activate`, `retire`: one state change, and every change it causes.
    async fn change_state(
        &self,
        run: &mut Run<'_>,
        index: usize,
        step: &Step,
        key: &str,
        version: Option<u32>,
    ) -> Result<()> {
        let r = self.signer.get(&run.key_ref(key, version))?;
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
                run.t.state_change(index, &after, was);
                self.key_changed(run, index, &after).await?;
            }
        }
        debug_assert_eq!(k.version, r.version);
        Ok(())
    }

    /// `destroy`: a version's HSM objects.
    async fn destroy(
        &self,
        run: &mut Run<'_>,
        index: usize,
        key: &str,
        version: u32,
        force: bool,
    ) -> Result<()> {
        let before = self.signer.get(&KeyRef::new(key, version))?;
        if before.state == KeyState::Destroyed {
            return Err(Error::FailedPrecondition(format!(
                "{key} v{version} is already destroyed"
            )));
        }
        let k = self.signer.destroy(key, version, force).await?;
        run.t.state_change(index, &k, Some(before.state));
        self.key_changed(run, index, &k).await
    }

    /// `rotate-seed-master-key`: a new seed master key, every seed re-wrapped under it.
    async fn rotate_seed(&self, run: &mut Run<'_>, index: usize, batch_size: u32) -> Result<()> {
        let rotator = self.seed_master.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("no credential seed master key to rotate".into())
        })?;
        let r = rotator.rotate(batch_size as usize).await?;
        let event = self.note(
            run.actor,
            "ceremony.event",
            &r.new_key_label,
            "ok",
            json!({
                "ceremony": run.id,
                "step": index + 1,
                "old_key": r.old_key_label,
                "new_key": r.new_key_label,
                "rewrapped": r.rewrapped,
            }),
        );
        run.t.seed_rotation(index, r);
        self.emit(event).await
    }

    /// The check after a key was generated or restored, into the transcript; a failed
    /// check fails the step.
    async fn check_new_key(&self, run: &mut Run<'_>, index: usize, k: &KeyVersion) -> Result<()> {
        let context = format!(
            "ceremony {} step {} key {}/v{}",
            run.id,
            index + 1,
            k.name,
            k.version
        );
        let check = self
            .signer
            .self_test(&KeyRef::new(&k.name, k.version), &context)
            .await?;
        run.t.key_checked(index, &check);
        if let Some(problem) = check.problem() {
            return Err(Error::Internal(format!(
                "the check of {} v{} failed: {problem}",
                k.name, k.version
            )));
        }
        Ok(())
    }
}
