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
//!
//! `SCALE_BACKEND=postgres` does the same on PostgreSQL: a private cluster of the run
//! (`scripts/postgres.sh`, fsync on), the records inserted in chunks of 10,000 through
//! `Store::insert_many` (one locking existence read, one multi-row INSERT and one COMMIT
//! per chunk), and the size is `pg_total_relation_size` of the credentials table
//! (heap, TOAST and primary-key index). There the HSM generates `SCALE_DISTINCT_SEEDS`
//! (default 10,000) wrapped seeds, which the records reuse in turn, each record still
//! with its own id and its own seed binding (an HSM MAC over both): generating one
//! seed per record would make a 10 M run measure the HSM's wrap rate (~14 k/s here, about
//! 12 minutes), not the store (the redb mode keeps one seed per record).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_benches::CredentialBench;
use hsm_service::credentials::NewCredential;
use hsm_service::otp::{HashAlgorithm, OtpKind};
use hsm_service::store::{CredentialRecord, CredentialStore};

const SAMPLES: usize = 2_000;
const CHUNK: usize = 10_000;

/// Where the credentials go.
enum Engine {
    Redb,
    /// The cluster and database (dropped after the bench's store).
    Postgres {
        db: hsm_service::store::postgres::testing::TestDatabase,
        _cluster: hsm_benches::PgCluster,
    },
}

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
    let engine = match std::env::var("SCALE_BACKEND").as_deref() {
        Ok("postgres") => {
            let cluster = hsm_benches::PgCluster::start().expect("a PostgreSQL cluster");
            Engine::Postgres {
                db: cluster.database(),
                _cluster: cluster,
            }
        }
        Ok("redb") | Err(_) => Engine::Redb,
        Ok(other) => panic!("SCALE_BACKEND={other:?}: redb or postgres"),
    };
    let cb = match &engine {
        Engine::Redb => CredentialBench::with_seed_cache(&rt, 2, 1_000),
        Engine::Postgres { db, .. } => CredentialBench::on_store(
            &rt,
            hsm_benches::Bench::with_seed_cache(2, 1_000),
            tempfile::tempdir().expect("tempdir"),
            db.store("scale"),
        ),
    };
    let seed_pool: Option<Vec<Vec<u8>>> = match &engine {
        Engine::Redb => None,
        Engine::Postgres { .. } => {
            let n: usize = std::env::var("SCALE_DISTINCT_SEEDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10_000)
                .clamp(1, total.max(1));
            let t = Instant::now();
            let pool = rt.block_on(wrapped_seeds(&cb, n));
            println!(
                "scale: {n} distinct wrapped seeds from the HSM in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            Some(pool)
        }
    };
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

    let mut made = 1usize;
    let mut rows = Vec::new();
    let mut creating = Duration::ZERO;
    let mut inserting = Duration::ZERO;
    let first_checkpoint = 10_000usize.min(total / 2);
    for checkpoint in [first_checkpoint, total] {
        let started = Instant::now();
        // The next chunk is made (HSM) while the previous one is inserted (store).
        let mut pending: Option<tokio::task::JoinHandle<Duration>> = None;
        while made < checkpoint {
            let n = CHUNK.min(checkpoint - made);
            let batch = rt.block_on(make_chunk(&cb, &template, made, n, seed_pool.as_deref()));
            if let Some(p) = pending.take() {
                inserting += rt.block_on(p).expect("insert task");
            }
            let store = cb.store.clone();
            pending = Some(rt.spawn(async move {
                let t = Instant::now();
                store.insert_many(batch).await.expect("insert");
                t.elapsed()
            }));
            made += n;
        }
        if let Some(p) = pending.take() {
            inserting += rt.block_on(p).expect("insert task");
        }
        creating += started.elapsed();
        let verify = rt.block_on(median_verify(&cb, made));
        let read = rt.block_on(median_read(&cb, made));
        rows.push((made, verify, read));
    }
    let (size, what) = match &engine {
        Engine::Redb => (
            std::fs::metadata(cb.dir.path().join(hsm_service::store::EMBEDDED_FILE))
                .expect("store file")
                .len(),
            "data file",
        ),
        Engine::Postgres { db, .. } => (
            db.query_text("SELECT pg_total_relation_size('tenant_credentials')")
                .and_then(|t| t.parse().ok())
                .expect("pg_total_relation_size"),
            "pg_total_relation_size(tenant_credentials)",
        ),
    };
    println!(
        "\nscale: {made} credentials created in {:.1} s ({:.0}/s; store insert_many {:.1} s of it, \
         {:.0}/s, overlapped with making the next chunk: seed {}, binding MAC per record)",
        creating.as_secs_f64(),
        made as f64 / creating.as_secs_f64(),
        inserting.as_secs_f64(),
        made as f64 / inserting.as_secs_f64().max(1e-9),
        if seed_pool.is_some() {
            "from the pool"
        } else {
            "wrapped by the HSM per record"
        },
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
    if let [(first, small, _), .., (_, large, _)] = rows.as_slice() {
        println!(
            "verify at {made} / at {first}: {:.2}",
            large.as_secs_f64() / small.as_secs_f64()
        );
    }
    println!(
        "{what}: {size} bytes, {:.0} bytes per credential",
        size as f64 / made as f64
    );
    drop(cb);
    drop(engine);
}

/// `n` seeds the HSM generated and wrapped under master key 1.
async fn wrapped_seeds(cb: &CredentialBench, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < n || !pending.is_empty() {
        while next < n && pending.len() < 32 {
            let hsm = cb.bench.hsm.clone();
            pending.spawn(async move { hsm.generate_wrapped_seed(1, 20).await.expect("wrap") });
            next += 1;
        }
        if let Some(done) = pending.join_next().await {
            out.push(done.expect("join"));
        }
    }
    out
}

/// `n` records, ids `s{first}..`, whose seeds the HSM generated and wrapped (one per
/// record, or taken in turn from `pool`), each bound to its record by the HSM.
async fn make_chunk(
    cb: &CredentialBench,
    template: &CredentialRecord,
    first: usize,
    n: usize,
    pool: Option<&[Vec<u8>]>,
) -> Vec<CredentialRecord> {
    let hsm = cb.bench.hsm.clone();
    let mut out = Vec::with_capacity(n);
    if let Some(pool) = pool {
        for id in first..first + n {
            let mut r = template.clone();
            r.id = format!("s{id:08}");
            r.wrapped_seed = pool[id % pool.len()].clone();
            out.push(r);
        }
    }
    let mut next = if pool.is_some() { first + n } else { first };
    let mut pending = tokio::task::JoinSet::new();
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
