//! Store operations inside a caller-supplied transaction of the unit of work.
//!
//! These are the building blocks of [`super::Store`]'s own writes and are public so
//! that other modules can combine them with their own tables in ONE job of
//! [`super::Store::write`] (e.g. a credential update and its audit record commit
//! together or not at all). They are written once, against [`Txn`] / [`ReadTxn`], for
//! every backend. Read-only operations are generic over the transaction so that they
//! take a write [`Txn`] (locking reads) and a read-only snapshot alike.
//!
//! Convention ([`TxnResult`]): an operation that fails *before writing*
//! (not found, already exists, corrupt record, invalid request) returns
//! `Ok(Err(..))` and leaves the transaction clean, so the job may carry on or
//! return normally. Storage errors return `Err(Rollback)`: propagate them with
//! `?` and the batch is rolled back.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::record::{decode, decode_keyed, encode, key, tenant_range, validate_key};
use super::uow::{KeyRange, ReadTxn, Table, Txn};
use super::{CredentialKey, CredentialRecord, Rollback, StoreError, TxnResult, Update};

/// Meta keys with this prefix are written only by the store.
pub const RESERVED_META_PREFIX: &str = "store.";

/// Reads a record as this transaction sees it (in a write transaction: a locking read
/// that includes earlier, still uncommitted writes of the same batch).
pub fn get<T: ReadTxn + ?Sized>(
    txn: &mut T,
    tenant: &str,
    id: &str,
) -> TxnResult<Option<CredentialRecord>> {
    let bytes = txn.get(Table::Credentials, &key(tenant, id))?;
    Ok(bytes.map(|b| decode(tenant, id, &b)).transpose())
}

/// Inserts a new record; `Ok(Err(AlreadyExists))` if its tenant already has the id.
pub fn insert(txn: &mut dyn Txn, rec: &CredentialRecord) -> TxnResult<()> {
    if let Err(e) = validate_key(&rec.tenant, &rec.id) {
        return Ok(Err(e));
    }
    let k = key(&rec.tenant, &rec.id);
    if txn.get(Table::Credentials, &k)?.is_some() {
        return Ok(Err(StoreError::AlreadyExists));
    }
    txn.put(Table::Credentials, &k, &encode(rec))?;
    Ok(Ok(()))
}

/// Inserts all records or none: `Ok(Err(AlreadyExists))` if any (tenant, id) is
/// taken or repeated in `recs`, and then nothing is written.
pub fn insert_many(txn: &mut dyn Txn, recs: &[CredentialRecord]) -> TxnResult<()> {
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
    // All checks before the first write, so a refusal leaves the txn clean. One request
    // for all of them where the backend can (PostgreSQL: one locking read).
    if txn
        .get_many(Table::Credentials, &keys)?
        .iter()
        .any(Option::is_some)
    {
        return Ok(Err(StoreError::AlreadyExists));
    }
    for (r, k) in recs.iter().zip(&keys) {
        txn.put(Table::Credentials, k, &encode(r))?;
    }
    Ok(Ok(()))
}

/// Read-modify-write of one record.
///
/// `f` gets a detached copy of the current record (as this transaction sees
/// it; a locking read). `Update::Write` stores the copy, `Keep` discards any change to
/// it, `Delete` removes the record. `f` runs before anything is written and under
/// `catch_unwind`, so a panicking `f` yields `Ok(Err(Aborted))` and leaves the
/// transaction clean: one bad verification cannot cost the rest of its batch.
/// Changing `tenant` or `id` is refused with `Ok(Err(Invalid))`.
pub fn update<R>(
    txn: &mut dyn Txn,
    tenant: &str,
    id: &str,
    f: impl FnOnce(&mut CredentialRecord) -> Update<R>,
) -> TxnResult<R> {
    let k = key(tenant, id);
    let mut rec = match txn.get(Table::Credentials, &k)? {
        None => return Ok(Err(StoreError::NotFound)),
        Some(b) => match decode(tenant, id, &b) {
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
            txn.put(Table::Credentials, &k, &encode(&rec))?;
            Ok(Ok(r))
        }
        Update::Delete(r) => {
            txn.delete(Table::Credentials, &k)?;
            Ok(Ok(r))
        }
    }
}

/// Deletes a record; `true` if it existed.
pub fn delete(txn: &mut dyn Txn, tenant: &str, id: &str) -> Result<bool, Rollback> {
    txn.delete(Table::Credentials, &key(tenant, id))
}

/// Number of credentials as this transaction sees it.
pub fn count<T: ReadTxn + ?Sized>(txn: &mut T) -> Result<u64, Rollback> {
    txn.count(Table::Credentials)
}

/// Pages through records in (tenant, id) order (bytewise): those after `after`, at
/// most `limit`, of `tenant` only when given, else of every tenant.
pub fn list<T: ReadTxn + ?Sized>(
    txn: &mut T,
    tenant: Option<&str>,
    after: Option<&CredentialKey>,
    limit: usize,
) -> Result<Vec<CredentialRecord>, StoreError> {
    let after = after.map(|a| key(&a.tenant, &a.id));
    let range = match (tenant.map(tenant_range), after) {
        (Some((start, end)), Some(a)) if a.as_str() >= start.as_str() => KeyRange {
            start: a,
            after: true,
            end: Some(end),
        },
        (Some((start, end)), _) => KeyRange {
            start,
            after: false,
            end: Some(end),
        },
        (None, Some(a)) => KeyRange {
            start: a,
            after: true,
            end: None,
        },
        (None, None) => KeyRange::all(),
    };
    txn.scan(Table::Credentials, &range, limit)
        .map_err(|r| r.0)?
        .into_iter()
        .map(|(k, v)| decode_keyed(&k, &v))
        .collect()
}

/// Reads a meta value as this transaction sees it.
pub fn get_meta<T: ReadTxn + ?Sized>(txn: &mut T, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
    txn.get(Table::Meta, key)
}

/// Every meta entry whose key starts with `prefix`, in key order.
pub fn meta_with_prefix<T: ReadTxn + ?Sized>(
    txn: &mut T,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
    txn.scan(Table::Meta, &KeyRange::prefix(prefix), usize::MAX)
}

/// Sets a meta value; keys starting with `store.` are refused
/// (`Ok(Err(Invalid))`), they belong to the store itself.
pub fn put_meta(txn: &mut dyn Txn, key: &str, value: &[u8]) -> TxnResult<()> {
    if key.starts_with(RESERVED_META_PREFIX) {
        return Ok(Err(StoreError::Invalid(format!(
            "meta keys starting with {RESERVED_META_PREFIX:?} are reserved"
        ))));
    }
    if key.is_empty() {
        return Ok(Err(StoreError::Invalid("empty meta key".into())));
    }
    txn.put(Table::Meta, key, value)?;
    Ok(Ok(()))
}
