//! Group commit: one committer thread turns many concurrent writes into few
//! fsyncs.
//!
//! Callers send boxed jobs over a bounded channel (bounded so that a slow disk
//! pushes back on callers through `send().await` instead of growing memory).
//! The committer takes the first job, drains whatever else is already queued
//! (up to `max_batch`, optionally waiting `max_batch_delay` for more), runs the
//! jobs in arrival order inside ONE write transaction, commits once, and only
//! then answers every job. Later jobs see earlier jobs' writes because they
//! share the transaction.
//!
//! Failure rules (nothing is ever reported done unless its commit succeeded):
//! * commit fails: every job of the batch gets the commit error;
//! * a job returns `Err(Rollback)` or panics: the transaction is aborted, that
//!   job gets its error, jobs that already ran get [`StoreError::Aborted`],
//!   and jobs not yet run stay queued for the next transaction.
//!
//! Panics: each job runs under `catch_unwind`, because a job may have written
//! part of its changes before panicking and the only safe reaction is to roll
//! back the batch; the committer itself survives. The store's own update path
//! additionally runs the caller's closure on a detached copy before writing,
//! so a panicking verification closure costs only its own call (see
//! `ops::update`). If the binary is built with `panic = "abort"`, a panic
//! aborts the process instead; nothing of the open batch was committed then.
//!
//! It is a `std::thread`, not a tokio task: commit blocks on fsync (or a network
//! round trip) for milliseconds, which must not stall a runtime worker.
//!
//! Prefetch: a job may declare the keys it will read (a credential update knows its
//! (tenant, id) before its closure runs). The committer reads the declared keys of the
//! whole batch at its start with [`BatchTxn::prefetch`] (PostgreSQL: ONE
//! `SELECT ... WHERE k = ANY($1) ORDER BY k FOR UPDATE` per table instead of one locking
//! read per job, each on the committer's critical path). The locks are the same ones the
//! jobs' reads would take, only earlier and in key order; a failed prefetch (a lock
//! timeout, a deadlock with another instance) fails every job of the batch.
//!
//! Backend-neutral: the committer holds an `Arc<dyn Backend>` and only calls
//! [`Backend::begin_batch`], [`BatchTxn::prefetch`], the jobs, and [`BatchTxn::commit`].

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::backend::{Backend, BatchTxn};
use super::uow::{ChainName, KeyRange, ReadTxn, Table, Txn};
use super::{Rollback, StoreError};

/// Counters shared between the committer and the store handle.
pub(super) struct Shared {
    /// Bumped after every commit that wrote to [`Table::Events`]: wakes local event
    /// watchers (commits of other instances are seen by their poll of the head).
    pub(super) event_commits: tokio::sync::watch::Sender<u64>,
    pub(super) commits: AtomicU64,
    pub(super) committed_jobs: AtomicU64,
    pub(super) failed_batches: AtomicU64,
    /// Test hook: fail this many upcoming commits as if the backend's commit failed
    /// (the batch is rolled back instead of committed; no engine offers a way to make a
    /// real commit fail on demand).
    #[cfg(test)]
    pub(super) fail_next_commits: std::sync::atomic::AtomicU32,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            event_commits: tokio::sync::watch::Sender::new(0),
            commits: AtomicU64::new(0),
            committed_jobs: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_commits: Default::default(),
        }
    }
}

/// The batch transaction as the jobs see it, noting whether any job wrote an event. It
/// forwards every method, the provided ones too, so a backend's own versions (one
/// statement for `get_many`, no existence read for `insert_new`) stay in effect.
struct Tracking<'a> {
    inner: &'a mut dyn Txn,
    wrote_events: bool,
    /// Audit records written (counted once their batch commits).
    audit_records: u64,
}

impl ReadTxn for Tracking<'_> {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
        self.inner.get(table, key)
    }
    fn get_many(
        &mut self,
        table: Table,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, Rollback> {
        self.inner.get_many(table, keys)
    }
    fn scan(
        &mut self,
        table: Table,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
        self.inner.scan(table, range, limit)
    }
    fn count(&mut self, table: Table) -> Result<u64, Rollback> {
        self.inner.count(table)
    }
    fn audit_last(&mut self, chain: &ChainName) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
        self.inner.audit_last(chain)
    }
    fn audit_range(
        &mut self,
        chain: &ChainName,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
        self.inner.audit_range(chain, from, limit)
    }
    fn audit_count(&mut self, chain: &ChainName) -> Result<u64, Rollback> {
        self.inner.audit_count(chain)
    }
    fn audit_chains(&mut self) -> Result<Vec<String>, Rollback> {
        self.inner.audit_chains()
    }
}

impl Txn for Tracking<'_> {
    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), Rollback> {
        self.wrote_events |= table == Table::Events;
        self.inner.put(table, key, value)
    }
    fn insert_new(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), Rollback> {
        self.wrote_events |= table == Table::Events;
        self.inner.insert_new(table, key, value)
    }
    fn delete(&mut self, table: Table, key: &str) -> Result<bool, Rollback> {
        self.inner.delete(table, key)
    }
    fn audit_put(&mut self, chain: &ChainName, seq: u64, line: &[u8]) -> Result<(), Rollback> {
        self.audit_records += 1;
        self.inner.audit_put(chain, seq, line)
    }
}

/// A type-erased write job.
pub(super) trait Job: Send {
    /// Runs the job inside the batch transaction; `Err` rolls the batch back.
    fn run(&mut self, txn: &mut dyn Txn) -> Result<(), StoreError>;
    /// Answers the caller: `Ok` only after the batch committed.
    fn finish(self: Box<Self>, outcome: Result<(), StoreError>);
    /// Keys the job will read, declared up front: the committer reads those of the
    /// whole batch at its start ([`BatchTxn::prefetch`]).
    fn prefetch(&self) -> &[(Table, String)];
}

/// The boxed job the channel carries.
pub(super) type BoxedJob = Box<dyn Job>;

struct TypedJob<T, F> {
    prefetch: Vec<(Table, String)>,
    f: Option<F>,
    out: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: FnOnce(&mut dyn Txn) -> Result<T, Rollback> + Send,
{
    fn run(&mut self, txn: &mut dyn Txn) -> Result<(), StoreError> {
        let f = self
            .f
            .take()
            .ok_or_else(|| StoreError::Aborted("write job ran twice".into()))?;
        // AssertUnwindSafe: after a panic the transaction is aborted and the
        // job's state dropped, so no broken invariant is observed later.
        match catch_unwind(AssertUnwindSafe(|| f(txn))) {
            Ok(Ok(v)) => {
                self.out = Some(v);
                Ok(())
            }
            Ok(Err(Rollback(e))) => Err(e),
            Err(_) => {
                // The payload is not logged: it could quote caller data.
                tracing::error!("store write job panicked; rolling back its batch");
                Err(StoreError::Aborted(
                    "write job panicked; its batch was rolled back".into(),
                ))
            }
        }
    }

    fn finish(self: Box<Self>, outcome: Result<(), StoreError>) {
        let TypedJob { out, reply, .. } = *self;
        let answer = outcome.and_then(|()| {
            out.ok_or_else(|| StoreError::Aborted("write job produced no result".into()))
        });
        // The caller may have gone away (cancelled future); its write still
        // stands, there is just nobody left to tell.
        let _ = reply.send(answer);
    }

    fn prefetch(&self) -> &[(Table, String)] {
        &self.prefetch
    }
}

/// Boxes a closure as a job (that will read the keys of `prefetch`) and returns the
/// receiver of its answer.
pub(super) fn job<T, F>(
    prefetch: Vec<(Table, String)>,
    f: F,
) -> (BoxedJob, oneshot::Receiver<Result<T, StoreError>>)
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Txn) -> Result<T, Rollback> + Send + 'static,
{
    let (reply, rx) = oneshot::channel();
    let job = TypedJob {
        prefetch,
        f: Some(f),
        out: None,
        reply,
    };
    (Box::new(job), rx)
}

/// Committer settings, taken from the store options.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) max_batch: usize,
    pub(super) max_batch_delay: Duration,
}

/// The committer's main loop; returns when the channel is closed and every
/// queued job has been answered.
pub(super) fn run(
    backend: Arc<dyn Backend>,
    mut rx: mpsc::Receiver<BoxedJob>,
    cfg: Config,
    shared: Arc<Shared>,
) {
    let mut pending: VecDeque<BoxedJob> = VecDeque::new();
    let mut channel_open = true;
    loop {
        if pending.is_empty() {
            if !channel_open {
                break;
            }
            match rx.blocking_recv() {
                Some(j) => pending.push_back(j),
                None => break,
            }
        }
        if channel_open {
            channel_open = fill(&mut rx, &mut pending, &cfg);
        }
        let n = pending.len().min(cfg.max_batch);
        commit_batch(&*backend, &mut pending, n, &shared);
    }
    tracing::debug!("store committer stopped");
}

/// Drains already-queued jobs into `pending` (up to `max_batch`), waiting up
/// to `max_batch_delay` for more. Returns false once the channel is closed.
fn fill(rx: &mut mpsc::Receiver<BoxedJob>, pending: &mut VecDeque<BoxedJob>, cfg: &Config) -> bool {
    let deadline = Instant::now() + cfg.max_batch_delay;
    while pending.len() < cfg.max_batch {
        match rx.try_recv() {
            Ok(j) => pending.push_back(j),
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
            Err(mpsc::error::TryRecvError::Empty) => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                // Short naps: the window is meant to be sub-millisecond.
                std::thread::sleep((deadline - now).min(Duration::from_micros(50)));
            }
        }
    }
    true
}

/// Runs the first `n` pending jobs in one transaction and answers them.
fn commit_batch(
    backend: &dyn Backend,
    pending: &mut VecDeque<BoxedJob>,
    n: usize,
    shared: &Shared,
) {
    let fail_all = |pending: &mut VecDeque<BoxedJob>, e: StoreError| {
        shared.failed_batches.fetch_add(1, Ordering::Relaxed);
        crate::metrics::store_batch_failed();
        tracing::error!(error = %e, jobs = n, "store batch failed");
        for j in pending.drain(..n) {
            j.finish(Err(e.clone()));
        }
    };
    let mut txn = match backend.begin_batch() {
        Ok(t) => t,
        Err(e) => return fail_all(pending, e),
    };
    // The keys the batch's jobs declared, read in one request per table before the first
    // job runs (PostgreSQL: one locking read, sorted; the jobs' own reads of them are
    // then answered from the batch). If it fails, the whole batch fails with its error.
    let mut wanted: BTreeMap<Table, Vec<String>> = BTreeMap::new();
    for j in pending.iter().take(n) {
        for (table, key) in j.prefetch() {
            wanted.entry(*table).or_default().push(key.clone());
        }
    }
    for (table, keys) in &wanted {
        if let Err(Rollback(e)) = txn.prefetch(*table, keys) {
            drop(txn);
            return fail_all(pending, e);
        }
    }

    let mut done: Vec<BoxedJob> = Vec::with_capacity(n);
    let mut wrote_events = false;
    let mut audit_records = 0;
    for _ in 0..n {
        let Some(mut j) = pending.pop_front() else {
            break;
        };
        let mut tracking = Tracking {
            inner: txn.as_txn(),
            wrote_events: false,
            audit_records: 0,
        };
        let ran = j.run(&mut tracking);
        wrote_events |= tracking.wrote_events;
        audit_records += tracking.audit_records;
        if let Err(e) = ran {
            // Roll back everything this batch did (dropping the transaction); the
            // jobs after `j` never ran and stay at the front of `pending` for the
            // next batch.
            drop(txn);
            shared.failed_batches.fetch_add(1, Ordering::Relaxed);
            crate::metrics::store_batch_failed();
            tracing::warn!(error = %e, rolled_back = done.len(), "store write job failed; batch rolled back");
            j.finish(Err(e));
            for d in done {
                d.finish(Err(StoreError::Aborted(
                    "another write in the same commit batch failed; nothing was written".into(),
                )));
            }
            return;
        }
        done.push(j);
    }

    #[cfg(test)]
    {
        let hook = &shared.fail_next_commits;
        if hook
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
        {
            drop(txn);
            shared.failed_batches.fetch_add(1, Ordering::Relaxed);
            let e = StoreError::Backend("commit failed: injected test failure".into());
            for d in done {
                d.finish(Err(e.clone()));
            }
            return;
        }
    }

    let committing = Instant::now();
    match BatchTxn::commit(txn) {
        Ok(()) => {
            crate::metrics::store_committed(done.len(), committing.elapsed());
            crate::metrics::audit_records(audit_records);
            shared.commits.fetch_add(1, Ordering::Relaxed);
            shared
                .committed_jobs
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            if wrote_events {
                shared.event_commits.send_modify(|n| *n = n.wrapping_add(1));
            }
            for d in done {
                d.finish(Ok(()));
            }
        }
        Err(e) => {
            shared.failed_batches.fetch_add(1, Ordering::Relaxed);
            crate::metrics::store_batch_failed();
            tracing::error!(error = %e, jobs = done.len(), "store commit failed");
            for d in done {
                d.finish(Err(e.clone()));
            }
        }
    }
}
