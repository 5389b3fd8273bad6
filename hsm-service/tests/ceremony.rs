//! Key ceremonies end to end against the dev service: three officers, M = 2.

mod common;

use std::path::Path;
use std::process::Command;

use hsm_client::proto::{GetCeremonyRequest, ListCeremoniesRequest, ListKeysRequest};
use hsm_client::HsmClient;
use hsm_service::testing::DevEnv;
use serde_json::Value;
use tonic::Code;

const EXAMPLE: &str = include_str!("../../ceremonies/example-root-and-assertion.toml");

use common::{execute, propose};

async fn approve(c: &HsmClient, id: &str) -> Result<u32, tonic::Status> {
    common::approve_with_share(c, id, "")
        .await
        .map(|i| i.valid_approvals)
}

fn openssl_verify(dir: &Path, root_pem: &str, leaf_pem: &str) -> (bool, String) {
    let root = dir.join("root.pem");
    let leaf = dir.join("leaf.pem");
    std::fs::write(&root, root_pem).expect("write");
    std::fs::write(&leaf, leaf_pem).expect("write");
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg(&leaf)
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
async fn root_and_assertion_key_ceremony_end_to_end() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let dir = env.dir.path();
    let o1 = common::client(dir, "officer-1", addr).await;
    let o2 = common::client(dir, "officer-2", addr).await;
    let o3 = common::client(dir, "officer-3", addr).await;
    let login = common::client(dir, "login-service", addr).await;
    let auditor = common::client(dir, "auditor", addr).await;

    // A login service can neither propose, approve nor execute.
    let err = propose(&login, EXAMPLE).await.expect_err("login-service");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let id = propose(&o1, EXAMPLE).await.expect("propose");
    assert_eq!(id.len(), 64);
    let err = propose(&o2, EXAMPLE).await.expect_err("same plan twice");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    for e in [
        approve(&login, &id).await.expect_err("login approve"),
        execute(&login, &id)
            .await
            .map(|_| ())
            .expect_err("login execute"),
        approve(&auditor, &id).await.expect_err("auditor approve"),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }

    // One approval (twice from the same officer) is not enough.
    assert_eq!(approve(&o1, &id).await.expect("approve"), 1);
    assert_eq!(approve(&o1, &id).await.expect("approve again"), 1);
    let err = execute(&o3, &id).await.map(|_| ()).expect_err("1 of 2");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("needs 2"), "{err:?}");

    // A plan changed by one meaningful byte is another ceremony: no approvals.
    let tampered = EXAMPLE.replace("validity_days = 365", "validity_days = 366");
    let other = propose(&o1, &tampered).await.expect("propose tampered");
    assert_ne!(other, id);
    let shown = o1
        .ceremonies()
        .get_ceremony(GetCeremonyRequest {
            ceremony_id: other.clone(),
        })
        .await
        .expect("show")
        .into_inner();
    assert_eq!(shown.valid_approvals, 0);
    let err = execute(&o1, &other)
        .await
        .map(|_| ())
        .expect_err("tampered");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Second officer: execute.
    assert_eq!(approve(&o2, &id).await.expect("approve"), 2);
    let r = execute(&o3, &id).await.expect("execute");
    let info = r.ceremony.expect("ceremony");
    assert_eq!(info.state, "succeeded", "{}", info.failure);
    assert_eq!(info.executed_by, "officer-3");
    let t: Value = serde_json::from_str(&r.transcript_json).expect("transcript json");
    assert_eq!(t["ceremony_id"], id.as_str());
    assert_eq!(t["outcome"], "succeeded");
    assert_eq!(t["approvals"].as_array().expect("approvals").len(), 2);
    assert_eq!(t["created_keys"].as_array().expect("keys").len(), 2);
    for step in t["steps"].as_array().expect("steps") {
        assert_eq!(step["outcome"], "ok", "{step}");
    }
    for check in [&t["steps"][0]["checks"][0], &t["steps"][2]["checks"][0]] {
        assert_eq!(check["signature_verifies"], true, "{check}");
        assert_eq!(check["public_key_matches"], true, "{check}");
        assert_eq!(check["extractable"], false, "{check}");
        assert_eq!(check["problem"], "", "{check}");
    }
    assert_eq!(
        t["ceremony_id_words"]
            .as_str()
            .expect("words")
            .split(' ')
            .count(),
        32
    );
    // Written under the data directory, both forms, and equal to what was returned.
    let json_file = dir.join("ceremonies").join(format!("{id}.json"));
    let text_file = dir.join("ceremonies").join(format!("{id}.txt"));
    assert_eq!(
        std::fs::read_to_string(&json_file).expect("json file"),
        r.transcript_json
    );
    let text = std::fs::read_to_string(&text_file).expect("text file");
    assert_eq!(text, r.transcript_text);
    assert!(text.contains("as words:"), "{text}");
    assert!(text.contains("BEGIN CERTIFICATE"), "{text}");

    // Executing twice is refused.
    let err = execute(&o1, &id).await.map(|_| ()).expect_err("twice");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("runs once"), "{err:?}");
    let err = approve(&o1, &id).await.expect_err("approve executed");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // The new assertion key signs, and relying parties verify with the JWKS.
    let new_kid = t["steps"][2]["keys"][0]["kid"]
        .as_str()
        .expect("kid")
        .to_owned();
    let signed = common::sign_default_assertion(&login).await;
    assert_eq!(signed.kid, new_kid);
    let set = common::jwks(&login).await;
    let jwk = set.find(&new_kid).expect("new key in the JWKS");
    assert!(
        jwk.common.x509_chain.is_some(),
        "certificate chain in the JWK"
    );
    common::verify(&signed.jws, &set).expect("the assertion verifies under the JWKS");
    // The root CA key is not in the JWKS.
    let root_kid = t["steps"][0]["keys"][0]["kid"].as_str().expect("kid");
    assert!(set.find(root_kid).is_none());

    // The chain verifies with openssl; a wrong root does not.
    let root_pem = t["steps"][1]["certificates"][0]["pem"]
        .as_str()
        .expect("root");
    let leaf_pem = t["steps"][3]["certificates"][0]["pem"]
        .as_str()
        .expect("leaf");
    let (ok, out) = openssl_verify(dir, root_pem, leaf_pem);
    assert!(ok, "{out}");
    let (ok, out) = openssl_verify(dir, leaf_pem, leaf_pem);
    assert!(!ok, "{out}");

    // The inventory says which ceremony made which key, and what the token reports.
    let keys = auditor
        .keys()
        .list_keys(ListKeysRequest {})
        .await
        .expect("list")
        .into_inner()
        .keys;
    let find = |name: &str, version: u32| {
        keys.iter()
            .find(|k| k.name == name && k.version == version)
            .unwrap_or_else(|| panic!("{name} v{version}"))
    };
    assert_eq!(find("root-ca", 1).ceremony_id, id);
    assert_eq!(find("assertion", 2).ceremony_id, id);
    assert_eq!(find("assertion", 2).state, "active");
    assert_eq!(
        find("assertion", 1).ceremony_id,
        "",
        "bootstrapped, not a ceremony"
    );
    assert_eq!(find("assertion", 1).state, "verify-only");
    for k in &keys {
        assert!(k.sensitive && !k.extractable && k.local, "{k:?}");
        assert_eq!(k.public_key_sha256.len(), 95);
    }

    let list = auditor
        .ceremonies()
        .list_ceremonies(ListCeremoniesRequest {})
        .await
        .expect("list")
        .into_inner()
        .ceremonies;
    assert_eq!(list.len(), 2);
    // Every proposal, approval, refusal, step and key state change is in the audit trail,
    // durably before each reply: read at once, no waiting.
    let (trail, _) = server
        .state()
        .audit
        .export_range(1, 100_000)
        .await
        .expect("export");
    let records: Vec<Value> = String::from_utf8(trail)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    let count = |action: &str, object: &str, outcome: &str| {
        records
            .iter()
            .filter(|r| r["action"] == action && r["object"] == object && r["outcome"] == outcome)
            .count()
    };
    assert_eq!(count("ceremony.propose", &id, "ok"), 1);
    assert_eq!(
        count("ceremony.propose", "", "denied"),
        1,
        "the second proposal"
    );
    assert_eq!(count("ceremony.approve", &id, "ok"), 3, "o1 twice, o2");
    assert_eq!(
        count("ceremony.approve", &id, "denied"),
        1,
        "after execution"
    );
    assert_eq!(count("ceremony.execute", &id, "denied"), 2, "1 of 2, twice");
    assert_eq!(count("ceremony.execute", &other, "denied"), 1);
    assert_eq!(
        count("ceremony.execute", &id, "ok"),
        2,
        "started, succeeded"
    );
    assert_eq!(count("ceremony.step", &id, "ok"), 6);
    for key in ["root-ca/v1", "assertion/v2"] {
        assert!(count("key.state", key, "ok") >= 1, "{key}");
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let o1 = common::client(env.dir.path(), "officer-1", addr).await;
    for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
        let e = approve(&o1, bad).await.expect_err("approve");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        assert!(e.message().contains("ceremony_id"), "{e:?}");
        let e = execute(&o1, bad).await.map(|_| ()).expect_err("execute");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        let e = o1
            .ceremonies()
            .get_ceremony(GetCeremonyRequest {
                ceremony_id: bad.to_owned(),
            })
            .await
            .expect_err("show");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    let e = approve(&o1, &"a".repeat(64)).await.expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let cases = [
        ("", "missing field `version`"),
        ("version = 1\n", "no [[step]]"),
        ("version = 2\n[[step]]\nkind = \"publish\"\nkey = \"assertion\"\n", "version 2"),
        (
            &EXAMPLE.replace("kind = \"publish\"", "kind = \"launch\""),
            "unknown variant `launch`",
        ),
        (
            &EXAMPLE.replace("usage = \"ca\"", "usage = \"ca\"\ncolour = \"red\""),
            "unknown field `colour`",
        ),
        (
            &EXAMPLE.replace("validity_days = 3650", "validity_days = 9000"),
            "ceremony.max_validity_days",
        ),
        (&EXAMPLE.replace("new_version = true", ""), "exists already"),
        (
            &EXAMPLE.replace("usage = \"ca\"", "usage = \"ca\"\nextractable = true"),
            "non-extractable",
        ),
        (
            &EXAMPLE.replace("issuer = \"root-ca\"", "issuer = \"nope\""),
            "neither created",
        ),
        (
            &format!(
                "{EXAMPLE}\n[[step]]\nkind = \"generate-key\"\nname = \"root-ca\"\nalgorithm = \"ES256\"\nusage = \"ca\"\n"
            ),
            "duplicate key name",
        ),
        ("this is = not toml [", "line 1"),
    ];
    for (plan, expected) in cases {
        let e = propose(&o1, plan).await.expect_err(expected);
        assert_eq!(e.code(), Code::InvalidArgument, "{expected}: {e:?}");
        assert!(e.message().contains(expected), "{expected}: {e:?}");
    }
    server.shutdown().await.expect("shutdown");
}

const ROTATE: &str = include_str!("../../ceremonies/rotate-seed-master-key.toml");

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_master_key_rotation_rewraps_every_credential() {
    use hsm_client::proto as pb;
    use hsm_client::proto::credential_service_client::CredentialServiceClient;
    use hsm_service::credentials::MASTER_KEY_VERSION_META;
    use hsm_service::otp::rfc_vectors::{RFC4226_SEED, RFC4226_VECTORS};
    use hsm_service::store::CredentialStore;

    let env = DevEnv::new();
    // An existing deployment: its master key predates the unwrap template.
    env.legacy_seed_master_key(1).await;
    let server = env.start().await;
    let addr = server.local_addr();
    let dir = env.dir.path();
    let o1 = common::client(dir, "officer-1", addr).await;
    let o2 = common::client(dir, "officer-2", addr).await;
    let o3 = common::client(dir, "officer-3", addr).await;
    let mut creds =
        CredentialServiceClient::new(common::client(dir, "login-service", addr).await.channel());
    let hotp = |id: &str| pb::CreateCredentialRequest {
        credential_id: id.into(),
        kind: pb::OtpKind::Hotp as i32,
        algorithm: pb::HashAlgorithm::Sha1 as i32,
        digits: 6,
        seed: RFC4226_SEED.to_vec(),
        issuer: "Example".into(),
        account_name: "alice".into(),
        ..Default::default()
    };
    // Seven credentials: more than one page of the plan's batch size (2 below).
    let ids: Vec<String> = (0..7).map(|i| format!("hotp-{i}")).collect();
    for id in &ids {
        creds.create_credential(hotp(id)).await.expect("create");
    }
    let verify =
        |c: &mut CredentialServiceClient<tonic::transport::Channel>, id: &str, counter: usize| {
            let req = pb::VerifyCodeRequest {
                credential_id: id.into(),
                code: format!("{:06}", RFC4226_VECTORS[counter].code),
            };
            let mut c = c.clone();
            async move {
                pb::VerifyResult::try_from(
                    c.verify_code(req)
                        .await
                        .expect("verify")
                        .into_inner()
                        .result,
                )
                .expect("result")
            }
        };
    for id in &ids {
        assert_eq!(verify(&mut creds, id, 0).await, pb::VerifyResult::Accepted);
    }

    let plan = ROTATE.replace("batch_size = 500", "batch_size = 2");
    assert_ne!(plan, ROTATE);
    let id = propose(&o1, &plan).await.expect("propose");
    assert_eq!(approve(&o1, &id).await.expect("approve"), 1);
    let err = execute(&o3, &id).await.map(|_| ()).expect_err("1 of 2");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(approve(&o2, &id).await.expect("approve"), 2);
    let r = execute(&o3, &id).await.expect("execute");
    let info = r.ceremony.expect("ceremony");
    assert_eq!(info.state, "succeeded", "{}", info.failure);
    let t: Value = serde_json::from_str(&r.transcript_json).expect("transcript");
    let rot = &t["steps"][0]["seed_rotation"];
    assert_eq!(rot["old_key_label"], "seed-master-key-1", "{t}");
    assert_eq!(rot["new_key_label"], "seed-master-key-2", "{t}");
    assert_eq!(rot["rewrapped"], 7, "{t}");
    assert_eq!(rot["already_rewrapped"], 0, "{t}");
    assert!(r.transcript_text.contains(
        "seed master key seed-master-key-1 -> seed-master-key-2: 7 credential(s) re-wrapped"
    ));

    // Codes still verify (and replay protection survived the re-wrap).
    for id in &ids {
        assert_eq!(verify(&mut creds, id, 0).await, pb::VerifyResult::Replayed);
        assert_eq!(verify(&mut creds, id, 1).await, pb::VerifyResult::Accepted);
    }
    // New enrolments use the new key at once.
    creds
        .create_credential(hotp("after"))
        .await
        .expect("create after");
    assert_eq!(
        verify(&mut creds, "after", 0).await,
        pb::VerifyResult::Accepted
    );

    let store = server.state().store.clone();
    let all = store.list(None, None, 100).await.expect("list");
    assert_eq!(all.len(), 8);
    for rec in &all {
        assert_eq!(rec.master_key_version, 2, "{}", rec.id);
    }
    assert_eq!(
        store.get_meta(MASTER_KEY_VERSION_META).await.expect("meta"),
        Some(2u32.to_be_bytes().to_vec())
    );
    // Both master keys are on the token: the old one is kept.
    for v in [1, 2] {
        let label = hsm_service::hsm::seeds::master_key_label(v);
        assert!(server
            .state()
            .hsm
            .find_object(hsm_service::hsm::objects::ObjectClass::SECRET_KEY, &label)
            .await
            .expect("find")
            .is_some());
    }
    // The new key has the unwrap template: the token never unwraps its seeds into
    // anything extractable, so a second rotation is refused before it changes anything.
    assert!(server
        .state()
        .hsm
        .seed_master_key_confined(2)
        .await
        .expect("confined"));
    let again = propose(&o1, &ROTATE.replace("example", "example, again"))
        .await
        .expect("propose again");
    approve(&o1, &again).await.expect("approve");
    approve(&o2, &again).await.expect("approve");
    let r = execute(&o1, &again).await.expect("execute again");
    let info = r.ceremony.expect("ceremony");
    assert_eq!(info.state, "failed");
    assert!(
        info.failure
            .contains("seed-master-key-2 already confines what it unwraps"),
        "{}",
        info.failure
    );
    assert!(server
        .state()
        .hsm
        .find_object(
            hsm_service::hsm::objects::ObjectClass::SECRET_KEY,
            &hsm_service::hsm::seeds::master_key_label(3)
        )
        .await
        .expect("find")
        .is_none());
    assert_eq!(
        verify(&mut creds, "hotp-3", 2).await,
        pb::VerifyResult::Accepted
    );
    drop(store);
    server.shutdown().await.expect("shutdown");

    // No plaintext seed in any file under the data dir (store, transcripts, logs, token).
    let hex: String = RFC4226_SEED.iter().map(|b| format!("{b:02x}")).collect();
    let b32 = data_encoding::BASE32_NOPAD.encode(RFC4226_SEED);
    for file in files_under(dir) {
        let bytes = std::fs::read(&file).expect("read");
        for needle in [RFC4226_SEED, hex.as_bytes(), b32.as_bytes()] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "seed in {}",
                file.display()
            );
        }
    }
}

/// A caller that gives up (here: a 1 ms `grpc-timeout`, as a disconnect or a connection
/// closed at its maximum age would) cannot cut an execution half-way: it runs to its
/// recorded outcome instead of staying `executing` until the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_whose_caller_gives_up_still_runs_to_its_outcome() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let dir = env.dir.path();
    let o1 = common::client(dir, "officer-1", addr).await;
    let o2 = common::client(dir, "officer-2", addr).await;
    let id = propose(&o1, EXAMPLE).await.expect("propose");
    approve(&o1, &id).await.expect("approve 1");
    assert_eq!(approve(&o2, &id).await.expect("approve 2"), 2);

    let mut request = tonic::Request::new(hsm_client::proto::ExecuteCeremonyRequest {
        ceremony_id: id.clone(),
    });
    request.set_timeout(std::time::Duration::from_millis(1));
    let err = o1
        .ceremonies()
        .execute_ceremony(request)
        .await
        .expect_err("the caller gave up after 1 ms");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let state = loop {
        let shown = o1
            .ceremonies()
            .get_ceremony(GetCeremonyRequest {
                ceremony_id: id.clone(),
            })
            .await
            .expect("show")
            .into_inner();
        if shown.state != "executing" && shown.state != "proposed" {
            break shown;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {} after 60 s",
            shown.state
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(state.state, "succeeded", "{}", state.failure);
    let keys = o1
        .keys()
        .list_keys(ListKeysRequest::default())
        .await
        .expect("list keys")
        .into_inner();
    assert!(
        keys.keys.iter().any(|k| k.name == "root-ca"),
        "the plan's keys exist: {:?}",
        keys.keys.iter().map(|k| &k.name).collect::<Vec<_>>()
    );
    server.shutdown().await.expect("shutdown");
}
