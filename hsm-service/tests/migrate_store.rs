//! `hsm-service migrate-store`: an embedded store holding credentials, keys, a ceremony
//! and audit records moves into an empty PostgreSQL database; the counts match, the
//! audit trail verifies on the target, the service then runs on the target exactly as
//! before (an accepted code stays REPLAYED), and a second run into the now non-empty
//! database is refused. Needs `HSM_TEST_POSTGRES_URL` (scripts/postgres.sh); skips
//! without it, except under CI=true, where it fails.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use hsm_client::proto as pb;
use hsm_service::config::{StoreBackendKind, StoreConfig};
use hsm_service::store::postgres::testing::TestDatabase;
use hsm_service::store::{Store, Table};
use hsm_service::testing::DevEnv;

const PLAN: &str = r#"
version = 1
description = "a raw key to migrate"

[[step]]
kind = "generate-key"
name = "receipts"
algorithm = "ES256"
usage = "raw"
"#;

fn migrate(config: &Path, url: &str, password_file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hsm-service"))
        .args(["migrate-store", "--config"])
        .arg(config)
        .args(["--to-postgres", url, "--password-file"])
        .arg(password_file)
        .env_remove("SOFTHSM2_CONF")
        .output()
        .expect("run hsm-service migrate-store")
}

/// Rows per table (meta without the engine's own `store.*` settings) and records per
/// audit chain, read through the storage interface.
async fn counts(store: &Store) -> (Vec<u64>, Vec<(String, u64)>) {
    store
        .read(|txn| {
            let mut rows = Vec::new();
            for &t in Table::ALL {
                let mut n = txn.count(t)?;
                if t == Table::Meta {
                    n -= txn
                        .scan(
                            t,
                            &hsm_service::store::KeyRange::prefix("store."),
                            usize::MAX,
                        )?
                        .len() as u64;
                }
                rows.push(n);
            }
            let mut chains = Vec::new();
            for c in txn.audit_chains()? {
                let n = txn.audit_count(&c)?;
                chains.push((c, n));
            }
            Ok((rows, chains))
        })
        .await
        .expect("counts")
}

async fn export(auditor: &hsm_client::HsmClient) -> Vec<u8> {
    let mut stream = auditor
        .audit()
        .export_audit(pb::ExportAuditRequest {
            from_seq: 1,
            chain: String::new(),
        })
        .await
        .expect("export")
        .into_inner();
    let mut out = Vec::new();
    let mut current = hsm_service::audit::DEFAULT_CHAIN.to_owned();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        if chunk.chain != current {
            out.extend_from_slice(hsm_service::audit::chain_header(&chunk.chain).as_bytes());
            out.push(b'\n');
            current = chunk.chain.clone();
        }
        out.extend_from_slice(&chunk.jsonl);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_moves_to_postgres_and_answers_the_same() {
    let Some(db) = tokio::task::spawn_blocking(TestDatabase::create)
        .await
        .expect("set-up")
    else {
        return;
    };
    let mut env = DevEnv::new();
    let config_file = env.dir.path().join("config.toml");
    assert!(config_file.is_file(), "dev writes its config.toml");

    // The embedded store: a credential with an accepted code, a key made by a ceremony,
    // audit records with a checkpoint.
    let server = env.start().await;
    let addr = server.local_addr();
    let login = common::client(env.dir.path(), "login-service", addr).await;
    let o1 = common::client(env.dir.path(), "officer-1", addr).await;
    let o2 = common::client(env.dir.path(), "officer-2", addr).await;
    let auditor = common::client(env.dir.path(), "auditor", addr).await;
    common::enrol(&login, "m-1", "citizen-1").await;
    let r = common::verify_hotp(&login, "m-1", 0).await;
    assert_eq!(r.result, pb::VerifyResult::Accepted as i32);
    let id = common::propose(&o1, PLAN).await.expect("propose");
    common::approve_with_share(&o1, &id, "")
        .await
        .expect("approve");
    common::approve_with_share(&o2, &id, "")
        .await
        .expect("approve");
    let done = common::execute(&o2, &id).await.expect("execute");
    assert_eq!(done.ceremony.expect("ceremony").state, "succeeded");
    auditor
        .audit()
        .checkpoint_audit(pb::CheckpointAuditRequest {})
        .await
        .expect("checkpoint");
    let keys: std::collections::HashMap<String, Vec<u8>> = auditor
        .audit()
        .get_audit_keys(pb::GetAuditKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.key_id, k.public_key))
        .collect();
    let before = export(&auditor).await;
    drop((login, o1, o2, auditor));
    server.shutdown().await.expect("shutdown");

    let source = Store::open_redb(
        &env.config.data_dir.join(hsm_service::store::EMBEDDED_FILE),
        Default::default(),
    )
    .expect("source");
    let (source_rows, source_chains) = counts(&source).await;
    source.close().expect("close");
    for (t, n) in Table::ALL.iter().zip(&source_rows) {
        if [
            Table::Credentials,
            Table::SigningKeys,
            Table::Ceremonies,
            Table::Meta,
        ]
        .contains(t)
        {
            assert!(*n > 0, "the source holds no {}", t.name());
        }
    }

    // The migration, with the service stopped.
    let password = env.dir.path().join("db.password");
    std::fs::write(&password, "unused-with-trust-auth\n").expect("password");
    let out = tokio::task::spawn_blocking({
        let (c, u, p) = (config_file.clone(), db.url.clone(), password.clone());
        move || migrate(&c, &u, &p)
    })
    .await
    .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("table tenant_credentials"), "{stdout}");
    assert!(stdout.contains("audit chain default OK"), "{stdout}");
    assert!(stdout.contains("backend = \"postgres\""), "{stdout}");
    assert!(
        stdout.contains(&format!("url = \"{}\"", db.url)),
        "{stdout}"
    );
    assert!(!stdout.contains("MISMATCH"), "{stdout}");

    // Counts on the target, read through the interface.
    let probe = tokio::task::spawn_blocking({
        let db_url = db.url.clone();
        move || {
            let mut o = hsm_service::store::postgres::PgOptions::new(db_url, "probe");
            o.pool_size = 1;
            let b = hsm_service::store::postgres::PgBackend::open(&o).expect("open");
            std::sync::Arc::new(
                Store::with_backend(std::sync::Arc::new(b), Default::default()).expect("store"),
            )
        }
    })
    .await
    .expect("probe");
    let (target_rows, target_chains) = counts(&probe).await;
    assert_eq!(target_rows, source_rows);
    assert_eq!(target_chains, source_chains);
    tokio::task::spawn_blocking(move || drop(probe))
        .await
        .expect("close probe");

    // The service on the target: the same answers (the accepted code is REPLAYED), the
    // ceremony and its key are there, and the trail continues the migrated chain.
    env.config.store = StoreConfig {
        backend: StoreBackendKind::Postgres,
        url: Some(db.url.clone()),
        instance: Some("default".into()),
        pool_size: 2,
        ..StoreConfig::default()
    };
    let server = env.start().await;
    let addr = server.local_addr();
    let login = common::client(env.dir.path(), "login-service", addr).await;
    let o1 = common::client(env.dir.path(), "officer-1", addr).await;
    let auditor = common::client(env.dir.path(), "auditor", addr).await;
    let r = common::verify_hotp(&login, "m-1", 0).await;
    assert_eq!(r.result, pb::VerifyResult::Replayed as i32);
    let r = common::verify_hotp(&login, "m-1", 1).await;
    assert_eq!(r.result, pb::VerifyResult::Accepted as i32);
    let c = o1
        .ceremonies()
        .get_ceremony(pb::GetCeremonyRequest {
            ceremony_id: id.clone(),
        })
        .await
        .expect("ceremony")
        .into_inner();
    assert_eq!(c.state, "succeeded");
    auditor
        .audit()
        .checkpoint_audit(pb::CheckpointAuditRequest {})
        .await
        .expect("checkpoint");
    let after = export(&auditor).await;
    assert!(
        after.starts_with(&before),
        "the migrated records stay as they were"
    );
    let report = hsm_service::audit::verify_chains(
        after.as_slice(),
        &keys,
        &hsm_service::audit::ChainsOptions::default(),
    );
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.chains.len(), 1, "{report}");
    drop((login, o1, auditor));
    server.shutdown().await.expect("shutdown");

    // A second run: the target is not empty now.
    let out = tokio::task::spawn_blocking({
        let (c, u, p) = (config_file.clone(), db.url.clone(), password.clone());
        move || migrate(&c, &u, &p)
    })
    .await
    .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the target store is not empty (table "),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("name a new, empty one (CREATE DATABASE), or drop and create this one again"),
        "says what to do: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
}

/// Refusals before anything is opened: a URL with a password in it, and a config whose
/// store is PostgreSQL already. No database needed.
#[test]
fn bad_invocations_are_refused_with_one_line() {
    let env = DevEnv::new();
    let config = env.dir.path().join("config.toml");
    let password = env.dir.path().join("db.password");
    std::fs::write(&password, "pw\n").expect("password");
    let out = migrate(
        &config,
        "postgresql://hsm:secret@127.0.0.1:1/hsm",
        &password,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--to-postgres"), "{stderr}");
    assert!(
        !stderr.contains("secret"),
        "the password is never echoed: {stderr}"
    );

    let pg_config = env.dir.path().join("pg.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &pg_config,
        format!(
            "{text}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://hsm@127.0.0.1:1/hsm\"\n"
        ),
    )
    .expect("write");
    let out = migrate(&pg_config, "postgresql://hsm@127.0.0.1:1/hsm", &password);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already PostgreSQL"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_hsm-service"))
        .args(["migrate-store", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "clap refuses missing flags");
}
