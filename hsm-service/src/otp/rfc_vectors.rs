//! Published test vectors of RFC 4226 (Appendix D) and RFC 6238 (Appendix B).
//!
//! Always compiled (they are only constants) so the service's integration tests
//! can run the same vectors against the real HSM.

use super::HashAlgorithm::{Sha1, Sha256, Sha512};
use super::{Digits, HashAlgorithm};

/// One row of RFC 4226 Appendix D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotpVector {
    /// Counter (moving factor).
    pub counter: u64,
    /// HMAC-SHA-1 of the 8-byte counter under [`RFC4226_SEED`].
    pub hmac: [u8; 20],
    /// 31-bit value after dynamic truncation, before the modulo.
    pub truncated: u32,
    /// Six-digit HOTP code.
    pub code: u32,
}

/// One row of RFC 6238 Appendix B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TotpVector {
    /// Unix time in seconds.
    pub unix_time: u64,
    /// Time step `T` for `t0 = 0`, `period = 30`.
    pub step: u64,
    /// HMAC hash; the seed is [`rfc6238_seed`] of it.
    pub algorithm: HashAlgorithm,
    /// Eight-digit TOTP code.
    pub code: u32,
}

/// RFC 4226 secret: ASCII "12345678901234567890".
pub const RFC4226_SEED: &[u8] = b"12345678901234567890";
/// RFC 4226 codes have six digits.
pub const RFC4226_DIGITS: Digits = Digits(6);

/// RFC 6238 SHA-1 seed (20 bytes).
pub const RFC6238_SEED_SHA1: &[u8] = b"12345678901234567890";
/// RFC 6238 SHA-256 seed (32 bytes): the ASCII digits repeated to length.
pub const RFC6238_SEED_SHA256: &[u8] = b"12345678901234567890123456789012";
/// RFC 6238 SHA-512 seed (64 bytes): the ASCII digits repeated to length.
pub const RFC6238_SEED_SHA512: &[u8] =
    b"1234567890123456789012345678901234567890123456789012345678901234";
/// RFC 6238 epoch `T0`.
pub const RFC6238_T0: u64 = 0;
/// RFC 6238 period `X` in seconds.
pub const RFC6238_PERIOD: u32 = 30;
/// RFC 6238 codes have eight digits.
pub const RFC6238_DIGITS: Digits = Digits(8);

/// The RFC 6238 seed used with `alg`.
#[must_use]
pub const fn rfc6238_seed(alg: HashAlgorithm) -> &'static [u8] {
    match alg {
        HashAlgorithm::Sha1 => RFC6238_SEED_SHA1,
        HashAlgorithm::Sha256 => RFC6238_SEED_SHA256,
        HashAlgorithm::Sha512 => RFC6238_SEED_SHA512,
    }
}

/// Decodes lowercase hex at compile time, so the table reads like the RFC.
const fn hex<const N: usize>(s: &[u8]) -> [u8; N] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lowercase hex digit"),
        }
    }
    assert!(s.len() == 2 * N, "hex string has the wrong length");
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = nibble(s[2 * i]) << 4 | nibble(s[2 * i + 1]);
        i += 1;
    }
    out
}

const fn hv(counter: u64, hmac: &[u8], truncated: u32, code: u32) -> HotpVector {
    HotpVector {
        counter,
        hmac: hex(hmac),
        truncated,
        code,
    }
}

/// RFC 4226 Appendix D: counters 0..=9.
pub const RFC4226_VECTORS: [HotpVector; 10] = [
    hv(
        0,
        b"cc93cf18508d94934c64b65d8ba7667fb7cde4b0",
        0x4c93cf18,
        755224,
    ),
    hv(
        1,
        b"75a48a19d4cbe100644e8ac1397eea747a2d33ab",
        0x41397eea,
        287082,
    ),
    hv(
        2,
        b"0bacb7fa082fef30782211938bc1c5e70416ff44",
        0x082fef30,
        359152,
    ),
    hv(
        3,
        b"66c28227d03a2d5529262ff016a1e6ef76557ece",
        0x66ef7655,
        969429,
    ),
    hv(
        4,
        b"a904c900a64b35909874b33e61c5938a8e15ed1c",
        0x61c5938a,
        338314,
    ),
    hv(
        5,
        b"a37e783d7b7233c083d4f62926c7a25f238d0316",
        0x33c083d4,
        254676,
    ),
    hv(
        6,
        b"bc9cd28561042c83f219324d3c607256c03272ae",
        0x7256c032,
        287922,
    ),
    hv(
        7,
        b"a4fb960c0bc06e1eabb804e5b397cdc4b45596fa",
        0x04e5b397,
        162583,
    ),
    hv(
        8,
        b"1b3c89f65e6c9e883012052823443f048b4332db",
        0x2823443f,
        399871,
    ),
    hv(
        9,
        b"1637409809a679dc698207310c8c7fc07290d9e5",
        0x2679dc69,
        520489,
    ),
];

const fn tv(unix_time: u64, step: u64, algorithm: HashAlgorithm, code: u32) -> TotpVector {
    TotpVector {
        unix_time,
        step,
        algorithm,
        code,
    }
}

/// RFC 6238 Appendix B: six times, each with SHA-1, SHA-256 and SHA-512.
pub const RFC6238_VECTORS: [TotpVector; 18] = [
    tv(59, 0x1, Sha1, 94287082),
    tv(59, 0x1, Sha256, 46119246),
    tv(59, 0x1, Sha512, 90693936),
    tv(1111111109, 0x23523ec, Sha1, 7081804),
    tv(1111111109, 0x23523ec, Sha256, 68084774),
    tv(1111111109, 0x23523ec, Sha512, 25091201),
    tv(1111111111, 0x23523ed, Sha1, 14050471),
    tv(1111111111, 0x23523ed, Sha256, 67062674),
    tv(1111111111, 0x23523ed, Sha512, 99943326),
    tv(1234567890, 0x273ef07, Sha1, 89005924),
    tv(1234567890, 0x273ef07, Sha256, 91819424),
    tv(1234567890, 0x273ef07, Sha512, 93441116),
    tv(2000000000, 0x3f940aa, Sha1, 69279037),
    tv(2000000000, 0x3f940aa, Sha256, 90698825),
    tv(2000000000, 0x3f940aa, Sha512, 38618901),
    tv(20000000000, 0x27bc86aa, Sha1, 65353130),
    tv(20000000000, 0x27bc86aa, Sha256, 77737706),
    tv(20000000000, 0x27bc86aa, Sha512, 47863826),
];
