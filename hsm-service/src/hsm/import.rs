//! PSKC import (RFC 6030 section 6): the file's transport key as a session object, the
//! MAC checks and the decryption of each secret inside the HSM, and the re-wrap under
//! the seed master key (see [`super::seeds`]).
//!
//! For one batch of entries, in one pool job on one session:
//! 1. the transport key becomes a session object (AES: `C_CreateObject`, sensitive,
//!    unwrap/decrypt only; RSA: the token's own `pskc-transport-NAME` private key);
//! 2. the MAC key is unwrapped from the file's `MACKey` into a sign-only session key;
//! 3. per entry: `C_Sign` (HMAC) over the CipherValue, compared with the `ValueMAC` in
//!    constant time, before anything is decrypted; then `C_UnwrapKey` of the
//!    ciphertext (`CKM_AES_CBC_PAD` with the file's IV, `CKM_AES_KEY_WRAP`,
//!    `CKM_RSA_PKCS_OAEP`) straight into a sensitive session key, whose `CKA_VALUE_LEN`
//!    (not sensitive) gives the seed's length; `C_WrapKey` under the master key;
//!    `C_DestroyObject`; the binding MAC of the new record;
//! 4. the session objects of the batch are destroyed, whatever happened.
//!
//! The plaintext seed never exists in host memory on that path. Where the token cannot
//! do a step, the secret is decrypted with `C_Decrypt` into a zeroized buffer instead
//! (counted, and reported per import):
//! * a seed shorter than its HMAC's digest: seeds are zero-padded to the digest length
//!   at rest (as `CreateCredential` does, so that SoftHSM accepts them as HMAC keys), and
//!   PKCS#11 has no operation that appends bytes to a secret key's value inside the
//!   token;
//! * CBC padding that is not PKCS#7: XML Encryption pads with arbitrary bytes and only
//!   the last one counts (ISO 10126), while `CKM_AES_CBC_PAD` insists on PKCS#7, which
//!   SoftHSM checks (`CKR_WRAPPED_KEY_INVALID`); the padding oracle this could be is
//!   closed by the MAC check that comes first (unmaced entries are the operator's
//!   explicit choice);
//! * a MAC key the HSM cannot hold as an HMAC key (shorter than the digest), likewise.
//!
//! A plain (unencrypted) secret is in host memory by the file's nature; it is wrapped
//! like `CreateCredential`'s imported seeds.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::Arc;

use cryptoki::error::RvError;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::binding::{self, BINDING_LEN};
use super::seeds::master_key_label;
use super::{Error, Hsm, Result};

/// Token label prefix of PSKC transport key pairs (`pskc-transport-NAME`).
pub const TRANSPORT_LABEL_PREFIX: &str = "pskc-transport-";

/// Bits of a transport key pair's modulus.
pub const TRANSPORT_RSA_BITS: u64 = 3072;

/// How one secret (or the MAC key) is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// xmlenc `aes{128,192,256}-cbc`: IV (16 bytes) then ciphertext; the key length in
    /// bytes must be the transport key's.
    AesCbc(usize),
    /// xmlenc `kw-aes{128,192,256}` (RFC 3394).
    KwAes(usize),
    /// xmlenc `rsa-oaep-mgf1p` (SHA-1, MGF1-SHA-1).
    RsaOaep,
    /// xmlenc `rsa-1_5` (PKCS#1 v1.5; Bleichenbacher-prone, only on request).
    RsaPkcs1,
}

/// The transport key of a file.
pub enum Transport {
    /// A pre-shared (or password-derived) AES key.
    Aes(Zeroizing<Vec<u8>>),
    /// An RSA key pair made with [`Hsm::create_transport_key`], by name.
    Rsa(String),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Aes(k) => write!(f, "Aes({} bytes)", k.len()),
            Transport::Rsa(n) => write!(f, "Rsa({n:?})"),
        }
    }
}

/// HMAC of the file's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacAlgorithm {
    /// HMAC-SHA-1 (20 bytes).
    Sha1,
    /// HMAC-SHA-256 (32 bytes).
    Sha256,
}

impl MacAlgorithm {
    fn len(self) -> usize {
        match self {
            MacAlgorithm::Sha1 => 20,
            MacAlgorithm::Sha256 => 32,
        }
    }

    fn mechanism(self) -> Mechanism<'static> {
        match self {
            MacAlgorithm::Sha1 => Mechanism::Sha1Hmac,
            MacAlgorithm::Sha256 => Mechanism::Sha256Hmac,
        }
    }
}

/// The file's MAC key, encrypted under the transport key.
#[derive(Debug, Clone)]
pub struct MacKey {
    /// The HMAC.
    pub algorithm: MacAlgorithm,
    /// How it is encrypted.
    pub method: Encryption,
    /// Its CipherValue.
    pub cipher_value: Vec<u8>,
}

/// One entry's secret.
#[derive(Clone)]
pub enum Secret {
    /// An EncryptedValue.
    Encrypted {
        /// How.
        method: Encryption,
        /// CipherValue (CBC: IV then ciphertext).
        cipher_value: Vec<u8>,
        /// ValueMAC; `None`: unmaced (the caller decided to accept it).
        value_mac: Option<Vec<u8>>,
    },
    /// A PlainValue.
    Plain(Zeroizing<Vec<u8>>),
}

/// One entry to decrypt and wrap.
pub struct Item {
    /// Its secret.
    pub secret: Secret,
    /// Seeds shorter than this are zero-padded to it (the HMAC's digest length).
    pub pad_to: usize,
    /// Accepted seed lengths (before padding).
    pub lengths: RangeInclusive<usize>,
    /// The binding context of the new record (see `credentials::binding`).
    pub context: Vec<u8>,
    /// An existing record's blob and its master key version: compare instead of bind.
    pub existing: Option<(u32, Vec<u8>)>,
}

/// What became of one item.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Wrapped under the master key and bound to its context.
    Wrapped {
        /// The blob.
        wrapped: Vec<u8>,
        /// Its binding MAC.
        binding: [u8; BINDING_LEN],
        /// Decrypted inside the HSM (no plaintext in host memory).
        in_hsm: bool,
    },
    /// The same seed as the existing record's (the HSM wrapped it to the same blob).
    Same {
        /// Decrypted inside the HSM.
        in_hsm: bool,
    },
    /// Another seed than the existing record's.
    Different {
        /// Decrypted inside the HSM.
        in_hsm: bool,
    },
    /// Not decrypted or not acceptable: why (never secret).
    Refused(String),
}

/// A batch of items under one transport key.
pub struct Batch {
    /// The transport key.
    pub transport: Arc<Transport>,
    /// The MAC key, when the file has one.
    pub mac_key: Option<MacKey>,
    /// The master key the new blobs are wrapped under.
    pub master_version: u32,
    /// The entries.
    pub items: Vec<Item>,
    /// Accept `rsa-1_5`.
    pub allow_rsa_1_5: bool,
}

/// Why a whole batch (the header's material) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum BatchRefused {
    /// The transport material does not work (wrong key or password, unknown name).
    #[error("{0}")]
    Transport(String),
    /// No transport key pair of that name on the token.
    #[error("{0}")]
    NoTransportKey(String),
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] Error),
}

/// Session objects of one batch, destroyed on drop.
struct Objects<'s> {
    session: &'s Session,
    owned: Vec<ObjectHandle>,
    /// Cleared when the token answered `CKR_MECHANISM_INVALID` to an AES unwrap: the
    /// batch's other values go straight to the buffer path.
    aes_unwrap: bool,
}

impl Drop for Objects<'_> {
    fn drop(&mut self) {
        for h in self.owned.drain(..) {
            let _ = self.session.destroy_object(h);
        }
    }
}

/// The transport key as the batch uses it.
#[derive(Clone, Copy)]
enum TransportKey {
    Aes { handle: ObjectHandle, len: usize },
    Rsa(ObjectHandle),
}

/// Template of a MAC key: a sensitive, non-extractable, sign-only session key (the
/// shape of a verification seed).
fn mac_key_template() -> Vec<Attribute> {
    super::seeds::verification_seed_template()
}

/// Template of a decrypted seed: the transient seed shape (extractable only so that
/// `C_WrapKey` can wrap it under the master key, destroyed right after), no derive.
fn seed_template() -> Vec<Attribute> {
    let mut template = super::seeds::transient_seed_template();
    template.push(Attribute::Derive(false));
    template
}

fn oaep() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

/// Token label of transport key pair `name`.
pub fn transport_label(name: &str) -> String {
    format!("{TRANSPORT_LABEL_PREFIX}{name}")
}

/// Failures of the token that mean "this ciphertext does not decrypt to a key" rather
/// than "the token broke".
fn undecryptable(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11 { rv, .. } if matches!(
            rv,
            RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::KeySizeRange
                | RvError::TemplateInconsistent
                | RvError::MechanismInvalid
                | RvError::MechanismParamInvalid
                | RvError::DataLenRange
        )
    )
}

/// XML Encryption's block padding (ISO 10126: only the last byte, the pad length 1..16,
/// is defined) removed in place.
fn unpad_xmlenc(buf: &mut Zeroizing<Vec<u8>>) -> std::result::Result<(), String> {
    let n = usize::from(*buf.last().ok_or("empty plaintext")?);
    if n == 0 || n > 16 || n > buf.len() {
        return Err("the CBC padding is invalid (wrong transport key?)".into());
    }
    let keep = buf.len() - n;
    buf[keep..].zeroize();
    buf.truncate(keep);
    Ok(())
}

impl<'s> Objects<'s> {
    fn new(session: &'s Session) -> Self {
        Objects {
            session,
            owned: Vec::new(),
            aes_unwrap: true,
        }
    }

    /// The method's mechanism and data for `C_UnwrapKey` / `C_Decrypt`, if `transport`
    /// can decrypt it.
    fn mechanism(
        transport: TransportKey,
        method: Encryption,
        cipher_value: &[u8],
        allow_rsa_1_5: bool,
        pad: bool,
    ) -> std::result::Result<(ObjectHandle, Mechanism<'static>, &[u8]), String> {
        match (transport, method) {
            (TransportKey::Aes { handle, len }, Encryption::AesCbc(n)) => {
                if n != len {
                    return Err(format!(
                        "aes{}-cbc does not match the {}-bit transport key",
                        n * 8,
                        len * 8
                    ));
                }
                if cipher_value.len() < 32 || cipher_value.len() % 16 != 0 {
                    return Err("the CipherValue is not an IV and whole AES blocks".to_string());
                }
                let (iv, data) = cipher_value.split_at(16);
                let iv: [u8; 16] = iv.try_into().map_err(|_| "short IV".to_string())?;
                let m = if pad {
                    Mechanism::AesCbcPad(iv)
                } else {
                    Mechanism::AesCbc(iv)
                };
                Ok((handle, m, data))
            }
            (TransportKey::Aes { handle, len }, Encryption::KwAes(n)) => {
                if n != len {
                    return Err(format!(
                        "kw-aes{} does not match the {}-bit transport key",
                        n * 8,
                        len * 8
                    ));
                }
                if cipher_value.len() < 24 || cipher_value.len() % 8 != 0 {
                    return Err("the CipherValue is not an AES key wrap".to_string());
                }
                Ok((handle, Mechanism::AesKeyWrap, cipher_value))
            }
            (TransportKey::Rsa(h), Encryption::RsaOaep) => Ok((h, oaep(), cipher_value)),
            (TransportKey::Rsa(h), Encryption::RsaPkcs1) => {
                if allow_rsa_1_5 {
                    Ok((h, Mechanism::RsaPkcs, cipher_value))
                } else {
                    Err("rsa-1_5 (PKCS#1 v1.5) is refused unless explicitly allowed: it is Bleichenbacher-prone".into())
                }
            }
            (TransportKey::Aes { .. }, _) => {
                Err("an RSA-encrypted value needs --transport-key".into())
            }
            (TransportKey::Rsa(_), _) => Err(
                "a symmetric-encrypted value cannot be decrypted with an RSA transport key".into(),
            ),
        }
    }

    /// Whether the unwrapped key `h` can be used as it is. Its length: `CKA_VALUE_LEN`
    /// where the token records it (SoftHSM 2.6.1 leaves it 0 on unwrapped generic
    /// secrets), else exact from an AES key wrap's length, else (RSA) whether the token
    /// takes it as a key of the HMAC `probe` (SoftHSM refuses HMAC keys shorter than the
    /// digest with `CKR_KEY_SIZE_RANGE`: exactly the keys that must be padded).
    fn usable(
        &self,
        h: ObjectHandle,
        method: Encryption,
        data_len: usize,
        probe: &Mechanism<'static>,
        min_len: usize,
        lengths: &RangeInclusive<usize>,
    ) -> Result<Usable> {
        let recorded = value_len(self.session, h)?;
        let len = match (recorded, method) {
            (n, _) if n > 0 => Some(n),
            (_, Encryption::KwAes(_)) => data_len.checked_sub(8),
            _ => None,
        };
        Ok(match len {
            Some(len) if !lengths.contains(&len) => Usable::Refused(length_refused(len, lengths)),
            Some(len) if len >= min_len => Usable::Yes,
            Some(_) => Usable::TooShort,
            None => match self.session.sign(probe, h, b"").map_err(Error::from) {
                Ok(_) => Usable::Yes,
                Err(Error::Pkcs11 {
                    rv: RvError::KeySizeRange,
                    ..
                }) => Usable::TooShort,
                Err(e) => return Err(e),
            },
        })
    }

    /// Decrypt `cipher_value` into a session key of `template`, at least `min_len`
    /// bytes long after zero padding, inside the HSM when it can, else through a
    /// zeroized buffer. `Ok(Err(reason))`: this value does not decrypt (or has an
    /// unacceptable length). Returns the handle (owned by `self`) and whether the HSM
    /// did it alone.
    #[allow(clippy::too_many_arguments)]
    fn decrypt_into_key(
        &mut self,
        transport: TransportKey,
        method: Encryption,
        cipher_value: &[u8],
        template: &[Attribute],
        min_len: usize,
        lengths: &RangeInclusive<usize>,
        allow_rsa_1_5: bool,
    ) -> Result<std::result::Result<(ObjectHandle, bool), String>> {
        let s = self.session;
        let probe = hmac_for(min_len);
        let rsa = matches!(method, Encryption::RsaOaep | Encryption::RsaPkcs1);
        // An RSA-unwrapped key's length is only learnt by using it (see `usable`).
        let mut template = template.to_vec();
        if rsa {
            template.retain(|a| !matches!(a, Attribute::Sign(_)));
            template.push(Attribute::Sign(true));
        }
        let template = &template[..];
        let probe = &probe;
        let (key, m, data) =
            match Self::mechanism(transport, method, cipher_value, allow_rsa_1_5, true) {
                Ok(x) => x,
                Err(reason) => return Ok(Err(reason)),
            };
        let aes = matches!(method, Encryption::AesCbc(_));
        let tried = if aes && !self.aes_unwrap {
            Err(Error::Pkcs11 {
                function: cryptoki::context::Function::UnwrapKey,
                rv: RvError::MechanismInvalid,
            })
        } else {
            s.unwrap_key(&m, key, data, template).map_err(Error::from)
        };
        match tried {
            Ok(h) => match self.usable(h, method, data.len(), probe, min_len, lengths) {
                Ok(Usable::Yes) => {
                    self.owned.push(h);
                    return Ok(Ok((h, true)));
                }
                Ok(Usable::Refused(reason)) => {
                    let _ = s.destroy_object(h);
                    return Ok(Err(reason));
                }
                // Too short for the HSM to use as it is: through a buffer, padded.
                Ok(Usable::TooShort) => {
                    let _ = s.destroy_object(h);
                }
                Err(e) => {
                    let _ = s.destroy_object(h);
                    return Err(e);
                }
            },
            // SoftHSM answers a bad OAEP block with CKR_GENERAL_ERROR.
            Err(e)
                if undecryptable(&e)
                    || (rsa
                        && matches!(
                            e,
                            Error::Pkcs11 {
                                rv: RvError::GeneralError,
                                ..
                            }
                        )) =>
            {
                if aes
                    && matches!(
                        e,
                        Error::Pkcs11 {
                            rv: RvError::MechanismInvalid,
                            ..
                        }
                    )
                {
                    self.aes_unwrap = false;
                }
                if matches!(method, Encryption::RsaOaep | Encryption::RsaPkcs1) {
                    // No second try with an RSA private key: one refusal, one answer
                    // (no oracle beyond it).
                    return Ok(Err(
                        "the value does not decrypt with the transport key".into()
                    ));
                }
            }
            Err(e) => return Err(e),
        }
        // The fallback: C_Decrypt into a zeroized buffer.
        let (key, m, data) =
            match Self::mechanism(transport, method, cipher_value, allow_rsa_1_5, false) {
                Ok(x) => x,
                Err(reason) => return Ok(Err(reason)),
            };
        let mut plain = match s.decrypt(&m, key, data).map_err(Error::from) {
            Ok(p) => Zeroizing::new(p),
            Err(e) if undecryptable(&e) => {
                return Ok(Err(
                    "the value does not decrypt with the transport key".into()
                ))
            }
            Err(e) => return Err(e),
        };
        if matches!(method, Encryption::AesCbc(_)) {
            if let Err(reason) = unpad_xmlenc(&mut plain) {
                return Ok(Err(reason));
            }
        }
        let len = plain.len();
        if !lengths.contains(&len) {
            return Ok(Err(length_refused(len, lengths)));
        }
        let mut padded = Zeroizing::new(Vec::with_capacity(len.max(min_len)));
        padded.extend_from_slice(&plain);
        padded.resize(len.max(min_len), 0);
        drop(plain);
        let h = self.create_secret(template, padded)?;
        Ok(Ok((h, false)))
    }

    /// A session key of `template` with value `value` (zeroized, here and in the
    /// template copy).
    fn create_secret(
        &mut self,
        template: &[Attribute],
        value: Zeroizing<Vec<u8>>,
    ) -> Result<ObjectHandle> {
        let mut t = template.to_vec();
        t.push(Attribute::Value(value.to_vec()));
        let out = self.session.create_object(&t);
        for a in &mut t {
            if let Attribute::Value(v) = a {
                v.zeroize();
            }
        }
        let h = out?;
        self.owned.push(h);
        Ok(h)
    }

    fn destroy(&mut self, h: ObjectHandle) {
        if let Some(i) = self.owned.iter().position(|o| *o == h) {
            self.owned.swap_remove(i);
        }
        let _ = self.session.destroy_object(h);
    }
}

/// What [`Objects::usable`] found.
enum Usable {
    Yes,
    TooShort,
    Refused(String),
}

/// The HMAC whose key length is `digest_len`.
fn hmac_for(digest_len: usize) -> Mechanism<'static> {
    match digest_len {
        0..=20 => Mechanism::Sha1Hmac,
        21..=32 => Mechanism::Sha256Hmac,
        _ => Mechanism::Sha512Hmac,
    }
}

fn length_refused(len: usize, lengths: &RangeInclusive<usize>) -> String {
    format!(
        "the secret is {len} bytes; accepted are {} to {}",
        lengths.start(),
        lengths.end()
    )
}

fn value_len(s: &Session, h: ObjectHandle) -> Result<usize> {
    let attrs = s.get_attributes(h, &[AttributeType::ValueLen])?;
    attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::ValueLen(n) => usize::try_from(u64::from(n)).ok(),
            _ => None,
        })
        .ok_or_else(|| Error::Invalid("the token returned no CKA_VALUE_LEN".into()))
}

/// The token keys one batch needs, looked up before the pool job.
struct Handles {
    masters: HashMap<u32, ObjectHandle>,
    bind: ObjectHandle,
    rsa: Option<ObjectHandle>,
    /// The token's RFC 5649 key wrap (see `mechanisms::KeyWrap`).
    wrap: super::KeyWrap,
}

impl Hsm {
    /// Decrypt, check and wrap one batch (see the module doc), in one pool job.
    /// `Err(BatchRefused::Transport)`: the header's material does not work (the MAC key
    /// does not decrypt, the RSA key does not exist): nothing was decrypted.
    pub async fn import_batch(
        &self,
        batch: Batch,
    ) -> std::result::Result<Vec<Outcome>, BatchRefused> {
        let mut masters = HashMap::new();
        let versions = std::iter::once(batch.master_version).chain(
            batch
                .items
                .iter()
                .filter_map(|i| i.existing.as_ref().map(|e| e.0)),
        );
        for v in versions {
            if masters.contains_key(&v) {
                continue;
            }
            let label = master_key_label(v);
            if let Some(h) = self.find_object(ObjectClass::SECRET_KEY, &label).await? {
                masters.insert(v, h);
            } else if v == batch.master_version {
                return Err(Error::ObjectNotFound(label).into());
            }
        }
        let rsa = match &*batch.transport {
            Transport::Rsa(name) => {
                let label = transport_label(name);
                Some(
                    self.find_object(ObjectClass::PRIVATE_KEY, &label)
                        .await?
                        .ok_or_else(|| {
                            BatchRefused::NoTransportKey(format!(
                                "no transport key {name:?} on the token (hsm-service pskc-transport-key)"
                            ))
                        })?,
                )
            }
            Transport::Aes(_) => None,
        };
        let handles = Handles {
            masters,
            bind: self.binding_key().await?,
            rsa,
            wrap: self.key_wrap(),
        };
        self.inner
            .pool
            .submit(move |w| {
                let mut batch = Some(batch);
                w.run(false, |s, _| {
                    let b = batch
                        .take()
                        .ok_or_else(|| Error::Invalid("batch ran twice".into()))?;
                    Ok(run_batch(s, &handles, b))
                })
            })
            .await
            .map_err(BatchRefused::Hsm)?
    }

    /// Create the RSA transport key pair `name` (3072 bits; private key sensitive,
    /// never extractable, decrypt/unwrap only, on the token) and return its public key
    /// as DER SubjectPublicKeyInfo pieces (modulus, exponent). Refuses a name in use.
    pub async fn create_transport_key(&self, name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let label = transport_label(name);
        if self
            .find_object(ObjectClass::PRIVATE_KEY, &label)
            .await?
            .is_some()
        {
            return Err(Error::Invalid(format!("transport key {name:?} exists")));
        }
        self.inner
            .pool
            .submit(move |w| {
                w.run(false, |s, _| {
                    let public = [
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Encrypt(true),
                        Attribute::Wrap(true),
                        Attribute::Verify(false),
                        Attribute::ModulusBits(TRANSPORT_RSA_BITS.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ];
                    let private = [
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Modifiable(false),
                        Attribute::Decrypt(true),
                        Attribute::Unwrap(true),
                        Attribute::Sign(false),
                        Attribute::Derive(false),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ];
                    let (pubh, _) =
                        s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)?;
                    transport_public(s, pubh)
                })
            })
            .await
    }

    /// The public key (modulus, exponent) of transport key pair `name`.
    pub async fn transport_public_key(&self, name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let label = transport_label(name);
        let h = self
            .find_object(ObjectClass::PUBLIC_KEY, &label)
            .await?
            .ok_or(Error::ObjectNotFound(label))?;
        self.inner
            .pool
            .submit(move |w| w.run(true, |s, _| transport_public(s, h)))
            .await
    }
}

fn transport_public(s: &Session, h: ObjectHandle) -> Result<(Vec<u8>, Vec<u8>)> {
    let attrs = s.get_attributes(h, &[AttributeType::Modulus, AttributeType::PublicExponent])?;
    let (mut n, mut e) = (None, None);
    for a in attrs {
        match a {
            Attribute::Modulus(m) => n = Some(m),
            Attribute::PublicExponent(x) => e = Some(x),
            _ => {}
        }
    }
    match (n, e) {
        (Some(n), Some(e)) => Ok((n, e)),
        _ => Err(Error::Invalid(
            "the token returned no RSA public key".into(),
        )),
    }
}

fn run_batch(
    s: &Session,
    handles: &Handles,
    batch: Batch,
) -> std::result::Result<Vec<Outcome>, BatchRefused> {
    let mut objects = Objects::new(s);
    let transport = match &*batch.transport {
        Transport::Aes(key) => {
            if ![16, 24, 32].contains(&key.len()) {
                return Err(BatchRefused::Transport(format!(
                    "the transport key is {} bytes; AES keys are 16, 24 or 32",
                    key.len()
                )));
            }
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Unwrap(true),
                Attribute::Decrypt(true),
                Attribute::Encrypt(false),
                Attribute::Wrap(false),
                Attribute::Sign(false),
                Attribute::Derive(false),
            ];
            let handle = objects.create_secret(&template, Zeroizing::new(key.to_vec()))?;
            TransportKey::Aes {
                handle,
                len: key.len(),
            }
        }
        Transport::Rsa(_) => TransportKey::Rsa(
            handles
                .rsa
                .ok_or_else(|| BatchRefused::Transport("no RSA transport key".into()))?,
        ),
    };
    let mac = match &batch.mac_key {
        None => None,
        Some(mk) => {
            let key = objects.decrypt_into_key(
                transport,
                mk.method,
                &mk.cipher_value,
                &mac_key_template(),
                mk.algorithm.len(),
                &(1..=1024),
                batch.allow_rsa_1_5,
            )?;
            match key {
                Ok((h, _)) => Some((mk.algorithm, h)),
                Err(reason) => {
                    return Err(BatchRefused::Transport(format!(
                        "the MAC key does not decrypt with this transport key (wrong key or password?): {reason}"
                    )))
                }
            }
        }
    };
    let master = *handles
        .masters
        .get(&batch.master_version)
        .ok_or_else(|| Error::ObjectNotFound(master_key_label(batch.master_version)))?;
    let mut out = Vec::with_capacity(batch.items.len());
    for item in batch.items {
        out.push(one_item(
            &mut objects,
            handles,
            transport,
            mac,
            master,
            batch.allow_rsa_1_5,
            item,
        )?);
    }
    Ok(out)
}

fn one_item(
    objects: &mut Objects<'_>,
    handles: &Handles,
    transport: TransportKey,
    mac: Option<(MacAlgorithm, ObjectHandle)>,
    master: ObjectHandle,
    allow_rsa_1_5: bool,
    item: Item,
) -> Result<Outcome> {
    let s = objects.session;
    let decrypted = match &item.secret {
        Secret::Encrypted {
            method,
            cipher_value,
            value_mac,
        } => {
            match (value_mac, mac) {
                (Some(expected), Some((alg, key))) => {
                    let got = s.sign(&alg.mechanism(), key, cipher_value)?;
                    if got.len() != expected.len() || !bool::from(got.ct_eq(expected)) {
                        return Ok(Outcome::Refused(
                            "the ValueMAC does not match (altered entry or wrong MAC key)".into(),
                        ));
                    }
                }
                (Some(_), None) => {
                    return Ok(Outcome::Refused(
                        "the entry has a ValueMAC but the file no MAC key".into(),
                    ))
                }
                // The caller let it through (allow_unmaced).
                (None, _) => {}
            }
            objects.decrypt_into_key(
                transport,
                *method,
                cipher_value,
                &seed_template(),
                item.pad_to,
                &item.lengths,
                allow_rsa_1_5,
            )?
        }
        Secret::Plain(seed) => {
            if !item.lengths.contains(&seed.len()) {
                Err(length_refused(seed.len(), &item.lengths))
            } else {
                let mut padded = Zeroizing::new(Vec::with_capacity(seed.len().max(item.pad_to)));
                padded.extend_from_slice(seed);
                padded.resize(seed.len().max(item.pad_to), 0);
                let h = objects.create_secret(&seed_template(), padded)?;
                Ok((h, false))
            }
        }
    };
    let (key, in_hsm) = match decrypted {
        Ok(x) => x,
        Err(reason) => return Ok(Outcome::Refused(reason)),
    };
    let result = match &item.existing {
        Some((version, blob)) => match handles.masters.get(version) {
            // AES key wrap with padding (RFC 5649) is deterministic: the same seed under
            // the same master key is the same blob.
            Some(m) => {
                let w = s.wrap_key(&handles.wrap.mechanism(), *m, key);
                match w {
                    Ok(w) if bool::from(w.ct_eq(blob)) => Outcome::Same { in_hsm },
                    Ok(_) => Outcome::Different { in_hsm },
                    Err(e) => {
                        objects.destroy(key);
                        return Err(e.into());
                    }
                }
            }
            None => Outcome::Refused(format!(
                "cannot compare with the stored credential: its {} is not on the token",
                master_key_label(*version)
            )),
        },
        None => {
            let w = s.wrap_key(&handles.wrap.mechanism(), master, key);
            match w {
                // An RSA-decrypted key's length shows only in its blob (RFC 5649: 8 bytes
                // plus the value rounded up to 8).
                Ok(wrapped) if wrapped.len() > 8 + item.lengths.end().div_ceil(8) * 8 => {
                    Outcome::Refused(format!(
                        "the secret is longer than {} bytes",
                        item.lengths.end()
                    ))
                }
                Ok(wrapped) => {
                    let bound = binding::compute(s, handles.bind, &item.context, &wrapped);
                    match bound {
                        Ok(binding) => Outcome::Wrapped {
                            wrapped,
                            binding,
                            in_hsm,
                        },
                        Err(e) => {
                            objects.destroy(key);
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    objects.destroy(key);
                    return Err(e.into());
                }
            }
        }
    };
    objects.destroy(key);
    Ok(result)
}

impl From<cryptoki::error::Error> for BatchRefused {
    fn from(e: cryptoki::error::Error) -> Self {
        BatchRefused::Hsm(e.into())
    }
}

#[cfg(test)]
mod tests;
