//! The RFC 6030 data model: the container header, the key packages and their values.
//!
//! Everything here is plain data as the file states it. Secret material (a plain
//! `Secret` value, a decrypted key) is held only in [`SecretBytes`], whose `Debug`
//! is redacted and whose memory is zeroized on drop. Encrypted values are not
//! secret (they are what the file carries on disk) and are plain `Vec<u8>`.

use std::fmt;

use secrecy::ExposeSecret;
use zeroize::{Zeroize, Zeroizing};

/// The PSKC namespace, `urn:ietf:params:xml:ns:keyprov:pskc`.
pub const NS_PSKC: &str = "urn:ietf:params:xml:ns:keyprov:pskc";
/// XML Signature (xmldsig), `http://www.w3.org/2000/09/xmldsig#`.
pub const NS_DS: &str = "http://www.w3.org/2000/09/xmldsig#";
/// XML Encryption (xmlenc), `http://www.w3.org/2001/04/xmlenc#`.
pub const NS_XENC: &str = "http://www.w3.org/2001/04/xmlenc#";
/// XML Encryption 1.1 (DerivedKey), `http://www.w3.org/2009/xmlenc11#`.
pub const NS_XENC11: &str = "http://www.w3.org/2009/xmlenc11#";
/// PKCS #5 v2.0 schema (PBKDF2-params).
pub const NS_PKCS5: &str = "http://www.rsasecurity.com/rsalabs/pkcs/schemas/pkcs-5v2-0#";

/// Secret bytes: zeroized on drop, `Debug` redacted, read through
/// [`ExposeSecret::expose_secret`].
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes` (not copied, zeroized when dropped).
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// Number of bytes (not secret: key lengths are public parameters).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        SecretBytes::new(v)
    }
}

impl ExposeSecret<[u8]> for SecretBytes {
    fn expose_secret(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.0.len())
    }
}

impl Zeroize for SecretBytes {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

/// The header of a `KeyContainer`: everything before the first `KeyPackage`.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Header {
    /// `KeyContainer/@Version` (RFC 6030 requires "1.0"; other versions are refused).
    pub version: String,
    /// `KeyContainer/@Id`.
    pub id: Option<String>,
    /// `EncryptionKey`: how the encrypted values of this file are protected.
    pub encryption_key: Option<EncryptionKey>,
    /// `MACMethod`: how the `ValueMAC`s of this file are computed.
    pub mac_method: Option<MacMethod>,
    /// Foreign-namespace elements and `Extensions` skipped in the header (qualified
    /// names, at most [`crate::Limits::max_recorded_unknown`]).
    pub ignored: Vec<String>,
}

/// `EncryptionKey` (RFC 6030 §6): the key under which encrypted values are encrypted.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum EncryptionKey {
    /// `ds:KeyName`: a pre-shared transport key known by name (§6.1).
    KeyName(String),
    /// `xenc11:DerivedKey`: a key derived from a password with PBKDF2 (§6.2).
    DerivedKey(DerivedKey),
    /// `ds:X509Data`: the values are encrypted to the holder of this certificate's
    /// RSA key (§6.3). DER certificates, in file order.
    X509 {
        /// DER-encoded `ds:X509Certificate`s.
        certificates: Vec<Vec<u8>>,
    },
}

/// `xenc11:DerivedKey` with PBKDF2 (RFC 6030 §6.2, RFC 8018).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DerivedKey {
    /// `DerivedKey/@Id`.
    pub id: Option<String>,
    /// `xenc11:MasterKeyName`: the name of the password.
    pub master_key_name: Option<String>,
    /// `PBKDF2-params/Salt/Specified`.
    pub salt: Vec<u8>,
    /// `PBKDF2-params/IterationCount`.
    pub iteration_count: u32,
    /// `PBKDF2-params/KeyLength` in bytes; when absent, the key length of the
    /// encryption algorithm that uses the key.
    pub key_length: Option<usize>,
    /// `PBKDF2-params/PRF` (HMAC-SHA1 when absent or empty, per RFC 8018).
    pub prf: Prf,
}

/// The pseudo-random function of PBKDF2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Prf {
    /// `http://www.w3.org/2000/09/xmldsig#hmac-sha1` (the RFC 8018 default).
    HmacSha1,
    /// `http://www.w3.org/2001/04/xmldsig-more#hmac-sha256`.
    HmacSha256,
}

impl Prf {
    /// The PRF's URI (as `PBKDF2-params/PRF/@Algorithm` would name it).
    pub fn uri(self) -> &'static str {
        match self {
            Prf::HmacSha1 => "http://www.w3.org/2000/09/xmldsig#hmac-sha1",
            Prf::HmacSha256 => "http://www.w3.org/2001/04/xmldsig-more#hmac-sha256",
        }
    }
}

impl Header {
    /// For a password-protected file (§6.2): the PBKDF2 output length, as
    /// [`crate::crypto::Decryptor::from_password`] uses it: `KeyLength` when
    /// given, else the AES key length of the `MACKey`'s algorithm, else 16.
    /// `None` when the file has no `DerivedKey`.
    pub fn pbkdf2_key_length(&self) -> Option<usize> {
        let EncryptionKey::DerivedKey(d) = self.encryption_key.as_ref()? else {
            return None;
        };
        Some(
            d.key_length
                .or_else(|| {
                    self.mac_method
                        .as_ref()
                        .and_then(|m| m.mac_key.as_ref())
                        .and_then(|k| k.algorithm.aes_key_len())
                })
                .unwrap_or(16),
        )
    }
}

/// `MACMethod`: the MAC algorithm and its key for the `ValueMAC`s (RFC 6030 §6.1.1).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MacMethod {
    /// `MACMethod/@Algorithm`.
    pub algorithm: MacAlgorithm,
    /// `MACKey`: the MAC key, encrypted under the transport key. `None` when the
    /// file gives no `MACKey` (then the transport key itself is the MAC key, as
    /// in the earlier drafts; [`crate::crypto`] refuses that unless allowed).
    pub mac_key: Option<EncryptedValue>,
}

/// A MAC algorithm URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MacAlgorithm {
    /// `http://www.w3.org/2000/09/xmldsig#hmac-sha1` (20-byte MAC).
    HmacSha1,
    /// `http://www.w3.org/2001/04/xmldsig-more#hmac-sha256` (32-byte MAC).
    HmacSha256,
}

impl MacAlgorithm {
    /// The algorithm's URI.
    pub fn uri(self) -> &'static str {
        match self {
            MacAlgorithm::HmacSha1 => "http://www.w3.org/2000/09/xmldsig#hmac-sha1",
            MacAlgorithm::HmacSha256 => "http://www.w3.org/2001/04/xmldsig-more#hmac-sha256",
        }
    }

    /// Parses a MAC / PRF URI.
    pub fn from_uri(uri: &str) -> Option<Self> {
        match uri {
            "http://www.w3.org/2000/09/xmldsig#hmac-sha1" => Some(MacAlgorithm::HmacSha1),
            "http://www.w3.org/2001/04/xmldsig-more#hmac-sha256" => Some(MacAlgorithm::HmacSha256),
            _ => None,
        }
    }

    /// Length of the MAC in bytes.
    pub fn output_len(self) -> usize {
        match self {
            MacAlgorithm::HmacSha1 => 20,
            MacAlgorithm::HmacSha256 => 32,
        }
    }
}

/// An `xenc:EncryptionMethod/@Algorithm`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncryptionAlgorithm {
    /// `xmlenc#aes128-cbc`: IV (16 bytes) || ciphertext, PKCS#7 padding.
    Aes128Cbc,
    /// `xmlenc#aes192-cbc`.
    Aes192Cbc,
    /// `xmlenc#aes256-cbc`.
    Aes256Cbc,
    /// `xmlenc#kw-aes128` (RFC 3394 AES key wrap).
    KwAes128,
    /// `xmlenc#kw-aes192`.
    KwAes192,
    /// `xmlenc#kw-aes256`.
    KwAes256,
    /// `xmlenc#rsa-oaep-mgf1p` (RSA-OAEP, SHA-1, MGF1-SHA-1): decrypted in the HSM.
    RsaOaepMgf1p,
    /// `xmlenc#rsa-1_5` (PKCS#1 v1.5, Bleichenbacher-prone): decrypted in the HSM,
    /// only behind an explicit flag of the importer.
    Rsa15,
    /// Any other URI, as given (refused when a value must be decrypted with it).
    Unknown(String),
}

impl EncryptionAlgorithm {
    /// Parses an `EncryptionMethod` URI (unknown URIs are kept, not refused here).
    pub fn from_uri(uri: &str) -> Self {
        match uri {
            "http://www.w3.org/2001/04/xmlenc#aes128-cbc" => EncryptionAlgorithm::Aes128Cbc,
            "http://www.w3.org/2001/04/xmlenc#aes192-cbc" => EncryptionAlgorithm::Aes192Cbc,
            "http://www.w3.org/2001/04/xmlenc#aes256-cbc" => EncryptionAlgorithm::Aes256Cbc,
            "http://www.w3.org/2001/04/xmlenc#kw-aes128" => EncryptionAlgorithm::KwAes128,
            "http://www.w3.org/2001/04/xmlenc#kw-aes192" => EncryptionAlgorithm::KwAes192,
            "http://www.w3.org/2001/04/xmlenc#kw-aes256" => EncryptionAlgorithm::KwAes256,
            "http://www.w3.org/2001/04/xmlenc#rsa-oaep-mgf1p" => EncryptionAlgorithm::RsaOaepMgf1p,
            // RFC 6030 figure 8 spells it `rsa_1_5`.
            "http://www.w3.org/2001/04/xmlenc#rsa-1_5"
            | "http://www.w3.org/2001/04/xmlenc#rsa_1_5" => EncryptionAlgorithm::Rsa15,
            other => EncryptionAlgorithm::Unknown(other.to_owned()),
        }
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        match self {
            EncryptionAlgorithm::Aes128Cbc => "http://www.w3.org/2001/04/xmlenc#aes128-cbc",
            EncryptionAlgorithm::Aes192Cbc => "http://www.w3.org/2001/04/xmlenc#aes192-cbc",
            EncryptionAlgorithm::Aes256Cbc => "http://www.w3.org/2001/04/xmlenc#aes256-cbc",
            EncryptionAlgorithm::KwAes128 => "http://www.w3.org/2001/04/xmlenc#kw-aes128",
            EncryptionAlgorithm::KwAes192 => "http://www.w3.org/2001/04/xmlenc#kw-aes192",
            EncryptionAlgorithm::KwAes256 => "http://www.w3.org/2001/04/xmlenc#kw-aes256",
            EncryptionAlgorithm::RsaOaepMgf1p => "http://www.w3.org/2001/04/xmlenc#rsa-oaep-mgf1p",
            EncryptionAlgorithm::Rsa15 => "http://www.w3.org/2001/04/xmlenc#rsa-1_5",
            EncryptionAlgorithm::Unknown(u) => u,
        }
    }

    /// The AES key length in bytes for the AES algorithms (CBC and key wrap).
    pub fn aes_key_len(&self) -> Option<usize> {
        match self {
            EncryptionAlgorithm::Aes128Cbc | EncryptionAlgorithm::KwAes128 => Some(16),
            EncryptionAlgorithm::Aes192Cbc | EncryptionAlgorithm::KwAes192 => Some(24),
            EncryptionAlgorithm::Aes256Cbc | EncryptionAlgorithm::KwAes256 => Some(32),
            _ => None,
        }
    }

    /// True for the AES-CBC algorithms.
    pub fn is_cbc(&self) -> bool {
        matches!(
            self,
            EncryptionAlgorithm::Aes128Cbc
                | EncryptionAlgorithm::Aes192Cbc
                | EncryptionAlgorithm::Aes256Cbc
        )
    }

    /// True for the RFC 3394 key-wrap algorithms.
    pub fn is_key_wrap(&self) -> bool {
        matches!(
            self,
            EncryptionAlgorithm::KwAes128
                | EncryptionAlgorithm::KwAes192
                | EncryptionAlgorithm::KwAes256
        )
    }

    /// True for the RSA algorithms (§6.3: decrypted by the holder of the RSA key).
    pub fn is_rsa(&self) -> bool {
        matches!(
            self,
            EncryptionAlgorithm::RsaOaepMgf1p | EncryptionAlgorithm::Rsa15
        )
    }
}

/// An `xenc:EncryptedValue` / `MACKey`: algorithm and the decoded `CipherValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EncryptedValue {
    /// `@Id` of the `EncryptedValue` (figure 7 references it).
    pub id: Option<String>,
    /// `xenc:EncryptionMethod/@Algorithm`.
    pub algorithm: EncryptionAlgorithm,
    /// The base64-decoded `xenc:CipherData/xenc:CipherValue`: for AES-CBC the IV
    /// (16 bytes) followed by the ciphertext; the bytes the `ValueMAC` is over.
    pub cipher_value: Vec<u8>,
    /// For RSA-OAEP: `EncryptionMethod/ds:DigestMethod/@Algorithm` when given
    /// (absent: SHA-1, the `rsa-oaep-mgf1p` default).
    pub oaep_digest: Option<String>,
    /// For RSA-OAEP: `EncryptionMethod/xenc:OAEPparams` (the label), when given.
    pub oaep_params: Option<Vec<u8>>,
}

impl EncryptedValue {
    /// Builds one (for importers and generators).
    pub fn new(algorithm: EncryptionAlgorithm, cipher_value: Vec<u8>) -> Self {
        EncryptedValue {
            id: None,
            algorithm,
            cipher_value,
            oaep_digest: None,
            oaep_params: None,
        }
    }

    /// For AES-CBC: `(iv, ciphertext)`, split off the cipher value; `None` when the
    /// value is not AES-CBC or too short to hold an IV and one block.
    pub fn cbc_parts(&self) -> Option<(&[u8], &[u8])> {
        if !self.algorithm.is_cbc() || self.cipher_value.len() < 32 {
            return None;
        }
        let (iv, ct) = self.cipher_value.split_at(16);
        if ct.len() % 16 != 0 {
            return None;
        }
        Some((iv, ct))
    }
}

/// A secret value: as given in the clear, or encrypted with its `ValueMAC`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SecretValue {
    /// `PlainValue` (base64-decoded).
    Plain(SecretBytes),
    /// `EncryptedValue` and its `ValueMAC` (when the file has one).
    Encrypted {
        /// The encrypted value.
        value: EncryptedValue,
        /// `ValueMAC`, base64-decoded.
        mac: Option<Vec<u8>>,
    },
}

/// An integer data value (`Counter`, `Time`, `TimeInterval`, `TimeDrift`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IntValue {
    /// `PlainValue`.
    Plain(i64),
    /// `EncryptedValue` (decrypts to a big-endian integer) and its `ValueMAC`.
    Encrypted {
        /// The encrypted value.
        value: EncryptedValue,
        /// `ValueMAC`, base64-decoded.
        mac: Option<Vec<u8>>,
    },
}

impl IntValue {
    /// The plain value, when not encrypted.
    pub fn plain(&self) -> Option<i64> {
        match self {
            IntValue::Plain(v) => Some(*v),
            IntValue::Encrypted { .. } => None,
        }
    }
}

/// `Key/Data`.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Data {
    /// `Secret`.
    pub secret: Option<SecretValue>,
    /// `Counter` (HOTP moving factor).
    pub counter: Option<IntValue>,
    /// `Time` (TOTP: the time, seconds since the epoch, of the device clock).
    pub time: Option<IntValue>,
    /// `TimeInterval` (TOTP step in seconds).
    pub time_interval: Option<IntValue>,
    /// `TimeDrift` (TOTP: device drift in intervals).
    pub time_drift: Option<IntValue>,
}

/// `Key/@Algorithm`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Algorithm {
    /// `urn:ietf:params:xml:ns:keyprov:pskc:hotp`.
    Hotp,
    /// `urn:ietf:params:xml:ns:keyprov:pskc:totp` (also `...:pskc#totp` of the drafts).
    Totp,
    /// Anything else, as given (e.g. `...:pskc:pin` of figure 5).
    Unknown(String),
}

impl Algorithm {
    /// Parses a `Key/@Algorithm` URI.
    pub fn from_uri(uri: &str) -> Self {
        match uri {
            "urn:ietf:params:xml:ns:keyprov:pskc:hotp"
            | "urn:ietf:params:xml:ns:keyprov:pskc#hotp" => Algorithm::Hotp,
            "urn:ietf:params:xml:ns:keyprov:pskc:totp"
            | "urn:ietf:params:xml:ns:keyprov:pskc#totp" => Algorithm::Totp,
            other => Algorithm::Unknown(other.to_owned()),
        }
    }

    /// The URI (the RFC 6030 spelling for HOTP/TOTP).
    pub fn uri(&self) -> &str {
        match self {
            Algorithm::Hotp => "urn:ietf:params:xml:ns:keyprov:pskc:hotp",
            Algorithm::Totp => "urn:ietf:params:xml:ns:keyprov:pskc:totp",
            Algorithm::Unknown(u) => u,
        }
    }
}

/// `ResponseFormat/@Encoding` (and `ChallengeFormat`, `PINPolicy/@PINEncoding`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Encoding {
    /// `DECIMAL`.
    Decimal,
    /// `HEXADECIMAL`.
    Hexadecimal,
    /// `ALPHANUMERIC`.
    Alphanumeric,
    /// `BASE64`.
    Base64,
    /// `BINARY`.
    Binary,
    /// Anything else, as given.
    Other(String),
}

impl Encoding {
    /// Parses the attribute value.
    pub fn parse(s: &str) -> Self {
        match s {
            "DECIMAL" => Encoding::Decimal,
            "HEXADECIMAL" => Encoding::Hexadecimal,
            "ALPHANUMERIC" => Encoding::Alphanumeric,
            "BASE64" => Encoding::Base64,
            "BINARY" => Encoding::Binary,
            other => Encoding::Other(other.to_owned()),
        }
    }
}

/// `AlgorithmParameters/ResponseFormat`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseFormat {
    /// `@Length`: number of digits/characters of the response.
    pub length: u32,
    /// `@Encoding`.
    pub encoding: Encoding,
    /// `@CheckDigits`.
    pub check_digits: bool,
}

/// The HMAC hash of an HOTP/TOTP key (`AlgorithmParameters/Suite`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OtpHash {
    /// HMAC-SHA1 (the default when `Suite` is absent).
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl OtpHash {
    /// Parses a `Suite` value: `HMAC-SHA1`, `HMAC-SHA256`, `HMAC-SHA512` (case and
    /// the dashes ignored, the `HMAC-` prefix optional).
    pub fn from_suite(suite: &str) -> Option<Self> {
        let n: String = suite
            .chars()
            .filter(|c| *c != '-' && *c != '_' && !c.is_whitespace())
            .collect::<String>()
            .to_ascii_uppercase();
        match n.strip_prefix("HMAC").unwrap_or(&n) {
            "SHA1" => Some(OtpHash::Sha1),
            "SHA256" => Some(OtpHash::Sha256),
            "SHA512" => Some(OtpHash::Sha512),
            _ => None,
        }
    }
}

/// `Key/AlgorithmParameters`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AlgorithmParameters {
    /// `Suite`.
    pub suite: Option<String>,
    /// `ResponseFormat`.
    pub response_format: Option<ResponseFormat>,
    /// `ChallengeFormat` is present (challenge-response OTP: refused by
    /// [`Key::unsupported`]).
    pub challenge_format: bool,
}

/// A `xs:dateTime` as written and as seconds since the Unix epoch (UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateTime {
    /// The text as in the file.
    pub text: String,
    /// Seconds since 1970-01-01T00:00:00Z (a missing zone is taken as UTC).
    pub unix: i64,
}

/// A `KeyUsage` value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyUsage {
    /// `OTP`.
    Otp,
    /// `CR` (challenge-response).
    Cr,
    /// `Encrypt`.
    Encrypt,
    /// `Integrity`.
    Integrity,
    /// `Verify`.
    Verify,
    /// `Unlock`.
    Unlock,
    /// `Decrypt`.
    Decrypt,
    /// `KeyWrap`.
    KeyWrap,
    /// `Unwrap`.
    Unwrap,
    /// `Derive`.
    Derive,
    /// `Generate`.
    Generate,
    /// Anything else, as given.
    Other(String),
}

impl KeyUsage {
    /// Parses a `KeyUsage` element's text.
    pub fn parse(s: &str) -> Self {
        match s {
            "OTP" => KeyUsage::Otp,
            "CR" => KeyUsage::Cr,
            "Encrypt" => KeyUsage::Encrypt,
            "Integrity" => KeyUsage::Integrity,
            "Verify" => KeyUsage::Verify,
            "Unlock" => KeyUsage::Unlock,
            "Decrypt" => KeyUsage::Decrypt,
            "KeyWrap" => KeyUsage::KeyWrap,
            "Unwrap" => KeyUsage::Unwrap,
            "Derive" => KeyUsage::Derive,
            "Generate" => KeyUsage::Generate,
            other => KeyUsage::Other(other.to_owned()),
        }
    }
}

/// `PINPolicy/@PINUsageMode`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PinUsageMode {
    /// `Local`: the device checks the PIN; the OTP is unaffected.
    Local,
    /// `Prepend`: the PIN is sent before the OTP.
    Prepend,
    /// `Append`: the PIN is sent after the OTP.
    Append,
    /// `Algorithmic`: the PIN is an input of the OTP algorithm.
    Algorithmic,
    /// Anything else, as given.
    Other(String),
}

/// `Policy/PINPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PinPolicy {
    /// `@PINKeyId`: the `Key/@Id` of the key holding the PIN.
    pub pin_key_id: Option<String>,
    /// `@PINUsageMode`.
    pub usage_mode: PinUsageMode,
    /// `@MaxFailedAttempts`.
    pub max_failed_attempts: Option<u32>,
    /// `@MinLength`.
    pub min_length: Option<u32>,
    /// `@MaxLength`.
    pub max_length: Option<u32>,
    /// `@PINEncoding`.
    pub encoding: Option<Encoding>,
}

/// `Key/Policy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Policy {
    /// `StartDate`: the key must not be used before.
    pub start_date: Option<DateTime>,
    /// `ExpiryDate`: the key must not be used after.
    pub expiry_date: Option<DateTime>,
    /// `PINPolicy`.
    pub pin_policy: Option<PinPolicy>,
    /// `KeyUsage`s (empty: no restriction stated).
    pub key_usage: Vec<KeyUsage>,
    /// `NumberOfTransactions`.
    pub number_of_transactions: Option<u64>,
}

/// Why a key's policy or parameters cannot be honoured by an OTP verifier that
/// keeps a seed, a counter/time step and a code length (the import refuses the
/// entry with this reason). See [`Policy::refusals`] for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// `KeyUsage` is given and does not include `OTP`.
    NotForOtp,
    /// `PINPolicy` with `PINUsageMode` Prepend/Append/Algorithmic: the server
    /// would have to check a PIN it is not given.
    ServerPin(PinUsageMode),
    /// `NumberOfTransactions`: no use-count limit is enforced by the verifier.
    NumberOfTransactions(u64),
    /// `ExpiryDate` before `StartDate`.
    EmptyValidity,
    /// `Key/@Algorithm` other than HOTP/TOTP.
    Algorithm(String),
    /// `ChallengeFormat` (challenge-response OTP).
    ChallengeResponse,
    /// `ResponseFormat` encoding other than DECIMAL, or a length outside 6..=10.
    ResponseFormat(String),
    /// No `Secret` (e.g. figure 4, a key to derive from a master key).
    NoSecret,
    /// `AlgorithmParameters/Suite` names no HMAC hash we know.
    Suite(String),
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::NotForOtp => write!(f, "KeyUsage does not include OTP"),
            Unsupported::ServerPin(m) => {
                write!(
                    f,
                    "PINPolicy PINUsageMode {m:?} needs a server-side PIN check"
                )
            }
            Unsupported::NumberOfTransactions(n) => {
                write!(f, "NumberOfTransactions {n} cannot be enforced")
            }
            Unsupported::EmptyValidity => write!(f, "ExpiryDate is before StartDate"),
            Unsupported::Algorithm(a) => write!(f, "unsupported key algorithm {a}"),
            Unsupported::ChallengeResponse => {
                write!(f, "ChallengeFormat (challenge-response) is not supported")
            }
            Unsupported::ResponseFormat(d) => write!(f, "unsupported ResponseFormat: {d}"),
            Unsupported::NoSecret => write!(f, "no Secret in the key's Data"),
            Unsupported::Suite(s) => write!(f, "unsupported Suite {s:?}"),
        }
    }
}

impl Policy {
    /// The policy elements an OTP verifier cannot honour. The rules (one per element):
    ///
    /// - `StartDate`, `ExpiryDate`: recorded (the importer stores or checks them);
    ///   refused only when the validity is empty (`ExpiryDate` < `StartDate`).
    /// - `KeyUsage`: recorded; refused when present without `OTP`.
    /// - `PINPolicy`: `Local` is recorded (the device checks the PIN, the codes are
    ///   unaffected); `Prepend`, `Append`, `Algorithmic` and unknown modes are
    ///   refused (the server would have to know and check the PIN).
    ///   `MaxFailedAttempts`, lengths and encoding are recorded.
    /// - `NumberOfTransactions`: refused (no use-count limit is enforced, so
    ///   importing would silently lift it).
    pub fn refusals(&self) -> Vec<Unsupported> {
        let mut out = Vec::new();
        if let (Some(s), Some(e)) = (&self.start_date, &self.expiry_date) {
            if e.unix < s.unix {
                out.push(Unsupported::EmptyValidity);
            }
        }
        if !self.key_usage.is_empty() && !self.key_usage.contains(&KeyUsage::Otp) {
            out.push(Unsupported::NotForOtp);
        }
        if let Some(p) = &self.pin_policy {
            if p.usage_mode != PinUsageMode::Local {
                out.push(Unsupported::ServerPin(p.usage_mode.clone()));
            }
        }
        if let Some(n) = self.number_of_transactions {
            out.push(Unsupported::NumberOfTransactions(n));
        }
        out
    }
}

/// `KeyPackage/DeviceInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// `Manufacturer`.
    pub manufacturer: Option<String>,
    /// `SerialNo` (the mapping file's key).
    pub serial_no: Option<String>,
    /// `Model`.
    pub model: Option<String>,
    /// `IssueNo`.
    pub issue_no: Option<String>,
    /// `DeviceBinding`.
    pub device_binding: Option<String>,
    /// `StartDate`.
    pub start_date: Option<DateTime>,
    /// `ExpiryDate`.
    pub expiry_date: Option<DateTime>,
    /// `UserId`.
    pub user_id: Option<String>,
}

/// `KeyPackage/CryptoModuleInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CryptoModuleInfo {
    /// `Id`.
    pub id: Option<String>,
}

/// `KeyPackage/Key`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Key {
    /// `@Id`: the credential id of the import.
    pub id: String,
    /// `@Algorithm`.
    pub algorithm: Algorithm,
    /// `Issuer`.
    pub issuer: Option<String>,
    /// `AlgorithmParameters`.
    pub algorithm_parameters: AlgorithmParameters,
    /// `KeyProfileId`.
    pub key_profile_id: Option<String>,
    /// `KeyReference`.
    pub key_reference: Option<String>,
    /// `FriendlyName`.
    pub friendly_name: Option<String>,
    /// `Data`.
    pub data: Data,
    /// `UserId`.
    pub user_id: Option<String>,
    /// `Policy`.
    pub policy: Policy,
}

impl Key {
    /// The HMAC hash: from `Suite`, HMAC-SHA1 when absent.
    pub fn otp_hash(&self) -> Result<OtpHash, Unsupported> {
        match &self.algorithm_parameters.suite {
            None => Ok(OtpHash::Sha1),
            Some(s) => OtpHash::from_suite(s).ok_or_else(|| Unsupported::Suite(s.clone())),
        }
    }

    /// Everything about this key that an HOTP/TOTP verifier cannot honour: the
    /// algorithm, challenge-response, the response format, the Suite, a missing secret, and
    /// [`Policy::refusals`]. Empty: importable.
    pub fn unsupported(&self) -> Vec<Unsupported> {
        let mut out = Vec::new();
        if let Algorithm::Unknown(u) = &self.algorithm {
            out.push(Unsupported::Algorithm(u.clone()));
        }
        if self.algorithm_parameters.challenge_format {
            out.push(Unsupported::ChallengeResponse);
        }
        if let Some(rf) = &self.algorithm_parameters.response_format {
            if rf.encoding != Encoding::Decimal {
                out.push(Unsupported::ResponseFormat(format!(
                    "Encoding {:?}",
                    rf.encoding
                )));
            } else if !(6..=10).contains(&rf.length) {
                out.push(Unsupported::ResponseFormat(format!("Length {}", rf.length)));
            }
        }
        if let Err(u) = self.otp_hash() {
            out.push(u);
        }
        if self.data.secret.is_none() {
            out.push(Unsupported::NoSecret);
        }
        out.extend(self.policy.refusals());
        out
    }
}

/// One `KeyPackage`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KeyPackage {
    /// 0-based position of the package in the file.
    pub index: u64,
    /// `DeviceInfo`.
    pub device_info: DeviceInfo,
    /// `CryptoModuleInfo`.
    pub crypto_module_info: Option<CryptoModuleInfo>,
    /// `Key` (RFC 6030 allows a KeyPackage without a Key; such a package is an
    /// [`crate::EntryError`]: there is nothing to import).
    pub key: Key,
    /// Foreign-namespace elements and `Extensions` skipped in this package.
    pub ignored: Vec<String>,
}

/// What follows the last `KeyPackage`.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Trailer {
    /// The container has a `Signature` (recorded, NOT verified: RFC 6030 §7
    /// signatures need the signer's certificate out of band; the importer reports it).
    pub signature: bool,
    /// Foreign-namespace elements and `Extensions` after the packages.
    pub ignored: Vec<String>,
}
