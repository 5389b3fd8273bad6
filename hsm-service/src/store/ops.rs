//! Store operations inside a caller-supplied write transaction.
//!
//! These are the building blocks of [`super::EmbeddedStore`]'s own writes and
//! are public so that other modules can combine them with their own tables in
//! ONE job of [`super::EmbeddedStore::write`] (e.g. a credential update and
//! its audit entry commit together or not at all).
//!
//! Convention ([`TxnResult`]): an operation that fails *before writing*
//! (not found, already exists, corrupt record, invalid request) returns
//! `Ok(Err(..))` and leaves the transaction clean, so the job may carry on or
//! return normally. Storage errors return `Err(Rollback)`: propagate them with
//! `?` and the batch is rolled back.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::record::{decode, encode, key, validate_key};
use super::tables::{CREDENTIALS, META, RESERVED_META_PREFIX};
use super::{CredentialRecord, Rollback, StoreError, TxnResult, Update};

/// Reads a record as this transaction sees it (including earlier, still
/// uncommitted writes of the same batch).
pub fn get(txn: &WriteTransaction, tenant: &str, id: &str) -> TxnResult<Option<CredentialRecord>> {
    let table = txn.open_table(CREDENTIALS)?;
    let guard = table.get(key(tenant, id).as_str())?;
    Ok(guard.map(|g| decode(tenant, id, g.value())).transpose())
}

/// Inserts a new record; `Ok(Err(AlreadyExists))` if its tenant already has the id.
pub fn insert(txn: &WriteTransaction, rec: &CredentialRecord) -> TxnResult<()> {
    if let Err(e) = validate_key(&rec.tenant, &rec.id) {
        return Ok(Err(e));
    }
    let k = key(&rec.tenant, &rec.id);
    let mut table = txn.open_table(CREDENTIALS)?;
    if table.get(k.as_str())?.is_some() {
        return Ok(Err(StoreError::AlreadyExists));
    }
    table.insert(k.as_str(), encode(rec).as_slice())?;
    Ok(Ok(()))
}

/// Inserts all records or none: `Ok(Err(AlreadyExists))` if any (tenant, id) is
/// taken or repeated in `recs`, and then nothing is written.
pub fn insert_many(txn: &WriteTransaction, recs: &[CredentialRecord]) -> TxnResult<()> {
    let mut seen = HashSet::with_capacity(recs.len());
    let mut keys = Vec::with_capacity(recs.len());
    for r in recs {
        if let Err(e) = validate_key(&r.tenant, &r.id) {
            return Ok(Err(e));
        }
        let k = key(&r.tenant, &r.id);
        if !seen.insert(k.clone()) {
            return Ok(Err(StoreError::AlreadyExists));
        }
        keys.push(k);
    }
    let mut table = txn.open_table(CREDENTIALS)?;
    // All checks before the first write, so a refusal leaves the txn clean.
    for k in &keys {
        if table.get(k.as_str())?.is_some() {
            return Ok(Err(StoreError::AlreadyExists));
        }
    }
    for (r, k) in recs.iter().zip(&keys) {
        table.insert(k.as_str(), encode(r).as_slice())?;
    }
    Ok(Ok(()))
}

/// Read-modify-write of one record.
///
/// `f` gets a detached copy of the current record (as this transaction sees
/// it). `Update::Write` stores the copy, `Keep` discards any change to it,
/// `Delete` removes the record. `f` runs before anything is written and under
/// `catch_unwind`, so a panicking `f` yields `Ok(Err(Aborted))` and leaves the
/// transaction clean: one bad verification cannot cost the rest of its batch.
/// Changing `tenant` or `id` is refused with `Ok(Err(Invalid))`.
pub fn update<R>(
    txn: &WriteTransaction,
    tenant: &str,
    id: &str,
    f: impl FnOnce(&mut CredentialRecord) -> Update<R>,
) -> TxnResult<R> {
    let k = key(tenant, id);
    let mut table = txn.open_table(CREDENTIALS)?;
    let mut rec = match table.get(k.as_str())? {
        None => return Ok(Err(StoreError::NotFound)),
        Some(g) => match decode(tenant, id, g.value()) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        },
    };
    // AssertUnwindSafe: on panic `rec` is dropped unused, nothing else is
    // shared with `f`.
    let outcome = match catch_unwind(AssertUnwindSafe(|| f(&mut rec))) {
        Ok(o) => o,
        Err(_) => {
            tracing::error!(
                tenant,
                credential = id,
                "store update closure panicked; nothing written"
            );
            return Ok(Err(StoreError::Aborted(
                "update closure panicked; nothing was written".into(),
            )));
        }
    };
    match outcome {
        Update::Keep(r) => Ok(Ok(r)),
        Update::Write(r) => {
            if rec.id != id || rec.tenant != tenant {
                return Ok(Err(StoreError::Invalid(
                    "an update must not change the credential's tenant or id".into(),
                )));
            }
            table.insert(k.as_str(), encode(&rec).as_slice())?;
            Ok(Ok(r))
        }
        Update::Delete(r) => {
            table.remove(k.as_str())?;
            Ok(Ok(r))
        }
    }
}

/// Deletes a record; `true` if it existed.
pub fn delete(txn: &WriteTransaction, tenant: &str, id: &str) -> Result<bool, Rollback> {
    let mut table = txn.open_table(CREDENTIALS)?;
    let existed = table.remove(key(tenant, id).as_str())?.is_some();
    Ok(existed)
}

/// Number of credentials as this transaction sees it.
pub fn count(txn: &WriteTransaction) -> Result<u64, Rollback> {
    Ok(txn.open_table(CREDENTIALS)?.len()?)
}

/// Reads a meta value as this transaction sees it.
pub fn get_meta(txn: &WriteTransaction, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
    let table = txn.open_table(META)?;
    let v = table.get(key)?.map(|g| g.value().to_vec());
    Ok(v)
}

/// Sets a meta value; keys starting with `store.` are refused
/// (`Ok(Err(Invalid))`), they belong to the store itself.
pub fn put_meta(txn: &WriteTransaction, key: &str, value: &[u8]) -> TxnResult<()> {
    if key.starts_with(RESERVED_META_PREFIX) {
        return Ok(Err(StoreError::Invalid(format!(
            "meta keys starting with {RESERVED_META_PREFIX:?} are reserved"
        ))));
    }
    if key.is_empty() {
        return Ok(Err(StoreError::Invalid("empty meta key".into())));
    }
    txn.open_table(META)?.insert(key, value)?;
    Ok(Ok(()))
}
