//! What a storage engine implements: batches for the group committer, snapshots for
//! readers. `store/redb/` and `store/postgres/` are the two implementations; the rest of
//! `store` (the [`super::Store`] handle, group commit, typed operations) is written once
//! against these traits.

use super::uow::{ReadTxn, Table, Txn};
use super::{Rollback, StoreError};

/// One open write transaction of the group committer. Dropping it without
/// [`BatchTxn::commit`] rolls it back.
pub trait BatchTxn: Txn {
    /// This transaction as the jobs see it (implement as `self`). Spelled out rather
    /// than left to trait upcasting, which needs Rust 1.86 (the workspace's MSRV is 1.85).
    fn as_txn(&mut self) -> &mut dyn Txn;

    /// Reads `keys` of `table` ahead of the jobs that declared them, so that their
    /// [`ReadTxn::get`]s are answered from this transaction: with the same (locking)
    /// semantics as those gets, only all at once. Default: nothing (an engine whose
    /// reads are memory lookups gains nothing from it). `keys` may repeat and be in any
    /// order.
    fn prefetch(&mut self, table: Table, keys: &[String]) -> Result<(), Rollback> {
        let _ = (table, keys);
        Ok(())
    }

    /// Makes everything written durable (redb: fsync; PostgreSQL: COMMIT with
    /// `synchronous_commit = on`), or fails and keeps nothing.
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// A storage engine. Object safe: the [`super::Store`] handle holds an `Arc<dyn Backend>`.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and `hsmctl status` (`redb`, `postgres`).
    fn kind(&self) -> &'static str;

    /// Begins the write transaction of one group-commit batch. Called only from the
    /// committer thread, one batch at a time; may block (network, disk).
    fn begin_batch(&self) -> Result<Box<dyn BatchTxn + '_>, StoreError>;

    /// Runs `f` on a read-only snapshot of committed state, on the calling thread. May
    /// block: async callers go through [`super::Store::read`], which moves the call to a
    /// blocking thread when [`Backend::reads_block`] says so.
    fn read(
        &self,
        f: &mut dyn FnMut(&mut dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;

    /// The committed value at `key`: [`Backend::read`] of one [`ReadTxn::get`] (the
    /// default). A backend may answer it with a single statement (PostgreSQL: one
    /// autocommit `SELECT`, which is its own consistent snapshot, instead of `BEGIN`,
    /// `SELECT`, `COMMIT`). Blocking like [`Backend::read`]; async callers go through
    /// [`super::Store::get_committed`].
    fn get_committed(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut out = None;
        self.read(&mut |txn| {
            out = txn.get(table, key)?;
            Ok(())
        })?;
        Ok(out)
    }

    /// Whether [`Backend::read`] waits on I/O (network) rather than memory-mapped pages.
    fn reads_block(&self) -> bool;

    /// Whether the engine is reachable now (health: NOT_SERVING when not).
    fn healthy(&self) -> bool {
        true
    }
}
