//! The embedded backend: every table in one redb file in the data directory.
//!
//! [`RedbBackend`] implements [`Backend`]: a group-commit batch is one redb write
//! transaction (redb has one writer, so every read inside it is a locking read), a read
//! is one MVCC snapshot on the calling thread (memory-mapped pages: it does not block).
//! Open it through [`Store::open_redb`].
//!
//! The file keeps the layout of earlier releases: each [`Table`] is the redb table of
//! the same name (`&str -> &[u8]`), the audit log its `u64 -> &[u8]` table, which is the
//! single chain [`DEFAULT_CHAIN`]: an embedded store serves one instance.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    WriteTransaction,
};

use super::backend::{Backend, BatchTxn};
use super::evidence;
use super::record::{decode, key, DEFAULT_TENANT};
use super::uow::{ChainName, KeyRange, ReadTxn, Table, Txn, DEFAULT_CHAIN};
use super::{Rollback, Store, StoreError, StoreOptions};

mod error;
mod tables;
#[cfg(test)]
mod tests;

use tables::{
    create_all, def, AUDIT_LOG, LEGACY_CREDENTIALS, LEGACY_EVIDENCE_EXPIRY, SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
};

/// The data file's name in the data directory.
pub const FILE_NAME: &str = "store.redb";

impl Store {
    /// Opens (creating if missing) the embedded store at `path`, whose directory must
    /// exist: [`RedbBackend::open`], then the group committer.
    pub fn open_redb(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        options.check()?;
        let backend = RedbBackend::open(path, &options)?;
        Store::with_backend(Arc::new(backend), options)
    }
}

/// The embedded storage engine (one redb file).
pub struct RedbBackend {
    db: Database,
    durable: bool,
    quick_repair: bool,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend")
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

impl RedbBackend {
    /// Opens (creating if missing) the data file at `path`. Checks the schema version
    /// recorded in the meta table and refuses a newer one with
    /// [`StoreError::SchemaTooNew`], without writing. An older one is migrated in one
    /// transaction before anything else runs (schema 1 -> 2: every credential moves to
    /// the tenant [`DEFAULT_TENANT`], its id unchanged; 2 -> 3: the evidence expiry index
    /// is rebuilt with text keys). After a crash this includes redb's repair, which
    /// scans the whole file unless `quick_repair` was on. Blocking.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<RedbBackend, StoreError> {
        let db = match Database::builder()
            .set_cache_size(options.cache_size_bytes)
            .create(path)
        {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Backend(
                    "in use by another hsm-service process (the embedded store serves one \
                     instance; several instances share a PostgreSQL store: [store] backend = \
                     \"postgres\", or `hsm-service dev --postgres URL`)"
                        .into(),
                ))
            }
            other => other?,
        };
        let found = check_schema(&db)?;
        // Migrate, create missing tables and record the schema, durably, before any job
        // can run. One transaction: a crash leaves either schema, never a mix.
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(options.quick_repair);
        // Schema 3 -> 4 -> 5 only add tables (the event outbox; the app authenticator),
        // which `create_all` creates.
        let old = found.filter(|&v| v < 3);
        if old.is_some() {
            // Its key type changed; the new one is created (same name) by `create_all`.
            txn.delete_table(LEGACY_EVIDENCE_EXPIRY)?;
        }
        create_all(&txn)?;
        if old == Some(1) {
            let moved = migrate_v1_credentials(&txn)?;
            tracing::info!(
                credentials = moved,
                tenant = DEFAULT_TENANT,
                "store schema 1 -> 2: credentials moved to the default tenant"
            );
        }
        if let Some(v) = old {
            let indexed = rebuild_evidence_expiry(&txn)?;
            tracing::info!(
                evidence = indexed,
                "store schema {v} -> 3: evidence expiry index rebuilt"
            );
        }
        if found != Some(SCHEMA_VERSION) {
            // Every store holds the event head from its creation on (as PostgreSQL's
            // migration 2 creates it), so copies between backends match row for row.
            let mut meta = txn.open_table(def(Table::Meta))?;
            if meta.get(crate::store::events::HEAD_KEY)?.is_none() {
                meta.insert(
                    crate::store::events::HEAD_KEY,
                    0u64.to_le_bytes().as_slice(),
                )?;
            }
            drop(meta);
            txn.open_table(def(Table::Meta))?
                .insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        if !options.durable {
            tracing::warn!("store opened with durable=false: benchmark only, never production");
        }
        Ok(RedbBackend {
            db,
            durable: options.durable,
            quick_repair: options.quick_repair,
        })
    }
}

impl Backend for RedbBackend {
    fn kind(&self) -> &'static str {
        "redb"
    }

    fn begin_batch(&self) -> Result<Box<dyn BatchTxn + '_>, StoreError> {
        let mut txn = self.db.begin_write()?;
        if !self.durable {
            txn.set_durability(Durability::None)?;
        }
        txn.set_quick_repair(self.quick_repair);
        Ok(Box::new(RedbBatch(Some(txn))))
    }

    fn read(
        &self,
        f: &mut dyn FnMut(&mut dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read()?;
        f(&mut RedbRead(txn))
    }

    fn reads_block(&self) -> bool {
        false
    }
}

/// The schema version of the file (`None`: fresh); refuses a file whose schema
/// is newer than this build, before writing.
fn check_schema(db: &Database) -> Result<Option<u32>, StoreError> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(def(Table::Meta)) {
        Ok(t) => t,
        // Fresh file: `open` creates the tables next.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(v) = meta.get(SCHEMA_VERSION_KEY)? else {
        return Ok(None);
    };
    let bytes: [u8; 4] = v.value().try_into().map_err(|_| {
        StoreError::Corrupt(format!("meta {SCHEMA_VERSION_KEY:?}: expected 4 bytes"))
    })?;
    let found = u32::from_le_bytes(bytes);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == 0 {
        return Err(StoreError::Corrupt(format!(
            "meta {SCHEMA_VERSION_KEY:?} is 0"
        )));
    }
    Ok(Some(found))
}

/// Schema 1 -> 2: copy every record of the id-keyed table under the tenant
/// [`DEFAULT_TENANT`] (values unchanged: format 1 still decodes), then drop the old
/// table.
fn migrate_v1_credentials(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let mut moved = 0u64;
    {
        let legacy = txn.open_table(LEGACY_CREDENTIALS)?;
        let mut table = txn.open_table(def(Table::Credentials))?;
        for item in legacy.iter()? {
            let (k, v) = item?;
            // Decoding checks each value before it moves, so a corrupt record
            // stops the migration instead of being carried along.
            decode(DEFAULT_TENANT, k.value(), v.value())?;
            table.insert(key(DEFAULT_TENANT, k.value()).as_str(), v.value())?;
            moved += 1;
        }
    }
    txn.delete_table(LEGACY_CREDENTIALS)?;
    Ok(moved)
}

/// Schema 2 -> 3: the (now empty) text-keyed expiry index gets one entry per evidence
/// record. Every record is decoded, so a corrupt one stops the migration.
fn rebuild_evidence_expiry(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let records = txn.open_table(def(Table::Evidence))?;
    let mut index = txn.open_table(def(Table::EvidenceExpiry))?;
    let mut n = 0u64;
    for item in records.iter()? {
        let (k, v) = item?;
        let e = evidence::decode(k.value(), v.value())?;
        index.insert(
            evidence::expiry_key(e.expires_at, &e.id).as_str(),
            [].as_slice(),
        )?;
        n += 1;
    }
    Ok(n)
}

/// One group-commit batch: a redb write transaction. `None` once committed; dropping it
/// uncommitted aborts it.
struct RedbBatch(Option<WriteTransaction>);

impl RedbBatch {
    fn txn(&self) -> Result<&WriteTransaction, Rollback> {
        self.0
            .as_ref()
            .ok_or_else(|| Rollback(StoreError::Aborted("transaction already ended".into())))
    }
}

impl Drop for RedbBatch {
    fn drop(&mut self) {
        if let Some(txn) = self.0.take() {
            if let Err(e) = txn.abort() {
                tracing::warn!(error = %e, "store: aborting the batch transaction failed");
            }
        }
    }
}

impl BatchTxn for RedbBatch {
    fn as_txn(&mut self) -> &mut dyn Txn {
        self
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let txn = self
            .0
            .take()
            .ok_or_else(|| StoreError::Aborted("transaction already ended".into()))?;
        txn.commit()
            .map_err(|e| StoreError::Backend(format!("commit failed: {e}")))
    }
}

/// A read-only snapshot.
struct RedbRead(ReadTransaction);

/// Refuses every chain but the one an embedded store has.
fn check_chain(chain: &ChainName) -> Result<(), Rollback> {
    if chain == DEFAULT_CHAIN {
        Ok(())
    } else {
        Err(Rollback(StoreError::Invalid(format!(
            "the embedded store keeps one audit chain, {DEFAULT_CHAIN:?}; there is no chain {chain:?}"
        ))))
    }
}

/// `range` as redb bounds; `None` when it is empty (redb wants `start <= end`).
fn bounds(range: &KeyRange) -> Option<(Bound<&str>, Bound<&str>)> {
    let lower = if range.after {
        Bound::Excluded(range.start.as_str())
    } else {
        Bound::Included(range.start.as_str())
    };
    let upper = match &range.end {
        Some(end) => {
            if range.start.as_str() >= end.as_str() {
                return None;
            }
            Bound::Excluded(end.as_str())
        }
        None => Bound::Unbounded,
    };
    Some((lower, upper))
}

fn get_in<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    key: &str,
) -> Result<Option<Vec<u8>>, Rollback> {
    Ok(table.get(key)?.map(|g| g.value().to_vec()))
}

fn scan_in<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    range: &KeyRange,
    limit: usize,
) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
    let Some(b) = bounds(range) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(limit.min(1024));
    for item in table.range::<&str>(b)?.take(limit) {
        let (k, v) = item?;
        out.push((k.value().to_owned(), v.value().to_vec()));
    }
    Ok(out)
}

fn audit_last_in<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
    Ok(table.last()?.map(|(k, v)| (k.value(), v.value().to_vec())))
}

fn audit_range_in<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
    from: u64,
    limit: usize,
) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
    let mut out = Vec::new();
    for item in table.range(from..)?.take(limit) {
        let (k, v) = item?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(out)
}

fn chains_of(count: u64) -> Vec<String> {
    if count == 0 {
        Vec::new()
    } else {
        vec![DEFAULT_CHAIN.to_owned()]
    }
}

impl ReadTxn for RedbBatch {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
        get_in(&self.txn()?.open_table(def(table))?, key)
    }

    fn scan(
        &mut self,
        table: Table,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
        scan_in(&self.txn()?.open_table(def(table))?, range, limit)
    }

    fn count(&mut self, table: Table) -> Result<u64, Rollback> {
        Ok(self.txn()?.open_table(def(table))?.len()?)
    }

    fn audit_last(&mut self, chain: &ChainName) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
        check_chain(chain)?;
        audit_last_in(&self.txn()?.open_table(AUDIT_LOG)?)
    }

    fn audit_range(
        &mut self,
        chain: &ChainName,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
        check_chain(chain)?;
        audit_range_in(&self.txn()?.open_table(AUDIT_LOG)?, from, limit)
    }

    fn audit_count(&mut self, chain: &ChainName) -> Result<u64, Rollback> {
        check_chain(chain)?;
        Ok(self.txn()?.open_table(AUDIT_LOG)?.len()?)
    }

    fn audit_chains(&mut self) -> Result<Vec<String>, Rollback> {
        Ok(chains_of(self.txn()?.open_table(AUDIT_LOG)?.len()?))
    }
}

impl Txn for RedbBatch {
    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), Rollback> {
        self.txn()?.open_table(def(table))?.insert(key, value)?;
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &str) -> Result<bool, Rollback> {
        Ok(self.txn()?.open_table(def(table))?.remove(key)?.is_some())
    }

    fn audit_put(&mut self, chain: &ChainName, seq: u64, line: &[u8]) -> Result<(), Rollback> {
        check_chain(chain)?;
        let mut table = self.txn()?.open_table(AUDIT_LOG)?;
        if table.get(seq)?.is_some() {
            return Err(Rollback(StoreError::Invalid(format!(
                "audit chain {chain:?} already holds seq {seq}"
            ))));
        }
        table.insert(seq, line)?;
        Ok(())
    }
}

impl ReadTxn for RedbRead {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
        get_in(&self.0.open_table(def(table))?, key)
    }

    fn scan(
        &mut self,
        table: Table,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
        scan_in(&self.0.open_table(def(table))?, range, limit)
    }

    fn count(&mut self, table: Table) -> Result<u64, Rollback> {
        Ok(self.0.open_table(def(table))?.len()?)
    }

    fn audit_last(&mut self, chain: &ChainName) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
        check_chain(chain)?;
        audit_last_in(&self.0.open_table(AUDIT_LOG)?)
    }

    fn audit_range(
        &mut self,
        chain: &ChainName,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
        check_chain(chain)?;
        audit_range_in(&self.0.open_table(AUDIT_LOG)?, from, limit)
    }

    fn audit_count(&mut self, chain: &ChainName) -> Result<u64, Rollback> {
        check_chain(chain)?;
        Ok(self.0.open_table(AUDIT_LOG)?.len()?)
    }

    fn audit_chains(&mut self) -> Result<Vec<String>, Rollback> {
        Ok(chains_of(self.0.open_table(AUDIT_LOG)?.len()?))
    }
}
