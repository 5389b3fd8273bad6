//! Raw signatures over caller bytes: [`Signer::sign_raw`].

use super::signer::{invalid, mechanism_of, Grant, Signer};
use super::{ecdsa_raw_to_der, Algorithm};
use crate::error::Result;

/// Largest message a raw signature may cover.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// What a raw signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignInput {
    /// The message; hashed here (ECDSA, RSA-PSS) or signed whole (EdDSA).
    Message(Vec<u8>),
    /// A digest the caller computed with the key's hash (SHA-256 or SHA-384).
    Digest(Vec<u8>),
}

/// How an ECDSA signature is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureEncoding {
    /// Raw `r || s` (JWS); the only form of EdDSA and RSA-PSS signatures.
    #[default]
    Raw,
    /// DER `Ecdsa-Sig-Value` (X.509, CMS); ECDSA only.
    Der,
}

/// A raw signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSignature {
    /// The signature.
    pub signature: Vec<u8>,
    /// `kid` of the key version.
    pub kid: String,
    /// The algorithm it was made with.
    pub algorithm: Algorithm,
    /// Its encoding.
    pub encoding: SignatureEncoding,
}

impl Signer {
    /// A raw signature by the active version of `name` for a caller with `grant`.
    /// `algorithm`, when given, must be the key's.
    pub async fn sign_raw(
        &self,
        grant: &Grant,
        name: &str,
        algorithm: Option<Algorithm>,
        input: SignInput,
        encoding: SignatureEncoding,
    ) -> Result<RawSignature> {
        let name = self.granted(grant, name)?;
        let k = self.signing_version(&name)?;
        if let Some(alg) = algorithm {
            if alg != k.algorithm {
                return Err(invalid(format!(
                    "algorithm {alg} does not match key {name:?}, which signs {}",
                    k.algorithm
                )));
            }
        }
        let is_ecdsa = matches!(k.algorithm, Algorithm::Es256 | Algorithm::Es384);
        if encoding == SignatureEncoding::Der && !is_ecdsa {
            return Err(invalid(format!(
                "DER encoding applies to ECDSA signatures only, not {}",
                k.algorithm
            )));
        }
        let to_sign = match input {
            SignInput::Message(m) => {
                if m.len() > MAX_MESSAGE_LEN {
                    return Err(invalid(format!(
                        "message is {} bytes, the limit is {MAX_MESSAGE_LEN}",
                        m.len()
                    )));
                }
                k.algorithm.digest(&m).unwrap_or(m)
            }
            SignInput::Digest(d) => match k.algorithm.digest_algorithm() {
                None => {
                    return Err(invalid(format!(
                        "{} signs whole messages; send message, not digest",
                        k.algorithm
                    )))
                }
                Some(h) => {
                    let want = h.digest(b"").len();
                    if d.len() != want {
                        return Err(invalid(format!(
                            "digest must be {want} bytes for {}, got {}",
                            k.algorithm,
                            d.len()
                        )));
                    }
                    d
                }
            },
        };
        let raw = self
            .hsm
            .sign(&k.key_id, mechanism_of(k.algorithm), to_sign)
            .await?;
        let signature = match encoding {
            SignatureEncoding::Der => ecdsa_raw_to_der(&raw)?,
            SignatureEncoding::Raw => raw,
        };
        Ok(RawSignature {
            signature,
            kid: k.kid,
            algorithm: k.algorithm,
            encoding,
        })
    }
}
