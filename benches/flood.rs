//! Flood bench: can one client with 1,000 streams on one connection delay another
//! client's VerifyCode?
//!
//! One service (dev config, in this process). A victim client on its own connection
//! sends VerifyCode calls one after another (a wrong TOTP code: the full path, HSM window
//! and a durable failure count, never locked: the lockout thresholds are raised). Rounds
//! alternate "victim alone" and "victim while a flood client runs 1,000 concurrent
//! VerifyCode calls on one connection"; each phase gives the victim's p50 and p99, and the
//! flood figures are read as ratios to the alone figures of the same run. The same is
//! done against a service whose transport limits are opened up to tonic's defaults
//! (streams and calls per connection not limited), to show what the limits change.
//!
//! `cargo run --release -p hsm-benches --bin flood [-- --quick]`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_client::proto::{CreateCredentialRequest, HashAlgorithm, OtpKind, VerifyCodeRequest};
use hsm_client::{ClientConfig, HsmClient};
use hsm_service::testing::DevEnv;

/// Streams the flood client keeps open on its one connection.
const FLOOD_STREAMS: usize = 1000;
/// Credentials the flood spreads its calls over.
const FLOOD_CREDENTIALS: usize = 64;

struct Phase {
    p50_us: u64,
    p99_us: u64,
    calls: usize,
}

struct Variant {
    name: &'static str,
    alone: Vec<Phase>,
    flooded: Vec<Phase>,
    flood_per_s: Vec<f64>,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, phase) = if quick {
        (2, Duration::from_millis(500))
    } else {
        (3, Duration::from_secs(4))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut variants = Vec::new();
    // (name, streams per connection, calls per connection); `None`: the defaults.
    // tonic sets neither limit; the service always sets both, so "unbounded" is large.
    let cases: [(&'static str, Option<(u32, usize)>); 3] = [
        ("limits: defaults", None),
        ("limits: 8 calls per connection", Some((128, 8))),
        ("tonic defaults (no limits)", Some((u32::MAX, 1 << 20))),
    ];
    for (name, limits) in cases {
        let mut env = DevEnv::new();
        env.config.credentials.lockout_threshold = 1_000_000;
        env.config.credentials.hard_lockout_threshold = 1_000_000;
        if let Some((streams, calls)) = limits {
            let l = &mut env.config.server.limits;
            l.max_concurrent_streams = streams;
            l.max_concurrent_calls_per_connection = calls;
        }
        variants.push(rt.block_on(run(name, &env, rounds, phase)));
    }
    print_report(&variants, phase);
}

async fn run(name: &'static str, env: &DevEnv, rounds: usize, phase: Duration) -> Variant {
    let server = env.start().await;
    let endpoint = format!("https://{}", server.local_addr());
    let connect = || async {
        ClientConfig::dev(env.dir.path(), "login-service")
            .with_endpoint(endpoint.clone())
            .connect()
            .await
            .expect("connect")
    };
    let victim = connect().await;
    let flood = connect().await;
    create(&victim, "victim").await;
    for i in 0..FLOOD_CREDENTIALS {
        create(&flood, &format!("flood-{i}")).await;
    }
    let mut v = Variant {
        name,
        alone: Vec::new(),
        flooded: Vec::new(),
        flood_per_s: Vec::new(),
    };
    // Warm both paths (seed cache, connections).
    measure(&victim, Duration::from_millis(200)).await;
    for _ in 0..rounds {
        v.alone.push(measure(&victim, phase).await);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..FLOOD_STREAMS)
            .map(|i| {
                let client = flood.clone();
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let id = format!("flood-{}", i % FLOOD_CREDENTIALS);
                    while !stop.load(Ordering::Relaxed) {
                        let _ = verify(&client, &id).await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // Let the flood fill the connection's streams before measuring.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = done.load(Ordering::Relaxed);
        let start = Instant::now();
        v.flooded.push(measure(&victim, phase).await);
        let flood_calls = done.load(Ordering::Relaxed) - before;
        v.flood_per_s
            .push(flood_calls as f64 / start.elapsed().as_secs_f64());
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    }
    server.shutdown().await.expect("shutdown");
    v
}

async fn create(client: &HsmClient, id: &str) {
    client
        .credentials()
        .create_credential(CreateCredentialRequest {
            credential_id: id.to_owned(),
            kind: OtpKind::Totp as i32,
            algorithm: HashAlgorithm::Sha1 as i32,
            digits: 6,
            seed: (0u8..20).collect(),
            issuer: "bench".into(),
            ..Default::default()
        })
        .await
        .expect("create credential");
}

/// One VerifyCode with a well-formed code that is (almost surely) wrong: the full
/// path, HSM window and a durable failure count.
async fn verify(client: &HsmClient, id: &str) -> Result<(), tonic::Status> {
    client
        .credentials()
        .verify_code(VerifyCodeRequest {
            credential_id: id.to_owned(),
            code: "000000".into(),
        })
        .await
        .map(|_| ())
}

/// The victim's calls, one after another, for `phase`.
async fn measure(client: &HsmClient, phase: Duration) -> Phase {
    let end = Instant::now() + phase;
    let mut latencies = Vec::new();
    while Instant::now() < end {
        let sent = Instant::now();
        verify(client, "victim").await.expect("victim VerifyCode");
        latencies.push(sent.elapsed().as_micros() as u64);
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Phase {
        p50_us: at(0.50),
        p99_us: at(0.99),
        calls: latencies.len(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn print_report(variants: &[Variant], phase: Duration) {
    println!(
        "victim VerifyCode, one call at a time, {} s per phase; flood: {FLOOD_STREAMS} concurrent VerifyCode on one connection",
        phase.as_secs_f64()
    );
    println!(
        "| service | victim alone p50 / p99 | victim flooded p50 / p99 | flooded p50 / alone p99 | flooded p99 / alone p99 | flood calls/s |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for v in variants {
        let m = |phases: &[Phase], f: fn(&Phase) -> u64| {
            median(phases.iter().map(|p| f(p) as f64).collect())
        };
        let (a50, a99) = (m(&v.alone, |p| p.p50_us), m(&v.alone, |p| p.p99_us));
        let (f50, f99) = (m(&v.flooded, |p| p.p50_us), m(&v.flooded, |p| p.p99_us));
        println!(
            "| {} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.2} | {:.2} | {:.0} |",
            v.name,
            a50,
            a99,
            f50,
            f99,
            f50 / a99,
            f99 / a99,
            median(v.flood_per_s.clone()),
        );
        let calls: Vec<String> = v
            .alone
            .iter()
            .zip(&v.flooded)
            .map(|(a, f)| format!("{}/{}", a.calls, f.calls))
            .collect();
        println!(
            "  victim calls per round (alone/flooded): {}",
            calls.join(", ")
        );
    }
}
