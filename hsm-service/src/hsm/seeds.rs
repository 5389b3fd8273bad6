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
//!
//! The master key itself enforces that shape: it is made with a `CKA_UNWRAP_TEMPLATE`
//! equal to the verification template, so the token refuses any other unwrap (an
//! extractable, readable, token or derivable copy) even to a holder of the user PIN.
//! SoftHSM 2.6.1 enforces it (`CKR_TEMPLATE_INCONSISTENT`; tested). PKCS#11 fixes the
//! attribute at creation: a master key made before has none, and the seed master key
//! rotation is how a deployment moves its seeds under one that has it.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;
use zeroize::{Zeroize, Zeroizing};

use super::binding::{self, SeedBinding, BINDING_LEN};
use super::{objects, Error, Hsm, KeyWrap, Result};
use crate::otp::HashAlgorithm;

/// Token label of master key `version`.
pub fn master_key_label(version: u32) -> String {
    format!("seed-master-key-{version}")
}

/// Counters shared by the workers' caches, and the epoch that clears them all.
#[derive(Default)]
pub(crate) struct SeedCacheShared {
    /// Lookups that found an unwrapped handle.
    pub(crate) hits: AtomicU64,
    /// Lookups that had to unwrap.
    pub(crate) misses: AtomicU64,
    /// Handles held by all workers together.
    pub(crate) entries: AtomicI64,
    /// Bumped to make every worker destroy its cached seeds.
    pub(crate) epoch: AtomicU64,
    /// Seeds of deleted credentials, numbered from 1, the last [`FORGOTTEN_RING`] of
    /// them: every worker destroys its copy before its next operation.
    forgotten: Mutex<VecDeque<(u64, SeedKey)>>,
    /// The number of the last one pushed (read without the lock on every operation).
    forgotten_head: AtomicU64,
}

/// Deleted credentials' seeds remembered for workers that have not run since: one that
/// falls further behind destroys its whole cache instead.
pub(crate) const FORGOTTEN_RING: usize = 4096;

/// One worker's unwrapped seeds: session objects of that worker's own session.
///
/// Each worker keeps its own cache rather than sharing one: a handle is then only ever
/// used and destroyed by the thread that owns it, never destroyed while another thread
/// signs with it. That matters because PKCS#11 may reuse a destroyed handle's number for
/// a new object (SoftHSM does): a shared cache could, after a race, sign with another
/// credential's seed. Keyed by the wrapped blob itself, so a credential deleted and
/// re-created under the same id can never use a stale seed, and by the binding it was
/// checked against (see [`SeedKey`]).
pub(crate) struct WorkerSeeds {
    map: lru::LruCache<SeedKey, ObjectHandle>,
    epoch: u64,
    /// The last forgotten seed (`SeedCacheShared::forgotten`) this worker has dropped.
    forgotten_seen: u64,
    shared: Arc<SeedCacheShared>,
}

impl WorkerSeeds {
    pub(crate) fn new(capacity: usize, shared: Arc<SeedCacheShared>) -> WorkerSeeds {
        WorkerSeeds {
            map: lru::LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            epoch: 0,
            forgotten_seen: shared.forgotten_head.load(Ordering::Acquire),
            shared,
        }
    }

    /// Destroy this worker's copies of the seeds forgotten since its last operation
    /// (deleted credentials): an unwrapped seed must not outlive its credential in the
    /// HSM, and would otherwise hold token memory until the LRU reached it. One atomic
    /// load when there is nothing new.
    pub(crate) fn drop_forgotten(&mut self, session: &Session) {
        if self.shared.forgotten_head.load(Ordering::Acquire) == self.forgotten_seen {
            return;
        }
        let ring = self
            .shared
            .forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(&(last, _)) = ring.back() else {
            return;
        };
        if ring
            .front()
            .is_some_and(|(first, _)| *first > self.forgotten_seen + 1)
        {
            // Some went by unseen: drop everything rather than keep one of them.
            drop(ring);
            self.destroy_all(session);
        } else {
            for (_, key) in ring.iter().filter(|(n, _)| *n > self.forgotten_seen) {
                if let Some(h) = self.map.pop(key) {
                    let _ = session.destroy_object(h);
                    self.shared.entries.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        self.forgotten_seen = last;
    }

    /// The session these objects belonged to is gone, and the objects with it.
    pub(crate) fn forget_all(&mut self) {
        let n = self.map.len() as i64;
        self.map.clear();
        self.shared.entries.fetch_sub(n, Ordering::Relaxed);
    }

    fn destroy_all(&mut self, session: &Session) {
        for (_, h) in self.map.iter() {
            let _ = session.destroy_object(*h);
        }
        self.forget_all();
    }

    #[cfg(test)]
    pub(crate) fn peek(&self, wrapped: &[u8]) -> Option<ObjectHandle> {
        self.map
            .iter()
            .find(|(k, _)| &*k.wrapped == wrapped)
            .map(|(_, h)| *h)
    }
}

/// What an unwrapped handle is cached under: the blob and the binding (record context
/// and stored MAC) that the HSM checked before unwrapping it.
///
/// Why the binding check is once per cache entry and not once per verification: the
/// MAC is a deterministic function of (binding key, context, blob), and the binding key
/// never changes, so a check that passed for this exact triple passes again. Keying the
/// cache by the triple (not by the blob alone) is what makes that sound: credential B
/// holding A's blob has another context, misses the cache even while A's handle is in
/// it, and is checked (and refused) before any unwrap. The hot path (a hit) thus costs
/// no extra HSM call; only a miss, which unwraps anyway, adds one `C_Sign`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct SeedKey {
    wrapped: Arc<[u8]>,
    binding: SeedBinding,
}

fn hmac_mechanism(alg: HashAlgorithm) -> Mechanism<'static> {
    match alg {
        HashAlgorithm::Sha1 => Mechanism::Sha1Hmac,
        HashAlgorithm::Sha256 => Mechanism::Sha256Hmac,
        HashAlgorithm::Sha512 => Mechanism::Sha512Hmac,
    }
}

/// Template of a transient, wrappable copy of a seed (import and generation only).
pub(super) fn transient_seed_template() -> Vec<Attribute> {
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

/// Template of an unwrapped seed used for verification: a session object, sensitive,
/// never extractable, sign-only (no verify, no derive). New master keys carry exactly
/// this as their `CKA_UNWRAP_TEMPLATE`, so it is the only shape they unwrap into.
pub(super) fn verification_seed_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

// A raw CK_ATTRIBUTE is (type, pointer, length) without padding on every ABI cryptoki
// supports (LP64 Unix; Windows packs PKCS#11 structs to 1 byte); `array_attribute`
// relies on it.
const _: () = assert!(
    std::mem::size_of::<cryptoki_sys::CK_ATTRIBUTE>()
        == 2 * std::mem::size_of::<cryptoki_sys::CK_ULONG>() + std::mem::size_of::<usize>()
);

/// Runs `f` with a `CKA_UNWRAP_TEMPLATE` attribute holding `template`.
///
/// cryptoki 0.12 has no variant for PKCS#11 array attributes, so the attribute goes
/// through `Attribute::VendorDefined` with the raw `CK_ATTRIBUTE[]` as its bytes. Those
/// entries point into `template`'s values, which is why the attribute only exists
/// inside `f`, while `template` is borrowed and cannot move or change.
fn with_unwrap_template<R>(template: &[Attribute], f: impl FnOnce(Attribute) -> R) -> R {
    use cryptoki_sys::{CKA_UNWRAP_TEMPLATE, CK_ATTRIBUTE};
    let mut raw = Vec::with_capacity(template.len() * std::mem::size_of::<CK_ATTRIBUTE>());
    for a in template {
        let entry = CK_ATTRIBUTE::from(a);
        raw.extend_from_slice(&entry.type_.to_ne_bytes());
        raw.extend_from_slice(&(entry.pValue as usize).to_ne_bytes());
        raw.extend_from_slice(&entry.ulValueLen.to_ne_bytes());
    }
    f(Attribute::VendorDefined((
        AttributeType::VendorDefined(CKA_UNWRAP_TEMPLATE),
        raw,
    )))
}

/// Whether the master key `handle` confines what it unwraps (a non-empty
/// `CKA_UNWRAP_TEMPLATE`). Master keys made before the template existed have none, and
/// PKCS#11 cannot add one afterwards (the attribute is fixed at creation).
fn has_unwrap_template(session: &Session, handle: ObjectHandle) -> Result<bool> {
    let info = session.get_attribute_info(
        handle,
        &[AttributeType::VendorDefined(
            cryptoki_sys::CKA_UNWRAP_TEMPLATE,
        )],
    )?;
    Ok(matches!(info.first(), Some(AttributeInfo::Available(n)) if *n > 0))
}

/// Wrap `key` under the master key (RFC 5649, by the name the token offers it: `wrap`)
/// and destroy it, whatever happens.
fn wrap_and_destroy(
    session: &Session,
    wrap: KeyWrap,
    master: ObjectHandle,
    key: ObjectHandle,
) -> Result<Vec<u8>> {
    let wrapped = session.wrap_key(&wrap.mechanism(), master, key);
    let destroyed = session.destroy_object(key);
    let wrapped = wrapped?;
    destroyed?;
    Ok(wrapped)
}

impl Hsm {
    /// The handle of master key `version`, searched once and then cached: the cache-miss
    /// path of verification must not search the token.
    async fn master_key(&self, version: u32) -> Result<ObjectHandle> {
        let label = master_key_label(version);
        self.find_object(ObjectClass::SECRET_KEY, &label)
            .await?
            .ok_or(Error::ObjectNotFound(label))
    }

    /// Make sure master key `version` exists on the token, creating it (AES-256,
    /// sensitive, never extractable, wrap/unwrap only, with the unwrap template of
    /// [`verification_seed_template`]) if not. Returns true if created.
    pub async fn ensure_seed_master_key(&self, version: u32) -> Result<bool> {
        self.create_seed_master_key(version, true).await
    }

    /// [`Hsm::ensure_seed_master_key`]; `confined = false` makes the key as versions
    /// before the unwrap template did (test support for the migration only).
    pub(crate) async fn create_seed_master_key(
        &self,
        version: u32,
        confined: bool,
    ) -> Result<bool> {
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
                    let mut template = vec![
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
                    ];
                    let confinement = verification_seed_template();
                    with_unwrap_template(&confinement, |unwrap_template| {
                        if confined {
                            template.push(unwrap_template);
                        }
                        s.generate_key(&Mechanism::AesKeyGen, &template)
                    })?;
                    Ok(())
                })
            })
            .await?;
        tracing::info!(label, confined, "created seed master key");
        Ok(self
            .find_object(ObjectClass::SECRET_KEY, &label)
            .await?
            .is_some())
    }

    /// Whether master key `version` carries the unwrap template (it was made by this
    /// version of the service or a later one), so that what it unwraps can only be a
    /// sensitive, non-extractable, sign-only session object.
    pub async fn seed_master_key_confined(&self, version: u32) -> Result<bool> {
        let master = self.master_key(version).await?;
        self.inner
            .pool
            .submit(move |w| w.run(true, |s, _| has_unwrap_template(s, master)))
            .await
    }

    /// Generate a seed of `len` bytes inside the HSM and return it wrapped under master
    /// key `version`. The plaintext never leaves the HSM.
    pub async fn generate_wrapped_seed(&self, version: u32, len: usize) -> Result<Vec<u8>> {
        let wrap = self.key_wrap();
        let master = self.master_key(version).await?;
        self.inner
            .pool
            .submit(move |w| {
                w.run(false, |s, _| {
                    let mut template = transient_seed_template();
                    template.push(Attribute::ValueLen((len as u64).into()));
                    let key = s.generate_key(&Mechanism::GenericSecretKeyGen, &template)?;
                    wrap_and_destroy(s, wrap, master, key)
                })
            })
            .await
    }

    /// Wrap an imported (or revealed) plaintext seed under master key `version`. The
    /// plaintext is zeroized, in the caller's buffer and in the object template.
    pub async fn wrap_seed(&self, version: u32, seed: Zeroizing<Vec<u8>>) -> Result<Vec<u8>> {
        let wrap = self.key_wrap();
        let master = self.master_key(version).await?;
        self.inner
            .pool
            .submit(move |w| {
                let mut template = transient_seed_template();
                template.push(Attribute::Value(seed.to_vec()));
                let out = w.run(false, |s, _| {
                    let key = s.create_object(&template)?;
                    wrap_and_destroy(s, wrap, master, key)
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

    /// Re-wrap seeds from master key `old` to master key `new`, in one pool job: each
    /// blob's binding is checked first (a blob not bound to its record is never
    /// re-wrapped, which would launder it: its item is `None`); it is then unwrapped
    /// under `old` into a session object that is sensitive and extractable only so that
    /// `C_WrapKey` can wrap it (no sign, no verify), wrapped under `new`
    /// (`CKM_AES_KEY_WRAP_PAD`) and destroyed at once, whatever happens, and the new blob
    /// is bound to the same context. No plaintext seed leaves the HSM. Returns the new
    /// blobs and bindings in the order given. Only from a master key without the unwrap
    /// template: one with it never unwraps into an extractable object (see
    /// [`confined_key`]).
    pub async fn rewrap_seeds(
        &self,
        old: u32,
        new: u32,
        items: Vec<(Arc<[u8]>, SeedBinding)>,
    ) -> Result<Vec<Option<(Vec<u8>, [u8; BINDING_LEN])>>> {
        if old == new {
            return Err(Error::Invalid(format!(
                "re-wrap from master key version {old} to itself"
            )));
        }
        let wrap = self.key_wrap();
        let from = self.master_key(old).await?;
        let to = self.master_key(new).await?;
        let bind = self.binding_key().await?;
        self.inner
            .pool
            .submit(move |w| {
                w.run(false, |s, _| {
                    if has_unwrap_template(s, from)? {
                        return Err(confined_key(old));
                    }
                    let template = transient_seed_template();
                    items
                        .iter()
                        .map(|(blob, b)| {
                            match binding::check(s, bind, blob, b) {
                                Err(Error::BindingMismatch) => return Ok(None),
                                other => other?,
                            }
                            let key = s.unwrap_key(&wrap.mechanism(), from, blob, &template)?;
                            let wrapped = wrap_and_destroy(s, wrap, to, key)?;
                            let mac = binding::compute(s, bind, &b.context, &wrapped)?;
                            Ok(Some((wrapped, mac)))
                        })
                        .collect()
                })
            })
            .await
    }

    /// HMAC of each 8-byte moving factor with the seed in `wrapped`, computed by the HSM.
    /// The seed is unwrapped into a cached session object on first use, after the HSM
    /// checked `binding` (see [`SeedKey`]; [`Error::BindingMismatch`] when it does not
    /// match, and nothing is unwrapped). Returns the MACs concatenated
    /// (`alg.digest_len()` bytes each), zeroized on drop. A master or binding key handle
    /// that went stale (the token dropped its handles with its last session) is searched
    /// again, once.
    pub async fn seed_macs(
        &self,
        version: u32,
        wrapped: Arc<[u8]>,
        binding: SeedBinding,
        alg: HashAlgorithm,
        factors: Vec<[u8; 8]>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let again = (wrapped.clone(), binding.clone(), factors.clone());
        match self
            .seed_macs_once(version, wrapped, binding, alg, factors)
            .await
        {
            Err(e) if e.is_stale_handle() => {
                tracing::warn!(error = %e, "stale key handle; searching the keys again");
                self.forget_all_objects();
                self.seed_macs_once(version, again.0, again.1, alg, again.2)
                    .await
            }
            other => other,
        }
    }

    async fn seed_macs_once(
        &self,
        version: u32,
        wrapped: Arc<[u8]>,
        binding: SeedBinding,
        alg: HashAlgorithm,
        factors: Vec<[u8; 8]>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let wrap = self.key_wrap();
        let master = self.master_key(version).await?;
        let bind = self.binding_key().await?;
        let key = SeedKey { wrapped, binding };
        self.inner
            .pool
            .submit(move |w| {
                let mechanism = hmac_mechanism(alg);
                let keys = KeysOf { master, bind, wrap };
                w.run(true, |s, seeds| {
                    let epoch = seeds.shared.epoch.load(Ordering::Relaxed);
                    if seeds.epoch != epoch {
                        seeds.destroy_all(s);
                        seeds.epoch = epoch;
                    }
                    let handle = unwrapped(s, seeds, keys, &key)?;
                    let out = macs(s, &mechanism, handle, alg, &factors);
                    if out.as_ref().is_err_and(Error::is_stale_handle) {
                        // Only this thread uses its handles, so this means the object
                        // went away underneath us: forget it and unwrap afresh, once.
                        if seeds.map.pop(&key).is_some() {
                            seeds.shared.entries.fetch_sub(1, Ordering::Relaxed);
                        }
                        let handle = unwrapped(s, seeds, keys, &key)?;
                        return macs(s, &mechanism, handle, alg, &factors);
                    }
                    out
                })
            })
            .await
    }

    /// (hits, misses, entries) of the unwrapped-seed caches of all workers.
    pub fn seed_cache_stats(&self) -> (u64, u64, usize) {
        let c = &self.inner.seeds;
        (
            c.hits.load(Ordering::Relaxed),
            c.misses.load(Ordering::Relaxed),
            usize::try_from(c.entries.load(Ordering::Relaxed)).unwrap_or(0),
        )
    }

    /// Make every worker destroy its cached copy of the seed `wrapped` (checked against
    /// `binding`) before its next operation: its credential was deleted. (A verification
    /// that read the record before the delete may still unwrap it once more; that copy
    /// leaves with the LRU, as every copy did before.)
    pub fn forget_seed(&self, wrapped: Arc<[u8]>, binding: SeedBinding) {
        let shared = &self.inner.seeds;
        let mut ring = shared.forgotten.lock().unwrap_or_else(|p| p.into_inner());
        let n = ring.back().map_or(0, |(n, _)| *n) + 1;
        ring.push_back((n, SeedKey { wrapped, binding }));
        if ring.len() > FORGOTTEN_RING {
            ring.pop_front();
        }
        shared.forgotten_head.store(n, Ordering::Release);
    }

    /// Make every worker destroy its cached unwrapped seeds before its next HMAC
    /// (benches measure the cache-miss path with it).
    pub fn clear_seed_cache(&self) {
        self.inner.seeds.epoch.fetch_add(1, Ordering::Relaxed);
    }
}

/// A re-wrap from a master key with the unwrap template: refused by the token, by design.
pub(crate) fn confined_key(version: u32) -> Error {
    Error::Invalid(format!(
        "{} unwraps only into non-extractable keys (CKA_UNWRAP_TEMPLATE): its seeds cannot be re-wrapped with the user PIN",
        master_key_label(version)
    ))
}

/// The token keys a verification's unwrap needs.
#[derive(Clone, Copy)]
struct KeysOf {
    master: ObjectHandle,
    bind: ObjectHandle,
    wrap: KeyWrap,
}

/// The unwrapped handle for `key`, from this worker's cache or, once its binding is
/// checked, by unwrapping now.
fn unwrapped(
    session: &Session,
    seeds: &mut WorkerSeeds,
    keys: KeysOf,
    key: &SeedKey,
) -> Result<ObjectHandle> {
    if let Some(h) = seeds.map.get(key) {
        seeds.shared.hits.fetch_add(1, Ordering::Relaxed);
        crate::metrics::seed_cache_hit();
        return Ok(*h);
    }
    seeds.shared.misses.fetch_add(1, Ordering::Relaxed);
    crate::metrics::seed_cache_miss();
    binding::check(session, keys.bind, &key.wrapped, &key.binding)?;
    let handle = session.unwrap_key(
        &keys.wrap.mechanism(),
        keys.master,
        &key.wrapped,
        &verification_seed_template(),
    )?;
    seeds.shared.entries.fetch_add(1, Ordering::Relaxed);
    if let Some((_, evicted)) = seeds.map.push(key.clone(), handle) {
        // The least recently used seed of this worker: nobody else holds its handle.
        let _ = session.destroy_object(evicted);
        seeds.shared.entries.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::seed_cache_eviction();
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
