//! The session pool's overhead: a 16-byte `C_GenerateRandom` called directly on a
//! session (the baseline) and through the pool (queue + thread hand-off + reply), alone
//! and with 4 and 16 callers in flight.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hsm_benches::Bench;

fn pool(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bench = Bench::new(2);
    let direct = bench.direct_session();
    let hsm = bench.hsm.clone();

    let mut g = c.benchmark_group("pool/random16");
    g.throughput(Throughput::Elements(1));
    g.bench_function("direct", |b| {
        let mut buf = [0u8; 16];
        b.iter(|| direct.generate_random_slice(&mut buf).expect("random"))
    });
    g.bench_function("pool", |b| {
        b.to_async(&rt)
            .iter(|| async { hsm.random(16).await.expect("random") })
    });
    for in_flight in [4u64, 16] {
        g.throughput(Throughput::Elements(in_flight));
        g.bench_with_input(
            BenchmarkId::new("pool_concurrent", in_flight),
            &in_flight,
            |b, &n| {
                b.to_async(&rt).iter(|| async {
                    let calls: Vec<_> = (0..n)
                        .map(|_| {
                            let hsm = hsm.clone();
                            tokio::spawn(async move { hsm.random(16).await.expect("random") })
                        })
                        .collect();
                    for call in calls {
                        call.await.expect("join");
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = pool
}
criterion_main!(benches);
