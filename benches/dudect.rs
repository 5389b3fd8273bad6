//! dudect-style timing tests (Reparaz, Balasch, Verbauwhede 2017, "Dude, is my code
//! constant time?") of code verification: two classes of input, measurements taken in a
//! random interleaving of the classes, and Welch's t-test on the two timing
//! distributions, raw and cropped at several percentiles (dudect's pre-processing
//! against the long tail); the largest |t| is reported. |t| < 4.5 is the usual bar for
//! "no leak detected at this many measurements".
//!
//! Pairs of classes:
//! - "wrong in the first digit" vs "wrong in the last digit" (a comparison that stops at
//!   the first differing digit would tell them apart);
//! - "right at the window's edge" vs "right in the centre" (a search that stops at the
//!   first match would tell them apart).
//!
//! Each pair is measured on two subjects:
//! - `compare`: the code comparison alone, `otp::find_match` over the candidates of an
//!   HOTP window (the default look-ahead, 11 codes), 64 calls per measurement (one call
//!   is below the clock's resolution);
//! - `verify`: the whole VerifyCode decision path in process, as
//!   `credentials::decide_verify` runs it, with the HSM replaced by a constant-time
//!   software HMAC (ring): parse the code, the lock gate, the TOTP window (default ±1
//!   step), the HMAC of every candidate, truncation, the constant-time match, and the
//!   policy's decision on a copy of the record. The store read and commit, the same for
//!   both classes of a pair, are left out.
//!
//! Not a CI gate: `cargo bench -p hsm-benches --bench dudect [-- MEASUREMENTS]`
//! (default 1,000,000 per class). Results: benches/README.md.

use std::hint::black_box;
use std::time::Instant;

use hsm_service::config::CredentialsConfig;
use hsm_service::credentials::policy;
use hsm_service::otp::{self, Digits, HashAlgorithm, OtpKind};
use hsm_service::store::CredentialRecord;

/// Welford's running mean and variance.
#[derive(Default, Clone, Copy)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn push(&mut self, x: f64) {
        self.n += 1.0;
        let d = x - self.mean;
        self.mean += d / self.n;
        self.m2 += d * (x - self.mean);
    }
    fn var(&self) -> f64 {
        if self.n < 2.0 {
            0.0
        } else {
            self.m2 / (self.n - 1.0)
        }
    }
}

/// Welch's t statistic of two samples.
fn welch(a: &Moments, b: &Moments) -> f64 {
    let se = (a.var() / a.n + b.var() / b.n).sqrt();
    if se == 0.0 {
        0.0
    } else {
        (a.mean - b.mean) / se
    }
}

/// xorshift64*: the interleaving of the classes and the random parts of the inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The crop percentiles (dudect crops at a range of thresholds and tests each).
const CROPS: [f64; 5] = [0.50, 0.75, 0.90, 0.95, 0.99];

struct Report {
    name: String,
    per_class: usize,
    raw_t: f64,
    max_t: f64,
    means_ns: [f64; 2],
}

/// Measure `op(class, input)` `per_class` times per class in a random interleaving, the
/// inputs prepared beforehand by `prepare(class, rng)` (outside the timed region).
fn measure<I>(
    name: &str,
    per_class: usize,
    rng: &mut Rng,
    mut prepare: impl FnMut(usize, &mut Rng) -> I,
    mut op: impl FnMut(&I),
) -> Report {
    // Warm-up: caches, branch predictors, frequency.
    for i in 0..20_000 {
        let input = prepare(i % 2, rng);
        op(&input);
    }
    let total = 2 * per_class;
    let mut classes = Vec::with_capacity(total);
    let mut counts = [0usize; 2];
    while classes.len() < total {
        let c = (rng.next() & 1) as usize;
        if counts[c] < per_class {
            counts[c] += 1;
            classes.push(c as u8);
        }
    }
    let mut times: [Vec<f64>; 2] = [Vec::with_capacity(per_class), Vec::with_capacity(per_class)];
    // In chunks: the prepared inputs of a chunk fit in memory, and the interleaving
    // stays random within and across chunks.
    for chunk in classes.chunks(10_000) {
        let inputs: Vec<I> = chunk
            .iter()
            .map(|c| prepare(usize::from(*c), rng))
            .collect();
        for (c, input) in chunk.iter().zip(&inputs) {
            let start = Instant::now();
            op(input);
            let ns = start.elapsed().as_nanos() as f64;
            times[usize::from(*c)].push(ns);
        }
    }
    let moments = |v: &[f64], limit: f64| {
        let mut m = Moments::default();
        for &x in v.iter().filter(|x| **x <= limit) {
            m.push(x);
        }
        m
    };
    let raw = [moments(&times[0], f64::MAX), moments(&times[1], f64::MAX)];
    let raw_t = welch(&raw[0], &raw[1]);
    let mut all: Vec<f64> = times[0].iter().chain(&times[1]).copied().collect();
    all.sort_by(f64::total_cmp);
    let mut max_t = raw_t.abs();
    for p in CROPS {
        let limit = all[((all.len() - 1) as f64 * p) as usize];
        let t = welch(&moments(&times[0], limit), &moments(&times[1], limit));
        max_t = max_t.max(t.abs());
    }
    Report {
        name: name.to_owned(),
        per_class,
        raw_t,
        max_t,
        means_ns: [raw[0].mean, raw[1].mean],
    }
}

const SEED: &[u8] = b"12345678901234567890";

fn hmac_key(alg: HashAlgorithm) -> ring::hmac::Key {
    let a = match alg {
        HashAlgorithm::Sha1 => ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        HashAlgorithm::Sha256 => ring::hmac::HMAC_SHA256,
        HashAlgorithm::Sha512 => ring::hmac::HMAC_SHA512,
    };
    ring::hmac::Key::new(a, SEED)
}

/// The software stand-in for `Hsm::seed_macs`: the MAC of every moving factor, in
/// order, concatenated (ring's HMAC does not branch on key or data).
fn software_macs(key: &ring::hmac::Key, window: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * 4);
    for c in window {
        out.extend_from_slice(ring::hmac::sign(key, &otp::moving_factor(c)).as_ref());
    }
    out
}

/// `code` with its digit `position` (0: the first) replaced by another digit.
fn wrong_at(code: u32, digits: u32, position: u32, rng: &mut Rng) -> u32 {
    let place = 10u32.pow(digits - 1 - position);
    let old = (code / place) % 10;
    let new = (old + 1 + (rng.next() % 9) as u32) % 10;
    code - old * place + new * place
}

fn compare_subject(per_class: usize, rng: &mut Rng) -> Vec<Report> {
    let digits = Digits::new(6).expect("digits");
    let look_ahead = CredentialsConfig::default().hotp_look_ahead;
    let window = otp::hotp_window(1000, look_ahead).expect("window");
    let key = hmac_key(HashAlgorithm::Sha1);
    let candidates: Vec<u32> = software_macs(&key, window)
        .chunks_exact(20)
        .map(|m| otp::truncate(m, digits))
        .collect();
    let n = candidates.len();
    const REPS: usize = 64;
    let run = |submitted: &u32| {
        for _ in 0..REPS {
            black_box(otp::find_match(
                black_box(*submitted),
                black_box(&candidates),
            ));
        }
    };
    // A wrong code: one digit of a random candidate changed, and no other candidate.
    let wrong = |position: u32, rng: &mut Rng| loop {
        let base = candidates[(rng.next() % n as u64) as usize];
        let w = wrong_at(base, 6, position, rng);
        if !candidates.contains(&w) {
            break w;
        }
    };
    let digits_report = measure(
        "compare: wrong in the first digit vs wrong in the last digit",
        per_class,
        rng,
        |class, rng| wrong(if class == 0 { 0 } else { 5 }, rng),
        run,
    );
    // A right code: the first candidate (the window's edge) or the middle one, each a
    // code no other candidate shares.
    let (edge, centre) = (candidates[0], candidates[n / 2]);
    assert!(
        candidates
            .iter()
            .filter(|c| **c == edge || **c == centre)
            .count()
            == 2
    );
    let place_report = measure(
        "compare: right at the window's edge vs right in the centre",
        per_class,
        rng,
        |class, _| if class == 0 { edge } else { centre },
        run,
    );
    vec![digits_report, place_report]
}

fn verify_subject(per_class: usize, rng: &mut Rng) -> Vec<Report> {
    let policy = CredentialsConfig::default();
    let digits = Digits::new(6).expect("digits");
    let alg = HashAlgorithm::Sha1;
    let key = hmac_key(alg);
    let now = 1_800_000_000u64;
    let record = CredentialRecord {
        tenant: "login-service".into(),
        id: "timing".into(),
        subject: Some("citizen".into()),
        kind: OtpKind::Totp,
        algorithm: alg,
        digits: 6,
        period_seconds: 30,
        t0: 0,
        wrapped_seed: vec![0; 40],
        master_key_version: 1,
        seed_binding: None,
        issuer: String::new(),
        account_name: String::new(),
        last_accepted: None,
        next_counter: 0,
        drift_steps: 0,
        failures: 0,
        failure_times: Vec::new(),
        locked_until: 0,
        hard_locked: false,
        disabled: false,
        created_at: now - 1000,
        updated_at: now - 1000,
    };
    let window = policy::verify_window(&record, now, &policy).expect("window");
    let codes: Vec<u32> = software_macs(&key, window.clone())
        .chunks_exact(alg.digest_len())
        .map(|m| otp::truncate(m, digits))
        .collect();
    let n = codes.len();
    // The whole decision path of one VerifyCode, on `code` as the caller sent it.
    let verify = |code: &String| {
        let rec = black_box(&record);
        let submitted = otp::parse_code(code, digits).expect("six digits");
        assert!(policy::gate(rec, now, &policy).is_none());
        let window = policy::verify_window(rec, now, &policy).expect("window");
        let start = *window.start();
        let macs = software_macs(&key, window);
        let candidates: Vec<u32> = macs
            .chunks_exact(alg.digest_len())
            .map(|m| otp::truncate(m, digits))
            .collect();
        let matched: Option<u32> = otp::find_match(submitted, &candidates).into();
        let matched = matched.map(|i| start + u64::from(i));
        let mut copy = rec.clone();
        black_box(policy::apply_verify(&mut copy, matched, now, &policy));
    };
    let six = |c: u32| format!("{c:06}");
    let wrong = |position: u32, rng: &mut Rng| loop {
        let base = codes[(rng.next() % n as u64) as usize];
        let w = wrong_at(base, 6, position, rng);
        if !codes.contains(&w) {
            break six(w);
        }
    };
    let digits_report = measure(
        "verify: wrong in the first digit vs wrong in the last digit",
        per_class,
        rng,
        |class, rng| wrong(if class == 0 { 0 } else { 5 }, rng),
        verify,
    );
    let (edge, centre) = (codes[n - 1], codes[n / 2]);
    assert!(
        codes
            .iter()
            .filter(|c| **c == edge || **c == centre)
            .count()
            == 2
    );
    let place_report = measure(
        "verify: right at the window's edge vs right in the centre",
        per_class,
        rng,
        |class, _| six(if class == 0 { edge } else { centre }),
        verify,
    );
    vec![digits_report, place_report]
}

fn main() {
    // `cargo bench` passes `--bench`; a number is the measurements per class. Without
    // `--bench` (`cargo test --all-targets` runs bench targets too) a smoke run of
    // 2,000 per class keeps the target building and working without a CI-length wait.
    let bench = std::env::args().any(|a| a == "--bench");
    let per_class = std::env::args()
        .skip(1)
        .find_map(|a| a.replace('_', "").parse::<usize>().ok())
        .unwrap_or(if bench { 1_000_000 } else { 2_000 });
    let mut rng = Rng(0x853c_49e6_748f_ea9b);
    let started = Instant::now();
    let mut reports = compare_subject(per_class, &mut rng);
    reports.extend(verify_subject(per_class, &mut rng));
    println!("dudect: {per_class} measurements per class, Welch's t (raw; max |t| over raw and crops at {CROPS:?})");
    println!("| pair | per class | mean ns (class 0 / 1) | t raw | max abs t | < 4.5 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &reports {
        println!(
            "| {} | {} | {:.1} / {:.1} | {:.2} | {:.2} | {} |",
            r.name,
            r.per_class,
            r.means_ns[0],
            r.means_ns[1],
            r.raw_t,
            r.max_t,
            if r.max_t < 4.5 { "yes" } else { "NO" }
        );
    }
    println!("({:.0} s)", started.elapsed().as_secs_f64());
}
