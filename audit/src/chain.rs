//! The writing side: events, the in-memory chain head, and signed checkpoints.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::error::AuditError;
use super::record::{is_hash_hex, Actor, AuditRecord, DetailValue, Details, Head, GENESIS_PREV};
use super::text::{bounded, MAX_OBJECT_LEN, MAX_REASON_LEN};
use super::{CHECKPOINT_ACTION, CHECKPOINT_OBJECT, MAX_CHECKPOINT_LAG};

/// Default number of ordinary records between two periodic checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 1000;

/// Domain-separation prefix of every checkpoint statement.
pub const CHECKPOINT_STATEMENT_PREFIX: &str = "eid-hsm-audit-checkpoint-v1\n";

/// The HSM-held audit key that signs checkpoints.
///
/// `sign` returns the raw 64-byte `r||s` ECDSA P-256 signature over SHA-256 of
/// `statement` — what PKCS#11 `CKM_ECDSA` gives when fed the SHA-256 digest of the
/// statement (or `CKM_ECDSA_SHA256` fed the statement itself). It verifies with ring's
/// `ECDSA_P256_SHA256_FIXED`.
pub trait CheckpointSigner {
    /// The id under which verifiers know the public key (e.g. the HSM key label).
    fn key_id(&self) -> String;
    /// Signs `statement` (see [`checkpoint_statement`]).
    fn sign(&self, statement: &[u8]) -> Result<Vec<u8>, String>;
}

/// The exact bytes the audit key signs for a checkpoint of `head`:
///
/// ```text
/// eid-hsm-audit-checkpoint-v1\nhead_seq=<decimal seq>\nhead_hash=<64 lowercase hex>\n
/// ```
///
/// Since `head.hash` commits to every record up to `head.seq` through the `prev` links,
/// a valid signature over this statement vouches for the whole chain up to the head.
pub fn checkpoint_statement(head: &Head) -> Vec<u8> {
    format!(
        "{CHECKPOINT_STATEMENT_PREFIX}head_seq={}\nhead_hash={}\n",
        head.seq, head.hash
    )
    .into_bytes()
}

/// Verifies a checkpoint signature offline: `public_key` is the uncompressed P-256 point
/// (`0x04||x||y`, 65 bytes), `signature` the raw 64-byte `r||s`.
///
/// Useful at service start to check that the HSM audit key matches the key the
/// verifiers trust, and to check an HSM signature before appending it.
pub fn verify_checkpoint_signature(public_key: &[u8], head: &Head, signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public_key)
        .verify(&checkpoint_statement(head), signature)
        .is_ok()
}

/// What a checkpoint record claims, parsed from its `details`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointClaim {
    /// The head the signature is over.
    pub head: Head,
    /// The id of the signing key.
    pub key_id: String,
    /// The raw `r||s` signature.
    pub signature: Vec<u8>,
}

impl CheckpointClaim {
    /// Parses the `details` of a checkpoint record: exactly the keys `head_seq` (u64),
    /// `head_hash` (64 lowercase hex), `key_id` (non-empty string) and `signature`
    /// (unpadded base64url). Returns a human-readable reason on failure.
    pub fn parse(record: &AuditRecord) -> Result<Self, String> {
        let details = record.details.as_ref().ok_or("no details")?;
        for (k, _) in details.iter() {
            if !matches!(k, "head_seq" | "head_hash" | "key_id" | "signature") {
                return Err(format!("unexpected detail \"{k}\""));
            }
        }
        let head_seq = details
            .get("head_seq")
            .and_then(DetailValue::as_u64)
            .ok_or("missing or non-integer head_seq")?;
        let head_hash = details
            .get("head_hash")
            .and_then(DetailValue::as_str)
            .ok_or("missing or non-string head_hash")?;
        if !is_hash_hex(head_hash) {
            return Err("head_hash is not 64 lowercase hex digits".into());
        }
        let key_id = details
            .get("key_id")
            .and_then(DetailValue::as_str)
            .filter(|k| !k.is_empty())
            .ok_or("missing or empty key_id")?;
        let sig_b64 = details
            .get("signature")
            .and_then(DetailValue::as_str)
            .ok_or("missing or non-string signature")?;
        let signature = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| "signature is not unpadded base64url".to_string())?;
        Ok(CheckpointClaim {
            head: Head {
                seq: head_seq,
                hash: head_hash.to_owned(),
            },
            key_id: key_id.to_owned(),
            signature,
        })
    }
}

/// An event to append: everything of a record except `seq`, `prev` and `hash`.
///
/// See [`Details`] for the rule that no secret may ever be recorded. The `object` and a
/// failure reason are free text too: pass ids and error *kinds*, never request payloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    time_ms: u64,
    actor: Actor,
    action: &'static str,
    object: String,
    outcome: String,
    details: Option<Details>,
}

impl Event {
    /// A successful (`"ok"`) event at `time_ms` (unix milliseconds; recorded as given,
    /// not checked for monotonicity). `action` is a code constant such as
    /// `"credential.verify"`; [`CHECKPOINT_ACTION`] is reserved for
    /// [`Chain::checkpoint_record`] (debug builds assert this; in release such an event
    /// would be reported by the verifier as a malformed checkpoint). `object` is bounded
    /// (see [`crate::text`]).
    pub fn new(time_ms: u64, actor: Actor, action: &'static str, object: &str) -> Self {
        debug_assert!(
            action != CHECKPOINT_ACTION,
            "the checkpoint action is reserved for Chain::checkpoint_record"
        );
        Event {
            time_ms,
            actor,
            action,
            object: bounded(object, MAX_OBJECT_LEN),
            outcome: "ok".to_owned(),
            details: None,
        }
    }

    /// Marks the event as refused by policy: outcome `"denied"`.
    #[must_use]
    pub fn denied(mut self) -> Self {
        self.outcome = "denied".to_owned();
        self
    }

    /// Marks the event as failed: outcome `"failed: <reason>"`. The reason is a short,
    /// non-secret description (an error kind, not a payload).
    #[must_use]
    pub fn failed(mut self, reason: &str) -> Self {
        self.outcome = format!("failed: {}", bounded(reason, MAX_REASON_LEN));
        self
    }

    /// Attaches non-secret details (an empty set is recorded as no details).
    #[must_use]
    pub fn with_details(mut self, details: Details) -> Self {
        self.details = (!details.is_empty()).then_some(details);
        self
    }
}

/// The in-memory head of the audit chain: the next seq, the last hash and the
/// checkpoint schedule.
///
/// It holds no records; the caller persists each record [`Chain::append`] returns, in
/// order, before using the chain again (hold one lock over append + persist). If
/// persisting fails (a rolled-back transaction), the chain must be rolled back too:
/// restore a clone taken before the append, or [`Chain::resume`] from storage —
/// otherwise the next record links to a record that was never stored and the log shows
/// a removal. After a restart, [`Chain::resume`] from the last stored record continues
/// the same chain.
#[derive(Clone, Debug)]
pub struct Chain {
    next_seq: u64,
    last_hash: String,
    interval: u64,
    since_checkpoint: u64,
    last_checkpoint_head: u64,
}

impl Default for Chain {
    fn default() -> Self {
        Chain::new()
    }
}

impl Chain {
    /// A new, empty chain (the next record is seq 1) with the default checkpoint interval.
    pub fn new() -> Self {
        Chain {
            next_seq: 1,
            last_hash: GENESIS_PREV.to_owned(),
            interval: DEFAULT_CHECKPOINT_INTERVAL,
            since_checkpoint: 0,
            last_checkpoint_head: 0,
        }
    }

    /// Continues the chain after `last`, the last stored record (`None`: nothing stored,
    /// start at seq 1).
    ///
    /// `last` must match its own hash, otherwise storage was damaged or tampered with and
    /// the error says so (verify the stored log before deciding what to do). If `last` is
    /// a checkpoint the schedule restarts from it; otherwise the records since the last
    /// checkpoint are unknown here and a checkpoint is due at once.
    pub fn resume(last: Option<&AuditRecord>) -> Result<Self, AuditError> {
        let mut chain = Chain::new();
        let Some(last) = last else {
            return Ok(chain);
        };
        let bad = |reason: &str| AuditError::BadResumePoint {
            seq: last.seq,
            reason: reason.to_owned(),
        };
        if last.seq == 0 || last.seq == u64::MAX {
            return Err(bad("seq out of range"));
        }
        if !last.hash_matches() {
            return Err(bad("stored hash does not match the record's content"));
        }
        chain.next_seq = last.seq + 1;
        chain.last_hash = last.hash.clone();
        if last.is_checkpoint() {
            let claim = CheckpointClaim::parse(last).map_err(|r| bad(&r))?;
            chain.last_checkpoint_head = claim.head.seq;
            chain.since_checkpoint = last.seq - 1 - claim.head.seq.min(last.seq - 1);
        } else {
            chain.since_checkpoint = u64::MAX;
        }
        Ok(chain)
    }

    /// Sets how many ordinary records trigger a periodic checkpoint (0: only on demand).
    #[must_use]
    pub fn with_checkpoint_interval(mut self, records: u64) -> Self {
        self.interval = records;
        self
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The hash of the last record ([`GENESIS_PREV`] when empty).
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// The current head (seq and hash of the last record), `None` when empty.
    pub fn head(&self) -> Option<Head> {
        (self.next_seq > 1).then(|| Head {
            seq: self.next_seq - 1,
            hash: self.last_hash.clone(),
        })
    }

    /// True when the periodic interval has elapsed and a checkpoint should be signed.
    ///
    /// It stays true until a checkpoint record is appended: while an HSM signature is in
    /// flight the caller must not start a second one.
    pub fn checkpoint_due(&self) -> bool {
        self.interval > 0 && self.since_checkpoint >= self.interval
    }

    /// Appends an event: assigns the next seq, links it to the last hash and computes its
    /// hash. The caller must persist the returned record before the next append.
    pub fn append(&mut self, event: Event) -> AuditRecord {
        self.append_with_line(event).0
    }

    /// [`Chain::append`], also returning the record's storage line
    /// ([`AuditRecord::to_json_line`]), built from the same canonical encoding the hash
    /// was computed over instead of encoding the record a second time.
    pub fn append_with_line(&mut self, event: Event) -> (AuditRecord, String) {
        let sealed = self.seal(
            event.time_ms,
            event.actor,
            event.action.to_owned(),
            event.object,
            event.outcome,
            event.details,
        );
        self.since_checkpoint = self.since_checkpoint.saturating_add(1);
        sealed
    }

    /// Second phase of a checkpoint: appends the checkpoint record for `head` (obtained
    /// from [`Chain::head`] when the statement was made) with the HSM's `signature` over
    /// [`checkpoint_statement`]`(head)`.
    ///
    /// Records appended while the signature was in flight are fine: `head` may be up to
    /// [`MAX_CHECKPOINT_LAG`] records behind the current head, and those later records
    /// are covered by the next checkpoint. Rejected: an empty chain, a head ahead of the
    /// chain, a head not newer than the previous checkpoint's, a head whose hash differs
    /// from the current head's when it *is* the current head, a signature that is not 64
    /// bytes, an empty key id. The signature itself is not checked here (the chain holds
    /// no public key); see [`verify_checkpoint_signature`].
    pub fn checkpoint_record(
        &mut self,
        head: &Head,
        key_id: &str,
        signature: &[u8],
        time_ms: u64,
    ) -> Result<AuditRecord, AuditError> {
        let current = self.head().ok_or(AuditError::EmptyChain)?;
        let reject = |reason: String| AuditError::BadCheckpointHead {
            head_seq: head.seq,
            reason,
        };
        if head.seq == 0 || head.seq > current.seq {
            return Err(reject(format!("the chain's head is seq {}", current.seq)));
        }
        if head.seq <= self.last_checkpoint_head {
            return Err(reject(format!(
                "not newer than the previous checkpoint head seq {}",
                self.last_checkpoint_head
            )));
        }
        if current.seq - head.seq > MAX_CHECKPOINT_LAG {
            return Err(reject(format!(
                "more than {MAX_CHECKPOINT_LAG} records behind the chain's head seq {}",
                current.seq
            )));
        }
        if head.seq == current.seq && head.hash != current.hash {
            return Err(reject("hash differs from the chain's head".to_owned()));
        }
        if !is_hash_hex(&head.hash) {
            return Err(reject("hash is not 64 lowercase hex digits".to_owned()));
        }
        if signature.len() != 64 {
            return Err(AuditError::BadSignatureLength(signature.len()));
        }
        if key_id.is_empty() {
            return Err(AuditError::EmptyKeyId);
        }
        let details = Details::new()
            .u64("head_seq", head.seq)
            .str("head_hash", &head.hash)
            .str("key_id", key_id)
            .str("signature", &URL_SAFE_NO_PAD.encode(signature));
        let (record, _) = self.seal(
            time_ms,
            Actor::service(),
            CHECKPOINT_ACTION.to_owned(),
            CHECKPOINT_OBJECT.to_owned(),
            "ok".to_owned(),
            Some(details),
        );
        self.last_checkpoint_head = head.seq;
        // Records appended after `head` (while signing) count toward the next checkpoint.
        self.since_checkpoint = current.seq - head.seq;
        Ok(record)
    }

    /// One-phase checkpoint for synchronous signers (shutdown, tests): takes the current
    /// head, has `signer` sign its statement and appends the checkpoint record.
    pub fn checkpoint<S: CheckpointSigner + ?Sized>(
        &mut self,
        signer: &S,
        time_ms: u64,
    ) -> Result<AuditRecord, AuditError> {
        let head = self.head().ok_or(AuditError::EmptyChain)?;
        let signature = signer
            .sign(&checkpoint_statement(&head))
            .map_err(AuditError::Signer)?;
        self.checkpoint_record(&head, &signer.key_id(), &signature, time_ms)
    }

    fn seal(
        &mut self,
        time: u64,
        actor: Actor,
        action: String,
        object: String,
        outcome: String,
        details: Option<Details>,
    ) -> (AuditRecord, String) {
        let mut record = AuditRecord {
            seq: self.next_seq,
            time,
            actor,
            action,
            object,
            outcome,
            details,
            prev: self.last_hash.clone(),
            hash: String::new(),
        };
        let line = record.seal_hash();
        self.next_seq += 1;
        self.last_hash.clone_from(&record.hash);
        (record, line)
    }
}
