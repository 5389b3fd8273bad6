//! HSM faults, in process over a real SoftHSM token, through the fault-injection layer
//! at the HSM boundary (hsm/faults.rs, test builds only; its design note says what these
//! tests hold the service to): a lost session is replaced and idempotent calls succeed;
//! a non-idempotent one fails UNAVAILABLE and loses nothing; a removed token makes health
//! NOT_SERVING and every HSM call UNAVAILABLE, and the service recovers by itself when it
//! is back; a slow token fills the bounded queue and callers get RESOURCE_EXHAUSTED. And
//! the layer is absent from release builds.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_client::proto::{CreateCredentialRequest, GetCredentialRequest, OtpKind, VerifyResult};
use hsm_client::HsmClient;
use hsm_service::hsm::faults::{Ckr, Function, Ops};
use hsm_service::hsm::Hsm;
use hsm_service::server::RunningServer;
use hsm_service::testing::DevEnv;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// A service whose health monitor stays out of the way (its probes would use up faults
/// armed for the calls under test) unless `health_ms` asks for it.
async fn start(
    tune: impl FnOnce(&mut DevEnv),
    health_ms: u64,
) -> (DevEnv, RunningServer, HsmClient) {
    let mut env = DevEnv::new();
    env.config.server.health_interval_ms = health_ms;
    tune(&mut env);
    let server = env.start().await;
    let client = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    (env, server, client)
}

fn hsm(server: &RunningServer) -> &Hsm {
    &server.state().hsm
}

fn replaced(hsm: &Hsm) -> u64 {
    hsm.stats().sessions_replaced.load(Ordering::Relaxed)
}

async fn verify(c: &HsmClient, id: &str, counter: u64) -> Result<i32, tonic::Status> {
    c.credentials()
        .verify_code(hsm_client::proto::VerifyCodeRequest {
            credential_id: id.into(),
            code: common::hotp(common::EVIDENCE_SEED, counter),
        })
        .await
        .map(|r| r.into_inner().result)
}

async fn create(c: &HsmClient, id: &str, seed: Option<&[u8]>) -> Result<(), tonic::Status> {
    c.credentials()
        .create_credential(CreateCredentialRequest {
            credential_id: id.into(),
            kind: OtpKind::Hotp as i32,
            seed: seed.map(<[u8]>::to_vec).unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn exists(c: &HsmClient, id: &str) -> bool {
    match c
        .credentials()
        .get_credential(GetCredentialRequest {
            credential_id: id.into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => true,
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => panic!("GetCredential {id}: {s:?}"),
    }
}

/// An assertion for `citizen-1` bound to `evidence_id`.
async fn sign(c: &HsmClient, evidence_id: &str) -> Result<String, tonic::Status> {
    c.signing()
        .sign_assertion(hsm_client::proto::SignAssertionRequest {
            subject: "citizen-1".into(),
            audience: vec!["https://bank.example".into()],
            acr: hsm_service::signing::NSIS_ACR_VALUES[0].into(),
            evidence_id: evidence_id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().jws)
}

const ACCEPTED: i32 = VerifyResult::Accepted as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_is_replaced_and_idempotent_calls_succeed_on_the_retry() {
    let (_env, server, c) = start(|_| {}, 60_000).await;
    let hsm = hsm(&server);
    common::enrol(&c, "lost-session", "").await;
    assert_eq!(
        verify(&c, "lost-session", 0).await.expect("verify"),
        ACCEPTED
    );

    // The worker's session really closed under it (its unwrapped seeds gone with it):
    // the HMAC is computed on a new session, after a fresh unwrap.
    let (_, misses, _) = hsm.seed_cache_stats();
    let before = replaced(hsm);
    hsm.faults().close_sessions(1);
    assert_eq!(
        verify(&c, "lost-session", 1).await.expect("verify"),
        ACCEPTED
    );
    assert_eq!(hsm.faults().sessions_closed(), 1);
    assert_eq!(replaced(hsm), before + 1);
    assert!(
        hsm.seed_cache_stats().1 > misses,
        "the seed is unwrapped afresh"
    );

    // Each of the return values that mean "session or device gone", on an HMAC.
    let mut counter = 2;
    for ckr in [
        Ckr::SessionHandleInvalid,
        Ckr::DeviceError,
        Ckr::DeviceRemoved,
        Ckr::TokenNotPresent,
    ] {
        let before = replaced(hsm);
        hsm.faults()
            .fail_next_of(Ops::Idempotent, Function::SignInit, ckr, 1);
        assert_eq!(
            verify(&c, "lost-session", counter).await.expect("verify"),
            ACCEPTED,
            "{ckr:?}"
        );
        assert_eq!(replaced(hsm), before + 1, "{ckr:?}");
        counter += 1;
    }

    // Signing: a device error also drops the cached key handles, found again by search.
    let searches = hsm.object_searches();
    hsm.faults()
        .fail_next_of(Ops::Idempotent, Function::Sign, Ckr::DeviceError, 1);
    let signed = common::sign_default_assertion(&c).await;
    assert!(!signed.jws.is_empty());
    assert!(hsm.object_searches() > searches, "handles searched again");

    // Random.
    hsm.faults()
        .fail_next(Function::GenerateRandom, Ckr::SessionHandleInvalid, 1);
    assert_eq!(hsm.random(16).await.expect("random").len(), 16);

    // Two failures in a row are one more than the single retry: the caller gets
    // UNAVAILABLE, and the code it sent is still good afterwards.
    hsm.faults()
        .fail_next(Function::Sign, Ckr::SessionHandleInvalid, 2);
    let err = verify(&c, "lost-session", counter)
        .await
        .expect_err("unavailable");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        verify(&c, "lost-session", counter).await.expect("verify"),
        ACCEPTED
    );
    counter += 1;

    // CKR_GENERAL_ERROR is not a lost session: no retry, INTERNAL, nothing consumed.
    let before = replaced(hsm);
    hsm.faults().fail_next(Function::Sign, Ckr::GeneralError, 1);
    let err = verify(&c, "lost-session", counter)
        .await
        .expect_err("internal");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(replaced(hsm), before);
    assert_eq!(
        verify(&c, "lost-session", counter).await.expect("verify"),
        ACCEPTED
    );
    assert_eq!(hsm.faults().injected(), 1 + 4 + 1 + 1 + 2 + 1);
    server.shutdown().await.expect("shutdown");
}

/// SoftHSM, like other tokens, invalidates every object handle of the application when
/// its last session closes: with one session, a lost session means lost handles (the
/// privacyIDEA failure). The handles are searched again; no call fails for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_session_lost_takes_the_handles_along_and_they_are_found_again() {
    let (_env, server, c) = start(|env| env.config.hsm.sessions = 1, 60_000).await;
    let hsm = hsm(&server);
    common::enrol(&c, "last-session", "").await;
    assert_eq!(
        verify(&c, "last-session", 0).await.expect("verify"),
        ACCEPTED
    );
    let evidence = common::evidence_for(&c, "citizen-1").await;
    for (counter, ckr) in [(1, None), (2, Some(Ckr::SessionHandleInvalid))] {
        let searches = hsm.object_searches();
        match ckr {
            None => hsm.faults().close_sessions(1),
            Some(ckr) => hsm.faults().fail_next(Function::Sign, ckr, 1),
        }
        assert_eq!(
            verify(&c, "last-session", counter).await.expect("verify"),
            ACCEPTED,
            "{ckr:?}"
        );
        assert!(hsm.object_searches() > searches, "{ckr:?}: searched again");
    }
    hsm.faults().close_sessions(1);
    sign(&c, &evidence).await.expect("sign");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_idempotent_operation_fails_unavailable_and_loses_nothing() {
    let (_env, server, c) = start(|_| {}, 60_000).await;
    let hsm = hsm(&server);
    let audit_len = server.state().audit.len().await.expect("audit length");

    // Seed generated in the HSM (C_GenerateKey + C_WrapKey): not retried.
    for ckr in [
        Ckr::SessionHandleInvalid,
        Ckr::DeviceError,
        Ckr::DeviceRemoved,
    ] {
        let before = hsm.faults().injected();
        hsm.faults()
            .fail_next_of(Ops::NonIdempotent, Function::GenerateKey, ckr, 1);
        let err = create(&c, "generated", None)
            .await
            .expect_err("unavailable");
        assert_eq!(err.code(), Code::Unavailable, "{ckr:?}: {err:?}");
        assert_eq!(
            hsm.faults().injected(),
            before + 1,
            "tried once, not retried"
        );
        assert!(!exists(&c, "generated").await, "{ckr:?}: nothing stored");
    }
    // A session closed under the worker: the real CKR_SESSION_HANDLE_INVALID path, on an
    // imported seed (C_CreateObject + C_WrapKey).
    hsm.faults().close_sessions_of(Ops::NonIdempotent, 1);
    let err = create(&c, "imported", Some(common::EVIDENCE_SEED))
        .await
        .expect_err("unavailable");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(!exists(&c, "imported").await);
    assert_eq!(
        server.state().audit.len().await.expect("audit length"),
        audit_len,
        "no audit record of a state change that did not happen"
    );

    // The callers' retries succeed, once each; the imported seed verifies.
    create(&c, "generated", None)
        .await
        .expect("retry of the generated one");
    create(&c, "imported", Some(common::EVIDENCE_SEED))
        .await
        .expect("retry of the imported one");
    assert_eq!(verify(&c, "imported", 0).await.expect("verify"), ACCEPTED);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_ceremony_whose_key_generation_fails_records_no_key_and_leaves_no_orphan() {
    let (env, server, _c) = start(|_| {}, 60_000).await;
    let hsm = hsm(&server);
    let dir = env.dir.path();
    let addr = server.local_addr();
    let o1 = common::client(dir, "officer-1", addr).await;
    let o2 = common::client(dir, "officer-2", addr).await;
    let plan = |n: u32| {
        format!(
            "version = 1\ndescription = \"faults {n}\"\n\n[[step]]\nkind = \"generate-key\"\n\
             name = \"faulty\"\nalgorithm = \"ES256\"\nusage = \"signing\"\n"
        )
    };
    let run = |n: u32| {
        let (o1, o2, plan) = (o1.clone(), o2.clone(), plan(n));
        async move {
            let id = common::propose(&o1, &plan).await.expect("propose");
            common::approve_with_share(&o1, &id, "")
                .await
                .expect("approve");
            common::approve_with_share(&o2, &id, "")
                .await
                .expect("approve");
            common::execute(&o2, &id)
                .await
                .expect("execute")
                .ceremony
                .expect("ceremony")
        }
    };
    let faulty = |o: HsmClient| async move {
        o.keys()
            .list_keys(hsm_client::proto::ListKeysRequest {})
            .await
            .expect("list keys")
            .into_inner()
            .keys
            .into_iter()
            .filter(|k| k.name == "faulty")
            .map(|k| k.version)
            .collect::<Vec<_>>()
    };

    hsm.faults().fail_next_of(
        Ops::NonIdempotent,
        Function::GenerateKeyPair,
        Ckr::DeviceError,
        1,
    );
    let info = run(1).await;
    assert_eq!(info.state, "failed", "{info:?}");
    assert!(
        info.failure.contains("CKR_DEVICE_ERROR"),
        "{}",
        info.failure
    );
    assert_eq!(hsm.faults().injected(), 1);
    // Operators see it: the metric of PKCS#11 errors names the function and the CKR
    // (no other test of this process injects this pair).
    let metrics = hsm_service::metrics::encode();
    let line = "hsm_pkcs11_errors_total{function=\"C_GenerateKeyPair\",rv=\"CKR_DEVICE_ERROR\"} 1";
    assert!(metrics.contains(line), "{metrics}");
    assert!(
        faulty(o1.clone()).await.is_empty(),
        "no key version recorded"
    );
    let orphan = hsm
        .find_object(
            hsm_service::hsm::objects::ObjectClass::PRIVATE_KEY,
            "sig/faulty/v1",
        )
        .await
        .expect("search");
    assert!(orphan.is_none(), "no key pair left on the token");

    // Another ceremony makes the key: version 1, nothing half-made in its way.
    let info = run(2).await;
    assert_eq!(info.state, "succeeded", "{}", info.failure);
    assert_eq!(faulty(o1.clone()).await, vec![1]);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_hsm_turns_health_not_serving_and_back() {
    let (_env, server, c) = start(|env| env.config.hsm.sessions = 1, 100).await;
    let hsm = hsm(&server);
    health_becomes(&c, ServingStatus::Serving, Duration::from_secs(10)).await;
    // Every call now takes a second: longer than the health interval.
    hsm.faults().delay_calls(Some(Duration::from_secs(1)));
    let took = health_becomes(&c, ServingStatus::NotServing, Duration::from_secs(5)).await;
    eprintln!("NOT_SERVING {took:?} after the token hung");
    hsm.faults().delay_calls(None);
    let took = health_becomes(&c, ServingStatus::Serving, Duration::from_secs(10)).await;
    eprintln!("SERVING {took:?} after it answered again");
    server.shutdown().await.expect("shutdown");
}

/// Wait until health is `want`; how long it took.
async fn health_becomes(c: &HsmClient, want: ServingStatus, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if c.health().await.ok() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "health not {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_token_is_not_serving_and_unavailable_then_the_service_recovers_by_itself() {
    // One session: when the token goes it really closes that session, so the login is
    // gone too and recovery has to log in again.
    let (_env, server, c) = start(|env| env.config.hsm.sessions = 1, 100).await;
    let hsm = hsm(&server);
    health_becomes(&c, ServingStatus::Serving, Duration::from_secs(10)).await;
    common::enrol(&c, "outage", "").await;
    assert_eq!(verify(&c, "outage", 0).await.expect("verify"), ACCEPTED);
    common::sign_default_assertion(&c).await;
    let evidence = common::evidence_for(&c, "citizen-1").await;
    let searches = hsm.object_searches();
    let (_, misses, _) = hsm.seed_cache_stats();

    hsm.faults().remove_token();
    let took = health_becomes(&c, ServingStatus::NotServing, Duration::from_secs(5)).await;
    eprintln!("NOT_SERVING {took:?} after the token went");
    assert!(!hsm.is_logged_in().await);
    // Every call that needs the token: UNAVAILABLE, promptly.
    for _ in 0..3 {
        let t = Instant::now();
        let e = verify(&c, "outage", 1).await.expect_err("verify");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        let e = create(&c, "during-outage", None).await.expect_err("create");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        let e = sign(&c, &evidence).await.expect_err("sign");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        let e = hsm.random(8).await.expect_err("random");
        assert_eq!(e.kind(), hsm_service::hsm::ErrorKind::Unavailable, "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    assert!(
        hsm.faults().sessions_closed() >= 1,
        "the session went with the token"
    );
    let metrics = hsm_service::metrics::encode();
    let line = "hsm_pkcs11_errors_total{function=\"C_OpenSession\",rv=\"CKR_TOKEN_NOT_PRESENT\"}";
    assert!(metrics.contains(line), "{metrics}");

    // Back: no restart, no operator. Health returns, the session logs in again, the
    // handles are searched again, the seed is unwrapped again, and the code refused
    // during the outage is still good.
    hsm.faults().reinsert_token();
    let took = health_becomes(&c, ServingStatus::Serving, Duration::from_secs(5)).await;
    eprintln!("SERVING {took:?} after the token came back");
    assert!(hsm.is_logged_in().await);
    assert_eq!(verify(&c, "outage", 1).await.expect("verify"), ACCEPTED);
    assert!(hsm.seed_cache_stats().1 > misses, "seed cache re-created");
    assert!(
        hsm.object_searches() > searches,
        "cached handles found again"
    );
    // The evidence was not spent by the assertions refused meanwhile.
    sign(&c, &evidence).await.expect("sign after the outage");
    assert!(!exists(&c, "during-outage").await);
    create(&c, "during-outage", None)
        .await
        .expect("create after the outage");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hsm_fills_the_bounded_queue_and_answers_resource_exhausted() {
    const QUEUE: usize = 4;
    const CALLS: usize = 48;
    let (_env, server, c) = start(
        |env| {
            env.config.hsm.sessions = 1;
            env.config.hsm.queue_capacity = QUEUE;
        },
        60_000,
    )
    .await;
    let hsm = hsm(&server).clone();
    assert_eq!(hsm.queue_capacity(), QUEUE);
    for i in 0..CALLS {
        common::enrol(&c, &format!("slow-{i}"), "").await;
    }

    hsm.faults().delay_calls(Some(Duration::from_millis(50)));
    // Watch the queue while the calls pile up: it never holds more than its capacity.
    let deepest = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (hsm, deepest) = (hsm.clone(), deepest.clone());
        tokio::spawn(async move {
            loop {
                deepest.fetch_max(hsm.queued(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { verify(&c, &format!("slow-{i}"), 0).await })
        })
        .collect();
    let (mut accepted, mut exhausted) = (Vec::new(), Vec::new());
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.expect("join") {
            Ok(ACCEPTED) => accepted.push(i),
            Err(s) if s.code() == Code::ResourceExhausted => exhausted.push(i),
            other => panic!("call {i}: {other:?}"),
        }
    }
    watcher.abort();
    eprintln!(
        "{} accepted, {} RESOURCE_EXHAUSTED, deepest queue {}",
        accepted.len(),
        exhausted.len(),
        deepest.load(Ordering::Relaxed)
    );
    assert!(!exhausted.is_empty(), "a slow token must push back");
    assert!(!accepted.is_empty());
    assert!(deepest.load(Ordering::Relaxed) <= QUEUE);
    assert!(hsm.stats().rejected_busy.load(Ordering::Relaxed) >= exhausted.len() as u64);

    // Refused callers lost nothing: at full speed their first code is accepted.
    hsm.faults().delay_calls(None);
    for i in exhausted {
        assert_eq!(
            verify(&c, &format!("slow-{i}"), 0).await.expect("verify"),
            ACCEPTED
        );
    }
    server.shutdown().await.expect("shutdown");
}

/// The layer must be absent from everything but this package's test builds: no
/// workspace member's normal (or build) dependency graph enables `fault-injection`.
/// The second look, with dev-dependencies, shows the check can see the feature at all.
#[test]
fn release_builds_do_not_have_the_fault_injection_layer() {
    let tree = |edges: &str| {
        let out = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args(["tree", "--workspace", "--offline", "--prefix", "none"])
            .args(["-e", edges, "-f", "{p} [{f}]"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo tree");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let release = tree("normal,build");
    assert!(
        release.lines().any(|l| l.starts_with("hsm-service ")),
        "{release}"
    );
    let leaks: Vec<_> = release
        .lines()
        .filter(|l| l.contains("fault-injection"))
        .collect();
    assert!(
        leaks.is_empty(),
        "fault-injection in a release build: {leaks:?}"
    );
    let tests = tree("normal,build,dev");
    assert!(
        tests
            .lines()
            .any(|l| l.starts_with("hsm-service ") && l.contains("fault-injection")),
        "{tests}"
    );
}
