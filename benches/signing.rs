//! Assertion signing: the JWS build alone (JSON + base64), SignAssertion through the
//! HSM (ES256 and EdDSA) against the same signature computed in software with ring in
//! the same run, and SignAssertion end to end over mTLS with 1 and 16 callers in flight.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hsm_client::proto::SignAssertionRequest;
use hsm_service::signing::{
    prepare_assertion, Algorithm, AssertionParams, AssertionRequest, Caller, Grant, Signer, Usage,
    NSIS_ACR_VALUES,
};
use hsm_service::testing::DevEnv;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

const ISSUER: &str = "https://hsm-service.dev.local";
const KID: &str = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";

fn request(key: &str) -> AssertionRequest {
    AssertionRequest {
        key: key.to_owned(),
        subject: "pseudonym-4711".into(),
        audience: vec!["https://bank.example".into()],
        nonce: "n-0S6_WzA2Mj".into(),
        acr: NSIS_ACR_VALUES[0].into(),
        amr: vec!["otp".into()],
        ttl_seconds: 300,
        auth_time: 0,
        extra_claims_json: r#"{"loa":"substantial"}"#.into(),
        evidence_id: String::new(),
    }
}

/// The software baseline: the same assertion built and signed with ring.
fn software(alg: Algorithm, sign: &dyn Fn(&[u8]) -> Vec<u8>) -> String {
    let r = request("");
    let now = hsm_service::common::Clock::system().now();
    let jti = "3q2-7wAAAAA-sQ5UuhAAAA";
    let params = AssertionParams {
        issuer: ISSUER,
        subject: &r.subject,
        audience: &r.audience,
        nonce: &r.nonce,
        acr: &r.acr,
        amr: &r.amr,
        auth_time: now,
        now,
        ttl_seconds: r.ttl_seconds,
        jti,
        extra_claims_json: &r.extra_claims_json,
        txn_text_sha256: None,
    };
    let input = prepare_assertion(alg, KID, &params).expect("prepare");
    let signature = sign(input.bytes());
    input.finish(&signature)
}

fn signing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut env = DevEnv::new();
    env.allow_unbound_assertions("login-service");
    for rule in &mut env.config.clients {
        if rule.cn.as_deref() == Some("login-service") {
            rule.signing_keys = Some(vec!["assertion".into(), "eddsa".into()]);
        }
    }
    let (server, client) = rt.block_on(async {
        let server = env.start().await;
        let signer = &server.state().signing;
        let k = signer
            .create_version("eddsa", Algorithm::EdDsa, Usage::Signing)
            .await
            .expect("create");
        signer.publish("eddsa", k.version).await.expect("publish");
        signer.activate("eddsa", k.version).await.expect("activate");
        let client = hsm_client::ClientConfig::dev(env.dir.path(), "login-service")
            .with_endpoint(format!("https://{}", server.local_addr()))
            .connect()
            .await
            .expect("connect");
        (server, client)
    });
    let signer: Arc<Signer> = server.state().signing.clone();
    // Signing itself is measured: unbound (no evidence to spend).
    let caller = Caller {
        grant: Grant {
            keys: Some(vec!["assertion".into(), "eddsa".into()]),
            unbound_assertions: true,
            tenant: "login-service".into(),
            ..Grant::default()
        },
        actor: hsm_service::audit::Actor::new("login-service", ""),
    };

    let rng = SystemRandom::new();
    let p256_pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("p256");
    let p256 =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, p256_pkcs8.as_ref(), &rng)
            .expect("p256");
    let ed_pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("ed25519");
    let ed = Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref()).expect("ed25519");
    assert_eq!(ed.public_key().as_ref().len(), 32);

    let mut g = c.benchmark_group("signing/jws_build");
    g.throughput(Throughput::Elements(1));
    g.bench_function("json_and_base64", |b| {
        b.iter(|| software(Algorithm::Es256, &|_| vec![0u8; 64]))
    });
    g.finish();

    for (name, key, alg) in [
        ("es256", "assertion", Algorithm::Es256),
        ("eddsa", "eddsa", Algorithm::EdDsa),
    ] {
        let mut g = c.benchmark_group(format!("signing/{name}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("software_ring", |b| match alg {
            Algorithm::Es256 => b.iter(|| {
                software(alg, &|m| {
                    p256.sign(&rng, m).expect("sign").as_ref().to_vec()
                })
            }),
            _ => b.iter(|| software(alg, &|m| ed.sign(m).as_ref().to_vec())),
        });
        g.bench_function("hsm", |b| {
            b.to_async(&rt).iter(|| async {
                signer
                    .sign_assertion(&caller, &request(key))
                    .await
                    .expect("sign")
            })
        });
        g.finish();
    }

    let mut g = c.benchmark_group("signing/mtls_es256");
    let wire = |key: &str| SignAssertionRequest {
        key: key.to_owned(),
        subject: "pseudonym-4711".into(),
        audience: vec!["https://bank.example".into()],
        nonce: "n-0S6_WzA2Mj".into(),
        acr: NSIS_ACR_VALUES[0].into(),
        amr: vec!["otp".into()],
        ttl_seconds: 300,
        auth_time: 0,
        extra_claims_json: r#"{"loa":"substantial"}"#.into(),
        evidence_id: String::new(),
    };
    for in_flight in [1u64, 16] {
        g.throughput(Throughput::Elements(in_flight));
        g.bench_with_input(
            BenchmarkId::new("callers", in_flight),
            &in_flight,
            |b, &n| {
                b.to_async(&rt).iter(|| async {
                    let calls: Vec<_> = (0..n)
                        .map(|_| {
                            let mut signing = client.signing();
                            let req = wire("");
                            tokio::spawn(
                                async move { signing.sign_assertion(req).await.expect("sign") },
                            )
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
    rt.block_on(server.shutdown()).expect("shutdown");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = signing
}
criterion_main!(benches);
