//! Errors: whole-file ([`Error`]), per entry ([`EntryError`]) and crypto ([`CryptoError`]).
//!
//! No error ever carries secret bytes: details name elements, lengths, URIs and
//! ids (which are not secret), never values of `Secret`, keys, passwords or MACs.

use std::fmt;

/// The whole file is refused (nothing of it should be imported).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the input failed.
    #[error("reading the PSKC file: {0}")]
    Io(#[from] std::io::Error),
    /// Not well-formed XML (or truncated), at a byte offset.
    #[error("malformed XML at byte {position}: {detail}")]
    Xml {
        /// Byte offset in the input.
        position: u64,
        /// What is wrong.
        detail: String,
    },
    /// A `<!DOCTYPE>` / DTD: refused outright (no entities, no external entities).
    #[error("DOCTYPE/DTD is not allowed in a PSKC file (byte {position})")]
    Doctype {
        /// Byte offset in the input.
        position: u64,
    },
    /// An entity reference other than the five predefined ones and character references.
    #[error("undefined entity &{name}; at byte {position} (no DTD entities are accepted)")]
    Entity {
        /// The entity name.
        name: String,
        /// Byte offset in the input.
        position: u64,
    },
    /// A limit of [`crate::Limits`] was exceeded.
    #[error("limit exceeded: {what} (limit {limit})")]
    Limit {
        /// Which limit.
        what: &'static str,
        /// Its value.
        limit: u64,
    },
    /// The root is not a PSKC `KeyContainer`, or the structure is not RFC 6030's.
    #[error("not an RFC 6030 KeyContainer: {0}")]
    Structure(String),
    /// The header (`EncryptionKey`, `MACMethod`) is invalid or uses an
    /// unsupported algorithm: no entry could be verified.
    #[error("invalid container header: {0}")]
    Header(String),
    /// Two KeyPackages have the same `Key/@Id`.
    #[error("duplicate Key Id {id:?} (KeyPackage {index})")]
    DuplicateKeyId {
        /// The id.
        id: String,
        /// 0-based index of the second package with it.
        index: u64,
    },
    /// A text encoding other than UTF-8 was declared.
    #[error("unsupported document encoding {0:?} (only UTF-8)")]
    Encoding(String),
}

/// One `KeyPackage` is refused; the others may still be imported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryError {
    /// 0-based index of the package in the file.
    pub index: u64,
    /// `Key/@Id`, when the package has one.
    pub key_id: Option<String>,
    /// `DeviceInfo/SerialNo`, when given.
    pub serial_no: Option<String>,
    /// What is wrong.
    pub kind: EntryErrorKind,
}

impl EntryError {
    /// Builds one (the import side reports its own per-entry refusals this way too).
    pub fn new(
        index: u64,
        key_id: Option<String>,
        serial_no: Option<String>,
        kind: EntryErrorKind,
    ) -> Self {
        EntryError {
            index,
            key_id,
            serial_no,
            kind,
        }
    }
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPackage {}", self.index)?;
        if let Some(id) = &self.key_id {
            write!(f, " (Key Id {id:?})")?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for EntryError {}

/// Why one entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryErrorKind {
    /// The package has no `Key`.
    #[error("no Key element")]
    NoKey,
    /// `Key` without `@Id`.
    #[error("Key has no Id attribute")]
    MissingKeyId,
    /// `Key` without `@Algorithm`.
    #[error("Key has no Algorithm attribute")]
    MissingAlgorithm,
    /// A value is malformed (bad base64, not a number, bad date, ...).
    #[error("invalid {element}: {detail}")]
    InvalidValue {
        /// The element or attribute.
        element: String,
        /// What is wrong (never the value of a secret).
        detail: String,
    },
    /// An element of the PSKC/xmlenc/xmldsig namespaces that RFC 6030 does not
    /// define at that position (refused: it could carry a restriction we'd ignore).
    #[error("unknown element {0}")]
    UnknownElement(String),
    /// An element given twice where RFC 6030 allows one.
    #[error("duplicate element {0}")]
    DuplicateElement(String),
    /// A cryptographic check or decryption failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The key cannot be honoured by the verifier (see [`crate::Key::unsupported`]).
    #[error("{0}")]
    Unsupported(crate::Unsupported),
}

/// A cryptographic operation on an entry failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// An encrypted value has no `ValueMAC` (refused unless unmaced values are allowed).
    #[error("encrypted value has no ValueMAC")]
    MissingMac,
    /// The file has no `MACMethod` although a value is encrypted.
    #[error("the file has no MACMethod for its encrypted values")]
    NoMacMethod,
    /// The `ValueMAC` does not match (wrong key, or the value was altered).
    #[error("ValueMAC does not match (wrong transport key or altered value)")]
    MacMismatch,
    /// Decryption failed (bad padding: wrong key or corrupt value).
    #[error("decryption failed (wrong key or corrupt value)")]
    DecryptFailed,
    /// The algorithm is not supported for this operation.
    #[error("unsupported algorithm {0}")]
    UnsupportedAlgorithm(String),
    /// A key has the wrong length for its algorithm.
    #[error("{what} has {got} bytes, {algorithm} needs {need}")]
    KeyLength {
        /// Which key.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The required length.
        need: usize,
        /// The algorithm.
        algorithm: String,
    },
    /// A decrypted secret is shorter or longer than allowed.
    #[error("secret of {got} bytes is outside {min}..={max}")]
    SecretLength {
        /// The length.
        got: usize,
        /// Minimum.
        min: usize,
        /// Maximum.
        max: usize,
    },
    /// The cipher value is malformed for its algorithm (too short, not whole blocks).
    #[error("malformed cipher value: {0}")]
    MalformedCipherValue(String),
    /// The value is encrypted to an RSA key (§6.3): decrypt it in the HSM.
    #[error("value is encrypted with {0}: decrypt it with the RSA transport key in the HSM")]
    NeedsRsa(String),
    /// The file's `EncryptionKey` does not match the key material given.
    #[error("{0}")]
    WrongKeyKind(String),
}
