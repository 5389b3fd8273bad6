//! The service's error type: what a handler can fail with, before it becomes a gRPC
//! status in `api::status` (the one place that decides codes and caller-visible text).

use crate::hsm;

/// A domain error. Messages of the caller-facing variants are shown to the caller;
/// the others are logged and replaced by a generic message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller's role does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The object is in a state that forbids the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A position outside what is kept (an event seq compacted away); the message names
    /// the valid range.
    #[error("{0}")]
    OutOfRange(String),
    /// A bounded resource (open event watches) is used up; retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
    /// Stored state failed an integrity check (a wrapped seed not bound to its record:
    /// tampering or corruption). The message names the object only.
    #[error("{0}")]
    Integrity(String),
    /// A dependency (the store's database) is unreachable or the operation lost a race
    /// with another instance and was rolled back: nothing was acknowledged, the caller
    /// may retry. Detail goes to the log only.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected state; detail goes to the log only.
    #[error("{0}")]
    Internal(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

/// A store failure as a domain error, the same everywhere: a retryable one (the database
/// unreachable, a batch rolled back; see [`crate::store::StoreError::is_retryable`]) is
/// [`Error::Unavailable`], anything else [`Error::Internal`]. `what` names the caller's
/// context for the log.
pub fn store_failure(what: &str, e: crate::store::StoreError) -> Error {
    if e.is_retryable() {
        Error::Unavailable(format!("{what}: {e}"))
    } else {
        Error::Internal(format!("{what}: {e}"))
    }
}
