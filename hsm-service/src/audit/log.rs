//! The audit trail in the service: records in the store's `audit_log` table, appended
//! inside the same write transaction as the change they record, and checkpoints signed
//! by an audit key in the HSM.
//!
//! The chain's head is read from the table inside each write transaction rather than kept
//! in memory, so a batch that fails to commit cannot leave the chain pointing at records
//! that were never stored, and seq order is commit order (the group commit has one
//! writer).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use redb::{ReadableTable, ReadableTableMetadata};

use super::denied::{DeniedCalls, DENIED_WINDOW};
use super::{checkpoint_statement, AuditRecord, Chain, CheckpointClaim, Event, Head};
use crate::common::Clock;
use crate::error::{Error, Result};
use crate::hsm::sign::{KeyPairKind, PublicKeyAttributes, SignMechanism};
use crate::hsm::Hsm;
use crate::store::tables::AUDIT_LOG;
use crate::store::{ops, EmbeddedStore, Rollback, StoreError};

/// Store meta key: the audit key's CKA_ID (hex).
const KEY_ID_META: &str = "audit.key_id";
/// Store meta key: the audit key's public key (uncompressed P-256 point).
const PUBLIC_KEY_META: &str = "audit.public_key";

/// Append `event` to the chain inside `txn`.
pub fn append_in(
    txn: &redb::WriteTransaction,
    event: Event,
) -> std::result::Result<AuditRecord, Rollback> {
    let mut table = txn.open_table(AUDIT_LOG)?;
    let mut chain = resume_for_append(&table)?;
    let (record, line) = chain.append_with_line(event);
    table.insert(record.seq, line.as_bytes())?;
    LAST_APPENDED.with_borrow_mut(|last| *last = Some((line.into_bytes(), chain)));
    Ok(record)
}

thread_local! {
    /// The stored bytes of the last record this thread appended, and the chain right
    /// after appending it. Every verification appends a record, so without this each
    /// append would parse the previous record's JSON and recompute its hash (canonical
    /// form + SHA-256) only to learn what this thread computed one job earlier.
    ///
    /// It is only a shortcut for [`resume`], used when the stored head is byte for byte
    /// the record remembered here: the head is still read from the table inside the
    /// transaction, so a rolled-back batch (whose records are gone from the table) or a
    /// head written by anything else falls back to parsing and checking the stored
    /// record. For [`Chain::append`] the two chains are the same: it reads only the next
    /// seq and the last hash, which are the remembered record's seq + 1 and its hash
    /// (computed by this thread when it sealed it), exactly what `resume` would find.
    static LAST_APPENDED: std::cell::RefCell<Option<(Vec<u8>, Chain)>> =
        const { std::cell::RefCell::new(None) };
}

/// The chain to append to: the remembered one when the table's last record is the one
/// this thread appended last, otherwise [`resume`] from the stored record.
fn resume_for_append<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
) -> std::result::Result<Chain, Rollback> {
    let last = table.last()?;
    let stored = last.as_ref().map(|(_, v)| v.value());
    let remembered = LAST_APPENDED.with_borrow_mut(Option::take);
    if let (Some(stored), Some((bytes, chain))) = (stored, remembered) {
        if stored == bytes.as_slice() {
            return Ok(chain);
        }
    }
    resume_from(stored)
}

fn resume<T: ReadableTable<u64, &'static [u8]>>(table: &T) -> std::result::Result<Chain, Rollback> {
    let last = table.last()?;
    resume_from(last.as_ref().map(|(_, v)| v.value()))
}

/// The chain after `last`, the stored bytes of the last record (`None`: empty log),
/// after checking that record against its own hash.
fn resume_from(last: Option<&[u8]>) -> std::result::Result<Chain, Rollback> {
    let last = match last {
        Some(v) => Some(
            AuditRecord::from_json_line(std::str::from_utf8(v).unwrap_or(""))
                .map_err(|e| Rollback(StoreError::Corrupt(format!("audit log head: {e}"))))?,
        ),
        None => None,
    };
    Chain::resume(last.as_ref())
        .map_err(|e| Rollback(StoreError::Corrupt(format!("audit log head: {e}"))))
}

/// The service's audit trail.
pub struct AuditLog {
    store: Arc<EmbeddedStore>,
    hsm: Hsm,
    key_cka_id: Vec<u8>,
    key_id: String,
    public_key: Vec<u8>,
    interval: u64,
    since_checkpoint: AtomicU64,
    checkpointing: AtomicBool,
    /// Held for a whole checkpoint (read head, sign, append): one at a time.
    checkpoint_lock: tokio::sync::Mutex<()>,
    /// Refused calls of the current window, written by [`AuditLog::flush_denied`].
    denied: DeniedCalls,
    clock: Clock,
}

impl AuditLog {
    /// Open the trail; on first start create the audit key (P-256, on the token,
    /// non-extractable, sign-only) and remember its id and public key in the store.
    ///
    /// The key is created only for a log that no key has signed yet (records written
    /// offline before the first start, e.g. by `ceremony backup-kek`, are fine): a new key
    /// would let whoever can start the service re-sign a rewritten log. On every later start the token's key must
    /// sign for the public key the store recorded (checked with a test signature), or the
    /// service refuses to start with one line saying which.
    pub async fn open(
        store: Arc<EmbeddedStore>,
        hsm: Hsm,
        interval: u64,
        clock: Clock,
    ) -> Result<Arc<AuditLog>> {
        let internal = |e: StoreError| Error::Internal(format!("audit: {e}"));
        let (cka_id, public_key) = match (
            store.get_meta(KEY_ID_META).map_err(internal)?,
            store.get_meta(PUBLIC_KEY_META).map_err(internal)?,
        ) {
            (Some(id), Some(pk)) => {
                check_token_key(&hsm, &id, &pk).await?;
                (id, pk)
            }
            (None, None) => {
                let signed = store
                    .read(|txn| last_checkpoint_seq(&txn.open_table(AUDIT_LOG)?))
                    .map_err(internal)?;
                if let Some(seq) = signed {
                    return Err(Error::FailedPrecondition(format!(
                        "the audit log holds checkpoints (the last at seq {seq}) but the store records no audit key: refusing to create a new one (it could re-sign a rewritten log); restore the store's audit key entries"
                    )));
                }
                create_key(&store, &hsm).await?
            }
            _ => {
                return Err(Error::FailedPrecondition(
                    "the store records only half of the audit key (its id or its public key is missing): refusing to start".into(),
                ))
            }
        };
        let key_id = key_name(&cka_id);
        let log = Arc::new(AuditLog {
            store,
            hsm,
            key_cka_id: cka_id,
            key_id,
            public_key,
            interval: interval.max(1),
            since_checkpoint: AtomicU64::new(0),
            checkpointing: AtomicBool::new(false),
            checkpoint_lock: tokio::sync::Mutex::new(()),
            denied: DeniedCalls::default(),
            clock,
        });
        spawn_denied_flusher(&log);
        Ok(log)
    }

    /// Key id -> uncompressed public key, for offline verification.
    pub fn trusted_keys(&self) -> std::collections::HashMap<String, Vec<u8>> {
        [(self.key_id.clone(), self.public_key.clone())]
            .into_iter()
            .collect()
    }

    /// Append one event in its own durable write (events whose change is not itself in
    /// the store: start, stop, refusals). Verifications go through the credential
    /// update's transaction instead (see `credentials`).
    pub async fn record(self: &Arc<Self>, event: Event) -> Result<AuditRecord> {
        let record = self
            .store
            .write(move |txn| append_in(txn, event))
            .await
            .map_err(|e| Error::Internal(format!("audit: {e}")))?;
        self.appended(1);
        Ok(record)
    }

    /// Count records appended elsewhere; start a checkpoint when one is due.
    pub fn appended(self: &Arc<Self>, n: u64) {
        if self.since_checkpoint.fetch_add(n, Ordering::Relaxed) + n >= self.interval
            && !self.checkpointing.swap(true, Ordering::AcqRel)
        {
            let log = self.clone();
            tokio::spawn(async move {
                if let Err(e) = log.checkpoint().await {
                    tracing::error!(error = %e, "audit checkpoint failed; retrying with the next records");
                }
                log.checkpointing.store(false, Ordering::Release);
            });
        }
    }

    /// Count a refused call; its record is written with the others of its window (see
    /// [`super::denied`]). Costs the refused caller no write of its own.
    pub fn denied(&self, subject: &str, fingerprint: &str, method: &str, reason: &str) {
        self.denied
            .note(self.clock.now_ms(), subject, fingerprint, method, reason);
    }

    /// Write the refused calls gathered so far: one record per caller and reason, all in
    /// one job. Returns how many records were written. Runs every
    /// [`super::denied::DENIED_WINDOW`], before each checkpoint and at shutdown.
    pub async fn flush_denied(self: &Arc<Self>) -> Result<u64> {
        let events = self.denied.take(self.clock.now_ms());
        if events.is_empty() {
            return Ok(0);
        }
        let n = events.len() as u64;
        self.store
            .write(move |txn| {
                for event in events {
                    append_in(txn, event)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| Error::Internal(format!("audit: refused calls: {e}")))?;
        self.appended(n);
        Ok(n)
    }

    /// Now, in Unix milliseconds, by the service's clock (for audit events' timestamps).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Sign the current head with the audit key and append the checkpoint record; `None`
    /// when the log is empty.
    ///
    /// Checkpoints are serialized (one at a time, whoever asks: the periodic task, an
    /// auditor's CheckpointAudit, shutdown), so each one's head is newer than the last
    /// one's. A log whose last record already is a checkpoint over everything before it
    /// has nothing new to vouch for: that checkpoint is returned and nothing is written.
    /// The write job itself never rolls back its batch for a refused checkpoint (it
    /// leaves the transaction clean), so a checkpoint cannot fail anyone else's write.
    pub async fn checkpoint(self: &Arc<Self>) -> Result<Option<AuditRecord>> {
        // The refusals counted so far belong before the head this checkpoint signs.
        self.flush_denied().await?;
        let _one_at_a_time = self.checkpoint_lock.lock().await;
        let internal = |e: StoreError| Error::Internal(format!("audit: {e}"));
        let last = self
            .store
            .read(|txn| last_record(&txn.open_table(AUDIT_LOG)?).map_err(|r| r.0))
            .map_err(internal)?;
        let Some(last) = last else { return Ok(None) };
        if covers_all_before_it(&last) {
            return Ok(Some(last));
        }
        let head = Head::of(&last);
        let digest = ring::digest::digest(&ring::digest::SHA256, &checkpoint_statement(&head));
        let signature = self
            .hsm
            .sign(
                &self.key_cka_id,
                SignMechanism::Ecdsa,
                digest.as_ref().to_vec(),
            )
            .await?;
        let key_id = self.key_id.clone();
        let now_ms = self.clock.now_ms();
        let appended = head.seq;
        let record = self
            .store
            .write(move |txn| {
                let mut table = txn.open_table(AUDIT_LOG)?;
                let mut chain = resume(&table)?;
                // Refused here: nothing written, the batch goes on (Ok(Err(..))).
                let record = match chain.checkpoint_record(&head, &key_id, &signature, now_ms) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(e)),
                };
                table.insert(record.seq, record.to_json_line().as_bytes())?;
                Ok(Ok(record))
            })
            .await
            .map_err(internal)?
            .map_err(|e| Error::Internal(format!("audit checkpoint: {e}")))?;
        self.since_checkpoint.store(0, Ordering::Relaxed);
        tracing::debug!(head = appended, "audit checkpoint signed");
        Ok(Some(record))
    }

    /// Up to `limit` records with `seq >= from`, as JSON lines; and how many.
    pub fn export_range(&self, from: u64, limit: usize) -> Result<(Vec<u8>, u32)> {
        self.store
            .read(|txn| {
                let table = txn.open_table(AUDIT_LOG)?;
                let mut out = Vec::new();
                let mut n = 0u32;
                for entry in table.range(from..)?.take(limit) {
                    let (_, v) = entry?;
                    out.extend_from_slice(v.value());
                    out.push(b'\n');
                    n += 1;
                }
                Ok((out, n))
            })
            .map_err(|e| Error::Internal(format!("audit export: {e}")))
    }

    /// Number of records.
    pub fn len(&self) -> Result<u64> {
        self.store
            .read(|txn| Ok(txn.open_table(AUDIT_LOG)?.len()?))
            .map_err(|e| Error::Internal(format!("audit: {e}")))
    }

    /// True when nothing has been recorded.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// The name verifiers know the audit key by: `audit-` and the first 8 bytes of its
/// CKA_ID in hex.
fn key_name(cka_id: &[u8]) -> String {
    let hex = crate::common::hex(cka_id);
    format!("audit-{}", &hex[..hex.len().min(16)])
}

/// Create the audit key on the token and record its id and public key, together.
async fn create_key(store: &EmbeddedStore, hsm: &Hsm) -> Result<(Vec<u8>, Vec<u8>)> {
    let pair = hsm
        .generate_signing_key_pair(KeyPairKind::EcP256, "audit-checkpoint")
        .await?;
    let point = match &pair.public {
        PublicKeyAttributes::Ec { ec_point } => uncompressed_point(ec_point)?,
        _ => return Err(Error::Internal("audit key is not an EC key".into())),
    };
    let (id, pk) = (pair.id.clone(), point.clone());
    store
        .write(move |txn| {
            if let Err(e) = ops::put_meta(txn, KEY_ID_META, &id)? {
                return Ok(Err(e));
            }
            ops::put_meta(txn, PUBLIC_KEY_META, &pk)
        })
        .await
        .and_then(|r| r)
        .map_err(|e| Error::Internal(format!("audit: {e}")))?;
    tracing::info!(key_id = %key_name(&pair.id), "created the audit checkpoint key");
    Ok((pair.id, point))
}

/// Domain-separated statement of the start-up check (never a checkpoint statement, and
/// the signature is not kept).
const KEY_CHECK_STATEMENT: &[u8] = b"eid-hsm-audit-key-check-v1\n";

/// The token's audit key must be there and sign for `public_key`, the key the store
/// recorded (and verifiers trust).
async fn check_token_key(hsm: &Hsm, cka_id: &[u8], public_key: &[u8]) -> Result<()> {
    let name = key_name(cka_id);
    let digest = ring::digest::digest(&ring::digest::SHA256, KEY_CHECK_STATEMENT);
    let signature = match hsm
        .sign(cka_id, SignMechanism::Ecdsa, digest.as_ref().to_vec())
        .await
    {
        Ok(s) => s,
        Err(e) if e.kind() == crate::hsm::ErrorKind::NotFound => {
            return Err(Error::FailedPrecondition(format!(
                "the token has no audit key {name}, which the store records: wrong token, or the key was removed; refusing to start (a new key could re-sign a rewritten log)"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let verifies = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        public_key,
    )
    .verify(KEY_CHECK_STATEMENT, &signature)
    .is_ok();
    if verifies {
        Ok(())
    } else {
        Err(Error::FailedPrecondition(format!(
            "the token's audit key {name} does not match the public key the store records: tampered store or a different key under that id; refusing to start"
        )))
    }
}

/// One task per log writes the refused calls of each window; it ends with the log.
fn spawn_denied_flusher(log: &Arc<AuditLog>) {
    let weak = Arc::downgrade(log);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DENIED_WINDOW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(log) = weak.upgrade() else { return };
            if let Err(e) = log.flush_denied().await {
                tracing::error!(error = %e, "audit: cannot record refused calls");
            }
        }
    });
}

/// The seq of the last checkpoint record, searching from the end (`None`: no key has
/// signed this log).
fn last_checkpoint_seq(
    table: &redb::ReadOnlyTable<u64, &[u8]>,
) -> std::result::Result<Option<u64>, StoreError> {
    for entry in table.iter()?.rev() {
        let (seq, line) = entry?;
        let record = std::str::from_utf8(line.value())
            .ok()
            .and_then(|l| AuditRecord::from_json_line(l).ok());
        // An unreadable record may have been a checkpoint: treat it as one.
        if record.is_none_or(|r| r.is_checkpoint()) {
            return Ok(Some(seq.value()));
        }
    }
    Ok(None)
}

/// The last stored record, checked against its own hash (`None`: empty log).
fn last_record<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
) -> std::result::Result<Option<AuditRecord>, Rollback> {
    let Some((_, v)) = table.last()? else {
        return Ok(None);
    };
    let corrupt = |e: String| Rollback(StoreError::Corrupt(format!("audit log head: {e}")));
    let record = AuditRecord::from_json_line(std::str::from_utf8(v.value()).unwrap_or(""))
        .map_err(|e| corrupt(e.to_string()))?;
    if !record.hash_matches() {
        return Err(corrupt(format!(
            "record {} does not match its hash",
            record.seq
        )));
    }
    Ok(Some(record))
}

/// True when `record` is a checkpoint over the record right before it: everything up to
/// and including it is vouched for, so another checkpoint would add nothing.
fn covers_all_before_it(record: &AuditRecord) -> bool {
    record.is_checkpoint()
        && CheckpointClaim::parse(record)
            .is_ok_and(|c| c.head.seq.checked_add(1) == Some(record.seq))
}

/// `CKA_EC_POINT` is a DER OCTET STRING around the uncompressed point; unwrap it.
fn uncompressed_point(ec_point: &[u8]) -> Result<Vec<u8>> {
    match ec_point {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 && rest[0] == 0x04 => Ok(rest.to_vec()),
        [0x04, rest @ ..] if rest.len() == 64 => Ok(ec_point.to_vec()),
        _ => Err(Error::Internal(
            "unexpected EC point encoding of the audit key".into(),
        )),
    }
}
