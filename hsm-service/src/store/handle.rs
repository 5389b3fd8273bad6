//! [`Store`]: the handle every module holds; group commit in front of any [`Backend`].

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

use super::backend::Backend;
use super::evidence::{self, EvidenceRecord};
use super::group_commit::{self, BoxedJob, Shared};
use super::uow::{ReadTxn, Table, Txn};
use super::{ops, CredentialKey, CredentialRecord, CredentialStore, Rollback, StoreError, Update};

/// Options of a [`Store`]: its group committer, and (the last three) its engine.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most jobs per commit. Bounds the latency one batch adds to its last
    /// job and the size of one transaction. Default 256.
    pub max_batch: usize,
    /// How long the committer waits for more jobs after the first one of a
    /// batch. Default 0 (commit whatever is queued at once): under load,
    /// batches form by themselves while the previous commit runs.
    pub max_batch_delay: Duration,
    /// Jobs that may wait in the queue; beyond that, writers wait in
    /// `send().await` (backpressure). Default 4096.
    pub queue_capacity: usize,
    /// Embedded engine: page cache in bytes. Default 512 MiB: more than the whole file
    /// at a million credentials (~285 MB measured), so reads stay in memory.
    pub cache_size_bytes: usize,
    /// Make every commit durable (fsync) before it is acknowledged. Default true.
    /// **Never false in production**: with false a "successful" update can vanish on a
    /// crash, which re-opens replay of accepted OTPs. Exists only so a benchmark can
    /// measure the cost of durability.
    pub durable: bool,
    /// Embedded engine: quick-repair, each commit also saves the allocator state, so the
    /// first open after a crash is almost instant instead of a full scan of the file.
    /// Costs extra writes per commit. Default false.
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

impl StoreOptions {
    /// Refuses options the committer cannot run with.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.max_batch == 0 || self.queue_capacity == 0 {
            return Err(StoreError::Invalid(
                "max_batch and queue_capacity must be at least 1".into(),
            ));
        }
        Ok(())
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

/// The durable state of the service, on any [`Backend`], with group commit.
///
/// Writes go through one committer thread (see `group_commit`): each job runs inside
/// the next batch's transaction and is answered after that transaction committed.
/// Reads run on a snapshot of committed state and never wait for writes. Not `Clone`:
/// share it as `Arc<Store>`. Dropping the last handle finishes queued jobs, stops the
/// committer and closes the backend (blocking for at most one commit).
pub struct Store {
    backend: Arc<dyn Backend>,
    sender: Option<mpsc::Sender<BoxedJob>>,
    committer: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend.kind())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store over `backend` (opened and migrated by its constructor): starts the
    /// group committer.
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        options.check()?;
        let shared = Arc::new(Shared::default());
        let (sender, rx) = mpsc::channel(options.queue_capacity);
        let cfg = group_commit::Config {
            max_batch: options.max_batch,
            max_batch_delay: options.max_batch_delay,
        };
        let committer = {
            let (backend, shared) = (backend.clone(), shared.clone());
            std::thread::Builder::new()
                .name("store-committer".into())
                .spawn(move || group_commit::run(backend, rx, cfg, shared))
                .map_err(|e| StoreError::Backend(format!("spawning committer thread: {e}")))?
        };
        Ok(Store {
            backend,
            sender: Some(sender),
            committer: Some(committer),
            shared,
        })
    }

    /// Changes after every local commit that wrote events (see `store::events`); other
    /// instances' commits are not signalled here (poll [`events::head`](super::events::head)).
    pub fn event_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.event_commits.subscribe()
    }

    /// The engine's name (`redb`, `postgres`).
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Whether the engine is reachable now.
    pub fn healthy(&self) -> bool {
        self.backend.healthy()
    }

    /// The engine itself (copying between stores, conformance tests).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
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
        F: FnOnce(&mut dyn Txn) -> Result<T, Rollback> + Send + 'static,
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

    /// Runs `f` on a read-only snapshot of committed state: on the calling task when the
    /// backend's reads do not block (embedded: memory-mapped pages, a few microseconds,
    /// cheaper than a thread hop), else on tokio's blocking pool.
    pub fn read<T, F>(&self, f: F) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn ReadTxn) -> Result<T, StoreError> + Send + 'static,
    {
        let backend = self.backend.clone();
        async move {
            if backend.reads_block() {
                tokio::task::spawn_blocking(move || read_now(&*backend, f))
                    .await
                    .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
            } else {
                read_now(&*backend, f)
            }
        }
    }

    /// [`Store::read`] on the calling thread, whatever the backend: for start-up and
    /// offline commands, and code already on a blocking thread. Never on a runtime
    /// worker with a network backend.
    pub fn read_blocking<T>(
        &self,
        f: impl FnOnce(&mut dyn ReadTxn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        read_now(&*self.backend, f)
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
    pub async fn get_evidence(&self, id: &str) -> Result<Option<EvidenceRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |txn| evidence::get_in(txn, &id)?).await
    }

    /// Number of evidence records kept (spent and expired ones until purged).
    pub async fn evidence_count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.count(Table::Evidence)?)).await
    }

    /// Reads a meta value (committed state).
    pub async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.read(move |txn| Ok(ops::get_meta(txn, &key)?)).await
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

    /// Finishes queued jobs, stops the committer and releases the backend, reporting a
    /// committer that did not stop cleanly. Blocking (at most one commit). Dropping the
    /// store does the same but can only log errors. The engine closes when its last
    /// user lets go (a read still running on a blocking thread holds it until it ends).
    pub fn close(mut self) -> Result<(), StoreError> {
        self.stop_committer()
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

    /// Jobs waiting in the queue, not yet taken by the committer (metrics; tests that
    /// need a batch to form, such as the conformance suite).
    pub fn queued(&self) -> usize {
        self.sender
            .as_ref()
            .map_or(0, |s| s.max_capacity() - s.capacity())
    }

    /// Test hook: the next `n` commits fail as if the backend's commit had failed.
    #[cfg(test)]
    pub(crate) fn fail_next_commits(&self, n: u32) {
        self.shared.fail_next_commits.store(n, Ordering::SeqCst);
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.stop_committer() {
            tracing::error!(error = %e, "store: committer did not stop cleanly");
        }
    }
}

/// Runs `f` once on a snapshot of `backend`.
fn read_now<T>(
    backend: &dyn Backend,
    f: impl FnOnce(&mut dyn ReadTxn) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut f = Some(f);
    let mut out = None;
    backend.read(&mut |txn| {
        let f = f
            .take()
            .ok_or_else(|| StoreError::Backend("read closure called twice".into()))?;
        out = Some(f(txn)?);
        Ok(())
    })?;
    out.ok_or_else(|| StoreError::Backend("the backend did not run the read".into()))
}

impl CredentialStore for Store {
    async fn insert(&self, rec: CredentialRecord) -> Result<(), StoreError> {
        self.write(move |txn| ops::insert(txn, &rec))
            .await
            .and_then(|r| r)
    }

    async fn get(&self, tenant: &str, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.read(move |txn| ops::get(txn, &tenant, &id)?).await
    }

    async fn list(
        &self,
        tenant: Option<&str>,
        after: Option<&CredentialKey>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let tenant = tenant.map(str::to_owned);
        let after = after.cloned();
        let list =
            move |txn: &mut dyn ReadTxn| ops::list(txn, tenant.as_deref(), after.as_ref(), limit);
        // A page can be large: never on a runtime worker, whatever the backend.
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || read_now(&*backend, list))
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
        E: FnOnce(&R, &mut dyn Txn) -> Result<(), Rollback> + Send + 'static,
    {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.write(move |txn| {
            let answer = ops::update(txn, &tenant, &id, f)?;
            if let Ok(value) = &answer {
                effects(value, txn)?;
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

    async fn insert_with<E>(&self, rec: CredentialRecord, effects: E) -> Result<(), StoreError>
    where
        E: FnOnce(&mut dyn Txn) -> Result<(), Rollback> + Send + 'static,
    {
        self.write(move |txn| {
            let inserted = ops::insert(txn, &rec)?;
            if inserted.is_ok() {
                effects(txn)?;
            }
            Ok(inserted)
        })
        .await
        .and_then(|r| r)
    }

    async fn delete_with<E>(&self, tenant: &str, id: &str, effects: E) -> Result<bool, StoreError>
    where
        E: FnOnce(&mut dyn Txn) -> Result<(), Rollback> + Send + 'static,
    {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.write(move |txn| {
            let existed = ops::delete(txn, &tenant, &id)?;
            if existed {
                effects(txn)?;
            }
            Ok(existed)
        })
        .await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(ops::count(txn)?)).await
    }

    async fn insert_many(&self, recs: Vec<CredentialRecord>) -> Result<(), StoreError> {
        Store::insert_many(self, recs).await
    }
}
