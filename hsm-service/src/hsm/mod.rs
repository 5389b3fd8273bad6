//! The PKCS#11 boundary: the only module that imports `cryptoki`.
//!
//! Layout follows the PKCS#11 function groups: [`module`] (library, slots, tokens),
//! [`pool`] (sessions and the threads that own them), [`random`] and [`objects`]
//! (object search with a handle cache), and [`error`], the one place where return
//! values become error kinds. Operation families that later features add (MACs,
//! wrapping, signing) get a file each.
//!
//! Nothing outside this module sees a cryptoki type; nothing inside sees proto or store
//! types.

pub mod backup;
pub mod binding;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod import;
pub mod mechanisms;
pub mod module;
pub mod objects;
mod pool;
mod random;
pub mod seeds;
pub mod sign;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cryptoki::context::Pkcs11;
use cryptoki::session::SessionState;
use cryptoki::slot::Slot;
use secrecy::SecretString;

pub use error::{Error, ErrorKind, Result};
pub use mechanisms::{KeyWrap, Mechanisms};
pub use module::TokenSelector;
pub use pool::PoolStats;
pub use sign::{GeneratedKeyPair, KeyPairKind, PublicKeyAttributes, SignMechanism};

use objects::HandleCache;
use pool::Pool;

/// How to reach the token.
#[derive(Debug, Clone)]
pub struct HsmSettings {
    /// Path of the PKCS#11 library.
    pub module: PathBuf,
    /// Which token.
    pub token: TokenSelector,
    /// Logged-in sessions, one thread each.
    pub sessions: usize,
    /// Requests that may wait for a session before new ones are refused as busy.
    pub queue_capacity: usize,
    /// Unwrapped seeds kept as session objects (least recently used are destroyed).
    pub seed_cache_capacity: usize,
}

/// Facts about the token, for status and logs.
#[derive(Debug, Clone)]
pub struct TokenFacts {
    /// Token label.
    pub label: String,
    /// Token serial number.
    pub serial_number: String,
    /// Token manufacturer.
    pub manufacturer: String,
    /// Token model.
    pub model: String,
    /// PKCS#11 library description and version.
    pub library: String,
}

/// A handle to the token: a pool of logged-in sessions and the caches around it.
/// Cheap to clone.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    seeds: Arc<seeds::SeedCacheShared>,
    handles: HandleCache,
    facts: TokenFacts,
    mechanisms: Mechanisms,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.inner.facts.label)
            .finish()
    }
}

impl Hsm {
    /// Load the module, find the token, open and log in every session. Blocking: call it
    /// before serving (or from `spawn_blocking`).
    pub fn open(settings: &HsmSettings, user_pin: SecretString) -> Result<Hsm> {
        if settings.sessions == 0 || settings.queue_capacity == 0 {
            return Err(Error::Invalid(
                "hsm.sessions and hsm.queue_capacity must be at least 1".into(),
            ));
        }
        let ctx = module::load(&settings.module)?;
        let slot = module::find_token(&ctx, &settings.token)?;
        let facts = token_facts(&ctx, slot)?;
        // Refuse a token that cannot serve the service, naming what it lacks, before
        // anything else; then make sure its key wrap is the RFC 5649 one.
        let mechanisms = mechanisms::check(&ctx, slot)?;
        let answer = mechanisms::known_answer(&ctx, slot, &user_pin, mechanisms.key_wrap)?;
        if answer == mechanisms::KeyWrapAnswer::NotChecked {
            tracing::warn!(
                mechanism = mechanisms.key_wrap.name(),
                "the token refused the public test keys of the RFC 5649 known-answer check; \
                 trusting its key wrap"
            );
        }
        tracing::info!(
            key_wrap = mechanisms.key_wrap.name(),
            eddsa = mechanisms.eddsa,
            rsa_pss = mechanisms.rsa_pss,
            ec_p384 = mechanisms.ec_p384,
            key_wrap_answer = ?answer,
            "token mechanisms"
        );
        let seed_counters = Arc::new(seeds::SeedCacheShared::default());
        // Each session caches its own unwrapped seeds (see seeds::WorkerSeeds).
        let per_session = settings
            .seed_cache_capacity
            .div_ceil(settings.sessions)
            .max(1);
        let pool = Pool::start(
            ctx,
            slot,
            user_pin,
            settings.sessions,
            settings.queue_capacity,
            (seed_counters.clone(), per_session),
        )?;
        Ok(Hsm {
            inner: Arc::new(Inner {
                pool,
                seeds: seed_counters,
                handles: HandleCache::default(),
                facts,
                mechanisms,
            }),
        })
    }

    /// Token facts read at start.
    pub fn facts(&self) -> &TokenFacts {
        &self.inner.facts
    }

    /// What the token offers of the mechanisms the service uses (checked at open).
    pub fn mechanisms(&self) -> Mechanisms {
        self.inner.mechanisms
    }

    /// The RFC 5649 key wrap, by the name the token offers it.
    pub(crate) fn key_wrap(&self) -> KeyWrap {
        self.inner.mechanisms.key_wrap
    }

    /// Pool counters.
    pub fn stats(&self) -> &PoolStats {
        &self.inner.pool.stats
    }

    /// The fault-injection layer of this token's pool (test builds only; see faults.rs).
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &faults::Faults {
        &self.inner.pool.faults
    }

    /// Sessions in the pool.
    pub fn sessions(&self) -> usize {
        self.inner.pool.sessions()
    }

    /// Capacity of the request queue.
    pub fn queue_capacity(&self) -> usize {
        self.inner.pool.capacity()
    }

    /// Requests waiting for a session right now.
    pub fn queued(&self) -> usize {
        self.inner.pool.queued()
    }

    /// Operations completed since start.
    pub fn completed(&self) -> u64 {
        self.stats().completed.load(Ordering::Relaxed)
    }

    /// True when a session of the pool reports the user logged in (`C_GetSessionInfo`).
    pub async fn is_logged_in(&self) -> bool {
        self.logged_in().await.unwrap_or(false)
    }

    /// Whether a session of the pool reports the user logged in; the error when the
    /// token could not be asked (lost, or the queue full).
    pub async fn logged_in(&self) -> Result<bool> {
        self.inner
            .pool
            .submit(|w| {
                w.run(true, |s, _| {
                    let state = s.get_session_info()?.session_state();
                    Ok(matches!(state, SessionState::RwUser | SessionState::RoUser))
                })
            })
            .await
    }

    /// The health monitor's look at the token: a logged-in session answers within
    /// `deadline`. A full queue counts as healthy only while operations keep completing
    /// (`completed_before`: [`Hsm::completed`] at the previous look): busy sessions are
    /// not lost ones, but a token that hangs fills the queue too.
    pub async fn serving(&self, deadline: std::time::Duration, completed_before: u64) -> bool {
        match tokio::time::timeout(deadline, self.logged_in()).await {
            Ok(Ok(logged_in)) => logged_in,
            Ok(Err(e)) if e.kind() == ErrorKind::Busy => self.completed() != completed_before,
            Ok(Err(_)) | Err(_) => false,
        }
    }
}

fn token_facts(ctx: &Pkcs11, slot: Slot) -> Result<TokenFacts> {
    let t = ctx.get_token_info(slot)?;
    let lib = ctx.get_library_info()?;
    let v = lib.library_version();
    Ok(TokenFacts {
        label: t.label().trim_end().to_owned(),
        serial_number: t.serial_number().trim_end().to_owned(),
        manufacturer: t.manufacturer_id().trim_end().to_owned(),
        model: t.model().trim_end().to_owned(),
        library: format!(
            "{} {}.{}",
            lib.library_description().trim_end(),
            v.major(),
            v.minor()
        ),
    })
}

#[cfg(test)]
pub(crate) mod tests;
