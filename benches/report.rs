//! `benches/report`: the physical limits of one machine, measured in one run —
//! HMAC-SHA1 ×3 (one TOTP window) and ECDSA P-256 signing in software (ring) and
//! through SoftHSM directly via cryptoki (no service around it), on 1 and 2
//! threads — printed as a Markdown table with the ratio SoftHSM-direct / software.
//!
//! Usage: `report [--quick] [--out DIR]` (default `target/report/`).
//! Not yet here (issue #6): the end-to-end mTLS runs, the targets table, the plot.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use hsm_benches::Bench;
use hsm_service::otp;

/// DER of the P-256 curve OID, for CKA_EC_PARAMS.
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// One measured operation: completed operations per second on `threads` threads.
struct Row {
    family: &'static str,
    op: &'static str,
    threads: usize,
    ops_per_s: f64,
}

/// Run `op` on `threads` threads for `warmup + dur`; count only after warm-up.
fn measure<S: Send + 'static>(
    threads: usize,
    warmup: Duration,
    dur: Duration,
    make: impl Fn() -> S + Send + Sync + 'static,
    op: impl Fn(&mut S, u64) + Send + Sync + 'static,
) -> f64 {
    let make = Arc::new(make);
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (make, op, barrier) = (make.clone(), op.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut state = make();
                barrier.wait();
                let start = Instant::now();
                let mut i = 0u64;
                while start.elapsed() < warmup {
                    op(&mut state, i);
                    i += 1;
                }
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < dur {
                    op(&mut state, i + n);
                    n += 1;
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    barrier.wait();
    handles
        .into_iter()
        .map(|h| h.join().expect("bench thread"))
        .sum()
}

fn main() {
    let mut quick = false;
    let mut out = PathBuf::from("target/report");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            other => {
                eprintln!(
                    "report: unknown argument {other:?} (usage: report [--quick] [--out DIR])"
                );
                std::process::exit(2);
            }
        }
    }
    let (warmup, dur) = if quick {
        (Duration::from_millis(20), Duration::from_millis(100))
    } else {
        (Duration::from_millis(500), Duration::from_secs(3))
    };
    let bench = Arc::new(Bench::new(1));
    let seed: Vec<u8> = (0u8..20).collect();
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let s = seed.clone();
        rows.push(Row {
            family: "software (ring)",
            op: "HMAC-SHA1 ×3",
            threads,
            ops_per_s: measure(
                threads,
                warmup,
                dur,
                move || ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &s),
                |k, i| {
                    for f in [i, i + 1, i + 2] {
                        std::hint::black_box(ring::hmac::sign(k, &otp::moving_factor(f)));
                    }
                },
            ),
        });
        rows.push(Row {
            family: "software (ring)",
            op: "ECDSA P-256 sign",
            threads,
            ops_per_s: measure(
                threads,
                warmup,
                dur,
                || {
                    let rng = ring::rand::SystemRandom::new();
                    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
                    let pkcs8 =
                        ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("keygen");
                    let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
                        .expect("key");
                    (key, rng)
                },
                |(key, rng), i| {
                    std::hint::black_box(key.sign(rng, &i.to_be_bytes()).expect("sign"));
                },
            ),
        });
        let (b, s) = (bench.clone(), seed.clone());
        rows.push(Row {
            family: "SoftHSM direct",
            op: "HMAC-SHA1 ×3",
            threads,
            ops_per_s: measure(
                threads,
                warmup,
                dur,
                move || {
                    let session = b.direct_session();
                    let key = session
                        .create_object(&[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(KeyType::GENERIC_SECRET),
                            Attribute::Token(false),
                            Attribute::Sensitive(true),
                            Attribute::Sign(true),
                            Attribute::Value(s.clone()),
                        ])
                        .expect("session HMAC key");
                    (session, key)
                },
                |(session, key), i| {
                    for f in [i, i + 1, i + 2] {
                        std::hint::black_box(
                            session
                                .sign(&Mechanism::Sha1Hmac, *key, &otp::moving_factor(f))
                                .expect("hmac"),
                        );
                    }
                },
            ),
        });
        let b = bench.clone();
        rows.push(Row {
            family: "SoftHSM direct",
            op: "ECDSA P-256 sign",
            threads,
            ops_per_s: measure(
                threads,
                warmup,
                dur,
                move || {
                    let session = b.direct_session();
                    let (_public, private) = session
                        .generate_key_pair(
                            &Mechanism::EccKeyPairGen,
                            &[
                                Attribute::Token(true),
                                Attribute::EcParams(P256_OID.to_vec()),
                                Attribute::Verify(true),
                            ],
                            &[
                                Attribute::Token(true),
                                Attribute::Private(true),
                                Attribute::Sensitive(true),
                                Attribute::Sign(true),
                            ],
                        )
                        .expect("token P-256 key");
                    (session, private)
                },
                |(session, key), i| {
                    let mut digest = [0u8; 32];
                    digest[..8].copy_from_slice(&i.to_be_bytes());
                    std::hint::black_box(
                        session
                            .sign(&Mechanism::Ecdsa, *key, &digest)
                            .expect("ecdsa"),
                    );
                },
            ),
        });
    }
    let md = markdown(&rows, quick);
    print!("{md}");
    std::fs::create_dir_all(&out).expect("--out directory");
    std::fs::write(out.join("report.md"), &md).expect("write report.md");
}

fn markdown(rows: &[Row], quick: bool) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = format!(
        "# Physical limits{}\n\nnproc {nproc}, CPU {cpu}, unix time {}\n\n",
        if quick {
            " (--quick: figures meaningless)"
        } else {
            ""
        },
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    md.push_str(
        "| operation | threads | software ops/s | SoftHSM-direct ops/s | direct / software |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|\n");
    for sw in rows.iter().filter(|r| r.family.starts_with("software")) {
        let direct = rows
            .iter()
            .find(|r| r.family.starts_with("SoftHSM") && r.op == sw.op && r.threads == sw.threads)
            .map_or(0.0, |r| r.ops_per_s);
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.1}% |\n",
            sw.op,
            sw.threads,
            sw.ops_per_s,
            direct,
            100.0 * direct / sw.ops_per_s
        ));
    }
    md
}
