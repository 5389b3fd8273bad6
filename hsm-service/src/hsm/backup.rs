//! Backups of signing key pairs: generation of keys that can be wrapped only for
//! backup, wrapping under a trusted KEK, and restoring onto another token.
//!
//! What SoftHSM 2.6.1 enforces (tested in `hsm::tests`):
//! - a private key with CKA_WRAP_WITH_TRUSTED = true wraps only under a wrapping key with
//!   CKA_TRUSTED = true (`C_WrapKey` answers CKR_KEY_NOT_WRAPPABLE otherwise), while an
//!   extractable key without it wraps under any wrapping key;
//! - CKA_TRUSTED can be set only by the security officer (a user session gets
//!   CKR_ATTRIBUTE_READ_ONLY), and an SO session creates public objects only; PKCS#11 has
//!   one login state per token and application, so the SO cannot log in while the
//!   service's user sessions are open on that token: the trusted KEK is provisioned with
//!   the service stopped ([`create_trusted_kek`]).
//!
//! It does not stop a user session from unwrapping a blob into an extractable key, and it
//! marks a key generated with CKA_EXTRACTABLE = true as CKA_NEVER_EXTRACTABLE = false for
//! ever: a backup key is recognisable as such on the token.

use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use secrecy::SecretString;
use zeroize::{Zeroize, Zeroizing};

use super::sign::{generate_with, KeyPairKind, PublicKeyAttributes};
use super::{module, objects, Error, GeneratedKeyPair, Hsm, HsmSettings, Result};

/// Length of a backup KEK: AES-256.
pub const KEK_LEN: usize = 32;

/// Create the trusted backup KEK `label` (AES-256 token object, public, sensitive, not
/// extractable, CKA_TRUSTED, wrap only) with value `value`, in a security officer
/// session. Blocking. Run it while no user session of this application is logged in on
/// that token (PKCS#11 allows one login state per token): with the service stopped.
pub fn create_trusted_kek(
    settings: &HsmSettings,
    so_pin: &SecretString,
    label: &str,
    value: Zeroizing<Vec<u8>>,
) -> Result<()> {
    if value.len() != KEK_LEN {
        return Err(Error::Invalid(format!("a backup KEK is {KEK_LEN} bytes")));
    }
    let ctx = module::load(&settings.module)?;
    let slot = module::find_token(&ctx, &settings.token)?;
    let session = ctx.open_rw_session(slot)?;
    session.login(UserType::So, Some(so_pin))?;
    let created = create_kek_object(&session, label, &value);
    let out = session.logout();
    created?;
    out?;
    Ok(())
}

/// Create a trusted backup KEK `label` like [`create_trusted_kek`], its value drawn from
/// the token's RNG (`C_GenerateRandom`) in the same SO session; refuses if a secret key
/// labelled `label` exists. Returns the value, for splitting into shares. Blocking; run
/// it with the service stopped.
pub fn create_random_trusted_kek(
    settings: &HsmSettings,
    so_pin: &SecretString,
    label: &str,
) -> Result<Zeroizing<Vec<u8>>> {
    let ctx = module::load(&settings.module)?;
    let slot = module::find_token(&ctx, &settings.token)?;
    let session = ctx.open_rw_session(slot)?;
    session.login(UserType::So, Some(so_pin))?;
    let out = (|| {
        if objects::search(&session, ObjectClass::SECRET_KEY, label)?.is_some() {
            return Err(Error::Invalid(format!(
                "a key labelled {label:?} exists on the token; KEKs are never replaced"
            )));
        }
        let mut value = Zeroizing::new(vec![0u8; KEK_LEN]);
        session.generate_random_slice(&mut value[..])?;
        create_kek_object(&session, label, &value)?;
        Ok(value)
    })();
    let logout = session.logout();
    let value = out?;
    logout?;
    Ok(value)
}

/// The trusted KEK template, shared by both ways of making one; the value buffer in the
/// template is zeroized whatever the outcome.
fn create_kek_object(
    session: &cryptoki::session::Session,
    label: &str,
    value: &[u8],
) -> Result<()> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Value(value.to_vec()),
    ];
    let created = session.create_object(&template);
    for attr in &mut template {
        if let Attribute::Value(v) = attr {
            v.zeroize();
        }
    }
    match created {
        // kryoptic 1.5 does not implement CKA_TRUSTED, not even for the SO: no key can
        // then be wrapped for backup, and nothing weaker is put in the KEK's place.
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::AttributeTypeInvalid, _)) => {
            Err(no_trusted_keks())
        }
        other => {
            other?;
            Ok(())
        }
    }
}

/// The refusal of a token without CKA_TRUSTED (see the README's compatibility table).
pub fn no_trusted_keks() -> Error {
    Error::Unsupported(
        "the token does not accept CKA_TRUSTED (C_CreateObject: CKR_ATTRIBUTE_TYPE_INVALID): \
         key backup needs a trusted KEK, so it is unavailable on this token"
            .into(),
    )
}

/// A private key wrapped for backup, with what is needed to put the pair back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKeyPair {
    /// The kind of pair.
    pub kind: KeyPairKind,
    /// CKA_ID of the pair.
    pub id: Vec<u8>,
    /// The public key's attributes.
    pub public: PublicKeyAttributes,
    /// The private key wrapped under the KEK (RFC 5649: `CKM_AES_KEY_WRAP_PAD` or
    /// `CKM_AES_KEY_WRAP_KWP`, see [`super::KeyWrap`]; PKCS#8 inside).
    pub wrapped_private_key: Vec<u8>,
}

fn key_type(kind: KeyPairKind) -> KeyType {
    match kind {
        KeyPairKind::EcP256 | KeyPairKind::EcP384 => KeyType::EC,
        KeyPairKind::Ed25519 => KeyType::EC_EDWARDS,
        KeyPairKind::Rsa3072 => KeyType::RSA,
    }
}

impl Hsm {
    /// Generate a signing key pair that can leave the token only wrapped for backup:
    /// the private key is sensitive, CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED (so only a
    /// trusted KEK, which only the SO can make, wraps it). Not retried.
    pub async fn generate_backup_key_pair(
        &self,
        kind: KeyPairKind,
        label: &str,
    ) -> Result<GeneratedKeyPair> {
        self.inner.mechanisms.require(kind)?;
        let label = label.to_owned();
        self.inner
            .pool
            .submit(move |w| w.run(false, |s, _| generate_with(s, kind, &label, true)))
            .await
    }

    /// Wrap the private key `key_id` of `kind` under the trusted KEK labelled
    /// `kek_label`, for a backup. The plaintext private key never leaves the HSM.
    pub async fn wrap_key_pair_for_backup(
        &self,
        kind: KeyPairKind,
        key_id: &[u8],
        kek_label: &str,
    ) -> Result<WrappedKeyPair> {
        let public = self.public_key_attributes(key_id, kind).await?;
        let wrap = self.key_wrap();
        let id = key_id.to_vec();
        let label = kek_label.to_owned();
        let wrapped = self
            .inner
            .pool
            .submit(move |w| {
                w.run(true, |s, _| {
                    let kek = objects::search(s, ObjectClass::SECRET_KEY, &label)?
                        .ok_or_else(|| Error::ObjectNotFound(label.clone()))?;
                    let key = objects::search_by_id(s, ObjectClass::PRIVATE_KEY, &id)?.ok_or_else(
                        || Error::ObjectNotFound("private key with that CKA_ID".into()),
                    )?;
                    Ok(s.wrap_key(&wrap.mechanism(), kek, key)?)
                })
            })
            .await?;
        Ok(WrappedKeyPair {
            kind,
            id: key_id.to_vec(),
            public,
            wrapped_private_key: wrapped,
        })
    }

    /// Put a backed-up key pair onto this token as token objects labelled `label`: the
    /// KEK `kek` becomes a session object (unwrap only) for the time of the unwrap and is
    /// destroyed; the private key is unwrapped sensitive, never extractable, sign-only;
    /// the public key is created from the backup. A wrong KEK (e.g. recombined from too
    /// few shares) fails the unwrap's integrity check. Refused if a private or public key
    /// with the pair's CKA_ID is on the token already.
    pub async fn restore_key_pair(
        &self,
        backup: &WrappedKeyPair,
        label: &str,
        kek: Zeroizing<Vec<u8>>,
    ) -> Result<()> {
        if kek.len() != KEK_LEN {
            return Err(Error::Invalid(format!("a backup KEK is {KEK_LEN} bytes")));
        }
        let wrap = self.key_wrap();
        let b = backup.clone();
        let label = label.as_bytes().to_vec();
        self.inner
            .pool
            .submit(move |w| {
                let mut kek_template = vec![
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(true),
                    Attribute::Value(kek.to_vec()),
                ];
                let out = w.run(false, |s, _| {
                    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                        if objects::search_by_id(s, class, &b.id)?.is_some() {
                            return Err(Error::Invalid(
                                "a key with that CKA_ID is on the token; a restore never \
                                 replaces a key"
                                    .into(),
                            ));
                        }
                    }
                    let kek = s.create_object(&kek_template)?;
                    let private = s.unwrap_key(
                        &wrap.mechanism(),
                        kek,
                        &b.wrapped_private_key,
                        &[
                            Attribute::Class(ObjectClass::PRIVATE_KEY),
                            Attribute::KeyType(key_type(b.kind)),
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(false),
                            Attribute::Sign(true),
                            Attribute::Decrypt(false),
                            Attribute::Unwrap(false),
                            Attribute::Derive(false),
                            Attribute::Id(b.id.clone()),
                            Attribute::Label(label.clone()),
                        ],
                    );
                    let destroyed = s.destroy_object(kek);
                    let private = private?;
                    destroyed?;
                    let mut public = vec![
                        Attribute::Class(ObjectClass::PUBLIC_KEY),
                        Attribute::KeyType(key_type(b.kind)),
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Verify(true),
                        Attribute::Encrypt(false),
                        Attribute::Wrap(false),
                        Attribute::Derive(false),
                        Attribute::Id(b.id.clone()),
                        Attribute::Label(label.clone()),
                    ];
                    match &b.public {
                        PublicKeyAttributes::Ec { ec_point }
                        | PublicKeyAttributes::Edwards { ec_point } => {
                            public
                                .push(Attribute::EcParams(super::sign::ec_params(b.kind).to_vec()));
                            public.push(Attribute::EcPoint(ec_point.clone()));
                        }
                        PublicKeyAttributes::Rsa {
                            modulus,
                            public_exponent,
                        } => {
                            public.push(Attribute::Modulus(modulus.clone()));
                            public.push(Attribute::PublicExponent(public_exponent.clone()));
                        }
                    }
                    if let Err(e) = s.create_object(&public) {
                        let _ = s.destroy_object(private);
                        return Err(e.into());
                    }
                    Ok(())
                });
                for attr in &mut kek_template {
                    if let Attribute::Value(v) = attr {
                        v.zeroize();
                    }
                }
                out
            })
            .await
    }
}
