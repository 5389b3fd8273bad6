//! Evidence records: what an accepted code leaves for an assertion to cite.
//!
//! An evidence record is written in the same transaction as the accepted step that
//! created it ([`insert_in`], called by the credential update job) and spent in one
//! conditional write decided on the committer ([`spend_in`]), so two assertions can
//! never cite one evidence. Records are kept until `expires_at +` [`PURGE_GRACE_SECONDS`]
//! (so a late reuse is still answered "spent" or "expired", not "unknown"), then purged:
//! every insert also deletes up to [`PURGE_PER_INSERT`] records past that point, oldest
//! first (through the expiry index), so the table holds about one TTL plus the grace of
//! accepted codes and never grows with time.
//!
//! Encoding: one format byte, then postcard of a private struct; the id is the key
//! (format 1; format 2 adds the SHA-256 of an approved transaction text, and is written
//! only for evidence that has one). The
//! expiry index ([`Table::EvidenceExpiry`]) is keyed by [`expiry_key`], so that key
//! order is expiry order.

use serde::{Deserialize, Serialize};

use super::uow::{KeyRange, ReadTxn, Table, Txn};
use super::{Rollback, StoreError, TxnResult};
use crate::common::AuthMethod;

/// How long a spent or expired record stays after its expiry, in seconds.
pub const PURGE_GRACE_SECONDS: u64 = 600;

/// Most stale records one insert purges (more than one, so a backlog drains).
pub const PURGE_PER_INSERT: usize = 4;

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;

/// One successful authentication, as an assertion may cite it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceRecord {
    /// Opaque, unguessable id (32 lower-case hex digits, 128 random bits).
    pub id: String,
    /// The tenant whose credential authenticated.
    pub tenant: String,
    /// The credential that authenticated.
    pub credential_id: String,
    /// The credential's subject (the citizen's pseudonym at the login service).
    pub subject: String,
    /// How.
    pub method: AuthMethod,
    /// When (Unix seconds): the assertion's `auth_time`.
    pub auth_time: u64,
    /// Unusable from this Unix second on.
    pub expires_at: u64,
    /// When an assertion cited it (Unix seconds); `None` while unspent.
    pub spent_at: Option<u64>,
    /// App evidence of a TRANSACTION challenge: SHA-256 of the approved text (UTF-8), for
    /// the assertion's `txn_text_sha256` claim.
    pub txn_text_sha256: Option<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
struct EvidenceV1<'a> {
    #[serde(borrow)]
    tenant: &'a str,
    #[serde(borrow)]
    credential_id: &'a str,
    #[serde(borrow)]
    subject: &'a str,
    method: u8,
    auth_time: u64,
    expires_at: u64,
    spent_at: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct EvidenceV2<'a> {
    #[serde(borrow)]
    v1: EvidenceV1<'a>,
    txn_text_sha256: [u8; 32],
}

pub(super) fn encode(e: &EvidenceRecord) -> Vec<u8> {
    let v = EvidenceV1 {
        tenant: &e.tenant,
        credential_id: &e.credential_id,
        subject: &e.subject,
        method: e.method.code(),
        auth_time: e.auth_time,
        expires_at: e.expires_at,
        spent_at: e.spent_at,
    };
    match e.txn_text_sha256 {
        None => postcard::to_extend(&v, vec![FORMAT_V1]),
        Some(h) => postcard::to_extend(
            &EvidenceV2 {
                v1: v,
                txn_text_sha256: h,
            },
            vec![FORMAT_V2],
        ),
    }
    .expect("postcard encoding into a Vec is infallible")
}

/// Decodes the value stored under `id`; errors name the id and the defect.
pub(super) fn decode(id: &str, bytes: &[u8]) -> Result<EvidenceRecord, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("evidence {id:?}: {what}"));
    let (&version, body) = bytes.split_first().ok_or_else(|| corrupt("empty value"))?;
    let undecodable = |e: postcard::Error| corrupt(&format!("undecodable: {e}"));
    let (v, txn_text_sha256, rest) = match version {
        FORMAT_V1 => {
            let (v, rest): (EvidenceV1<'_>, _) =
                postcard::take_from_bytes(body).map_err(undecodable)?;
            (v, None, rest)
        }
        FORMAT_V2 => {
            let (v, rest): (EvidenceV2<'_>, _) =
                postcard::take_from_bytes(body).map_err(undecodable)?;
            (v.v1, Some(v.txn_text_sha256), rest)
        }
        _ => return Err(corrupt(&format!("unknown format version {version}"))),
    };
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(EvidenceRecord {
        id: id.to_owned(),
        tenant: v.tenant.to_owned(),
        credential_id: v.credential_id.to_owned(),
        subject: v.subject.to_owned(),
        method: AuthMethod::from_code(v.method)
            .ok_or_else(|| corrupt(&format!("unknown method code {}", v.method)))?,
        auth_time: v.auth_time,
        expires_at: v.expires_at,
        spent_at: v.spent_at,
        txn_text_sha256,
    })
}

/// The expiry index key of evidence `id` expiring at `expires_at`: the time in 20
/// digits (so that text order is time order), NUL, the id.
pub fn expiry_key(expires_at: u64, id: &str) -> String {
    format!("{expires_at:020}\0{id}")
}

/// Inserts `e` (a fresh random id: an existing id is a broken RNG, and rolls the batch
/// back) and purges up to [`PURGE_PER_INSERT`] records stale at `now`. The id is
/// inserted with [`Txn::insert_new`]: 128 random bits do not repeat, so no locking read
/// checks it first (on PostgreSQL one round trip less per accepted code); a repeat
/// still fails the batch.
pub fn insert_in(txn: &mut dyn Txn, e: &EvidenceRecord, now: u64) -> Result<(), Rollback> {
    purge_in(txn, now, PURGE_PER_INSERT)?;
    txn.insert_new(Table::Evidence, &e.id, &encode(e))?;
    txn.put(Table::EvidenceExpiry, &expiry_key(e.expires_at, &e.id), &[])?;
    Ok(())
}

/// Deletes up to `limit` records whose `expires_at + PURGE_GRACE_SECONDS < now`,
/// oldest first; returns how many.
pub fn purge_in(txn: &mut dyn Txn, now: u64, limit: usize) -> Result<usize, Rollback> {
    let cutoff = now.saturating_sub(PURGE_GRACE_SECONDS);
    let range = KeyRange {
        end: Some(format!("{cutoff:020}")),
        ..KeyRange::all()
    };
    let stale = txn.scan(Table::EvidenceExpiry, &range, limit)?;
    for (k, _) in &stale {
        let (_, id) = k.split_once('\0').ok_or_else(|| {
            Rollback(StoreError::Corrupt(format!(
                "evidence expiry key {k:?} has no id"
            )))
        })?;
        txn.delete(Table::EvidenceExpiry, k)?;
        txn.delete(Table::Evidence, id)?;
    }
    Ok(stale.len())
}

/// Reads a record as this transaction sees it.
pub fn get_in<T: ReadTxn + ?Sized>(txn: &mut T, id: &str) -> TxnResult<Option<EvidenceRecord>> {
    let bytes = txn.get(Table::Evidence, id)?;
    Ok(bytes.map(|b| decode(id, &b)).transpose())
}

/// What a spend decision returns: whether to mark the evidence spent, and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spend<R> {
    /// Mark it spent at the given Unix second, and answer `R`.
    Spend(u64, R),
    /// Leave it as it is, and answer `R`.
    Refuse(R),
}

/// The exactly-once step: `decide` sees the record as this transaction sees it (`None`:
/// no such id; read with a locking read) and says whether to spend it. Concurrent spends
/// of one id are decided one after the other and at most one sees it unspent.
pub fn spend_in<R>(
    txn: &mut dyn Txn,
    id: &str,
    decide: impl FnOnce(Option<&EvidenceRecord>) -> Spend<R>,
) -> TxnResult<R> {
    let current = match get_in(txn, id)? {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    match decide(current.as_ref()) {
        Spend::Refuse(r) => Ok(Ok(r)),
        Spend::Spend(at, r) => {
            let Some(mut e) = current else {
                return Ok(Err(StoreError::NotFound));
            };
            e.spent_at = Some(at);
            txn.put(Table::Evidence, id, &encode(&e))?;
            Ok(Ok(r))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_evidence_round_trips_and_otp_evidence_keeps_format_1() {
        let otp = EvidenceRecord {
            id: "0123456789abcdef0123456789abcdef".into(),
            tenant: "t".into(),
            credential_id: "c".into(),
            subject: "s".into(),
            method: AuthMethod::Otp,
            auth_time: 1,
            expires_at: 2,
            spent_at: None,
            txn_text_sha256: None,
        };
        let b = encode(&otp);
        assert_eq!(b[0], FORMAT_V1);
        assert_eq!(decode(&otp.id, &b).unwrap(), otp);
        let app = EvidenceRecord {
            method: AuthMethod::App,
            txn_text_sha256: Some([7; 32]),
            spent_at: Some(3),
            ..otp.clone()
        };
        let b = encode(&app);
        assert_eq!(b[0], FORMAT_V2);
        assert_eq!(decode(&app.id, &b).unwrap(), app);
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(decode(&app.id, &trailing).is_err());
        assert!(decode(&app.id, &[3, 0]).is_err());
    }
}
