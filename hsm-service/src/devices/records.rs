//! Stored records of the app authenticator and their encodings (one format byte, then
//! postcard), read and written through the store's unit of work only.
//!
//! Keys are `tenant NUL id` ([`Table::Devices`], [`Table::Activations`],
//! [`Table::Challenges`]) and `tenant NUL subject` ([`Table::DeviceSubjects`]). The
//! subject row is the lock of a subject: every job that changes the subject's devices
//! or challenges reads it with the unit of work's locking read first, so those jobs of
//! one subject are serialized (on every instance) and the per-subject rules (at most one
//! pending challenge, the device limit, throttles, suspension) hold exactly.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::store::{KeyRange, ReadTxn, Rollback, StoreError, Table, Txn};

const FORMAT_V1: u8 = 1;

/// How long an activation or a challenge is kept after its expiry, in seconds: GetChallenge
/// and a late CompleteActivation answer "expired" (not "unknown") for a day; the audit
/// trail keeps what happened for good.
pub const PURGE_GRACE_SECONDS: u64 = 86_400;

/// Most stale activations and challenges one insert purges (more than one, so a backlog
/// drains), so the tables hold about a day of them and never grow with time.
pub const PURGE_PER_INSERT: usize = 4;

/// What a purge index entry points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiring {
    /// [`Table::Activations`].
    Activation,
    /// [`Table::Challenges`].
    Challenge,
}

impl Expiring {
    fn tag(self) -> &'static str {
        match self {
            Expiring::Activation => "a",
            Expiring::Challenge => "c",
        }
    }

    fn table(self) -> Table {
        match self {
            Expiring::Activation => Table::Activations,
            Expiring::Challenge => Table::Challenges,
        }
    }
}

/// Inserts `v` (a fresh random id) into `what`'s table with its purge index entry
/// (`expires_at + PURGE_GRACE_SECONDS`), after purging up to [`PURGE_PER_INSERT`]
/// records stale at `now`.
pub fn insert_expiring<T: Serialize>(
    txn: &mut dyn Txn,
    what: Expiring,
    tenant: &str,
    id: &str,
    expires_at: u64,
    now: u64,
    v: &T,
) -> Result<(), Rollback> {
    purge_in(txn, now, PURGE_PER_INSERT)?;
    insert(txn, what.table(), &key(tenant, id), v)?;
    let purge_at = expires_at.saturating_add(PURGE_GRACE_SECONDS);
    txn.put(
        Table::DeviceExpiry,
        &format!("{purge_at:020}\0{}\0{tenant}\0{id}", what.tag()),
        &[],
    )
}

/// Deletes up to `limit` activations and challenges whose purge time is before `now`,
/// oldest first; how many.
pub fn purge_in(txn: &mut dyn Txn, now: u64, limit: usize) -> Result<usize, Rollback> {
    let range = KeyRange {
        end: Some(format!("{now:020}")),
        ..KeyRange::all()
    };
    let stale = txn.scan(Table::DeviceExpiry, &range, limit)?;
    for (k, _) in &stale {
        let bad = || Rollback(StoreError::Corrupt(format!("device expiry key {k:?}")));
        let (head, id) = k.rsplit_once('\0').ok_or_else(bad)?;
        let mut parts = head.splitn(3, '\0');
        let (_, tag, tenant) = (parts.next(), parts.next(), parts.next().ok_or_else(bad)?);
        let table = match tag {
            Some("a") => Table::Activations,
            Some("c") => Table::Challenges,
            _ => return Err(bad()),
        };
        txn.delete(Table::DeviceExpiry, k)?;
        txn.delete(table, &key(tenant, id))?;
    }
    Ok(stale.len())
}

/// `tenant NUL id`.
pub fn key(tenant: &str, id: &str) -> String {
    format!("{tenant}\0{id}")
}

/// An activated device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Tenant.
    pub tenant: String,
    /// Device id (32 hex).
    pub id: String,
    /// Subject.
    pub subject: String,
    /// The citizen's name for it.
    pub display_name: String,
    /// SEC1 uncompressed P-256 point.
    pub public_key: Vec<u8>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds (0: active).
    pub revoked_at: u64,
    /// Unix seconds of the last listing or answer (0: never).
    pub last_used_at: u64,
    /// Timestamp of the last accepted ListPendingChallenges (replay guard).
    pub last_list_timestamp: u64,
    /// Activated by an officer without an approving challenge.
    pub activated_by_officer: bool,
}

impl DeviceRecord {
    /// Not revoked.
    pub fn active(&self) -> bool {
        self.revoked_at == 0
    }
}

/// Where an activation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivationState {
    /// Waiting for CompleteActivation.
    Pending,
    /// Completed: a device was activated.
    Completed,
    /// Cancelled after too many wrong codes.
    Cancelled,
}

/// A begun activation. The code itself is never stored: only its HMAC under the token's
/// binding key (computed in the HSM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationRecord {
    /// Tenant.
    pub tenant: String,
    /// Activation id (32 hex).
    pub id: String,
    /// Subject.
    pub subject: String,
    /// Name of the device to be.
    pub display_name: String,
    /// HMAC-SHA256 (in the HSM) of the code.
    pub code_mac: [u8; 32],
    /// 32 random bytes of the payload.
    pub nonce: Vec<u8>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// Wrong codes so far.
    pub failures: u32,
    /// Where it stands.
    pub state: ActivationState,
    /// Begun by an officer (in-person identity check).
    pub by_officer: bool,
    /// The approved ACTIVATE_DEVICE challenge it used (empty: none).
    pub authorized_by: String,
    /// The device it activated (empty until completed).
    pub device_id: String,
}

/// Why a challenge is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// A login.
    Login,
    /// A transaction.
    Transaction,
    /// Approval of a new device.
    ActivateDevice,
}

impl Purpose {
    /// The name in the payload (the proto enum name without its prefix).
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Login => "LOGIN",
            Purpose::Transaction => "TRANSACTION",
            Purpose::ActivateDevice => "ACTIVATE_DEVICE",
        }
    }

    /// An approval gives evidence for SignAssertion.
    pub fn gives_evidence(self) -> bool {
        matches!(self, Purpose::Login | Purpose::Transaction)
    }
}

/// Where a challenge stands (as stored: a PENDING one past its expiry reads EXPIRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChallengeState {
    /// Waiting.
    Pending,
    /// Approved.
    Approved,
    /// Denied.
    Denied,
    /// Reported (NOT_ME).
    Reported,
    /// Expired.
    Expired,
    /// Cancelled.
    Cancelled,
}

impl ChallengeState {
    /// Upper-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeState::Pending => "PENDING",
            ChallengeState::Approved => "APPROVED",
            ChallengeState::Denied => "DENIED",
            ChallengeState::Reported => "REPORTED",
            ChallengeState::Expired => "EXPIRED",
            ChallengeState::Cancelled => "CANCELLED",
        }
    }
}

/// An approval challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeRecord {
    /// Tenant.
    pub tenant: String,
    /// Challenge id (32 hex).
    pub id: String,
    /// Subject.
    pub subject: String,
    /// The text shown.
    pub text: String,
    /// Who asks.
    pub service_provider: String,
    /// Why.
    pub purpose: Purpose,
    /// Where it stands.
    pub state: ChallengeState,
    /// Two digits for the login page.
    pub binding_code: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// 32 random bytes of the payload.
    pub nonce: Vec<u8>,
    /// DER signature by the challenge key.
    pub server_signature: Vec<u8>,
    /// Its kid.
    pub server_kid: String,
    /// The device that answered.
    pub answered_by: String,
    /// Unix seconds of the answer (0: none).
    pub answered_at: u64,
    /// Evidence of an approval (LOGIN, TRANSACTION).
    pub evidence_id: String,
    /// An approved ACTIVATE_DEVICE challenge that an activation has used.
    pub used: bool,
}

impl ChallengeRecord {
    /// The state as of `now`: a pending challenge at or past its expiry is EXPIRED.
    pub fn state_at(&self, now: u64) -> ChallengeState {
        if self.state == ChallengeState::Pending && now >= self.expires_at {
            ChallengeState::Expired
        } else {
            self.state
        }
    }
}

/// A subject's app state: the lock row of the subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectRecord {
    /// Every device id ever activated, in activation order.
    pub devices: Vec<String>,
    /// The pending challenge, if any (it may have expired since).
    pub pending: String,
    /// Creation times (Unix seconds) of the challenges of the last minute.
    pub recent_challenges: Vec<u64>,
    /// Times of wrong binding codes within the lockout window.
    pub binding_failures: Vec<u64>,
    /// Approvals refused until then (wrong binding codes).
    pub locked_until: u64,
    /// Approvals refused until then (a NOT_ME report).
    pub suspended_until: u64,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_extend(v, vec![FORMAT_V1]).expect("postcard encoding into a Vec is infallible")
}

fn decode<T: DeserializeOwned>(table: Table, key: &str, bytes: &[u8]) -> Result<T, Rollback> {
    let corrupt = |what: String| {
        Rollback(StoreError::Corrupt(format!(
            "{} {:?}: {what}",
            table.name(),
            key.replace('\0', "/")
        )))
    };
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            let (v, rest) = postcard::take_from_bytes(body)
                .map_err(|e| corrupt(format!("undecodable: {e}")))?;
            if !rest.is_empty() {
                return Err(corrupt("trailing bytes".into()));
            }
            Ok(v)
        }
        _ => Err(corrupt("unknown format version".into())),
    }
}

/// The record at `key` of `table`, as `txn` sees it.
pub fn get<T: DeserializeOwned, R: ReadTxn + ?Sized>(
    txn: &mut R,
    table: Table,
    key: &str,
) -> Result<Option<T>, Rollback> {
    txn.get(table, key)?
        .map(|b| decode(table, key, &b))
        .transpose()
}

/// Writes `v` at `key` of `table`.
pub fn put<T: Serialize>(
    txn: &mut dyn Txn,
    table: Table,
    key: &str,
    v: &T,
) -> Result<(), Rollback> {
    txn.put(table, key, &encode(v))
}

/// Inserts `v` at a fresh random `key`.
pub fn insert<T: Serialize>(
    txn: &mut dyn Txn,
    table: Table,
    key: &str,
    v: &T,
) -> Result<(), Rollback> {
    txn.insert_new(table, key, &encode(v))
}

/// The subject row (default when the subject has none yet).
pub fn subject<R: ReadTxn + ?Sized>(
    txn: &mut R,
    tenant: &str,
    subject: &str,
) -> Result<SubjectRecord, Rollback> {
    Ok(get(txn, Table::DeviceSubjects, &key(tenant, subject))?.unwrap_or_default())
}

/// The subject's devices, in activation order.
pub fn devices_of<R: ReadTxn + ?Sized>(
    txn: &mut R,
    tenant: &str,
    s: &SubjectRecord,
) -> Result<Vec<DeviceRecord>, Rollback> {
    let keys: Vec<String> = s.devices.iter().map(|id| key(tenant, id)).collect();
    let mut out = Vec::with_capacity(keys.len());
    for (k, bytes) in keys.iter().zip(txn.get_many(Table::Devices, &keys)?) {
        if let Some(b) = bytes {
            out.push(decode(Table::Devices, k, &b)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_activations_and_challenges_are_purged_by_later_inserts() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::Store::open_redb(&dir.path().join("s.redb"), Default::default()).unwrap();
        // Ten challenges expiring at 100, one activation at 5000.
        for i in 0..10u32 {
            store
                .write(move |txn| {
                    insert_expiring(txn, Expiring::Challenge, "t", &format!("c{i}"), 100, 50, &i)
                })
                .await
                .unwrap();
        }
        store
            .write(|txn| insert_expiring(txn, Expiring::Activation, "t", "a1", 5000, 60, &1u32))
            .await
            .unwrap();
        let count = |table| store.read(move |txn| txn.count(table).map_err(|Rollback(e)| e));
        assert_eq!(count(Table::Challenges).await.unwrap(), 10);
        // Within the grace nothing goes; after it, each insert purges up to four.
        let late = 100 + PURGE_GRACE_SECONDS + 1;
        store
            .write(move |txn| {
                insert_expiring(txn, Expiring::Challenge, "t", "n1", late + 100, late, &0u32)
            })
            .await
            .unwrap();
        assert_eq!(count(Table::Challenges).await.unwrap(), 7);
        store
            .write(move |txn| purge_in(txn, late, 100))
            .await
            .unwrap();
        assert_eq!(count(Table::Challenges).await.unwrap(), 1);
        assert_eq!(count(Table::Activations).await.unwrap(), 1);
        assert_eq!(count(Table::DeviceExpiry).await.unwrap(), 2);
    }

    #[test]
    fn records_round_trip_and_refuse_garbage() {
        let s = SubjectRecord {
            devices: vec!["a".into()],
            pending: "p".into(),
            recent_challenges: vec![1, 2],
            binding_failures: vec![3],
            locked_until: 4,
            suspended_until: 5,
        };
        let b = encode(&s);
        assert_eq!(
            decode::<SubjectRecord>(Table::DeviceSubjects, "k", &b).unwrap(),
            s
        );
        assert!(decode::<SubjectRecord>(Table::DeviceSubjects, "k", &[9, 1]).is_err());
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(decode::<SubjectRecord>(Table::DeviceSubjects, "k", &trailing).is_err());
    }
}
