//! `hsmctl bench`: the JSON summary's shape, the plot file, both loop modes, and the
//! refusal of bad options.

mod common;

use common::{hsmctl, json};
use hsm_service::testing::DevEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_json_and_plot() {
    let env = DevEnv::new();
    let server = env.start().await;
    let plot = env.dir.path().join("bench.svg");
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &[
            "bench",
            "--scenario",
            "verify-totp",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--concurrency",
            "4",
            "--credentials",
            "5",
            "--json",
            "--plot",
            &plot.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["scenario"], "verify-totp");
    assert_eq!(v["mode"], "closed");
    assert_eq!(v["concurrency"], 4);
    let requests = v["requests"].as_u64().expect("requests");
    assert!(requests > 0);
    for q in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(v["latency_ms"][q].as_f64().expect(q) > 0.0, "{q}");
    }
    let p50 = v["latency_ms"]["p50"].as_f64().expect("p50");
    assert!(p50 <= v["latency_ms"]["p99"].as_f64().expect("p99"));
    assert!(v["throughput_per_second"].as_f64().expect("throughput") > 0.0);
    let outcomes: u64 = v["outcomes"]
        .as_object()
        .expect("outcomes")
        .values()
        .map(|n| n.as_u64().expect("n"))
        .sum();
    let errors: u64 = v["errors"]
        .as_object()
        .expect("errors")
        .values()
        .map(|n| n.as_u64().expect("n"))
        .sum();
    assert_eq!(outcomes + errors, requests);
    assert!(
        v["outcomes"]["ACCEPTED"].as_u64().unwrap_or(0)
            + v["outcomes"]["REPLAYED"].as_u64().unwrap_or(0)
            > 0
    );
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(
        svg.starts_with("<svg") && svg.contains("latency histogram"),
        "not the expected SVG"
    );

    // The bench removes the credentials it made.
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &["credential", "list", "--json"],
    );
    assert_eq!(json(&out)["credentials"].as_array().map(Vec::len), Some(0));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_and_signing() {
    // The sign-assertion scenario measures signing alone: unbound assertions.
    let mut env = DevEnv::new();
    env.allow_unbound_assertions("login-service");
    let server = env.start().await;
    let addr = server.local_addr();
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "bench",
            "--scenario",
            "verify-hotp",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--credentials",
            "3",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(
        (v["mode"].as_str(), v["rate"].as_f64()),
        (Some("open"), Some(200.0))
    );
    let n = v["requests"].as_u64().expect("requests");
    assert!(
        (150..=210).contains(&n),
        "about 200 requests scheduled in 1 s, got {n}"
    );
    assert!(v["outcomes"]["ACCEPTED"].as_u64().unwrap_or(0) > 0, "{v}");

    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "bench",
            "--scenario",
            "sign-assertion",
            "--count",
            "50",
            "--duration",
            "10s",
            "--warmup",
            "0s",
            "--concurrency",
            "2",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["scenario"], "sign-assertion");
    assert!(v["outcomes"]["OK"].as_u64().unwrap_or(0) >= 50, "{v}");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_refused() {
    let env = DevEnv::new();
    let server = env.start().await;
    for args in [
        vec!["bench", "--wrong-share", "1.5", "--json"],
        vec!["bench", "--rate", "0", "--json"],
        vec!["bench", "--concurrency", "0", "--json"],
    ] {
        let out = hsmctl(&env, server.local_addr(), "login-service", &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(json(&out)["error"]["code"], "InvalidArgument", "{args:?}");
    }
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &["bench", "--duration", "5 parsecs"],
    );
    assert_eq!(out.status.code(), Some(2), "clap refuses a bad duration");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_signs_with_the_evidence_of_each_accepted_code() {
    // A stock dev service: no unbound assertions, so every assertion cites evidence.
    let env = DevEnv::new();
    let server = env.start().await;
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &[
            "bench",
            "--scenario",
            "mixed",
            "--count",
            "10",
            "--duration",
            "10s",
            "--warmup",
            "0s",
            "--concurrency",
            "1",
            "--credentials",
            "40",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert!(v["outcomes"]["ACCEPTED"].as_u64().unwrap_or(0) > 0, "{v}");
    let failed_signs = v["outcomes"]
        .as_object()
        .expect("outcomes")
        .keys()
        .filter(|k| k.starts_with("sign "))
        .count();
    assert_eq!(failed_signs, 0, "{v}");
    server.shutdown().await.expect("shutdown");
}
