//! HOTP (RFC 4226) and TOTP (RFC 6238) arithmetic around an HMAC computed elsewhere.
//!
//! The HMAC itself runs inside the HSM; this module only prepares its input
//! ([`moving_factor`], [`pad_seed`]), turns its output into a code ([`truncate`]),
//! and checks what a citizen typed ([`parse_code`], [`find_match`]) in constant time.
//! It is pure: no I/O, no clock (time is an argument), no logging.

use core::fmt;
use core::ops::RangeInclusive;

use subtle::{Choice, ConditionallySelectable, ConstantTimeEq, CtOption};
use zeroize::Zeroizing;

mod uri;

pub mod rfc_vectors;

pub use self::uri::{provisioning_uri, ProvisioningParams};

#[cfg(test)]
mod tests;

/// HMAC hash of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlgorithm {
    /// HMAC-SHA-1, the RFC 4226 default and the only one every app supports.
    Sha1,
    /// HMAC-SHA-256.
    Sha256,
    /// HMAC-SHA-512.
    Sha512,
}

impl HashAlgorithm {
    /// Length in bytes of the HMAC output (20, 32 or 64).
    #[must_use]
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// Block size in bytes of the hash; HMAC hashes keys longer than this.
    #[must_use]
    pub fn block_len(self) -> usize {
        match self {
            Self::Sha1 | Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }

    /// Name used in the `algorithm=` parameter of an `otpauth://` URI.
    #[must_use]
    pub fn uri_name(self) -> &'static str {
        match self {
            Self::Sha1 => "SHA1",
            Self::Sha256 => "SHA256",
            Self::Sha512 => "SHA512",
        }
    }
}

/// Whether the moving factor is an event counter or a time step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OtpKind {
    /// Counter-based (RFC 4226).
    Hotp,
    /// Time-based (RFC 6238).
    Totp,
}

impl OtpKind {
    /// Name used as the type in an `otpauth://` URI.
    #[must_use]
    pub fn uri_name(self) -> &'static str {
        match self {
            Self::Hotp => "hotp",
            Self::Totp => "totp",
        }
    }
}

/// Number of code digits, validated 6..=8.
///
/// RFC 4226 requires at least 6; more than 8 would not fit the 31-bit
/// truncated value with uniform-enough distribution, and no app offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digits(u8);

impl Digits {
    /// Validates a digit count.
    ///
    /// # Errors
    /// `DigitsOutOfRange` unless `n` is 6, 7 or 8.
    pub fn new(n: u32) -> Result<Digits, OtpError> {
        match u8::try_from(n) {
            Ok(d @ 6..=8) => Ok(Digits(d)),
            _ => Err(OtpError::DigitsOutOfRange),
        }
    }

    /// The digit count.
    #[must_use]
    pub fn get(self) -> u8 {
        self.0
    }

    /// `10^digits`, the modulus of the truncated value.
    #[must_use]
    pub fn modulus(self) -> u32 {
        10u32.pow(u32::from(self.0))
    }
}

/// Errors of this module.
///
/// Variants carry no data on purpose: nothing derived from a code or a seed
/// may reach a log through `Display` or `Debug`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OtpError {
    /// A digit count outside 6..=8.
    DigitsOutOfRange,
    /// A TOTP period of zero seconds.
    ZeroPeriod,
    /// A Unix time earlier than the TOTP epoch `t0`.
    TimeBeforeEpoch,
    /// The HOTP counter cannot advance any further without overflowing.
    CounterExhausted,
    /// The submitted code does not have the configured number of digits.
    CodeLength,
    /// The submitted code contains something other than ASCII digits 0-9.
    CodeNotDigits,
    /// An HMAC value shorter than the 20 bytes dynamic truncation needs.
    MacTooShort,
}

impl fmt::Display for OtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DigitsOutOfRange => "number of code digits must be 6, 7 or 8",
            Self::ZeroPeriod => "TOTP period must not be zero",
            Self::TimeBeforeEpoch => "time is earlier than the TOTP epoch",
            Self::CounterExhausted => "HOTP counter is exhausted",
            Self::CodeLength => "code has the wrong number of digits",
            Self::CodeNotDigits => "code must contain only the digits 0-9",
            Self::MacTooShort => "HMAC value is shorter than 20 bytes",
        })
    }
}

impl std::error::Error for OtpError {}

/// RFC 4226 §5.3 dynamic truncation of an HMAC value to `digits` decimal digits.
///
/// Works for 20, 32 and 64-byte MACs: the offset comes from the low nibble of the
/// last byte, as in the RFC 6238 reference code.
///
/// # Panics
/// If `mac` is shorter than 20 bytes; use [`try_truncate`] on unchecked lengths.
#[must_use]
pub fn truncate(mac: &[u8], digits: Digits) -> u32 {
    try_truncate(mac, digits).expect("HMAC value shorter than 20 bytes")
}

/// [`truncate`] that reports a too-short MAC instead of panicking.
///
/// # Errors
/// `MacTooShort` if `mac` has fewer than 20 bytes.
pub fn try_truncate(mac: &[u8], digits: Digits) -> Result<u32, OtpError> {
    Ok(dynamic_truncation(mac)? % digits.modulus())
}

/// The RFC 4226 `DT` function: the 31-bit value before the modulo
/// (the "truncated value" column of RFC 4226 Appendix D).
///
/// # Errors
/// `MacTooShort` if `mac` has fewer than 20 bytes.
pub fn dynamic_truncation(mac: &[u8]) -> Result<u32, OtpError> {
    // The offset is at most 15, so 20 bytes always hold offset..offset+4.
    let last = match mac {
        [.., last] if mac.len() >= 20 => *last,
        _ => return Err(OtpError::MacTooShort),
    };
    // Indexing by a MAC-derived offset is what RFC 4226 prescribes; it stays
    // within one 64-byte buffer, so any cache-timing signal is negligible.
    let offset = usize::from(last & 0x0f);
    let word = [
        mac[offset],
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ];
    // Mask the sign bit so signed and unsigned implementations agree.
    Ok(u32::from_be_bytes(word) & 0x7fff_ffff)
}

/// The 8-byte big-endian moving factor fed to the HMAC (counter or time step).
#[must_use]
pub fn moving_factor(counter: u64) -> [u8; 8] {
    counter.to_be_bytes()
}

/// RFC 6238 time step: `floor((unix_time - t0) / period)`.
///
/// # Errors
/// `TimeBeforeEpoch` when `unix_time < t0` (a clock before the epoch is a
/// configuration bug, not something to wrap around); `ZeroPeriod` when `period == 0`.
pub fn totp_step(unix_time: u64, t0: u64, period: u32) -> Result<u64, OtpError> {
    if period == 0 {
        return Err(OtpError::ZeroPeriod);
    }
    let elapsed = unix_time.checked_sub(t0).ok_or(OtpError::TimeBeforeEpoch)?;
    Ok(elapsed / u64::from(period))
}

/// TOTP steps to try, in order: `step-w ..= step+w`, clamped to `0..=u64::MAX`.
///
/// Clamping instead of wrapping keeps the window free of duplicates and of
/// steps from the far end of the range.
#[must_use]
pub fn totp_window(step: u64, w: u32) -> RangeInclusive<u64> {
    step.saturating_sub(u64::from(w))..=step.saturating_add(u64::from(w))
}

/// HOTP counters to try, in order: `counter ..= counter+look_ahead`.
///
/// Near `u64::MAX` the window is truncated so that every candidate `c` still has
/// a representable successor `c + 1` (the counter to store after a match, or
/// after the second code of a resync pair).
///
/// # Errors
/// `CounterExhausted` when not even `counter` qualifies, i.e. `counter == u64::MAX`:
/// the credential is used up.
pub fn hotp_window(counter: u64, look_ahead: u32) -> Result<RangeInclusive<u64>, OtpError> {
    const LAST_USABLE: u64 = u64::MAX - 1;
    if counter > LAST_USABLE {
        return Err(OtpError::CounterExhausted);
    }
    let end = counter
        .saturating_add(u64::from(look_ahead))
        .min(LAST_USABLE);
    Ok(counter..=end)
}

/// Parses a code a citizen typed: exactly `digits` ASCII digits, nothing else.
///
/// No trimming, sign, separator or Unicode digit is accepted, so exactly one
/// string maps to each code. Leading zeros are significant and kept. Branching
/// here is fine: the format of the input is not secret, only the expected code is.
///
/// # Errors
/// `CodeNotDigits` for any byte outside `0-9` (checked first, so a Unicode digit
/// is reported as such rather than as a length error); else `CodeLength`.
pub fn parse_code(code: &str, digits: Digits) -> Result<u32, OtpError> {
    // Bytes, not chars: any non-ASCII char has bytes >= 0x80 and fails this test.
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OtpError::CodeNotDigits);
    }
    if code.len() != usize::from(digits.get()) {
        return Err(OtpError::CodeLength);
    }
    // At most 8 digits, so at most 99_999_999: no overflow.
    Ok(code
        .bytes()
        .fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0')))
}

/// Index of the first candidate equal to `submitted`, in constant time.
///
/// Every candidate is compared, results are folded with `subtle` selects, and
/// nothing branches on the codes, so timing reveals neither whether nor where it
/// matched. Only the slice length (public: it is the window size) affects timing.
/// Slices longer than `u32::MAX` never match (a caller bug; failing closed).
#[must_use]
pub fn find_match(submitted: u32, candidates: &[u32]) -> CtOption<u32> {
    find_first(
        candidates.iter().map(|c| c.ct_eq(&submitted)),
        candidates.len(),
    )
}

/// First index `i` with `candidates[i] == code1` and `candidates[i+1] == code2`,
/// in constant time over the whole slice (HOTP resynchronisation with two codes).
///
/// Same timing and length rules as [`find_match`].
#[must_use]
pub fn find_consecutive(code1: u32, code2: u32, candidates: &[u32]) -> CtOption<u32> {
    let hits = candidates
        .windows(2)
        .map(|pair| pair[0].ct_eq(&code1) & pair[1].ct_eq(&code2));
    find_first(hits, candidates.len())
}

/// Folds a sequence of secret booleans into the index of the first true one.
fn find_first(hits: impl Iterator<Item = Choice>, len: usize) -> CtOption<u32> {
    let mut found = Choice::from(0);
    let mut index = 0u32;
    if u32::try_from(len).is_err() {
        return CtOption::new(index, found);
    }
    // `hits` first in the zip, so the counter never steps past the last index.
    for (hit, i) in hits.zip(0u32..) {
        // Take `i` only on the first hit; later hits leave `index` as it is.
        index.conditional_assign(&i, hit & !found);
        found |= hit;
    }
    CtOption::new(index, found)
}

/// Pads a seed with zero bytes to the digest length, for HSMs (`SoftHSM`) that
/// refuse shorter HMAC keys.
///
/// HMAC itself zero-pads short keys to the block size, so the padded key gives
/// the identical HMAC. Seeds at least as long as the digest are returned
/// unchanged; above all those longer than the block size, which HMAC hashes,
/// so padding them would change the MAC.
#[must_use]
pub fn pad_seed(seed: &[u8], alg: HashAlgorithm) -> Zeroizing<Vec<u8>> {
    // Only seeds shorter than the digest grow. The digest is never longer than the
    // block, so a seed HMAC would hash (longer than the block) is never touched.
    let len = seed.len().max(alg.digest_len());
    // Exact capacity up front: a reallocation would leave an unzeroized copy.
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    out.extend_from_slice(seed);
    out.resize(len, 0);
    out
}
