//! PSKC import (issue 14) through the real service: the RFC 6030 figures import or are
//! refused as the RFC demands and the codes of the RFC's seeds verify; re-runs skip,
//! differing credentials conflict and nothing is overwritten; refused files and entries
//! leave the store as it was; one audit record per batch and one `credential.created`
//! event per imported credential; malformed streams are INVALID_ARGUMENT; no seed is
//! anywhere under the data directory after an encrypted import.

mod common;

use std::path::{Path, PathBuf};

use hsm_client::import::{import_file, ImportError, ImportOptions, ImportSummary, TransportArg};
use hsm_client::proto as pb;
use hsm_client::HsmClient;
use hsm_service::testing::DevEnv;
use tonic::Code;
use zeroize::Zeroizing;

fn figure(n: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../pskc/tests/data/figure{n}.xml"))
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn options(transport: TransportArg) -> ImportOptions {
    ImportOptions {
        transport,
        mapping: None,
        dry_run: false,
        allow_unmaced: false,
        allow_rsa_1_5: false,
    }
}

fn psk(hex: &str) -> TransportArg {
    TransportArg::Psk(Zeroizing::new(unhex(hex)))
}

const FIG6_PSK: &str = "12345678901234567890123456789012";
const RFC_SEED: &[u8] = b"12345678901234567890";

async fn run(c: &HsmClient, path: &Path, o: ImportOptions) -> Result<ImportSummary, ImportError> {
    import_file(c, path, o, None, Box::new(|_, _| {})).await
}

/// An HOTP code of `digits` digits, in software.
fn hotp(seed: &[u8], counter: u64, digits: u32) -> String {
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, seed),
        &hsm_service::otp::moving_factor(counter),
    );
    let d = hsm_service::otp::Digits::new(digits).expect("digits");
    format!(
        "{:0width$}",
        hsm_service::otp::truncate(tag.as_ref(), d),
        width = digits as usize
    )
}

async fn verify(c: &HsmClient, id: &str, code: String) -> i32 {
    c.credentials()
        .verify_code(pb::VerifyCodeRequest {
            credential_id: id.into(),
            code,
        })
        .await
        .expect("verify")
        .into_inner()
        .result
}

/// Every credential id of the caller's tenant.
async fn ids(c: &HsmClient) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .credentials()
            .list_credentials(pb::ListCredentialsRequest {
                page_size: 1000,
                page_token: token,
                tenant: String::new(),
            })
            .await
            .expect("list")
            .into_inner();
        out.extend(page.credentials.into_iter().map(|c| c.credential_id));
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

async fn event_count(c: &HsmClient, kind: &str) -> usize {
    let (mut n, mut from) = (0, 0);
    loop {
        let page = c
            .events()
            .list_events(pb::ListEventsRequest {
                from_seq: from,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("events")
            .into_inner();
        let Some(last) = page.events.last() else {
            return n;
        };
        from = last.seq + 1;
        n += page.events.iter().filter(|e| e.kind == kind).count();
    }
}

async fn forget(c: &HsmClient, id: &str) {
    c.credentials()
        .delete_credential(pb::DeleteCredentialRequest {
            credential_id: id.into(),
            tenant: String::new(),
        })
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc6030_figures_import_or_are_refused_and_the_rfc_seeds_verify() {
    let env = DevEnv::new();
    let server = env.start().await;
    let c = common::client(env.dir.path(), "login-service", server.local_addr()).await;

    // Figure 6: pre-shared AES-128 key, HMAC-SHA1 MACs.
    let s = run(&c, &figure(6), options(psk(FIG6_PSK)))
        .await
        .expect("fig 6");
    assert_eq!((s.entries, s.imported, s.exit_code()), (1, 1, 0), "{s:?}");
    assert_eq!(s.decrypted_in_hsm + s.decrypted_in_host, 1);
    assert_eq!(
        verify(&c, "12345678", hotp(RFC_SEED, 0, 8)).await,
        pb::VerifyResult::Accepted as i32
    );
    // Re-run: skipped as identical, nothing overwritten (the counter moved on).
    let s = run(&c, &figure(6), options(psk(FIG6_PSK)))
        .await
        .expect("again");
    assert_eq!((s.imported, s.skipped, s.exit_code()), (0, 1, 0), "{s:?}");
    assert_eq!(
        verify(&c, "12345678", hotp(RFC_SEED, 1, 8)).await,
        pb::VerifyResult::Accepted as i32
    );
    // A wrong transport key: the whole file refused, nothing changed.
    let before = ids(&c).await;
    let e = run(&c, &figure(6), options(psk(&"ab".repeat(16))))
        .await
        .expect_err("wrong key");
    assert!(
        matches!(&e, ImportError::Service(st) if st.code() == Code::InvalidArgument),
        "{e}"
    );
    assert_eq!(ids(&c).await, before);

    // Figure 7: PBKDF2 from the password "qwerty". Its Key/@Id 123456 is new.
    let pw = |p: &str| TransportArg::Password(Zeroizing::new(p.as_bytes().to_vec()));
    let e = run(&c, &figure(7), options(pw("not-qwerty")))
        .await
        .expect_err("wrong password");
    assert!(
        matches!(&e, ImportError::Service(st) if st.code() == Code::InvalidArgument),
        "{e}"
    );
    assert_eq!(ids(&c).await, before, "a wrong password changes nothing");
    let e = run(&c, &figure(7), options(psk(FIG6_PSK)))
        .await
        .expect_err("needs a password");
    assert!(
        matches!(&e, ImportError::File(m) if m.contains("--password-file")),
        "{e}"
    );
    let s = run(&c, &figure(7), options(pw("qwerty")))
        .await
        .expect("fig 7");
    assert_eq!((s.imported, s.exit_code()), (1, 0), "{s:?}");
    assert_eq!(
        verify(&c, "123456", hotp(RFC_SEED, 0, 8)).await,
        pb::VerifyResult::Accepted as i32
    );

    // Plain values (figures 2, 3, 5, 9, 10) need allow_unmaced.
    let plain = || ImportOptions {
        allow_unmaced: true,
        ..options(psk(FIG6_PSK))
    };
    let e = run(&c, &figure(10), options(psk(FIG6_PSK)))
        .await
        .expect_err("plain values without allow_unmaced");
    assert!(
        matches!(&e, ImportError::Service(st) if st.message().contains("allow_unmaced")),
        "{e}"
    );
    // Figure 3's UserId is a DN, not a subject pseudonym: refused, unless a mapping
    // gives its serial a subject. It reuses figure 6's id (12345678) with the same seed
    // and parameters, so with a subject it is a conflict, not an overwrite.
    let s = run(&c, &figure(3), plain()).await.expect("fig 3");
    assert_eq!((s.imported, s.refused), (0, 1), "{s:?}");
    let mapped = || ImportOptions {
        mapping: Some([("987654321".to_owned(), "citizen-3".to_owned())].into()),
        ..plain()
    };
    let s = run(&c, &figure(3), mapped()).await.expect("fig 3 mapped");
    assert_eq!((s.imported, s.conflicts, s.exit_code()), (0, 1, 2), "{s:?}");
    forget(&c, "12345678").await;
    let s = run(&c, &figure(3), mapped())
        .await
        .expect("fig 3 mapped, new");
    assert_eq!((s.imported, s.exit_code()), (1, 0), "{s:?}");
    assert_eq!(
        verify(&c, "12345678", hotp(RFC_SEED, 0, 8)).await,
        pb::VerifyResult::Accepted as i32
    );
    forget(&c, "12345678").await;
    // Figure 2's secret "1234" is 32 bits: below any HOTP seed (RFC 4226: 128 bits
    // recommended, 80 the floor here).
    let s = run(&c, &figure(2), plain()).await.expect("fig 2");
    assert_eq!((s.imported, s.refused, s.exit_code()), (0, 1, 2), "{s:?}");
    // Figure 4: no secret (derived from a master key). Figure 5: the HOTP key imports
    // (its PIN is checked by the device), the PIN key (algorithm pin) is refused.
    let s = run(&c, &figure(4), plain()).await.expect("fig 4");
    assert_eq!((s.refused, s.exit_code()), (1, 2), "{s:?}");
    let s = run(&c, &figure(5), plain()).await.expect("fig 5");
    assert_eq!((s.imported, s.refused, s.exit_code()), (1, 1, 1), "{s:?}");
    // Figure 8: secrets encrypted to the RFC's own certificate with rsa_1_5: refused
    // without the explicit flag, and undecryptable with the token's transport key.
    let key = TransportArg::Key("vendor".into());
    let e = run(&c, &figure(8), options(key))
        .await
        .expect_err("no transport key");
    assert!(
        matches!(&e, ImportError::Service(st) if st.code() == Code::NotFound),
        "{e}"
    );
    server
        .state()
        .hsm
        .create_transport_key("vendor")
        .await
        .expect("transport key");
    let s = run(&c, &figure(8), options(TransportArg::Key("vendor".into())))
        .await
        .expect("fig 8");
    assert_eq!((s.refused, s.exit_code()), (1, 2), "{s:?}");
    let s = run(
        &c,
        &figure(8),
        ImportOptions {
            allow_rsa_1_5: true,
            ..options(TransportArg::Key("vendor".into()))
        },
    )
    .await
    .expect("fig 8 with rsa_1_5");
    assert_eq!((s.refused, s.exit_code()), (1, 2), "{s:?}");
    // Figure 9 (signed, recorded) and 10 (bulk, four devices).
    let s = run(&c, &figure(9), plain()).await.expect("fig 9");
    assert!(s.signed);
    assert_eq!((s.imported, s.exit_code()), (1, 0), "{s:?}");
    let s = run(&c, &figure(10), plain()).await.expect("fig 10");
    assert_eq!((s.imported, s.exit_code()), (4, 0), "{s:?}");
    assert_eq!(s.unmaced, 4);
    server.shutdown().await.expect("shutdown");
}

/// A generated encrypted file of `n` entries in `dir`.
fn generated(dir: &Path, n: u64, prefix: &str) -> (PathBuf, Vec<u8>) {
    let spec = pskc::testdata::Spec::new(n).id_prefix(prefix);
    let path = dir.join(format!("{prefix}gen.pskc"));
    let f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    pskc::testdata::write_encrypted(f, &spec).expect("generate");
    (path, spec.transport_key())
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_audit_and_events_and_no_seed_under_the_data_directory() {
    let env = DevEnv::new();
    let server = env.start().await;
    let c = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    let auditor = common::client(env.dir.path(), "auditor", server.local_addr()).await;
    let files = tempfile::tempdir().expect("tmp");
    let n = 2_500u64;
    let (path, key) = generated(files.path(), n, "gen-");
    let key = hexs(&key);
    // Dry run: everything checked, nothing stored.
    let s = run(
        &c,
        &path,
        ImportOptions {
            dry_run: true,
            ..options(psk(&key))
        },
    )
    .await
    .expect("dry run");
    assert_eq!((s.imported, s.batches, s.dry_run), (n, 0, true), "{s:?}");
    assert!(ids(&c).await.is_empty());
    let report = files.path().join("report.jsonl");
    let s = import_file(
        &c,
        &path,
        options(psk(&key)),
        Some(&report),
        Box::new(|_, _| {}),
    )
    .await
    .expect("import");
    assert_eq!((s.imported, s.batches, s.exit_code()), (n, 3, 0), "{s:?}");
    let lines = std::fs::read_to_string(&report).expect("report");
    assert_eq!(lines.lines().count() as u64, n);
    assert!(lines.lines().all(|l| l.contains(r#""result":"imported""#)));
    // One audit record per batch with the file's hash and counts.
    let records = common::audit_records(&auditor).await;
    let imports: Vec<_> = records
        .iter()
        .filter(|r| r.action == "credential.import")
        .collect();
    assert_eq!(imports.len(), 3);
    assert!(imports
        .iter()
        .all(|r| common::detail(r, "file_sha256") == s.file_sha256));
    let imported: u64 = imports
        .iter()
        .map(|r| {
            r.details
                .as_ref()
                .and_then(|d| d.get("imported"))
                .and_then(|v| v.as_u64())
                .expect("imported count")
        })
        .sum();
    assert_eq!(imported, n);
    // One credential.created event per credential, marked imported.
    assert_eq!(event_count(&c, "credential.created").await as u64, n);
    // Codes from the generator's seeds verify.
    for i in [0u64, 1234, n - 1] {
        let id = pskc::testdata::key_id("gen-", i);
        assert_eq!(
            verify(&c, &id, hotp(&pskc::testdata::seed(i), 0, 6)).await,
            pb::VerifyResult::Accepted as i32
        );
    }
    server.shutdown().await.expect("shutdown");
    // No seed, in any form, in any file under the data directory.
    let seeds: std::collections::HashSet<[u8; 20]> = (0..n).map(pskc::testdata::seed).collect();
    let hex_seeds: std::collections::HashSet<Vec<u8>> =
        seeds.iter().map(|s| hexs(s).into_bytes()).collect();
    let mut files_seen = 0;
    let mut stack = vec![env.dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).expect("read");
            files_seen += 1;
            assert!(
                !bytes.windows(20).any(|w| seeds.contains(w)),
                "a seed in {}",
                p.display()
            );
            let lower = bytes.to_ascii_lowercase();
            assert!(
                !lower.windows(40).any(|w| hex_seeds.contains(w)),
                "a hex seed in {}",
                p.display()
            );
        }
    }
    assert!(
        files_seen > 3,
        "the data directory holds the store and the token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_entries_conflicts_and_the_store_unchanged() {
    let env = DevEnv::new();
    let server = env.start().await;
    let c = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    let files = tempfile::tempdir().expect("tmp");
    let (path, key) = generated(files.path(), 20, "neg-");
    let text = std::fs::read_to_string(&path).expect("read");
    // Entry 3's ValueMAC altered, entry 5's removed.
    let entries: Vec<&str> = text.split("<ValueMAC>").collect();
    let mut altered = String::new();
    for (i, part) in entries.iter().enumerate() {
        if i == 0 {
            altered.push_str(part);
            continue;
        }
        match i {
            4 => {
                altered.push_str("<ValueMAC>AAAA");
                altered.push_str(&part[4..]);
            }
            6 => {
                let end = part.find("</ValueMAC>").expect("end") + "</ValueMAC>".len();
                altered.push_str(&part[end..]);
            }
            _ => {
                altered.push_str("<ValueMAC>");
                altered.push_str(part);
            }
        }
    }
    let bad = files.path().join("bad.pskc");
    std::fs::write(&bad, &altered).expect("write");
    let report = files.path().join("bad.jsonl");
    let s = import_file(
        &c,
        &bad,
        options(psk(&hexs(&key))),
        Some(&report),
        Box::new(|_, _| {}),
    )
    .await
    .expect("import");
    assert_eq!((s.imported, s.refused, s.exit_code()), (18, 2, 1), "{s:?}");
    let lines = std::fs::read_to_string(&report).expect("report");
    assert!(lines.contains("ValueMAC does not match"), "{lines}");
    assert!(lines.contains("no ValueMAC"), "{lines}");
    // A differing credential under an imported id: a conflict, never overwritten.
    let before = ids(&c).await;
    c.credentials()
        .delete_credential(pb::DeleteCredentialRequest {
            credential_id: "neg-00000007".into(),
            tenant: String::new(),
        })
        .await
        .expect("delete");
    c.credentials()
        .create_credential(pb::CreateCredentialRequest {
            credential_id: "neg-00000007".into(),
            kind: pb::OtpKind::Hotp as i32,
            seed: b"another-seed-entirely".to_vec(),
            ..Default::default()
        })
        .await
        .expect("create");
    let s = run(&c, &bad, options(psk(&hexs(&key))))
        .await
        .expect("rerun");
    assert_eq!(
        (s.imported, s.skipped, s.conflicts, s.refused),
        (0, 17, 1, 2),
        "{s:?}"
    );
    assert_eq!(ids(&c).await, before);
    assert_eq!(
        verify(
            &c,
            "neg-00000007",
            common::hotp(b"another-seed-entirely", 0)
        )
        .await,
        pb::VerifyResult::Accepted as i32
    );
    // Truncated XML and an entity bomb: refused whole, nothing sent.
    let created = event_count(&c, "credential.created").await;
    for (name, content) in [
        ("truncated", text[..text.len() / 2].to_owned()),
        (
            "bomb",
            format!(
                "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]>{}",
                &text[text.find("<KeyContainer").expect("root")..]
            ),
        ),
        (
            "external",
            format!(
                "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY ext SYSTEM \"file:///etc/passwd\">]>{}",
                &text[text.find("<KeyContainer").expect("root")..]
            ),
        ),
    ] {
        let p = files.path().join(name);
        std::fs::write(&p, content).expect("write");
        let e = run(&c, &p, options(psk(&hexs(&key)))).await.expect_err(name);
        assert!(matches!(e, ImportError::File(_)), "{name}: {e}");
    }
    assert_eq!(event_count(&c, "credential.created").await, created);
    assert_eq!(ids(&c).await, before);
    server.shutdown().await.expect("shutdown");
}

fn header(psk: Vec<u8>) -> pb::ImportHeader {
    pb::ImportHeader {
        transport: Some(pb::import_header::Transport::Psk(psk)),
        file_sha256: vec![0; 32],
        allow_unmaced: true,
        ..Default::default()
    }
}

async fn stream(
    c: &HsmClient,
    msgs: Vec<pb::ImportCredentialsRequest>,
) -> Result<pb::ImportCredentialsResponse, tonic::Status> {
    c.credentials()
        .import_credentials(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

fn hdr(h: pb::ImportHeader) -> pb::ImportCredentialsRequest {
    pb::ImportCredentialsRequest {
        message: Some(pb::import_credentials_request::Message::Header(h)),
    }
}

fn batch(entries: Vec<pb::ImportEntry>) -> pb::ImportCredentialsRequest {
    pb::ImportCredentialsRequest {
        message: Some(pb::import_credentials_request::Message::Batch(
            pb::ImportBatch { entries },
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_import_streams_are_invalid_argument() {
    let env = DevEnv::new();
    let server = env.start().await;
    let c = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    let ok = || header(vec![1; 16]);
    let entry = |id: &str| pb::ImportEntry {
        credential_id: id.into(),
        kind: pb::OtpKind::Hotp as i32,
        plain_secret: RFC_SEED.to_vec(),
        ..Default::default()
    };
    let cases: Vec<(&str, Vec<pb::ImportCredentialsRequest>, &str)> = vec![
        ("empty stream", vec![], "empty import stream"),
        (
            "batch first",
            vec![batch(vec![entry("a")])],
            "first message",
        ),
        ("two headers", vec![hdr(ok()), hdr(ok())], "only the first"),
        (
            "empty message",
            vec![hdr(ok()), pb::ImportCredentialsRequest { message: None }],
            "a header or a batch",
        ),
        ("short psk", vec![hdr(header(vec![1; 15]))], "header.psk"),
        (
            "no transport",
            vec![hdr(pb::ImportHeader {
                transport: None,
                ..ok()
            })],
            "header.transport",
        ),
        (
            "bad hash",
            vec![hdr(pb::ImportHeader {
                file_sha256: vec![0; 31],
                ..ok()
            })],
            "file_sha256",
        ),
        (
            "mac method without key",
            vec![hdr(pb::ImportHeader {
                mac_method: "http://www.w3.org/2000/09/xmldsig#hmac-sha1".into(),
                ..ok()
            })],
            "encrypted_mac_key",
        ),
        (
            "unknown mac method",
            vec![hdr(pb::ImportHeader {
                mac_method: "urn:x".into(),
                encrypted_mac_key: Some(pb::EncryptedData::default()),
                ..ok()
            })],
            "mac_method",
        ),
        (
            "no mac, no allow_unmaced",
            vec![hdr(pb::ImportHeader {
                allow_unmaced: false,
                ..ok()
            })],
            "no MAC key",
        ),
        (
            "zero iterations",
            vec![hdr(pb::ImportHeader {
                transport: Some(pb::import_header::Transport::Password(
                    pb::PasswordTransport {
                        password: b"pw".to_vec(),
                        salt: b"salt".to_vec(),
                        iteration_count: 0,
                        key_length: 16,
                        prf: String::new(),
                    },
                )),
                ..ok()
            })],
            "iteration_count",
        ),
        (
            "bad transport key name",
            vec![hdr(pb::ImportHeader {
                transport: Some(pb::import_header::Transport::TransportKey(
                    "Bad Name".into(),
                )),
                ..ok()
            })],
            "transport_key",
        ),
    ];
    for (name, msgs, needle) in cases {
        let e = stream(&c, msgs).await.expect_err(name);
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {}", e.message());
        assert!(e.message().contains(needle), "{name}: {}", e.message());
    }
    // What the file got wrong is the entry's refusal, not the stream's.
    let mut unknown = entry("u1");
    unknown.plain_secret.clear();
    unknown.encrypted_secret = Some(pb::EncryptedData {
        method: "urn:unknown".into(),
        cipher_value: vec![0; 32],
    });
    let mut short = entry("u2");
    short.plain_secret = vec![1; 9];
    let mut long = entry("u3");
    long.plain_secret = vec![1; 65];
    let r = stream(
        &c,
        vec![
            hdr(ok()),
            batch(vec![
                unknown,
                short,
                long,
                entry("dup"),
                entry("dup"),
                entry("ok-1"),
            ]),
        ],
    )
    .await
    .expect("per-entry refusals");
    assert_eq!((r.imported, r.refused), (2, 4), "{r:?}");
    let reasons: Vec<&str> = r.results.iter().map(|x| x.reason.as_str()).collect();
    assert!(
        reasons[0].contains("unsupported encryption method"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("9 bytes"), "{reasons:?}");
    assert!(reasons[2].contains("65 bytes"), "{reasons:?}");
    assert!(reasons[3].contains("twice"), "{reasons:?}");
    // An officer may not import (the tenant comes from a login service's certificate).
    let officer = common::client(env.dir.path(), "officer-1", server.local_addr()).await;
    let e = stream(&officer, vec![hdr(ok())])
        .await
        .expect_err("officer");
    assert_eq!(e.code(), Code::PermissionDenied);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pskc_transport_key_creates_a_token_key_pair_and_prints_its_public_key() {
    use base64::Engine;
    let env = DevEnv::new();
    let config = env.dir.path().join("config.toml");
    let cmd = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hsm-service"))
            .arg("pskc-transport-key")
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("run hsm-service")
    };
    let created = cmd(&["vendor-x"]);
    assert!(created.status.success(), "{created:?}");
    let pem = String::from_utf8(created.stdout).expect("utf-8");
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    assert!(
        pem.trim_end().ends_with("-----END PUBLIC KEY-----"),
        "{pem}"
    );
    let again = cmd(&["vendor-x"]);
    assert!(!again.status.success(), "a name is created once: {again:?}");
    let shown = cmd(&["--show", "vendor-x"]);
    assert!(shown.status.success(), "{shown:?}");
    assert_eq!(String::from_utf8_lossy(&shown.stdout), pem);
    let bad = cmd(&["Not A Name"]);
    assert!(!bad.status.success());

    // The running service finds it: the PEM is its public key, and a file encrypted to
    // another key (figure 8, the RFC's certificate) is refused entry by entry.
    let server = env.start().await;
    let (n, e) = server
        .state()
        .hsm
        .transport_public_key("vendor-x")
        .await
        .expect("on the token");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64");
    let expected = hsm_service::common::PublicKey::from_rsa_components(&n, &e)
        .and_then(|k| k.to_spki_der())
        .expect("spki");
    assert_eq!(der, expected);
    let c = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    let s = run(
        &c,
        &figure(8),
        ImportOptions {
            allow_rsa_1_5: true,
            ..options(TransportArg::Key("vendor-x".into()))
        },
    )
    .await
    .expect("fig 8");
    assert_eq!((s.imported, s.refused), (0, 1), "{s:?}");
    let auditor = common::client(env.dir.path(), "auditor", server.local_addr()).await;
    let records = common::audit_records(&auditor).await;
    let made = records
        .iter()
        .find(|r| r.action == "pskc-transport-key.create")
        .expect("the creation is audited");
    assert_eq!(made.object, "vendor-x");
    assert_eq!(
        common::detail(made, "spki_sha256"),
        hsm_service::audit::sha256_hex(&der)
    );
    server.shutdown().await.expect("shutdown");
}
