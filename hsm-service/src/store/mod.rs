//! Durable state, behind one storage interface.
//!
//! Layers, from the bottom:
//! * [`uow`]: the unit of work every backend implements ([`Txn`], [`ReadTxn`],
//!   [`Table`]) and [`backend`]: the engine itself ([`Backend`], [`BatchTxn`]).
//!   `store/redb/` (the embedded default, one file in the data directory) is the only
//!   module that names redb types; a PostgreSQL backend plugs in through
//!   [`Store::with_backend`].
//! * [`Store`]: group commit in front of any backend (concurrent writes share one
//!   commit), snapshot reads, and [`CredentialStore`].
//! * Typed operations written once against the unit of work: [`ops`] (credentials,
//!   meta), [`evidence`]; other modules keep their own encodings (key versions,
//!   ceremonies, audit lines) and write them through [`Store::write`] into the same
//!   transaction as the change they belong to.
//!
//! Every write is durable before its future resolves. `store` imports no domain
//! module: what a credential change writes besides the record (its audit record, its
//! evidence) is a closure of the caller, run inside the same transaction.

use std::future::Future;

pub mod backend;
mod error;
pub mod events;
pub mod evidence;
mod group_commit;
mod handle;
pub mod ops;
pub mod postgres;
mod record;
pub mod redb;
pub mod uow;

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

pub use self::redb::{RedbBackend, FILE_NAME as EMBEDDED_FILE};
pub use backend::{Backend, BatchTxn};
pub use error::{Rollback, StoreError, TxnResult};
pub use evidence::EvidenceRecord;
pub use handle::{Store, StoreOptions, StoreStats};
pub use record::{
    validate_tenant, CredentialRecord, DEFAULT_TENANT, MAX_FAILURE_TIMES, MAX_ID_LEN,
    MAX_TENANT_LEN,
};
pub use uow::{ChainName, KeyRange, ReadTxn, Table, Txn, DEFAULT_CHAIN};

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

    /// [`CredentialStore::update`], plus what `effects` writes, given the closure's
    /// answer, into the same transaction (the caller's audit record, evidence): the
    /// change and its effects are durable together or not at all. `effects` runs only
    /// when the update itself succeeded; its `Err` rolls the whole batch back.
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
        E: FnOnce(&R, &mut dyn Txn) -> Result<(), Rollback> + Send + 'static;

    /// Deletes a record; `true` if it existed. Durable before returning.
    fn delete(
        &self,
        tenant: &str,
        id: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// [`CredentialStore::insert`], plus what `effects` writes into the same transaction
    /// when the insert succeeds (it does not run for an id its tenant already has).
    fn insert_with<E>(
        &self,
        rec: CredentialRecord,
        effects: E,
    ) -> impl Future<Output = Result<(), StoreError>> + Send
    where
        E: FnOnce(&mut dyn Txn) -> Result<(), Rollback> + Send + 'static;

    /// [`CredentialStore::delete`], plus what `effects` writes into the same transaction
    /// when the record existed.
    fn delete_with<E>(
        &self,
        tenant: &str,
        id: &str,
        effects: E,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send
    where
        E: FnOnce(&mut dyn Txn) -> Result<(), Rollback> + Send + 'static;

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
