//! The durable record of a ceremony (store table `ceremonies`) and the index of the keys
//! ceremonies created (table `ceremony_keys`).

use serde::{Deserialize, Serialize};

use crate::store::{KeyRange, ReadTxn, Rollback, StoreError, Table, Txn};

/// Where a ceremony is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CeremonyState {
    /// Proposed; collecting approvals.
    Proposed,
    /// Being executed right now (or the service stopped during execution: the record
    /// stays here and the ceremony cannot be run again).
    Executing,
    /// Executed; every step succeeded.
    Succeeded,
    /// Executed; a step failed and the rest did not run.
    Failed,
}

impl CeremonyState {
    /// The name used on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            CeremonyState::Proposed => "proposed",
            CeremonyState::Executing => "executing",
            CeremonyState::Succeeded => "succeeded",
            CeremonyState::Failed => "failed",
        }
    }
}

/// An officer as the service saw them: certificate subject and fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Officer {
    /// Subject common name of the client certificate.
    pub subject: String,
    /// SHA-256 of the client certificate DER, lower-case hex.
    pub fingerprint: String,
}

/// One officer's approval of a ceremony id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who approved.
    pub officer: Officer,
    /// Unix seconds of the approval.
    pub approved_at: u64,
}

/// Everything durable about one ceremony.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CeremonyRecord {
    /// The ceremony id (SHA-256 of the canonical plan, hex).
    pub id: String,
    /// The canonical form of the plan (what the id is the hash of).
    pub canonical_plan: String,
    /// The plan file as proposed (for people; the canonical form is what runs).
    pub plan_toml: String,
    /// Who proposed it.
    pub proposed_by: Officer,
    /// Unix seconds of the proposal.
    pub proposed_at: u64,
    /// Approvals, at most one per certificate (a repeated approval replaces the earlier).
    pub approvals: Vec<Approval>,
    /// State.
    pub state: CeremonyState,
    /// Who executed it.
    pub executed_by: Option<Officer>,
    /// Unix seconds when execution started (0: never).
    pub executed_at: u64,
    /// The instance (its audit chain) that claimed the execution; empty before it was
    /// claimed, and in records of services that did not record it. Start-up recovery
    /// fails only the `executing` ceremonies of its own instance: another instance's may
    /// be running right now.
    #[serde(default)]
    pub executed_on: String,
    /// Which step failed and why (empty unless failed).
    pub failure: String,
    /// The transcript (JSON), once executed.
    pub transcript_json: String,
}

/// Format of the encoded records; bumped when [`CeremonyRecord`] changes shape.
const FORMAT: u8 = 1;

fn encode(r: &CeremonyRecord) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT];
    serde_json::to_writer(&mut out, r)
        .map_err(|e| StoreError::Invalid(format!("encoding ceremony record: {e}")))?;
    Ok(out)
}

fn decode(key: &str, bytes: &[u8]) -> Result<CeremonyRecord, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => serde_json::from_slice(body)
            .map_err(|e| StoreError::Corrupt(format!("ceremony {key:?}: {e}"))),
        Some((v, _)) => Err(StoreError::Corrupt(format!(
            "ceremony {key:?}: unknown format version {v}"
        ))),
        None => Err(StoreError::Corrupt(format!("ceremony {key:?}: empty"))),
    }
}

/// One ceremony. (Public, like [`update`], for the store conformance suite.)
pub fn load<T: ReadTxn + ?Sized>(
    txn: &mut T,
    id: &str,
) -> Result<Option<CeremonyRecord>, StoreError> {
    txn.get(Table::Ceremonies, id)?
        .map(|v| decode(id, &v))
        .transpose()
}

/// Every ceremony, in id order.
pub(crate) fn load_all<T: ReadTxn + ?Sized>(
    txn: &mut T,
) -> Result<Vec<CeremonyRecord>, StoreError> {
    txn.scan(Table::Ceremonies, &KeyRange::all(), usize::MAX)?
        .iter()
        .map(|(k, v)| decode(k, v))
        .collect()
}

/// What an update decided.
pub enum Change<T> {
    /// Write this record, answer `T`.
    Write(Box<CeremonyRecord>, T),
    /// Leave the table alone, answer `T`.
    Keep(T),
}

/// Read-modify-write of one ceremony in this transaction (a locking read): `change`
/// sees the current record (or `None`) and decides. Every state transition of a
/// ceremony (propose, approve, claim, finish) is one such update, so two instances can
/// never both claim one ceremony.
pub fn update<T>(
    txn: &mut dyn Txn,
    id: &str,
    change: impl FnOnce(Option<CeremonyRecord>) -> Change<T>,
) -> Result<T, Rollback> {
    let current = match txn.get(Table::Ceremonies, id)? {
        Some(v) => Some(decode(id, &v)?),
        None => None,
    };
    match change(current) {
        Change::Write(rec, answer) => {
            txn.put(Table::Ceremonies, id, &encode(&rec)?)?;
            Ok(answer)
        }
        Change::Keep(answer) => Ok(answer),
    }
}

/// Record which ceremony created the key versions `keys` (`(name, version)`).
pub(crate) fn put_key_origins(
    txn: &mut dyn Txn,
    ceremony_id: &str,
    keys: &[(String, u32)],
) -> Result<(), Rollback> {
    for (name, version) in keys {
        let key = crate::signing::versions::store_key(name, *version);
        txn.put(Table::CeremonyKeys, &key, ceremony_id.as_bytes())?;
    }
    Ok(())
}

/// The ceremony that created each key version: `"<name>/<version>"` store keys ->
/// ceremony id.
pub(crate) fn key_origins<T: ReadTxn + ?Sized>(
    txn: &mut T,
) -> Result<std::collections::HashMap<(String, u32), String>, StoreError> {
    let mut out = std::collections::HashMap::new();
    for (key, v) in txn.scan(Table::CeremonyKeys, &KeyRange::all(), usize::MAX)? {
        if let Some((name, version)) = key.rsplit_once('/') {
            if let Ok(version) = version.parse::<u32>() {
                out.insert(
                    (name.to_owned(), version),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
    }
    Ok(out)
}
