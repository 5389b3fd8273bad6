//! redb's error types as [`StoreError`] / [`Rollback`], so `?` works on redb calls in
//! this backend.

use crate::store::{Rollback, StoreError};

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Backend(e.to_string())
            }
        }
        impl From<$t> for Rollback {
            fn from(e: $t) -> Self {
                Rollback(StoreError::Backend(e.to_string()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError
);
