//! [`EmbeddedStore`]: the credential store in one redb file.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use tokio::sync::mpsc;

use super::evidence::{self, EvidenceRecord};
use super::group_commit::{self, BoxedJob, Shared};
use super::record::{decode, decode_keyed, key, tenant_range, DEFAULT_TENANT};
use super::tables::{
    self, CREDENTIALS, EVIDENCE, LEGACY_CREDENTIALS, META, SCHEMA_VERSION, SCHEMA_VERSION_KEY,
};
use super::{
    ops, CredentialKey, CredentialRecord, CredentialStore, Effects, Rollback, StoreError, Update,
};

/// Options of [`EmbeddedStore::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most jobs per commit. Bounds the latency one batch adds to its last
    /// job and the size of one transaction. Default 256.
    pub max_batch: usize,
    /// How long the committer waits for more jobs after the first one of a
    /// batch. Default 0 (commit whatever is queued at once): under load,
    /// batches form by themselves while the previous fsync runs.
    pub max_batch_delay: Duration,
    /// Jobs that may wait in the queue; beyond that, writers wait in
    /// `send().await` (backpressure). Default 4096.
    pub queue_capacity: usize,
    /// redb page cache in bytes. Default 512 MiB: more than the whole file at
    /// a million credentials (~285 MB measured), so reads stay in memory.
    pub cache_size_bytes: usize,
    /// fsync every commit. Default true. **Never false in production**: with
    /// false a "successful" update can vanish on a crash, which re-opens
    /// replay of accepted OTPs. Exists only so a benchmark can measure fsync.
    pub durable: bool,
    /// redb quick-repair: each commit also saves the allocator state, so the
    /// first open after a crash is almost instant instead of a full scan of
    /// the file. Costs extra writes per commit. Default false.
    pub quick_repair: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_batch: 256,
            max_batch_delay: Duration::ZERO,
            queue_capacity: 4096,
            cache_size_bytes: 512 << 20,
            durable: true,
            quick_repair: false,
        }
    }
}

/// Counters of the group-commit engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Successful commits.
    pub commits: u64,
    /// Jobs answered `Ok` after a successful commit.
    pub committed_jobs: u64,
    /// Batches that were rolled back or whose commit failed.
    pub failed_batches: u64,
}

/// The embedded, single-file credential store (redb) with group commit.
///
/// Writes go through one committer thread (see `group_commit`); reads use
/// their own read transaction (MVCC snapshot of the last commit) and never
/// wait for writes. Not `Clone`: share it as `Arc<EmbeddedStore>`. Dropping
/// the last handle finishes queued jobs, stops the committer and closes the
/// file (blocking for at most one commit).
pub struct EmbeddedStore {
    db: Arc<Database>,
    sender: Option<mpsc::Sender<BoxedJob>>,
    committer: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (creating if missing) the data file at `path`, whose directory
    /// must exist. Checks the schema version recorded in the meta table and
    /// refuses a newer one with [`StoreError::SchemaTooNew`], without writing.
    /// An older one is migrated in one transaction before anything else runs
    /// (schema 1 -> 2: every credential moves to the tenant
    /// [`DEFAULT_TENANT`], its id unchanged).
    /// After a crash this includes redb's repair, which scans the whole file
    /// unless `quick_repair` was on. Blocking: call it before serving, or via
    /// `spawn_blocking`.
    pub fn open(path: &Path, options: StoreOptions) -> Result<EmbeddedStore, StoreError> {
        if options.max_batch == 0 || options.queue_capacity == 0 {
            return Err(StoreError::Invalid(
                "max_batch and queue_capacity must be at least 1".into(),
            ));
        }
        let db = Database::builder()
            .set_cache_size(options.cache_size_bytes)
            .create(path)?;
        let found = check_schema(&db)?;
        // Create missing tables, migrate, and record the schema, durably,
        // before any job can run.
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(options.quick_repair);
        tables::create_all(&txn)?;
        if found == Some(1) {
            let moved = migrate_v1_credentials(&txn)?;
            tracing::info!(
                credentials = moved,
                tenant = DEFAULT_TENANT,
                "store schema 1 -> 2: credentials moved to the default tenant"
            );
        }
        if found != Some(SCHEMA_VERSION) {
            txn.open_table(META)?
                .insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION.to_le_bytes().as_slice())?;
        }
        txn.commit()?;

        let db = Arc::new(db);
        let shared = Arc::new(Shared::default());
        let (sender, rx) = mpsc::channel(options.queue_capacity);
        let cfg = group_commit::Config {
            max_batch: options.max_batch,
            max_batch_delay: options.max_batch_delay,
            durable: options.durable,
            quick_repair: options.quick_repair,
        };
        if !options.durable {
            tracing::warn!(
                "credential store opened with durable=false: benchmark only, never production"
            );
        }
        let committer = {
            let (db, shared) = (db.clone(), shared.clone());
            std::thread::Builder::new()
                .name("store-committer".into())
                .spawn(move || group_commit::run(db, rx, cfg, shared))
                .map_err(|e| StoreError::Backend(format!("spawning committer thread: {e}")))?
        };
        Ok(EmbeddedStore {
            db,
            sender: Some(sender),
            committer: Some(committer),
            shared,
        })
    }

    /// Runs `f` inside the next group-commit batch's write transaction and
    /// resolves once that transaction is durably committed (or failed).
    ///
    /// This is the generic entry point other modules use to put their own
    /// table writes into the same batch, combined with [`ops`] calls in one
    /// closure when they must commit atomically with a credential change.
    /// `f` runs on the committer thread, so it must be quick and must not
    /// block on anything async. Returning `Err(Rollback)` (or panicking) rolls
    /// back the whole batch: see [`Rollback`]. If the future is dropped after
    /// the job was queued, the job still runs and may commit.
    pub fn write<T, F>(&self, f: F) -> impl Future<Output = Result<T, StoreError>> + Send + '_
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, Rollback> + Send + 'static,
    {
        let (job, rx) = group_commit::job(f);
        async move {
            let sender = self.sender.as_ref().ok_or(StoreError::Closed)?;
            sender.send(job).await.map_err(|_| StoreError::Closed)?;
            // A dropped reply means the committer died mid-batch: the job was
            // not committed (the batch's transaction never committed).
            rx.await.map_err(|_| StoreError::Closed)?
        }
    }

    /// Runs `f` on a read transaction (snapshot of the last commit), on the
    /// calling thread. For other modules' tables; keep it short, or call it
    /// from `spawn_blocking` for long scans.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_read()?;
        f(&txn)
    }

    /// Inserts many records in one transaction, all or none:
    /// [`StoreError::AlreadyExists`] if any id is taken or repeated. For
    /// imports and benchmarks; keep chunks to a few thousand records, since
    /// the committer runs nothing else meanwhile.
    pub async fn insert_many(&self, recs: Vec<CredentialRecord>) -> Result<(), StoreError> {
        self.write(move |txn| ops::insert_many(txn, &recs))
            .await
            .and_then(|r| r)
    }

    /// Reads an evidence record (committed state).
    pub fn get_evidence(&self, id: &str) -> Result<Option<EvidenceRecord>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(EVIDENCE)?;
            let guard = table.get(id)?;
            guard.map(|g| evidence::decode(id, g.value())).transpose()
        })
    }

    /// Number of evidence records kept (spent and expired ones until purged).
    pub fn evidence_count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(EVIDENCE)?.len()?))
    }

    /// Reads a meta value (committed state).
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(META)?;
            let v = table.get(key)?.map(|g| g.value().to_vec());
            Ok(v)
        })
    }

    /// Durably sets a meta value. Keys starting with `store.` are reserved
    /// ([`StoreError::Invalid`]).
    pub async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write(move |txn| ops::put_meta(txn, &key, &value))
            .await
            .and_then(|r| r)
    }

    /// Successful commits so far (one per batch).
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// All group-commit counters.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            committed_jobs: self.shared.committed_jobs.load(Ordering::Relaxed),
            failed_batches: self.shared.failed_batches.load(Ordering::Relaxed),
        }
    }

    /// Finishes queued jobs, stops the committer and closes the file,
    /// reporting a failure to close cleanly. Blocking (at most one commit).
    /// Dropping the store does the same but can only log errors.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.stop_committer()?;
        let db = self.db.clone();
        drop(self);
        match Arc::try_unwrap(db) {
            Ok(db) => db.close().map_err(StoreError::from),
            // A `list` still running on a blocking thread holds the file; it
            // closes when that finishes.
            Err(_) => Ok(()),
        }
    }

    fn stop_committer(&mut self) -> Result<(), StoreError> {
        // Closing the channel lets the committer drain what is queued and exit.
        drop(self.sender.take());
        match self.committer.take() {
            Some(h) => h
                .join()
                .map_err(|_| StoreError::Backend("committer thread panicked".into())),
            None => Ok(()),
        }
    }

    /// Jobs waiting in the queue (for tests that need a batch to form).
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.sender
            .as_ref()
            .map_or(0, |s| s.max_capacity() - s.capacity())
    }

    /// Test hook: the next `n` commits fail as if redb's commit had failed.
    #[cfg(test)]
    pub(super) fn fail_next_commits(&self, n: u32) {
        self.shared.fail_next_commits.store(n, Ordering::SeqCst);
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Err(e) = self.stop_committer() {
            tracing::error!(error = %e, "store: committer did not stop cleanly");
        }
    }
}

/// The schema version of the file (`None`: fresh); refuses a file whose schema
/// is newer than this build, before writing.
fn check_schema(db: &Database) -> Result<Option<u32>, StoreError> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
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
/// table. One transaction, so a crash leaves either schema, never a mix.
fn migrate_v1_credentials(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let mut moved = 0u64;
    {
        let legacy = txn.open_table(LEGACY_CREDENTIALS)?;
        let mut table = txn.open_table(CREDENTIALS)?;
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

impl CredentialStore for EmbeddedStore {
    async fn insert(&self, rec: CredentialRecord) -> Result<(), StoreError> {
        self.write(move |txn| ops::insert(txn, &rec))
            .await
            .and_then(|r| r)
    }

    /// Runs on the calling thread: one B-tree lookup in a snapshot, a few
    /// microseconds from the page cache, cheaper than a `spawn_blocking` hop.
    async fn get(&self, tenant: &str, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(CREDENTIALS)?;
            let guard = table.get(key(tenant, id).as_str())?;
            guard.map(|g| decode(tenant, id, g.value())).transpose()
        })
    }

    /// Runs on tokio's blocking pool: a page can be large and must not stall
    /// a runtime worker.
    async fn list(
        &self,
        tenant: Option<&str>,
        after: Option<&CredentialKey>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let db = self.db.clone();
        let tenant = tenant.map(str::to_owned);
        let after = after.cloned();
        tokio::task::spawn_blocking(move || {
            list_blocking(&db, tenant.as_deref(), after.as_ref(), limit)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("list task failed: {e}")))?
    }

    async fn update<R, F>(&self, tenant: &str, id: &str, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut CredentialRecord) -> Update<R> + Send + 'static,
    {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.write(move |txn| ops::update(txn, &tenant, &id, f))
            .await
            .and_then(|r| r)
    }

    async fn update_with<R, F, E>(
        &self,
        tenant: &str,
        id: &str,
        f: F,
        effects: E,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut CredentialRecord) -> Update<R> + Send + 'static,
        E: FnOnce(&R) -> Effects + Send + 'static,
    {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.write(move |txn| {
            let answer = ops::update(txn, &tenant, &id, f)?;
            if let Ok(value) = &answer {
                let Effects { audit, evidence } = effects(value);
                if let Some(e) = evidence {
                    evidence::insert_in(txn, &e, e.auth_time)?;
                }
                if let Some(event) = audit {
                    crate::audit::log::append_in(txn, event)?;
                }
            }
            Ok(answer)
        })
        .await
        .and_then(|r| r)
    }

    async fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.write(move |txn| ops::delete(txn, &tenant, &id)).await
    }

    async fn insert_audited(
        &self,
        rec: CredentialRecord,
        audit: crate::audit::Event,
    ) -> Result<(), StoreError> {
        self.write(move |txn| {
            let inserted = ops::insert(txn, &rec)?;
            if inserted.is_ok() {
                crate::audit::log::append_in(txn, audit)?;
            }
            Ok(inserted)
        })
        .await
        .and_then(|r| r)
    }

    async fn delete_audited(
        &self,
        tenant: &str,
        id: &str,
        audit: crate::audit::Event,
    ) -> Result<bool, StoreError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.write(move |txn| {
            let existed = ops::delete(txn, &tenant, &id)?;
            if existed {
                crate::audit::log::append_in(txn, audit)?;
            }
            Ok(existed)
        })
        .await
    }

    /// O(1): redb keeps each table's length in its root.
    async fn count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(CREDENTIALS)?.len()?))
    }

    async fn insert_many(&self, recs: Vec<CredentialRecord>) -> Result<(), StoreError> {
        EmbeddedStore::insert_many(self, recs).await
    }
}

fn list_blocking(
    db: &Database,
    tenant: Option<&str>,
    after: Option<&CredentialKey>,
    limit: usize,
) -> Result<Vec<CredentialRecord>, StoreError> {
    use std::ops::Bound;
    let txn = db.begin_read()?;
    let table = txn.open_table(CREDENTIALS)?;
    let after = after.map(|a| key(&a.tenant, &a.id));
    let scope = tenant.map(tenant_range);
    let lower = match (&after, &scope) {
        (Some(a), Some((start, _))) if a.as_str() < start.as_str() => {
            Bound::Included(start.as_str())
        }
        (Some(a), _) => Bound::Excluded(a.as_str()),
        (None, Some((start, _))) => Bound::Included(start.as_str()),
        (None, None) => Bound::Unbounded,
    };
    let upper = match &scope {
        Some((_, end)) => Bound::Excluded(end.as_str()),
        None => Bound::Unbounded,
    };
    let mut out = Vec::with_capacity(limit.min(1024));
    if let (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(u)) = (lower, upper) {
        if l >= u {
            return Ok(out);
        }
    }
    for item in table.range::<&str>((lower, upper))?.take(limit) {
        let (k, v) = item?;
        out.push(decode_keyed(k.value(), v.value())?);
    }
    Ok(out)
}
