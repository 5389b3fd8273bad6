//! The fuzz targets in every test run: each over its seed corpus and its regression
//! inputs (each crash the fuzzer found, kept as a file), then a few seconds of simple
//! mutations of those inputs, so that the targets keep building and a fixed crash stays
//! fixed. The coverage-guided fuzzing itself is scripts/fuzz.sh (cargo-fuzz).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hsm_fuzz::{requests::METHODS, run, seeds, TARGETS};

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target)
}

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(dir(kind, target)) else {
            continue;
        };
        for e in entries {
            let path = e.expect("dir entry").path();
            if path.is_file() {
                let bytes = std::fs::read(&path).expect("read input");
                all.push((path, bytes));
            }
        }
    }
    all.sort();
    all
}

/// xorshift64*: the mutations are reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\xc3\x28",
    b"\n",
    b"=",
    b"\"",
    b"[[",
    b"]]",
    b"{}",
    b"-1",
    b"4294967296",
    b"18446744073709551616",
];

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = rng.below(out.len() - i + 1);
                out.drain(i..i + n);
            }
            3 => {
                let i = rng.below(out.len() + 1);
                let word = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(i..i, word.iter().copied());
            }
            4 if !other.is_empty() => {
                let i = rng.below(out.len() + 1);
                let j = rng.below(other.len());
                let n = rng.below(other.len() - j + 1);
                out.splice(i..i, other[j..j + n].iter().copied());
            }
            _ => {
                let i = rng.below(out.len() + 1);
                out.truncate(i);
            }
        }
    }
    out
}

/// How long each target is mutated for (`HSM_FUZZ_SMOKE_SECS`, default 2).
fn smoke_time() -> Duration {
    let secs = std::env::var("HSM_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

#[test]
fn every_target_runs_its_corpus_its_regressions_and_mutations_of_them() {
    for target in TARGETS {
        let inputs = inputs(target);
        assert!(
            inputs
                .iter()
                .any(|(p, _)| p.starts_with(dir("corpus", target))),
            "fuzz/corpus/{target} has no seeds (write them: --ignored write_seeds)"
        );
        for (path, bytes) in &inputs {
            eprintln!("{target}: {}", path.display());
            run(target, bytes);
        }
        for (_, name, bytes) in seeds::all().into_iter().filter(|s| s.0 == *target) {
            eprintln!("{target}: current seed {name}");
            run(target, &bytes);
        }
        let seed = 0x9e37_79b9_7f4a_7c15 ^ target.len() as u64;
        let mut rng = Rng(seed);
        let (start, mut runs) = (Instant::now(), 0u64);
        while start.elapsed() < smoke_time() {
            let a = &inputs[rng.below(inputs.len())].1;
            let b = &inputs[rng.below(inputs.len())].1;
            let input = mutate(&mut rng, a, b);
            if let Err(panic) = std::panic::catch_unwind(|| run(target, &input)) {
                let path = std::env::temp_dir().join(format!("hsm-fuzz-{target}-{runs}"));
                std::fs::write(&path, &input).expect("keep the input");
                eprintln!(
                    "{target}: mutation {runs} of rng seed {seed:#x} panicked; input kept in {}",
                    path.display()
                );
                std::panic::resume_unwind(panic);
            }
            runs += 1;
        }
        eprintln!("{target}: {runs} mutations in {:?}", start.elapsed());
    }
}

/// The parsers' seeds are inputs they accept (a corpus of refused inputs would keep the
/// fuzzer at the door).
#[test]
fn the_parsers_accept_their_seeds() {
    use hsm_service::ceremony::{backup_file::BackupFile, plan, shares::ShareFile};
    let path = hsm_fuzz::config_dir().join("config.toml");
    for (target, name, bytes) in seeds::all() {
        let text = std::str::from_utf8(&bytes).ok();
        let ok = match target {
            "config" => hsm_service::config::Config::parse(text.unwrap(), &path)
                .map(drop)
                .map_err(|e| e.to_string()),
            "plan" => plan::parse(text.unwrap())
                .map(drop)
                .map_err(|e| e.to_string()),
            "share" => text
                .unwrap()
                .split('\0')
                .try_for_each(|t| ShareFile::parse(t).map(drop))
                .map_err(|e| e.to_string()),
            "backup" => BackupFile::parse(text.unwrap())
                .map(drop)
                .map_err(|e| e.to_string()),
            "audit" => {
                let report = hsm_audit::verify_chains(
                    &bytes[..],
                    &audit_keys(),
                    &hsm_audit::ChainsOptions::default(),
                );
                if report.is_ok() {
                    Ok(())
                } else {
                    Err(format!("{:?}", report.all_problems().collect::<Vec<_>>()))
                }
            }
            "pskc" => pskc::Reader::new(&bytes[..])
                .and_then(|mut r| {
                    while r.next_entry()?.is_some() {}
                    Ok(())
                })
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        assert!(ok.is_ok(), "seed {target}/{name} is refused: {ok:?}");
    }
}

fn audit_keys() -> std::collections::HashMap<String, Vec<u8>> {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        hsm_fuzz::AUDIT_KEY_PKCS8,
        &rng,
    )
    .expect("key");
    [(
        hsm_fuzz::AUDIT_KEY_ID.to_owned(),
        pair.public_key().as_ref().to_vec(),
    )]
    .into()
}

/// The committed corpora hold a file for every seed [`seeds::all`] makes (write them
/// after adding one: `cargo test -p hsm-fuzz --test corpus -- --ignored write_seeds`).
/// Their contents may lag behind the files they were made from (e.g. the config
/// example): the replay test runs the current seeds too.
#[test]
fn the_corpora_hold_a_file_for_every_seed() {
    for (target, name, _) in seeds::all() {
        let path = dir("corpus", target).join(&name);
        assert!(
            path.is_file(),
            "{} is missing: run --ignored write_seeds",
            path.display()
        );
    }
}

#[test]
#[ignore = "writes fuzz/corpus/; run after changing the seeds"]
fn write_seeds() {
    for (target, name, bytes) in seeds::all() {
        let d = dir("corpus", target);
        std::fs::create_dir_all(&d).expect("corpus dir");
        std::fs::write(d.join(name), bytes).expect("write seed");
    }
}

/// Every RPC of the proto files' descriptors (`package.Service/Method`).
fn wire_methods() -> Vec<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(hsm_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut wire: Vec<String> = Vec::new();
    for file in set.file {
        for service in file.service {
            for method in service.method {
                wire.push(format!(
                    "{}.{}/{}",
                    file.package.clone().unwrap_or_default(),
                    service.name.clone().unwrap_or_default(),
                    method.name.unwrap_or_default()
                ));
            }
        }
    }
    wire.sort();
    wire
}

/// The requests target calls every RPC the service serves: a new RPC fails this until
/// it is added to `METHODS` (and to the handler dispatch), and an RPC listed as not
/// served fails it as soon as the role gate has an entry for it.
#[test]
fn the_requests_target_covers_every_rpc() {
    use hsm_fuzz::requests::NOT_SERVED;
    use hsm_service::auth::gate::METHOD_ROLES;
    let mut ours: Vec<String> = METHODS
        .iter()
        .chain(NOT_SERVED)
        .map(|m| (*m).to_owned())
        .collect();
    ours.sort();
    assert_eq!(
        ours,
        wire_methods(),
        "fuzz/src/requests.rs METHODS + NOT_SERVED vs the proto files"
    );
    for m in NOT_SERVED {
        assert!(
            !METHOD_ROLES.iter().any(|(name, _)| name == m),
            "{m} is served now (it is in the role gate's table): move it from NOT_SERVED \
             to METHODS and call its handler in fuzz/src/requests.rs"
        );
    }
    for m in METHODS {
        assert!(
            METHOD_ROLES.iter().any(|(name, _)| name == m),
            "{m} has no entry in the role gate's table"
        );
    }
}
