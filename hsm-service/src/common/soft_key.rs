//! Test support: software keys standing in for HSM keys (RustCrypto crates), used by the
//! tests of `signing` and `pki`.

use std::sync::OnceLock;

use p256::ecdsa::signature::{hazmat::PrehashSigner, Signer};
use rsa::{sha2::Sha256, traits::PublicKeyParts};

use super::{Algorithm, PublicKey};

/// A software "HSM" key, signing the way PKCS#11 mechanisms do.
pub(crate) enum SoftKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
    Rsa(&'static rsa::PrivateKey),
}

impl SoftKey {
    pub(crate) fn p256(seed: u8) -> Self {
        Self::P256(p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }
    pub(crate) fn p384(seed: u8) -> Self {
        Self::P384(p384::ecdsa::SigningKey::from_slice(&[seed; 48]).unwrap())
    }
    pub(crate) fn ed25519(seed: u8) -> Self {
        Self::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
    }
    /// One RSA-3072 key per test binary: generation takes a second or two.
    pub(crate) fn rsa() -> Self {
        static KEY: OnceLock<rsa::PrivateKey> = OnceLock::new();
        Self::Rsa(KEY.get_or_init(|| {
            use rsa::Generate;
            rsa::PrivateKey::generate()
        }))
    }

    /// The public key as read from PKCS#11 attributes.
    pub(crate) fn public(&self) -> PublicKey {
        match self {
            // CKA_EC_POINT: DER OCTET STRING around the uncompressed point.
            Self::P256(k) => PublicKey::from_ec_point(&wrap_octets(
                k.verifying_key().to_sec1_point(false).as_bytes(),
            ))
            .unwrap(),
            Self::P384(k) => PublicKey::from_ec_point(&wrap_octets(
                k.verifying_key().to_sec1_point(false).as_bytes(),
            ))
            .unwrap(),
            Self::Ed25519(k) => {
                PublicKey::from_ed25519_point(&wrap_octets(k.verifying_key().as_bytes())).unwrap()
            }
            Self::Rsa(k) => {
                PublicKey::from_rsa_components(&k.n().to_be_bytes(), &k.e().to_be_bytes()).unwrap()
            }
        }
    }

    pub(crate) fn algorithm(&self) -> Algorithm {
        self.public().algorithm()
    }

    /// Signs like the HSM: CKM_ECDSA and CKM_RSA_PKCS_PSS get the digest,
    /// CKM_EDDSA the whole message. ECDSA comes back as raw r || s.
    pub(crate) fn sign(&self, message: &[u8], digest: Option<Vec<u8>>) -> Vec<u8> {
        match self {
            Self::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign_prehash(&digest.unwrap()).unwrap();
                sig.to_bytes().to_vec()
            }
            Self::P384(k) => {
                let sig: p384::ecdsa::Signature = k.sign_prehash(&digest.unwrap()).unwrap();
                sig.to_bytes().to_vec()
            }
            Self::Ed25519(k) => {
                assert!(digest.is_none(), "EdDSA signs the message, not a digest");
                k.sign(message).to_bytes().to_vec()
            }
            Self::Rsa(k) => k.pss_sign_prehash::<Sha256>(&digest.unwrap()).unwrap(),
        }
    }
}

/// DER OCTET STRING (short form is enough for these sizes).
pub(crate) fn wrap_octets(b: &[u8]) -> Vec<u8> {
    let mut v = vec![0x04, b.len() as u8];
    v.extend_from_slice(b);
    v
}
