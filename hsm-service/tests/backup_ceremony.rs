//! Backup and restore through key ceremonies, end to end: service A's security officer
//! provisions a trusted backup KEK offline (2 of 3 shares); A's officers run the example
//! backup ceremony; service B, on a freshly initialised token, restores the key in the
//! example restore ceremony, with the KEK shares handed in with the approvals. With one
//! share (M - 1) the restore is refused and B's token stays without the key; with two, B
//! signs assertions that verify under A's JWKS. A `raw` key comes back `raw`: the
//! backup file carries each key's usage, and a file whose key has another usage on the
//! restoring service is refused.

mod common;

use hsm_client::proto::ListKeysRequest;
use hsm_client::HsmClient;
use hsm_service::testing::DevEnv;
use serde_json::Value;
use tonic::Code;

const BACKUP_PLAN: &str = include_str!("../../ceremonies/example-backup.toml");
const RESTORE_PLAN: &str = include_str!("../../ceremonies/example-restore.toml");
const BACKUP_FILE: &str = "assertion-backup.json";

use common::{approve_with_share as approve, execute, propose};

async fn assertion_keys(c: &HsmClient) -> Vec<hsm_client::proto::KeyVersionInfo> {
    c.keys()
        .list_keys(ListKeysRequest {})
        .await
        .expect("list keys")
        .into_inner()
        .keys
        .into_iter()
        .filter(|k| k.name == "assertion")
        .collect()
}

/// `backup-kek` on `env`'s token (service stopped): KEK "backup-kek-1", 2 of 3 shares
/// in `dir`; the share files' paths and the check value.
async fn provision_kek(env: &DevEnv, dir: &std::path::Path) -> (Vec<std::path::PathBuf>, String) {
    let so_pin = secrecy::SecretString::from(
        std::fs::read_to_string(env.dir.path().join("so.pin"))
            .expect("so.pin")
            .trim()
            .to_owned(),
    );
    let store = hsm_service::server::open_store(&env.config, Default::default())
        .await
        .expect("store");
    hsm_service::ceremony::shares::backup_kek_offline(
        &env.config,
        store,
        &so_pin,
        "backup-kek-1",
        2,
        3,
        dir,
    )
    .await
    .expect("backup-kek")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_ceremony_then_restore_ceremony_on_a_new_token_needs_m_shares() {
    // Service A: the KEK first, offline (the service is not running yet).
    let a = DevEnv::new();
    let shares_dir = tempfile::tempdir().expect("tempdir");
    let (share_paths, check) = provision_kek(&a, shares_dir.path()).await;
    let share = |i: usize| std::fs::read_to_string(&share_paths[i]).expect("share file");

    let server_a = a.start().await;
    let addr_a = server_a.local_addr();
    let a1 = common::client(a.dir.path(), "officer-1", addr_a).await;
    let a2 = common::client(a.dir.path(), "officer-2", addr_a).await;
    let a3 = common::client(a.dir.path(), "officer-3", addr_a).await;
    let a_login = common::client(a.dir.path(), "login-service", addr_a).await;

    // A share is refused by a ceremony that restores nothing.
    let backup_id = propose(&a1, BACKUP_PLAN).await.expect("propose backup");
    let err = approve(&a1, &backup_id, &share(0))
        .await
        .expect_err("share for a backup ceremony");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("no restore step"), "{err:?}");
    approve(&a1, &backup_id, "").await.expect("approve");
    approve(&a2, &backup_id, "").await.expect("approve");
    let r = execute(&a3, &backup_id).await.expect("execute backup");
    let t: Value = serde_json::from_str(&r.transcript_json).expect("transcript");
    assert_eq!(t["outcome"], "succeeded", "{}", r.transcript_text);
    let check_a = &t["steps"][0]["checks"][0];
    assert_eq!(check_a["origin"], "generated-for-backup", "{check_a}");
    assert_eq!(check_a["extractable"], true, "{check_a}");
    assert_eq!(check_a["wrap_with_trusted"], true, "{check_a}");
    assert_eq!(check_a["problem"], "", "{check_a}");
    let backup = &t["steps"][3]["backup"];
    assert_eq!(backup["file"], BACKUP_FILE);
    assert_eq!(backup["kek_check"], check.as_str());
    assert_eq!(backup["keys"][0], "assertion/v2");
    let sha256 = backup["sha256"].as_str().expect("sha256").to_owned();
    let file_a = a.dir.path().join("backups").join(BACKUP_FILE);
    let text = std::fs::read_to_string(&file_a).expect("backup file");
    assert_eq!(
        hsm_service::ceremony::backup_file::sha256_hex(&text),
        sha256
    );
    assert!(r.transcript_text.contains(&sha256), "{}", r.transcript_text);
    let kid = t["steps"][0]["keys"][0]["kid"]
        .as_str()
        .expect("kid")
        .to_owned();
    let a_jwks = common::jwks(&a_login).await;
    assert!(a_jwks.find(&kid).is_some(), "A publishes its new key");
    let inventory = assertion_keys(&a1).await;
    let v2 = inventory.iter().find(|k| k.version == 2).expect("v2");
    assert_eq!(v2.origin, "generated-for-backup");
    assert!(
        v2.sensitive && v2.extractable && v2.wrap_with_trusted,
        "{v2:?}"
    );
    let v1 = inventory.iter().find(|k| k.version == 1).expect("v1");
    assert_eq!(v1.origin, "generated");
    assert!(!v1.extractable, "{v1:?}");

    // Service B: another token, the same officers' share files, the backup file copied
    // into its backup directory.
    let b = DevEnv::new();
    let server_b = b.start().await;
    let addr_b = server_b.local_addr();
    let b1 = common::client(b.dir.path(), "officer-1", addr_b).await;
    let b2 = common::client(b.dir.path(), "officer-2", addr_b).await;
    let b3 = common::client(b.dir.path(), "officer-3", addr_b).await;
    let b_login = common::client(b.dir.path(), "login-service", addr_b).await;
    std::fs::create_dir_all(b.dir.path().join("backups")).expect("mkdir");
    std::fs::copy(&file_a, b.dir.path().join("backups").join(BACKUP_FILE)).expect("copy");

    // A plan naming another hash is refused before anything runs.
    let restore_plan = RESTORE_PLAN.replace(&"0".repeat(64), &sha256);
    assert_ne!(restore_plan, RESTORE_PLAN);
    let err = propose(&b1, RESTORE_PLAN)
        .await
        .expect_err("placeholder hash");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("has SHA-256"), "{err:?}");
    let restore_id = propose(&b1, &restore_plan).await.expect("propose restore");

    // Malformed shares and shares of another KEK are refused, and never echoed.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let c = DevEnv::new();
    // Another KEK of the same label, on another token.
    let (other_paths, _) = provision_kek(&c, other_dir.path()).await;
    let foreign = std::fs::read_to_string(&other_paths[0]).expect("share");
    for (bad, want) in [
        (foreign.clone(), "restores from KEK \"backup-kek-1\""),
        ("not a share".to_owned(), "malformed share file"),
        (
            share(0).replace("index=1", "index=x"),
            "malformed share file",
        ),
    ] {
        let err = approve(&b1, &restore_id, &bad)
            .await
            .expect_err("bad share");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(want), "{want}: {err:?}");
        let secret_line = bad.lines().nth(1).unwrap_or("no second line");
        assert!(!err.message().contains(secret_line), "{err:?}");
    }

    // M approvals without shares: refused; the threshold is not known without a share.
    approve(&b1, &restore_id, "").await.expect("approve");
    approve(&b2, &restore_id, "").await.expect("approve");
    let err = execute(&b3, &restore_id)
        .await
        .map(|_| ())
        .expect_err("no shares");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("needs at least 2 distinct shares")
            && err.message().contains("; 0 held"),
        "{err:?}"
    );

    // M approvals but M - 1 shares: refused before anything runs; nothing on B's token.
    let shown = approve(&b1, &restore_id, &share(0))
        .await
        .expect("approve with share 1");
    assert_eq!(shown.kek_shares_held, 1);
    let shown = approve(&b2, &restore_id, "")
        .await
        .expect("approve without a share");
    assert_eq!(shown.valid_approvals, 2);
    assert_eq!(shown.kek_shares_held, 1);
    let err = execute(&b3, &restore_id)
        .await
        .map(|_| ())
        .expect_err("1 share of 2");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("needs 2 distinct shares"), "{err:?}");
    assert!(err.message().contains("1 held"), "{err:?}");
    assert_eq!(assertion_keys(&b1).await.len(), 1, "bootstrap key only");
    assert!(common::jwks(&b_login).await.find(&kid).is_none());

    // The same officer's share twice still counts once.
    let shown = approve(&b1, &restore_id, &share(0)).await.expect("again");
    assert_eq!(shown.kek_shares_held, 1);

    // The second officer hands in their share: executed, the key restored with its kid.
    let shown = approve(&b2, &restore_id, &share(2))
        .await
        .expect("approve with share 3");
    assert_eq!(shown.kek_shares_held, 2);
    let r = execute(&b3, &restore_id).await.expect("execute restore");
    let t: Value = serde_json::from_str(&r.transcript_json).expect("transcript");
    assert_eq!(t["outcome"], "succeeded", "{}", r.transcript_text);
    let restored = &t["steps"][0]["keys"][0];
    assert_eq!(restored["kid"], kid.as_str());
    assert_eq!(restored["version"], 2);
    let check_b = &t["steps"][0]["checks"][0];
    assert_eq!(check_b["origin"], "restored", "{check_b}");
    assert_eq!(check_b["extractable"], false, "{check_b}");
    assert_eq!(check_b["signature_verifies"], true, "{check_b}");
    assert_eq!(check_b["problem"], "", "{check_b}");
    let inventory = assertion_keys(&b1).await;
    let v2 = inventory
        .iter()
        .find(|k| k.version == 2)
        .expect("restored v2");
    assert_eq!(v2.origin, "restored");
    assert_eq!(v2.state, "active");
    assert_eq!(v2.ceremony_id, restore_id);
    assert!(v2.sensitive && !v2.extractable, "{v2:?}");
    // The shares were dropped with the execution: a second run is refused anyway.
    let err = execute(&b3, &restore_id)
        .await
        .map(|_| ())
        .expect_err("twice");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // B signs; the assertion verifies under the key A published.
    let signed = common::sign_default_assertion(&b_login).await;
    assert_eq!(signed.kid, kid);
    common::verify(&signed.jws, &a_jwks).expect("B's assertion verifies under A's JWKS");

    drop(server_a);
    drop(server_b);
}

/// A plan that makes a `raw` key `receipts` for backup, publishes and activates it and
/// writes it to `receipts-backup.json`.
const RAW_BACKUP_PLAN: &str = r#"version = 1
description = "Backup-able raw key"

[[step]]
kind = "generate-key"
name = "receipts"
algorithm = "ES256"
usage = "raw"
backup = true

[[step]]
kind = "publish"
key = "receipts"

[[step]]
kind = "activate"
key = "receipts"

[[step]]
kind = "backup"
keys = ["receipts"]
kek = "backup-kek-1"
file = "receipts-backup.json"
"#;

/// The plan restoring every key of backup file `file` (SHA-256 `sha256`) and, when
/// `key` is given, publishing and activating it.
fn restore_plan(file: &str, sha256: &str, key: Option<&str>) -> String {
    let mut plan = format!(
        "version = 1\n[[step]]\nkind = \"restore\"\nfile = \"{file}\"\nsha256 = \"{sha256}\"\n"
    );
    if let Some(key) = key {
        plan.push_str(&format!(
            "[[step]]\nkind = \"publish\"\nkey = \"{key}\"\n[[step]]\nkind = \"activate\"\nkey = \"{key}\"\n"
        ));
    }
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_key_restores_as_raw_and_a_usage_clash_is_refused() {
    let a = DevEnv::new();
    let shares_dir = tempfile::tempdir().expect("tempdir");
    let (share_paths, _) = provision_kek(&a, shares_dir.path()).await;
    let share = |i: usize| std::fs::read_to_string(&share_paths[i]).expect("share file");
    let server_a = a.start().await;
    let addr_a = server_a.local_addr();
    let a1 = common::client(a.dir.path(), "officer-1", addr_a).await;
    let a2 = common::client(a.dir.path(), "officer-2", addr_a).await;
    let a3 = common::client(a.dir.path(), "officer-3", addr_a).await;
    let a_login = common::client(a.dir.path(), "login-service", addr_a).await;

    let id = propose(&a1, RAW_BACKUP_PLAN).await.expect("propose backup");
    approve(&a1, &id, "").await.expect("approve");
    approve(&a2, &id, "").await.expect("approve");
    let r = execute(&a3, &id).await.expect("execute backup");
    let t: Value = serde_json::from_str(&r.transcript_json).expect("transcript");
    assert_eq!(t["outcome"], "succeeded", "{}", r.transcript_text);
    let sha256 = t["steps"][3]["backup"]["sha256"]
        .as_str()
        .expect("sha256")
        .to_owned();
    let kid = t["steps"][0]["keys"][0]["kid"]
        .as_str()
        .expect("kid")
        .to_owned();
    let file_a = a.dir.path().join("backups").join("receipts-backup.json");
    let text = std::fs::read_to_string(&file_a).expect("backup file");
    let parsed = hsm_service::ceremony::backup_file::BackupFile::parse(&text).expect("parse");
    assert_eq!(parsed.format, hsm_service::ceremony::backup_file::FORMAT);
    assert_eq!(
        parsed.key("receipts", None).expect("receipts").usage,
        Some(hsm_service::signing::Usage::Raw),
        "{text}"
    );
    assert!(common::jwks_of_usage(&a_login, "raw")
        .await
        .find(&kid)
        .is_some());

    // Service B, fresh: the file's usage counts, not what its (empty) chain shows.
    let b = DevEnv::new();
    let server_b = b.start().await;
    let addr_b = server_b.local_addr();
    let b1 = common::client(b.dir.path(), "officer-1", addr_b).await;
    let b2 = common::client(b.dir.path(), "officer-2", addr_b).await;
    let b3 = common::client(b.dir.path(), "officer-3", addr_b).await;
    let b_login = common::client(b.dir.path(), "login-service", addr_b).await;
    let backups_b = b.dir.path().join("backups");
    std::fs::create_dir_all(&backups_b).expect("mkdir");
    std::fs::copy(&file_a, backups_b.join("receipts-backup.json")).expect("copy");

    // A backup file naming, as a raw key, a name that is a signing key on B is refused
    // when proposed, before anything touches B's token.
    let clash = text.replace("\"name\": \"receipts\"", "\"name\": \"assertion\"");
    assert_ne!(clash, text);
    std::fs::write(backups_b.join("clash.json"), &clash).expect("write");
    let clash_sha = hsm_service::ceremony::backup_file::sha256_hex(&clash);
    let err = propose(&b1, &restore_plan("clash.json", &clash_sha, None))
        .await
        .expect_err("usage clash");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(
            "backup file clash.json has \"assertion\" v1 as a raw key; \"assertion\" is a signing key on this service"
        ),
        "{err:?}"
    );

    let id = propose(
        &b1,
        &restore_plan("receipts-backup.json", &sha256, Some("receipts")),
    )
    .await
    .expect("propose restore");
    approve(&b1, &id, &share(0)).await.expect("approve");
    approve(&b2, &id, &share(1)).await.expect("approve");
    let r = execute(&b3, &id).await.expect("execute restore");
    let t: Value = serde_json::from_str(&r.transcript_json).expect("transcript");
    assert_eq!(t["outcome"], "succeeded", "{}", r.transcript_text);
    assert_eq!(t["steps"][0]["keys"][0]["kid"], kid.as_str());

    let restored: Vec<_> = b1
        .keys()
        .list_keys(ListKeysRequest {})
        .await
        .expect("list keys")
        .into_inner()
        .keys
        .into_iter()
        .filter(|k| k.name == "receipts")
        .collect();
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!(restored[0].usage, "raw", "{restored:?}");
    assert_eq!(restored[0].origin, "restored");
    assert_eq!(restored[0].state, "active");
    assert!(
        common::jwks_of_usage(&b_login, "raw")
            .await
            .find(&kid)
            .is_some(),
        "in B's raw key set"
    );
    assert!(
        common::jwks(&b_login).await.find(&kid).is_none(),
        "never in B's assertion JWKS"
    );
    assert!(common::jwks_of_usage(&b_login, "signing")
        .await
        .find(&kid)
        .is_none());

    drop(server_a);
    drop(server_b);
}
