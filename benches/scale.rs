//! Store scale: creates credentials through the real HSM wrap path (seed generated in
//! SoftHSM, wrapped under the master key) into the embedded store, and shows that the
//! verify path does not get slower with the count.
//!
//! `cargo bench -p hsm-benches --bench scale` creates 200,000 (a few minutes; set
//! `SCALE_CREDENTIALS=1000000` for the national-scale figure, ~8 minutes here); under
//! `cargo test` it runs with 4,000 so that the path stays tested. It prints the median
//! verify latency (random ids, so the unwrapped-seed
//! cache mostly misses, as at national scale) at 10,000 credentials and at the full count,
//! the store-only read latency at both (medians), and the data file size per credential.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_benches::CredentialBench;
use hsm_service::credentials::NewCredential;
use hsm_service::otp::{HashAlgorithm, OtpKind};
use hsm_service::store::{CredentialRecord, CredentialStore};

const SAMPLES: usize = 2_000;
const CHUNK: usize = 10_000;

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let total: usize = std::env::var("SCALE_CREDENTIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 200_000 } else { 4_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cb = CredentialBench::with_seed_cache(&rt, 2, 1_000);
    // A template record: the service's own create path made it, so its parameters and
    // wrapped seed have the shape real ones have.
    rt.block_on(cb.service.create(
        hsm_benches::BENCH_TENANT,
        NewCredential {
            id: Some("template".into()),
            kind: OtpKind::Totp,
            algorithm: HashAlgorithm::Sha1,
            digits: 6,
            period_seconds: 30,
            seed: None,
            reveal_seed: false,
            issuer: "Scale".into(),
            account_name: "citizen".into(),
            initial_counter: 0,
            subject: Some("citizen".into()),
        },
    ))
    .expect("template");
    let template = rt
        .block_on(cb.service.get(hsm_benches::BENCH_TENANT, "template"))
        .expect("get");

    let started = Instant::now();
    let mut made = 1usize;
    let mut rows = Vec::new();
    let first_checkpoint = 10_000usize.min(total / 2);
    for checkpoint in [first_checkpoint, total] {
        while made < checkpoint {
            let n = CHUNK.min(checkpoint - made);
            let batch = rt.block_on(make_chunk(&cb, &template, made, n));
            rt.block_on(cb.store.insert_many(batch)).expect("insert");
            made += n;
        }
        let verify = rt.block_on(median_verify(&cb, made));
        let read = rt.block_on(median_read(&cb, made));
        rows.push((made, verify, read));
    }
    let created = started.elapsed();
    let size = std::fs::metadata(cb.dir.path().join(hsm_service::store::EMBEDDED_FILE))
        .expect("store file")
        .len();
    println!(
        "\nscale: {made} credentials created through the HSM wrap path in {:.1} s",
        created.as_secs_f64()
    );
    println!("| credentials | median verify (random id) | median store read |");
    println!("| ---: | ---: | ---: |");
    for (n, v, r) in &rows {
        println!(
            "| {n} | {:.1} µs | {:.1} µs |",
            v.as_secs_f64() * 1e6,
            r.as_secs_f64() * 1e6
        );
    }
    if let [(_, small, _), .., (_, large, _)] = rows.as_slice() {
        println!(
            "verify at {made} / at 10000: {:.2}",
            large.as_secs_f64() / small.as_secs_f64()
        );
    }
    println!(
        "data file: {size} bytes, {:.0} bytes per credential",
        size as f64 / made as f64
    );
}

/// `n` records whose seeds the HSM generated and wrapped, ids `s{first}..`.
async fn make_chunk(
    cb: &CredentialBench,
    template: &CredentialRecord,
    first: usize,
    n: usize,
) -> Vec<CredentialRecord> {
    let hsm = cb.bench.hsm.clone();
    let mut out = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = first;
    let end = first + n;
    while next < end || !pending.is_empty() {
        while next < end && pending.len() < 32 {
            let hsm = hsm.clone();
            let id = next;
            pending
                .spawn(async move { (id, hsm.generate_wrapped_seed(1, 20).await.expect("wrap")) });
            next += 1;
        }
        if let Some(done) = pending.join_next().await {
            let (id, wrapped) = done.expect("join");
            let mut r = template.clone();
            r.id = format!("s{id:08}");
            r.wrapped_seed = wrapped;
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    // Each record's own seed binding, as enrolment computes it.
    for chunk in out.chunks_mut(500) {
        hsm_service::credentials::binding::bind_all(&hsm, chunk)
            .await
            .expect("bind");
    }
    out
}

fn random_id(state: &mut u64, count: usize) -> String {
    // xorshift: a fixed, cheap sequence of ids spread over the whole range.
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let i = 1 + (*state % (count as u64 - 1)) as usize;
    format!("s{i:08}")
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Median of single verifications (wrong code, lockout off) of random ids: store read,
/// unwrap (mostly a cache miss), three HMACs, durable write of the failure count.
async fn median_verify(cb: &CredentialBench, count: usize) -> Duration {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let service = Arc::clone(&cb.service);
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let id = random_id(&mut state, count);
        let t = Instant::now();
        service
            .verify(hsm_benches::BENCH_TENANT, &id, "000000")
            .await
            .expect("verify");
        samples.push(t.elapsed());
    }
    median(samples)
}

async fn median_read(cb: &CredentialBench, count: usize) -> Duration {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let id = random_id(&mut state, count);
        let t = Instant::now();
        cb.store
            .get(hsm_benches::BENCH_TENANT, &id)
            .await
            .expect("get")
            .expect("exists");
        samples.push(t.elapsed());
    }
    median(samples)
}
