//! Tenant separation over mTLS with the dev clients `login-service` (tenant A) and
//! `login-service-b` (tenant B): B cannot see, verify, resync, change or delete A's
//! credential (NOT_FOUND, word for word the answer for an id nobody holds), lists only
//! its own, and both can hold id `x`; officers see every tenant and name the one they
//! act on.

mod common;

use hsm_client::proto as pb;
use hsm_client::HsmClient;
use hsm_service::testing::DevEnv;
use tonic::Code;

async fn list(c: &HsmClient, tenant: &str, page_size: u32) -> Vec<pb::Credential> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .credentials()
            .list_credentials(pb::ListCredentialsRequest {
                page_size,
                page_token: token,
                tenant: tenant.into(),
            })
            .await
            .expect("list")
            .into_inner();
        out.extend(page.credentials);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

fn ids(creds: &[pb::Credential]) -> Vec<(String, String)> {
    creds
        .iter()
        .map(|c| (c.tenant.clone(), c.credential_id.clone()))
        .collect()
}

/// Every credential RPC a login service may call on `id`, as B would try them on A's.
async fn every_call(c: &HsmClient, id: &str) -> Vec<(&'static str, tonic::Status)> {
    let mut creds = c.credentials();
    let code = common::hotp(common::EVIDENCE_SEED, 0);
    let mut out = Vec::new();
    let get = creds
        .get_credential(pb::GetCredentialRequest {
            credential_id: id.into(),
            tenant: String::new(),
        })
        .await;
    out.push(("get", get.expect_err("get")));
    let verify = creds
        .verify_code(pb::VerifyCodeRequest {
            credential_id: id.into(),
            code: code.clone(),
        })
        .await;
    out.push(("verify", verify.expect_err("verify")));
    let resync = creds
        .resync_credential(pb::ResyncCredentialRequest {
            credential_id: id.into(),
            code1: code.clone(),
            code2: common::hotp(common::EVIDENCE_SEED, 1),
        })
        .await;
    out.push(("resync", resync.expect_err("resync")));
    for (name, action) in [
        ("disable", pb::CredentialAction::Disable),
        ("enable", pb::CredentialAction::Enable),
    ] {
        let r = creds
            .update_credential_state(pb::UpdateCredentialStateRequest {
                credential_id: id.into(),
                action: action as i32,
                tenant: String::new(),
            })
            .await;
        out.push((name, r.expect_err(name)));
    }
    let delete = creds
        .delete_credential(pb::DeleteCredentialRequest {
            credential_id: id.into(),
            tenant: String::new(),
        })
        .await;
    out.push(("delete", delete.expect_err("delete")));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_b_cannot_see_or_touch_tenant_a_credentials() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let a = common::client(env.dir.path(), "login-service", addr).await;
    let b = common::client(env.dir.path(), "login-service-b", addr).await;
    let officer = common::client(env.dir.path(), "officer-1", addr).await;

    common::enrol(&a, "x", "citizen-a").await;
    common::enrol(&a, "only-a", "").await;
    // B may hold the same id: its own credential.
    common::enrol(&b, "x", "citizen-b").await;

    // B on A's "only-a" gets exactly what it gets for an id nobody holds.
    let foreign = every_call(&b, "only-a").await;
    let missing = every_call(&b, "only-a-missing").await;
    for ((name, f), (_, m)) in foreign.iter().zip(&missing) {
        assert_eq!(f.code(), Code::NotFound, "{name}: {}", f.message());
        assert_eq!(
            f.message().replace("only-a", "ID"),
            m.message().replace("only-a-missing", "ID"),
            "{name}"
        );
    }
    // A's credential is untouched by all of it: its first code is still unused.
    let r = common::verify_hotp(&a, "only-a", 0).await;
    assert_eq!(r.result, pb::VerifyResult::Accepted as i32);
    let got = a
        .credentials()
        .get_credential(pb::GetCredentialRequest {
            credential_id: "only-a".into(),
            tenant: String::new(),
        })
        .await
        .expect("A sees its own")
        .into_inner();
    assert_eq!((got.tenant.as_str(), got.failures), ("login-service", 0));
    assert_eq!(got.state, pb::CredentialState::Active as i32);

    // Both "x" are separate: B's code and A's code each verify in their own tenant, and
    // each carries its own subject.
    let rb = common::verify_hotp(&b, "x", 0).await;
    assert_eq!(rb.result, pb::VerifyResult::Accepted as i32);
    let ra = common::verify_hotp(&a, "x", 0).await;
    assert_eq!(
        ra.result,
        pb::VerifyResult::Accepted as i32,
        "not a replay of B's"
    );
    assert_ne!(ra.evidence_id, rb.evidence_id);

    // Listings: each login service its own (paged), officers every tenant.
    assert_eq!(
        ids(&list(&a, "", 1).await),
        [
            ("login-service".into(), "only-a".into()),
            ("login-service".into(), "x".into())
        ]
    );
    let bs = list(&b, "", 100).await;
    assert_eq!(ids(&bs), [("login-service-b".into(), "x".into())]);
    assert_eq!(bs[0].subject, "citizen-b");
    assert_eq!(
        ids(&list(&officer, "", 2).await),
        [
            ("login-service".into(), "only-a".into()),
            ("login-service".into(), "x".into()),
            ("login-service-b".into(), "x".into())
        ],
        "every tenant, paged across the tenant boundary"
    );
    assert_eq!(ids(&list(&officer, "login-service-b", 1).await), ids(&bs));

    // A login service cannot name a tenant, not even to read B's.
    let err = a
        .credentials()
        .list_credentials(pb::ListCredentialsRequest {
            tenant: "login-service-b".into(),
            ..Default::default()
        })
        .await
        .expect_err("tenant is for officers");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = a
        .credentials()
        .get_credential(pb::GetCredentialRequest {
            credential_id: "x".into(),
            tenant: "login-service-b".into(),
        })
        .await
        .expect_err("tenant is for officers");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Officers name the tenant of the credential they act on.
    let mut oc = officer.credentials();
    let err = oc
        .get_credential(pb::GetCredentialRequest {
            credential_id: "x".into(),
            tenant: String::new(),
        })
        .await
        .expect_err("officers must name the tenant");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tenant"), "{}", err.message());
    let got = oc
        .get_credential(pb::GetCredentialRequest {
            credential_id: "x".into(),
            tenant: "login-service-b".into(),
        })
        .await
        .expect("officer reads B's x")
        .into_inner();
    assert_eq!(
        (got.tenant.as_str(), got.subject.as_str()),
        ("login-service-b", "citizen-b")
    );
    oc.delete_credential(pb::DeleteCredentialRequest {
        credential_id: "x".into(),
        tenant: "login-service-b".into(),
    })
    .await
    .expect("officer deletes B's x");
    assert!(list(&b, "", 100).await.is_empty());
    assert_eq!(list(&a, "", 100).await.len(), 2, "A's x is still there");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_tenant_is_shared_by_its_rules() {
    let mut env = DevEnv::new();
    for rule in &mut env.config.clients {
        if rule
            .cn
            .as_deref()
            .is_some_and(|cn| cn.starts_with("login-service"))
        {
            rule.tenant = Some("bank-1".into());
        }
    }
    let server = env.start().await;
    let addr = server.local_addr();
    let a = common::client(env.dir.path(), "login-service", addr).await;
    let b = common::client(env.dir.path(), "login-service-b", addr).await;
    common::enrol(&a, "shared", "citizen-1").await;
    // Another certificate of the same tenant (e.g. a rollover) acts on it.
    let r = common::verify_hotp(&b, "shared", 0).await;
    assert_eq!(r.result, pb::VerifyResult::Accepted as i32);
    assert_eq!(
        ids(&list(&a, "", 10).await),
        [("bank-1".into(), "shared".into())]
    );
    server.shutdown().await.expect("shutdown");
}
