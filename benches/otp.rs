//! The OTP hot path, from the HMAC up to VerifyCode over mTLS, each next to its
//! baseline in the same run:
//! - `otp/hmac_sha1`: one HMAC-SHA-1 of an 8-byte counter in software (ring), directly
//!   on a SoftHSM session (session-object key), and through the service's pool;
//! - `otp/totp_window1`: the three HMACs of a TOTP window of 1 through the pool, with the
//!   unwrapped seed cached (hit) and unwrapped every time (miss), against software;
//! - `otp/verify`: `Credentials::verify` (store read, HSM, constant-time compare, durable
//!   group-commit write) for TOTP accept/reject and HOTP (look-ahead 10) reject, and the
//!   reject with fsync switched off (what durability costs);
//! - `otp/verify_grpc`: VerifyCode end to end over mTLS with 16 callers in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cryptoki::mechanism::Mechanism;
use hsm_benches::{seed_binding, session_hmac_key, software_code, Bench, CredentialBench};
use hsm_client::proto as pb;
use hsm_service::otp::{self, Digits, HashAlgorithm, OtpKind};

const SEED: &[u8] = b"12345678901234567890";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn hmac(c: &mut Criterion) {
    let rt = runtime();
    let bench = Bench::new(1);
    let direct = bench.direct_session();
    let key = session_hmac_key(&direct, SEED);
    rt.block_on(bench.hsm.ensure_seed_master_key(1))
        .expect("master key");
    let wrapped: Arc<[u8]> = rt
        .block_on(
            bench
                .hsm
                .wrap_seed(1, otp::pad_seed(SEED, HashAlgorithm::Sha1)),
        )
        .expect("wrap")
        .into();
    let binding = seed_binding(&rt, &bench.hsm, &wrapped);
    let ring_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, SEED);

    let mut g = c.benchmark_group("otp/hmac_sha1");
    g.throughput(Throughput::Elements(1));
    g.bench_function("software_ring", |b| {
        let mut counter = 0u64;
        b.iter(|| {
            counter += 1;
            ring::hmac::sign(&ring_key, &otp::moving_factor(counter))
        })
    });
    g.bench_function("softhsm_direct", |b| {
        let mut counter = 0u64;
        b.iter(|| {
            counter += 1;
            direct
                .sign(&Mechanism::Sha1Hmac, key, &otp::moving_factor(counter))
                .expect("hmac")
        })
    });
    g.bench_function("pool_cached_seed", |b| {
        b.to_async(&rt).iter(|| async {
            bench
                .hsm
                .seed_macs(
                    1,
                    wrapped.clone(),
                    binding.clone(),
                    HashAlgorithm::Sha1,
                    vec![otp::moving_factor(1)],
                )
                .await
                .expect("hmac")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("otp/totp_window1");
    g.throughput(Throughput::Elements(1));
    let factors = || (99..=101).map(otp::moving_factor).collect::<Vec<_>>();
    let digits = Digits::new(6).expect("digits");
    g.bench_function("software_ring", |b| {
        b.iter(|| {
            let codes: Vec<u32> = factors()
                .iter()
                .map(|f| otp::truncate(ring::hmac::sign(&ring_key, f).as_ref(), digits))
                .collect();
            otp::find_match(123_456, &codes)
        })
    });
    g.bench_function("softhsm_direct", |b| {
        b.iter(|| {
            let codes: Vec<u32> = factors()
                .iter()
                .map(|f| {
                    otp::truncate(
                        &direct.sign(&Mechanism::Sha1Hmac, key, f).expect("hmac"),
                        digits,
                    )
                })
                .collect();
            otp::find_match(123_456, &codes)
        })
    });
    g.bench_function("pool_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            bench
                .hsm
                .seed_macs(
                    1,
                    wrapped.clone(),
                    binding.clone(),
                    HashAlgorithm::Sha1,
                    factors(),
                )
                .await
                .expect("macs")
        })
    });
    drop(g);
    // A cache of one entry and two seeds used in turn: every call unwraps.
    let small = Bench::with_seed_cache(1, 1);
    rt.block_on(small.hsm.ensure_seed_master_key(1))
        .expect("master key");
    let blobs: Vec<(Arc<[u8]>, _)> = [b"seed-one-seed-one-01", b"seed-two-seed-two-02"]
        .iter()
        .map(|s| {
            let blob: Arc<[u8]> = rt
                .block_on(
                    small
                        .hsm
                        .wrap_seed(1, otp::pad_seed(*s, HashAlgorithm::Sha1)),
                )
                .expect("wrap")
                .into();
            let binding = seed_binding(&rt, &small.hsm, &blob);
            (blob, binding)
        })
        .collect();
    let mut g = c.benchmark_group("otp/totp_window1");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pool_cache_miss", |b| {
        let mut i = 0usize;
        b.to_async(&rt).iter(|| {
            i += 1;
            let (blob, binding) = blobs[i % 2].clone();
            let hsm = small.hsm.clone();
            async move {
                hsm.seed_macs(1, blob, binding, HashAlgorithm::Sha1, factors())
                    .await
                    .expect("macs")
            }
        })
    });
    g.finish();
}

fn verify(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("otp/verify");
    g.throughput(Throughput::Elements(1));
    for durable in [true, false] {
        let cb = CredentialBench::new(&rt, 2, durable);
        cb.import(&rt, "totp", OtpKind::Totp, SEED);
        cb.import(&rt, "hotp", OtpKind::Hotp, SEED);
        let suffix = if durable { "" } else { "_no_fsync" };
        if durable {
            g.bench_function("totp_accept", |b| {
                b.to_async(&rt).iter(|| {
                    // Each call is one step later, so each code is fresh and accepted.
                    let now = cb.now.fetch_add(30, Ordering::Relaxed) + 30;
                    let code = software_code(SEED, now / 30);
                    let service = cb.service.clone();
                    async move {
                        service
                            .verify(hsm_benches::BENCH_TENANT, "totp", &code)
                            .await
                            .expect("verify")
                    }
                })
            });
        }
        g.bench_function(format!("totp_reject{suffix}"), |b| {
            b.to_async(&rt).iter(|| async {
                cb.service
                    .verify(hsm_benches::BENCH_TENANT, "totp", "000000")
                    .await
                    .expect("verify")
            })
        });
        g.bench_function(format!("hotp_reject{suffix}"), |b| {
            b.to_async(&rt).iter(|| async {
                cb.service
                    .verify(hsm_benches::BENCH_TENANT, "hotp", "000000")
                    .await
                    .expect("verify")
            })
        });
    }
    g.finish();
}

fn verify_grpc(c: &mut Criterion) {
    hsm_service::logging::init(hsm_service::config::LogFormat::Text, Some("warn"));
    let rt = runtime();
    let mut env = hsm_service::testing::DevEnv::new();
    env.config.credentials.lockout_threshold = u32::MAX - 1;
    env.config.credentials.hard_lockout_threshold = 0;
    let server = rt.block_on(env.start());
    let client = rt
        .block_on(
            hsm_client::ClientConfig::dev(env.dir.path(), "login-service")
                .with_endpoint(format!("https://{}", server.local_addr()))
                .connect(),
        )
        .expect("connect");
    const CALLERS: usize = 16;
    for i in 0..CALLERS {
        rt.block_on(
            client
                .credentials()
                .create_credential(pb::CreateCredentialRequest {
                    credential_id: format!("c{i}"),
                    kind: pb::OtpKind::Totp as i32,
                    seed: SEED.to_vec(),
                    ..Default::default()
                }),
        )
        .expect("create");
    }
    let mut g = c.benchmark_group("otp/verify_grpc");
    g.throughput(Throughput::Elements(CALLERS as u64));
    g.bench_function("totp_reject_16_in_flight", |b| {
        b.to_async(&rt).iter(|| async {
            let calls: Vec<_> = (0..CALLERS)
                .map(|i| {
                    let mut c = client.credentials();
                    tokio::spawn(async move {
                        c.verify_code(pb::VerifyCodeRequest {
                            credential_id: format!("c{i}"),
                            code: "000000".into(),
                        })
                        .await
                        .expect("verify")
                    })
                })
                .collect();
            for call in calls {
                call.await.expect("join");
            }
        })
    });
    g.finish();
    rt.block_on(server.shutdown()).expect("shutdown");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .sample_size(30);
    targets = hmac, verify, verify_grpc
}
criterion_main!(benches);
