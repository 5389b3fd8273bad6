//! Fault injection at the HSM boundary: test builds only (cargo feature
//! `fault-injection`).
//!
//! # Design note: HSM faults, and the failure to beat
//!
//! privacyIDEA's issues #1003, #1278 and #3000 describe one failure: after a device
//! hiccup (an HSM rebooted, a network HSM's link dropped, a USB token re-plugged) the
//! PKCS#11 session and the object handles the application had cached were invalid, every
//! request failed, and only restarting the service helped. This service must instead
//! (a) never answer with a half-done state change, (b) say it is unhealthy while the
//! token is gone, and (c) come back by itself when the token is back. How:
//!
//! - **Sessions.** Every PKCS#11 call runs inside `Worker::run` (pool.rs), on the
//!   worker's own session. A return value that means the session, the login or the device
//!   went away (`Error::is_session_lost`: CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_ERROR,
//!   CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_USER_NOT_LOGGED_IN, ...) drops the
//!   session; the next operation opens a new one and logs in again (`C_OpenSession`,
//!   `C_Login`). Nothing is cached across that except what is re-validated.
//! - **Idempotent or not.** An operation whose repetition cannot change state (HMAC,
//!   sign, random, searches, attribute reads) is run once more on the new session, so the
//!   caller never sees a single lost session. One that creates something (key
//!   generation, object creation, wrapping a new seed) is *not* retried: the first
//!   attempt may have created an object before the error came back, and a blind retry
//!   would leave an orphan or a duplicate. It fails with CKR_* mapped to
//!   `ErrorKind::Unavailable` (gRPC `UNAVAILABLE`, api/status.rs) before anything was
//!   written to the store, so the caller retries the whole request.
//! - **Handles.** Token object handles (master keys, binding key, signing keys) are
//!   cached in `objects::HandleCache`. They do not outlive the sessions: SoftHSM drops
//!   every handle of the application when its last session closes (so with one session,
//!   or after a device error that took all of them, every cached handle is stale:
//!   exactly what broke privacyIDEA), and a token that was removed or rebooted may
//!   number its objects anew. So every session replacement
//!   (`PoolStats::sessions_replaced`) and every stale handle met
//!   (CKR_OBJECT_HANDLE_INVALID / CKR_KEY_HANDLE_INVALID, `PoolStats::stale_handles`)
//!   empties the cache at the next lookup and each handle is searched for again. An
//!   operation in flight at that moment that meets a stale handle searches again, once
//!   (signing: that key; seed HMACs: master and binding key), or fails `UNAVAILABLE`
//!   (retry: the next attempt searches). Found with this
//!   layer: before, a service with `hsm.sessions = 1` answered every VerifyCode with
//!   INTERNAL after one lost session, until it was restarted.
//! - **Seed cache.** Unwrapped seeds are session objects: they die with their session.
//!   A worker forgets its cache whenever it opens a new session, and the next HMAC
//!   unwraps the seed again (after the binding check) into the new session.
//! - **Health.** The health monitor (server.rs) asks a session whether it is logged in,
//!   with a deadline (the interval); a token that fails or hangs turns health
//!   NOT_SERVING within two `server.health_interval_ms`, and SERVING again once a session
//!   has logged in anew.
//! - **A slow HSM.** Requests wait in one bounded queue (`hsm.queue_capacity`) in front
//!   of the sessions; a full queue answers `RESOURCE_EXHAUSTED` at once, so a slow or
//!   stuck token costs bounded memory and callers learn to back off.
//!
//! # The injection layer
//!
//! [`Faults`] hangs off the pool (`Hsm::faults`). Its hook, [`Faults::before_call`],
//! is called in `Worker::call`, the one place where an operation gets its session (after
//! a missing session was opened), just before the operation's PKCS#11 calls. It can
//!
//! - fail the next N operations with a given CKR, reported as a given PKCS#11 function
//!   ([`Faults::fail_next`]; [`Faults::fail_next_of`] limits it to idempotent (retried)
//!   or non-idempotent operations). The hook sits in front of an operation, not inside
//!   cryptoki, so it cannot tell which PKCS#11 functions the operation would call: the
//!   function is the name the error carries (in logs and metrics), and the unit that
//!   fails is the operation, before any of its calls reached the token (so a failed
//!   non-idempotent operation has created nothing);
//! - delay every operation ([`Faults::delay_calls`]), on the worker thread, as a slow
//!   token would;
//! - close sessions under the workers ([`Faults::close_sessions`]): the next N
//!   operations find their worker's session really closed (`C_CloseSession`: its session
//!   objects, the unwrapped seeds, are gone, and when it was the last session the login
//!   is gone too) and get CKR_SESSION_HANDLE_INVALID, as a stale handle would;
//! - remove the token ([`Faults::remove_token`]) until [`Faults::reinsert_token`]:
//!   every operation fails; a worker holding a session has it closed for real and gets
//!   CKR_DEVICE_REMOVED, one that had to open a session gets it closed again and
//!   `C_OpenSession failed: CKR_TOKEN_NOT_PRESENT` (SoftHSM itself cannot be unplugged:
//!   the sessions are really opened, logged in and closed, so recovery really logs in).
//!
//! # Kept out of release builds
//!
//! This file is compiled only with the cargo feature `fault-injection`, which nothing
//! enables but hsm-service's dev-dependency on itself (Cargo.toml): cargo applies it to
//! this package's tests, benches and examples only, never to `cargo build [--release]`,
//! the binary installed, or a crate depending on hsm-service. No config key, flag or
//! environment variable reaches it. `tests/hsm_faults.rs` checks with
//! `cargo tree` that the normal-dependency feature set of every workspace member lacks
//! it, and the binary logs a warning at start if it was ever built with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use cryptoki::context::Function;
use cryptoki::error::RvError;
use cryptoki::session::Session;

use super::error::Error;

/// The PKCS#11 return values the layer injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ckr {
    /// CKR_SESSION_HANDLE_INVALID: the session went away.
    SessionHandleInvalid,
    /// CKR_DEVICE_ERROR: the token failed.
    DeviceError,
    /// CKR_DEVICE_REMOVED: the token was removed during the call.
    DeviceRemoved,
    /// CKR_TOKEN_NOT_PRESENT: no token in the slot.
    TokenNotPresent,
    /// CKR_GENERAL_ERROR: an unrecoverable error.
    GeneralError,
}

impl Ckr {
    fn rv(self) -> RvError {
        match self {
            Ckr::SessionHandleInvalid => RvError::SessionHandleInvalid,
            Ckr::DeviceError => RvError::DeviceError,
            Ckr::DeviceRemoved => RvError::DeviceRemoved,
            Ckr::TokenNotPresent => RvError::TokenNotPresent,
            Ckr::GeneralError => RvError::GeneralError,
        }
    }
}

/// Which operations a failure hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    /// Every operation.
    Any,
    /// Operations the pool retries on a new session (HMAC, sign, random, searches).
    Idempotent,
    /// Operations it does not retry (key generation, object creation, wrapping).
    NonIdempotent,
}

impl Ops {
    fn matches(self, idempotent: bool) -> bool {
        match self {
            Ops::Any => true,
            Ops::Idempotent => idempotent,
            Ops::NonIdempotent => !idempotent,
        }
    }
}

/// One armed fault: fail with `(function, rv)`, or (`None`) close the session.
struct Failure {
    ops: Ops,
    fail: Option<(Function, RvError)>,
    remaining: u32,
}

#[derive(Default)]
struct Plan {
    failures: Vec<Failure>,
    delay: Option<Duration>,
    removed: bool,
}

/// The faults armed on one pool. Every method takes effect for the next operation.
#[derive(Default)]
pub struct Faults {
    plan: Mutex<Plan>,
    injected: AtomicU64,
    sessions_closed: AtomicU64,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("injected", &self.injected())
            .finish()
    }
}

/// What the hook does after the (unlocked) delay.
enum Action {
    None,
    Fail(Function, RvError),
    Close,
    Removed,
}

impl Faults {
    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fail the next `times` operations with `ckr`, reported as coming from `function`.
    pub fn fail_next(&self, function: Function, ckr: Ckr, times: u32) {
        self.fail_next_of(Ops::Any, function, ckr, times);
    }

    /// Fail the next `times` operations of kind `ops` with `ckr`, reported as coming
    /// from `function`. Failures armed earlier are used up first.
    pub fn fail_next_of(&self, ops: Ops, function: Function, ckr: Ckr, times: u32) {
        self.arm(ops, Some((function, ckr.rv())), times);
    }

    fn arm(&self, ops: Ops, fail: Option<(Function, RvError)>, times: u32) {
        if times > 0 {
            self.plan().failures.push(Failure {
                ops,
                fail,
                remaining: times,
            });
        }
    }

    /// Make every operation wait `delay` on its worker thread before it runs (`None`:
    /// full speed again).
    pub fn delay_calls(&self, delay: Option<Duration>) {
        self.plan().delay = delay;
    }

    /// Close the session under the workers of the next `times` operations (that have a
    /// session to close).
    pub fn close_sessions(&self, times: u32) {
        self.close_sessions_of(Ops::Any, times);
    }

    /// The same for operations of kind `ops` only.
    pub fn close_sessions_of(&self, ops: Ops, times: u32) {
        self.arm(ops, None, times);
    }

    /// Take the token away until [`Faults::reinsert_token`].
    pub fn remove_token(&self) {
        self.plan().removed = true;
    }

    /// Put the token back.
    pub fn reinsert_token(&self) {
        self.plan().removed = false;
    }

    /// Disarm everything.
    pub fn clear(&self) {
        *self.plan() = Plan::default();
    }

    /// Operations failed by this layer so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Sessions this layer closed under a worker so far.
    pub fn sessions_closed(&self) -> u64 {
        self.sessions_closed.load(Ordering::Relaxed)
    }

    /// The hook, called on the worker thread when an operation has its `session`
    /// (`reopened`: opened just now, the worker had none), before the operation's first
    /// PKCS#11 call. `idempotent`: the pool retries the operation on a new session.
    pub(crate) fn before_call(
        &self,
        session: &mut Option<Session>,
        reopened: bool,
        idempotent: bool,
    ) -> Result<(), Error> {
        let (delay, action) = {
            let mut plan = self.plan();
            let action =
                if plan.removed {
                    Action::Removed
                } else if let Some(i) = plan.failures.iter().position(|f| {
                    f.ops.matches(idempotent) && (f.fail.is_some() || session.is_some())
                }) {
                    let f = &mut plan.failures[i];
                    f.remaining -= 1;
                    let action = match f.fail {
                        Some((function, rv)) => Action::Fail(function, rv),
                        None => Action::Close,
                    };
                    if f.remaining == 0 {
                        plan.failures.remove(i);
                    }
                    action
                } else {
                    Action::None
                };
            (plan.delay, action)
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let (function, rv) = match action {
            Action::None => return Ok(()),
            Action::Fail(function, rv) => (function, rv),
            Action::Close => {
                self.close(session);
                (Function::GetSessionInfo, RvError::SessionHandleInvalid)
            }
            // The session the worker just opened could not have been opened on a removed
            // token: close it again and say what C_OpenSession would have said.
            Action::Removed if reopened => {
                self.close(session);
                (Function::OpenSession, RvError::TokenNotPresent)
            }
            Action::Removed => {
                self.close(session);
                (Function::GetSessionInfo, RvError::DeviceRemoved)
            }
        };
        self.injected.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(function = ?function, rv = ?rv, "injected HSM fault");
        Err(Error::Pkcs11 { function, rv })
    }

    /// Really close the worker's session (`C_CloseSession`); the worker keeps believing
    /// it had one until the error it is about to get.
    fn close(&self, session: &mut Option<Session>) {
        if let Some(s) = session.take() {
            if let Err(e) = s.close() {
                tracing::debug!(error = %e, "closing a session under a worker");
            }
            self.sessions_closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::hsm::tests::open;
    use crate::hsm::ErrorKind;
    use crate::testing::DevEnv;

    #[tokio::test]
    async fn a_failure_hits_only_the_operations_it_names_and_clear_disarms() {
        let env = DevEnv::new();
        let hsm = open(&env, 1, 8);
        let f = hsm.faults();
        f.fail_next_of(
            Ops::NonIdempotent,
            Function::GenerateKey,
            Ckr::DeviceError,
            1,
        );
        // Idempotent operations pass by it.
        hsm.random(8).await.expect("random");
        assert_eq!(f.injected(), 0);
        // The first non-idempotent one takes it, reported as the function named.
        let e = hsm.inner.pool.submit(|w| w.run(false, |_, _| Ok(()))).await;
        let e = e.expect_err("injected");
        assert_eq!(e.to_string(), "C_GenerateKey failed: CKR_DEVICE_ERROR");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(f.injected(), 1);
        hsm.inner
            .pool
            .submit(|w| w.run(false, |_, _| Ok(())))
            .await
            .expect("used up");

        // CKR_GENERAL_ERROR is not a lost session: the session stays.
        let replaced = hsm.stats().sessions_replaced.load(Ordering::Relaxed);
        f.fail_next(Function::Sign, Ckr::GeneralError, 1);
        let e = hsm.random(8).await.expect_err("injected");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(
            hsm.stats().sessions_replaced.load(Ordering::Relaxed),
            replaced
        );

        f.remove_token();
        f.fail_next(Function::Sign, Ckr::DeviceError, 5);
        f.delay_calls(Some(Duration::from_secs(5)));
        f.clear();
        let t = Instant::now();
        hsm.random(8).await.expect("nothing armed");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    /// An object removed and made again under the service: the cached handle is stale;
    /// the operation that meets it fails UNAVAILABLE (worth a retry) and the next lookup
    /// searches again, with no session lost.
    #[tokio::test]
    async fn a_stale_handle_empties_the_handle_cache() {
        use cryptoki::object::{Attribute, AttributeType, ObjectClass};
        let env = DevEnv::new();
        let hsm = open(&env, 2, 8);
        let make = |value: u8| {
            hsm.inner.pool.submit(move |w| {
                w.run(false, move |s, _| {
                    Ok(s.create_object(&[
                        Attribute::Class(ObjectClass::DATA),
                        Attribute::Token(false),
                        Attribute::Private(true),
                        Attribute::Label(b"remade".to_vec()),
                        Attribute::Value(vec![value]),
                    ])?)
                })
            })
        };
        let read = |h| {
            hsm.inner.pool.submit(move |w| {
                w.run(true, move |s, _| {
                    Ok(s.get_attributes(h, &[AttributeType::Value])?)
                })
            })
        };
        let old = make(1).await.expect("create");
        let cached = hsm
            .find_object(ObjectClass::DATA, "remade")
            .await
            .expect("find");
        assert_eq!(cached, Some(old));
        hsm.inner
            .pool
            .submit(move |w| w.run(false, move |s, _| Ok(s.destroy_object(old)?)))
            .await
            .expect("destroy");
        let new = make(2).await.expect("create again");
        let e = read(old).await.expect_err("stale");
        assert!(e.is_stale_handle(), "{e}");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        let searches = hsm.object_searches();
        let found = hsm
            .find_object(ObjectClass::DATA, "remade")
            .await
            .expect("find");
        assert_eq!(found, Some(new));
        assert_eq!(hsm.object_searches(), searches + 1);
        assert_eq!(hsm.stats().sessions_replaced.load(Ordering::Relaxed), 0);
        read(new).await.expect("the new handle works");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_probe_a_full_queue_is_healthy_only_while_operations_complete() {
        let env = DevEnv::new();
        let hsm = open(&env, 1, 1);
        assert!(hsm.serving(Duration::from_secs(5), hsm.completed()).await);
        hsm.faults().delay_calls(Some(Duration::from_millis(400)));
        let running = tokio::spawn({
            let hsm = hsm.clone();
            async move { hsm.random(8).await.map(|r| r.len()) }
        });
        while hsm.queued() > 0 || hsm.completed() < 1 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = tokio::spawn({
            let hsm = hsm.clone();
            async move { hsm.random(8).await.map(|r| r.len()) }
        });
        while hsm.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let done = hsm.completed();
        // Full queue, nothing completed since the last look: counted as hung.
        assert!(!hsm.serving(Duration::from_secs(5), done).await);
        // Full queue, but operations completed since: busy, not lost.
        assert!(hsm.serving(Duration::from_secs(5), done - 1).await);
        // Answering, but slower than the deadline: not serving.
        assert_eq!(running.await.expect("join").expect("random"), 8);
        assert_eq!(queued.await.expect("join").expect("random"), 8);
        assert!(
            !hsm.serving(Duration::from_millis(100), hsm.completed())
                .await
        );
        hsm.faults().delay_calls(None);
        assert!(hsm.serving(Duration::from_secs(5), hsm.completed()).await);
    }
}
