//! Errors of the credential store.
//!
//! No variant ever carries record contents: messages name ids, codes and
//! backend error text only, so an error can be logged or returned without
//! leaking wrapped seeds.

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No credential with that id.
    #[error("credential not found")]
    NotFound,
    /// A credential with that id already exists.
    #[error("credential already exists")]
    AlreadyExists,
    /// A stored value could not be decoded (unknown format version, bad enum
    /// code, truncated bytes). The message names the key and the defect only.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// The request itself is unacceptable (empty id, reserved meta key, an
    /// update that changed the id, bad options).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The storage engine failed (I/O, commit, transaction). Carries the
    /// engine's error text. The write is not acknowledged: treat it as failed.
    /// (After a failed fsync it may, rarely, still be visible after a restart,
    /// so callers must never rely on "failed" meaning "certainly not written".)
    #[error("store backend error: {0}")]
    Backend(String),
    /// The operation was not applied: it was rolled back together with its
    /// group-commit batch (another write in the batch failed) or its closure
    /// panicked. Nothing it did was committed; it is safe to retry.
    #[error("store operation aborted: {0}")]
    Aborted(String),
    /// The database cannot be reached (connection refused or lost, pool exhausted by
    /// dead connections). Nothing of the operation was acknowledged: a write in flight
    /// may or may not have committed (exactly as [`StoreError::Backend`]), so callers
    /// answer `UNAVAILABLE` and the client retries; the backend reconnects by itself.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The data file was written by a newer version of this service.
    #[error(
        "store schema version {found} is newer than the supported version {supported}; \
         refusing to open (upgrade the service or restore a matching backup)"
    )]
    SchemaTooNew {
        /// Version recorded in the file.
        found: u32,
        /// Highest version this build understands.
        supported: u32,
    },
    /// The store has been closed, or its committer thread died.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// Whether nothing was acknowledged and a retry may succeed: the database is
    /// unreachable ([`StoreError::Unavailable`]), or the batch was rolled back because
    /// another job of it failed or it lost a race with another instance
    /// ([`StoreError::Aborted`]). Callers answer these `UNAVAILABLE`.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Aborted(_))
    }
}

/// Returned (as `Err`) by a write job to say "this transaction must not
/// commit". The whole group-commit batch is rolled back: the job gets the
/// wrapped error, the other jobs that already ran in the batch get
/// [`StoreError::Aborted`], and jobs not yet run go on in the next batch.
///
/// Every backend's errors convert into it with `?`, which is the safe default: after
/// a failed write the transaction's contents are unknown. Per-operation
/// outcomes that leave the transaction clean (not found, already exists) are
/// returned inside `Ok` instead; see [`TxnResult`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback(pub StoreError);

impl From<StoreError> for Rollback {
    fn from(e: StoreError) -> Self {
        Rollback(e)
    }
}

/// Outside a write job (a read), a [`Rollback`] is just its error.
impl From<Rollback> for StoreError {
    fn from(r: Rollback) -> Self {
        r.0
    }
}

/// Result of a store operation inside a write transaction.
///
/// Outer `Err(Rollback)`: the transaction is unusable, roll the batch back.
/// Inner `Err(StoreError)`: this operation failed *without writing anything*
/// (e.g. [`StoreError::NotFound`]); the transaction may still commit.
pub type TxnResult<T> = Result<Result<T, StoreError>, Rollback>;
