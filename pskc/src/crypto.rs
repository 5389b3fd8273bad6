//! RFC 6030 §6: encryption and integrity of the key values.
//!
//! - §6.1 pre-shared key: AES-128/192/256-CBC (`xmlenc#aes*-cbc`, the IV prepended
//!   to the ciphertext) and RFC 3394 key wrap (`xmlenc#kw-aes*`); the MAC key of
//!   `MACMethod` is encrypted under the same transport key; each encrypted value
//!   has a `ValueMAC`, HMAC-SHA1 or HMAC-SHA256 over the base64-decoded
//!   `CipherValue` (IV || ciphertext).
//! - §6.2 password: PBKDF2 with the file's salt, iteration count and key length,
//!   PRF HMAC-SHA1 or HMAC-SHA256; the derived key is then used as in §6.1.
//! - §6.3 asymmetric: the values are RSA-encrypted (`rsa-oaep-mgf1p`, `rsa-1_5`);
//!   this crate only exposes them ([`EncryptedValue`]); the holder of the private
//!   key (the HSM) decrypts ([`CryptoError::NeedsRsa`] here).
//!
//! Order of checks: the `ValueMAC` is verified (in constant time, `subtle`)
//! BEFORE anything is decrypted; a value without `ValueMAC` is refused with
//! [`CryptoError::MissingMac`] unless [`Decryptor::allow_unmaced`] was set.
//! Decrypted bytes only ever live in zeroized buffers ([`SecretBytes`]).
//!
//! For importers that decrypt in an HSM (C_UnwrapKey with AES-CBC), the pieces are
//! public: [`Decryptor::transport_key`], [`Decryptor::mac_key`],
//! [`Decryptor::verify_mac`] and [`EncryptedValue::cbc_parts`].

use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::types::{
    EncryptedValue, EncryptionAlgorithm, EncryptionKey, Header, IntValue, MacAlgorithm, Prf,
    SecretBytes, SecretValue,
};

/// Upper bound on PBKDF2 iterations accepted from a file (a denial-of-service guard).
pub const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;

/// Default bounds on a secret's length: RFC 4226 requires at least 128 bits;
/// 64 bytes covers HMAC-SHA512 TOTP seeds.
pub const DEFAULT_SECRET_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// Computes a MAC (HMAC-SHA1 / HMAC-SHA256).
pub fn mac(algorithm: MacAlgorithm, key: &[u8], data: &[u8]) -> Vec<u8> {
    match algorithm {
        MacAlgorithm::HmacSha1 => {
            let mut m = <Hmac<sha1::Sha1> as Mac>::new_from_slice(key)
                .expect("HMAC accepts any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        MacAlgorithm::HmacSha256 => {
            let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
                .expect("HMAC accepts any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
    }
}

/// Checks `expected` against the MAC of `data` in constant time.
pub fn verify_mac(
    algorithm: MacAlgorithm,
    key: &[u8],
    data: &[u8],
    expected: &[u8],
) -> Result<(), CryptoError> {
    let got = mac(algorithm, key, data);
    // Length is public (it is the algorithm's); the comparison of equal-length
    // values is constant-time.
    if got.len() == expected.len() && bool::from(got.ct_eq(expected)) {
        Ok(())
    } else {
        Err(CryptoError::MacMismatch)
    }
}

/// PBKDF2 (RFC 8018) with HMAC-SHA1 or HMAC-SHA256.
pub fn pbkdf2(prf: Prf, password: &[u8], salt: &[u8], iterations: u32, len: usize) -> SecretBytes {
    let mut out = vec![0u8; len];
    match prf {
        Prf::HmacSha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, &mut out),
        Prf::HmacSha256 => {
            pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, &mut out)
        }
    }
    SecretBytes::new(out)
}

fn key_len_check(
    what: &'static str,
    key: &[u8],
    alg: &EncryptionAlgorithm,
) -> Result<usize, CryptoError> {
    let need = alg.aes_key_len().ok_or_else(|| unsupported_or_rsa(alg))?;
    if key.len() != need {
        return Err(CryptoError::KeyLength {
            what,
            got: key.len(),
            need,
            algorithm: alg.uri().to_owned(),
        });
    }
    Ok(need)
}

fn unsupported_or_rsa(alg: &EncryptionAlgorithm) -> CryptoError {
    if alg.is_rsa() {
        CryptoError::NeedsRsa(alg.uri().to_owned())
    } else {
        CryptoError::UnsupportedAlgorithm(alg.uri().to_owned())
    }
}

/// Decrypts an AES-CBC or AES key-wrap value with `key` (no MAC check: see
/// [`Decryptor::decrypt`]). XML Encryption padding: the last byte is the pad length
/// (1..=16); the other pad bytes are not checked (xmlenc allows arbitrary ones).
pub fn decrypt_raw(key: &[u8], value: &EncryptedValue) -> Result<SecretBytes, CryptoError> {
    let alg = &value.algorithm;
    key_len_check("transport key", key, alg)?;
    if alg.is_cbc() {
        let (iv, ct) = value.cbc_parts().ok_or_else(|| {
            CryptoError::MalformedCipherValue(format!(
                "{} bytes is not IV plus whole AES blocks",
                value.cipher_value.len()
            ))
        })?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let res = match alg {
            EncryptionAlgorithm::Aes128Cbc => {
                cbc::Decryptor::<aes::Aes128>::new_from_slices(key, iv)
                    .map_err(|_| CryptoError::DecryptFailed)?
                    .decrypt_padded_mut::<NoPadding>(&mut buf)
                    .map(|p| p.len())
            }
            EncryptionAlgorithm::Aes192Cbc => {
                cbc::Decryptor::<aes::Aes192>::new_from_slices(key, iv)
                    .map_err(|_| CryptoError::DecryptFailed)?
                    .decrypt_padded_mut::<NoPadding>(&mut buf)
                    .map(|p| p.len())
            }
            _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(key, iv)
                .map_err(|_| CryptoError::DecryptFailed)?
                .decrypt_padded_mut::<NoPadding>(&mut buf)
                .map(|p| p.len()),
        };
        let n = res.map_err(|_| CryptoError::DecryptFailed)?;
        let pad = *buf[..n].last().ok_or(CryptoError::DecryptFailed)? as usize;
        if pad == 0 || pad > 16 || pad > n {
            return Err(CryptoError::DecryptFailed);
        }
        return Ok(SecretBytes::new(buf[..n - pad].to_vec()));
    }
    // RFC 3394 key wrap.
    let ct = &value.cipher_value;
    if ct.len() < 24 || ct.len() % 8 != 0 {
        return Err(CryptoError::MalformedCipherValue(format!(
            "{} bytes is not a key-wrap output",
            ct.len()
        )));
    }
    let mut out = Zeroizing::new(vec![0u8; ct.len() - 8]);
    let r = match alg {
        EncryptionAlgorithm::KwAes128 => aes_kw::KekAes128::try_from(key)
            .map_err(|_| CryptoError::DecryptFailed)?
            .unwrap(ct, &mut out),
        EncryptionAlgorithm::KwAes192 => aes_kw::KekAes192::try_from(key)
            .map_err(|_| CryptoError::DecryptFailed)?
            .unwrap(ct, &mut out),
        _ => aes_kw::KekAes256::try_from(key)
            .map_err(|_| CryptoError::DecryptFailed)?
            .unwrap(ct, &mut out),
    };
    r.map_err(|_| CryptoError::DecryptFailed)?;
    Ok(SecretBytes::new(out.to_vec()))
}

/// Encrypts `plaintext` with AES-CBC (PKCS#7 padding, a valid xmlenc padding),
/// returning IV || ciphertext. For generators, tests and exporters.
pub fn encrypt_cbc(
    algorithm: &EncryptionAlgorithm,
    key: &[u8],
    iv: &[u8; 16],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if !algorithm.is_cbc() {
        return Err(CryptoError::UnsupportedAlgorithm(
            algorithm.uri().to_owned(),
        ));
    }
    key_len_check("key", key, algorithm)?;
    use aes::cipher::block_padding::Pkcs7;
    let ct = match algorithm {
        EncryptionAlgorithm::Aes128Cbc => cbc::Encryptor::<aes::Aes128>::new_from_slices(key, iv)
            .map_err(|_| CryptoError::DecryptFailed)?
            .encrypt_padded_vec_mut::<Pkcs7>(plaintext),
        EncryptionAlgorithm::Aes192Cbc => cbc::Encryptor::<aes::Aes192>::new_from_slices(key, iv)
            .map_err(|_| CryptoError::DecryptFailed)?
            .encrypt_padded_vec_mut::<Pkcs7>(plaintext),
        _ => cbc::Encryptor::<aes::Aes256>::new_from_slices(key, iv)
            .map_err(|_| CryptoError::DecryptFailed)?
            .encrypt_padded_vec_mut::<Pkcs7>(plaintext),
    };
    let mut out = Vec::with_capacity(16 + ct.len());
    out.extend_from_slice(iv);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Wraps `plaintext` (a multiple of 8 bytes, at least 16) with RFC 3394 key wrap.
pub fn wrap_kw(
    algorithm: &EncryptionAlgorithm,
    key: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if !algorithm.is_key_wrap() {
        return Err(CryptoError::UnsupportedAlgorithm(
            algorithm.uri().to_owned(),
        ));
    }
    key_len_check("key", key, algorithm)?;
    let bad =
        |_| CryptoError::MalformedCipherValue("key wrap input must be 8n bytes, n >= 2".into());
    match algorithm {
        EncryptionAlgorithm::KwAes128 => aes_kw::KekAes128::try_from(key)
            .map_err(|_| CryptoError::DecryptFailed)?
            .wrap_vec(plaintext)
            .map_err(bad),
        EncryptionAlgorithm::KwAes192 => aes_kw::KekAes192::try_from(key)
            .map_err(|_| CryptoError::DecryptFailed)?
            .wrap_vec(plaintext)
            .map_err(bad),
        _ => aes_kw::KekAes256::try_from(key)
            .map_err(|_| CryptoError::DecryptFailed)?
            .wrap_vec(plaintext)
            .map_err(bad),
    }
}

/// The result of a MAC check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MacStatus {
    /// The `ValueMAC` matched.
    Verified,
    /// There was no `ValueMAC` and unmaced values are allowed (report it loudly).
    Unmaced,
}

/// Decrypts and verifies the values of one file, given its transport key
/// (pre-shared, §6.1) or password (§6.2).
pub struct Decryptor {
    key: SecretBytes,
    mac: Option<(MacAlgorithm, SecretBytes)>,
    allow_unmaced: bool,
    secret_len: std::ops::RangeInclusive<usize>,
}

impl std::fmt::Debug for Decryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decryptor")
            .field("key", &self.key)
            .field("mac", &self.mac.as_ref().map(|(a, _)| a))
            .field("allow_unmaced", &self.allow_unmaced)
            .finish()
    }
}

impl Decryptor {
    /// With a pre-shared transport key (§6.1). Refused when the file's
    /// `EncryptionKey` is a DerivedKey (password) or an X.509 certificate.
    pub fn from_psk(header: &Header, psk: SecretBytes) -> Result<Self, CryptoError> {
        match &header.encryption_key {
            None | Some(EncryptionKey::KeyName(_)) => {}
            Some(EncryptionKey::DerivedKey(_)) => {
                return Err(CryptoError::WrongKeyKind(
                    "the file is encrypted with a password-derived key (use the password)".into(),
                ))
            }
            Some(EncryptionKey::X509 { .. }) => {
                return Err(CryptoError::WrongKeyKind(
                    "the file is encrypted to an RSA key (use the transport key pair)".into(),
                ))
            }
        }
        if !matches!(psk.len(), 16 | 24 | 32) {
            return Err(CryptoError::KeyLength {
                what: "pre-shared key",
                got: psk.len(),
                need: 16,
                algorithm: "AES (16, 24 or 32 bytes)".into(),
            });
        }
        Self::with_key(header, psk)
    }

    /// With a password (§6.2): PBKDF2 with the file's parameters. Refused when the
    /// file has no `DerivedKey`.
    pub fn from_password(header: &Header, password: &[u8]) -> Result<Self, CryptoError> {
        let Some(EncryptionKey::DerivedKey(d)) = &header.encryption_key else {
            return Err(CryptoError::WrongKeyKind(
                "the file has no password-derived EncryptionKey (use the pre-shared key)".into(),
            ));
        };
        if d.iteration_count > MAX_PBKDF2_ITERATIONS {
            return Err(CryptoError::UnsupportedAlgorithm(format!(
                "PBKDF2 with {} iterations (at most {MAX_PBKDF2_ITERATIONS})",
                d.iteration_count
            )));
        }
        let len = header.pbkdf2_key_length().unwrap_or(16);
        let key = pbkdf2(d.prf, password, &d.salt, d.iteration_count, len);
        Self::with_key(header, key)
    }

    fn with_key(header: &Header, key: SecretBytes) -> Result<Self, CryptoError> {
        let mac = match &header.mac_method {
            None => None,
            Some(m) => {
                let mk = match &m.mac_key {
                    // The MAC key is itself encrypted under the transport key; a
                    // wrong transport key shows here as a failed decryption or
                    // later as a MAC mismatch.
                    Some(enc) => decrypt_raw(key.expose_secret(), enc)?,
                    // No MACKey: the transport key is the MAC key (the drafts'
                    // convention, as other implementations do).
                    None => key.clone(),
                };
                Some((m.algorithm, mk))
            }
        };
        Ok(Decryptor {
            key,
            mac,
            allow_unmaced: false,
            secret_len: DEFAULT_SECRET_LEN,
        })
    }

    /// From keys obtained elsewhere (e.g. a transport key or MAC key that an HSM
    /// decrypted with RSA, §6.3): no header checks.
    pub fn from_parts(
        transport_key: SecretBytes,
        mac: Option<(MacAlgorithm, SecretBytes)>,
    ) -> Self {
        Decryptor {
            key: transport_key,
            mac,
            allow_unmaced: false,
            secret_len: DEFAULT_SECRET_LEN,
        }
    }

    /// Accept encrypted values without `ValueMAC` (`--allow-unmaced`).
    pub fn allow_unmaced(mut self, allow: bool) -> Self {
        self.allow_unmaced = allow;
        self
    }

    /// Bounds on decrypted (and plain) secret lengths (default [`DEFAULT_SECRET_LEN`]).
    pub fn secret_len(mut self, range: std::ops::RangeInclusive<usize>) -> Self {
        self.secret_len = range;
        self
    }

    /// The AES transport key (PSK, or derived from the password): for importers
    /// that put it into the HSM as a session object.
    pub fn transport_key(&self) -> &SecretBytes {
        &self.key
    }

    /// The decrypted MAC key and its algorithm (`None`: the file has no MACMethod).
    pub fn mac_key(&self) -> Option<(MacAlgorithm, &SecretBytes)> {
        self.mac.as_ref().map(|(a, k)| (*a, k))
    }

    /// Verifies the `ValueMAC` of an encrypted value (constant time); does not decrypt.
    pub fn verify_mac(
        &self,
        value: &EncryptedValue,
        value_mac: Option<&[u8]>,
    ) -> Result<MacStatus, CryptoError> {
        match (value_mac, &self.mac) {
            (Some(m), Some((alg, key))) => {
                verify_mac(*alg, key.expose_secret(), &value.cipher_value, m)?;
                Ok(MacStatus::Verified)
            }
            (Some(_), None) => Err(CryptoError::NoMacMethod),
            (None, _) if self.allow_unmaced => Ok(MacStatus::Unmaced),
            (None, _) => Err(CryptoError::MissingMac),
        }
    }

    /// Verifies the MAC, then decrypts (software; zeroized output).
    pub fn decrypt(
        &self,
        value: &EncryptedValue,
        value_mac: Option<&[u8]>,
    ) -> Result<(SecretBytes, MacStatus), CryptoError> {
        if value.algorithm.is_rsa() || matches!(value.algorithm, EncryptionAlgorithm::Unknown(_)) {
            return Err(unsupported_or_rsa(&value.algorithm));
        }
        let status = self.verify_mac(value, value_mac)?;
        Ok((decrypt_raw(self.key.expose_secret(), value)?, status))
    }

    /// The secret of a key, checked against the length bounds: a plain value as
    /// is, an encrypted one MAC-checked and decrypted.
    pub fn secret(
        &self,
        value: &SecretValue,
    ) -> Result<(SecretBytes, Option<MacStatus>), CryptoError> {
        let (s, st) = match value {
            SecretValue::Plain(s) => (s.clone(), None),
            SecretValue::Encrypted { value, mac } => {
                let (s, st) = self.decrypt(value, mac.as_deref())?;
                (s, Some(st))
            }
        };
        check_secret_len(&s, &self.secret_len)?;
        Ok((s, st))
    }

    /// An integer value (Counter, Time, ...): encrypted ones are big-endian.
    pub fn int(&self, value: &IntValue) -> Result<i64, CryptoError> {
        match value {
            IntValue::Plain(v) => Ok(*v),
            IntValue::Encrypted { value, mac } => {
                let (b, _) = self.decrypt(value, mac.as_deref())?;
                let b = b.expose_secret();
                if b.is_empty() || b.len() > 8 {
                    return Err(CryptoError::MalformedCipherValue(format!(
                        "integer of {} bytes",
                        b.len()
                    )));
                }
                let mut v = [0u8; 8];
                v[8 - b.len()..].copy_from_slice(b);
                Ok(i64::from_be_bytes(v))
            }
        }
    }
}

/// Checks a secret's length against `range`.
pub fn check_secret_len(
    s: &SecretBytes,
    range: &std::ops::RangeInclusive<usize>,
) -> Result<(), CryptoError> {
    if range.contains(&s.len()) {
        Ok(())
    } else {
        Err(CryptoError::SecretLength {
            got: s.len(),
            min: *range.start(),
            max: *range.end(),
        })
    }
}

/// Plain secrets without any transport key (figures 2, 3, 5, 9, 10): the length check only.
pub fn plain_secret(
    value: &SecretValue,
    range: &std::ops::RangeInclusive<usize>,
) -> Result<SecretBytes, CryptoError> {
    match value {
        SecretValue::Plain(s) => {
            check_secret_len(s, range)?;
            Ok(s.clone())
        }
        SecretValue::Encrypted { value, .. } => Err(if value.algorithm.is_rsa() {
            CryptoError::NeedsRsa(value.algorithm.uri().to_owned())
        } else {
            CryptoError::WrongKeyKind("the secret is encrypted: a transport key is needed".into())
        }),
    }
}
