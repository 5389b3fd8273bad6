//! Keys sign only for their purpose (issue 10, §2), and every signature is audited (§4):
//! the forged-assertion attack from the issue, each refusal, the key sets per usage, the
//! ca key's ceremony-only certificates, and the audit records of each use.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hsm_client::proto::{
    GetJwksRequest, IssueCertificateRequest, ListKeysRequest, SelfSignCertificateRequest,
    SignAssertionRequest, SignRequest,
};
use hsm_client::HsmClient;
use hsm_service::server::RunningServer;
use hsm_service::signing::{
    Algorithm, KeyRef, Usage, ASSERTION_ACTION, CERTIFICATE_ACTION, NSIS_ACR_VALUES,
    RAW_SIGNATURE_ACTION,
};
use hsm_service::testing::DevEnv;
use jsonwebtoken::jwk::JwkSet;
use serde_json::{json, Value};
use tonic::Code;

use common::{audit_records, detail, evidence_for, verify};

/// A dev service whose login-service may use `keys`, with `extra` versions created
/// (name, algorithm, usage); every one but a `ca` key is published and activated.
async fn service(
    keys: &[&str],
    extra: &[(&str, Algorithm, Usage)],
) -> (DevEnv, RunningServer, HsmClient) {
    let mut env = DevEnv::new();
    for rule in &mut env.config.clients {
        if rule.cn.as_deref() == Some("login-service") {
            rule.signing_keys = Some(keys.iter().map(|s| (*s).to_owned()).collect());
        }
    }
    let server = env.start().await;
    let signer = &server.state().signing;
    for (name, alg, usage) in extra {
        let k = signer
            .create_version(name, *alg, *usage)
            .await
            .expect("create");
        if *usage != Usage::Ca {
            signer.publish(name, k.version).await.expect("publish");
            signer.activate(name, k.version).await.expect("activate");
        }
    }
    let client = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    (env, server, client)
}

async fn key_set(client: &HsmClient, usage: &str) -> Result<JwkSet, tonic::Status> {
    let text = client
        .signing()
        .get_jwks(GetJwksRequest {
            usage: usage.into(),
        })
        .await?
        .into_inner()
        .jwks_json;
    Ok(serde_json::from_str(&text).expect("a JWK Set"))
}

fn kids(set: &JwkSet) -> Vec<String> {
    let mut k: Vec<String> = set
        .keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect();
    k.sort();
    k
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

fn raw_request(key: &str, message: &[u8]) -> SignRequest {
    SignRequest {
        key: key.into(),
        message: Some(message.to_vec()),
        ..Default::default()
    }
}

fn assertion_request(key: &str) -> SignAssertionRequest {
    SignAssertionRequest {
        key: key.into(),
        subject: "pseudonym-4711".into(),
        audience: vec!["https://bank.example".into()],
        acr: NSIS_ACR_VALUES[0].into(),
        ttl_seconds: 120,
        ..Default::default()
    }
}

/// The attack from the top of issue 10: a JWS signing input with `acr` High, any `sub`
/// and an `exp` years ahead, signed through the raw `Sign` RPC with every key the caller
/// may use. No result verifies against the default GetJwks (jsonwebtoken, as a relying
/// party), while each raw signature does verify against the raw keys' set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_signatures_never_pass_for_assertions() {
    let (_env, server, client) = service(
        &["assertion", "documents", "receipts"],
        &[("receipts", Algorithm::EdDsa, Usage::Raw)],
    )
    .await;
    let signer = &server.state().signing;
    let assertion_kid = signer.get(&KeyRef::new("assertion", 0)).expect("key").kid;
    let default_set = key_set(&client, "").await.expect("jwks");
    assert_eq!(kids(&default_set), vec![assertion_kid.clone()]);
    let raw_set = key_set(&client, "raw").await.expect("raw jwks");
    let now = hsm_service::common::Clock::system().now();
    let claims = json!({
        "iss": "https://hsm-service.dev.local",
        "sub": "anyone-at-all",
        "aud": "https://bank.example",
        "iat": now,
        "nbf": now,
        "exp": now + 3 * 366 * 86_400,
        "acr": NSIS_ACR_VALUES[1],
        "jti": "forged",
    });

    let mut forged = 0;
    for (key, alg) in [
        ("assertion", "ES256"),
        ("documents", "ES256"),
        ("receipts", "EdDSA"),
    ] {
        let raw_kid = signer.get(&KeyRef::new(key, 0)).expect("key").kid;
        // Claim the assertion key's kid (what a forger wants) and the raw key's own.
        for kid in [assertion_kid.as_str(), raw_kid.as_str()] {
            let input = format!(
                "{}.{}",
                b64(&json!({"alg": alg, "typ": "JWT", "kid": kid})),
                b64(&claims)
            );
            let signed = client
                .signing()
                .sign(raw_request(key, input.as_bytes()))
                .await;
            let signature = match signed {
                Ok(r) => r.into_inner().signature,
                Err(status) => {
                    // The assertion key never signs caller bytes.
                    assert_eq!(key, "assertion");
                    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                    continue;
                }
            };
            let jws = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signature));
            forged += 1;
            assert!(
                verify(&jws, &default_set).is_err(),
                "a raw signature by {key} passed for an assertion (kid {kid})"
            );
            // The signature itself is good: under the raw keys' set, with its own kid.
            let verified = verify(&jws, &raw_set);
            assert_eq!(
                verified.is_ok(),
                kid == raw_kid,
                "{key} kid {kid}: {verified:?}"
            );
        }
    }
    assert_eq!(forged, 4, "both raw keys signed both inputs");

    // The same over a digest of the signing input.
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": "ES256", "typ": "JWT", "kid": assertion_kid})),
        b64(&claims)
    );
    let digest = Algorithm::Es256.digest(input.as_bytes()).expect("sha-256");
    let signature = client
        .signing()
        .sign(SignRequest {
            key: String::new(),
            digest: Some(digest),
            ..Default::default()
        })
        .await
        .expect("the default raw key signs a digest")
        .into_inner()
        .signature;
    let jws = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signature));
    assert!(verify(&jws, &default_set).is_err());
    // And what the service does sign as an assertion still verifies.
    let real = common::sign_default_assertion(&client).await;
    verify(&real.jws, &default_set).expect("a real assertion verifies");
    assert!(verify(&real.jws, &raw_set).is_err());
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_signs_for_its_own_usage_only() {
    let (env, server, client) = service(
        &["assertion", "documents", "root-ca"],
        &[("root-ca", Algorithm::Es256, Usage::Ca)],
    )
    .await;
    let signer = server.state().signing.clone();
    let cases: Vec<(&str, tonic::Status, &str)> = vec![
        (
            "Sign with a signing key",
            client
                .signing()
                .sign(raw_request("assertion", b"x"))
                .await
                .expect_err("signing key"),
            "is a signing key; Sign signs with raw keys only",
        ),
        (
            "Sign with a ca key",
            client
                .signing()
                .sign(raw_request("root-ca", b"x"))
                .await
                .expect_err("ca key"),
            "is a ca key; Sign signs with raw keys only",
        ),
        (
            "SignAssertion with a raw key",
            client
                .signing()
                .sign_assertion(assertion_request("documents"))
                .await
                .expect_err("raw key"),
            "is a raw key; SignAssertion signs with signing keys only",
        ),
        (
            "SignAssertion with a ca key",
            client
                .signing()
                .sign_assertion(assertion_request("root-ca"))
                .await
                .expect_err("ca key"),
            "is a ca key; SignAssertion signs with signing keys only",
        ),
    ];
    for (name, status, text) in cases {
        assert_eq!(status.code(), Code::PermissionDenied, "{name}: {status:?}");
        assert!(
            status.message().contains(text),
            "{name}: {}",
            status.message()
        );
    }

    // One key set per usage; ca keys are in none; an unknown usage is refused.
    let kid = |name: &str| signer.get(&KeyRef::new(name, 0)).expect("key").kid;
    let default_set = key_set(&client, "").await.expect("default");
    assert_eq!(kids(&default_set), vec![kid("assertion")]);
    assert_eq!(
        kids(&key_set(&client, "signing").await.expect("signing")),
        vec![kid("assertion")]
    );
    assert_eq!(
        kids(&key_set(&client, "raw").await.expect("raw")),
        vec![kid("documents")]
    );
    assert_eq!(
        kids(&key_set(&client, "challenge").await.expect("challenge")),
        vec![kid("challenges")]
    );
    for usage in ["ca", "challenges", "RAW", " raw"] {
        let err = key_set(&client, usage).await.expect_err(usage);
        assert_eq!(err.code(), Code::InvalidArgument, "{usage}: {err:?}");
    }

    // A ca key is never published; a new version keeps its name's usage.
    let err = signer.publish("root-ca", 1).await.expect_err("publish ca");
    assert!(err.to_string().contains("never published"), "{err}");
    let err = signer
        .create_version("documents", Algorithm::Es256, Usage::Signing)
        .await
        .expect_err("usage change");
    assert!(err.to_string().contains("keeps its usage"), "{err}");

    // Officers see every version's usage.
    let officer = common::client(env.dir.path(), "officer-1", server.local_addr()).await;
    let listed: Vec<(String, String)> = officer
        .keys()
        .list_keys(ListKeysRequest {})
        .await
        .expect("list")
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.name, k.usage))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("assertion".into(), "signing".into()),
            ("challenges".into(), "challenge".into()),
            ("documents".into(), "raw".into()),
            ("root-ca".into(), "ca".into()),
        ]
    );

    // A ca key's certificates are made in a ceremony only.
    let err = officer
        .keys()
        .self_sign_certificate(SelfSignCertificateRequest {
            key: "root-ca".into(),
            version: 0,
            subject: "CN=Root,C=DK".into(),
            validity_days: 30,
            ca: true,
            dns_names: vec![],
        })
        .await
        .expect_err("direct self-sign of a ca key");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("use a key ceremony"), "{err:?}");
    let err = officer
        .keys()
        .issue_certificate(IssueCertificateRequest {
            key: "documents".into(),
            version: 0,
            issuer_key: "root-ca".into(),
            issuer_version: 0,
            subject: "CN=Documents,C=DK".into(),
            validity_days: 30,
            ca: false,
            dns_names: vec![],
        })
        .await
        .expect_err("direct issue by a ca key");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("use a key ceremony"), "{err:?}");
    assert!(signer
        .certificate_chain(&KeyRef::new("root-ca", 0))
        .expect("chain")
        .is_empty());
    server.shutdown().await.expect("shutdown");
}

const RAW_AND_CA_PLAN: &str = r#"
version = 1
description = "a raw key and a root that certifies it"

[[step]]
kind = "generate-key"
name = "receipts"
algorithm = "ES256"
usage = "raw"

[[step]]
kind = "generate-key"
name = "root-ca"
algorithm = "ES256"
usage = "ca"

[[step]]
kind = "self-sign"
key = "root-ca"
subject = "CN=Usage Test Root,C=DK"
validity_days = 365

[[step]]
kind = "issue-certificate"
issuer = "root-ca"
key = "receipts"
subject = "CN=Receipts,C=DK"
validity_days = 30
usage = "raw"

[[step]]
kind = "publish"
key = "receipts"

[[step]]
kind = "activate"
key = "receipts"
"#;

/// A ceremony makes a raw key (plan `usage = "raw"`) and certifies it with a ca key;
/// the raw key then signs through Sign only and is in the raw keys' set only. Every
/// SignAssertion, Sign and certificate has its audit record, readable right after the
/// replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremony_raw_keys_and_every_use_is_audited() {
    let (env, server, client) = service(&["assertion", "documents", "receipts"], &[]).await;
    let dir = env.dir.path();
    let addr = server.local_addr();
    let o1 = common::client(dir, "officer-1", addr).await;
    let o2 = common::client(dir, "officer-2", addr).await;
    let auditor = common::client(dir, "auditor", addr).await;

    // A raw key is never self-signed nor an issuer in a plan.
    let bad = RAW_AND_CA_PLAN.replace("key = \"root-ca\"\nsubject", "key = \"receipts\"\nsubject");
    let err = common::propose(&o1, &bad).await.expect_err("self-sign raw");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("is a raw key; only a ca key is self-signed"),
        "{err:?}"
    );

    let id = common::propose(&o1, RAW_AND_CA_PLAN)
        .await
        .expect("propose");
    common::approve_with_share(&o1, &id, "")
        .await
        .expect("approve 1");
    common::approve_with_share(&o2, &id, "")
        .await
        .expect("approve 2");
    let done = common::execute(&o2, &id).await.expect("execute");
    let info = done.ceremony.expect("ceremony");
    assert_eq!(info.state, "succeeded", "{}", info.failure);

    let signer = server.state().signing.clone();
    let receipts = signer.get(&KeyRef::new("receipts", 0)).expect("receipts");
    assert_eq!(receipts.usage, Usage::Raw);
    assert_eq!(
        signer.get(&KeyRef::new("root-ca", 0)).expect("ca").usage,
        Usage::Ca
    );
    assert_eq!(receipts.certificate_chain.len(), 2);
    assert!(kids(&key_set(&client, "raw").await.expect("raw")).contains(&receipts.kid));
    assert!(!kids(&key_set(&client, "").await.expect("default")).contains(&receipts.kid));
    let err = client
        .signing()
        .sign_assertion(assertion_request("receipts"))
        .await
        .expect_err("raw key");
    assert_eq!(err.code(), Code::PermissionDenied);

    // N assertions, each bound to fresh evidence; M raw signatures (message and digest).
    let mut jtis = Vec::new();
    for _ in 0..5 {
        let evidence_id = evidence_for(&client, "pseudonym-4711").await;
        let r = client
            .signing()
            .sign_assertion(SignAssertionRequest {
                evidence_id: evidence_id.clone(),
                ..assertion_request("")
            })
            .await
            .expect("assertion")
            .into_inner();
        let payload = r.jws.split('.').nth(1).expect("payload");
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json");
        jtis.push((
            claims["jti"].as_str().expect("jti").to_owned(),
            r.kid,
            r.expires_at,
            evidence_id,
        ));
    }
    let messages: [&[u8]; 3] = [b"receipt 1", b"receipt 2", b""];
    for m in messages {
        client
            .signing()
            .sign(raw_request("receipts", m))
            .await
            .expect("raw");
    }
    let digest = vec![0xab; 32];
    let by_digest = client
        .signing()
        .sign(SignRequest {
            key: "documents".into(),
            digest: Some(digest.clone()),
            ..Default::default()
        })
        .await
        .expect("digest")
        .into_inner();

    let records = audit_records(&auditor).await;
    let assertions: Vec<_> = records
        .iter()
        .filter(|r| r.action == ASSERTION_ACTION)
        .collect();
    assert_eq!(assertions.len(), jtis.len());
    for (r, (jti, kid, exp, evidence_id)) in assertions.iter().zip(&jtis) {
        assert_eq!(&r.object, jti);
        assert_eq!(detail(r, "kid"), kid);
        assert_eq!(
            r.details
                .as_ref()
                .and_then(|d| d.get("exp"))
                .and_then(|v| v.as_u64()),
            Some(*exp)
        );
        assert_eq!(detail(r, "acr"), NSIS_ACR_VALUES[0]);
        assert_eq!(detail(r, "subject"), "pseudonym-4711");
        assert_eq!(detail(r, "tenant"), "login-service");
        assert_eq!(detail(r, "evidence_id"), evidence_id);
        assert_eq!(r.actor.subject, "login-service");
    }
    let raw: Vec<_> = records
        .iter()
        .filter(|r| r.action == RAW_SIGNATURE_ACTION)
        .collect();
    assert_eq!(raw.len(), messages.len() + 1);
    for (r, m) in raw.iter().zip(messages) {
        assert_eq!(r.object, receipts.kid);
        assert_eq!(detail(r, "input"), "message");
        assert_eq!(detail(r, "sha256"), hsm_service::audit::sha256_hex(m));
    }
    let last = raw.last().expect("digest record");
    assert_eq!(last.object, by_digest.kid);
    assert_eq!(detail(last, "input"), "digest");
    assert_eq!(
        detail(last, "sha256"),
        hsm_service::audit::sha256_hex(&digest)
    );

    // Both certificates of the ceremony: serial, subject, issuer kid, ceremony id.
    let root = signer.get(&KeyRef::new("root-ca", 0)).expect("root");
    let certificates: Vec<_> = records
        .iter()
        .filter(|r| r.action == CERTIFICATE_ACTION)
        .collect();
    assert_eq!(certificates.len(), 2);
    for (r, (object, der, subject)) in certificates.iter().zip([
        (
            "root-ca/v1",
            &root.certificate_chain[0],
            "CN=Usage Test Root,C=DK",
        ),
        (
            "receipts/v1",
            &receipts.certificate_chain[0],
            "CN=Receipts,C=DK",
        ),
    ]) {
        use x509_cert::der::Decode;
        let cert = x509_cert::Certificate::from_der(der).expect("certificate");
        let serial = hsm_service::common::hex(cert.tbs_certificate().serial_number().as_bytes());
        assert_eq!(r.object, object);
        assert_eq!(detail(r, "serial"), serial);
        assert_eq!(detail(r, "subject"), subject);
        assert_eq!(detail(r, "issuer_kid"), root.kid);
        assert_eq!(detail(r, "ceremony"), id);
        assert_eq!(r.actor.subject, "officer-2");
    }
    server.shutdown().await.expect("shutdown");
}
