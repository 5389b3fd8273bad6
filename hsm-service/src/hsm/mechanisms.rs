//! The mechanisms the service uses, asked of the token once when it is opened
//! (`C_GetMechanismInfo`), so that a token that cannot serve the service is refused at
//! start with one line naming what it lacks, instead of failing later, request by
//! request. Tokens differ (see the README's compatibility table): kryoptic offers RFC 5649
//! key wrap with padding as `CKM_AES_KEY_WRAP_KWP` (PKCS#11 3.1) and not as
//! `CKM_AES_KEY_WRAP_PAD`, the name SoftHSM uses for it; opencryptoki 3.8 has no EC and
//! no AES key wrap at all; EdDSA and RSA-PSS are only needed for keys of those kinds.

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismInfo, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::error::{Error, Result};
use super::sign::KeyPairKind;

/// RFC 5649 AES key wrap with padding, under the name the token offers it by. Both wrap
/// to the same bytes (checked at open with an RFC 5649 known answer), so blobs made on
/// one token unwrap on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWrap {
    /// `CKM_AES_KEY_WRAP_KWP` (0x210B, PKCS#11 3.1): unambiguous, preferred when offered.
    Kwp,
    /// `CKM_AES_KEY_WRAP_PAD` (0x210A): SoftHSM's (and many HSMs') RFC 5649. PKCS#11 3.1
    /// deprecates the name because tokens disagreed on its padding.
    Pad,
}

impl KeyWrap {
    /// The PKCS#11 name.
    pub fn name(self) -> &'static str {
        match self {
            KeyWrap::Kwp => "CKM_AES_KEY_WRAP_KWP",
            KeyWrap::Pad => "CKM_AES_KEY_WRAP_PAD",
        }
    }

    fn mechanism_type(self) -> MechanismType {
        match self {
            KeyWrap::Kwp => kwp_type(),
            KeyWrap::Pad => MechanismType::AES_KEY_WRAP_PAD,
        }
    }

    /// The mechanism to pass to `C_WrapKey` / `C_UnwrapKey`.
    pub(crate) fn mechanism(self) -> Mechanism<'static> {
        match self {
            KeyWrap::Pad => Mechanism::AesKeyWrapPad,
            KeyWrap::Kwp => {
                Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(kwp_type(), None))
            }
        }
    }
}

fn kwp_type() -> MechanismType {
    hsm_cryptoki_ext::mechanism_type(hsm_cryptoki_ext::CKM_AES_KEY_WRAP_KWP)
        .expect("hsm-cryptoki-ext hands out CKM_AES_KEY_WRAP_KWP")
}

/// What the token offers of the mechanisms the service uses. The required ones are
/// present (or [`check`] refused the token); these say how, and what is optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanisms {
    /// How seeds, backups and re-wraps are wrapped.
    pub key_wrap: KeyWrap,
    /// `CKM_EC_EDWARDS_KEY_PAIR_GEN` and `CKM_EDDSA`: Ed25519 (EdDSA) signing keys.
    pub eddsa: bool,
    /// `CKM_RSA_PKCS_KEY_PAIR_GEN` (3072 bits) and `CKM_RSA_PKCS_PSS`: PS256 keys.
    pub rsa_pss: bool,
    /// `CKM_EC_KEY_PAIR_GEN` for P-384 (`ulMaxKeySize` >= 384): ES384 keys.
    pub ec_p384: bool,
}

impl Mechanisms {
    /// What SoftHSM 2.6 offers (for tests that build one without a token).
    pub fn softhsm() -> Mechanisms {
        Mechanisms {
            key_wrap: KeyWrap::Pad,
            eddsa: true,
            rsa_pss: true,
            ec_p384: true,
        }
    }

    /// `Err` naming the mechanism when keys of `kind` cannot be made or used here.
    pub fn require(&self, kind: KeyPairKind) -> Result<()> {
        let missing = match kind {
            KeyPairKind::EcP256 => None,
            KeyPairKind::EcP384 => (!self.ec_p384).then_some("CKM_EC_KEY_PAIR_GEN for P-384"),
            KeyPairKind::Ed25519 => {
                (!self.eddsa).then_some("CKM_EC_EDWARDS_KEY_PAIR_GEN / CKM_EDDSA")
            }
            KeyPairKind::Rsa3072 => (!self.rsa_pss)
                .then_some("CKM_RSA_PKCS_KEY_PAIR_GEN (3072 bits) / CKM_RSA_PKCS_PSS"),
        };
        match missing {
            None => Ok(()),
            Some(m) => Err(Error::Unsupported(format!(
                "the token lacks {m}, which {} keys need",
                kind_name(kind)
            ))),
        }
    }
}

fn kind_name(kind: KeyPairKind) -> &'static str {
    match kind {
        KeyPairKind::EcP256 => "ES256 (P-256)",
        KeyPairKind::EcP384 => "ES384 (P-384)",
        KeyPairKind::Ed25519 => "EdDSA (Ed25519)",
        KeyPairKind::Rsa3072 => "PS256 (RSA-3072)",
    }
}

/// What a mechanism must do for the service.
#[derive(Debug, Clone, Copy)]
enum Needs {
    Sign,
    Generate,
    GenerateKeyPair,
    WrapUnwrap,
}

/// The mechanisms every deployment needs, and what for.
const REQUIRED: [(MechanismType, &str, Needs, &str); 8] = [
    (
        MechanismType::SHA1_HMAC,
        "CKM_SHA_1_HMAC",
        Needs::Sign,
        "HOTP/TOTP with SHA-1",
    ),
    (
        MechanismType::SHA256_HMAC,
        "CKM_SHA256_HMAC",
        Needs::Sign,
        "SHA-256 codes and seed bindings",
    ),
    (
        MechanismType::SHA512_HMAC,
        "CKM_SHA512_HMAC",
        Needs::Sign,
        "codes with SHA-512",
    ),
    (
        MechanismType::GENERIC_SECRET_KEY_GEN,
        "CKM_GENERIC_SECRET_KEY_GEN",
        Needs::Generate,
        "seeds and the binding key",
    ),
    (
        MechanismType::AES_KEY_GEN,
        "CKM_AES_KEY_GEN",
        Needs::Generate,
        "the seed master key",
    ),
    (
        MechanismType::ECC_KEY_PAIR_GEN,
        "CKM_EC_KEY_PAIR_GEN",
        Needs::GenerateKeyPair,
        "the audit checkpoint key and ES256 keys",
    ),
    (
        MechanismType::ECDSA,
        "CKM_ECDSA",
        Needs::Sign,
        "audit checkpoints and ES256 assertions",
    ),
    // Placeholder row for the key wrap, checked separately (either name will do).
    (
        MechanismType::AES_KEY_WRAP_PAD,
        "CKM_AES_KEY_WRAP_KWP or CKM_AES_KEY_WRAP_PAD",
        Needs::WrapUnwrap,
        "wrapping seeds under the master key",
    ),
];

fn has(info: &MechanismInfo, needs: Needs) -> bool {
    match needs {
        Needs::Sign => info.sign(),
        Needs::Generate => info.generate(),
        Needs::GenerateKeyPair => info.generate_key_pair(),
        Needs::WrapUnwrap => info.wrap() && info.unwrap(),
    }
}

/// `Some(info)` when the token offers `t`; `None` for `CKR_MECHANISM_INVALID`.
fn info(ctx: &Pkcs11, slot: Slot, t: MechanismType) -> Result<Option<MechanismInfo>> {
    match ctx.get_mechanism_info(slot, t) {
        Ok(i) => Ok(Some(i)),
        Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Ask the token in `slot` about every mechanism the service uses. `Err` with one line
/// naming every missing required mechanism (and what it is for) when one is missing.
pub(crate) fn check(ctx: &Pkcs11, slot: Slot) -> Result<Mechanisms> {
    // `C_GetMechanismInfo` per mechanism, not `C_GetMechanismList`: cryptoki drops the
    // types it does not know from the list (KWP among them) and logs an ERROR for each.
    let offers = |t: MechanismType, needs: Needs| -> Result<Option<MechanismInfo>> {
        Ok(info(ctx, slot, t)?.filter(|i| has(i, needs)))
    };
    let mut missing = Vec::new();
    for (t, name, needs, what) in &REQUIRED[..REQUIRED.len() - 1] {
        match offers(*t, *needs)? {
            Some(i) if *t == MechanismType::AES_KEY_GEN && i.max_key_size() < 32 => {
                missing.push(format!("{name} with 256-bit keys ({what})"));
            }
            Some(i) if *t == MechanismType::ECC_KEY_PAIR_GEN && i.max_key_size() < 256 => {
                missing.push(format!("{name} for P-256 ({what})"));
            }
            Some(_) => {}
            None => missing.push(format!("{name} ({what})")),
        }
    }
    let key_wrap = if offers(KeyWrap::Kwp.mechanism_type(), Needs::WrapUnwrap)?.is_some() {
        Some(KeyWrap::Kwp)
    } else if offers(KeyWrap::Pad.mechanism_type(), Needs::WrapUnwrap)?.is_some() {
        Some(KeyWrap::Pad)
    } else {
        let (_, name, _, what) = REQUIRED[REQUIRED.len() - 1];
        missing.push(format!("{name} ({what})"));
        None
    };
    if let (Some(key_wrap), true) = (key_wrap, missing.is_empty()) {
        let pair = |gen: MechanismType, sign: MechanismType, min_bits: usize| -> Result<bool> {
            Ok(
                offers(gen, Needs::GenerateKeyPair)?.is_some_and(|i| i.max_key_size() >= min_bits)
                    && offers(sign, Needs::Sign)?.is_some(),
            )
        };
        return Ok(Mechanisms {
            key_wrap,
            eddsa: pair(
                MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
                MechanismType::EDDSA,
                0,
            )?,
            rsa_pss: pair(
                MechanismType::RSA_PKCS_KEY_PAIR_GEN,
                MechanismType::RSA_PKCS_PSS,
                3072,
            )?,
            ec_p384: pair(MechanismType::ECC_KEY_PAIR_GEN, MechanismType::ECDSA, 384)?,
        });
    }
    Err(lacks(&missing))
}

/// The one line of a refused token.
fn lacks(missing: &[String]) -> Error {
    Error::Unsupported(format!(
        "the token lacks PKCS#11 mechanisms the service needs: {}",
        missing.join(", ")
    ))
}

/// RFC 5649 known answer under a 256-bit KEK (computed with OpenSSL's
/// `id-aes256-wrap-pad`): KEK 00..1f, key 00112233..0a0b (27 bytes, so padding is used).
const KAT_KEK: [u8; 32] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];
const KAT_KEY: [u8; 27] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b,
];
const KAT_WRAPPED: [u8; 40] = [
    0x27, 0x37, 0xfe, 0xde, 0x8f, 0xb0, 0xda, 0xc7, 0x89, 0x39, 0xd4, 0x32, 0x83, 0x6a, 0x3b, 0x1a,
    0x8d, 0x78, 0xea, 0xbe, 0x44, 0xe7, 0x1d, 0xcd, 0xa8, 0xc6, 0xf0, 0xf9, 0x9a, 0xb5, 0x38, 0x1c,
    0x51, 0xe9, 0xaf, 0xc8, 0x90, 0xab, 0x74, 0x87,
];
/// What SoftHSM 2.6.1 gives for the same: it pads the key's value with zeros to a
/// multiple of 8 bytes first and wraps that (the length field says 32, not 27), so the
/// key unwraps with 5 zero bytes more. Harmless for HMAC seeds (HMAC pads a key shorter
/// than its block with zeros anyway, so the codes are the same on every token), and
/// SHA-256/512 seeds (32, 64 bytes) are not padded at all.
const KAT_WRAPPED_ZERO_PADDED: [u8; 40] = [
    0xbd, 0x46, 0xf4, 0xa9, 0x7f, 0x9d, 0xb6, 0xc4, 0x18, 0xb0, 0x29, 0xac, 0x9f, 0xc3, 0x8a, 0xad,
    0xc7, 0xd6, 0x26, 0x37, 0x0a, 0x51, 0x96, 0x6a, 0xe6, 0xef, 0x7a, 0xe7, 0xa2, 0xb7, 0x55, 0x0a,
    0x05, 0x98, 0x26, 0x3f, 0xdb, 0xc3, 0x81, 0xbd,
];

/// How the token's key wrap answered the known-answer check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWrapAnswer {
    /// Exactly RFC 5649 (kryoptic).
    Rfc5649,
    /// RFC 5649 over the value padded with zeros to a multiple of 8 (SoftHSM 2.6.1).
    ZeroPaddedFirst,
    /// The token refused the public test keys (some HSMs refuse plaintext key objects):
    /// not known.
    NotChecked,
}

/// Check that the token's key wrap is RFC 5649 (a token whose `CKM_AES_KEY_WRAP_PAD` is
/// PKCS#7 padding plus RFC 3394 would make blobs no other token unwraps): wrap a public
/// test key under a public test KEK, both session objects destroyed at once.
/// `Err(Unsupported)` when the answer is neither RFC 5649 nor SoftHSM's variant of it.
pub(crate) fn known_answer(
    ctx: &Pkcs11,
    slot: Slot,
    pin: &SecretString,
    wrap: KeyWrap,
) -> Result<KeyWrapAnswer> {
    let session = ctx.open_rw_session(slot)?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(e.into()),
    }
    let secret = |class_type: KeyType, value: &[u8], kek: bool| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(class_type),
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(!kek),
            Attribute::Wrap(kek),
            Attribute::Unwrap(false),
            Attribute::Value(value.to_vec()),
        ]
    };
    let created = |s: &Session, t: &[Attribute]| match s.create_object(t) {
        Ok(h) => Ok(Some(h)),
        Err(CkError::Pkcs11(
            RvError::TemplateInconsistent
            | RvError::TemplateIncomplete
            | RvError::AttributeValueInvalid
            | RvError::AttributeReadOnly
            | RvError::AttributeTypeInvalid,
            _,
        )) => Ok(None),
        Err(e) => Err(Error::from(e)),
    };
    let Some(kek) = created(&session, &secret(KeyType::AES, &KAT_KEK, true))? else {
        return Ok(KeyWrapAnswer::NotChecked);
    };
    let key = match created(&session, &secret(KeyType::GENERIC_SECRET, &KAT_KEY, false)) {
        Ok(Some(k)) => k,
        other => {
            let _ = session.destroy_object(kek);
            return other.map(|_| KeyWrapAnswer::NotChecked);
        }
    };
    let wrapped = session.wrap_key(&wrap.mechanism(), kek, key);
    let _ = session.destroy_object(key);
    let _ = session.destroy_object(kek);
    let wrapped = match wrapped {
        // Described by C_GetMechanismInfo but not usable (SoftHSM does that for what its
        // `slots.mechanisms` leaves out): as good as missing.
        Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => {
            let (_, name, _, what) = REQUIRED[REQUIRED.len() - 1];
            return Err(lacks(&[format!("{name} ({what})")]));
        }
        other => other?,
    };
    if wrapped == KAT_WRAPPED {
        Ok(KeyWrapAnswer::Rfc5649)
    } else if wrapped == KAT_WRAPPED_ZERO_PADDED {
        Ok(KeyWrapAnswer::ZeroPaddedFirst)
    } else {
        Err(Error::Unsupported(format!(
            "the token's {} does not give the RFC 5649 wrapping (known answer differs): \
             its blobs would not unwrap on another token",
            wrap.name()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_kinds_are_refused_with_the_mechanism_named() {
        let none = Mechanisms {
            key_wrap: KeyWrap::Kwp,
            eddsa: false,
            rsa_pss: false,
            ec_p384: false,
        };
        assert!(none.require(KeyPairKind::EcP256).is_ok());
        let e = none
            .require(KeyPairKind::Ed25519)
            .expect_err("no EdDSA")
            .to_string();
        assert!(e.contains("CKM_EDDSA") && e.contains("Ed25519"), "{e}");
        let e = none
            .require(KeyPairKind::Rsa3072)
            .expect_err("no PSS")
            .to_string();
        assert!(e.contains("CKM_RSA_PKCS_PSS"), "{e}");
        let e = none
            .require(KeyPairKind::EcP384)
            .expect_err("no P-384")
            .to_string();
        assert!(e.contains("P-384"), "{e}");
        let all = Mechanisms::softhsm();
        for kind in [
            KeyPairKind::Ed25519,
            KeyPairKind::Rsa3072,
            KeyPairKind::EcP384,
        ] {
            assert!(all.require(kind).is_ok());
        }
    }

    #[test]
    fn key_wrap_names_and_types() {
        assert_eq!(*KeyWrap::Kwp.mechanism_type(), 0x210B);
        assert_eq!(*KeyWrap::Pad.mechanism_type(), 0x210A);
        assert_eq!(KeyWrap::Pad.name(), "CKM_AES_KEY_WRAP_PAD");
        assert!(matches!(KeyWrap::Pad.mechanism(), Mechanism::AesKeyWrapPad));
    }
}
