//! [`Signer`]: named signing keys with versions in the HSM, and what every operation
//! family shares (key records in memory, grants, HSM signing). The families are in
//! their own files: `lifecycle` (generate, restore, state changes, destroy),
//! `self_test`, `assertion`, `raw`, `jwks` and `certs`.
//!
//! The key records live in memory (loaded at start) and in the store, written
//! through before memory changes. Signing never searches the token (handles are cached
//! by CKA_ID in `hsm`) and never waits for the store, except when an assertion would
//! expire later than the durable `last_expiry` of its key (see `assertion`).
//!
//! # Several instances
//!
//! Other instances over the same store change key versions too (a ceremony executed on
//! one of them). Every write of a version bumps a generation counter in the store's
//! `meta` table in the same transaction ([`versions::GENERATION_KEY`]), and
//! [`Signer::refresh`] reloads the versions when the counter moved. It runs every
//! [`REFRESH_PERIOD`] in the background ([`Signer::watch`]), after a lookup that failed
//! (an unknown key, no active version: reload once and look again), and before every
//! change of a version, whose write is moreover a compare-and-set against the record this
//! instance based it on (`versions::put_unchanged`): a stale instance is refused, never
//! overwrites.
//!
//! Why a counter and not PostgreSQL's LISTEN/NOTIFY: it is backend-neutral (the same
//! code for redb and PostgreSQL, proved by the same tests), it commits atomically with
//! the change it announces (it cannot be seen before the records), and a poll cannot be
//! lost: a notification sent while an instance's listening connection was down is gone,
//! so NOTIFY would need this poll as a fallback anyway. The cost is one read of one small
//! row per instance every [`REFRESH_PERIOD`]; key changes are rare (ceremonies), so a
//! reload is rare.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::versions::{self, KeyState, KeyVersion, Usage};
use super::{Algorithm, PublicKey, SigningError};
use crate::audit::log::AuditLog;
use crate::audit::{Actor, Event};
use crate::common::Clock;
use crate::config::SigningConfig;
use crate::error::{Error, Result};
use crate::hsm::{Hsm, KeyPairKind, PublicKeyAttributes, SignMechanism};
use crate::pki;
use crate::store::{Store, StoreError};

/// How often [`Signer::watch`] checks whether another instance changed a key version.
pub const REFRESH_PERIOD: Duration = Duration::from_millis(250);

/// What a caller's configuration lets it sign with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// Key names; `None`: the configured default keys only (`default_key` for
    /// assertions, `default_raw_key` for raw signatures).
    pub keys: Option<Vec<String>>,
    /// `acr` values; `None`: every configured value.
    pub acr: Option<Vec<String>>,
    /// The caller's tenant: evidence it cites must be of this tenant.
    pub tenant: String,
    /// May sign without evidence (`unbound_assertions` of its rule).
    pub unbound_assertions: bool,
    /// The caller's `[[client]]` rule, for messages.
    pub rule: String,
}

/// Who asks for a signature: what they may sign with, and who they are in the audit
/// trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What the caller's `[[client]]` rule lets it sign with.
    pub grant: Grant,
    /// The caller's certificate, as the audit trail names it.
    pub actor: Actor,
}

/// Names a key version: `version` 0 is the current one (the active version, else the
/// newest one not destroyed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    /// Key name.
    pub name: String,
    /// Version, or 0 for the current one.
    pub version: u32,
}

impl KeyRef {
    /// A reference to `name`, version `version` (0: current).
    pub fn new(name: impl Into<String>, version: u32) -> KeyRef {
        KeyRef {
            name: name.into(),
            version,
        }
    }
}

/// Named, versioned signing keys in the HSM, and the signing done with them.
pub struct Signer {
    pub(super) hsm: Hsm,
    pub(super) store: Arc<Store>,
    pub(super) config: SigningConfig,
    pub(super) keys: RwLock<BTreeMap<(String, u32), KeyVersion>>,
    /// The key-version generation `keys` was loaded at (see the module documentation).
    generation: AtomicU64,
    /// Serialises record writes, so that memory follows the store in order. Held only
    /// for short steps: the signing path may wait for it to raise an expiry mark.
    pub(super) writes: tokio::sync::Mutex<()>,
    /// Serialises version creation (held across key generation, seconds for RSA).
    pub(super) creations: tokio::sync::Mutex<()>,
    pub(super) rng: ring::rand::SystemRandom,
    pub(super) clock: Clock,
    /// Every signature and certificate is recorded here, durably before the reply.
    pub(super) audit: Arc<AuditLog>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("versions", &self.read_keys().len())
            .finish_non_exhaustive()
    }
}

pub(super) fn store_err(e: StoreError) -> Error {
    crate::error::store_failure("signing key store", e)
}

pub(super) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

impl From<SigningError> for Error {
    fn from(e: SigningError) -> Error {
        match e {
            SigningError::InvalidArgument(m) => Error::InvalidArgument(m),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<pki::PkiError> for Error {
    fn from(e: pki::PkiError) -> Error {
        match e {
            pki::PkiError::InvalidArgument(m) => Error::InvalidArgument(m),
            pki::PkiError::Signing(s) => s.into(),
            other => Error::Internal(other.to_string()),
        }
    }
}

pub(super) fn kind_of(alg: Algorithm) -> KeyPairKind {
    match alg {
        Algorithm::Es256 => KeyPairKind::EcP256,
        Algorithm::Es384 => KeyPairKind::EcP384,
        Algorithm::EdDsa => KeyPairKind::Ed25519,
        Algorithm::Ps256 => KeyPairKind::Rsa3072,
    }
}

pub(super) fn mechanism_of(alg: Algorithm) -> SignMechanism {
    match alg {
        Algorithm::Es256 | Algorithm::Es384 => SignMechanism::Ecdsa,
        Algorithm::EdDsa => SignMechanism::Eddsa,
        Algorithm::Ps256 => SignMechanism::RsaPssSha256,
    }
}

pub(super) fn public_key_of(
    attrs: &PublicKeyAttributes,
) -> std::result::Result<PublicKey, SigningError> {
    match attrs {
        PublicKeyAttributes::Ec { ec_point } => PublicKey::from_ec_point(ec_point),
        PublicKeyAttributes::Edwards { ec_point } => PublicKey::from_ed25519_point(ec_point),
        PublicKeyAttributes::Rsa {
            modulus,
            public_exponent,
        } => PublicKey::from_rsa_components(modulus, public_exponent),
    }
}

impl Signer {
    /// The token the keys live on.
    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }

    /// Load the key records from the store (records written before usages were stored
    /// are rewritten once with the usage they were made for). With
    /// `config.bootstrap_default_key`, create the default assertion key (ES256,
    /// `signing`), the default raw key (ES256, `raw`) and the default challenge key
    /// (ES256, `challenge`), publish and activate each when
    /// it has no version yet.
    pub async fn open(
        hsm: Hsm,
        store: Arc<Store>,
        config: SigningConfig,
        clock: Clock,
        audit: Arc<AuditLog>,
    ) -> Result<Signer> {
        let migrated = store
            .write(versions::migrate_all)
            .await
            .and_then(|r| r)
            .map_err(store_err)?;
        if migrated > 0 {
            tracing::info!(
                records = migrated,
                "signing key records migrated to format 3 (usage)"
            );
        }
        let (generation, loaded) = store
            .read(|txn| Ok((versions::generation(txn)?, versions::load_all(txn)?)))
            .await
            .map_err(store_err)?;
        let signer = Signer {
            hsm,
            store,
            config,
            keys: RwLock::new(
                loaded
                    .into_iter()
                    .map(|k| ((k.name.clone(), k.version), k))
                    .collect(),
            ),
            generation: AtomicU64::new(generation),
            writes: tokio::sync::Mutex::new(()),
            creations: tokio::sync::Mutex::new(()),
            rng: ring::rand::SystemRandom::new(),
            clock,
            audit,
        };
        if signer.config.bootstrap_default_key {
            let defaults = [
                (signer.config.default_key.clone(), Usage::Signing),
                (signer.config.default_raw_key.clone(), Usage::Raw),
                (
                    signer.config.default_challenge_key.clone(),
                    Usage::Challenge,
                ),
            ];
            for (name, usage) in defaults {
                if signer.list(Some(&name)).is_empty() {
                    let k = signer
                        .create_version(&name, Algorithm::Es256, usage)
                        .await?;
                    signer.publish(&name, k.version).await?;
                    signer.activate(&name, k.version).await?;
                    tracing::info!(key = %name, kid = %k.kid, usage = %usage, "created a default key (bootstrap)");
                }
            }
        }
        Ok(signer)
    }

    /// `event` at now, by `actor`.
    pub(super) fn event(&self, actor: &Actor, action: &'static str, object: &str) -> Event {
        Event::new(self.clock.now_ms(), actor.clone(), action, object)
    }

    /// The configuration this signer runs with.
    pub fn config(&self) -> &SigningConfig {
        &self.config
    }

    pub(super) fn read_keys(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<(String, u32), KeyVersion>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// All versions (of `name`, when given), in name and version order.
    pub fn list(&self, name: Option<&str>) -> Vec<KeyVersion> {
        self.read_keys()
            .values()
            .filter(|k| name.is_none_or(|n| k.name == n))
            .cloned()
            .collect()
    }

    /// One version; `version` 0 is the current one.
    pub fn get(&self, key: &KeyRef) -> Result<KeyVersion> {
        let keys = self.read_keys();
        let found = if key.version == 0 {
            let versions: Vec<&KeyVersion> = keys
                .range((key.name.clone(), 0)..=(key.name.clone(), u32::MAX))
                .map(|(_, k)| k)
                .filter(|k| k.state != KeyState::Destroyed)
                .collect();
            versions
                .iter()
                .find(|k| k.state == KeyState::Active)
                .or(versions.last())
                .map(|k| (*k).clone())
        } else {
            keys.get(&(key.name.clone(), key.version)).cloned()
        };
        found.ok_or_else(|| {
            Error::NotFound(if key.version == 0 {
                format!("no signing key named {:?}", key.name)
            } else {
                format!("no version {} of signing key {:?}", key.version, key.name)
            })
        })
    }

    pub(super) fn active(&self, name: &str) -> Option<KeyVersion> {
        self.read_keys()
            .range((name.to_owned(), 0)..=(name.to_owned(), u32::MAX))
            .map(|(_, k)| k)
            .find(|k| k.state == KeyState::Active)
            .cloned()
    }

    /// Write `versions` through to the store, then to memory. Call with `writes` held.
    /// Each record is written only if the store still holds what memory holds (nothing,
    /// for a new version): FAILED_PRECONDITION when another instance changed it first
    /// (memory is then reloaded, so a retry sees the change).
    pub(super) async fn put(&self, versions: Vec<KeyVersion>) -> Result<()> {
        let changes: Vec<(Option<KeyVersion>, KeyVersion)> = {
            let keys = self.read_keys();
            versions
                .iter()
                .map(|k| (keys.get(&(k.name.clone(), k.version)).cloned(), k.clone()))
                .collect()
        };
        let written = self
            .store
            .write(move |txn| versions::put_unchanged(txn, &changes))
            .await
            .map_err(store_err)?;
        if let Err(changed) = written {
            if let Err(e) = self.refresh_locked().await {
                tracing::warn!(error = %e, "signing keys: reload after a conflict failed");
            }
            return Err(Error::FailedPrecondition(format!(
                "{changed} was changed by another instance of the service; look again and retry"
            )));
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        for k in versions {
            keys.insert((k.name.clone(), k.version), k);
        }
        Ok(())
    }

    /// Reload the key versions when another instance changed them (the store's
    /// generation moved since they were loaded); `true` when it reloaded. One small read
    /// when nothing changed.
    pub async fn refresh(&self) -> Result<bool> {
        let current = self
            .store
            .read(|txn| versions::generation(txn))
            .await
            .map_err(store_err)?;
        if current == self.generation.load(Ordering::Acquire) {
            return Ok(false);
        }
        let _w = self.writes.lock().await;
        self.refresh_locked().await
    }

    /// [`Signer::refresh`] with `writes` held (so no write of this instance is between
    /// its commit and memory while the snapshot replaces memory).
    pub(super) async fn refresh_locked(&self) -> Result<bool> {
        let (generation, loaded) = self
            .store
            .read(|txn| Ok((versions::generation(txn)?, versions::load_all(txn)?)))
            .await
            .map_err(store_err)?;
        if generation == self.generation.load(Ordering::Acquire) {
            return Ok(false);
        }
        let fresh: BTreeMap<(String, u32), KeyVersion> = loaded
            .into_iter()
            .map(|k| ((k.name.clone(), k.version), k))
            .collect();
        let count = fresh.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        self.generation.store(generation, Ordering::Release);
        tracing::debug!(
            generation,
            versions = count,
            "signing keys reloaded (changed in the store)"
        );
        Ok(true)
    }

    /// `lookup`, and when it fails, once more after a [`Signer::refresh`] that found the
    /// versions changed (another instance may have just created or activated the key).
    pub(super) async fn looked_up<T>(&self, lookup: impl Fn(&Self) -> Result<T>) -> Result<T> {
        match lookup(self) {
            Ok(v) => Ok(v),
            Err(first) => match self.refresh().await {
                Ok(true) => lookup(self),
                Ok(false) => Err(first),
                Err(e) => {
                    tracing::warn!(error = %e, "signing keys: reload after a miss failed");
                    Err(first)
                }
            },
        }
    }

    /// [`Signer::refresh`] every `period` until `stop` turns true (or its sender is
    /// gone). Errors are logged (the store may be briefly unreachable) and retried.
    pub async fn watch(
        self: Arc<Self>,
        period: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.refresh().await {
                        tracing::debug!(error = %e, "signing keys: refresh failed; retrying");
                    }
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }

    /// The key `name` (empty: the default key of `usage`) for a caller with `grant`:
    /// refused when the grant does not name it, unknown when no such key exists.
    pub(super) fn granted(&self, grant: &Grant, name: &str, usage: Usage) -> Result<String> {
        let name = match name {
            "" if usage == Usage::Raw => self.config.default_raw_key.as_str(),
            "" => self.config.default_key.as_str(),
            n => n,
        };
        let allowed = match &grant.keys {
            Some(keys) => keys.iter().any(|k| k == name),
            None => name == self.config.default_key || name == self.config.default_raw_key,
        };
        if !allowed {
            return Err(Error::PermissionDenied(format!(
                "this client may not sign with key {name:?}"
            )));
        }
        let exists = self
            .read_keys()
            .range((name.to_owned(), 0)..=(name.to_owned(), u32::MAX))
            .next()
            .is_some();
        if !exists {
            return Err(invalid(format!("key: no signing key named {name:?}")));
        }
        Ok(name.to_owned())
    }

    /// The active version of `name`, which must be a key of `usage`: a key signs for
    /// its own usage only (PERMISSION_DENIED otherwise, whatever the grant says; checked
    /// before the state, so a `ca` key, never active, is refused for its usage too).
    pub(super) fn signing_version(&self, name: &str, usage: Usage) -> Result<KeyVersion> {
        let keys = self.read_keys();
        let mut active = None;
        for (_, k) in keys.range((name.to_owned(), 0)..=(name.to_owned(), u32::MAX)) {
            if k.usage != usage {
                let rpc = match usage {
                    Usage::Raw => "Sign signs with raw keys only",
                    Usage::Challenge => "app challenges are signed with challenge keys only",
                    _ => "SignAssertion signs with signing keys only",
                };
                return Err(Error::PermissionDenied(format!(
                    "key {name:?} is a {} key; {rpc}",
                    k.usage
                )));
            }
            if k.state == KeyState::Active {
                active = Some(k.clone());
            }
        }
        active.ok_or_else(|| {
            Error::FailedPrecondition(format!("signing key {name:?} has no active version"))
        })
    }

    pub(super) async fn hsm_sign(&self, k: &KeyVersion, message: &[u8]) -> Result<Vec<u8>> {
        let input = match k.algorithm.digest(message) {
            Some(digest) => digest,
            None => message.to_vec(),
        };
        Ok(self
            .hsm
            .sign(&k.key_id, mechanism_of(k.algorithm), input)
            .await?)
    }

    pub(super) fn usable(&self, key: &KeyRef) -> Result<KeyVersion> {
        let k = self.get(key)?;
        if k.state == KeyState::Destroyed {
            return Err(Error::FailedPrecondition(format!(
                "{} v{} is destroyed",
                k.name, k.version
            )));
        }
        Ok(k)
    }
}
