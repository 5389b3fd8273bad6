//! Assertions bound to evidence, end to end over mTLS: a code verified by this service
//! is the only thing an assertion can stand on (unless a client rule says otherwise),
//! once, for its own tenant and subject, with `amr` and `auth_time` taken from it.

mod common;

use hsm_client::proto::{SignAssertionRequest, VerifyResult};
use hsm_client::HsmClient;
use hsm_service::server::RunningServer;
use hsm_service::signing::NSIS_ACR_VALUES;
use hsm_service::testing::DevEnv;
use tonic::Code;

const SUBSTANTIAL: &str = NSIS_ACR_VALUES[0];
const HIGH: &str = NSIS_ACR_VALUES[1];

fn now() -> u64 {
    hsm_service::common::Clock::system().now()
}

/// A bound request for `subject` citing `evidence_id`, audience `https://bank.example`.
fn bound(subject: &str, evidence_id: &str) -> SignAssertionRequest {
    SignAssertionRequest {
        subject: subject.into(),
        audience: vec!["https://bank.example".into()],
        acr: SUBSTANTIAL.into(),
        evidence_id: evidence_id.into(),
        ..Default::default()
    }
}

async fn start(env: &DevEnv) -> (RunningServer, HsmClient, HsmClient) {
    let server = env.start().await;
    let a = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    let b = common::client(env.dir.path(), "login-service-b", server.local_addr()).await;
    (server, a, b)
}

async fn refused(c: &HsmClient, r: SignAssertionRequest) -> tonic::Status {
    c.signing().sign_assertion(r).await.expect_err("refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assertion_reports_the_authentication_it_cites_once() {
    let env = DevEnv::new();
    let (server, a, b) = start(&env).await;
    let set = common::jwks(&a).await;

    let before = now();
    let evidence = common::evidence_for(&a, "citizen-4711").await;
    let after = now();
    let signed = a
        .signing()
        .sign_assertion(bound("citizen-4711", &evidence))
        .await
        .expect("bound assertion")
        .into_inner();
    let claims = common::verify(&signed.jws, &set).expect("verifies with jsonwebtoken");
    assert_eq!(claims["sub"], "citizen-4711");
    assert_eq!(claims["acr"], SUBSTANTIAL);
    assert_eq!(
        claims["amr"],
        serde_json::json!(["otp"]),
        "RFC 8176 from the evidence"
    );
    let auth_time = claims["auth_time"].as_u64().expect("auth_time");
    assert!(
        (before..=after).contains(&auth_time),
        "auth_time is the verification's time"
    );
    assert!(auth_time <= claims["iat"].as_u64().expect("iat"));

    // Single use.
    let err = refused(&a, bound("citizen-4711", &evidence)).await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("already used"), "{}", err.message());

    // Other tenant, other subject, High with OTP evidence: refused, and nothing spent.
    let fresh = common::evidence_for(&a, "citizen-4711").await;
    let err = refused(&b, bound("citizen-4711", &fresh)).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("another tenant"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("4711") && !err.message().contains("login-service"));
    let err = refused(&a, bound("citizen-0815", &fresh)).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("another subject"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("4711"), "{}", err.message());
    let mut high = bound("citizen-4711", &fresh);
    high.acr = HIGH.into();
    let err = refused(&a, high).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("not reached by otp evidence"),
        "{}",
        err.message()
    );
    // A request that contradicts the evidence.
    let mut amr = bound("citizen-4711", &fresh);
    amr.amr = vec!["pwd".into(), "otp".into()];
    assert_eq!(refused(&a, amr).await.code(), Code::InvalidArgument);
    let mut early = bound("citizen-4711", &fresh);
    early.auth_time = 1_700_000_000;
    let err = refused(&a, early).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("contradicts the evidence"),
        "{}",
        err.message()
    );
    // Agreeing amr and auth_time are accepted, and the refusals above spent nothing.
    let claims = {
        let get = common::verify(
            &a.signing()
                .sign_assertion(bound("citizen-4711", &fresh))
                .await
                .expect("still unspent")
                .into_inner()
                .jws,
            &set,
        );
        get.expect("verifies")
    };
    assert_eq!(claims["amr"], serde_json::json!(["otp"]));

    // Malformed and unknown ids.
    let err = refused(&a, bound("citizen-4711", "not-an-id")).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = refused(&a, bound("citizen-4711", &"0".repeat(32))).await;
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());

    // Without evidence: refused, naming the client rule (unbound_assertions is false in
    // dev mode too).
    let err = refused(&a, bound("citizen-4711", "")).await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("cn = \"login-service\"")
            && err.message().contains("unbound_assertions"),
        "{}",
        err.message()
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_assertions_with_one_evidence_give_exactly_one() {
    let env = DevEnv::new();
    let (server, a, _b) = start(&env).await;
    let evidence = common::evidence_for(&a, "citizen-1").await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (a, evidence) = (a.clone(), evidence.clone());
        tasks.spawn(async move {
            a.signing()
                .sign_assertion(bound("citizen-1", &evidence))
                .await
                .map(|r| r.into_inner().jws)
        });
    }
    let mut ok = Vec::new();
    let mut codes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.expect("join") {
            Ok(jws) => ok.push(jws),
            Err(s) => codes.push(s.code()),
        }
    }
    assert_eq!(ok.len(), 1, "exactly one assertion");
    assert_eq!(codes.len(), 31);
    assert!(
        codes.iter().all(|c| *c == Code::FailedPrecondition),
        "{codes:?}"
    );
    let claims = common::verify(&ok[0], &common::jwks(&a).await).expect("the one verifies");
    // One assertion record for the evidence, with the one jti; the refusals left none.
    let auditor = common::client(env.dir.path(), "auditor", server.local_addr()).await;
    let records = common::audit_records(&auditor).await;
    let cited: Vec<_> = records
        .iter()
        .filter(|r| r.action == hsm_service::signing::ASSERTION_ACTION)
        .filter(|r| common::detail(r, "evidence_id") == evidence)
        .collect();
    assert_eq!(cited.len(), 1);
    assert_eq!(cited[0].object, claims["jti"].as_str().expect("jti"));
    assert_eq!(common::detail(cited[0], "tenant"), "login-service");
    // The verification that produced the evidence is recorded with it too.
    assert!(records.iter().any(|r| r.action == "credential.verify"
        && common::detail(r, "evidence_id") == evidence
        && common::detail(r, "tenant") == "login-service"));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_expires_and_a_credential_without_subject_gives_none() {
    let mut env = DevEnv::new();
    env.config.signing.evidence_ttl_seconds = 1;
    let (server, a, _b) = start(&env).await;
    let evidence = common::evidence_for(&a, "citizen-1").await;
    // Past the one-second lifetime (whole seconds: wait for the second after next).
    let deadline = now() + 2;
    while now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let err = refused(&a, bound("citizen-1", &evidence)).await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("expired"), "{}", err.message());

    common::enrol(&a, "plain", "").await;
    let r = common::verify_hotp(&a, "plain", 0).await;
    assert_eq!(r.result, VerifyResult::Accepted as i32);
    assert!(r.evidence_id.is_empty(), "no subject, no evidence");
    // Only ACCEPTED carries evidence.
    common::enrol(&a, "subject", "citizen-2").await;
    let wrong = common::verify_hotp(&a, "subject", 50).await;
    assert_eq!(wrong.result, VerifyResult::Rejected as i32);
    assert!(wrong.evidence_id.is_empty());
    let right = common::verify_hotp(&a, "subject", 0).await;
    assert_eq!(right.evidence_id.len(), 32);
    let replay = common::verify_hotp(&a, "subject", 0).await;
    assert_eq!(replay.result, VerifyResult::Replayed as i32);
    assert!(replay.evidence_id.is_empty());
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_assertions_only_for_a_rule_that_says_so() {
    let mut env = DevEnv::new();
    env.allow_unbound_assertions("login-service-b");
    let (server, a, b) = start(&env).await;
    let unbound = SignAssertionRequest {
        amr: vec!["pwd".into()],
        ..bound("citizen-1", "")
    };
    let err = refused(&a, unbound.clone()).await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    let signed = b
        .signing()
        .sign_assertion(unbound)
        .await
        .expect("B's rule allows unbound assertions")
        .into_inner();
    let claims = common::verify(&signed.jws, &common::jwks(&b).await).expect("verifies");
    assert_eq!(
        claims["amr"],
        serde_json::json!(["pwd"]),
        "the caller's word"
    );
    // Its evidence still binds when given.
    let evidence = common::evidence_for(&b, "citizen-3").await;
    let mut pwd = bound("citizen-3", &evidence);
    pwd.amr = vec!["pwd".into()];
    assert_eq!(refused(&b, pwd).await.code(), Code::InvalidArgument);
    server.shutdown().await.expect("shutdown");
}
