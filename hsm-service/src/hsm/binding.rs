//! Seed bindings: an HMAC-SHA256 (`C_Sign` with `CKM_SHA256_HMAC`) under one token key
//! over a record's identity and parameters and its wrapped seed, so that a blob moved
//! into another record is refused before it is unwrapped.
//!
//! The binding key is a 256-bit generic secret on the token: sensitive, never
//! extractable, not modifiable, sign/verify only. It never changes (a new key would
//! orphan every binding), and the MAC is always computed here, never in the host.
//! This module sees bytes only: the caller's canonical context (tenant, id, kind, ...)
//! and the blob, which is appended here so a binding always covers the blob unwrapped.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use subtle::ConstantTimeEq;

use super::{objects, Error, Hsm, Result};

/// Token label of the seed binding key.
pub const SEED_BINDING_KEY_LABEL: &str = "seed-binding-key-1";

/// Length of a binding MAC.
pub const BINDING_LEN: usize = 32;

/// What a wrapped seed must be bound to before the HSM unwraps it: the record's
/// canonical context (see `credentials::binding`) and the MAC stored with it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SeedBinding {
    /// Canonical, length-prefixed encoding of the record's identity and parameters.
    pub context: Vec<u8>,
    /// The MAC the record holds.
    pub mac: [u8; BINDING_LEN],
}

impl std::fmt::Debug for SeedBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedBinding")
            .field("context_len", &self.context.len())
            .finish_non_exhaustive()
    }
}

/// The MAC input: the context, then the blob, each with a 4-byte big-endian length.
fn mac_input(context: &[u8], wrapped: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + context.len() + wrapped.len());
    for part in [context, wrapped] {
        // Both are far below 4 GiB (contexts are bounded fields, blobs at most ~80 bytes).
        out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// The binding of `wrapped` to `context`, computed with `key` in this session.
pub(crate) fn compute(
    session: &Session,
    key: ObjectHandle,
    context: &[u8],
    wrapped: &[u8],
) -> Result<[u8; BINDING_LEN]> {
    let mac = session.sign(&Mechanism::Sha256Hmac, key, &mac_input(context, wrapped))?;
    mac.try_into()
        .map_err(|m: Vec<u8>| Error::Invalid(format!("binding MAC of {} bytes", m.len())))
}

/// Refuse `wrapped` unless `binding` is its MAC under `key`: computed in the HSM,
/// compared in constant time.
pub(crate) fn check(
    session: &Session,
    key: ObjectHandle,
    wrapped: &[u8],
    binding: &SeedBinding,
) -> Result<()> {
    let expected = compute(session, key, &binding.context, wrapped)?;
    if bool::from(expected.ct_eq(&binding.mac)) {
        Ok(())
    } else {
        Err(Error::BindingMismatch)
    }
}

impl Hsm {
    /// The handle of the binding key, searched once and then cached.
    pub(crate) async fn binding_key(&self) -> Result<ObjectHandle> {
        self.find_object(ObjectClass::SECRET_KEY, SEED_BINDING_KEY_LABEL)
            .await?
            .ok_or_else(|| Error::ObjectNotFound(SEED_BINDING_KEY_LABEL.into()))
    }

    /// Whether the token holds the binding key.
    pub async fn has_seed_binding_key(&self) -> Result<bool> {
        Ok(self
            .find_object(ObjectClass::SECRET_KEY, SEED_BINDING_KEY_LABEL)
            .await?
            .is_some())
    }

    /// Make sure the binding key exists, creating it (256-bit generic secret, sensitive,
    /// never extractable, sign/verify only) if not. Returns true if created.
    pub async fn ensure_seed_binding_key(&self) -> Result<bool> {
        if self.has_seed_binding_key().await? {
            return Ok(false);
        }
        self.inner
            .pool
            .submit(move |w| {
                w.run(false, |s, _| {
                    // Another instance may have created it meanwhile.
                    if objects::search(s, ObjectClass::SECRET_KEY, SEED_BINDING_KEY_LABEL)?
                        .is_some()
                    {
                        return Ok(());
                    }
                    s.generate_key(
                        &Mechanism::GenericSecretKeyGen,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(KeyType::GENERIC_SECRET),
                            Attribute::ValueLen(32.into()),
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(false),
                            Attribute::Modifiable(false),
                            Attribute::Sign(true),
                            Attribute::Verify(true),
                            Attribute::Encrypt(false),
                            Attribute::Decrypt(false),
                            Attribute::Wrap(false),
                            Attribute::Unwrap(false),
                            Attribute::Derive(false),
                            Attribute::Label(SEED_BINDING_KEY_LABEL.as_bytes().to_vec()),
                        ],
                    )?;
                    Ok(())
                })
            })
            .await?;
        tracing::info!(label = SEED_BINDING_KEY_LABEL, "created seed binding key");
        self.has_seed_binding_key().await
    }

    /// The bindings of each `(context, wrapped)`, in one pool job.
    pub async fn seed_bindings(
        &self,
        items: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Vec<[u8; BINDING_LEN]>> {
        let key = self.binding_key().await?;
        self.inner
            .pool
            .submit(move |w| {
                w.run(true, |s, _| {
                    items
                        .iter()
                        .map(|(context, wrapped)| compute(s, key, context, wrapped))
                        .collect()
                })
            })
            .await
    }
}
