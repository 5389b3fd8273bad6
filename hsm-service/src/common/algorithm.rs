//! Signature algorithms of the HSM keys and their digests, shared by `signing`, `pki`
//! and the configuration.

use std::{fmt, str::FromStr};

/// Errors from building signing inputs or handling keys and signatures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SigningError {
    /// A caller-supplied value is unusable; the message says which and why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Public key material is malformed or of an unsupported type.
    #[error("invalid public key: {0}")]
    InvalidKey(String),
    /// A signature does not have the expected encoding or length.
    #[error("invalid signature encoding: {0}")]
    InvalidSignature(String),
    /// Serialising a structure failed (should not happen with valid input).
    #[error("encoding failed: {0}")]
    Encoding(String),
}

/// JWS signature algorithms the HSM keys are used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// Ed25519 (PureEdDSA: the HSM hashes the whole message itself).
    EdDsa,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt.
    Ps256,
}

/// Digests used by the [`Algorithm`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlgorithm {
    /// SHA-256 (32-byte output).
    Sha256,
    /// SHA-384 (48-byte output).
    Sha384,
}

impl DigestAlgorithm {
    /// Hashes `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let alg = match self {
            Self::Sha256 => &ring::digest::SHA256,
            Self::Sha384 => &ring::digest::SHA384,
        };
        ring::digest::digest(alg, data).as_ref().to_vec()
    }
}

impl Algorithm {
    /// The JWS `alg` header value.
    pub fn jws_name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::EdDsa => "EdDSA",
            Self::Ps256 => "PS256",
        }
    }

    /// The digest the HSM is given instead of the message; `None` for EdDSA,
    /// where the whole message must be passed (CKM_EDDSA hashes internally).
    pub fn digest_algorithm(self) -> Option<DigestAlgorithm> {
        match self {
            Self::Es256 | Self::Ps256 => Some(DigestAlgorithm::Sha256),
            Self::Es384 => Some(DigestAlgorithm::Sha384),
            Self::EdDsa => None,
        }
    }

    /// Hashes `message` with this algorithm's digest; `None` for EdDSA.
    pub fn digest(self, message: &[u8]) -> Option<Vec<u8>> {
        self.digest_algorithm().map(|d| d.digest(message))
    }

    /// Upper bound of the raw signature length, used to size buffers once.
    pub(crate) fn max_signature_len(self) -> usize {
        match self {
            Self::Es256 | Self::EdDsa => 64,
            Self::Es384 => 96,
            // Up to RSA-4096; larger moduli still work, with one reallocation.
            Self::Ps256 => 512,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.jws_name())
    }
}

impl FromStr for Algorithm {
    type Err = SigningError;

    /// Parses a JWS `alg` name (case-sensitive, as JWS requires).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ES256" => Ok(Self::Es256),
            "ES384" => Ok(Self::Es384),
            "EdDSA" => Ok(Self::EdDsa),
            "PS256" => Ok(Self::Ps256),
            _ => Err(SigningError::InvalidArgument(format!(
                "unsupported algorithm {s:?} (expected ES256, ES384, EdDSA or PS256)"
            ))),
        }
    }
}
