//! A fixed pool of logged-in sessions, each owned by one dedicated thread.
//!
//! Why threads and not `spawn_blocking`: a `cryptoki::Session` is `Send` but not `Sync`,
//! PKCS#11 calls block, and session objects (unwrapped seeds, later) belong to the
//! session that made them. A thread that owns its session for life needs no lock around
//! it and keeps PKCS#11 off the tokio workers.
//!
//! Requests reach the threads through one bounded MPMC queue. A full queue answers
//! [`Error::Busy`] at once instead of letting latency pile up behind the HSM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use tokio::sync::oneshot;

use super::error::{function_name, rv_name, Error, Result};
use super::seeds::{SeedCacheShared, WorkerSeeds};

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// Pool counters, for status and benchmarks.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Operations run to completion (successfully or not).
    pub completed: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected_busy: AtomicU64,
    /// Sessions dropped and reopened after a session or device error.
    pub sessions_replaced: AtomicU64,
    /// Operations that met a stale object handle: the handle cache is emptied after one.
    pub stale_handles: AtomicU64,
}

/// The queue and the threads behind it.
pub(crate) struct Pool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    capacity: usize,
    pub(crate) stats: Arc<PoolStats>,
    #[cfg(feature = "fault-injection")]
    pub(crate) faults: Arc<super::faults::Faults>,
}

/// What a worker thread owns.
pub(crate) struct Worker {
    ctx: Pkcs11,
    slot: Slot,
    pin: Arc<SecretString>,
    session: Option<Session>,
    /// Unwrapped seeds: objects of this worker's session.
    seeds: WorkerSeeds,
    stats: Arc<PoolStats>,
    #[cfg(feature = "fault-injection")]
    faults: Arc<super::faults::Faults>,
}

impl Worker {
    fn open(&mut self) -> Result<()> {
        if self.session.is_none() {
            let session = self.ctx.open_rw_session(self.slot)?;
            match session.login(UserType::User, Some(&self.pin)) {
                // Login state is per application: another worker logged in already.
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(e.into()),
            }
            self.session = Some(session);
            // Session objects die with their session.
            self.seeds.forget_all();
        }
        Ok(())
    }

    /// Open a session if there is none, then call `op` with it and this worker's seeds.
    /// The one place where an operation meets its session, so the fault-injection hook
    /// (test builds only) sits here.
    fn call<T>(
        &mut self,
        idempotent: bool,
        op: &mut impl FnMut(&Session, &mut WorkerSeeds) -> Result<T>,
    ) -> Result<T> {
        #[cfg(feature = "fault-injection")]
        let reopened = self.session.is_none();
        self.open()?;
        #[cfg(feature = "fault-injection")]
        self.faults
            .before_call(&mut self.session, reopened, idempotent)?;
        #[cfg(not(feature = "fault-injection"))]
        let _ = idempotent;
        match &self.session {
            Some(session) => {
                self.seeds.drop_forgotten(session);
                op(session, &mut self.seeds)
            }
            None => Err(Error::ShutDown),
        }
    }

    /// Run `op` on this worker's session. On a session or device error the session is
    /// dropped (a new one is opened for the next operation) and, when `retry` is set,
    /// `op` runs once more on the new session. Both, and an operation that met a stale
    /// object handle, make the handle cache search again (objects.rs).
    pub(crate) fn run<T>(
        &mut self,
        retry: bool,
        mut op: impl FnMut(&Session, &mut WorkerSeeds) -> Result<T>,
    ) -> Result<T> {
        let out = self.run_once_more_if_lost(retry, &mut op);
        if out.as_ref().is_err_and(Error::is_stale_handle) {
            self.stats.stale_handles.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    fn run_once_more_if_lost<T>(
        &mut self,
        retry: bool,
        op: &mut impl FnMut(&Session, &mut WorkerSeeds) -> Result<T>,
    ) -> Result<T> {
        let first = self.call(retry, op);
        count_pkcs11_error(&first);
        match first {
            Err(e) if e.is_session_lost() => {
                tracing::warn!(error = %e, "HSM session lost; opening a new one");
                self.session = None;
                self.stats.sessions_replaced.fetch_add(1, Ordering::Relaxed);
                crate::metrics::hsm_session_replaced();
                if !retry {
                    return Err(e);
                }
                let second = self.call(retry, op);
                count_pkcs11_error(&second);
                second
            }
            other => other,
        }
    }
}

/// Counts a failed PKCS#11 call (`hsm_pkcs11_errors_total`, by function and return value).
fn count_pkcs11_error<T>(out: &Result<T>) {
    if let Err(Error::Pkcs11 { function, rv }) = out {
        crate::metrics::pkcs11_error(function_name(*function), rv_name(*rv));
    }
}

/// How long a worker that just finished a job polls for the next one before it parks.
/// Waking a parked thread costs tens of microseconds on a virtual machine (measured in
/// benches/pool.rs), more than an HMAC in the HSM; under load the next job arrives
/// within this window, so the worker never parks.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// The next job, or `None` when the queue is closed and empty.
fn next_job(rx: &Receiver<Job>) -> Option<Job> {
    let start = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
            Err(crossbeam_channel::TryRecvError::Empty) if start.elapsed() < SPIN => {
                std::thread::yield_now();
            }
            Err(crossbeam_channel::TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

impl Pool {
    /// Start `sessions` worker threads, each with its own logged-in session. Returns
    /// only when every session is open and logged in, so that a wrong PIN or a missing
    /// token stops the service at start rather than at the first request.
    pub(crate) fn start(
        ctx: Pkcs11,
        slot: Slot,
        pin: SecretString,
        sessions: usize,
        capacity: usize,
        seeds: (Arc<SeedCacheShared>, usize),
    ) -> Result<Pool> {
        let (tx, rx) = bounded::<Job>(capacity);
        let stats = Arc::new(PoolStats::default());
        let pin = Arc::new(pin);
        let mut pool = Pool {
            tx: Some(tx),
            threads: Vec::with_capacity(sessions),
            capacity,
            stats: stats.clone(),
            #[cfg(feature = "fault-injection")]
            faults: Arc::default(),
        };
        for i in 0..sessions {
            let mut worker = Worker {
                ctx: ctx.clone(),
                slot,
                pin: pin.clone(),
                session: None,
                seeds: WorkerSeeds::new(seeds.1, seeds.0.clone()),
                stats: stats.clone(),
                #[cfg(feature = "fault-injection")]
                faults: pool.faults.clone(),
            };
            let rx: Receiver<Job> = rx.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("hsm-session-{i}"))
                .spawn(move || {
                    let opened = worker.open();
                    let ok = opened.is_ok();
                    let _ = ready_tx.send(opened);
                    if ok {
                        while let Some(job) = next_job(&rx) {
                            job(&mut worker);
                        }
                    }
                })
                .map_err(|e| Error::Binding(format!("cannot start HSM session thread: {e}")))?;
            pool.threads.push(thread);
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Binding("HSM session thread died at start".into())),
            }
        }
        Ok(pool)
    }

    /// Queue `job` for the next free worker and wait for its answer.
    pub(crate) async fn submit<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Worker) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let stats = self.stats.clone();
        let queued = Instant::now();
        let boxed: Job = Box::new(move |worker: &mut Worker| {
            let started = Instant::now();
            crate::metrics::hsm_job_started(started - queued);
            let out = job(worker);
            crate::metrics::hsm_job_finished(started.elapsed());
            stats.completed.fetch_add(1, Ordering::Relaxed);
            // The caller may have gone away (cancelled RPC): nothing to do then.
            let _ = reply_tx.send(out);
        });
        let tx = self.tx.as_ref().ok_or(Error::ShutDown)?;
        // Counted before the send: a worker may take the job before try_send returns.
        crate::metrics::hsm_job_queued();
        match tx.try_send(boxed) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                crate::metrics::hsm_job_not_queued();
                self.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
                crate::metrics::hsm_rejected_busy();
                return Err(Error::Busy);
            }
            Err(TrySendError::Disconnected(_)) => {
                crate::metrics::hsm_job_not_queued();
                return Err(Error::ShutDown);
            }
        }
        reply_rx.await.map_err(|_| Error::ShutDown)?
    }

    /// Requests waiting in the queue.
    pub(crate) fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.len())
    }

    /// Queue capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of sessions (threads).
    pub(crate) fn sessions(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for Pool {
    /// Close the queue, let the workers finish what is queued, and join them, so that
    /// every session is closed before the process exits.
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
