//! The audit trail in the service: records appended to an audit chain of the store
//! inside the same write transaction as the change they record, and checkpoints signed
//! by an audit key in the HSM.
//!
//! The chain's head is read from the store inside each write transaction rather than
//! kept in memory, so a batch that fails to commit cannot leave the chain pointing at
//! records that were never stored, and seq order is commit order (a chain has one
//! writer: the group committer of its instance; the backend refuses a seq taken twice).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::denied::{DeniedCalls, DENIED_WINDOW};
use super::{checkpoint_statement, AuditRecord, Chain, CheckpointClaim, Event, Head};
use crate::common::Clock;
use crate::error::{Error, Result};
use crate::hsm::sign::{KeyPairKind, PublicKeyAttributes, SignMechanism};
use crate::hsm::Hsm;
use crate::store::{ops, ChainName, ReadTxn, Rollback, Store, StoreError, Txn, DEFAULT_CHAIN};

/// Store meta key: the audit key's CKA_ID (hex).
const KEY_ID_META: &str = "audit.key_id";
/// Store meta key: the audit key's public key (uncompressed P-256 point).
const PUBLIC_KEY_META: &str = "audit.public_key";

/// Append `event` to `chain` inside `txn`.
pub fn append_in(
    txn: &mut dyn Txn,
    chain: &ChainName,
    event: Event,
) -> std::result::Result<AuditRecord, Rollback> {
    let (mut state, name) = resume_for_append(txn, chain)?;
    let (record, line) = state.append_with_line(event);
    txn.audit_put(chain, record.seq, line.as_bytes())?;
    let name = name.unwrap_or_else(|| chain.to_owned());
    LAST_APPENDED.with_borrow_mut(|last| *last = Some((name, line.into_bytes(), state)));
    Ok(record)
}

thread_local! {
    /// The chain name, the stored bytes of the last record this thread appended to it,
    /// and the chain right after appending it. Every verification appends a record, so
    /// without this each append would parse the previous record's JSON and recompute
    /// its hash (canonical form + SHA-256) only to learn what this thread computed one
    /// job earlier.
    ///
    /// It is only a shortcut for [`resume`], used when the stored head of the same chain
    /// is byte for byte the record remembered here: the head is still read from the
    /// store inside the transaction, so a rolled-back batch (whose records are gone) or a
    /// head written by anything else falls back to parsing and checking the stored
    /// record. For [`Chain::append`] the two chains are the same: it reads only the next
    /// seq and the last hash, which are the remembered record's seq + 1 and its hash
    /// (computed by this thread when it sealed it), exactly what `resume` would find.
    static LAST_APPENDED: std::cell::RefCell<Option<(String, Vec<u8>, Chain)>> =
        const { std::cell::RefCell::new(None) };
}

/// The chain to append to: the remembered one when the store's last record of `chain`
/// is the one this thread appended last, otherwise [`resume`] from the stored record.
/// Also hands back the remembered name when it is `chain`'s, to be remembered again
/// without a new allocation.
fn resume_for_append(
    txn: &mut dyn Txn,
    chain: &ChainName,
) -> std::result::Result<(Chain, Option<String>), Rollback> {
    let last = txn.audit_last(chain)?;
    let stored = last.as_ref().map(|(_, v)| v.as_slice());
    let Some((name, bytes, state)) = LAST_APPENDED.with_borrow_mut(Option::take) else {
        return Ok((resume_from(stored)?, None));
    };
    if name != chain {
        return Ok((resume_from(stored)?, None));
    }
    if stored == Some(bytes.as_slice()) {
        return Ok((state, Some(name)));
    }
    Ok((resume_from(stored)?, Some(name)))
}

fn resume<T: ReadTxn + ?Sized>(
    txn: &mut T,
    chain: &ChainName,
) -> std::result::Result<Chain, Rollback> {
    let last = txn.audit_last(chain)?;
    resume_from(last.as_ref().map(|(_, v)| v.as_slice()))
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
    store: Arc<Store>,
    /// The chain this instance appends to and reads.
    chain: Arc<str>,
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
    ///
    /// It appends to and reads the chain [`DEFAULT_CHAIN`] (see [`AuditLog::open_chain`]).
    pub async fn open(
        store: Arc<Store>,
        hsm: Hsm,
        interval: u64,
        clock: Clock,
    ) -> Result<Arc<AuditLog>> {
        AuditLog::open_chain(store, DEFAULT_CHAIN, hsm, interval, clock).await
    }

    /// [`AuditLog::open`] on the audit chain `chain` of the store.
    pub async fn open_chain(
        store: Arc<Store>,
        chain: &ChainName,
        hsm: Hsm,
        interval: u64,
        clock: Clock,
    ) -> Result<Arc<AuditLog>> {
        let internal = |e: StoreError| crate::error::store_failure("audit", e);
        let chain: Arc<str> = Arc::from(chain);
        let (cka_id, public_key) = match (
            store.get_meta(KEY_ID_META).await.map_err(internal)?,
            store.get_meta(PUBLIC_KEY_META).await.map_err(internal)?,
        ) {
            (Some(id), Some(pk)) => {
                check_token_key(&hsm, &id, &pk).await?;
                (id, pk)
            }
            (None, None) => {
                let c = chain.clone();
                let signed = store
                    .read(move |txn| last_checkpoint_seq(txn, &c))
                    .await
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
            chain,
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

    /// The chain this log appends to: what write jobs pass to [`append_in`].
    pub fn chain(&self) -> Arc<str> {
        self.chain.clone()
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
        let chain = self.chain.clone();
        let record = self
            .store
            .write(move |txn| append_in(txn, &chain, event))
            .await
            .map_err(|e| crate::error::store_failure("audit", e))?;
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
        let chain = self.chain.clone();
        self.store
            .write(move |txn| {
                for event in events {
                    append_in(txn, &chain, event)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| crate::error::store_failure("audit: refused calls", e))?;
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
        let internal = |e: StoreError| crate::error::store_failure("audit", e);
        let chain = self.chain.clone();
        let last = self
            .store
            .read(move |txn| Ok(last_record(txn, &chain)?))
            .await
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
        let chain = self.chain.clone();
        let record = self
            .store
            .write(move |txn| {
                let mut state = resume(txn, &chain)?;
                // Refused here: nothing written, the batch goes on (Ok(Err(..))).
                let record = match state.checkpoint_record(&head, &key_id, &signature, now_ms) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(e)),
                };
                txn.audit_put(&chain, record.seq, record.to_json_line().as_bytes())?;
                Ok(Ok(record))
            })
            .await
            .map_err(internal)?
            .map_err(|e| Error::Internal(format!("audit checkpoint: {e}")))?;
        self.since_checkpoint.store(0, Ordering::Relaxed);
        crate::metrics::audit_checkpoint();
        tracing::debug!(head = appended, "audit checkpoint signed");
        Ok(Some(record))
    }

    /// Up to `limit` records of this log's chain with `seq >= from`, as JSON lines; and
    /// how many.
    pub async fn export_range(&self, from: u64, limit: usize) -> Result<(Vec<u8>, u32)> {
        let chain = self.chain.clone();
        self.export_chain_range(&chain, from, limit).await
    }

    /// Up to `limit` records of `chain` (any chain of the store) with `seq >= from`, as
    /// JSON lines; and how many.
    pub async fn export_chain_range(
        &self,
        chain: &ChainName,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<u8>, u32)> {
        let (store, chain) = (self.store.clone(), chain.to_owned());
        // A chunk can be large: on tokio's blocking pool, whatever the engine.
        tokio::task::spawn_blocking(move || {
            store.read_blocking(move |txn| {
                let mut out = Vec::new();
                let mut n = 0u32;
                for (_, line) in txn.audit_range(&chain, from, limit)? {
                    out.extend_from_slice(&line);
                    out.push(b'\n');
                    n += 1;
                }
                Ok((out, n))
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("audit export task: {e}")))?
        .map_err(|e| Error::Internal(format!("audit export: {e}")))
    }

    /// Every chain of the store (one per instance that ever wrote), ascending by name.
    pub async fn chain_names(&self) -> Result<Vec<String>> {
        self.store
            .read(|txn| Ok(txn.audit_chains()?))
            .await
            .map_err(|e| Error::Internal(format!("audit: {e}")))
    }

    /// Every chain of the store with its head and last checkpoint.
    pub async fn chains(&self) -> Result<Vec<ChainSummary>> {
        self.store
            .read(chain_summaries)
            .await
            .map_err(|e| Error::Internal(format!("audit: {e}")))
    }

    /// Number of records of this log's chain.
    pub async fn len(&self) -> Result<u64> {
        let chain = self.chain.clone();
        self.store
            .read(move |txn| Ok(txn.audit_count(&chain)?))
            .await
            .map_err(|e| crate::error::store_failure("audit", e))
    }

    /// True when nothing has been recorded on this log's chain.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }
}

/// One audit chain as `ListAuditChains` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// The chain's name (its instance's).
    pub chain: String,
    /// How many records it holds.
    pub records: u64,
    /// Its last record (`None`: empty).
    pub head: Option<Head>,
    /// Its last checkpoint record's seq and the head seq that checkpoint covers.
    pub last_checkpoint: Option<(u64, u64)>,
}

/// [`ChainSummary`] of every chain in `txn`, ascending by name.
pub fn chain_summaries(
    txn: &mut dyn ReadTxn,
) -> std::result::Result<Vec<ChainSummary>, StoreError> {
    let mut out = Vec::new();
    for chain in txn.audit_chains()? {
        let records = txn.audit_count(&chain)?;
        let head = txn.audit_last(&chain)?.map(|(seq, line)| Head {
            seq,
            hash: parse_line(&line).map(|r| r.hash).unwrap_or_default(),
        });
        let last_checkpoint = last_checkpoint_of(txn, &chain, head.as_ref().map(|h| h.seq))?;
        out.push(ChainSummary {
            chain,
            records,
            head,
            last_checkpoint,
        });
    }
    Ok(out)
}

fn parse_line(line: &[u8]) -> Option<AuditRecord> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|l| AuditRecord::from_json_line(l).ok())
}

/// The last checkpoint record of `chain` (its seq and the head seq it covers), searched
/// backwards from `head` a page at a time: checkpoints come every interval records, so
/// this reads about one page.
fn last_checkpoint_of(
    txn: &mut dyn ReadTxn,
    chain: &ChainName,
    head: Option<u64>,
) -> std::result::Result<Option<(u64, u64)>, StoreError> {
    const PAGE: u64 = 1024;
    let Some(mut end) = head.map(|h| h.saturating_add(1)) else {
        return Ok(None);
    };
    while end > 0 {
        let start = end.saturating_sub(PAGE);
        let page = txn.audit_range(chain, start, PAGE as usize)?;
        for (seq, line) in page.iter().rev().filter(|(seq, _)| *seq < end) {
            if let Some(r) = parse_line(line).filter(AuditRecord::is_checkpoint) {
                let covers = CheckpointClaim::parse(&r).map_or(0, |c| c.head.seq);
                return Ok(Some((*seq, covers)));
            }
        }
        end = start;
    }
    Ok(None)
}

/// The trusted checkpoint key the store records (key id -> public key): empty when no
/// audit key was created yet.
pub fn stored_keys(
    txn: &mut dyn ReadTxn,
) -> std::result::Result<std::collections::HashMap<String, Vec<u8>>, StoreError> {
    let id = ops::get_meta(txn, KEY_ID_META)?;
    let pk = ops::get_meta(txn, PUBLIC_KEY_META)?;
    Ok(match (id, pk) {
        (Some(id), Some(pk)) => [(key_name(&id), pk)].into_iter().collect(),
        _ => Default::default(),
    })
}

/// Verifies every audit chain held in `txn` with the offline verifier (the one
/// `hsmctl audit verify` runs on an export), against `keys`, reading a page at a time.
/// Problems name a record by its position in its chain ("line N" is the N-th record).
pub fn verify_stored_chains(
    txn: &mut dyn ReadTxn,
    keys: &std::collections::HashMap<String, Vec<u8>>,
) -> std::result::Result<super::ChainsReport, StoreError> {
    const PAGE: usize = 4096;
    let mut verifier = super::ChainsVerifier::new(keys, super::ChainsOptions::default());
    for chain in txn.audit_chains()? {
        let (mut from, mut position) = (0u64, 0u64);
        loop {
            let page = txn.audit_range(&chain, from, PAGE)?;
            for (_, line) in &page {
                position += 1;
                verifier.record(&chain, position, line, true);
            }
            match page.last() {
                Some((seq, _)) if page.len() == PAGE => from = seq + 1,
                _ => break,
            }
        }
    }
    Ok(verifier.finish())
}

/// The name verifiers know the audit key by: `audit-` and the first 8 bytes of its
/// CKA_ID in hex.
fn key_name(cka_id: &[u8]) -> String {
    let hex = crate::common::hex(cka_id);
    format!("audit-{}", &hex[..hex.len().min(16)])
}

/// Create the audit key on the token and record its id and public key, together.
async fn create_key(store: &Store, hsm: &Hsm) -> Result<(Vec<u8>, Vec<u8>)> {
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
        .map_err(|e| crate::error::store_failure("audit", e))?;
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

/// The seq of the last checkpoint record of `chain`, searching from the end (`None`: no
/// key has signed this chain).
fn last_checkpoint_seq<T: ReadTxn + ?Sized>(
    txn: &mut T,
    chain: &ChainName,
) -> std::result::Result<Option<u64>, StoreError> {
    const PAGE: usize = 4096;
    let mut found = None;
    let mut from = 0u64;
    loop {
        let page = txn.audit_range(chain, from, PAGE)?;
        for (seq, line) in &page {
            let record = std::str::from_utf8(line)
                .ok()
                .and_then(|l| AuditRecord::from_json_line(l).ok());
            // An unreadable record may have been a checkpoint: treat it as one.
            if record.is_none_or(|r| r.is_checkpoint()) {
                found = Some(*seq);
            }
        }
        match page.last() {
            Some((seq, _)) if page.len() == PAGE => from = seq + 1,
            _ => return Ok(found),
        }
    }
}

/// The last stored record of `chain`, checked against its own hash (`None`: empty).
fn last_record<T: ReadTxn + ?Sized>(
    txn: &mut T,
    chain: &ChainName,
) -> std::result::Result<Option<AuditRecord>, Rollback> {
    let Some((_, v)) = txn.audit_last(chain)? else {
        return Ok(None);
    };
    let corrupt = |e: String| Rollback(StoreError::Corrupt(format!("audit log head: {e}")));
    let record = AuditRecord::from_json_line(std::str::from_utf8(&v).unwrap_or(""))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{gate, wait_queued};

    /// Appends one audit record through the store (its own job, so its own place in a batch).
    fn spawn_audit(
        store: &Arc<Store>,
        n: u64,
    ) -> tokio::task::JoinHandle<std::result::Result<AuditRecord, StoreError>> {
        let s = store.clone();
        tokio::spawn(async move {
            s.write(move |txn| {
                let event = Event::new(
                    1_700_000_000_000 + n,
                    crate::audit::Actor::service(),
                    "test.event",
                    &format!("object-{n}"),
                );
                append_in(txn, DEFAULT_CHAIN, event)
            })
            .await
        })
    }

    /// The committer remembers the record it appended last, to skip re-reading it for the
    /// next append; after a rolled-back batch or a failed commit that record is not stored,
    /// and the chain must continue from the stored head instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn audit_chain_continues_from_the_stored_head_after_rollbacks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Store::open_redb(
                &dir.path().join(crate::store::EMBEDDED_FILE),
                crate::store::StoreOptions::default(),
            )
            .unwrap(),
        );
        assert_eq!(spawn_audit(&store, 1).await.unwrap().unwrap().seq, 1);

        // Batch: an append, then a job that rolls the batch back.
        let g = gate(&store).await;
        let rolled_back = spawn_audit(&store, 2);
        wait_queued(&store, 1).await;
        let s = store.clone();
        let bad = tokio::spawn(async move {
            s.write(|_txn| Err::<(), _>(Rollback(StoreError::Invalid("no".into()))))
                .await
        });
        wait_queued(&store, 2).await;
        g.open().await;
        assert!(matches!(
            rolled_back.await.unwrap(),
            Err(StoreError::Aborted(_))
        ));
        assert!(bad.await.unwrap().is_err());
        let second = spawn_audit(&store, 3).await.unwrap().unwrap();
        assert_eq!(second.seq, 2);

        // An append whose commit fails.
        let g = gate(&store).await;
        let failed = spawn_audit(&store, 4);
        wait_queued(&store, 1).await;
        store.fail_next_commits(2);
        let g_task = g.task;
        g.release.send(()).unwrap();
        assert!(g_task.await.unwrap().is_err());
        assert!(failed.await.unwrap().is_err());
        let third = spawn_audit(&store, 5).await.unwrap().unwrap();
        assert_eq!((third.seq, third.prev.as_str()), (3, second.hash.as_str()));

        // Many appends in shared batches, then the whole stored log verifies.
        let tasks: Vec<_> = (6..40).map(|n| spawn_audit(&store, n)).collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let lines = store
            .read(|txn| {
                let mut out = Vec::new();
                for (_, line) in txn.audit_range(DEFAULT_CHAIN, 0, usize::MAX)? {
                    out.extend_from_slice(&line);
                    out.push(b'\n');
                }
                Ok(out)
            })
            .await
            .unwrap();
        let report = hsm_audit::verify(lines.as_slice(), &std::collections::HashMap::new());
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.records, 3 + 34);
    }

    /// One chain per instance: two logs with their own chains over one store (here the
    /// in-memory test backend; redb holds only `default`) append and checkpoint
    /// independently; the store's verifier checks each chain and reports a removed
    /// record as a gap of the chain it was removed from.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_chains_in_one_store_verify_each_and_a_gap_names_its_chain() {
        use crate::store::test_support::MemoryBackend;
        let env = crate::testing::DevEnv::new();
        let settings = crate::hsm::HsmSettings {
            module: env.config.hsm.module.clone(),
            token: env.config.token(),
            sessions: 2,
            queue_capacity: 64,
            seed_cache_capacity: 8,
        };
        let hsm = Hsm::open(&settings, env.config.user_pin().expect("pin")).expect("open");
        let memory = Arc::new(MemoryBackend::default());
        let backend: Arc<dyn crate::store::Backend> = memory.clone();
        let store = Arc::new(
            Store::with_backend(backend, crate::store::StoreOptions::default()).expect("store"),
        );
        let clock = Clock::system();
        let one = AuditLog::open_chain(
            store.clone(),
            "node-1",
            hsm.clone(),
            u64::MAX,
            clock.clone(),
        )
        .await
        .expect("node-1");
        let two = AuditLog::open_chain(
            store.clone(),
            "node-2",
            hsm.clone(),
            u64::MAX,
            clock.clone(),
        )
        .await
        .expect("node-2");
        let event = |n: u64| {
            Event::new(
                1_700_000_000_000 + n,
                crate::audit::Actor::service(),
                "test.event",
                &format!("object-{n}"),
            )
        };
        for n in 0..6 {
            one.record(event(n)).await.expect("append");
            two.record(event(100 + n)).await.expect("append");
        }
        two.record(event(200)).await.expect("append");
        one.checkpoint().await.expect("checkpoint");
        two.checkpoint().await.expect("checkpoint");

        let trusted = one.trusted_keys();
        let report = store
            .read(move |txn| {
                let keys = stored_keys(txn)?;
                assert_eq!(keys, trusted);
                verify_stored_chains(txn, &keys)
            })
            .await
            .expect("verify");
        assert!(report.is_ok(), "{report}");
        let names: Vec<_> = report.chains.iter().map(|c| c.chain.as_str()).collect();
        assert_eq!(names, ["node-1", "node-2"]);
        let (a, b) = (
            report.chain("node-1").unwrap(),
            report.chain("node-2").unwrap(),
        );
        assert_eq!((a.records, b.records), (7, 8));
        assert_eq!((a.last_checkpoint, b.last_checkpoint), (Some(7), Some(8)));
        assert_eq!((a.uncovered_tail, b.uncovered_tail), (0, 0));
        assert_eq!(a.checkpoints, 1);

        let summaries = one.chains().await.expect("chains");
        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[1].chain, "node-2");
        assert_eq!(summaries[1].records, 8);
        assert_eq!(summaries[1].head.as_ref().map(|h| h.seq), Some(8));
        assert_eq!(summaries[1].last_checkpoint, Some((8, 7)));

        // A record removed from node-2 behind the store's back is a gap of node-2 only.
        assert!(memory.remove_audit_record("node-2", 3));
        let report = store
            .read(|txn| {
                let keys = stored_keys(txn)?;
                verify_stored_chains(txn, &keys)
            })
            .await
            .expect("verify");
        assert!(!report.is_ok());
        assert!(report.chain("node-1").unwrap().is_ok());
        let node2 = report.chains.iter().find(|c| c.chain == "node-2").unwrap();
        let gaps: Vec<_> = node2.gaps().map(|p| p.message.clone()).collect();
        assert_eq!(
            gaps,
            ["line 3: seq 4 follows seq 2: record 3 removed"],
            "{report}"
        );
        assert!(report
            .to_string()
            .contains("1 gap(s) in the sequence of chain node-2"));
    }
}
