//! `hsmctl bench`: the JSON summary's shape, the plot file, both loop modes, the
//! accepted share of in-order HOTP, the round robin over several `--addr`, and the
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_hotp_is_all_accepted_and_says_so() {
    let env = DevEnv::new();
    let server = env.start().await;
    // More callers than a credential has room for in a look-ahead window, few
    // credentials: without one request per credential in flight, codes would overtake
    // each other and come back REPLAYED.
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &[
            "bench",
            "--scenario",
            "verify-hotp",
            "--count",
            "300",
            "--duration",
            "20s",
            "--warmup",
            "0s",
            "--concurrency",
            "8",
            "--credentials",
            "10",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    let requests = v["requests"].as_u64().expect("requests");
    assert!(requests >= 300, "{v}");
    assert_eq!(v["outcomes"]["ACCEPTED"].as_u64(), Some(requests), "{v}");
    assert_eq!(v["accepted_share"].as_f64(), Some(1.0), "{v}");
    assert_eq!(v["targets"].as_array().map(Vec::len), Some(1), "{v}");

    // The text summary prints the share too.
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &[
            "bench",
            "--scenario",
            "verify-hotp",
            "--count",
            "20",
            "--warmup",
            "0s",
            "--concurrency",
            "2",
            "--credentials",
            "4",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        common::stdout(&out).contains("accepted: 100.00%"),
        "{out:?}"
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_addrs_get_the_requests_in_turn() {
    // Two services with one PKI but stores of their own: the credentials are created
    // through the first --addr only, so the second answers NOT_FOUND. Which server
    // answered is then visible in the outcomes, not only in the generator's own counts.
    let first = DevEnv::new();
    let second = DevEnv::new();
    for entry in std::fs::read_dir(first.dir.path().join("pki")).expect("pki") {
        let entry = entry.expect("pki entry");
        std::fs::copy(
            entry.path(),
            second.pki(&entry.file_name().to_string_lossy()),
        )
        .expect("copy the first env's PKI");
    }
    let a = first.start().await;
    let b = second.start().await;
    let (addr_a, addr_b) = (
        format!("https://{}", a.local_addr()),
        format!("https://{}", b.local_addr()),
    );
    let out = hsmctl(
        &first,
        a.local_addr(),
        "login-service",
        &[
            "bench",
            "--addr",
            &addr_a,
            "--addr",
            &addr_b,
            "--scenario",
            "verify-totp",
            "--count",
            "200",
            "--duration",
            "20s",
            "--warmup",
            "0s",
            "--concurrency",
            "1",
            "--credentials",
            "5",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    let requests = v["requests"].as_u64().expect("requests");
    let verdicts = v["outcomes"]["ACCEPTED"].as_u64().unwrap_or(0)
        + v["outcomes"]["REPLAYED"].as_u64().unwrap_or(0);
    let not_found = v["errors"]["NotFound"].as_u64().unwrap_or(0);
    assert_eq!(verdicts + not_found, requests, "{v}");
    // One caller, round robin per request: the two halves differ by at most one.
    assert!(verdicts.abs_diff(not_found) <= 1, "{v}");
    let targets = v["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2, "{v}");
    assert_eq!(targets[0]["endpoint"], addr_a.as_str());
    assert_eq!(targets[1]["endpoint"], addr_b.as_str());
    assert_eq!(targets[0]["requests"].as_u64(), Some(verdicts), "{v}");
    assert_eq!(targets[1]["requests"].as_u64(), Some(not_found), "{v}");

    // With --addr, --endpoint is not used: nothing listens on this one.
    let out = hsmctl(
        &first,
        "127.0.0.1:9".parse().expect("address"),
        "login-service",
        &[
            "bench",
            "--addr",
            &addr_a,
            "--scenario",
            "verify-totp",
            "--count",
            "5",
            "--warmup",
            "0s",
            "--credentials",
            "1",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
}
