//! Assertion signing end to end: the real server on 127.0.0.1:0, the real client, and
//! independent verifiers (jsonwebtoken against the JWKS, the RustCrypto crates, openssl).

mod common;

use std::collections::HashMap;
use std::process::Command;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hsm_client::proto::{
    CreateCsrRequest, GetCertificateChainRequest, GetJwksRequest, IssueCertificateRequest,
    ListKeysRequest, SelfSignCertificateRequest, SignAssertionRequest, SignRequest,
    SignatureAlgorithm, SignatureEncoding,
};
use hsm_client::HsmClient;
use hsm_service::server::RunningServer;
use hsm_service::signing::{Algorithm, KeyRef, KeyState, Usage, NSIS_ACR_VALUES};
use hsm_service::testing::DevEnv;
use jsonwebtoken::jwk::JwkSet;
use serde_json::Value;
use tonic::Code;

const SUBSTANTIAL: &str = NSIS_ACR_VALUES[0];
const HIGH: &str = NSIS_ACR_VALUES[1];

/// A dev service whose login-service may use `keys`, with `extra` versions created,
/// published and activated (name, algorithm, usage). These tests are about signing
/// itself, so the login service may sign unbound assertions (tests/evidence.rs binds
/// them).
async fn service(
    keys: Option<&[&str]>,
    extra: &[(&str, Algorithm, Usage)],
) -> (DevEnv, RunningServer, HsmClient) {
    let mut env = DevEnv::new();
    env.allow_unbound_assertions("login-service");
    for rule in &mut env.config.clients {
        if rule.cn.as_deref() == Some("login-service") {
            rule.signing_keys = keys.map(|k| k.iter().map(|s| (*s).to_owned()).collect());
        }
    }
    let server = env.start().await;
    let signer = &server.state().signing;
    for (name, alg, usage) in extra {
        let k = signer
            .create_version(name, *alg, *usage)
            .await
            .expect("create");
        signer.publish(name, k.version).await.expect("publish");
        signer.activate(name, k.version).await.expect("activate");
    }
    let client = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    (env, server, client)
}

fn request(key: &str) -> SignAssertionRequest {
    SignAssertionRequest {
        key: key.to_owned(),
        subject: "pseudonym-4711".into(),
        audience: vec!["https://bank.example".into()],
        nonce: "n-0S6_WzA2Mj".into(),
        acr: SUBSTANTIAL.into(),
        amr: vec!["pwd".into(), "otp".into()],
        ttl_seconds: 120,
        auth_time: 0,
        extra_claims_json: r#"{"loa":"substantial","cpr_verified":true}"#.into(),
        evidence_id: String::new(),
    }
}

use common::{jwks, verify};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assertions_verify_with_an_independent_jwt_library_for_every_algorithm() {
    let (_env, server, client) = service(
        Some(&["assertion", "es384", "eddsa", "ps256"]),
        &[
            ("es384", Algorithm::Es384, Usage::Signing),
            ("eddsa", Algorithm::EdDsa, Usage::Signing),
            ("ps256", Algorithm::Ps256, Usage::Signing),
        ],
    )
    .await;
    let set = jwks(&client).await;
    assert_eq!(set.keys.len(), 4);
    for (key, alg) in [
        ("", "ES256"),
        ("es384", "ES384"),
        ("eddsa", "EdDSA"),
        ("ps256", "PS256"),
    ] {
        let reply = client
            .signing()
            .sign_assertion(request(key))
            .await
            .expect("sign")
            .into_inner();
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(reply.jws.split('.').next().expect("header"))
                .expect("base64url"),
        )
        .expect("json");
        assert_eq!(header["alg"], alg);
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], reply.kid.as_str());

        let claims = verify(&reply.jws, &set).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(claims["sub"], "pseudonym-4711");
        assert_eq!(claims["acr"], SUBSTANTIAL);
        assert_eq!(claims["amr"], serde_json::json!(["pwd", "otp"]));
        assert_eq!(claims["nonce"], "n-0S6_WzA2Mj");
        assert_eq!(claims["loa"], "substantial");
        assert_eq!(claims["cpr_verified"], true);
        assert_eq!(claims["exp"], reply.expires_at);
        let iat = claims["iat"].as_u64().expect("iat");
        assert_eq!(reply.expires_at - iat, 120);
        assert_eq!(claims["nbf"], iat);
        assert_eq!(claims["auth_time"], iat, "auth_time defaults to now");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(claims["jti"].as_str().expect("jti"))
                .expect("jti")
                .len(),
            16
        );

        // A changed payload no longer verifies.
        let mut parts: Vec<String> = reply.jws.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&serde_json::json!({"sub": "someone-else"})).expect("json"));
        assert!(verify(&parts.join("."), &set).is_err(), "{alg}: forged");
    }

    // Two assertions never share a jti.
    let a = client
        .signing()
        .sign_assertion(request(""))
        .await
        .expect("a");
    let b = client
        .signing()
        .sign_assertion(request(""))
        .await
        .expect("b");
    let jti = |r: &str| verify(r, &set).expect("verify")["jti"].clone();
    assert_ne!(jti(&a.into_inner().jws), jti(&b.into_inner().jws));

    // The expiry mark is durable and covers what was signed.
    let k = server
        .state()
        .signing
        .get(&KeyRef::new("assertion", 0))
        .expect("key");
    assert!(k.last_expiry >= hsm_service::common::Clock::system().now() + 120);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_forbidden_assertion_requests_are_rejected() {
    let (env, server, client) = service(Some(&["assertion", "missing"]), &[]).await;
    type Mutation = Box<dyn Fn(&mut SignAssertionRequest)>;
    let cases: Vec<(&str, Mutation, Code, &str)> = vec![
        (
            "reserved claim override",
            Box::new(|r| r.extra_claims_json = r#"{"sub":"admin"}"#.into()),
            Code::InvalidArgument,
            "reserved claim \"sub\"",
        ),
        (
            "reserved claim iss",
            Box::new(|r| r.extra_claims_json = r#"{"iss":"https://evil"}"#.into()),
            Code::InvalidArgument,
            "reserved claim \"iss\"",
        ),
        (
            "key not granted",
            Box::new(|r| r.key = "other".into()),
            Code::PermissionDenied,
            "may not sign with key \"other\"",
        ),
        (
            "granted key that does not exist",
            Box::new(|r| r.key = "missing".into()),
            Code::InvalidArgument,
            "no signing key named \"missing\"",
        ),
        (
            "acr not configured",
            Box::new(|r| r.acr = "https://data.gov.dk/concept/core/nsis/Low".into()),
            Code::InvalidArgument,
            "is not an accepted value",
        ),
        (
            "empty acr",
            Box::new(|r| r.acr = String::new()),
            Code::InvalidArgument,
            "acr must not be empty",
        ),
        (
            "ttl too long",
            Box::new(|r| r.ttl_seconds = 3601),
            Code::InvalidArgument,
            "exceeds the maximum of 3600",
        ),
        (
            "empty subject",
            Box::new(|r| r.subject = String::new()),
            Code::InvalidArgument,
            "subject must not be empty",
        ),
        (
            "extra claims not JSON",
            Box::new(|r| r.extra_claims_json = "{not json".into()),
            Code::InvalidArgument,
            "extra_claims_json is not valid JSON",
        ),
        (
            "extra claims not an object",
            Box::new(|r| r.extra_claims_json = "[1,2]".into()),
            Code::InvalidArgument,
            "extra_claims_json must be a JSON object",
        ),
        (
            "empty audience entry",
            Box::new(|r| r.audience = vec![String::new()]),
            Code::InvalidArgument,
            "audience entries must not be empty",
        ),
        (
            "auth_time in the future",
            Box::new(|r| r.auth_time = hsm_service::common::Clock::system().now() + 3600),
            Code::InvalidArgument,
            "auth_time",
        ),
        (
            "auth_time too old",
            Box::new(|r| r.auth_time = 1_000_000_000),
            Code::InvalidArgument,
            "auth_time",
        ),
        (
            "subject too long",
            Box::new(|r| r.subject = "x".repeat(2000)),
            Code::InvalidArgument,
            "subject is 2000 bytes",
        ),
    ];
    for (name, mutate, code, text) in cases {
        let mut r = request("");
        mutate(&mut r);
        let err = client.signing().sign_assertion(r).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(err.message().contains(text), "{name}: {}", err.message());
    }
    // The untouched request works, so each refusal above is due to its one change.
    client
        .signing()
        .sign_assertion(request(""))
        .await
        .expect("valid request");

    // Roles: an officer may read the JWKS but not sign.
    let officer = common::client(env.dir.path(), "officer-1", server.local_addr()).await;
    let err = officer
        .signing()
        .sign_assertion(request(""))
        .await
        .expect_err("officer may not sign");
    assert_eq!(err.code(), Code::PermissionDenied);
    officer
        .signing()
        .get_jwks(GetJwksRequest::default())
        .await
        .expect("anyone reads the JWKS");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acr_is_limited_per_client() {
    let mut env = DevEnv::new();
    env.allow_unbound_assertions("login-service");
    for rule in &mut env.config.clients {
        if rule.cn.as_deref() == Some("login-service") {
            rule.acr = Some(vec![SUBSTANTIAL.to_owned()]);
        }
    }
    let server = env.start().await;
    let client = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    client
        .signing()
        .sign_assertion(request(""))
        .await
        .expect("substantial is granted");
    let mut high = request("");
    high.acr = HIGH.into();
    let err = client
        .signing()
        .sign_assertion(high)
        .await
        .expect_err("high is not granted");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("may not assert acr"),
        "{}",
        err.message()
    );
    server.shutdown().await.expect("shutdown");
}

fn sign_request(key: &str) -> SignRequest {
    SignRequest {
        key: key.into(),
        message: Some(b"detached document".to_vec()),
        digest: None,
        algorithm: 0,
        encoding: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_signatures_verify_independently() {
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    let (_env, server, client) = service(
        Some(&["documents", "es384", "eddsa", "ps256"]),
        &[
            ("es384", Algorithm::Es384, Usage::Raw),
            ("eddsa", Algorithm::EdDsa, Usage::Raw),
            ("ps256", Algorithm::Ps256, Usage::Raw),
        ],
    )
    .await;
    let message = b"detached document".to_vec();
    let spki = |name: &str| {
        server
            .state()
            .signing
            .get(&KeyRef::new(name, 0))
            .expect("key")
            .public_key_der
    };

    // ES256 (the default raw key): message (raw and DER) and digest.
    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki("documents")).expect("p256");
    let raw = client
        .signing()
        .sign(sign_request(""))
        .await
        .expect("sign")
        .into_inner();
    assert_eq!(raw.algorithm, SignatureAlgorithm::Es256 as i32);
    assert_eq!(raw.encoding, SignatureEncoding::Raw as i32);
    assert_eq!(raw.signature.len(), 64);
    let sig = p256::ecdsa::Signature::from_slice(&raw.signature).expect("raw r||s");
    vk.verify(&message, &sig).expect("ES256 raw verifies");
    assert!(vk.verify(b"another document", &sig).is_err());

    let mut der = sign_request("");
    der.encoding = SignatureEncoding::Der as i32;
    let der = client.signing().sign(der).await.expect("der").into_inner();
    assert_eq!(der.encoding, SignatureEncoding::Der as i32);
    let sig = p256::ecdsa::DerSignature::from_bytes(&der.signature).expect("strict DER");
    vk.verify(&message, &sig).expect("ES256 DER verifies");

    let mut digest = sign_request("");
    digest.message = None;
    digest.digest = Some(
        ring::digest::digest(&ring::digest::SHA256, &message)
            .as_ref()
            .to_vec(),
    );
    digest.algorithm = SignatureAlgorithm::Es256 as i32;
    let d = client
        .signing()
        .sign(digest)
        .await
        .expect("digest")
        .into_inner();
    let sig = p256::ecdsa::Signature::from_slice(&d.signature).expect("raw");
    vk.verify(&message, &sig)
        .expect("ES256 over a digest verifies");

    // ES384 over a digest, DER.
    let vk = p384::ecdsa::VerifyingKey::from_public_key_der(&spki("es384")).expect("p384");
    let mut r = sign_request("es384");
    r.message = None;
    r.digest = Some(
        ring::digest::digest(&ring::digest::SHA384, &message)
            .as_ref()
            .to_vec(),
    );
    r.encoding = SignatureEncoding::Der as i32;
    let s = client.signing().sign(r).await.expect("es384").into_inner();
    let sig = p384::ecdsa::DerSignature::from_bytes(&s.signature).expect("DER");
    vk.verify(&message, &sig).expect("ES384 verifies");

    // EdDSA over the whole message.
    let spki_ed = spki("eddsa");
    let vk = ed25519_dalek::VerifyingKey::from_bytes(
        spki_ed[spki_ed.len() - 32..].try_into().expect("32 bytes"),
    )
    .expect("ed25519");
    let s = client
        .signing()
        .sign(sign_request("eddsa"))
        .await
        .expect("eddsa")
        .into_inner();
    let sig = ed25519_dalek::Signature::from_slice(&s.signature).expect("64 bytes");
    vk.verify_strict(&message, &sig).expect("EdDSA verifies");

    // PS256.
    let vk = <rsa::PublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(&spki("ps256"))
        .expect("rsa");
    let s = client
        .signing()
        .sign(sign_request("ps256"))
        .await
        .expect("ps256")
        .into_inner();
    assert_eq!(s.signature.len(), 384);
    vk.pss_verify::<rsa::sha2::Sha256>(&message, &s.signature)
        .expect("PS256 verifies");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_raw_signing_requests_are_rejected() {
    let (_env, server, client) = service(
        Some(&["documents", "eddsa"]),
        &[("eddsa", Algorithm::EdDsa, Usage::Raw)],
    )
    .await;
    type Mutation = Box<dyn Fn(&mut SignRequest)>;
    let cases: Vec<(&str, Mutation, Code, &str)> = vec![
        (
            "both message and digest",
            Box::new(|r| r.digest = Some(vec![0; 32])),
            Code::InvalidArgument,
            "not both",
        ),
        (
            "neither message nor digest",
            Box::new(|r| r.message = None),
            Code::InvalidArgument,
            "exactly one of message and digest",
        ),
        (
            "wrong digest length",
            Box::new(|r| {
                r.message = None;
                r.digest = Some(vec![0; 31]);
            }),
            Code::InvalidArgument,
            "digest must be 32 bytes for ES256, got 31",
        ),
        (
            "digest for EdDSA",
            Box::new(|r| {
                r.key = "eddsa".into();
                r.message = None;
                r.digest = Some(vec![0; 32]);
            }),
            Code::InvalidArgument,
            "EdDSA signs whole messages",
        ),
        (
            "DER for EdDSA",
            Box::new(|r| {
                r.key = "eddsa".into();
                r.encoding = SignatureEncoding::Der as i32;
            }),
            Code::InvalidArgument,
            "DER encoding applies to ECDSA",
        ),
        (
            "algorithm not the key's",
            Box::new(|r| r.algorithm = SignatureAlgorithm::Ps256 as i32),
            Code::InvalidArgument,
            "algorithm PS256 does not match key \"documents\"",
        ),
        (
            "unknown algorithm value",
            Box::new(|r| r.algorithm = 99),
            Code::InvalidArgument,
            "algorithm: unknown value 99",
        ),
        (
            "unknown encoding value",
            Box::new(|r| r.encoding = 7),
            Code::InvalidArgument,
            "encoding: unknown value 7",
        ),
        (
            // Beyond SigningService's decode limit (server.limits.max_signing_request_bytes),
            // refused before the message is read.
            "message too long",
            Box::new(|r| r.message = Some(vec![0; hsm_service::signing::MAX_MESSAGE_LEN + 1])),
            Code::ResourceExhausted,
            "message length too large",
        ),
        (
            "key not granted",
            Box::new(|r| r.key = "ps256".into()),
            Code::PermissionDenied,
            "may not sign with key",
        ),
    ];
    for (name, mutate, code, text) in cases {
        let mut r = sign_request("");
        mutate(&mut r);
        let err = client.signing().sign(r).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(err.message().contains(text), "{name}: {}", err.message());
    }
    client
        .signing()
        .sign(sign_request(""))
        .await
        .expect("the untouched request works");
    server.shutdown().await.expect("shutdown");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_publishes_first_keeps_the_old_key_and_destroys_it_on_the_token() {
    let (env, server, client) = service(None, &[]).await;
    let signer = server.state().signing.clone();
    let hsm = server.state().hsm.clone();
    let v1 = signer.get(&KeyRef::new("assertion", 0)).expect("v1");
    assert_eq!((v1.version, v1.state), (1, KeyState::Active));
    let old = client
        .signing()
        .sign_assertion(request(""))
        .await
        .expect("v1 signs")
        .into_inner();
    assert_eq!(old.kid, v1.kid);

    // A new version is pending, then published: in the JWKS, not yet signing.
    let v2 = signer
        .create_version("assertion", Algorithm::Es256, Usage::Signing)
        .await
        .expect("v2");
    assert_eq!((v2.version, v2.state), (2, KeyState::Pending));
    assert_eq!(kids(&jwks(&client).await), vec![v1.kid.clone()]);
    let err = signer
        .activate("assertion", 2)
        .await
        .expect_err("not published");
    assert!(err.to_string().contains("must be published"), "{err}");
    signer.publish("assertion", 2).await.expect("publish");
    let mut both = vec![v1.kid.clone(), v2.kid.clone()];
    both.sort();
    assert_eq!(kids(&jwks(&client).await), both);
    let r = client
        .signing()
        .sign_assertion(request(""))
        .await
        .expect("sign");
    assert_eq!(r.into_inner().kid, v1.kid, "published is not signing yet");

    // Activating v2 retires v1 to verify-only; both stay in the JWKS.
    signer.activate("assertion", 2).await.expect("activate");
    let v1_now = signer.get(&KeyRef::new("assertion", 1)).expect("v1");
    assert_eq!(v1_now.state, KeyState::VerifyOnly);
    assert!(v1_now.retired_at > 0);
    let new = client
        .signing()
        .sign_assertion(request(""))
        .await
        .expect("v2 signs")
        .into_inner();
    assert_eq!(new.kid, v2.kid);
    let set = jwks(&client).await;
    assert_eq!(kids(&set), both);
    verify(&old.jws, &set).expect("the old assertion still verifies");
    verify(&new.jws, &set).expect("the new assertion verifies");

    // The active version cannot be destroyed; v1 not while its assertions may be valid.
    let err = signer
        .destroy("assertion", 2, false)
        .await
        .expect_err("active");
    assert!(err.to_string().contains("is active"), "{err}");
    let err = signer
        .destroy("assertion", 1, false)
        .await
        .expect_err("in use");
    assert!(err.to_string().contains("may be valid until"), "{err}");
    assert_eq!(
        hsm.count_objects_with_id(&v1.key_id).await.expect("count"),
        2
    );

    // Forced (as for a compromised key): gone from the JWKS and from the token.
    let destroyed = signer.destroy("assertion", 1, true).await.expect("destroy");
    assert_eq!(destroyed.state, KeyState::Destroyed);
    assert_eq!(
        hsm.count_objects_with_id(&v1.key_id).await.expect("count"),
        0
    );
    let set = jwks(&client).await;
    assert_eq!(kids(&set), vec![v2.kid.clone()]);
    assert!(
        verify(&old.jws, &set).is_err(),
        "no key left for the old kid"
    );

    // A version that never signed needs no force; the list keeps the history.
    let v3 = signer
        .create_version("assertion", Algorithm::EdDsa, Usage::Signing)
        .await
        .expect("v3");
    signer
        .destroy("assertion", 3, false)
        .await
        .expect("destroy unused");
    assert_eq!(
        hsm.count_objects_with_id(&v3.key_id).await.expect("count"),
        0
    );
    let officer = common::client(env.dir.path(), "officer-1", server.local_addr()).await;
    let listed = officer
        .keys()
        .list_keys(ListKeysRequest {})
        .await
        .expect("list")
        .into_inner()
        .keys;
    let states: Vec<(u32, &str)> = listed
        .iter()
        .filter(|k| k.name == "assertion")
        .map(|k| (k.version, k.state.as_str()))
        .collect();
    assert_eq!(
        states,
        vec![(1, "destroyed"), (2, "active"), (3, "destroyed")]
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_a_restart_and_dev_bootstrap_runs_once() {
    let mut env = DevEnv::new();
    env.allow_unbound_assertions("login-service");
    let server = env.start().await;
    let before = server.state().signing.list(None);
    let made: Vec<(&str, KeyState, Usage)> = before
        .iter()
        .map(|k| (k.name.as_str(), k.state, k.usage))
        .collect();
    assert_eq!(
        made,
        vec![
            ("assertion", KeyState::Active, Usage::Signing),
            ("challenges", KeyState::Active, Usage::Challenge),
            ("documents", KeyState::Active, Usage::Raw)
        ],
        "dev mode created the default assertion, challenge and raw keys"
    );
    for k in &before {
        let facts = server
            .state()
            .hsm
            .private_key_facts(&k.key_id)
            .await
            .expect("facts");
        assert!(facts.token && facts.sensitive && facts.sign);
        assert!(!facts.extractable && !facts.decrypt);
    }
    server.shutdown().await.expect("shutdown");

    let server = env.start().await;
    assert_eq!(server.state().signing.list(None), before);
    let client = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    let r = client
        .signing()
        .sign_assertion(request(""))
        .await
        .expect("signs after restart")
        .into_inner();
    assert_eq!(r.kid, before[0].kid);
    verify(&r.jws, &jwks(&client).await).expect("verifies");
    server.shutdown().await.expect("shutdown");
}

/// The shape of a CertificateResponse, from a chain the signer returned.
fn hsm_service_leaf(chain_der: Vec<Vec<u8>>) -> hsm_client::proto::CertificateResponse {
    hsm_client::proto::CertificateResponse {
        certificate_der: chain_der[0].clone(),
        chain_der,
    }
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_verifies_the_csr_and_a_two_level_chain() {
    let (env, server, login) = service(None, &[]).await;
    // A CA key in the HSM: generated, never published (it signs certificates, not JWTs).
    let signer = server.state().signing.clone();
    signer
        .create_version("root-ca", Algorithm::Es384, Usage::Ca)
        .await
        .expect("CA key");
    let officer = common::client(env.dir.path(), "officer-1", server.local_addr()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, label: &str, der: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, hsm_service::pki::to_pem(label, der)).expect("write");
        path.to_str().expect("utf-8").to_owned()
    };

    let csr = officer
        .keys()
        .create_csr(CreateCsrRequest {
            key: String::new(),
            version: 0,
            subject: "CN=Assertions,O=hsm-service dev,C=DK".into(),
        })
        .await
        .expect("csr")
        .into_inner()
        .csr_der;
    let path = write("req.pem", "CERTIFICATE REQUEST", &csr);
    let (ok, out) = openssl(&["req", "-in", &path, "-verify", "-noout", "-subject"]);
    assert!(ok && out.contains("verify OK"), "{out}");
    assert!(out.contains("CN = Assertions"), "{out}");

    // The ca key signs only inside a ceremony: the direct RPCs refuse it.
    let root_request = SelfSignCertificateRequest {
        key: "root-ca".into(),
        version: 0,
        subject: "CN=Dev Root,O=hsm-service dev,C=DK".into(),
        validity_days: 3650,
        ca: true,
        dns_names: vec![],
    };
    let leaf_request = IssueCertificateRequest {
        key: "assertion".into(),
        version: 0,
        issuer_key: "root-ca".into(),
        issuer_version: 0,
        subject: "CN=Assertions,O=hsm-service dev,C=DK".into(),
        validity_days: 365,
        ca: false,
        dns_names: vec!["idp.dev.local".into()],
    };
    let err = officer
        .keys()
        .self_sign_certificate(root_request.clone())
        .await
        .expect_err("a ca key outside a ceremony");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("use a key ceremony"),
        "{}",
        err.message()
    );

    // What the ceremony steps self-sign and issue-certificate do.
    let by = hsm_service::signing::Issuance::Ceremony {
        id: "test-ceremony".into(),
        actor: hsm_service::audit::Actor::new("officer-1", ""),
    };
    let cert_request = |subject: &str, days: u32, ca: bool, dns: Vec<String>| {
        hsm_service::signing::CertificateRequest {
            subject: subject.into(),
            validity_days: days,
            is_ca: ca,
            dns_names: dns,
        }
    };
    let root = signer
        .self_sign(
            &KeyRef::new("root-ca", 0),
            &cert_request(&root_request.subject, 3650, true, vec![]),
            &by,
        )
        .await
        .expect("root in a ceremony");
    let err = officer
        .keys()
        .issue_certificate(leaf_request.clone())
        .await
        .expect_err("issuing is a ca key's signature");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("use a key ceremony"),
        "{}",
        err.message()
    );
    let chain_der = signer
        .issue_certificate(
            &KeyRef::new("assertion", 0),
            &KeyRef::new("root-ca", 0),
            &cert_request(
                &leaf_request.subject,
                365,
                false,
                leaf_request.dns_names.clone(),
            ),
            &by,
        )
        .await
        .expect("issued in a ceremony");
    let leaf = hsm_service_leaf(chain_der);
    assert_eq!(
        leaf.chain_der,
        vec![leaf.certificate_der.clone(), root.clone()]
    );
    let root_pem = write("root.pem", "CERTIFICATE", &root);
    let leaf_pem = write("leaf.pem", "CERTIFICATE", &leaf.certificate_der);
    let (ok, out) = openssl(&["verify", "-CAfile", &root_pem, &leaf_pem]);
    assert!(ok && out.contains(": OK"), "{out}");
    // The leaf certifies the assertion key itself.
    let (_, pubkey) = openssl(&["x509", "-in", &leaf_pem, "-noout", "-pubkey"]);
    let spki = server
        .state()
        .signing
        .get(&KeyRef::new("assertion", 0))
        .expect("key")
        .public_key_der;
    assert_eq!(pubkey, hsm_service::pki::to_pem("PUBLIC KEY", &spki));
    // Against another root, it does not verify.
    let (_, other) = openssl(&["verify", "-CAfile", &leaf_pem, &leaf_pem]);
    assert!(!other.contains(": OK"), "{other}");

    // The chain is public: GetCertificateChain and x5c/x5t#S256 in the JWKS.
    let chain = login
        .signing()
        .get_certificate_chain(GetCertificateChainRequest {
            key: String::new(),
            version: 0,
        })
        .await
        .expect("chain")
        .into_inner()
        .certificates_der;
    assert_eq!(chain, leaf.chain_der);
    let text = login
        .signing()
        .get_jwks(GetJwksRequest::default())
        .await
        .expect("jwks")
        .into_inner()
        .jwks_json;
    let set: Value = serde_json::from_str(&text).expect("json");
    let keys = set["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "the CA key is not published");
    let x5c: Vec<Vec<u8>> = keys[0]["x5c"]
        .as_array()
        .expect("x5c")
        .iter()
        .map(|c| {
            base64::engine::general_purpose::STANDARD
                .decode(c.as_str().expect("string"))
                .expect("base64")
        })
        .collect();
    assert_eq!(x5c, chain);
    assert_eq!(
        keys[0]["x5t#S256"],
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &chain[0]))
    );

    // Officer-only; bad input is INVALID_ARGUMENT; a key without a CA certificate cannot issue.
    let err = login
        .keys()
        .create_csr(CreateCsrRequest {
            key: String::new(),
            version: 0,
            subject: "CN=x".into(),
        })
        .await
        .expect_err("login-service may not");
    assert_eq!(err.code(), Code::PermissionDenied);
    let bad: HashMap<&str, (Code, tonic::Status)> = HashMap::from([
        (
            "bad subject",
            (
                Code::InvalidArgument,
                officer
                    .keys()
                    .create_csr(CreateCsrRequest {
                        key: String::new(),
                        version: 0,
                        subject: "NOPE".into(),
                    })
                    .await
                    .expect_err("bad DN"),
            ),
        ),
        (
            "zero validity",
            (
                Code::InvalidArgument,
                officer
                    .keys()
                    .self_sign_certificate(SelfSignCertificateRequest {
                        key: "assertion".into(),
                        version: 0,
                        subject: "CN=x".into(),
                        validity_days: 0,
                        ca: false,
                        dns_names: vec![],
                    })
                    .await
                    .expect_err("validity"),
            ),
        ),
        (
            "a CA certificate for a signing key",
            (
                Code::FailedPrecondition,
                officer
                    .keys()
                    .self_sign_certificate(SelfSignCertificateRequest {
                        key: "assertion".into(),
                        version: 0,
                        subject: "CN=x".into(),
                        validity_days: 1,
                        ca: true,
                        dns_names: vec![],
                    })
                    .await
                    .expect_err("not a ca key"),
            ),
        ),
        (
            "a signing key as issuer",
            (
                Code::PermissionDenied,
                officer
                    .keys()
                    .issue_certificate(IssueCertificateRequest {
                        key: "root-ca".into(),
                        version: 0,
                        issuer_key: "assertion".into(),
                        issuer_version: 0,
                        subject: "CN=x".into(),
                        validity_days: 1,
                        ca: false,
                        dns_names: vec![],
                    })
                    .await
                    .expect_err("not a CA"),
            ),
        ),
        (
            "unknown key",
            (
                Code::NotFound,
                officer
                    .keys()
                    .create_csr(CreateCsrRequest {
                        key: "nope".into(),
                        version: 0,
                        subject: "CN=x".into(),
                    })
                    .await
                    .expect_err("unknown"),
            ),
        ),
    ]);
    for (name, (code, status)) in bad {
        assert_eq!(status.code(), code, "{name}: {}", status.message());
    }
    server.shutdown().await.expect("shutdown");
}
