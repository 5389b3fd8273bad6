//! Signing key pairs: generation on the token (`C_GenerateKeyPair`), their public
//! attributes, signatures (`C_SignInit`/`C_Sign`) and destruction.
//!
//! Private keys are token objects that are private, sensitive, never extractable and
//! usable for signing only. Their CKA_ID is 16 bytes from the token's RNG; the same id
//! is on the public key, so a key pair is one id. Handles are found by CKA_ID once and
//! cached: the signing path does no object search.
//!
//! Mechanisms, chosen for what SoftHSM 2.6.1 supports (it has no `CKM_ECDSA_SHA256`):
//! ECDSA gets the digest (`CKM_ECDSA`, raw `r || s` back), RSA-PSS gets the SHA-256
//! digest (`CKM_RSA_PKCS_PSS`, MGF1-SHA-256, 32-byte salt), EdDSA the whole message
//! (`CKM_EDDSA`).

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::objects::search_by_id;
use super::{Error, Hsm, Result};

/// DER of the named curve prime256v1 (1.2.840.10045.3.1.7).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the named curve secp384r1 (1.3.132.0.34).
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// DER of id-Ed25519 (1.3.101.112) as CKA_EC_PARAMS. PKCS#11 3.0 also allows the
/// PrintableString "edwards25519"; SoftHSM 2.6.1 accepts both (see the tests), and the
/// OID is what other HSMs accept most widely.
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// RSA modulus size of the RSA signing keys.
const RSA_BITS: u64 = 3072;
/// F4 = 65537.
const RSA_EXPONENT: &[u8] = &[0x01, 0x00, 0x01];
/// Length of a key pair's CKA_ID.
pub const KEY_ID_LEN: usize = 16;

/// The kinds of signing key pairs the service generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPairKind {
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// Ed25519.
    Ed25519,
    /// RSA with a 3072-bit modulus.
    Rsa3072,
}

/// How a signature is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignMechanism {
    /// `CKM_ECDSA` over a digest computed by the caller; returns raw `r || s`.
    Ecdsa,
    /// `CKM_EDDSA` (pure Ed25519) over the whole message.
    Eddsa,
    /// `CKM_RSA_PKCS_PSS` over a SHA-256 digest computed by the caller, MGF1-SHA-256,
    /// 32-byte salt.
    RsaPssSha256,
}

/// The public half of a key pair, as the token reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKeyAttributes {
    /// `CKA_EC_POINT` of a P-256 or P-384 key.
    Ec {
        /// DER OCTET STRING around the uncompressed point (or the bare point).
        ec_point: Vec<u8>,
    },
    /// `CKA_EC_POINT` of an Ed25519 key.
    Edwards {
        /// DER OCTET STRING around the 32-byte key (or the bare key).
        ec_point: Vec<u8>,
    },
    /// `CKA_MODULUS` and `CKA_PUBLIC_EXPONENT`.
    Rsa {
        /// Modulus, big-endian.
        modulus: Vec<u8>,
        /// Public exponent, big-endian.
        public_exponent: Vec<u8>,
    },
}

/// A key pair just generated on the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKeyPair {
    /// CKA_ID shared by the private and the public key.
    pub id: Vec<u8>,
    /// The public key's attributes.
    pub public: PublicKeyAttributes,
}

/// Security attributes of a private key, as the token reports them (for checks and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrivateKeyFacts {
    /// CKA_TOKEN.
    pub token: bool,
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_SIGN.
    pub sign: bool,
    /// CKA_DECRYPT.
    pub decrypt: bool,
    /// CKA_LOCAL: generated on the token.
    pub local: bool,
    /// CKA_NEVER_EXTRACTABLE: has never been extractable.
    pub never_extractable: bool,
    /// CKA_WRAP_WITH_TRUSTED: wraps only under a trusted key.
    pub wrap_with_trusted: bool,
}

/// CKA_EC_PARAMS of an elliptic-curve kind (empty for RSA).
pub(crate) fn ec_params(kind: KeyPairKind) -> &'static [u8] {
    match kind {
        KeyPairKind::EcP256 => P256_PARAMS,
        KeyPairKind::EcP384 => P384_PARAMS,
        KeyPairKind::Ed25519 => ED25519_PARAMS,
        KeyPairKind::Rsa3072 => &[],
    }
}

fn generate(session: &Session, kind: KeyPairKind, label: &str) -> Result<GeneratedKeyPair> {
    generate_with(session, kind, label, false)
}

/// Generate a key pair; with `backup`, the private key is extractable but only under a
/// trusted wrapping key (CKA_WRAP_WITH_TRUSTED), see [`super::backup`].
pub(crate) fn generate_with(
    session: &Session,
    kind: KeyPairKind,
    label: &str,
    backup: bool,
) -> Result<GeneratedKeyPair> {
    let mut id = vec![0u8; KEY_ID_LEN];
    session.generate_random_slice(&mut id)?;
    let label = label.as_bytes().to_vec();
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::Id(id.clone()),
        Attribute::Label(label.clone()),
    ];
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(backup),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Id(id.clone()),
        Attribute::Label(label),
    ];
    if backup {
        private.push(Attribute::WrapWithTrusted(true));
    }
    let mechanism = match kind {
        KeyPairKind::EcP256 => {
            public.push(Attribute::EcParams(P256_PARAMS.to_vec()));
            Mechanism::EccKeyPairGen
        }
        KeyPairKind::EcP384 => {
            public.push(Attribute::EcParams(P384_PARAMS.to_vec()));
            Mechanism::EccKeyPairGen
        }
        KeyPairKind::Ed25519 => {
            public.push(Attribute::EcParams(ED25519_PARAMS.to_vec()));
            Mechanism::EccEdwardsKeyPairGen
        }
        KeyPairKind::Rsa3072 => {
            public.push(Attribute::ModulusBits(RSA_BITS.into()));
            public.push(Attribute::PublicExponent(RSA_EXPONENT.to_vec()));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    let (public_handle, _private) = session.generate_key_pair(&mechanism, &public, &private)?;
    let public = read_public(session, public_handle, kind)?;
    Ok(GeneratedKeyPair { id, public })
}

fn read_public(
    session: &Session,
    handle: ObjectHandle,
    kind: KeyPairKind,
) -> Result<PublicKeyAttributes> {
    let missing = |what: &str| Error::Invalid(format!("the token returned no {what}"));
    match kind {
        KeyPairKind::EcP256 | KeyPairKind::EcP384 | KeyPairKind::Ed25519 => {
            let attrs = session.get_attributes(handle, &[AttributeType::EcPoint])?;
            let ec_point = attrs
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcPoint(p) => Some(p),
                    _ => None,
                })
                .ok_or_else(|| missing("CKA_EC_POINT"))?;
            Ok(if kind == KeyPairKind::Ed25519 {
                PublicKeyAttributes::Edwards { ec_point }
            } else {
                PublicKeyAttributes::Ec { ec_point }
            })
        }
        KeyPairKind::Rsa3072 => {
            let attrs = session.get_attributes(
                handle,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )?;
            let (mut modulus, mut public_exponent) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Modulus(m) => modulus = Some(m),
                    Attribute::PublicExponent(e) => public_exponent = Some(e),
                    _ => {}
                }
            }
            Ok(PublicKeyAttributes::Rsa {
                modulus: modulus.ok_or_else(|| missing("CKA_MODULUS"))?,
                public_exponent: public_exponent.ok_or_else(|| missing("CKA_PUBLIC_EXPONENT"))?,
            })
        }
    }
}

fn sign_with(
    session: &Session,
    key: ObjectHandle,
    mechanism: SignMechanism,
    data: &[u8],
) -> Result<Vec<u8>> {
    let signature = match mechanism {
        SignMechanism::Ecdsa => session.sign(&Mechanism::Ecdsa, key, data)?,
        SignMechanism::Eddsa => {
            let params = EddsaParams::new(EddsaSignatureScheme::Pure);
            session.sign(&Mechanism::Eddsa(params), key, data)?
        }
        SignMechanism::RsaPssSha256 => {
            let params = PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32u64.into(),
            };
            session.sign(&Mechanism::RsaPkcsPss(params), key, data)?
        }
    };
    Ok(signature)
}

impl Hsm {
    /// Generate a signing key pair of `kind` on the token, labelled `label` (for people
    /// reading the token; lookups go by CKA_ID). Not retried on a lost session: a retry
    /// could leave a second, orphaned key pair behind.
    pub async fn generate_signing_key_pair(
        &self,
        kind: KeyPairKind,
        label: &str,
    ) -> Result<GeneratedKeyPair> {
        self.inner.mechanisms.require(kind)?;
        let label = label.to_owned();
        self.inner
            .pool
            .submit(move |w| w.run(false, |s, _| generate(s, kind, &label)))
            .await
    }

    /// Sign `data` (a digest for ECDSA and RSA-PSS, the message for EdDSA) with the
    /// private key whose CKA_ID is `key_id`. The handle comes from the cache; a stale
    /// handle is searched again once.
    pub async fn sign(
        &self,
        key_id: &[u8],
        mechanism: SignMechanism,
        data: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let data = std::sync::Arc::new(data);
        let mut searched_again = false;
        loop {
            let handle = self
                .find_object_by_id(ObjectClass::PRIVATE_KEY, key_id)
                .await?
                .ok_or_else(|| Error::ObjectNotFound("signing key with that CKA_ID".into()))?;
            let input = data.clone();
            let result = self
                .inner
                .pool
                .submit(move |w| w.run(true, |s, _| sign_with(s, handle, mechanism, &input)))
                .await;
            match result {
                Err(e) if e.is_stale_handle() && !searched_again => {
                    self.forget_object_by_id(ObjectClass::PRIVATE_KEY, key_id);
                    searched_again = true;
                }
                other => return other,
            }
        }
    }

    /// Destroy every object (private key, public key, anything else) whose CKA_ID is
    /// `key_id`, and forget their cached handles. Returns how many were destroyed.
    pub async fn destroy_key_pair(&self, key_id: &[u8]) -> Result<usize> {
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            self.forget_object_by_id(class, key_id);
        }
        let id = key_id.to_vec();
        self.inner
            .pool
            .submit(move |w| {
                w.run(true, |s, _| {
                    let found = s.find_objects(&[Attribute::Id(id.clone())])?;
                    for h in &found {
                        s.destroy_object(*h)?;
                    }
                    Ok(found.len())
                })
            })
            .await
    }

    /// Number of token objects whose CKA_ID is `key_id` (an object search: for checks
    /// and tests, never on a hot path).
    pub async fn count_objects_with_id(&self, key_id: &[u8]) -> Result<usize> {
        let id = key_id.to_vec();
        self.inner
            .pool
            .submit(move |w| {
                w.run(true, |s, _| {
                    Ok(s.find_objects(&[Attribute::Id(id.clone())])?.len())
                })
            })
            .await
    }

    /// The public key of the key pair whose CKA_ID is `key_id`, read back from the token
    /// (for the check after generation: it must be the public key recorded).
    pub async fn public_key_attributes(
        &self,
        key_id: &[u8],
        kind: KeyPairKind,
    ) -> Result<PublicKeyAttributes> {
        let id = key_id.to_vec();
        self.inner
            .pool
            .submit(move |w| {
                w.run(true, |s, _| {
                    let handle = search_by_id(s, ObjectClass::PUBLIC_KEY, &id)?
                        .ok_or_else(|| Error::ObjectNotFound("public key".into()))?;
                    read_public(s, handle, kind)
                })
            })
            .await
    }

    /// The security attributes of the private key whose CKA_ID is `key_id`.
    pub async fn private_key_facts(&self, key_id: &[u8]) -> Result<PrivateKeyFacts> {
        let id = key_id.to_vec();
        self.inner
            .pool
            .submit(move |w| {
                w.run(true, |s, _| {
                    let handle = search_by_id(s, ObjectClass::PRIVATE_KEY, &id)?
                        .ok_or_else(|| Error::ObjectNotFound("private key".into()))?;
                    let attrs = s.get_attributes(
                        handle,
                        &[
                            AttributeType::Token,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::Sign,
                            AttributeType::Decrypt,
                            AttributeType::Local,
                            AttributeType::NeverExtractable,
                            AttributeType::WrapWithTrusted,
                        ],
                    )?;
                    let mut facts = PrivateKeyFacts {
                        token: false,
                        sensitive: false,
                        extractable: true,
                        sign: false,
                        decrypt: true,
                        local: false,
                        never_extractable: false,
                        wrap_with_trusted: false,
                    };
                    for a in attrs {
                        match a {
                            Attribute::Token(v) => facts.token = v,
                            Attribute::Sensitive(v) => facts.sensitive = v,
                            Attribute::Extractable(v) => facts.extractable = v,
                            Attribute::Sign(v) => facts.sign = v,
                            Attribute::Decrypt(v) => facts.decrypt = v,
                            Attribute::Local(v) => facts.local = v,
                            Attribute::NeverExtractable(v) => facts.never_extractable = v,
                            Attribute::WrapWithTrusted(v) => facts.wrap_with_trusted = v,
                            _ => {}
                        }
                    }
                    Ok(facts)
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::tests::open;
    use crate::testing::DevEnv;

    #[tokio::test]
    async fn every_kind_generates_signs_and_is_destroyed() {
        let env = DevEnv::new();
        let hsm = open(&env, 2, 16);
        for (kind, mechanism, input_len, sig_len) in [
            (KeyPairKind::EcP256, SignMechanism::Ecdsa, 32, 64),
            (KeyPairKind::EcP384, SignMechanism::Ecdsa, 48, 96),
            (KeyPairKind::Ed25519, SignMechanism::Eddsa, 100, 64),
            (KeyPairKind::Rsa3072, SignMechanism::RsaPssSha256, 32, 384),
        ] {
            // A token without the kind's mechanisms (kryoptic on OpenSSL 3.0: EdDSA)
            // refuses it up front, naming them, and makes nothing.
            if hsm.mechanisms().require(kind).is_err() {
                let e = hsm
                    .generate_signing_key_pair(kind, "test-key")
                    .await
                    .expect_err("unsupported kind");
                assert_eq!(e.kind(), crate::hsm::ErrorKind::Unsupported, "{e}");
                assert!(e.to_string().contains("CKM_"), "{e}");
                continue;
            }
            let pair = hsm
                .generate_signing_key_pair(kind, "test-key")
                .await
                .expect("generate");
            assert_eq!(pair.id.len(), KEY_ID_LEN);
            let facts = hsm.private_key_facts(&pair.id).await.expect("facts");
            assert_eq!(
                facts,
                PrivateKeyFacts {
                    token: true,
                    sensitive: true,
                    extractable: false,
                    sign: true,
                    decrypt: false,
                    local: true,
                    never_extractable: true,
                    wrap_with_trusted: false,
                },
                "{kind:?}"
            );
            let sig = hsm
                .sign(&pair.id, mechanism, vec![7u8; input_len])
                .await
                .expect("sign");
            assert_eq!(sig.len(), sig_len, "{kind:?}");
            let searches = hsm.object_searches();
            hsm.sign(&pair.id, mechanism, vec![8u8; input_len])
                .await
                .expect("sign again");
            assert_eq!(hsm.object_searches(), searches, "handle is cached");
            assert_eq!(hsm.count_objects_with_id(&pair.id).await.expect("count"), 2);
            assert_eq!(hsm.destroy_key_pair(&pair.id).await.expect("destroy"), 2);
            assert_eq!(hsm.count_objects_with_id(&pair.id).await.expect("count"), 0);
            let err = hsm
                .sign(&pair.id, mechanism, vec![7u8; input_len])
                .await
                .expect_err("destroyed");
            assert!(matches!(err, Error::ObjectNotFound(_)), "{err}");
        }
    }

    /// Both CKA_EC_PARAMS forms for Ed25519 give a usable key on SoftHSM 2.6.1 (a token
    /// without EdDSA has nothing to test here).
    #[tokio::test]
    async fn ed25519_params_forms() {
        let env = DevEnv::new();
        let hsm = open(&env, 1, 4);
        if !hsm.mechanisms().eddsa {
            assert_ne!(
                crate::testing::SoftToken::of_module(&env.config.hsm.module),
                crate::testing::SoftToken::SoftHsm,
                "SoftHSM has EdDSA"
            );
            return;
        }
        let printable: Vec<u8> = [&[0x13, 0x0c][..], b"edwards25519"].concat();
        for params in [ED25519_PARAMS.to_vec(), printable] {
            let (point, sig) = hsm
                .inner
                .pool
                .submit(move |w| {
                    w.run(false, |s, _| {
                        let public = [
                            Attribute::Token(false),
                            Attribute::Verify(true),
                            Attribute::EcParams(params.clone()),
                        ];
                        let private = [Attribute::Token(false), Attribute::Sign(true)];
                        let (pub_h, priv_h) = s.generate_key_pair(
                            &Mechanism::EccEdwardsKeyPairGen,
                            &public,
                            &private,
                        )?;
                        let point = read_public(s, pub_h, KeyPairKind::Ed25519)?;
                        let sig = sign_with(s, priv_h, SignMechanism::Eddsa, b"message")?;
                        Ok((point, sig))
                    })
                })
                .await
                .expect("generate and sign");
            let PublicKeyAttributes::Edwards { ec_point } = point else {
                panic!("not an Edwards key")
            };
            assert_eq!(ec_point.len(), 34, "DER OCTET STRING of 32 bytes");
            assert_eq!(sig.len(), 64);
        }
    }
}
