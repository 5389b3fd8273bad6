//! X.509 certificates and PKCS#10 requests whose signatures come from the HSM.
//!
//! Two-phase like `signing`: [`csr_to_sign`] / [`certificate_to_sign`]
//! return a [`ToBeSigned`] holding the DER to be signed, the HSM module signs
//! [`ToBeSigned::bytes`] (or [`ToBeSigned::digest`]), and
//! [`ToBeSigned::assemble`] produces the final DER.

mod build;

#[cfg(test)]
pub(crate) mod tests;

use std::{fmt, str::FromStr};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use der::{Decode, Encode};

pub use build::{
    certificate_to_sign, csr_to_sign, CertificateParams, IssuerCertificate, IssuerRef, KeyUsage,
    ToBeSigned,
};

use crate::common::SigningError;

/// Errors from building or assembling certificates and requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A caller-supplied value is unusable; the message says which and why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The signature handed to `assemble` has the wrong form or length.
    #[error("invalid signature: {0}")]
    InvalidSignature(String),
    /// DER encoding or decoding failed.
    #[error("DER error: {0}")]
    Der(String),
    /// A key or signature conversion failed.
    #[error(transparent)]
    Signing(#[from] SigningError),
}

impl From<der::Error> for PkiError {
    fn from(e: der::Error) -> Self {
        Self::Der(e.to_string())
    }
}

/// A distinguished name, e.g. `CN=Example Root,O=Example,C=DK`.
///
/// Parsed per RFC 4514 (most specific first in the string, encoded in reverse).
/// `C` is encoded as PrintableString, other attributes as UTF8String.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(x509_cert::name::Name);

impl FromStr for Name {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = x509_cert::name::Name::from_str(s)
            .map_err(|e| PkiError::InvalidArgument(format!("invalid name {s:?}: {e}")))?;
        if name.is_empty() {
            return Err(PkiError::InvalidArgument("name must not be empty".into()));
        }
        Ok(Self(name))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Name {
    /// The DER `Name`, as it appears in certificates.
    pub fn to_der(&self) -> Result<Vec<u8>, PkiError> {
        Ok(self.0.to_der()?)
    }

    /// Parses a DER `Name`.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        Ok(Self(x509_cert::name::Name::from_der(der)?))
    }
}

/// PEM-encodes `der` with the given label (e.g. `CERTIFICATE`,
/// `CERTIFICATE REQUEST`), 64 characters a line, as RFC 7468 prescribes.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    pem.push_str("-----BEGIN ");
    pem.push_str(label);
    pem.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END ");
    pem.push_str(label);
    pem.push_str("-----\n");
    pem
}

/// SHA-256 fingerprint as `openssl x509 -fingerprint -sha256` prints it:
/// upper-case hex pairs separated by colons.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::with_capacity(digest.as_ref().len() * 3);
    for (i, b) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push(HEX[usize::from(b >> 4)].into());
        out.push(HEX[usize::from(b & 0xf)].into());
    }
    out
}
