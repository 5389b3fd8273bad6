//! CredentialService over mTLS with the real client: RFC vectors, replay, concurrency,
//! crash durability, seeds never at rest in plaintext, roles and malformed requests.

mod common;

use std::path::Path;

use hsm_client::proto as pb;
use hsm_client::proto::credential_service_client::CredentialServiceClient;
use hsm_service::hsm::objects::ObjectClass;
use hsm_service::hsm::seeds::master_key_label;
use hsm_service::otp::{self, rfc_vectors, Digits, HashAlgorithm};
use hsm_service::testing::DevEnv;
use tonic::transport::Channel;
use tonic::Code;

type Client = CredentialServiceClient<Channel>;

async fn credentials(dir: &Path, identity: &str, addr: std::net::SocketAddr) -> Client {
    CredentialServiceClient::new(common::client(dir, identity, addr).await.channel())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn code(seed: &[u8], alg: HashAlgorithm, factor: u64, digits: u32) -> String {
    let ring_alg = match alg {
        HashAlgorithm::Sha1 => ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        HashAlgorithm::Sha256 => ring::hmac::HMAC_SHA256,
        HashAlgorithm::Sha512 => ring::hmac::HMAC_SHA512,
    };
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring_alg, seed),
        &otp::moving_factor(factor),
    );
    let value = otp::truncate(tag.as_ref(), Digits::new(digits).expect("digits"));
    format!("{value:0width$}", width = digits as usize)
}

fn import(
    id: &str,
    kind: pb::OtpKind,
    alg: pb::HashAlgorithm,
    digits: u32,
    seed: &[u8],
) -> pb::CreateCredentialRequest {
    pb::CreateCredentialRequest {
        credential_id: id.into(),
        kind: kind as i32,
        algorithm: alg as i32,
        digits,
        seed: seed.to_vec(),
        issuer: "Example".into(),
        account_name: "alice".into(),
        ..Default::default()
    }
}

async fn verify(c: &mut Client, id: &str, code: &str) -> pb::VerifyResult {
    let r = c
        .verify_code(pb::VerifyCodeRequest {
            credential_id: id.into(),
            code: code.into(),
        })
        .await
        .expect("verify")
        .into_inner();
    pb::VerifyResult::try_from(r.result).expect("result")
}

#[tokio::test]
async fn rfc_vectors_replay_and_window_over_grpc() {
    let env = DevEnv::new();
    let server = env.start().await;
    let mut c = credentials(env.dir.path(), "login-service", server.local_addr()).await;

    // RFC 4226 Appendix D: counters 0..9 in order, then a replay.
    c.create_credential(import(
        "hotp",
        pb::OtpKind::Hotp,
        pb::HashAlgorithm::Sha1,
        6,
        rfc_vectors::RFC4226_SEED,
    ))
    .await
    .expect("create");
    for v in rfc_vectors::RFC4226_VECTORS.iter() {
        assert_eq!(
            verify(&mut c, "hotp", &format!("{:06}", v.code)).await,
            pb::VerifyResult::Accepted
        );
    }
    assert_eq!(
        verify(
            &mut c,
            "hotp",
            &format!("{:06}", rfc_vectors::RFC4226_VECTORS[9].code)
        )
        .await,
        pb::VerifyResult::Replayed
    );

    // RFC 6238 seeds, 8 digits, at the current time: ACCEPTED, REPLAYED, and a code two
    // steps outside the window REJECTED.
    for (alg, pb_alg) in [
        (HashAlgorithm::Sha1, pb::HashAlgorithm::Sha1),
        (HashAlgorithm::Sha256, pb::HashAlgorithm::Sha256),
        (HashAlgorithm::Sha512, pb::HashAlgorithm::Sha512),
    ] {
        let seed = rfc_vectors::rfc6238_seed(alg);
        let id = format!("totp-{}", alg.uri_name());
        c.create_credential(import(&id, pb::OtpKind::Totp, pb_alg, 8, seed))
            .await
            .expect("create");
        let step = now() / 30;
        let outside = code(seed, alg, step + 3, 8);
        let inside: Vec<String> = (step - 1..=step + 2)
            .map(|s| code(seed, alg, s, 8))
            .collect();
        if !inside.contains(&outside) {
            assert_eq!(
                verify(&mut c, &id, &outside).await,
                pb::VerifyResult::Rejected,
                "{alg:?}"
            );
        }
        let current = code(seed, alg, now() / 30, 8);
        assert_eq!(
            verify(&mut c, &id, &current).await,
            pb::VerifyResult::Accepted,
            "{alg:?}"
        );
        assert_eq!(
            verify(&mut c, &id, &current).await,
            pb::VerifyResult::Replayed,
            "{alg:?}"
        );
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_simultaneous_verifications_accept_once() {
    let env = DevEnv::new();
    let server = env.start().await;
    let mut c = credentials(env.dir.path(), "login-service", server.local_addr()).await;
    let seed = b"concurrency-seed-0001";
    c.create_credential(import(
        "race",
        pb::OtpKind::Hotp,
        pb::HashAlgorithm::Sha1,
        6,
        seed,
    ))
    .await
    .expect("create");
    let valid = code(seed, HashAlgorithm::Sha1, 3, 6);
    let calls: Vec<_> = (0..32)
        .map(|_| {
            let mut c = c.clone();
            let valid = valid.clone();
            tokio::spawn(async move { verify(&mut c, "race", &valid).await })
        })
        .collect();
    let mut accepted = 0;
    let mut replayed = 0;
    for call in calls {
        match call.await.expect("join") {
            pb::VerifyResult::Accepted => accepted += 1,
            pb::VerifyResult::Replayed => replayed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((accepted, replayed), (1, 31));
    server.shutdown().await.expect("shutdown");
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn accepted_code_survives_sigkill_and_no_seed_is_stored_in_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = common::spawn_dev(dir.path());
    let mut c = credentials(dir.path(), "login-service", addr).await;
    let seed: &[u8] = &[
        0x8e, 0x21, 0x5c, 0xf3, 0x07, 0x99, 0xd4, 0x6a, 0x3b, 0xe0, 0x51, 0x1f, 0xc8, 0x72, 0xad,
        0x94, 0x66, 0x0b, 0xfa, 0x2d,
    ];
    c.create_credential(import(
        "crash",
        pb::OtpKind::Totp,
        pb::HashAlgorithm::Sha1,
        6,
        seed,
    ))
    .await
    .expect("create");
    let valid = code(seed, HashAlgorithm::Sha1, now() / 30, 6);
    assert_eq!(
        verify(&mut c, "crash", &valid).await,
        pb::VerifyResult::Accepted
    );
    common::kill(&mut child);

    // Not in any file: store, token directory, config, logs.
    let b32 = data_encoding::BASE32_NOPAD.encode(seed);
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    for file in files(dir.path()) {
        let bytes = std::fs::read(&file).expect("read");
        assert!(
            !contains(&bytes, seed),
            "plaintext seed in {}",
            file.display()
        );
        assert!(
            !contains(&bytes, b32.as_bytes()),
            "base32 seed in {}",
            file.display()
        );
        assert!(
            !contains(&bytes, hex.as_bytes()),
            "hex seed in {}",
            file.display()
        );
    }

    let (mut child, addr) = common::spawn_dev(dir.path());
    let mut c = credentials(dir.path(), "login-service", addr).await;
    assert_eq!(
        verify(&mut c, "crash", &valid).await,
        pb::VerifyResult::Replayed
    );
    assert!(common::terminate(&mut child).success());
}

#[tokio::test]
async fn the_master_key_never_leaves_the_hsm() {
    let env = DevEnv::new();
    let server = env.start().await;
    let facts = server
        .state()
        .hsm
        .key_facts(ObjectClass::SECRET_KEY, &master_key_label(1))
        .await
        .expect("master key");
    assert!(
        facts.token && facts.sensitive && !facts.extractable,
        "{facts:?}"
    );
    assert!(
        facts.always_sensitive && facts.never_extractable && facts.local,
        "{facts:?}"
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn roles_per_rpc() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let mut login = credentials(env.dir.path(), "login-service", addr).await;
    let mut officer = credentials(env.dir.path(), "officer-1", addr).await;
    let mut auditor = credentials(env.dir.path(), "auditor", addr).await;
    login
        .create_credential(import(
            "r",
            pb::OtpKind::Hotp,
            pb::HashAlgorithm::Sha1,
            6,
            b"0123456789abcdef",
        ))
        .await
        .expect("create");
    let err = officer
        .create_credential(import(
            "o",
            pb::OtpKind::Hotp,
            pb::HashAlgorithm::Sha1,
            6,
            b"0123456789abcdef",
        ))
        .await
        .expect_err("officers do not enrol");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = auditor
        .get_credential(pb::GetCredentialRequest {
            tenant: String::new(),
            credential_id: "r".into(),
        })
        .await
        .expect_err("auditors do not read credentials");
    assert_eq!(err.code(), Code::PermissionDenied);
    let unlock = pb::UpdateCredentialStateRequest {
        tenant: "login-service".into(),
        credential_id: "r".into(),
        action: pb::CredentialAction::Unlock as i32,
    };
    let err = login
        .update_credential_state(unlock.clone())
        .await
        .expect_err("only officers unlock");
    assert_eq!(err.code(), Code::PermissionDenied);
    officer
        .update_credential_state(unlock)
        .await
        .expect("officer unlocks");
    let disable = pb::UpdateCredentialStateRequest {
        tenant: String::new(),
        credential_id: "r".into(),
        action: pb::CredentialAction::Disable as i32,
    };
    let c = login
        .update_credential_state(disable)
        .await
        .expect("disable")
        .into_inner();
    assert_eq!(c.state, pb::CredentialState::Disabled as i32);
    let got = officer
        .get_credential(pb::GetCredentialRequest {
            tenant: "login-service".into(),
            credential_id: "r".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.credential_id, "r");
    officer
        .delete_credential(pb::DeleteCredentialRequest {
            tenant: "login-service".into(),
            credential_id: "r".into(),
        })
        .await
        .expect("officer deletes");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn lockout_then_officer_unlock() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let mut login = credentials(env.dir.path(), "login-service", addr).await;
    let seed = b"lockout-seed-0000001";
    login
        .create_credential(import(
            "l",
            pb::OtpKind::Hotp,
            pb::HashAlgorithm::Sha1,
            6,
            seed,
        ))
        .await
        .expect("create");
    let right = code(seed, HashAlgorithm::Sha1, 0, 6);
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    let mut last = None;
    for _ in 0..5 {
        last = Some(
            login
                .verify_code(pb::VerifyCodeRequest {
                    credential_id: "l".into(),
                    code: wrong.into(),
                })
                .await
                .expect("verify")
                .into_inner(),
        );
    }
    let last = last.expect("five answers");
    assert_eq!(last.result, pb::VerifyResult::Rejected as i32);
    // The fifth failure locks: no attempt is left until the back-off ends.
    assert_eq!((last.retry_after_seconds, last.remaining_attempts), (30, 0));
    let locked = login
        .verify_code(pb::VerifyCodeRequest {
            credential_id: "l".into(),
            code: right.clone(),
        })
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(locked.result, pb::VerifyResult::Locked as i32);
    assert!((1..=30).contains(&locked.retry_after_seconds));
    let got = login
        .get_credential(pb::GetCredentialRequest {
            tenant: String::new(),
            credential_id: "l".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (got.state, got.failures),
        (pb::CredentialState::Locked as i32, 5)
    );
    let mut officer = credentials(env.dir.path(), "officer-3", addr).await;
    let c = officer
        .update_credential_state(pb::UpdateCredentialStateRequest {
            tenant: "login-service".into(),
            credential_id: "l".into(),
            action: pb::CredentialAction::Unlock as i32,
        })
        .await
        .expect("unlock")
        .into_inner();
    assert_eq!(
        (c.state, c.failures),
        (pb::CredentialState::Active as i32, 0)
    );
    assert_eq!(
        verify(&mut login, "l", &right).await,
        pb::VerifyResult::Accepted
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn malformed_requests_get_invalid_argument() {
    let env = DevEnv::new();
    let server = env.start().await;
    let mut c = credentials(env.dir.path(), "login-service", server.local_addr()).await;
    let base = || {
        import(
            "m",
            pb::OtpKind::Hotp,
            pb::HashAlgorithm::Sha1,
            6,
            b"0123456789abcdef",
        )
    };
    let cases: Vec<(&str, pb::CreateCredentialRequest, &str)> = vec![
        (
            "no kind",
            pb::CreateCredentialRequest { kind: 0, ..base() },
            "kind",
        ),
        (
            "unknown kind",
            pb::CreateCredentialRequest { kind: 7, ..base() },
            "kind",
        ),
        (
            "unknown algorithm",
            pb::CreateCredentialRequest {
                algorithm: 9,
                ..base()
            },
            "algorithm",
        ),
        (
            "digits 5",
            pb::CreateCredentialRequest {
                digits: 5,
                ..base()
            },
            "digits",
        ),
        (
            "9-byte seed",
            pb::CreateCredentialRequest {
                seed: vec![1; 9],
                ..base()
            },
            "seed",
        ),
        (
            "reveal an import",
            pb::CreateCredentialRequest {
                reveal_seed: true,
                ..base()
            },
            "reveal_seed",
        ),
        (
            "id with space",
            pb::CreateCredentialRequest {
                credential_id: "a b".into(),
                ..base()
            },
            "credential_id",
        ),
    ];
    for (name, req, field) in cases {
        let err = c.create_credential(req).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}");
        assert!(err.message().contains(field), "{name}: {}", err.message());
    }
    c.create_credential(base()).await.expect("create");
    let err = c.create_credential(base()).await.expect_err("duplicate");
    assert_eq!(err.code(), Code::AlreadyExists);
    for bad in ["", "12345", "1234567", "12 456", "abcdef"] {
        let err = c
            .verify_code(pb::VerifyCodeRequest {
                credential_id: "m".into(),
                code: bad.into(),
            })
            .await
            .expect_err(bad);
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            !err.message().contains(bad) || bad.is_empty(),
            "the code must not be echoed"
        );
    }
    let err = c
        .verify_code(pb::VerifyCodeRequest {
            credential_id: "missing".into(),
            code: "123456".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .verify_code(pb::VerifyCodeRequest {
            credential_id: String::new(),
            code: "123456".into(),
        })
        .await
        .expect_err("empty id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .resync_credential(pb::ResyncCredentialRequest {
            credential_id: "m".into(),
            code1: "123456".into(),
            code2: "x".into(),
        })
        .await
        .expect_err("bad code2");
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("code2"),
        "{err:?}"
    );
    let err = c
        .update_credential_state(pb::UpdateCredentialStateRequest {
            tenant: String::new(),
            credential_id: "m".into(),
            action: 0,
        })
        .await
        .expect_err("no action");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .list_credentials(pb::ListCredentialsRequest {
            page_size: 5000,
            page_token: String::new(),
            tenant: String::new(),
        })
        .await
        .expect_err("page too big");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .list_credentials(pb::ListCredentialsRequest {
            page_size: 10,
            page_token: "not a token!".into(),
            tenant: String::new(),
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::InvalidArgument);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn list_pages_through_every_credential() {
    let env = DevEnv::new();
    let server = env.start().await;
    let mut c = credentials(env.dir.path(), "login-service", server.local_addr()).await;
    for i in 0..7 {
        c.create_credential(import(
            &format!("p{i}"),
            pb::OtpKind::Hotp,
            pb::HashAlgorithm::Sha1,
            6,
            b"0123456789abcdef",
        ))
        .await
        .expect("create");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_credentials(pb::ListCredentialsRequest {
                page_size: 3,
                page_token: token,
                tenant: String::new(),
            })
            .await
            .expect("list")
            .into_inner();
        seen.extend(page.credentials.into_iter().map(|c| c.credential_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (0..7).map(|i| format!("p{i}")).collect::<Vec<_>>());
    server.shutdown().await.expect("shutdown");
}

/// Store tampering seen from a login service: credential A's wrapped seed copied into
/// B's record in the store. Neither B's code nor A's is ever ACCEPTED for B; each call
/// fails with DATA_LOSS (the seed fails its integrity check), nothing is counted, and A
/// keeps working.
#[tokio::test]
async fn a_wrapped_seed_moved_between_records_answers_data_loss() {
    use hsm_service::store::{CredentialStore, Update};
    let env = DevEnv::new();
    let server = env.start().await;
    let mut login = credentials(env.dir.path(), "login-service", server.local_addr()).await;
    let (seed_a, seed_b) = (b"seed-of-credential-a", b"seed-of-credential-b");
    for (id, seed) in [("a", seed_a), ("b", seed_b)] {
        login
            .create_credential(import(
                id,
                pb::OtpKind::Hotp,
                pb::HashAlgorithm::Sha1,
                6,
                seed,
            ))
            .await
            .expect("create");
    }
    let sha1 = HashAlgorithm::Sha1;
    assert_eq!(
        verify(&mut login, "a", &code(seed_a, sha1, 0, 6)).await,
        pb::VerifyResult::Accepted
    );
    let store = server.state().store.clone();
    let tenant = "login-service";
    let a = store.get(tenant, "a").await.expect("get").expect("a");
    let (blob, binding) = (a.wrapped_seed.clone(), a.seed_binding);
    store
        .update(tenant, "b", move |r| {
            r.wrapped_seed = blob;
            r.seed_binding = binding;
            Update::Write(())
        })
        .await
        .expect("tamper");
    for c in [code(seed_a, sha1, 1, 6), code(seed_b, sha1, 0, 6)] {
        let err = login
            .verify_code(pb::VerifyCodeRequest {
                credential_id: "b".into(),
                code: c,
            })
            .await
            .expect_err("never a verdict");
        assert_eq!(err.code(), Code::DataLoss, "{err:?}");
        assert!(
            err.message().contains("failed its integrity check"),
            "{err:?}"
        );
    }
    let b = store.get(tenant, "b").await.expect("get").expect("b");
    assert_eq!((b.failures, b.last_accepted), (0, None));
    assert_eq!(
        verify(&mut login, "a", &code(seed_a, sha1, 1, 6)).await,
        pb::VerifyResult::Accepted
    );
    server.shutdown().await.expect("shutdown");
}
