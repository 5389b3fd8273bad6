//! Public keys as read from PKCS#11 objects, and their SPKI/JWK forms.

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine as _,
};
use der::{
    asn1::{AnyRef, BitString, ObjectIdentifier, UintRef},
    Decode, Encode, Sequence,
};
use serde::Serialize;
use serde_json::{Map, Value};
use x509_cert::spki::{
    AlgorithmIdentifierOwned, AlgorithmIdentifierRef, SubjectPublicKeyInfoOwned,
    SubjectPublicKeyInfoRef,
};

use super::{Algorithm, SigningError};

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// DER NULL, the mandatory parameters of rsaEncryption.
const DER_NULL: &[u8] = &[0x05, 0x00];

/// Bounds on RSA modulus size: below 2048 bits is not acceptable for an eID,
/// above 16384 bits is certainly not an HSM key and only costs time.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 16384;

/// PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
#[derive(Sequence)]
struct RsaPublicKeyDer<'a> {
    n: UintRef<'a>,
    e: UintRef<'a>,
}

/// A public key of one of the supported HSM key types.
///
/// Prefer the constructors, which validate; the fields are public so keys can
/// be matched on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PublicKey {
    /// NIST P-256 point, affine coordinates big-endian.
    P256 {
        /// X coordinate.
        x: [u8; 32],
        /// Y coordinate.
        y: [u8; 32],
    },
    /// NIST P-384 point, affine coordinates big-endian.
    P384 {
        /// X coordinate.
        x: [u8; 48],
        /// Y coordinate.
        y: [u8; 48],
    },
    /// Ed25519 public key (RFC 8032 encoding).
    Ed25519([u8; 32]),
    /// RSA public key, big-endian without leading zero bytes.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
}

impl PublicKey {
    /// From a PKCS#11 `CKA_EC_POINT` of a P-256 or P-384 key.
    ///
    /// Accepts the DER OCTET STRING the standard prescribes as well as the bare
    /// uncompressed point `04 || x || y` some tokens return; the curve follows
    /// from the length. Does not check that the point is on the curve: the
    /// HSM is the source of truth and verifiers check it anyway.
    pub fn from_ec_point(ec_point: &[u8]) -> Result<Self, SigningError> {
        // Lengths 65/97 (raw) and 67/99 (wrapped) never collide, so the
        // length alone says which form and which curve.
        let point = match ec_point {
            [0x04, 0x41, rest @ ..] if rest.len() == 0x41 => rest,
            [0x04, 0x61, rest @ ..] if rest.len() == 0x61 => rest,
            _ => ec_point,
        };
        let coords = match point {
            [0x04, coords @ ..] => coords,
            [0x02 | 0x03, ..] => {
                return Err(SigningError::InvalidKey(
                    "compressed EC points are not supported".into(),
                ))
            }
            _ => {
                return Err(SigningError::InvalidKey(
                    "not an uncompressed EC point".into(),
                ))
            }
        };
        let (x, y) = coords.split_at(coords.len() / 2);
        match coords.len() {
            64 => Ok(Self::P256 {
                x: x.try_into().expect("32 bytes"),
                y: y.try_into().expect("32 bytes"),
            }),
            96 => Ok(Self::P384 {
                x: x.try_into().expect("48 bytes"),
                y: y.try_into().expect("48 bytes"),
            }),
            n => Err(SigningError::InvalidKey(format!(
                "EC point with {n} coordinate bytes is neither P-256 nor P-384"
            ))),
        }
    }

    /// From a PKCS#11 `CKA_EC_POINT` of an Ed25519 key: a DER OCTET STRING of
    /// 32 bytes, or the raw 32 bytes.
    pub fn from_ed25519_point(point: &[u8]) -> Result<Self, SigningError> {
        let raw = match point {
            [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest,
            _ => point,
        };
        raw.try_into().map(Self::Ed25519).map_err(|_| {
            SigningError::InvalidKey(format!(
                "Ed25519 public key must be 32 bytes, got {}",
                raw.len()
            ))
        })
    }

    /// From PKCS#11 `CKA_MODULUS` and `CKA_PUBLIC_EXPONENT` (big-endian).
    pub fn from_rsa_components(modulus: &[u8], exponent: &[u8]) -> Result<Self, SigningError> {
        let n = strip_zeros(modulus);
        let e = strip_zeros(exponent);
        let bits = n
            .first()
            .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) || n[n.len() - 1] & 1 == 0 {
            return Err(SigningError::InvalidKey(format!(
                "RSA modulus must be odd and {RSA_MIN_BITS}..={RSA_MAX_BITS} bits, got {bits} bits"
            )));
        }
        if e.is_empty() || e.len() > n.len() || e[e.len() - 1] & 1 == 0 || e == [1] {
            return Err(SigningError::InvalidKey(
                "invalid RSA public exponent".into(),
            ));
        }
        Ok(Self::Rsa {
            n: n.to_vec(),
            e: e.to_vec(),
        })
    }

    /// The single JWS algorithm used with this key type.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::P256 { .. } => Algorithm::Es256,
            Self::P384 { .. } => Algorithm::Es384,
            Self::Ed25519(_) => Algorithm::EdDsa,
            Self::Rsa { .. } => Algorithm::Ps256,
        }
    }

    /// Length of a raw signature by this key, as the HSM returns it.
    pub(crate) fn signature_len(&self) -> usize {
        match self {
            Self::P256 { .. } | Self::Ed25519(_) => 64,
            Self::P384 { .. } => 96,
            Self::Rsa { n, .. } => strip_zeros(n).len(),
        }
    }

    /// True when `signature` (raw, as the HSM returns it) is a valid signature of
    /// `message` by this key with its algorithm (ES256/ES384 over SHA-256/384, Ed25519,
    /// PS256 with a 32-byte salt). Verified in software (ring), independently of the HSM.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        use ring::signature as sig;
        match self {
            Self::P256 { x, y } => {
                let point = [&[4u8][..], x, y].concat();
                sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            Self::P384 { x, y } => {
                let point = [&[4u8][..], x, y].concat();
                sig::UnparsedPublicKey::new(&sig::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            Self::Ed25519(k) => sig::UnparsedPublicKey::new(&sig::ED25519, k)
                .verify(message, signature)
                .is_ok(),
            Self::Rsa { n, e } => sig::RsaPublicKeyComponents {
                n: strip_zeros(n),
                e: strip_zeros(e),
            }
            .verify(&sig::RSA_PSS_2048_8192_SHA256, message, signature)
            .is_ok(),
        }
    }

    /// DER SubjectPublicKeyInfo (RFC 5280 / 5480 / 8410 / 8017 forms).
    pub fn to_spki_der(&self) -> Result<Vec<u8>, SigningError> {
        self.spki()?.to_der().map_err(enc_err)
    }

    /// Parses a DER SubjectPublicKeyInfo of a supported key type.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, SigningError> {
        let spki = SubjectPublicKeyInfoRef::from_der(der)
            .map_err(|e| SigningError::InvalidKey(format!("not a SubjectPublicKeyInfo: {e}")))?;
        let bits = spki.subject_public_key.as_bytes().ok_or_else(|| {
            SigningError::InvalidKey("public key BIT STRING has unused bits".into())
        })?;
        let alg = &spki.algorithm;
        match alg.oid {
            ID_EC_PUBLIC_KEY => {
                let curve = alg
                    .parameters_oid()
                    .map_err(|_| SigningError::InvalidKey("EC key without named curve".into()))?;
                let key = Self::from_ec_point(bits)?;
                match (&key, curve) {
                    (Self::P256 { .. }, SECP256R1) | (Self::P384 { .. }, SECP384R1) => Ok(key),
                    _ => Err(SigningError::InvalidKey(format!(
                        "EC point does not match curve {curve}"
                    ))),
                }
            }
            ID_ED25519 if alg.parameters.is_none() => Self::from_ed25519_point(bits),
            RSA_ENCRYPTION => {
                let rsa = RsaPublicKeyDer::from_der(bits)
                    .map_err(|e| SigningError::InvalidKey(format!("bad RSAPublicKey: {e}")))?;
                Self::from_rsa_components(rsa.n.as_bytes(), rsa.e.as_bytes())
            }
            oid => Err(SigningError::InvalidKey(format!(
                "unsupported key algorithm {oid}"
            ))),
        }
    }

    pub(crate) fn spki(&self) -> Result<SubjectPublicKeyInfoOwned, SigningError> {
        let (oid, params, bits) = match self {
            Self::P256 { x, y } => (ID_EC_PUBLIC_KEY, Some(SECP256R1), uncompressed(x, y)),
            Self::P384 { x, y } => (ID_EC_PUBLIC_KEY, Some(SECP384R1), uncompressed(x, y)),
            Self::Ed25519(k) => (ID_ED25519, None, k.to_vec()),
            Self::Rsa { n, e } => {
                let key = RsaPublicKeyDer {
                    n: UintRef::new(n).map_err(enc_err)?,
                    e: UintRef::new(e).map_err(enc_err)?,
                };
                (RSA_ENCRYPTION, None, key.to_der().map_err(enc_err)?)
            }
        };
        let parameters = match (params, self) {
            (Some(curve), _) => Some(curve.to_der().map_err(enc_err)?),
            (None, Self::Rsa { .. }) => Some(DER_NULL.to_vec()),
            (None, _) => None,
        };
        let algorithm = AlgorithmIdentifierRef {
            oid,
            parameters: parameters
                .as_deref()
                .map(AnyRef::from_der)
                .transpose()
                .map_err(enc_err)?,
        };
        Ok(SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned::from(algorithm),
            subject_public_key: BitString::from_bytes(&bits).map_err(enc_err)?,
        })
    }

    /// The JWK key members (RFC 7517/7518/8037), base64url-encoded.
    fn jwk_members(&self) -> [(&'static str, String); 4] {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        // Returned in lexicographic order, as RFC 7638 needs; unused slots are empty.
        match self {
            Self::P256 { x, y } => ec_members("P-256", b64(x), b64(y)),
            Self::P384 { x, y } => ec_members("P-384", b64(x), b64(y)),
            Self::Ed25519(k) => [
                ("crv", "Ed25519".into()),
                ("kty", "OKP".into()),
                ("x", b64(k)),
                ("", String::new()),
            ],
            Self::Rsa { n, e } => [
                ("e", b64(strip_zeros(e))),
                ("kty", "RSA".into()),
                ("n", b64(strip_zeros(n))),
                ("", String::new()),
            ],
        }
    }
}

fn ec_members(crv: &str, x: String, y: String) -> [(&'static str, String); 4] {
    [
        ("crv", crv.into()),
        ("kty", "EC".into()),
        ("x", x),
        ("y", y),
    ]
}

/// RFC 7638 JWK thumbprint: base64url(SHA-256) of the required members in
/// lexicographic order, without whitespace.
pub fn thumbprint(pk: &PublicKey) -> String {
    let mut canonical = String::with_capacity(256);
    canonical.push('{');
    for (i, (name, value)) in pk
        .jwk_members()
        .iter()
        .filter(|(n, _)| !n.is_empty())
        .enumerate()
    {
        if i > 0 {
            canonical.push(',');
        }
        // Names and base64url/curve values never need JSON escaping.
        canonical.push('"');
        canonical.push_str(name);
        canonical.push_str("\":\"");
        canonical.push_str(value);
        canonical.push('"');
    }
    canonical.push('}');
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// A public JWK with `kid`, `alg` and `"use":"sig"`.
///
/// With a non-empty `x5c` chain (DER, leaf first) it also carries `x5c`
/// (standard base64) and `x5t#S256` of the leaf. `alg` is expected to be
/// `pk.algorithm()`; it is not checked, so a mismatch publishes a useless key.
pub fn jwk(pk: &PublicKey, kid: &str, alg: Algorithm, x5c: Option<&[Vec<u8>]>) -> Value {
    let mut map = Map::new();
    for (name, value) in pk.jwk_members() {
        if !name.is_empty() {
            map.insert(name.into(), Value::String(value));
        }
    }
    map.insert("kid".into(), kid.into());
    map.insert("alg".into(), alg.jws_name().into());
    map.insert("use".into(), "sig".into());
    if let Some(chain @ [leaf, ..]) = x5c {
        map.insert(
            "x5c".into(),
            chain.iter().map(|c| STANDARD.encode(c)).collect(),
        );
        map.insert(
            "x5t#S256".into(),
            URL_SAFE_NO_PAD
                .encode(ring::digest::digest(&ring::digest::SHA256, leaf))
                .into(),
        );
    }
    Value::Object(map)
}

/// A JWK Set document `{"keys":[...]}`.
pub fn jwks(keys: &[Value]) -> String {
    #[derive(Serialize)]
    struct Jwks<'a> {
        keys: &'a [Value],
    }
    // Serialising `Value`s cannot fail: their map keys are always strings.
    serde_json::to_string(&Jwks { keys }).expect("JSON values always serialise")
}

fn uncompressed(x: &[u8], y: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(1 + x.len() + y.len());
    p.push(0x04);
    p.extend_from_slice(x);
    p.extend_from_slice(y);
    p
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

fn enc_err(e: der::Error) -> SigningError {
    SigningError::Encoding(e.to_string())
}
