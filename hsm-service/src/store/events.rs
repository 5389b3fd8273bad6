//! The event outbox: typed append and reads of [`Table::Events`], the sequencing of the
//! stream, and the notification preferences ([`Table::NotificationPrefs`]) the
//! append consults.
//!
//! # Sequencing (why a reader never sees a hole)
//!
//! The head of the stream (the last allocated seq) is one value, the meta key
//! [`HEAD_KEY`]. [`append_in`] reads it with the unit of work's *locking* read, writes
//! `head + 1` back and stores the event under that seq, all in the transaction of the
//! change the event reports. So:
//!
//! * the transaction that allocated seq `n` holds the head's lock until it commits or
//!   rolls back (redb: the single writer; PostgreSQL: `SELECT ... FOR UPDATE` on the
//!   meta row, which every instance shares); no other transaction, of this instance or
//!   another, can allocate `n + 1` before `n` is committed, so seqs increase in commit
//!   order;
//! * a rolled-back transaction frees its seq again (the head is rolled back with it),
//!   so committed seqs are contiguous: `oldest ..= head` are all present until
//!   compaction removes a prefix;
//! * a reader that has seen seq `n` committed can never later see a committed seq
//!   `< n` appear: resuming from `last + 1` misses nothing.
//!
//! Within one group-commit batch the jobs share the transaction, so a later job sees
//! the head the earlier one wrote without another round trip.
//!
//! The cost: event-carrying transactions of all instances serialize on one row. Group
//! commit makes that one lock per batch, not per request.
//!
//! Keys are the seq in 20 decimal digits, so key order is seq order. Values are
//! [`encode`]d: a version byte, then JSON.

use serde::{Deserialize, Serialize};

use super::uow::{KeyRange, ReadTxn, Table, Txn};
use super::{Rollback, StoreError};
use crate::common::EventKind;

/// Meta key of the stream's head (the last allocated seq, u64 little endian; missing = 0).
/// Not under `store.`: `migrate-store` copies it with the events, so a copied store
/// continues the same sequence.
pub const HEAD_KEY: &str = "events.head";

/// Format version of a stored event.
const EVENT_VERSION: u8 = 1;
/// Format version of a stored preference.
const PREF_VERSION: u8 = 1;

/// An event to append (its seq is allocated by [`append_in`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Unix milliseconds of the change.
    pub time_ms: u64,
    /// The kind's wire name.
    pub kind: String,
    /// The tenant the object belongs to.
    pub tenant: String,
    /// The subject's pseudonym (may be empty).
    pub subject: String,
    /// Credential id, key name ...
    pub object_id: String,
    /// Always told to the citizen.
    pub critical: bool,
    /// Tell the citizen.
    pub notify: bool,
    /// A JSON object, per kind.
    pub details_json: String,
}

/// A committed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the stream.
    pub seq: u64,
    /// The event.
    pub event: NewEvent,
}

/// A subject's notification preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationPref {
    /// Notify at every use.
    pub every_use: bool,
    /// When it was set (Unix seconds).
    pub updated_at: u64,
}

/// The key of seq `seq`.
pub fn seq_key(seq: u64) -> String {
    format!("{seq:020}")
}

fn parse_seq(key: &str) -> Result<u64, Rollback> {
    key.parse().map_err(|_| {
        Rollback(StoreError::Corrupt(format!(
            "event key {key:?} is not a seq"
        )))
    })
}

fn pref_key(tenant: &str, subject: &str) -> String {
    format!("{tenant}\0{subject}")
}

/// The stored bytes of an event.
pub fn encode(e: &NewEvent) -> Vec<u8> {
    let mut out = vec![EVENT_VERSION];
    out.extend(serde_json::to_vec(e).expect("an event serializes"));
    out
}

/// The event stored under `seq`.
pub fn decode(seq: u64, bytes: &[u8]) -> Result<NewEvent, StoreError> {
    match bytes.split_first() {
        Some((&EVENT_VERSION, rest)) => serde_json::from_slice(rest)
            .map_err(|e| StoreError::Corrupt(format!("event {seq}: {e}"))),
        _ => Err(StoreError::Corrupt(format!(
            "event {seq}: unknown format version"
        ))),
    }
}

/// The head: the last allocated (in a write transaction: locked; in a snapshot: the
/// newest committed) seq, 0 before the first event.
pub fn head<T: ReadTxn + ?Sized>(txn: &mut T) -> Result<u64, Rollback> {
    match txn.get(Table::Meta, HEAD_KEY)? {
        None => Ok(0),
        Some(b) => {
            let b: [u8; 8] = b.as_slice().try_into().map_err(|_| {
                Rollback(StoreError::Corrupt(format!(
                    "meta {HEAD_KEY:?}: expected 8 bytes"
                )))
            })?;
            Ok(u64::from_le_bytes(b))
        }
    }
}

/// The oldest retained seq; `head + 1` when nothing is retained.
pub fn oldest<T: ReadTxn + ?Sized>(txn: &mut T) -> Result<u64, Rollback> {
    match txn.scan(Table::Events, &KeyRange::all(), 1)?.first() {
        Some((k, _)) => parse_seq(k),
        None => Ok(head(txn)? + 1),
    }
}

/// Appends `event` in the transaction of the change it reports: allocates `head + 1`
/// under the head's lock (see the module doc) and returns it.
pub fn append_in(txn: &mut dyn Txn, event: &NewEvent) -> Result<u64, Rollback> {
    let seq = head(txn)? + 1;
    txn.put(Table::Meta, HEAD_KEY, &seq.to_le_bytes())?;
    txn.put(Table::Events, &seq_key(seq), &encode(event))?;
    Ok(seq)
}

/// Appends an event of `kind` with its flags: `critical` from the kind, `notify` from
/// the kind and, for a use, the subject's preference read in this same transaction.
pub fn emit_in(
    txn: &mut dyn Txn,
    time_ms: u64,
    kind: EventKind,
    tenant: &str,
    subject: &str,
    object_id: &str,
    details_json: String,
) -> Result<u64, Rollback> {
    let every_use = if kind.is_use() && !subject.is_empty() {
        get_pref(txn, tenant, subject)?.is_some_and(|p| p.every_use)
    } else {
        false
    };
    append_in(
        txn,
        &NewEvent {
            time_ms,
            kind: kind.as_str().to_owned(),
            tenant: tenant.to_owned(),
            subject: subject.to_owned(),
            object_id: object_id.to_owned(),
            critical: kind.critical(),
            notify: kind.notify(every_use),
            details_json,
        },
    )
}

/// Up to `limit` committed events with seq `>= from`, ascending.
pub fn range<T: ReadTxn + ?Sized>(
    txn: &mut T,
    from: u64,
    limit: usize,
) -> Result<Vec<StoredEvent>, Rollback> {
    let range = KeyRange {
        start: seq_key(from),
        after: false,
        end: None,
    };
    txn.scan(Table::Events, &range, limit)?
        .into_iter()
        .map(|(k, v)| {
            let seq = parse_seq(&k)?;
            Ok(StoredEvent {
                seq,
                event: decode(seq, &v)?,
            })
        })
        .collect()
}

/// Deletes up to `max` of the oldest events that are older than `before_seq` or
/// (when given) have `time_ms < before_ms`; how many were deleted. The head is never
/// touched, so seqs are never reused.
pub fn compact_in(
    txn: &mut dyn Txn,
    before_seq: u64,
    before_ms: Option<u64>,
    max: usize,
) -> Result<usize, Rollback> {
    let mut deleted = 0;
    for e in range(txn, 0, max)? {
        let old = e.seq < before_seq || before_ms.is_some_and(|ms| e.event.time_ms < ms);
        if !old {
            break;
        }
        txn.delete(Table::Events, &seq_key(e.seq))?;
        deleted += 1;
    }
    Ok(deleted)
}

/// `tenant`'s `subject`'s preference, if ever set.
pub fn get_pref<T: ReadTxn + ?Sized>(
    txn: &mut T,
    tenant: &str,
    subject: &str,
) -> Result<Option<NotificationPref>, Rollback> {
    let Some(b) = txn.get(Table::NotificationPrefs, &pref_key(tenant, subject))? else {
        return Ok(None);
    };
    match b.split_first() {
        Some((&PREF_VERSION, rest)) => serde_json::from_slice(rest)
            .map(Some)
            .map_err(|e| Rollback(StoreError::Corrupt(format!("notification preference: {e}")))),
        _ => Err(Rollback(StoreError::Corrupt(
            "notification preference: unknown format version".into(),
        ))),
    }
}

/// Sets `tenant`'s `subject`'s preference.
pub fn set_pref_in(
    txn: &mut dyn Txn,
    tenant: &str,
    subject: &str,
    pref: NotificationPref,
) -> Result<(), Rollback> {
    let mut out = vec![PREF_VERSION];
    out.extend(serde_json::to_vec(&pref).expect("a preference serializes"));
    txn.put(Table::NotificationPrefs, &pref_key(tenant, subject), &out)
}
