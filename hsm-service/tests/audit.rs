//! The audit trail under load, through the real client: checkpoints never fail anyone
//! else's write, and the trail verifies afterwards.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_client::proto as pb;
use hsm_client::HsmClient;
use hsm_service::otp::{self, Digits};
use hsm_service::testing::DevEnv;

/// HOTP code (SHA-1, 6 digits) of `seed` at `counter`.
fn hotp(seed: &[u8], counter: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, seed);
    let tag = ring::hmac::sign(&key, &otp::moving_factor(counter));
    format!(
        "{:06}",
        otp::truncate(tag.as_ref(), Digits::new(6).expect("6"))
    )
}

fn seed(i: usize) -> Vec<u8> {
    format!("audit-load-seed-{i:04}").into_bytes()
}

async fn create_hotp(c: &HsmClient, id: &str, seed: &[u8]) {
    c.credentials()
        .create_credential(pb::CreateCredentialRequest {
            credential_id: id.into(),
            kind: pb::OtpKind::Hotp as i32,
            algorithm: pb::HashAlgorithm::Sha1 as i32,
            digits: 6,
            seed: seed.to_vec(),
            ..Default::default()
        })
        .await
        .expect("create");
}

/// The whole trail as JSON Lines, and the service's checkpoint keys.
async fn export(auditor: &HsmClient) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut stream = auditor
        .audit()
        .export_audit(pb::ExportAuditRequest {
            from_seq: 1,
            chain: String::new(),
        })
        .await
        .expect("export")
        .into_inner();
    let mut jsonl = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        jsonl.extend_from_slice(&chunk.jsonl);
    }
    let keys = auditor
        .audit()
        .get_audit_keys(pb::GetAuditKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.key_id, k.public_key))
        .collect();
    (jsonl, keys)
}

/// The shape of the report in issue 10: 3 clients call CheckpointAudit in a loop while 8
/// clients verify codes. Before checkpoints were serialized, the second checkpoint over
/// one head rolled back the whole group-commit batch and verifications got INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checkpoints_never_fail_a_verification() {
    const VERIFIERS: usize = 8;
    const CHECKPOINTERS: usize = 3;
    const RUN: Duration = Duration::from_secs(3);

    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let login = common::client(env.dir.path(), "login-service", addr).await;
    for i in 0..VERIFIERS {
        create_hotp(&login, &format!("load-{i}"), &seed(i)).await;
    }

    let deadline = Instant::now() + RUN;
    let failed = Arc::new(AtomicU64::new(0));
    let mut verifiers = Vec::new();
    for i in 0..VERIFIERS {
        let c = common::client(env.dir.path(), "login-service", addr).await;
        let failed = failed.clone();
        verifiers.push(tokio::spawn(async move {
            let (id, seed) = (format!("load-{i}"), seed(i));
            let mut counter = 0u64;
            while Instant::now() < deadline {
                let answer = c
                    .credentials()
                    .verify_code(pb::VerifyCodeRequest {
                        credential_id: id.clone(),
                        code: hotp(&seed, counter),
                    })
                    .await;
                match answer.map(|r| r.into_inner().result) {
                    Ok(r) if r == pb::VerifyResult::Accepted as i32 => counter += 1,
                    Ok(r) => panic!("{id} counter {counter}: verdict {r}, expected ACCEPTED"),
                    Err(status) => {
                        eprintln!("{id}: {status}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            counter
        }));
    }
    let mut checkpointers = Vec::new();
    for _ in 0..CHECKPOINTERS {
        let c = common::client(env.dir.path(), "auditor", addr).await;
        checkpointers.push(tokio::spawn(async move {
            let mut heads = Vec::new();
            while Instant::now() < deadline {
                let r = c
                    .audit()
                    .checkpoint_audit(pb::CheckpointAuditRequest {})
                    .await
                    .expect("a checkpoint never fails")
                    .into_inner();
                heads.push((r.seq, r.head_seq));
            }
            heads
        }));
    }
    let mut verified = 0;
    for v in verifiers {
        verified += v.await.expect("verifier");
    }
    let mut answers = Vec::new();
    for c in checkpointers {
        answers.extend(c.await.expect("checkpointer"));
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed verifications");
    assert!(verified > 0 && !answers.is_empty(), "the load ran");
    for (seq, head_seq) in &answers {
        assert!(head_seq < seq, "checkpoint {seq} covers {head_seq}");
    }

    // Every answer names a checkpoint that is really in the trail, and the trail verifies.
    let auditor = common::client(env.dir.path(), "auditor", addr).await;
    let (jsonl, keys) = export(&auditor).await;
    let report = hsm_service::audit::verify(jsonl.as_slice(), &keys);
    assert!(report.is_ok(), "{report}");
    let records: Vec<hsm_service::audit::AuditRecord> = std::str::from_utf8(&jsonl)
        .expect("utf-8")
        .lines()
        .map(|l| hsm_service::audit::AuditRecord::from_json_line(l).expect("record"))
        .collect();
    for (seq, _) in &answers {
        let r = &records[usize::try_from(*seq).expect("seq") - 1];
        assert!(r.is_checkpoint(), "answer seq {seq} is not a checkpoint");
    }
    let verifications = records
        .iter()
        .filter(|r| r.action == "credential.verify")
        .count() as u64;
    assert_eq!(verifications, verified, "one record per verification");
    server.shutdown().await.expect("shutdown");
}

/// A checkpoint over a head that has not moved is the existing checkpoint, not a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_over_an_unchanged_head_returns_the_existing_one() {
    let env = DevEnv::new();
    let server = env.start().await;
    let auditor = common::client(env.dir.path(), "auditor", server.local_addr()).await;
    let checkpoint = || async {
        auditor
            .audit()
            .checkpoint_audit(pb::CheckpointAuditRequest {})
            .await
            .expect("checkpoint")
            .into_inner()
    };
    let first = checkpoint().await;
    let again = checkpoint().await;
    assert_eq!((again.seq, again.head_seq), (first.seq, first.head_seq));
    assert_eq!(first.head_seq + 1, first.seq);
    let len_before = server.state().audit.len().await.expect("len");
    checkpoint().await;
    assert_eq!(server.state().audit.len().await.expect("len"), len_before);
    server.shutdown().await.expect("shutdown");
}

/// LOCKED, DISABLED and NOT_FOUND answers are in the trail too, and so are the lifecycle
/// changes, each with the caller's certificate subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_verifications_and_lifecycle_changes_are_recorded() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let login = common::client(env.dir.path(), "login-service", addr).await;
    let officer = common::client(env.dir.path(), "officer-1", addr).await;
    let seed = seed(0);
    create_hotp(&login, "r1", &seed).await;
    let verify = |id: &str, code: String| {
        let c = login.clone();
        let id = id.to_owned();
        async move {
            c.credentials()
                .verify_code(pb::VerifyCodeRequest {
                    credential_id: id,
                    code,
                })
                .await
        }
    };
    let wrong = if hotp(&seed, 0) == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..5 {
        verify("r1", wrong.into()).await.expect("rejected");
    }
    let locked = verify("r1", hotp(&seed, 0))
        .await
        .expect("locked")
        .into_inner();
    assert_eq!(locked.result, pb::VerifyResult::Locked as i32);
    let missing = verify("nobody", hotp(&seed, 0))
        .await
        .expect_err("not found");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    officer
        .credentials()
        .update_credential_state(pb::UpdateCredentialStateRequest {
            credential_id: "r1".into(),
            action: pb::CredentialAction::Unlock as i32,
            tenant: "login-service".into(),
        })
        .await
        .expect("unlock");
    login
        .credentials()
        .update_credential_state(pb::UpdateCredentialStateRequest {
            credential_id: "r1".into(),
            action: pb::CredentialAction::Disable as i32,
            tenant: String::new(),
        })
        .await
        .expect("disable");
    let disabled = verify("r1", hotp(&seed, 0))
        .await
        .expect("disabled")
        .into_inner();
    assert_eq!(disabled.result, pb::VerifyResult::Disabled as i32);
    login
        .credentials()
        .delete_credential(pb::DeleteCredentialRequest {
            credential_id: "r1".into(),
            tenant: String::new(),
        })
        .await
        .expect("delete");

    let auditor = common::client(env.dir.path(), "auditor", addr).await;
    let (jsonl, _) = export(&auditor).await;
    let records: Vec<hsm_service::audit::AuditRecord> = std::str::from_utf8(&jsonl)
        .expect("utf-8")
        .lines()
        .map(|l| hsm_service::audit::AuditRecord::from_json_line(l).expect("record"))
        .collect();
    let result = |r: &hsm_service::audit::AuditRecord| {
        r.details
            .as_ref()
            .and_then(|d| d.get("result"))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let verifies: Vec<(String, String)> = records
        .iter()
        .filter(|r| r.action == "credential.verify")
        .map(|r| (r.object.clone(), result(r)))
        .collect();
    let mut expected = vec![("r1", "rejected"); 5];
    expected.extend([
        ("r1", "locked"),
        ("nobody", "not_found"),
        ("r1", "disabled"),
    ]);
    let expected: Vec<(String, String)> = expected
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    assert_eq!(verifies, expected);
    let changes: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r.action.starts_with("credential.") && r.action != "credential.verify")
        .map(|r| (r.action.as_str(), r.actor.subject.as_str()))
        .collect();
    assert_eq!(
        changes,
        [
            ("credential.create", "login-service"),
            ("credential.unlock", "officer-1"),
            ("credential.disable", "login-service"),
            ("credential.delete", "login-service"),
        ]
    );
    server.shutdown().await.expect("shutdown");
}

/// 10,000 refused calls while verifications run: the refusals become a few records whose
/// counts add up to 10,000, and every verification is answered ACCEPTED meanwhile. The
/// refusal is the handler's (a login service may not lift a lock), so every call is
/// answered on its connection; the role gate in front of the handlers reports through
/// the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_calls_is_aggregated_and_verifications_go_on() {
    const REFUSED: u64 = 10_000;
    const CONNECTIONS: u64 = 4;
    const PER_CONNECTION: u64 = 8;
    const VERIFIERS: usize = 4;

    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let login = common::client(env.dir.path(), "login-service", addr).await;
    for i in 0..VERIFIERS {
        create_hotp(&login, &format!("flood-{i}"), &seed(i)).await;
    }
    let started = Instant::now();
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut verifiers = Vec::new();
    for i in 0..VERIFIERS {
        let c = common::client(env.dir.path(), "login-service", addr).await;
        let flooding = flooding.clone();
        verifiers.push(tokio::spawn(async move {
            let (id, seed) = (format!("flood-{i}"), seed(i));
            let mut counter = 0u64;
            while flooding.load(Ordering::Relaxed) {
                let r = c
                    .credentials()
                    .verify_code(pb::VerifyCodeRequest {
                        credential_id: id.clone(),
                        code: hotp(&seed, counter),
                    })
                    .await
                    .expect("verifications are answered during the flood")
                    .into_inner();
                assert_eq!(r.result, pb::VerifyResult::Accepted as i32);
                counter += 1;
            }
            counter
        }));
    }
    let calls_each = REFUSED.div_ceil(CONNECTIONS * PER_CONNECTION);
    let mut flooders = Vec::new();
    for _ in 0..CONNECTIONS {
        let c = common::client(env.dir.path(), "login-service", addr).await;
        for _ in 0..PER_CONNECTION {
            let c = c.clone();
            flooders.push(tokio::spawn(async move {
                for _ in 0..calls_each {
                    let e = c
                        .credentials()
                        .update_credential_state(pb::UpdateCredentialStateRequest {
                            credential_id: "flood-0".into(),
                            action: pb::CredentialAction::Unlock as i32,
                            tenant: String::new(),
                        })
                        .await
                        .expect_err("a login service may not unlock");
                    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
                }
            }));
        }
    }
    for f in flooders {
        f.await.expect("flooder");
    }
    let sent = calls_each * CONNECTIONS * PER_CONNECTION;
    flooding.store(false, Ordering::Relaxed);
    let mut verified = 0;
    for v in verifiers {
        verified += v.await.expect("verifier");
    }
    let elapsed = started.elapsed();
    assert!(verified > 0);

    // A checkpoint writes the refusals still being counted first.
    let auditor = common::client(env.dir.path(), "auditor", addr).await;
    auditor
        .audit()
        .checkpoint_audit(pb::CheckpointAuditRequest {})
        .await
        .expect("checkpoint");
    let (jsonl, keys) = export(&auditor).await;
    assert!(hsm_service::audit::verify(jsonl.as_slice(), &keys).is_ok());
    let denied: Vec<hsm_service::audit::AuditRecord> = std::str::from_utf8(&jsonl)
        .expect("utf-8")
        .lines()
        .map(|l| hsm_service::audit::AuditRecord::from_json_line(l).expect("record"))
        .filter(|r| r.action == "auth.denied")
        .collect();
    eprintln!(
        "{sent} refusals -> {} auth.denied records in {elapsed:?}; {verified} verifications meanwhile",
        denied.len()
    );
    let counted: u64 = denied
        .iter()
        .map(|r| {
            r.details
                .as_ref()
                .and_then(|d| d.get("count"))
                .and_then(|v| v.as_u64())
                .expect("count")
        })
        .sum();
    assert_eq!(counted, sent, "the counts add up");
    // One caller, one reason: at most one record per window of the run (and the last).
    let windows = elapsed.as_secs() + 2;
    assert!(
        (denied.len() as u64) <= windows,
        "{} records for {sent} refusals in {elapsed:?}",
        denied.len()
    );
    for r in &denied {
        let reason = r.details.as_ref().and_then(|d| d.get("reason"));
        assert_eq!(
            (
                r.actor.subject.as_str(),
                r.object.as_str(),
                reason.and_then(|v| v.as_str())
            ),
            (
                "login-service",
                "hsm.v1.CredentialService/UpdateCredentialState",
                Some("login-service")
            ),
            "{}",
            r.to_json_line()
        );
    }
    server.shutdown().await.expect("shutdown");
}

/// The service refuses to start, with one line, when the store's audit key and the
/// token's disagree: a tampered public key, a removed token object, or an audit log
/// whose key entries were removed (a new key would let a rewritten log be re-signed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_key_is_pinned_at_start_up() {
    use hsm_service::store::{Store, StoreOptions, Table};
    use ring::signature::KeyPair as _;

    let env = DevEnv::new();
    let server = env.start().await;
    server.shutdown().await.expect("shutdown");
    let path = env.config.data_dir.join(hsm_service::server::STORE_FILE);
    let store = || Store::open_redb(&path, StoreOptions::default()).expect("store");
    let start_error = || async {
        let e = match hsm_service::server::start(env.config.clone()).await {
            Ok(_) => panic!("the service must refuse to start"),
            Err(e) => e.to_string(),
        };
        assert_eq!(e.lines().count(), 1, "{e}");
        e
    };
    let (cka_id, public_key) = {
        let s = store();
        (
            s.get_meta("audit.key_id")
                .await
                .expect("meta")
                .expect("key id"),
            s.get_meta("audit.public_key")
                .await
                .expect("meta")
                .expect("public key"),
        )
    };

    // Another valid P-256 public key in the store.
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key");
    let other = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
        .expect("key")
        .public_key()
        .as_ref()
        .to_vec();
    store()
        .put_meta("audit.public_key", other)
        .await
        .expect("tamper");
    let e = start_error().await;
    assert!(
        e.contains("does not match the public key the store records"),
        "{e}"
    );

    // Put it back: the service starts again.
    store()
        .put_meta("audit.public_key", public_key.clone())
        .await
        .expect("restore");
    env.start().await.shutdown().await.expect("starts again");

    // The store's key entries gone while the log has records: no new key.
    let s = store();
    s.write(|txn| {
        txn.delete(Table::Meta, "audit.key_id")?;
        txn.delete(Table::Meta, "audit.public_key")?;
        Ok(())
    })
    .await
    .expect("remove");
    drop(s);
    let e = start_error().await;
    assert!(
        e.contains("holds checkpoints") && e.contains("refusing to create a new one"),
        "{e}"
    );
    let s = store();
    s.put_meta("audit.key_id", cka_id.clone())
        .await
        .expect("id");
    s.put_meta("audit.public_key", public_key)
        .await
        .expect("pk");
    drop(s);

    // The token's key removed.
    let hsm = hsm_service::hsm::Hsm::open(
        &hsm_service::hsm::HsmSettings {
            module: env.config.hsm.module.clone(),
            token: env.config.token(),
            sessions: 1,
            queue_capacity: 16,
            seed_cache_capacity: 16,
        },
        env.config.user_pin().expect("pin"),
    )
    .expect("hsm");
    assert!(hsm.destroy_key_pair(&cka_id).await.expect("destroy") >= 1);
    drop(hsm);
    let e = start_error().await;
    assert!(e.contains("the token has no audit key"), "{e}");
}

/// Calls the role gate refuses before their body is read are counted through the same
/// path: one record for the caller, its count, the method named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_the_role_gate_are_aggregated_too() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let auditor = common::client(env.dir.path(), "auditor", addr).await;
    for _ in 0..50 {
        let e = auditor
            .credentials()
            .verify_code(pb::VerifyCodeRequest {
                credential_id: "x".into(),
                code: "000000".into(),
            })
            .await
            .expect_err("auditors do not verify codes");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
    auditor
        .audit()
        .checkpoint_audit(pb::CheckpointAuditRequest {})
        .await
        .expect("checkpoint");
    let (jsonl, _) = export(&auditor).await;
    let denied: Vec<hsm_service::audit::AuditRecord> = std::str::from_utf8(&jsonl)
        .expect("utf-8")
        .lines()
        .map(|l| hsm_service::audit::AuditRecord::from_json_line(l).expect("record"))
        .filter(|r| r.action == "auth.denied")
        .collect();
    let count = |r: &hsm_service::audit::AuditRecord| {
        r.details
            .as_ref()
            .and_then(|d| d.get("count"))
            .and_then(|v| v.as_u64())
            .expect("count")
    };
    assert_eq!(denied.iter().map(count).sum::<u64>(), 50);
    assert!(denied.len() <= 2, "{} records", denied.len());
    assert!(
        denied
            .iter()
            .all(|r| r.object == "hsm.v1.CredentialService/VerifyCode"
                && r.actor.subject == "auditor")
    );
    server.shutdown().await.expect("shutdown");
}

/// Chains through the API: a malformed chain name is INVALID_ARGUMENT with the rule, an
/// unknown one NOT_FOUND; the list shows the embedded store's one chain with its head
/// and last checkpoint, and every chunk names its chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_are_named_on_the_wire() {
    let env = DevEnv::new();
    let server = env.start().await;
    let auditor = common::client(env.dir.path(), "auditor", server.local_addr()).await;
    let checkpoint = auditor
        .audit()
        .checkpoint_audit(pb::CheckpointAuditRequest {})
        .await
        .expect("checkpoint")
        .into_inner();
    let export = |chain: &str| {
        let mut audit = auditor.audit();
        let chain = chain.to_owned();
        async move {
            audit
                .export_audit(pb::ExportAuditRequest { from_seq: 1, chain })
                .await
        }
    };
    let err = export("a b").await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("ExportAuditRequest.chain"),
        "{}",
        err.message()
    );
    let err = export(&"x".repeat(65)).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = export("node-9").await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let mut stream = export("default").await.expect("export").into_inner();
    let mut records = 0;
    while let Some(chunk) = stream.message().await.expect("chunk") {
        assert_eq!(chunk.chain, "default");
        records += u64::from(chunk.records);
    }
    let list = auditor
        .audit()
        .list_audit_chains(pb::ListAuditChainsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.own_chain, "default");
    assert_eq!(list.chains.len(), 1);
    let c = &list.chains[0];
    assert_eq!(
        (c.chain.as_str(), c.records, c.head_seq),
        ("default", records, records)
    );
    assert_eq!(c.head_hash.len(), 64);
    assert_eq!(
        (c.last_checkpoint_seq, c.last_checkpoint_head_seq),
        (checkpoint.seq, checkpoint.head_seq)
    );
    server.shutdown().await.expect("shutdown");
}
