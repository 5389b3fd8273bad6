//! The app authenticator end to end over mTLS (issue 13): a third-party app with a P-256
//! key made here activates, the login service sends challenges, the app approves one
//! with the binding code, and the approval is evidence for an assertion a relying party
//! verifies with `jsonwebtoken`. Plus every refusal the issue lists.

mod common;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use common::app::{self, App};
use hsm_client::proto::{
    ChallengeDecision as Decision, ChallengePurpose as Purpose, ChallengeState as State,
    GetChallengeRequest, ListDevicesRequest, ListEventsRequest, RevokeDeviceRequest,
    SignAssertionRequest,
};
use hsm_client::HsmClient;
use hsm_service::config::{StoreBackendKind, StoreConfig};
use hsm_service::server::RunningServer;
use hsm_service::signing::NSIS_ACR_VALUES;
use hsm_service::store::postgres::testing::TestDatabase;
use hsm_service::store::{KeyRange, Table};
use hsm_service::testing::DevEnv;
use p256::ecdsa::signature::Verifier;
use tonic::Code;

const HIGH: &str = NSIS_ACR_VALUES[1];

async fn start(env: &DevEnv) -> (RunningServer, HsmClient, HsmClient) {
    let server = env.start().await;
    let a = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    let b = common::client(env.dir.path(), "login-service-b", server.local_addr()).await;
    (server, a, b)
}

async fn get(c: &HsmClient, id: &str) -> hsm_client::proto::Challenge {
    app::approvals(c)
        .get_challenge(GetChallengeRequest {
            challenge_id: id.into(),
        })
        .await
        .expect("get challenge")
        .into_inner()
}

async fn events(c: &HsmClient, subject: &str) -> Vec<hsm_client::proto::Event> {
    c.events()
        .list_events(ListEventsRequest {
            from_seq: 0,
            limit: 1000,
            kinds: Vec::new(),
            subject: subject.into(),
        })
        .await
        .expect("list events")
        .into_inner()
        .events
}

/// Verify `ch.server_signature` over `ch.payload` with the key `ch.server_kid` of the
/// challenge JWKS, as the app does.
async fn check_server_signature(c: &HsmClient, ch: &hsm_client::proto::Challenge) {
    let text = c
        .signing()
        .get_jwks(hsm_client::proto::GetJwksRequest {
            usage: "challenge".into(),
        })
        .await
        .expect("challenge jwks")
        .into_inner()
        .jwks_json;
    let set: serde_json::Value = serde_json::from_str(&text).expect("json");
    let jwk = set["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == ch.server_kid.as_str())
        .expect("server_kid is in the challenge JWKS");
    assert_eq!(jwk["crv"], "P-256");
    let coord = |n: &str| URL_SAFE_NO_PAD.decode(jwk[n].as_str().unwrap()).unwrap();
    let point = [&[4u8][..], &coord("x"), &coord("y")].concat();
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("point");
    let sig = p256::ecdsa::Signature::from_der(&ch.server_signature).expect("DER");
    key.verify(&ch.payload, &sig)
        .expect("server signature verifies");
    // And it is in no other key set.
    let assertion_keys = common::jwks(c).await;
    assert!(assertion_keys.find(&ch.server_kid).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_app_activates_approves_and_the_assertion_verifies() {
    let env = DevEnv::new();
    let (server, a, _b) = start(&env).await;
    let phone = app::activate(&a, "citizen-1").await;
    let listed = app::devices(&a)
        .list_devices(ListDevicesRequest {
            subject: "citizen-1".into(),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].device_id, phone.device_id);
    assert_eq!(listed[0].public_key_sha256.len(), 64);

    for (purpose, text) in [
        (Purpose::Login, "Log in to Test Bank"),
        (
            Purpose::Transaction,
            "Pay 1.250,00 DKK to Acme ApS\naccount 1234",
        ),
    ] {
        let ch = app::challenge(&a, "citizen-1", purpose, text, 0)
            .await
            .expect("create challenge");
        assert_eq!(ch.state, State::Pending as i32);
        assert_eq!(ch.binding_code.len(), 2);
        assert_eq!(ch.expires_at, ch.created_at + 120);
        assert!(ch.payload.starts_with(b"hsm.v1.challenge.v1\0"));
        check_server_signature(&a, &ch).await;

        // The app sees it without the binding code, and exactly the signed payload.
        let pending = app::pending(&a, &phone).await.expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].challenge_id, ch.challenge_id);
        assert!(pending[0].binding_code.is_empty());
        assert_eq!(pending[0].payload, ch.payload);
        assert_eq!(pending[0].text, text);

        let answered = app::answer(&a, &phone, &pending[0], Decision::Approve, &ch.binding_code)
            .await
            .expect("approve");
        assert_eq!(answered.state, State::Approved as i32);
        assert_eq!(answered.answered_by_device_id, phone.device_id);
        assert!(answered.binding_code.is_empty());

        // Replayed: the same signed answer again.
        let replay = app::answer(&a, &phone, &ch, Decision::Approve, &ch.binding_code)
            .await
            .expect_err("replayed answer");
        assert_eq!(replay.code(), Code::FailedPrecondition, "{replay:?}");

        let seen = get(&a, &ch.challenge_id).await;
        assert_eq!(seen.state, State::Approved as i32);
        assert_eq!(seen.evidence_id.len(), 32);
        let signed = a
            .signing()
            .sign_assertion(SignAssertionRequest {
                subject: "citizen-1".into(),
                audience: vec!["https://bank.example".into()],
                acr: HIGH.into(),
                evidence_id: seen.evidence_id.clone(),
                ..Default::default()
            })
            .await
            .expect("assertion on app evidence")
            .into_inner();
        let claims = common::verify(&signed.jws, &common::jwks(&a).await).expect("verifies");
        assert_eq!(claims["amr"], serde_json::json!(["pop", "user"]));
        assert_eq!(claims["acr"], HIGH);
        assert_eq!(claims["sub"], "citizen-1");
        match purpose {
            Purpose::Transaction => assert_eq!(
                claims["txn_text_sha256"],
                hsm_service::audit::sha256_hex(text.as_bytes())
            ),
            _ => assert!(claims.get("txn_text_sha256").is_none()),
        }
    }
    // The caller cannot forge the transaction claim.
    let forged = a
        .signing()
        .sign_assertion(SignAssertionRequest {
            subject: "citizen-1".into(),
            acr: NSIS_ACR_VALUES[0].into(),
            evidence_id: common::evidence_for(&a, "citizen-1").await,
            extra_claims_json: r#"{"txn_text_sha256":"00"}"#.into(),
            ..Default::default()
        })
        .await
        .expect_err("reserved claim");
    assert_eq!(forged.code(), Code::InvalidArgument);

    let evs = events(&a, "citizen-1").await;
    assert!(
        evs.iter().all(|e| !e.details_json.contains("Test phone")),
        "events never carry the display name"
    );
    let kinds: Vec<(String, bool)> = evs.into_iter().map(|e| (e.kind, e.critical)).collect();
    for (kind, critical) in [
        ("device.activation_started", false),
        ("device.activated", true),
        ("challenge.created", false),
        ("challenge.approved", false),
    ] {
        assert!(
            kinds.contains(&(kind.to_owned(), critical)),
            "{kind} in {kinds:?}"
        );
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_binding_expiry_revoked_and_foreign_devices_are_refused() {
    let env = DevEnv::new();
    let (server, a, b) = start(&env).await;
    let phone = app::activate(&a, "citizen-2").await;
    let other = app::activate(&a, "citizen-3").await;

    // Wrong binding code: fail closed.
    let ch = app::challenge(&a, "citizen-2", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    let wrong = format!("{:02}", (ch.binding_code.parse::<u32>().unwrap() + 1) % 100);
    let cancelled = app::answer(&a, &phone, &ch, Decision::Approve, &wrong)
        .await
        .expect("answered");
    assert_eq!(cancelled.state, State::Cancelled as i32);
    assert_eq!(
        get(&a, &ch.challenge_id).await.state,
        State::Cancelled as i32
    );
    assert!(get(&a, &ch.challenge_id).await.evidence_id.is_empty());
    let late = app::answer(&a, &phone, &ch, Decision::Approve, &ch.binding_code)
        .await
        .expect_err("cancelled stays cancelled");
    assert_eq!(late.code(), Code::FailedPrecondition);

    // Another subject's device, and another tenant, cannot answer.
    let ch = app::challenge(&a, "citizen-2", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    let foreign = app::answer(&a, &other, &ch, Decision::Approve, &ch.binding_code)
        .await
        .expect_err("other subject's device");
    assert_eq!(foreign.code(), Code::PermissionDenied, "{foreign:?}");
    let tenant_b = app::answer(&b, &phone, &ch, Decision::Approve, &ch.binding_code)
        .await
        .expect_err("other tenant");
    assert_eq!(tenant_b.code(), Code::NotFound, "{tenant_b:?}");
    let get_b = app::approvals(&b)
        .get_challenge(GetChallengeRequest {
            challenge_id: ch.challenge_id.clone(),
        })
        .await
        .expect_err("other tenant");
    assert_eq!(get_b.code(), Code::NotFound);
    assert_eq!(get(&a, &ch.challenge_id).await.state, State::Pending as i32);

    // After expiry.
    let short = app::challenge(&a, "citizen-2", Purpose::Login, "Log in", 1)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(
        get(&a, &short.challenge_id).await.state,
        State::Expired as i32
    );
    let expired = app::answer(&a, &phone, &short, Decision::Approve, &short.binding_code)
        .await
        .expect_err("expired");
    assert_eq!(expired.code(), Code::FailedPrecondition);
    assert_eq!(
        get(&a, &short.challenge_id).await.state,
        State::Expired as i32
    );
    assert!(events(&a, "citizen-2")
        .await
        .iter()
        .any(|e| e.kind == "challenge.expired" && e.object_id == short.challenge_id));

    // A revoked device.
    let ch = app::challenge(&a, "citizen-2", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    let revoked = app::devices(&a)
        .revoke_device(RevokeDeviceRequest {
            device_id: phone.device_id.clone(),
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        revoked.state,
        hsm_client::proto::DeviceState::Revoked as i32
    );
    let refused = app::answer(&a, &phone, &ch, Decision::Approve, &ch.binding_code)
        .await
        .expect_err("revoked device");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let listing = app::pending(&a, &phone)
        .await
        .expect_err("revoked lists nothing");
    assert_eq!(listing.code(), Code::FailedPrecondition);
    assert!(events(&a, "citizen-2")
        .await
        .iter()
        .any(|e| e.kind == "device.revoked" && e.critical));
    // The subject has no active device now: no challenge can be sent.
    let none = app::challenge(&a, "citizen-2", Purpose::Login, "Log in", 0)
        .await
        .expect_err("no device");
    assert_eq!(none.code(), Code::FailedPrecondition);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_device_needs_an_approval_on_the_first() {
    let env = DevEnv::new();
    let (server, a, _b) = start(&env).await;
    let first = app::activate(&a, "citizen-4").await;

    let refused = app::begin(&a, "citizen-4", "")
        .await
        .expect_err("no approval");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("authorized_by_challenge_id"),
        "{refused:?}"
    );

    // A LOGIN approval is not an ACTIVATE_DEVICE approval.
    let login = app::challenge(&a, "citizen-4", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    app::answer(&a, &first, &login, Decision::Approve, &login.binding_code)
        .await
        .unwrap();
    let wrong_purpose = app::begin(&a, "citizen-4", &login.challenge_id)
        .await
        .expect_err("wrong purpose");
    assert_eq!(wrong_purpose.code(), Code::FailedPrecondition);

    // A pending (unapproved) one is not enough either.
    let ch = app::challenge(
        &a,
        "citizen-4",
        Purpose::ActivateDevice,
        "Activate a new phone",
        0,
    )
    .await
    .unwrap();
    let unapproved = app::begin(&a, "citizen-4", &ch.challenge_id)
        .await
        .expect_err("pending");
    assert_eq!(unapproved.code(), Code::FailedPrecondition);
    let approved = app::answer(&a, &first, &ch, Decision::Approve, &ch.binding_code)
        .await
        .unwrap();
    assert!(approved.evidence_id.is_empty());
    assert!(get(&a, &ch.challenge_id).await.evidence_id.is_empty());

    let begun = app::begin(&a, "citizen-4", &ch.challenge_id)
        .await
        .expect("approved on the first device");
    let (second, _) = app::complete(&a, &begun).await.expect("second device");
    // Used once only.
    let reused = app::begin(&a, "citizen-4", &ch.challenge_id)
        .await
        .expect_err("used");
    assert_eq!(reused.code(), Code::FailedPrecondition);

    // Both devices answer now.
    let ch = app::challenge(&a, "citizen-4", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    let ok = app::answer(&a, &second, &ch, Decision::Approve, &ch.binding_code)
        .await
        .unwrap();
    assert_eq!(ok.state, State::Approved as i32);

    // An officer may begin one without an approval (in-person check).
    let officer = common::client(env.dir.path(), "officer-1", server.local_addr()).await;
    let by_officer = app::devices(&officer)
        .begin_activation(hsm_client::proto::BeginActivationRequest {
            subject: "citizen-4".into(),
            display_name: "Tablet".into(),
            authorized_by_challenge_id: String::new(),
            tenant: "login-service".into(),
        })
        .await
        .expect("officer")
        .into_inner();
    let (_, d) = app::complete(&a, &by_officer).await.expect("completed");
    assert!(d.activated_by_officer);

    // Officers list and revoke (naming the tenant); another tenant's login service sees
    // neither the devices nor the ids.
    let listed = app::devices(&officer)
        .list_devices(ListDevicesRequest {
            subject: "citizen-4".into(),
            tenant: "login-service".into(),
        })
        .await
        .expect("officer lists")
        .into_inner()
        .devices;
    assert_eq!(listed.len(), 3);
    let b = common::client(env.dir.path(), "login-service-b", server.local_addr()).await;
    let none = app::devices(&b)
        .list_devices(ListDevicesRequest {
            subject: "citizen-4".into(),
            tenant: String::new(),
        })
        .await
        .expect("tenant b lists")
        .into_inner()
        .devices;
    assert!(none.is_empty());
    let foreign = app::devices(&b)
        .revoke_device(RevokeDeviceRequest {
            device_id: d.device_id.clone(),
            tenant: String::new(),
        })
        .await
        .expect_err("other tenant");
    assert_eq!(foreign.code(), Code::NotFound);
    let revoked = app::devices(&officer)
        .revoke_device(RevokeDeviceRequest {
            device_id: d.device_id.clone(),
            tenant: "login-service".into(),
        })
        .await
        .expect("officer revokes")
        .into_inner();
    assert_eq!(
        revoked.state,
        hsm_client::proto::DeviceState::Revoked as i32
    );
    assert!(revoked.revoked_at > 0);
    // Officers do not send challenges; auditors touch nothing here.
    let denied = app::challenge(&officer, "citizen-4", Purpose::Login, "Log in", 0)
        .await
        .expect_err("officer");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let auditor = common::client(env.dir.path(), "auditor", server.local_addr()).await;
    let denied = app::begin(&auditor, "citizen-4", "")
        .await
        .expect_err("auditor");
    assert_eq!(denied.code(), Code::PermissionDenied);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_me_reports_and_suspends_approvals() {
    let env = DevEnv::new();
    let (server, a, _b) = start(&env).await;
    let phone = app::activate(&a, "citizen-5").await;
    let ch = app::challenge(&a, "citizen-5", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    let reported = app::answer(&a, &phone, &ch, Decision::NotMe, "")
        .await
        .expect("not me");
    assert_eq!(reported.state, State::Reported as i32);
    let evs = events(&a, "citizen-5").await;
    let ev = evs
        .iter()
        .find(|e| e.kind == "challenge.reported")
        .expect("challenge.reported");
    assert!(ev.critical && ev.notify);
    assert_eq!(ev.object_id, ch.challenge_id);

    let next = app::challenge(&a, "citizen-5", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    let suspended = app::answer(&a, &phone, &next, Decision::Approve, &next.binding_code)
        .await
        .expect_err("suspended");
    assert_eq!(suspended.code(), Code::FailedPrecondition);
    assert!(suspended.message().contains("suspended"), "{suspended:?}");
    // It is still pending (nothing changed) and can be denied.
    assert_eq!(
        get(&a, &next.challenge_id).await.state,
        State::Pending as i32
    );
    let denied = app::answer(&a, &phone, &next, Decision::Deny, "")
        .await
        .unwrap();
    assert_eq!(denied.state, State::Denied as i32);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_answers_one_wins_and_one_pending_per_subject() {
    one_answer_wins(DevEnv::new()).await;
}

/// The same on PostgreSQL (where the exactly-once rests on locking reads of the
/// challenge and subject rows); skipped without HSM_TEST_POSTGRES_URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_answers_one_wins_on_postgres() {
    let Some(db) = tokio::task::spawn_blocking(TestDatabase::create)
        .await
        .expect("set-up")
    else {
        return;
    };
    let mut env = DevEnv::new();
    env.config.store = StoreConfig {
        backend: StoreBackendKind::Postgres,
        url: Some(db.url.clone()),
        instance: Some("app-1".into()),
        pool_size: 4,
        ..StoreConfig::default()
    };
    one_answer_wins(env).await;
    assert_eq!(
        db.query_text("SELECT count(*) FROM challenges").as_deref(),
        Some("2")
    );
}

async fn one_answer_wins(env: DevEnv) {
    let (server, a, _b) = start(&env).await;
    let phone = app::activate(&a, "citizen-6").await;

    // A newer challenge cancels the older.
    let old = app::challenge(&a, "citizen-6", Purpose::Login, "Log in (1)", 0)
        .await
        .unwrap();
    let ch = app::challenge(&a, "citizen-6", Purpose::Login, "Log in (2)", 0)
        .await
        .unwrap();
    assert_eq!(
        get(&a, &old.challenge_id).await.state,
        State::Cancelled as i32
    );
    let stale = app::answer(&a, &phone, &old, Decision::Approve, &old.binding_code)
        .await
        .expect_err("old prompt");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let pending = app::pending(&a, &phone).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].challenge_id, ch.challenge_id);

    let request = app::answer_request(&phone, &ch, Decision::Approve, &ch.binding_code);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let c = a.clone();
        let r = request.clone();
        tasks.push(tokio::spawn(async move {
            app::approvals(&c).answer_challenge(r).await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().state, State::Approved as i32);
                won += 1;
            }
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}"),
        }
    }
    assert_eq!(won, 1);
    let approved = events(&a, "citizen-6")
        .await
        .into_iter()
        .filter(|e| e.kind == "challenge.approved")
        .count();
    assert_eq!(approved, 1);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_refused_without_a_state_change() {
    let env = DevEnv::new();
    let (server, a, _b) = start(&env).await;
    let phone = app::activate(&a, "citizen-7").await;
    let ch = app::challenge(&a, "citizen-7", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    let good = app::answer_request(&phone, &ch, Decision::Approve, &ch.binding_code);
    let bad_requests = [
        (
            hsm_client::proto::AnswerChallengeRequest {
                signature: vec![0x30, 0x02, 0x01],
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            hsm_client::proto::AnswerChallengeRequest {
                signature: vec![0; 64],
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            hsm_client::proto::AnswerChallengeRequest {
                binding_code: "7".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            hsm_client::proto::AnswerChallengeRequest {
                decision: 99,
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            hsm_client::proto::AnswerChallengeRequest {
                challenge_id: "not-an-id".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            hsm_client::proto::AnswerChallengeRequest {
                challenge_id: "0".repeat(32),
                ..good.clone()
            },
            Code::NotFound,
        ),
        (
            hsm_client::proto::AnswerChallengeRequest {
                device_id: "0".repeat(32),
                ..good.clone()
            },
            Code::NotFound,
        ),
        // A well-formed signature by another key: nothing changes.
        (
            app::answer_request(
                &App {
                    key: app::new_key(),
                    device_id: phone.device_id.clone(),
                    last_list: Default::default(),
                },
                &ch,
                Decision::Approve,
                &ch.binding_code,
            ),
            Code::PermissionDenied,
        ),
        // A signature over another decision.
        (
            hsm_client::proto::AnswerChallengeRequest {
                decision: Decision::Deny as i32,
                binding_code: String::new(),
                ..good.clone()
            },
            Code::PermissionDenied,
        ),
    ];
    for (r, code) in bad_requests {
        let e = app::approvals(&a)
            .answer_challenge(r)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), code, "{e:?}");
    }
    assert_eq!(get(&a, &ch.challenge_id).await.state, State::Pending as i32);
    // The forged answers are on the record (and the audit trail never holds a code).
    let auditor = common::client(env.dir.path(), "auditor", server.local_addr()).await;
    let records = common::audit_records(&auditor).await;
    let refused = records
        .iter()
        .filter(|r| r.action == "challenge.answer" && common::detail(r, "result") == "REFUSED")
        .count();
    assert_eq!(refused, 2);

    // Creation limits.
    for (text, sp, ttl) in [
        ("x".repeat(513), "SP", 0),
        ("".to_owned(), "SP", 0),
        ("bell\u{7}".to_owned(), "SP", 0),
        ("ok".to_owned(), "", 0),
        ("ok".to_owned(), "SP", 601),
    ] {
        let e = app::approvals(&a)
            .create_challenge(hsm_client::proto::CreateChallengeRequest {
                subject: "citizen-7".into(),
                text,
                service_provider: sp.into(),
                purpose: Purpose::Login as i32,
                ttl_seconds: ttl,
            })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let no_purpose = app::challenge(&a, "citizen-7", Purpose::Unspecified, "x", 0)
        .await
        .expect_err("purpose");
    assert_eq!(no_purpose.code(), Code::InvalidArgument);
    // None of those cancelled the pending challenge.
    assert_eq!(get(&a, &ch.challenge_id).await.state, State::Pending as i32);

    // Activation: bad points, bad signatures, wrong codes (five cancel).
    let begun = app::begin(&a, "citizen-8", "").await.unwrap();
    assert_eq!(begun.activation_code.len(), 8);
    let key = app::new_key();
    let complete = |code: &str, public_key: Vec<u8>, signature: Vec<u8>| {
        hsm_client::proto::CompleteActivationRequest {
            activation_id: begun.activation_id.clone(),
            activation_code: code.into(),
            public_key,
            signature,
        }
    };
    let sig = app::sign(&key, &begun.payload);
    let mut compressed = app::point(&key);
    compressed.truncate(33);
    compressed[0] = 2;
    for (r, code) in [
        (
            complete(&begun.activation_code, compressed, sig.clone()),
            Code::InvalidArgument,
        ),
        (
            complete(&begun.activation_code, vec![4; 65], sig.clone()),
            Code::InvalidArgument,
        ),
        (
            complete(&begun.activation_code, app::point(&key), vec![1, 2, 3]),
            Code::InvalidArgument,
        ),
        (
            complete("short", app::point(&key), sig.clone()),
            Code::InvalidArgument,
        ),
        (
            complete(
                &begun.activation_code,
                app::point(&app::new_key()),
                sig.clone(),
            ),
            Code::PermissionDenied,
        ),
    ] {
        let e = app::devices(&a)
            .complete_activation(r)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), code, "{e:?}");
    }
    let wrong_code = if begun.activation_code == "22222222" {
        "33333333"
    } else {
        "22222222"
    };
    for i in 1..=5 {
        let e = app::devices(&a)
            .complete_activation(complete(wrong_code, app::point(&key), sig.clone()))
            .await
            .expect_err("wrong code");
        assert_eq!(e.code(), Code::FailedPrecondition, "{i}: {e:?}");
    }
    let e = app::devices(&a)
        .complete_activation(complete(&begun.activation_code, app::point(&key), sig))
        .await
        .expect_err("cancelled after five wrong codes");
    assert!(e.message().contains("cancelled"), "{e:?}");
    let lines: Vec<String> = common::audit_records(&auditor)
        .await
        .iter()
        .map(|r| r.to_json_line())
        .collect();
    assert!(lines.iter().all(|l| !l.contains(&begun.activation_code)));
    assert!(lines
        .iter()
        .any(|l| l.contains("device.activation.complete") && l.contains("REFUSED")));

    // Listing: a replayed listing, a stale timestamp, a foreign key.
    let now = hsm_service::common::Clock::system().now();
    let r = app::list_request(&phone, now);
    app::approvals(&a)
        .list_pending_challenges(r.clone())
        .await
        .expect("first listing");
    let replay = app::approvals(&a)
        .list_pending_challenges(r)
        .await
        .expect_err("replayed listing");
    assert_eq!(replay.code(), Code::FailedPrecondition);
    let stale = app::approvals(&a)
        .list_pending_challenges(app::list_request(&phone, now - 3600))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::FailedPrecondition);

    // Oversized display name; a login service may not name a tenant.
    let e = app::devices(&a)
        .begin_activation(hsm_client::proto::BeginActivationRequest {
            subject: "citizen-9".into(),
            display_name: "x".repeat(65),
            ..Default::default()
        })
        .await
        .expect_err("long name");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = app::devices(&a)
        .list_devices(ListDevicesRequest {
            subject: "citizen-7".into(),
            tenant: "login-service-b".into(),
        })
        .await
        .expect_err("tenant for officers");
    assert_eq!(e.code(), Code::InvalidArgument);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttles_limits_and_no_code_at_rest() {
    let mut env = DevEnv::new();
    env.config.devices.max_challenges_per_minute = 3;
    env.config.devices.max_binding_failures = 2;
    env.config.devices.max_devices_per_subject = 1;
    let (server, a, _b) = start(&env).await;

    // The activation code is nowhere in the store, in any case.
    let begun = app::begin(&a, "citizen-10", "").await.unwrap();
    let code = begun.activation_code.clone();
    let rows = server
        .state()
        .store
        .read(|txn| {
            let mut all = Vec::new();
            for &t in Table::ALL {
                for (k, v) in txn.scan(t, &KeyRange::all(), 100_000).map_err(|r| r.0)? {
                    all.push(k.into_bytes());
                    all.push(v);
                }
            }
            Ok(all)
        })
        .await
        .expect("scan");
    for needle in [code.to_uppercase(), code.to_lowercase()] {
        assert!(
            !rows
                .iter()
                .any(|r| r.windows(needle.len()).any(|w| w == needle.as_bytes())),
            "activation code stored in plaintext"
        );
    }
    let (phone, _) = app::complete(&a, &begun).await.unwrap();
    // A completed activation cannot be completed again.
    let again = app::complete(&a, &begun).await.err().expect("used");
    assert_eq!(again.code(), Code::FailedPrecondition);

    // max_devices_per_subject = 1: even an officer cannot add a second.
    let officer = common::client(env.dir.path(), "officer-1", server.local_addr()).await;
    let full = app::devices(&officer)
        .begin_activation(hsm_client::proto::BeginActivationRequest {
            subject: "citizen-10".into(),
            display_name: "Tablet".into(),
            authorized_by_challenge_id: String::new(),
            tenant: "login-service".into(),
        })
        .await
        .expect_err("limit");
    assert_eq!(full.code(), Code::FailedPrecondition);
    assert!(
        full.message().contains("max_devices_per_subject"),
        "{full:?}"
    );

    // Two wrong binding codes lock approvals.
    for _ in 0..2 {
        let ch = app::challenge(&a, "citizen-10", Purpose::Login, "Log in", 0)
            .await
            .unwrap();
        let wrong = format!(
            "{:02}",
            (ch.binding_code.parse::<u32>().unwrap() + 50) % 100
        );
        let r = app::answer(&a, &phone, &ch, Decision::Approve, &wrong)
            .await
            .unwrap();
        assert_eq!(r.state, State::Cancelled as i32);
    }
    let ch = app::challenge(&a, "citizen-10", Purpose::Login, "Log in", 0)
        .await
        .unwrap();
    let locked = app::answer(&a, &phone, &ch, Decision::Approve, &ch.binding_code)
        .await
        .expect_err("locked");
    assert_eq!(locked.code(), Code::FailedPrecondition);
    assert!(locked.message().contains("locked"), "{locked:?}");

    // The fourth challenge within a minute is refused (push fatigue).
    let e = app::challenge(&a, "citizen-10", Purpose::Login, "Log in", 0)
        .await
        .expect_err("throttled");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activations_and_challenges_expire_on_the_service_clock() {
    let env = DevEnv::new();
    let start = hsm_service::common::Clock::system().now();
    let (clock, time) = hsm_service::common::Clock::manual(start);
    let server = env.start_with_clock(clock).await;
    let a = common::client(env.dir.path(), "login-service", server.local_addr()).await;

    // An activation is good for activation_ttl_seconds (600), not a second more.
    let begun = app::begin(&a, "citizen-clock", "").await.expect("begin");
    assert_eq!(begun.expires_at, start + 600);
    time.advance(600);
    let Err(e) = app::complete(&a, &begun).await else {
        panic!("an expired activation completed");
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");
    assert!(app::complete(&a, &begun).await.is_err(), "still refused");
    let devices = app::devices(&a)
        .list_devices(ListDevicesRequest {
            subject: "citizen-clock".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .devices;
    assert!(devices.is_empty(), "an expired activation made no device");

    // A fresh one completes at once; a challenge to it expires after its ttl.
    let begun = app::begin(&a, "citizen-clock", "").await.expect("begin");
    let (phone, _) = app::complete(&a, &begun).await.expect("complete");
    let ch = app::challenge(&a, "citizen-clock", Purpose::Login, "Log in", 30)
        .await
        .expect("challenge");
    assert_eq!(ch.expires_at, ch.created_at + 30);
    time.advance(30);
    let e = app::answer(&a, &phone, &ch, Decision::Approve, &ch.binding_code)
        .await
        .expect_err("expired");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(get(&a, &ch.challenge_id).await.state, State::Expired as i32);
    assert!(events(&a, "citizen-clock")
        .await
        .iter()
        .any(|e| e.kind == "challenge.expired" && e.object_id == ch.challenge_id));
    drop(server);
}
