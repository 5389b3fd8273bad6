//! Durable credential state.
//!
//! [`CredentialStore`] is the backend-neutral interface (a PostgreSQL backend
//! can follow); [`EmbeddedStore`] implements it on one embedded ACID file
//! (redb) in the data directory.
//!
//! Every write is durable (fsync) before its future resolves. Concurrent
//! writes share one commit through a group-commit committer thread, so the
//! fsync cost is paid once per batch, not once per verification. Reads run on
//! MVCC snapshots and never wait for writes.
//!
//! Other modules that need durable state (audit log, signing key metadata)
//! define their tables in [`tables`], write through [`EmbeddedStore::write`]
//! (optionally together with [`ops`] calls, atomically) and read through
//! [`EmbeddedStore::read`].

use std::future::Future;

pub mod backend;
mod error;
pub mod evidence;
mod group_commit;
pub mod ops;
pub mod postgres;
mod record;
mod redb_store;
pub mod tables;
pub mod uow;

#[cfg(test)]
mod tests;

pub use error::{Rollback, StoreError, TxnResult};
pub use evidence::EvidenceRecord;
pub use record::{validate_tenant, CredentialRecord, DEFAULT_TENANT, MAX_ID_LEN, MAX_TENANT_LEN};
pub use redb_store::{EmbeddedStore, StoreOptions, StoreStats};

/// What an update closure decided; the payload is returned to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update<R> {
    /// Store the modified record.
    Write(R),
    /// Change nothing (modifications made to the record are discarded).
    Keep(R),
    /// Remove the record.
    Delete(R),
}

/// What a credential update writes besides the record, in the same transaction.
#[derive(Debug, Default)]
pub struct Effects {
    /// The audit record of the change.
    pub audit: Option<crate::audit::Event>,
    /// Evidence of an accepted code (see [`evidence`]).
    pub evidence: Option<EvidenceRecord>,
}

/// The key of a credential: ids are unique per tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CredentialKey {
    /// The tenant.
    pub tenant: String,
    /// The id within it.
    pub id: String,
}

/// Durable credential state, backend-neutral. Every record belongs to a tenant and is
/// addressed by `(tenant, id)`: a tenant that asks for an id it does not hold gets
/// exactly what it gets for an id that does not exist.
///
/// Methods return `Send` futures so tonic handlers can await them. The trait
/// uses return-position `impl Future`, so it is not object safe: make callers
/// generic over `S: CredentialStore`.
///
/// Cancellation: dropping a write's future after the write was queued does
/// not cancel it; it may still commit. Callers must not assume "no answer"
/// means "not applied" (for OTPs this is the safe direction: a code may be
/// consumed without the client learning so).
pub trait CredentialStore: Send + Sync + 'static {
    /// Inserts a new record; [`StoreError::AlreadyExists`] if its tenant already
    /// has the id. Durable before returning.
    fn insert(&self, rec: CredentialRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads the committed record.
    fn get(
        &self,
        tenant: &str,
        id: &str,
    ) -> impl Future<Output = Result<Option<CredentialRecord>, StoreError>> + Send;

    /// Pages through records in (tenant, id) order (bytewise): those after
    /// `after`, at most `limit`, of `tenant` only when given (a range scan of that
    /// tenant), else of every tenant. An empty page means the end.
    fn list(
        &self,
        tenant: Option<&str>,
        after: Option<&CredentialKey>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<CredentialRecord>, StoreError>> + Send;

    /// Atomic read-modify-write of one record, durable before returning.
    ///
    /// The closure sees the latest state (including earlier writes of the same
    /// group-commit batch) and decides through [`Update`]. Its answer is
    /// returned only after the commit succeeded, so a caller never acts on a
    /// state that was not made durable. [`StoreError::NotFound`] if missing.
    /// The closure must be quick and non-blocking (it runs on the committer).
    fn update<R, F>(
        &self,
        tenant: &str,
        id: &str,
        f: F,
    ) -> impl Future<Output = Result<R, StoreError>> + Send
    where
        R: Send + 'static,
        F: FnOnce(&mut CredentialRecord) -> Update<R> + Send + 'static;

    /// [`CredentialStore::update`], plus the audit record `audit` derives from the
    /// closure's answer, in the same transaction: the change and its record are durable
    /// together or not at all.
    fn update_audited<R, F, A>(
        &self,
        tenant: &str,
        id: &str,
        f: F,
        audit: A,
    ) -> impl Future<Output = Result<R, StoreError>> + Send
    where
        R: Send + 'static,
        F: FnOnce(&mut CredentialRecord) -> Update<R> + Send + 'static,
        A: FnOnce(&R) -> Option<crate::audit::Event> + Send + 'static,
    {
        self.update_with(tenant, id, f, move |r: &R| Effects {
            audit: audit(r),
            evidence: None,
        })
    }

    /// [`CredentialStore::update`], plus the [`Effects`] `effects` derives from the
    /// closure's answer (an audit record, an evidence record), in the same
    /// transaction. The evidence's `auth_time` dates the purge of stale evidence.
    fn update_with<R, F, E>(
        &self,
        tenant: &str,
        id: &str,
        f: F,
        effects: E,
    ) -> impl Future<Output = Result<R, StoreError>> + Send
    where
        R: Send + 'static,
        F: FnOnce(&mut CredentialRecord) -> Update<R> + Send + 'static,
        E: FnOnce(&R) -> Effects + Send + 'static;

    /// Deletes a record; `true` if it existed. Durable before returning.
    fn delete(
        &self,
        tenant: &str,
        id: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// [`CredentialStore::insert`], plus `audit` in the same transaction when the insert
    /// succeeds (nothing is recorded for an id its tenant already has).
    fn insert_audited(
        &self,
        rec: CredentialRecord,
        audit: crate::audit::Event,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// [`CredentialStore::delete`], plus `audit` in the same transaction when the record
    /// existed.
    fn delete_audited(
        &self,
        tenant: &str,
        id: &str,
        audit: crate::audit::Event,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Number of credentials of every tenant.
    fn count(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Inserts all records in one transaction, or none of them
    /// ([`StoreError::AlreadyExists`] if any key is taken or repeated). For
    /// imports; callers chunk large sets.
    fn insert_many(
        &self,
        recs: Vec<CredentialRecord>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
