//! Bulk import of PSKC (RFC 6030) entries whose secrets arrive still encrypted: the
//! HSM checks each MAC and decrypts each secret (see [`crate::hsm::import`]), the seed
//! is wrapped under the seed master key like every other seed, and each batch commits
//! as one transaction: its new credentials, one audit record (`credential.import`,
//! with the file's SHA-256 and the batch's counts) and one `credential.created` event
//! per imported credential (details `{"kind":..,"imported":true}`).
//!
//! Idempotent by credential id: an id the tenant holds already is compared, never
//! overwritten. The same parameters (kind, algorithm, digits, period, subject) and the
//! same seed make it SKIPPED; anything else a CONFLICT. The seeds are compared as
//! blobs: the HSM wraps the new seed under the stored record's master key and the two
//! wraps (RFC 5649, deterministic) are compared in constant time, so neither seed is
//! ever in host memory for the comparison. Counter and drift are not compared: a
//! credential imported by an interrupted run may have been used since.
//!
//! Atomicity: the batch. A batch whose transport material does not work (the MAC key
//! does not decrypt, an unknown transport key) fails before anything is decrypted or
//! written. Entries refused inside a batch (bad MAC, bad length, unknown method) are
//! reported and the batch's other entries still import; a storage failure rolls the
//! whole batch back. Whole-file checks (well-formed XML, limits, duplicate ids) are the
//! client's, before it sends the first batch.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::{
    binding, check_id, check_subject, invalid, master_key_version_in, store_error, Credentials,
    SEED_LEN,
};
use crate::audit::log::append_in;
use crate::audit::{Actor, Details};
use crate::common::EventKind;
use crate::error::{Error, Result};
use crate::hsm::import::{self as hsm_import, BatchRefused, Encryption, MacKey, Transport};
use crate::otp::{Digits, HashAlgorithm, OtpKind};
use crate::store::{events, ops, CredentialRecord, Rollback, Store, StoreError};

/// Most entries in one batch.
pub const MAX_BATCH: usize = 10_000;

/// The transport material and options of one import (the stream's header).
pub struct ImportHeader {
    /// The transport key.
    pub transport: Arc<Transport>,
    /// The file's MAC key.
    pub mac_key: Option<MacKey>,
    /// SHA-256 of the file.
    pub file_sha256: [u8; 32],
    /// Accept entries without a ValueMAC (and PlainValue secrets).
    pub allow_unmaced: bool,
    /// Decide everything, store nothing.
    pub dry_run: bool,
    /// Accept `rsa-1_5`.
    pub allow_rsa_1_5: bool,
}

/// One entry's secret as the file holds it.
pub enum EntrySecret {
    /// An EncryptedValue.
    Encrypted {
        /// How (parsed from its URI).
        method: Encryption,
        /// CipherValue.
        cipher_value: Vec<u8>,
        /// ValueMAC.
        value_mac: Option<Vec<u8>>,
    },
    /// A PlainValue.
    Plain(Zeroizing<Vec<u8>>),
    /// Unusable as sent (unknown method URI, nothing at all): why.
    Invalid(String),
}

/// One decoded entry.
pub struct ImportEntry {
    /// Key/@Id.
    pub id: String,
    /// The citizen's subject, if the file or a mapping gives one.
    pub subject: Option<String>,
    /// HOTP or TOTP.
    pub kind: OtpKind,
    /// HMAC hash.
    pub algorithm: HashAlgorithm,
    /// Code length.
    pub digits: u32,
    /// HOTP counter.
    pub counter: u64,
    /// TOTP step (0 = 30).
    pub period_seconds: u32,
    /// TOTP drift in steps.
    pub drift_steps: i64,
    /// The secret.
    pub secret: EntrySecret,
}

/// What happened to one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    /// Stored (dry run: would be).
    Imported,
    /// The same credential exists.
    Skipped(String),
    /// Another credential with this id exists; untouched.
    Conflict(String),
    /// Not imported.
    Refused(String),
}

/// One batch's results, in entry order, and how the secrets were decrypted.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// Per entry.
    pub results: Vec<EntryResult>,
    /// Entries accepted without a MAC.
    pub unmaced: u64,
    /// Secrets decrypted inside the HSM.
    pub in_hsm: u64,
    /// Secrets decrypted in a zeroized host buffer.
    pub in_host: u64,
}

impl BatchReport {
    fn count(&self, f: impl Fn(&EntryResult) -> bool) -> u64 {
        self.results.iter().filter(|r| f(r)).count() as u64
    }
}

/// A checked entry on its way into the HSM.
struct Pending {
    index: usize,
    record: CredentialRecord,
    secret: hsm_import::Secret,
    existing: Option<CredentialRecord>,
}

impl Credentials<Store> {
    /// Make sure `header`'s transport material works (the MAC key decrypts, the RSA key
    /// exists) before any entry is sent: `InvalidArgument` / `NotFound` otherwise, with
    /// nothing decrypted or written.
    pub async fn check_import_header(&self, header: &ImportHeader) -> Result<()> {
        let version = self.master_key_version.load(Ordering::SeqCst);
        self.hsm
            .import_batch(hsm_import::Batch {
                transport: header.transport.clone(),
                mac_key: header.mac_key.clone(),
                master_version: version,
                items: Vec::new(),
                allow_rsa_1_5: header.allow_rsa_1_5,
            })
            .await
            .map(drop)
            .map_err(batch_refused)
    }

    /// Import one batch of `tenant`'s entries for `actor` (see the module doc); batch
    /// `number` counts from 1 in the audit record.
    pub async fn import_batch(
        &self,
        actor: Option<&Actor>,
        tenant: &str,
        header: &ImportHeader,
        number: u64,
        entries: Vec<ImportEntry>,
    ) -> Result<BatchReport> {
        super::check_tenant(tenant)?;
        if entries.len() > MAX_BATCH {
            return Err(invalid(format!(
                "a batch holds at most {MAX_BATCH} entries, got {}",
                entries.len()
            )));
        }
        let mut report = BatchReport {
            results: vec![EntryResult::Imported; entries.len()],
            ..BatchReport::default()
        };
        let now = self.clock.now();
        let version = self.master_key_version.load(Ordering::SeqCst);
        let mut seen = HashSet::with_capacity(entries.len());
        let mut pending = Vec::with_capacity(entries.len());
        for (index, e) in entries.into_iter().enumerate() {
            match self.check_entry(tenant, header, e, now, version, &mut seen) {
                Ok((record, secret, unmaced)) => {
                    report.unmaced += u64::from(unmaced);
                    pending.push(Pending {
                        index,
                        record,
                        secret,
                        existing: None,
                    });
                }
                Err(reason) => report.results[index] = EntryResult::Refused(reason),
            }
        }
        // The tenant's existing records under these ids, in one snapshot.
        let keys: Vec<String> = pending.iter().map(|p| p.record.id.clone()).collect();
        let owned_tenant = tenant.to_owned();
        let existing = self
            .store
            .read(move |txn| {
                keys.iter()
                    .map(|id| {
                        ops::get(txn, &owned_tenant, id)
                            .map_err(|r| r.0)
                            .and_then(|r| r)
                    })
                    .collect::<std::result::Result<Vec<_>, StoreError>>()
            })
            .await
            .map_err(store_error)?;
        let mut to_hsm = Vec::with_capacity(pending.len());
        for (mut p, old) in pending.into_iter().zip(existing) {
            if let Some(old) = old {
                if let Some(what) = differs(&old, &p.record) {
                    report.results[p.index] = EntryResult::Conflict(format!(
                        "a credential with this id exists with another {what}"
                    ));
                    continue;
                }
                p.existing = Some(old);
            }
            to_hsm.push(p);
        }
        let mut moves = 0;
        let mut version = version;
        loop {
            let (records, indexes) = self
                .decrypt_and_wrap(header, version, &to_hsm, &mut report)
                .await?;
            if header.dry_run {
                break;
            }
            let audit = self.import_audit(actor, tenant, header, number, &report, &records);
            let time_ms = self.clock.now_ms();
            let expected = version;
            let written = self
                .store
                .write(move |txn| {
                    let current = master_key_version_in(txn)?.map_err(Rollback)?;
                    if current != expected {
                        return Ok(Err(current));
                    }
                    let mut taken = Vec::new();
                    for (i, rec) in records.iter().enumerate() {
                        match ops::insert(txn, rec)? {
                            Ok(()) => {}
                            Err(StoreError::AlreadyExists) => taken.push(i),
                            Err(e) => return Err(Rollback(e)),
                        }
                    }
                    for (i, rec) in records.iter().enumerate() {
                        if taken.contains(&i) {
                            continue;
                        }
                        events::emit_in(
                            txn,
                            time_ms,
                            EventKind::CredentialCreated,
                            &rec.tenant,
                            rec.subject.as_deref().unwrap_or_default(),
                            &rec.id,
                            format!(r#"{{"kind":"{}","imported":true}}"#, rec.kind.uri_name()),
                        )?;
                    }
                    if let Some((event, chain, taken_fix)) = audit {
                        append_in(txn, &chain, taken_fix(event, taken.len() as u64))?;
                    }
                    Ok(Ok(taken))
                })
                .await
                .map_err(store_error)?;
            match written {
                Ok(taken) => {
                    for i in taken {
                        report.results[indexes[i]] = EntryResult::Conflict(
                            "a credential with this id was created during the import; re-run to compare".into(),
                        );
                    }
                    if self.audit.is_some() {
                        self.audited();
                    }
                    break;
                }
                Err(current) => {
                    moves += 1;
                    if moves > 3 {
                        return Err(Error::Unavailable(
                            "the seed master key version kept moving during the import; retry"
                                .into(),
                        ));
                    }
                    self.master_key_version.fetch_max(current, Ordering::SeqCst);
                    version = current;
                    // Decrypt again under the new key (the transport material is still here).
                    for p in &to_hsm {
                        report.results[p.index] = EntryResult::Imported;
                    }
                    report.in_hsm = 0;
                    report.in_host = 0;
                }
            }
        }
        let imported = report.count(|r| matches!(r, EntryResult::Imported));
        tracing::info!(
            tenant,
            batch = number,
            imported,
            dry_run = header.dry_run,
            "import batch done"
        );
        Ok(report)
    }

    /// The HSM step of a batch: the new records (wrapped and bound under `version`) and
    /// their entries' indexes; fills in the other entries' results.
    async fn decrypt_and_wrap(
        &self,
        header: &ImportHeader,
        version: u32,
        pending: &[Pending],
        report: &mut BatchReport,
    ) -> Result<(Vec<CredentialRecord>, Vec<usize>)> {
        let items = pending
            .iter()
            .map(|p| hsm_import::Item {
                secret: p.secret.clone(),
                pad_to: p.record.algorithm.digest_len(),
                lengths: SEED_LEN,
                context: binding::context(&p.record.tenant, &p.record),
                existing: p
                    .existing
                    .as_ref()
                    .map(|e| (e.master_key_version, e.wrapped_seed.clone())),
            })
            .collect();
        let outcomes = self
            .hsm
            .import_batch(hsm_import::Batch {
                transport: header.transport.clone(),
                mac_key: header.mac_key.clone(),
                master_version: version,
                items,
                allow_rsa_1_5: header.allow_rsa_1_5,
            })
            .await
            .map_err(batch_refused)?;
        let mut records = Vec::new();
        let mut indexes = Vec::new();
        for (p, outcome) in pending.iter().zip(outcomes) {
            let mut hsm_used = |in_hsm: bool| {
                if in_hsm {
                    report.in_hsm += 1;
                } else {
                    report.in_host += 1;
                }
            };
            report.results[p.index] = match outcome {
                hsm_import::Outcome::Wrapped {
                    wrapped,
                    binding,
                    in_hsm,
                } => {
                    hsm_used(in_hsm);
                    let mut rec = p.record.clone();
                    rec.wrapped_seed = wrapped;
                    rec.master_key_version = version;
                    rec.seed_binding = Some(binding);
                    records.push(rec);
                    indexes.push(p.index);
                    EntryResult::Imported
                }
                hsm_import::Outcome::Same { in_hsm } => {
                    hsm_used(in_hsm);
                    EntryResult::Skipped("the same credential exists".into())
                }
                hsm_import::Outcome::Different { in_hsm } => {
                    hsm_used(in_hsm);
                    EntryResult::Conflict(
                        "a credential with this id exists with another seed".into(),
                    )
                }
                hsm_import::Outcome::Refused(reason) => EntryResult::Refused(reason),
            };
        }
        Ok((records, indexes))
    }

    /// Checks of one entry that need no HSM: its record (seed still to come), its secret
    /// for the HSM, and whether it is unmaced.
    fn check_entry(
        &self,
        tenant: &str,
        header: &ImportHeader,
        e: ImportEntry,
        now: u64,
        version: u32,
        seen: &mut HashSet<String>,
    ) -> std::result::Result<(CredentialRecord, hsm_import::Secret, bool), String> {
        let msg = |e: Error| match e {
            Error::InvalidArgument(m) => m,
            other => other.to_string(),
        };
        check_id(&e.id).map_err(msg)?;
        if !seen.insert(e.id.clone()) {
            return Err("the id occurs twice in this import".into());
        }
        if let Some(s) = &e.subject {
            check_subject(s).map_err(msg)?;
        }
        let digits = Digits::new(e.digits).map_err(|_| "digits must be 6, 7 or 8".to_string())?;
        let period_seconds = match (e.kind, e.period_seconds) {
            (OtpKind::Totp, 0) => 30,
            (OtpKind::Totp, p @ 1..=300) => p,
            (OtpKind::Totp, _) => return Err("the time step must be 1..300 seconds".into()),
            (OtpKind::Hotp, 0) => 0,
            (OtpKind::Hotp, _) => return Err("a time step is for TOTP only".into()),
        };
        if e.kind == OtpKind::Totp && e.counter != 0 {
            return Err("a counter is for HOTP only".into());
        }
        if e.kind == OtpKind::Hotp && e.drift_steps != 0 {
            return Err("a time drift is for TOTP only".into());
        }
        if e.counter == u64::MAX {
            return Err("the counter is out of range".into());
        }
        if e.drift_steps.unsigned_abs() > 1_000_000 {
            return Err("the time drift is out of range".into());
        }
        let symmetric = matches!(*header.transport, Transport::Aes(_));
        let (secret, unmaced) = match e.secret {
            EntrySecret::Invalid(reason) => return Err(reason),
            EntrySecret::Plain(seed) => {
                if !header.allow_unmaced {
                    return Err(
                        "a PlainValue secret is unprotected: refused without --allow-unmaced"
                            .into(),
                    );
                }
                (hsm_import::Secret::Plain(seed), true)
            }
            EntrySecret::Encrypted {
                method,
                cipher_value,
                value_mac,
            } => {
                // RFC 6030 section 6.3 defines no MAC for secrets encrypted to an RSA
                // key (the OAEP decryption checks itself); section 6.1.1 requires one
                // for the CBC methods, which have no integrity of their own.
                let needs_mac = symmetric || header.mac_key.is_some();
                let missing = value_mac.is_none() && needs_mac;
                if missing && !header.allow_unmaced {
                    return Err("the entry has no ValueMAC: refused without --allow-unmaced".into());
                }
                if value_mac.is_some() && header.mac_key.is_none() {
                    return Err("the entry has a ValueMAC but the file no MAC key".into());
                }
                (
                    hsm_import::Secret::Encrypted {
                        method,
                        cipher_value,
                        value_mac,
                    },
                    missing,
                )
            }
        };
        let record = CredentialRecord {
            tenant: tenant.to_owned(),
            id: e.id,
            subject: e.subject,
            kind: e.kind,
            algorithm: e.algorithm,
            digits: digits.get(),
            period_seconds,
            t0: self.policy.totp_t0,
            wrapped_seed: Vec::new(),
            master_key_version: version,
            seed_binding: None,
            issuer: self.policy.default_issuer.clone(),
            account_name: String::new(),
            last_accepted: None,
            next_counter: e.counter,
            drift_steps: e.drift_steps,
            failures: 0,
            failure_times: Vec::new(),
            locked_until: 0,
            hard_locked: false,
            disabled: false,
            created_at: now,
            updated_at: now,
        };
        Ok((record, secret, unmaced))
    }

    /// The batch's audit record (when there is a log), to be completed in the commit
    /// with the number of ids taken meanwhile.
    #[allow(clippy::type_complexity)]
    fn import_audit(
        &self,
        actor: Option<&Actor>,
        tenant: &str,
        header: &ImportHeader,
        number: u64,
        report: &BatchReport,
        records: &[CredentialRecord],
    ) -> Option<(
        crate::audit::Event,
        Arc<str>,
        Box<dyn FnOnce(crate::audit::Event, u64) -> crate::audit::Event + Send>,
    )> {
        let file = crate::common::hex(&header.file_sha256);
        let (event, chain) = self.audit_event(actor, "credential.import", &file)?;
        let imported = records.len() as u64;
        let skipped = report.count(|r| matches!(r, EntryResult::Skipped(_)));
        let conflicts = report.count(|r| matches!(r, EntryResult::Conflict(_)));
        let refused = report.count(|r| matches!(r, EntryResult::Refused(_)));
        let details = Details::new()
            .str("tenant", tenant)
            .str("file_sha256", &file)
            .u64("batch", number)
            .u64("entries", report.results.len() as u64)
            .u64("skipped", skipped)
            .u64("refused", refused)
            .u64("unmaced", report.unmaced)
            .u64("decrypted_in_hsm", report.in_hsm)
            .u64("decrypted_in_host", report.in_host)
            .str(
                "transport",
                match *header.transport {
                    Transport::Aes(_) => "aes",
                    Transport::Rsa(_) => "rsa",
                },
            );
        Some((
            event,
            chain,
            Box::new(move |event: crate::audit::Event, taken: u64| {
                event.with_details(
                    details
                        .u64("imported", imported - taken)
                        .u64("conflicts", conflicts + taken),
                )
            }),
        ))
    }
}

/// What differs between a stored credential and an entry with its id (besides the
/// seed, which the HSM compares): `None` when nothing does.
fn differs(old: &CredentialRecord, new: &CredentialRecord) -> Option<&'static str> {
    if old.kind != new.kind {
        Some("kind")
    } else if old.algorithm != new.algorithm {
        Some("algorithm")
    } else if old.digits != new.digits {
        Some("digits")
    } else if old.period_seconds != new.period_seconds {
        Some("time step")
    } else if old.subject != new.subject {
        Some("subject")
    } else {
        None
    }
}

fn batch_refused(e: BatchRefused) -> Error {
    match e {
        BatchRefused::Transport(m) => Error::InvalidArgument(m),
        BatchRefused::NoTransportKey(m) => Error::NotFound(m),
        BatchRefused::Hsm(e) => Error::Hsm(e),
    }
}
