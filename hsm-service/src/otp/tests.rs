//! Table-driven tests; ring supplies the software HMAC the HSM computes in production.

use ring::hmac;

use super::rfc_vectors::*;
use super::*;

const ALL_ALGS: [HashAlgorithm; 3] = [
    HashAlgorithm::Sha1,
    HashAlgorithm::Sha256,
    HashAlgorithm::Sha512,
];

fn ring_hmac(alg: HashAlgorithm, key: &[u8], msg: &[u8]) -> Vec<u8> {
    let ring_alg = match alg {
        HashAlgorithm::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        HashAlgorithm::Sha256 => hmac::HMAC_SHA256,
        HashAlgorithm::Sha512 => hmac::HMAC_SHA512,
    };
    hmac::sign(&hmac::Key::new(ring_alg, key), msg)
        .as_ref()
        .to_vec()
}

fn digits(n: u32) -> Digits {
    Digits::new(n).unwrap()
}

#[test]
fn rfc4226_appendix_d() {
    for v in RFC4226_VECTORS {
        let mac = ring_hmac(HashAlgorithm::Sha1, RFC4226_SEED, &moving_factor(v.counter));
        assert_eq!(mac, v.hmac, "HMAC, counter {}", v.counter);
        assert_eq!(
            dynamic_truncation(&mac),
            Ok(v.truncated),
            "DT, counter {}",
            v.counter
        );
        assert_eq!(
            truncate(&mac, RFC4226_DIGITS),
            v.code,
            "code, counter {}",
            v.counter
        );
        // Longer codes are the same DT value under a larger modulus.
        assert_eq!(truncate(&mac, digits(7)), v.truncated % 10_000_000);
        assert_eq!(truncate(&mac, digits(8)), v.truncated % 100_000_000);
    }
}

#[test]
fn rfc6238_appendix_b() {
    for v in RFC6238_VECTORS {
        let seed = rfc6238_seed(v.algorithm);
        assert_eq!(seed.len(), v.algorithm.digest_len());
        let step = totp_step(v.unix_time, RFC6238_T0, RFC6238_PERIOD).unwrap();
        assert_eq!(step, v.step, "step at {}", v.unix_time);
        let mac = ring_hmac(v.algorithm, seed, &moving_factor(step));
        assert_eq!(mac.len(), v.algorithm.digest_len());
        assert_eq!(
            truncate(&mac, RFC6238_DIGITS),
            v.code,
            "{:?} at {}",
            v.algorithm,
            v.unix_time
        );
    }
}

#[test]
fn rfc6238_covers_every_time_and_algorithm() {
    let times = [
        59,
        1111111109,
        1111111111,
        1234567890,
        2000000000,
        20000000000,
    ];
    for t in times {
        for alg in ALL_ALGS {
            let n = RFC6238_VECTORS
                .iter()
                .filter(|v| v.unix_time == t && v.algorithm == alg)
                .count();
            assert_eq!(n, 1, "{alg:?} at {t}");
        }
    }
}

#[test]
fn truncate_offset_comes_from_last_byte_of_any_length() {
    // Offset 15 on a 20-byte MAC reads bytes 15..=18; the sign bit is masked.
    let mut mac20 = [0u8; 20];
    mac20[15..19].copy_from_slice(&[0x80, 0x00, 0x00, 0x01]);
    mac20[19] = 0xff;
    assert_eq!(dynamic_truncation(&mac20), Ok(1));

    // On a 64-byte MAC the offset nibble is byte 63, not byte 19.
    let mut mac64 = [0u8; 64];
    mac64[19] = 0x0f;
    mac64[63] = 0x05;
    mac64[5..9].copy_from_slice(&[0x00, 0x12, 0xd6, 0x87]);
    assert_eq!(truncate(&mac64, digits(6)), 1_234_567 % 1_000_000);
    assert_eq!(truncate(&mac64, digits(8)), 1_234_567);
}

#[test]
fn truncate_rejects_short_mac() {
    for len in [0, 1, 19] {
        assert_eq!(
            try_truncate(&vec![0u8; len], digits(6)),
            Err(OtpError::MacTooShort)
        );
    }
    assert!(try_truncate(&[0u8; 20], digits(6)).is_ok());
}

#[test]
#[should_panic(expected = "shorter than 20 bytes")]
fn truncate_panics_on_short_mac() {
    let _ = truncate(&[0u8; 19], digits(6));
}

#[test]
fn digits_validation() {
    for (n, ok) in [
        (0, false),
        (5, false),
        (6, true),
        (7, true),
        (8, true),
        (9, false),
        (u32::MAX, false),
    ] {
        match Digits::new(n) {
            Ok(d) => {
                assert!(ok, "{n} accepted");
                assert_eq!(u32::from(d.get()), n);
                assert_eq!(d.modulus(), 10u32.pow(n));
            }
            Err(e) => {
                assert!(!ok, "{n} rejected");
                assert_eq!(e, OtpError::DigitsOutOfRange);
            }
        }
    }
}

#[test]
fn hash_algorithm_properties() {
    let table = [
        (HashAlgorithm::Sha1, 20, 64, "SHA1"),
        (HashAlgorithm::Sha256, 32, 64, "SHA256"),
        (HashAlgorithm::Sha512, 64, 128, "SHA512"),
    ];
    for (alg, digest, block, name) in table {
        assert_eq!(alg.digest_len(), digest);
        assert_eq!(alg.block_len(), block);
        assert_eq!(alg.uri_name(), name);
        // pad_seed relies on this: padding to the digest never crosses the block size.
        assert!(alg.digest_len() <= alg.block_len());
        assert_eq!(ring_hmac(alg, b"k", b"m").len(), digest);
    }
}

#[test]
fn moving_factor_is_big_endian() {
    assert_eq!(moving_factor(0), [0; 8]);
    assert_eq!(
        moving_factor(0x0102_0304_0506_0708),
        [1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(moving_factor(u64::MAX), [0xff; 8]);
}

#[test]
fn totp_step_table() {
    let table: [(u64, u64, u32, Result<u64, OtpError>); 9] = [
        (0, 0, 30, Ok(0)),
        (29, 0, 30, Ok(0)),
        (30, 0, 30, Ok(1)),
        (130, 100, 30, Ok(1)),
        (99, 100, 30, Err(OtpError::TimeBeforeEpoch)),
        (100, 100, 30, Ok(0)),
        (100, 0, 0, Err(OtpError::ZeroPeriod)),
        (u64::MAX, 0, 1, Ok(u64::MAX)),
        (u64::MAX, 0, u32::MAX, Ok(u64::MAX / u64::from(u32::MAX))),
    ];
    for (time, t0, period, expected) in table {
        assert_eq!(
            totp_step(time, t0, period),
            expected,
            "{time} {t0} {period}"
        );
    }
}

#[test]
fn totp_window_table() {
    let table = [
        (10, 2, 8..=12),
        (10, 0, 10..=10),
        (1, 3, 0..=4),
        (0, 0, 0..=0),
        (0, u32::MAX, 0..=u64::from(u32::MAX)),
        (u64::MAX, 1, u64::MAX - 1..=u64::MAX),
        (u64::MAX - 1, 5, u64::MAX - 6..=u64::MAX),
    ];
    for (step, w, expected) in table {
        let window = totp_window(step, w);
        assert_eq!(window, expected, "step {step} w {w}");
        assert!(window.contains(&step));
    }
    // Saturation must not repeat steps: strictly increasing, so no duplicates.
    let steps: Vec<u64> = totp_window(1, 3).collect();
    assert_eq!(steps, [0, 1, 2, 3, 4]);
}

#[test]
fn hotp_window_table() {
    let max = u64::MAX;
    let table = [
        (0, 0, Ok(0..=0)),
        (5, 3, Ok(5..=8)),
        (max - 10, 3, Ok(max - 10..=max - 7)),
        // Truncated so that `c + 1` of every candidate fits in a u64.
        (max - 3, 10, Ok(max - 3..=max - 1)),
        (max - 1, 0, Ok(max - 1..=max - 1)),
        (max - 1, u32::MAX, Ok(max - 1..=max - 1)),
        (max, 0, Err(OtpError::CounterExhausted)),
        (max, 5, Err(OtpError::CounterExhausted)),
    ];
    for (counter, look_ahead, expected) in table {
        let window = hotp_window(counter, look_ahead);
        assert_eq!(
            window, expected,
            "counter {counter} look-ahead {look_ahead}"
        );
        if let Ok(w) = window {
            assert!(w.end().checked_add(1).is_some());
        }
    }
}

#[test]
fn parse_code_accepts() {
    let table = [
        ("000000", 6, 0),
        ("012345", 6, 12_345),
        ("755224", 6, 755_224),
        ("0000001", 7, 1),
        ("07081804", 8, 7_081_804),
        ("99999999", 8, 99_999_999),
    ];
    for (code, n, value) in table {
        assert_eq!(parse_code(code, digits(n)), Ok(value), "{code}");
    }
}

#[test]
fn parse_code_rejects() {
    use OtpError::{CodeLength, CodeNotDigits};
    let table = [
        ("", 6, CodeLength),
        ("12345", 6, CodeLength),
        ("1234567", 6, CodeLength),
        ("123456", 8, CodeLength),
        ("12a456", 6, CodeNotDigits),
        ("+12345", 6, CodeNotDigits),
        ("+123456", 6, CodeNotDigits),
        ("-12345", 6, CodeNotDigits),
        (" 123456", 6, CodeNotDigits),
        ("123456 ", 6, CodeNotDigits),
        ("123 456", 6, CodeNotDigits),
        ("123456\n", 6, CodeNotDigits),
        ("\t123456", 6, CodeNotDigits),
        ("12345\0", 6, CodeNotDigits),
        ("0x1234", 6, CodeNotDigits),
        ("1e5000", 6, CodeNotDigits),
        // Fullwidth, Arabic-Indic and Devanagari digits are digits to Unicode, not to us.
        ("１２３４５６", 6, CodeNotDigits),
        ("١٢٣٤٥٦", 6, CodeNotDigits),
        ("१२३४५६", 6, CodeNotDigits),
        ("12345٦", 6, CodeNotDigits),
    ];
    for (code, n, expected) in table {
        let err = parse_code(code, digits(n)).unwrap_err();
        assert_eq!(err, expected, "{code:?}");
        // The error must not echo the code.
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(code.is_empty() || !shown.contains(code), "{shown}");
        }
    }
}

#[test]
fn find_match_table() {
    let table: [(u32, &[u32], Option<u32>); 8] = [
        (5, &[5, 6, 7], Some(0)),
        (7, &[5, 6, 7], Some(2)),
        (6, &[5, 6, 7], Some(1)),
        (8, &[5, 6, 7], None),
        (5, &[1, 5, 5, 5], Some(1)),
        (0, &[0, 0], Some(0)),
        (0, &[], None),
        (u32::MAX, &[u32::MAX - 1, u32::MAX], Some(1)),
    ];
    for (submitted, candidates, expected) in table {
        let found: Option<u32> = find_match(submitted, candidates).into();
        assert_eq!(found, expected, "{submitted} in {candidates:?}");
    }
}

#[test]
fn find_consecutive_table() {
    let table: [(u32, u32, &[u32], Option<u32>); 10] = [
        (1, 2, &[1, 2, 3], Some(0)),
        (2, 3, &[1, 2, 3], Some(1)),
        (1, 3, &[1, 2, 3], None),
        (2, 1, &[1, 2, 3], None),
        (2, 3, &[2, 3, 9, 2, 3], Some(0)),
        (2, 3, &[9, 2, 9, 2, 3, 2, 3], Some(3)),
        (5, 5, &[5, 5, 5], Some(0)),
        // No wrap-around from last to first.
        (3, 1, &[1, 2, 3], None),
        (1, 1, &[1], None),
        (1, 2, &[], None),
    ];
    for (code1, code2, candidates, expected) in table {
        let found: Option<u32> = find_consecutive(code1, code2, candidates).into();
        assert_eq!(found, expected, "({code1}, {code2}) in {candidates:?}");
    }
}

#[test]
fn verify_flow_with_window() {
    // End to end as the service does it: window -> HMAC -> truncate -> search.
    let d = RFC4226_DIGITS;
    let window = hotp_window(0, 9).unwrap();
    let codes: Vec<u32> = window
        .clone()
        .map(|c| {
            truncate(
                &ring_hmac(HashAlgorithm::Sha1, RFC4226_SEED, &moving_factor(c)),
                d,
            )
        })
        .collect();
    let submitted = parse_code("162583", d).unwrap();
    let idx: Option<u32> = find_match(submitted, &codes).into();
    assert_eq!(idx.map(|i| window.start() + u64::from(i)), Some(7));
    let resync: Option<u32> = find_consecutive(399_871, 520_489, &codes).into();
    assert_eq!(resync, Some(8));
}

#[test]
fn pad_seed_keeps_hmac() {
    let short = b"0123456789";
    for alg in ALL_ALGS {
        let padded = pad_seed(short, alg);
        assert_eq!(padded.len(), alg.digest_len());
        assert_eq!(&padded[..short.len()], short);
        assert!(padded[short.len()..].iter().all(|&b| b == 0));
        for counter in [0, 1, 1 << 40] {
            let msg = moving_factor(counter);
            assert_eq!(
                ring_hmac(alg, &padded, &msg),
                ring_hmac(alg, short, &msg),
                "{alg:?}"
            );
        }
    }
}

#[test]
fn pad_seed_leaves_long_seeds() {
    // (seed length, algorithm): at or above the digest length nothing changes,
    // and above the block size padding would even change the HMAC.
    let table = [
        (100, HashAlgorithm::Sha1),
        (65, HashAlgorithm::Sha1),
        (64, HashAlgorithm::Sha1),
        (40, HashAlgorithm::Sha1),
        (20, HashAlgorithm::Sha1),
        (32, HashAlgorithm::Sha256),
        (100, HashAlgorithm::Sha256),
        (64, HashAlgorithm::Sha512),
        (100, HashAlgorithm::Sha512),
        (200, HashAlgorithm::Sha512),
    ];
    for (len, alg) in table {
        let seed: Vec<u8> = (0..len).map(|i: u8| i ^ 0x5a).collect();
        assert_eq!(*pad_seed(&seed, alg), seed, "{len} bytes {alg:?}");
    }
    // Why long keys must not be padded: HMAC hashes them, so padding changes the MAC.
    let long = [0x5au8; 100];
    let mut zero_padded = long.to_vec();
    zero_padded.resize(128, 0);
    assert_ne!(
        ring_hmac(HashAlgorithm::Sha1, &long, b"m"),
        ring_hmac(HashAlgorithm::Sha1, &zero_padded, b"m")
    );
}

#[test]
fn pad_seed_empty() {
    assert_eq!(*pad_seed(&[], HashAlgorithm::Sha256), [0u8; 32]);
}

fn params<'a>(kind: OtpKind, issuer: &'a str, account_name: &'a str) -> ProvisioningParams<'a> {
    ProvisioningParams {
        kind,
        algorithm: HashAlgorithm::Sha1,
        digits: digits(6),
        period: 30,
        counter: 0,
        issuer,
        account_name,
    }
}

#[test]
fn provisioning_uri_totp() {
    let p = params(OtpKind::Totp, "Example", "alice");
    assert_eq!(
        provisioning_uri(RFC4226_SEED, &p).as_str(),
        "otpauth://totp/Example:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
         &issuer=Example&algorithm=SHA1&digits=6&period=30"
    );
}

#[test]
fn provisioning_uri_hotp() {
    let p = ProvisioningParams {
        algorithm: HashAlgorithm::Sha256,
        digits: digits(8),
        counter: 42,
        ..params(OtpKind::Hotp, "Example", "alice")
    };
    assert_eq!(
        provisioning_uri(RFC4226_SEED, &p).as_str(),
        "otpauth://hotp/Example:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
         &issuer=Example&algorithm=SHA256&digits=8&counter=42"
    );
}

#[test]
fn provisioning_uri_percent_encodes_label_and_issuer() {
    let table = [
        (
            "Example Gov",
            "jan.novak@example.org",
            "otpauth://totp/Example%20Gov:jan.novak%40example.org?secret=AE\
             &issuer=Example%20Gov&algorithm=SHA1&digits=6&period=30",
        ),
        (
            "A:B",
            "x:y z",
            "otpauth://totp/A%3AB:x%3Ay%20z?secret=AE\
             &issuer=A%3AB&algorithm=SHA1&digits=6&period=30",
        ),
        (
            "Česká & co/?#",
            "a-b_c.d~e",
            "otpauth://totp/%C4%8Cesk%C3%A1%20%26%20co%2F%3F%23:a-b_c.d~e?secret=AE\
             &issuer=%C4%8Cesk%C3%A1%20%26%20co%2F%3F%23&algorithm=SHA1&digits=6&period=30",
        ),
        // No issuer: the label is the account alone, and no issuer parameter.
        (
            "",
            "citizen 1",
            "otpauth://totp/citizen%201?secret=AE&algorithm=SHA1&digits=6&period=30",
        ),
    ];
    for (issuer, account, expected) in table {
        let uri = provisioning_uri(&[0x01], &params(OtpKind::Totp, issuer, account));
        assert_eq!(uri.as_str(), expected);
    }
}

#[test]
fn provisioning_uri_worst_case_fits_buffer() {
    // Exercises the debug_assert that the pre-sized buffer never reallocates.
    let issuer = "\u{10FFFF}".repeat(50);
    let p = ProvisioningParams {
        algorithm: HashAlgorithm::Sha512,
        digits: digits(8),
        period: u32::MAX,
        counter: u64::MAX,
        ..params(OtpKind::Hotp, &issuer, &issuer)
    };
    for kind in [OtpKind::Hotp, OtpKind::Totp] {
        let uri = provisioning_uri(&[0xff; 64], &ProvisioningParams { kind, ..p });
        assert!(
            uri.ends_with("&counter=18446744073709551615") || uri.ends_with("&period=4294967295")
        );
    }
}

#[test]
fn error_display_is_fixed_text() {
    let all = [
        OtpError::DigitsOutOfRange,
        OtpError::ZeroPeriod,
        OtpError::TimeBeforeEpoch,
        OtpError::CounterExhausted,
        OtpError::CodeLength,
        OtpError::CodeNotDigits,
        OtpError::MacTooShort,
    ];
    for e in all {
        assert!(!e.to_string().is_empty());
        let _: &dyn std::error::Error = &e;
    }
}
