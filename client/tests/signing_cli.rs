//! `hsmctl sign ...` and `hsmctl keys ...`, subcommand by subcommand, against a real
//! service started in this process; signatures and certificates checked with openssl.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use hsm_service::signing::{
    Algorithm, CertificateRequest, Issuance, KeyRef, Usage, NSIS_ACR_VALUES,
};
use hsm_service::testing::DevEnv;
use serde_json::Value;

fn hsmctl(env: &DevEnv, addr: SocketAddr, identity: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hsmctl"))
        .arg("--endpoint")
        .arg(format!("https://{addr}"))
        .arg("--ca")
        .arg(env.pki("ca.crt"))
        .arg("--cert")
        .arg(env.pki(&format!("{identity}.crt")))
        .arg("--key")
        .arg(env.pki(&format!("{identity}.key")))
        .args(args)
        .output()
        .expect("run hsmctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {o:?}"))
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

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path.to_str().expect("utf-8").to_owned()
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

/// `credential create --subject` and `credential verify` through hsmctl: the evidence
/// id of an accepted code of a new credential `id` for `subject`.
fn evidence(env: &DevEnv, addr: SocketAddr, id: &str, subject: &str) -> String {
    let seed = write(
        env.dir.path(),
        &format!("{id}.hex"),
        b"3132333435363738393031323334353637383930",
    );
    let out = hsmctl(
        env,
        addr,
        "login-service",
        &[
            "credential",
            "create",
            "--kind",
            "hotp",
            "--id",
            id,
            "--seed-file",
            &seed,
            "--subject",
            subject,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    // RFC 4226's first code of that seed.
    let out = hsmctl(
        env,
        addr,
        "login-service",
        &["credential", "verify", id, "755224", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    json(&out)["evidence_id"]
        .as_str()
        .expect("evidence id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_assertion_text_json_and_refusal() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let acr = NSIS_ACR_VALUES[0];
    let first = evidence(&env, addr, "c1", "citizen-1");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "sign",
            "assertion",
            "--subject",
            "citizen-1",
            "--acr",
            acr,
            "--aud",
            "rp",
            "--evidence",
            &first,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim().split('.').count(), 3, "a compact JWS");
    // Evidence is single use; none at all is refused naming the client rule.
    for (ev, code, text) in [
        (first.as_str(), "FailedPrecondition", "already used"),
        ("", "FailedPrecondition", "unbound_assertions"),
    ] {
        let out = hsmctl(
            &env,
            addr,
            "login-service",
            &[
                "sign",
                "assertion",
                "--subject",
                "citizen-1",
                "--acr",
                acr,
                "--evidence",
                ev,
                "--json",
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let v = json(&out);
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"].as_str().expect("m").contains(text),
            "{v}"
        );
    }
    let second = evidence(&env, addr, "c2", "citizen-1");

    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "sign",
            "assertion",
            "--subject",
            "citizen-1",
            "--acr",
            acr,
            "--ttl",
            "60",
            "--amr",
            "otp",
            "--claims",
            r#"{"x":1}"#,
            "--evidence",
            &second,
            "--json",
        ],
    );
    let v = json(&out);
    let kid = v["kid"].as_str().expect("kid").to_owned();
    assert_eq!(v["jws"].as_str().expect("jws").split('.').count(), 3);
    assert!(v["expires_at"].as_u64().expect("exp") > hsm_service::common::Clock::system().now());
    let jwks = json(&hsmctl(
        &env,
        addr,
        "login-service",
        &["keys", "jwks", "--json"],
    ));
    assert_eq!(jwks["keys"][0]["kid"], kid.as_str());

    // Refusals of the request itself, with a valid evidence so each is due to its field.
    let third = evidence(&env, addr, "c3", "c");

    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "sign",
            "assertion",
            "--subject",
            "c",
            "--acr",
            acr,
            "--ttl",
            "999999",
            "--evidence",
            &third,
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["error"]["code"], "InvalidArgument");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "sign",
            "assertion",
            "--subject",
            "c",
            "--acr",
            acr,
            "--claims",
            r#"{"exp":1}"#,
            "--evidence",
            &third,
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reserved claim"),
        "{out:?}"
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_raw_message_digest_and_der_verify_with_openssl() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let spki = server
        .state()
        .signing
        .get(&KeyRef::new("documents", 0))
        .expect("key")
        .public_key_der;
    let public = write(
        dir.path(),
        "pub.pem",
        hsm_service::pki::to_pem("PUBLIC KEY", &spki).as_bytes(),
    );
    let message = write(dir.path(), "msg.txt", b"detached document");
    let verify = |der: &[u8]| {
        let sig = write(dir.path(), "sig.der", der);
        openssl(&[
            "dgst",
            "-sha256",
            "-verify",
            &public,
            "-signature",
            &sig,
            &message,
        ])
    };

    // DER from a message file: what openssl dgst -verify takes.
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "sign",
            "raw",
            "--message-file",
            &message,
            "--encoding",
            "der",
            "--json",
        ],
    );
    let v = json(&out);
    assert_eq!(v["algorithm"], "ES256");
    assert_eq!(v["encoding"], "der");
    let (ok, text) = verify(&b64(v["signature"].as_str().expect("sig")));
    assert!(ok && text.contains("Verified OK"), "{text}");

    // DER over a hex digest of the same message.
    let digest = Algorithm::Es256
        .digest(b"detached document")
        .expect("digest");
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "sign",
            "raw",
            "--digest",
            &hex,
            "--encoding",
            "der",
            "--algorithm",
            "es256",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let (ok, text) = verify(&b64(stdout(&out).trim()));
    assert!(ok && text.contains("Verified OK"), "{text}");

    // Raw r||s (JWS form) from a text message: 64 bytes; not DER, so openssl refuses it.
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["sign", "raw", "--message", "detached document"],
    );
    let raw = b64(stdout(&out).trim());
    assert_eq!(raw.len(), 64);
    assert!(!verify(&raw).0);

    // Refusals: a short digest, a digest that is not hex, no input at all.
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["sign", "raw", "--digest", "00ff", "--json"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["error"]["code"], "InvalidArgument");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["sign", "raw", "--digest", "xyz"],
    );
    assert_eq!(out.status.code(), Some(2));
    let out = hsmctl(&env, addr, "login-service", &["sign", "raw"]);
    assert!(!out.status.success());
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_jwks_and_list() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let out = hsmctl(&env, addr, "auditor", &["keys", "jwks"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_str(&stdout(&out)).expect("pretty JSON");
    assert_eq!(v["keys"][0]["alg"], "ES256");
    assert_eq!(v["keys"][0]["use"], "sig");
    assert_eq!(
        v["keys"].as_array().expect("keys").len(),
        1,
        "assertion keys only"
    );
    let state = server.state();
    let kid = |name: &str| state.signing.get(&KeyRef::new(name, 0)).expect("key").kid;
    assert_eq!(v["keys"][0]["kid"], kid("assertion").as_str());
    // The raw keys' set: the dev `documents` key, which `hsmctl sign raw` uses.
    let raw = json(&hsmctl(
        &env,
        addr,
        "auditor",
        &["keys", "jwks", "--usage", "raw", "--json"],
    ));
    assert_eq!(raw["keys"].as_array().expect("keys").len(), 1);
    assert_eq!(raw["keys"][0]["kid"], kid("documents").as_str());
    let out = hsmctl(
        &env,
        addr,
        "auditor",
        &["keys", "jwks", "--usage", "ca", "--json"],
    );
    assert_eq!(json(&out)["error"]["code"], "InvalidArgument");

    let out = hsmctl(&env, addr, "officer-1", &["keys", "list", "--json"]);
    let v = json(&out);
    assert_eq!(v["keys"][0]["name"], "assertion");
    assert_eq!(v["keys"][0]["version"], 1);
    assert_eq!(v["keys"][0]["state"], "active");
    assert_eq!(v["keys"][0]["usage"], "signing");
    // By name: dev mode also makes the `challenge` key of the app authenticator.
    let by_name = |name: &str| {
        v["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("no key {name}: {v}"))
            .clone()
    };
    assert_eq!(by_name("documents")["usage"], "raw");
    assert_eq!(by_name("challenges")["usage"], "challenge");
    assert_eq!(v["keys"][0]["key_id"].as_str().expect("hex").len(), 32);
    let out = hsmctl(&env, addr, "officer-1", &["keys", "list"]);
    assert!(
        stdout(&out).contains("assertion v1  active") && stdout(&out).contains("usage raw"),
        "{}",
        stdout(&out)
    );

    let out = hsmctl(&env, addr, "login-service", &["keys", "list", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["error"]["code"], "PermissionDenied");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cert_csr_self_sign_issue_and_show() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let signer = server.state().signing.clone();
    signer
        .create_version("root-ca", Algorithm::Es256, Usage::Ca)
        .await
        .expect("CA key");
    let dir = tempfile::tempdir().expect("tempdir");

    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &[
            "keys",
            "cert",
            "csr",
            "--subject",
            "CN=Assertions,O=Dev,C=DK",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let csr = write(dir.path(), "req.pem", &out.stdout);
    let (ok, text) = openssl(&["req", "-in", &csr, "-verify", "-noout"]);
    assert!(ok && text.contains("verify OK"), "{text}");

    // A ca key is certified only in a ceremony; issuing is always a ca key's work.
    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &[
            "keys",
            "cert",
            "self-sign",
            "--signing-key",
            "root-ca",
            "--subject",
            "CN=Dev Root,C=DK",
            "--days",
            "3650",
            "--is-ca",
            "--json",
        ],
    );
    let v = json(&out);
    assert_eq!(v["error"]["code"], "PermissionDenied");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("use a key ceremony")),
        "{v}"
    );
    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &[
            "keys",
            "cert",
            "issue",
            "--issuer",
            "root-ca",
            "--subject",
            "CN=Assertions,O=Dev,C=DK",
            "--json",
        ],
    );
    assert_eq!(json(&out)["error"]["code"], "PermissionDenied");

    // What a ceremony's self-sign and issue-certificate steps do.
    let by = Issuance::Ceremony {
        id: "cli-test".into(),
        actor: hsm_service::audit::Actor::new("officer-1", ""),
    };
    let root_der = signer
        .self_sign(
            &KeyRef::new("root-ca", 0),
            &CertificateRequest {
                subject: "CN=Dev Root,C=DK".into(),
                validity_days: 3650,
                is_ca: true,
                dns_names: vec![],
            },
            &by,
        )
        .await
        .expect("root");
    let root = write(
        dir.path(),
        "root.pem",
        hsm_service::pki::to_pem("CERTIFICATE", &root_der).as_bytes(),
    );
    signer
        .issue_certificate(
            &KeyRef::new("assertion", 0),
            &KeyRef::new("root-ca", 0),
            &CertificateRequest {
                subject: "CN=Assertions,O=Dev,C=DK".into(),
                validity_days: 365,
                is_ca: false,
                dns_names: vec!["idp.dev.local".into()],
            },
            &by,
        )
        .await
        .expect("leaf");
    let v = json(&hsmctl(
        &env,
        addr,
        "login-service",
        &["keys", "cert", "show", "--json"],
    ));
    let certs = v["certificates"].as_array().expect("chain");
    assert_eq!(certs.len(), 2);
    let leaf = write(
        dir.path(),
        "leaf.pem",
        certs[0]["pem"].as_str().expect("pem").as_bytes(),
    );
    let (ok, text) = openssl(&["verify", "-CAfile", &root, &leaf]);
    assert!(ok && text.contains(": OK"), "{text}");

    // An officer may self-sign a signing key directly (not as a CA).
    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &[
            "keys",
            "cert",
            "self-sign",
            "--signing-key",
            "documents",
            "--subject",
            "CN=Documents,C=DK",
            "--days",
            "30",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let own = write(dir.path(), "own.pem", &out.stdout);
    let (ok, text) = openssl(&["x509", "-in", &own, "-noout", "-subject"]);
    assert!(ok && text.contains("CN = Documents"), "{text}");

    // Anyone may read the stored chain; only officers may make certificates.
    let out = hsmctl(&env, addr, "login-service", &["keys", "cert", "show"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).matches("BEGIN CERTIFICATE").count(), 2);
    let shown = json(&hsmctl(
        &env,
        addr,
        "auditor",
        &[
            "keys",
            "cert",
            "show",
            "--signing-key",
            "assertion",
            "--json",
        ],
    ));
    assert_eq!(shown["certificates"], v["certificates"]);
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["keys", "cert", "csr", "--subject", "CN=x", "--json"],
    );
    assert_eq!(json(&out)["error"]["code"], "PermissionDenied");
    server.shutdown().await.expect("shutdown");
}
