//! The write transaction of one group-commit batch, on the committer's connection.
//!
//! Reads of a key go to the database once, as a locking read (`SELECT ... FOR UPDATE`),
//! and are remembered; writes are kept in an overlay that later reads of the batch see,
//! and are sent at commit in a few multi-row statements per table. So a verification
//! job costs one round trip (the locking read of its credential) plus its share of the
//! batch's fixed cost (BEGIN, the flush statements, COMMIT), instead of one round trip
//! per write.
//!
//! How each key is flushed depends on what the batch knows of it:
//! * read as absent (or inserted with [`Txn::insert_new`], which does not read), now
//!   present: plain `INSERT`. If another instance inserted the same
//!   key meanwhile, the primary key refuses it (after waiting for that transaction) and
//!   the batch fails as [`StoreError::Aborted`]: never a silent overwrite of a row this
//!   batch believed absent, which is what keeps "insert if absent" exactly-once;
//! * read as present (and therefore row-locked since), or written without a read:
//!   `INSERT ... ON CONFLICT (k) DO UPDATE`;
//! * removed: `DELETE ... WHERE k = ANY($1)` (nothing for a key read as absent).
//!
//! A scan inside a batch merges the database's rows with the overlay's unflushed writes
//! in its range (no flush, no extra round trip); counts and audit ranges first flush the
//! overlay, then ask the database, which then sees the batch's own writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::MutexGuard;

use super::conn::{PgConn, Queries};
use super::PgBackend;
use crate::store::backend::BatchTxn;
use crate::store::uow::{ChainName, KeyRange, ReadTxn, Table, Txn};
use crate::store::{Rollback, StoreError};

/// What the database held for a key when the batch first touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// A locking read found no row.
    Absent,
    /// A locking read found a row (locked until the commit), or this batch flushed it.
    Present,
    /// Written without a read: unknown.
    Unknown,
}

#[derive(Debug)]
struct Slot {
    base: Base,
    /// The value as this batch sees it now.
    current: Option<Vec<u8>>,
    /// Written since the last flush.
    dirty: bool,
}

/// One open batch. Holds the committer's connection for its lifetime.
pub(super) struct PgBatch<'a> {
    backend: &'a PgBackend,
    conn: MutexGuard<'a, Option<PgConn>>,
    slots: HashMap<(Table, String), Slot>,
    /// Per chain: its last record as this batch sees it.
    audit_tail: HashMap<String, Option<(u64, Vec<u8>)>>,
    /// Audit records written since the last flush.
    audit_new: Vec<(String, u64, Vec<u8>)>,
    /// A statement failed: the transaction is unusable and must not be committed (a
    /// COMMIT of a failed PostgreSQL transaction silently rolls back).
    failed: bool,
    /// COMMIT was sent.
    ended: bool,
}

impl<'a> PgBatch<'a> {
    pub(super) fn new(backend: &'a PgBackend, conn: MutexGuard<'a, Option<PgConn>>) -> Self {
        PgBatch {
            backend,
            conn,
            slots: HashMap::new(),
            audit_tail: HashMap::new(),
            audit_new: Vec::new(),
            failed: false,
            ended: false,
        }
    }

    /// Runs `f` on the connection; any error fails the batch (and a connection error
    /// drops the connection, so the next batch reconnects).
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Queries<'_>) -> Result<T, Rollback>,
    ) -> Result<T, Rollback> {
        if self.failed {
            return Err(Rollback(StoreError::Aborted(
                "an earlier statement of this batch failed".into(),
            )));
        }
        let Some(conn) = self.conn.as_mut() else {
            self.failed = true;
            return Err(Rollback(StoreError::Unavailable(
                "the committer's PostgreSQL connection was lost".into(),
            )));
        };
        let r = f(&mut Queries { conn });
        if let Err(Rollback(e)) = &r {
            self.failed = true;
            if matches!(e, StoreError::Unavailable(_)) {
                self.backend.set_healthy(false);
            }
            if conn.is_broken() {
                *self.conn = None;
            }
        }
        r
    }

    fn flush(&mut self) -> Result<(), Rollback> {
        #[derive(Default)]
        struct Writes<'s> {
            insert: Vec<(&'s str, &'s [u8])>,
            upsert: Vec<(&'s str, &'s [u8])>,
            delete: Vec<&'s str>,
        }
        let mut by_table: BTreeMap<Table, Writes<'_>> = BTreeMap::new();
        for ((table, key), slot) in &self.slots {
            if !slot.dirty {
                continue;
            }
            let w = by_table.entry(*table).or_default();
            match (&slot.current, slot.base) {
                (Some(v), Base::Absent) => w.insert.push((key, v)),
                (Some(v), _) => w.upsert.push((key, v)),
                (None, Base::Absent) => {}
                (None, _) => w.delete.push(key),
            }
        }
        if by_table.is_empty() && self.audit_new.is_empty() {
            return Ok(());
        }
        // Sorted keys: two instances' batches lock rows in the same order, which makes
        // deadlocks between their flushes rarer.
        for w in by_table.values_mut() {
            w.insert.sort_unstable();
            w.upsert.sort_unstable();
            w.delete.sort_unstable();
        }
        let audit = std::mem::take(&mut self.audit_new);
        let Some(conn) = self.conn.as_mut() else {
            self.failed = true;
            return Err(Rollback(StoreError::Unavailable(
                "the committer's PostgreSQL connection was lost".into(),
            )));
        };
        if self.failed {
            return Err(Rollback(StoreError::Aborted(
                "an earlier statement of this batch failed".into(),
            )));
        }
        let mut q = Queries { conn };
        let r = (|| {
            for (table, w) in &by_table {
                q.delete_rows(*table, &w.delete)?;
                q.write_rows(*table, &w.insert, false)?;
                q.write_rows(*table, &w.upsert, true)?;
            }
            q.audit_insert(&audit)
        })();
        drop(by_table);
        match r {
            Ok(()) => {
                for slot in self.slots.values_mut() {
                    if slot.dirty {
                        slot.dirty = false;
                        slot.base = if slot.current.is_some() {
                            Base::Present
                        } else {
                            Base::Absent
                        };
                    }
                }
                Ok(())
            }
            Err(Rollback(e)) => {
                self.failed = true;
                if matches!(e, StoreError::Unavailable(_)) {
                    self.backend.set_healthy(false);
                }
                if self.conn.as_ref().is_some_and(PgConn::is_broken) {
                    *self.conn = None;
                }
                Err(Rollback(e))
            }
        }
    }

    /// The slot of `key`, reading it (locking) if the batch has not seen it yet.
    fn slot(&mut self, table: Table, key: &str) -> Result<&mut Slot, Rollback> {
        let id = (table, key.to_owned());
        if !self.slots.contains_key(&id) {
            let current = self.with(|q| q.get(table, key, true))?;
            let base = if current.is_some() {
                Base::Present
            } else {
                Base::Absent
            };
            self.slots.insert(
                id.clone(),
                Slot {
                    base,
                    current,
                    dirty: false,
                },
            );
        }
        Ok(self.slots.get_mut(&id).expect("slot just ensured"))
    }

    /// The keys of `keys` this batch has not seen yet, in one locking read (sorted, as
    /// the flush writes: two instances lock in the same order); each becomes a slot as
    /// [`ReadTxn::get`] makes it.
    fn read_unseen(&mut self, table: Table, keys: &[String]) -> Result<(), Rollback> {
        let mut unseen: Vec<&String> = keys
            .iter()
            .filter(|k| !self.slots.contains_key(&(table, (*k).clone())))
            .collect();
        unseen.sort_unstable();
        unseen.dedup();
        if !unseen.is_empty() {
            let wanted: Vec<&[u8]> = unseen.iter().map(|k| k.as_bytes()).collect();
            let mut found: HashMap<Vec<u8>, Vec<u8>> = self
                .with(|q| q.get_many_locking(table, &wanted))?
                .into_iter()
                .collect();
            for k in unseen {
                let current = found.remove(k.as_bytes());
                let base = if current.is_some() {
                    Base::Present
                } else {
                    Base::Absent
                };
                self.slots.insert(
                    (table, k.clone()),
                    Slot {
                        base,
                        current,
                        dirty: false,
                    },
                );
            }
        }
        Ok(())
    }

    fn tail(&mut self, chain: &str) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
        if let Some(t) = self.audit_tail.get(chain) {
            return Ok(t.clone());
        }
        let t = self.with(|q| q.audit_last(chain))?;
        self.audit_tail.insert(chain.to_owned(), t.clone());
        Ok(t)
    }
}

impl ReadTxn for PgBatch<'_> {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
        Ok(self.slot(table, key)?.current.clone())
    }

    /// The keys this batch has not seen yet in one locking read (a bulk insert's
    /// existence check is one round trip, not one per record); each becomes a slot as
    /// [`ReadTxn::get`] makes it.
    fn get_many(
        &mut self,
        table: Table,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, Rollback> {
        self.read_unseen(table, keys)?;
        Ok(keys
            .iter()
            .map(|k| self.slots[&(table, k.clone())].current.clone())
            .collect())
    }

    fn scan(
        &mut self,
        table: Table,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
        // Not flushed first: the database's rows merged with this batch's unflushed
        // writes in the range (an evidence insert's purge scans the expiry index in
        // every accepted verification's job: a flush there would cost a round trip per
        // job). `removed` more rows are asked for, so that after the batch's deletes at
        // least `limit` remain when the database has them.
        let unflushed: Vec<(String, Option<Vec<u8>>)> = self
            .slots
            .iter()
            .filter(|((t, k), slot)| *t == table && slot.dirty && range.contains(k))
            .map(|((_, k), slot)| (k.clone(), slot.current.clone()))
            .collect();
        if unflushed.is_empty() {
            return self.with(|q| q.scan(table, range, limit));
        }
        let removed = unflushed.iter().filter(|(_, v)| v.is_none()).count();
        let asked = limit.saturating_add(removed);
        let rows = self.with(|q| q.scan(table, range, asked))?;
        // The database may hold more keys past its last row than it returned: a key of
        // this batch beyond that one cannot be placed, and is left out.
        let horizon = if rows.len() >= asked {
            rows.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        let mut merged: BTreeMap<String, Vec<u8>> = rows.into_iter().collect();
        for (k, v) in unflushed {
            match v {
                Some(v) => {
                    merged.insert(k, v);
                }
                None => {
                    merged.remove(&k);
                }
            }
        }
        Ok(merged
            .into_iter()
            .filter(|(k, _)| horizon.as_ref().is_none_or(|last| k <= last))
            .take(limit)
            .collect())
    }

    fn count(&mut self, table: Table) -> Result<u64, Rollback> {
        self.flush()?;
        self.with(|q| q.count(table))
    }

    fn audit_last(&mut self, chain: &ChainName) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
        self.tail(chain)
    }

    fn audit_range(
        &mut self,
        chain: &ChainName,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
        self.flush()?;
        self.with(|q| q.audit_range(chain, from, limit))
    }

    fn audit_count(&mut self, chain: &ChainName) -> Result<u64, Rollback> {
        self.flush()?;
        self.with(|q| q.audit_count(chain))
    }

    fn audit_chains(&mut self) -> Result<Vec<String>, Rollback> {
        self.flush()?;
        self.with(|q| q.audit_chains())
    }
}

impl Txn for PgBatch<'_> {
    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), Rollback> {
        if self.failed {
            return Err(Rollback(StoreError::Aborted(
                "an earlier statement of this batch failed".into(),
            )));
        }
        let slot = self.slots.entry((table, key.to_owned())).or_insert(Slot {
            base: Base::Unknown,
            current: None,
            dirty: false,
        });
        slot.current = Some(value.to_vec());
        slot.dirty = true;
        Ok(())
    }

    /// No read: a key the batch has not seen is taken as absent and flushed with a plain
    /// `INSERT`, which the primary key refuses if it exists (the batch then fails).
    fn insert_new(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), Rollback> {
        if self.failed {
            return Err(Rollback(StoreError::Aborted(
                "an earlier statement of this batch failed".into(),
            )));
        }
        let slot = self.slots.entry((table, key.to_owned())).or_insert(Slot {
            base: Base::Absent,
            current: None,
            dirty: false,
        });
        if slot.current.is_some() {
            self.failed = true;
            return Err(Rollback(StoreError::AlreadyExists));
        }
        slot.current = Some(value.to_vec());
        slot.dirty = true;
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &str) -> Result<bool, Rollback> {
        let slot = self.slot(table, key)?;
        let existed = slot.current.is_some();
        if existed {
            slot.current = None;
            slot.dirty = true;
        }
        Ok(existed)
    }

    fn audit_put(&mut self, chain: &ChainName, seq: u64, line: &[u8]) -> Result<(), Rollback> {
        let tail = self.tail(chain)?;
        let taken_here = self
            .audit_new
            .iter()
            .any(|(c, s, _)| c.as_str() == chain && *s == seq);
        if taken_here {
            self.failed = true;
            return Err(Rollback(StoreError::Aborted(format!(
                "audit chain {chain:?}: seq {seq} is already taken in this batch"
            ))));
        }
        // A seq already in the database is refused by the primary key at the flush.
        self.audit_new.push((chain.to_owned(), seq, line.to_vec()));
        if tail.as_ref().is_none_or(|(last, _)| seq > *last) {
            self.audit_tail
                .insert(chain.to_owned(), Some((seq, line.to_vec())));
        }
        Ok(())
    }
}

impl BatchTxn for PgBatch<'_> {
    fn as_txn(&mut self) -> &mut dyn Txn {
        self
    }

    /// One locking read of the keys not seen yet (see [`PgBatch::read_unseen`]).
    fn prefetch(&mut self, table: Table, keys: &[String]) -> Result<(), Rollback> {
        self.read_unseen(table, keys)
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.flush().map_err(|Rollback(e)| e)?;
        if self.failed {
            return Err(StoreError::Aborted(
                "a statement of this batch failed; nothing was committed".into(),
            ));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(StoreError::Unavailable(
                "the committer's PostgreSQL connection was lost".into(),
            ));
        };
        self.ended = true;
        match conn.client.batch_execute("COMMIT") {
            Ok(()) => {
                self.backend.set_healthy(true);
                Ok(())
            }
            Err(e) => {
                // Lost in the middle of COMMIT: the outcome is unknown, the answer is an
                // error (never an Ok without a confirmed commit).
                let err = super::conn::map_err(&e, "commit");
                if conn.is_broken() || e.as_db_error().is_none() {
                    *self.conn = None;
                }
                if matches!(err, StoreError::Unavailable(_)) {
                    self.backend.set_healthy(false);
                }
                Err(err)
            }
        }
    }
}

impl Drop for PgBatch<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = conn.client.batch_execute("ROLLBACK") {
            tracing::warn!(error = %e, "store: PostgreSQL ROLLBACK failed; reconnecting");
            *self.conn = None;
        }
    }
}
