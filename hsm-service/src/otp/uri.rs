//! `otpauth://` provisioning URIs in the Google Authenticator Key-Uri-Format.

use core::fmt::Write;

use data_encoding::BASE32_NOPAD;
use zeroize::Zeroizing;

use super::{Digits, HashAlgorithm, OtpKind};

/// Everything in a provisioning URI except the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProvisioningParams<'a> {
    /// HOTP or TOTP; selects whether `counter` or `period` is written.
    pub kind: OtpKind,
    /// HMAC hash.
    pub algorithm: HashAlgorithm,
    /// Code length.
    pub digits: Digits,
    /// TOTP period in seconds (ignored for HOTP); written as given.
    pub period: u32,
    /// Initial HOTP counter (ignored for TOTP).
    pub counter: u64,
    /// Service name shown in the app; empty for none.
    pub issuer: &'a str,
    /// Account the credential belongs to.
    pub account_name: &'a str,
}

/// Longest possible fixed part: scheme, type, separators, parameter names,
/// `SHA512`, one digit and a 20-digit counter.
const FIXED_MAX: usize = 128;

/// Builds the `otpauth://` URI an authenticator app scans.
///
/// Label is `Issuer:account` (just `account` without issuer), both parts
/// percent-encoded so a `:` inside them cannot split the label. The secret is
/// unpadded Base32. The result holds the seed, hence `Zeroizing`; it is built
/// in one pre-sized buffer so no reallocation leaves a stray copy behind.
#[must_use]
pub fn provisioning_uri(seed: &[u8], p: &ProvisioningParams) -> Zeroizing<String> {
    let mut secret = Zeroizing::new(vec![0u8; BASE32_NOPAD.encode_len(seed.len())]);
    BASE32_NOPAD.encode_mut(seed, &mut secret);

    // Worst case each label byte becomes `%XX`; the issuer appears twice.
    let capacity = 3 * (2 * p.issuer.len() + p.account_name.len()) + secret.len() + FIXED_MAX;
    let mut uri = Zeroizing::new(String::with_capacity(capacity));
    let allocated = uri.capacity();

    uri.push_str("otpauth://");
    uri.push_str(p.kind.uri_name());
    uri.push('/');
    if !p.issuer.is_empty() {
        percent_encode(&mut uri, p.issuer);
        uri.push(':');
    }
    percent_encode(&mut uri, p.account_name);
    uri.push_str("?secret=");
    // Base32 output is ASCII, so byte-to-char is exact.
    uri.extend(secret.iter().map(|&b| char::from(b)));
    if !p.issuer.is_empty() {
        uri.push_str("&issuer=");
        percent_encode(&mut uri, p.issuer);
    }
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = write!(
        uri,
        "&algorithm={}&digits={}",
        p.algorithm.uri_name(),
        p.digits.get()
    );
    let _ = match p.kind {
        OtpKind::Totp => write!(uri, "&period={}", p.period),
        OtpKind::Hotp => write!(uri, "&counter={}", p.counter),
    };

    debug_assert_eq!(uri.capacity(), allocated, "URI buffer was reallocated");
    uri
}

/// Appends `s` percent-encoded per RFC 3986: unreserved characters kept,
/// every other UTF-8 byte as `%XX` (so a space is `%20`, never `+`).
fn percent_encode(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}
