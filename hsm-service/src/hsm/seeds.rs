//! Authenticator seeds: wrapped at rest under a master key, unwrapped into session
//! objects to compute HMACs (`C_WrapKey`, `C_UnwrapKey`, `C_Sign` with the HMAC
//! mechanisms).
//!
//! A national eID has millions of seeds and an HSM holds thousands of objects, so a seed
//! is not a token object: it lives in the store as a blob wrapped under a non-extractable
//! AES-256 master key (`CKM_AES_KEY_WRAP_PAD`), useless without the HSM. To verify, the
//! HSM unwraps the blob into a session object that is sensitive, not extractable and
//! sign-only, and computes the HMACs itself. A bounded LRU of such handles keeps hot
//! credentials fast (an HMAC with a session key is ~3x cheaper in SoftHSM than with a
//! token key); evicted handles are destroyed.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::{Zeroize, Zeroizing};

use super::{objects, Error, Hsm, Result};
use crate::otp::HashAlgorithm;

/// Attempts at an HMAC when concurrent workers keep replacing the cached handle.
const STALE_RETRIES: usize = 3;

/// Token label of master key `version`.
pub fn master_key_label(version: u32) -> String {
    format!("seed-master-key-{version}")
}

/// Unwrapped seed handles, keyed by the wrapped blob itself: a credential deleted and
/// re-created under the same id has another blob, so a stale seed can never be used.
pub(crate) struct SeedCache {
    map: Mutex<lru::LruCache<Arc<[u8]>, ObjectHandle>>,
    /// Lookups that found an unwrapped handle.
    pub(crate) hits: AtomicU64,
    /// Lookups that had to unwrap.
    pub(crate) misses: AtomicU64,
}

impl SeedCache {
    pub(crate) fn new(capacity: usize) -> SeedCache {
        SeedCache {
            map: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    #[cfg(test)]
    pub(crate) fn lock_for_tests(
        &self,
    ) -> std::sync::MutexGuard<'_, lru::LruCache<Arc<[u8]>, ObjectHandle>> {
        self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, lru::LruCache<Arc<[u8]>, ObjectHandle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn hmac_mechanism(alg: HashAlgorithm) -> Mechanism<'static> {
    match alg {
        HashAlgorithm::Sha1 => Mechanism::Sha1Hmac,
        HashAlgorithm::Sha256 => Mechanism::Sha256Hmac,
        HashAlgorithm::Sha512 => Mechanism::Sha512Hmac,
    }
}

/// Template of a transient, wrappable copy of a seed (import and generation only).
fn transient_seed_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        // Only so that C_WrapKey can wrap it; the object is destroyed right after.
        Attribute::Extractable(true),
        Attribute::Sign(false),
        Attribute::Verify(false),
    ]
}

/// Template of an unwrapped seed used for verification: sign-only, never extractable.
fn verification_seed_template() -> [Attribute; 8] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(false),
    ]
}

fn master_key(session: &Session, version: u32) -> Result<ObjectHandle> {
    let label = master_key_label(version);
    objects::search(session, ObjectClass::SECRET_KEY, &label)?.ok_or(Error::ObjectNotFound(label))
}

/// Wrap `key` under the master key and destroy it, whatever happens.
fn wrap_and_destroy(session: &Session, master: ObjectHandle, key: ObjectHandle) -> Result<Vec<u8>> {
    let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, master, key);
    let destroyed = session.destroy_object(key);
    let wrapped = wrapped?;
    destroyed?;
    Ok(wrapped)
}

impl Hsm {
    /// Make sure master key `version` exists on the token, creating it (AES-256,
    /// sensitive, never extractable, wrap/unwrap only) if not. Returns true if created.
    pub async fn ensure_seed_master_key(&self, version: u32) -> Result<bool> {
        let label = master_key_label(version);
        if self
            .find_object(ObjectClass::SECRET_KEY, &label)
            .await?
            .is_some()
        {
            return Ok(false);
        }
        let owned = label.clone();
        self.inner
            .pool
            .submit(move |w| {
                w.run(false, |s, _| {
                    // Another instance may have created it meanwhile.
                    if objects::search(s, ObjectClass::SECRET_KEY, &owned)?.is_some() {
                        return Ok(());
                    }
                    s.generate_key(
                        &Mechanism::AesKeyGen,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(KeyType::AES),
                            Attribute::ValueLen(32.into()),
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(false),
                            Attribute::Modifiable(false),
                            Attribute::Wrap(true),
                            Attribute::Unwrap(true),
                            Attribute::Encrypt(false),
                            Attribute::Decrypt(false),
                            Attribute::Sign(false),
                            Attribute::Verify(false),
                            Attribute::Derive(false),
                            Attribute::Label(owned.as_bytes().to_vec()),
                        ],
                    )?;
                    Ok(())
                })
            })
            .await?;
        tracing::info!(label, "created seed master key");
        Ok(self
            .find_object(ObjectClass::SECRET_KEY, &label)
            .await?
            .is_some())
    }

    /// Generate a seed of `len` bytes inside the HSM and return it wrapped under master
    /// key `version`. The plaintext never leaves the HSM.
    pub async fn generate_wrapped_seed(&self, version: u32, len: usize) -> Result<Vec<u8>> {
        self.inner
            .pool
            .submit(move |w| {
                w.run(false, |s, _| {
                    let master = master_key(s, version)?;
                    let mut template = transient_seed_template();
                    template.push(Attribute::ValueLen((len as u64).into()));
                    let key = s.generate_key(&Mechanism::GenericSecretKeyGen, &template)?;
                    wrap_and_destroy(s, master, key)
                })
            })
            .await
    }

    /// Wrap an imported (or revealed) plaintext seed under master key `version`. The
    /// plaintext is zeroized, in the caller's buffer and in the object template.
    pub async fn wrap_seed(&self, version: u32, seed: Zeroizing<Vec<u8>>) -> Result<Vec<u8>> {
        self.inner
            .pool
            .submit(move |w| {
                let mut template = transient_seed_template();
                template.push(Attribute::Value(seed.to_vec()));
                let out = w.run(false, |s, _| {
                    let master = master_key(s, version)?;
                    let key = s.create_object(&template)?;
                    wrap_and_destroy(s, master, key)
                });
                for attr in &mut template {
                    if let Attribute::Value(v) = attr {
                        v.zeroize();
                    }
                }
                out
            })
            .await
    }

    /// HMAC of each 8-byte moving factor with the seed in `wrapped`, computed by the HSM.
    /// The seed is unwrapped into a cached session object on first use. Returns the MACs
    /// concatenated (`alg.digest_len()` bytes each), zeroized on drop.
    pub async fn seed_macs(
        &self,
        version: u32,
        wrapped: Arc<[u8]>,
        alg: HashAlgorithm,
        factors: Vec<[u8; 8]>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let inner = self.inner.clone();
        self.inner
            .pool
            .submit(move |w| {
                let cache = &inner.seeds;
                let mechanism = hmac_mechanism(alg);
                w.run(true, |s, _| {
                    // A cached handle can go stale (its session was replaced, or another
                    // worker evicted or displaced it): then look up or unwrap again.
                    for attempt in 0..STALE_RETRIES {
                        let handle = unwrapped(s, cache, version, &wrapped)?;
                        match macs(s, &mechanism, handle, alg, &factors) {
                            Err(e) if e.is_stale_handle() && attempt + 1 < STALE_RETRIES => {
                                tracing::debug!(error = %e, "unwrapped seed handle went stale");
                                let mut map = cache.lock();
                                if map.peek(&wrapped) == Some(&handle) {
                                    map.pop(&wrapped);
                                }
                            }
                            other => return other,
                        }
                    }
                    Err(Error::Invalid(
                        "unwrapped seed handle kept going stale".into(),
                    ))
                })
            })
            .await
    }

    /// (hits, misses, entries) of the unwrapped-seed cache.
    pub fn seed_cache_stats(&self) -> (u64, u64, usize) {
        let c = &self.inner.seeds;
        (
            c.hits.load(Ordering::Relaxed),
            c.misses.load(Ordering::Relaxed),
            c.lock().len(),
        )
    }

    /// Destroy every cached unwrapped seed (benches measure the cache-miss path with it).
    pub async fn clear_seed_cache(&self) -> Result<()> {
        let handles: Vec<ObjectHandle> = {
            let mut map = self.inner.seeds.lock();
            let all = map.iter().map(|(_, h)| *h).collect();
            map.clear();
            all
        };
        self.inner
            .pool
            .submit(move |w| {
                w.run(false, |s, _| {
                    for h in &handles {
                        // Already gone with its session: nothing to destroy.
                        let _ = s.destroy_object(*h);
                    }
                    Ok(())
                })
            })
            .await
    }
}

/// The unwrapped handle for `wrapped`, from the cache or by unwrapping now.
fn unwrapped(
    session: &Session,
    cache: &SeedCache,
    version: u32,
    wrapped: &Arc<[u8]>,
) -> Result<ObjectHandle> {
    if let Some(h) = cache.lock().get(wrapped) {
        cache.hits.fetch_add(1, Ordering::Relaxed);
        return Ok(*h);
    }
    cache.misses.fetch_add(1, Ordering::Relaxed);
    let master = master_key(session, version)?;
    let handle = session.unwrap_key(
        &Mechanism::AesKeyWrapPad,
        master,
        wrapped,
        &verification_seed_template(),
    )?;
    let displaced = cache.lock().push(wrapped.clone(), handle);
    if let Some((_, old)) = displaced {
        if old != handle {
            // Evicted (or raced in by another worker): destroy it so objects don't pile up.
            let _ = session.destroy_object(old);
        }
    }
    Ok(handle)
}

fn macs(
    session: &Session,
    mechanism: &Mechanism,
    key: ObjectHandle,
    alg: HashAlgorithm,
    factors: &[[u8; 8]],
) -> Result<Zeroizing<Vec<u8>>> {
    let len = alg.digest_len();
    let mut out = Zeroizing::new(Vec::with_capacity(len * factors.len()));
    for factor in factors {
        let mac = Zeroizing::new(session.sign(mechanism, key, factor)?);
        if mac.len() != len {
            return Err(Error::Invalid(format!(
                "HMAC of {} bytes, expected {len}",
                mac.len()
            )));
        }
        out.extend_from_slice(&mac);
    }
    Ok(out)
}
