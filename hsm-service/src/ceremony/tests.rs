//! Tests of plans, quorum and execution.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::plan::{self, Context, ExistingKey};
use super::*;
use crate::auth::Role;
use crate::signing::{KeyOrigin, KeyState};
use crate::testing::DevEnv;

const EXAMPLE: &str = include_str!("../../../ceremonies/example-root-and-assertion.toml");

fn ctx() -> Context {
    let mut c = Context {
        max_validity_days: 3660,
        ..Default::default()
    };
    c.existing.insert(
        "assertion".into(),
        vec![ExistingKey {
            version: 1,
            state: KeyState::Active,
            origin: KeyOrigin::Generated,
            usage: crate::signing::Usage::Signing,
        }],
    );
    c
}

fn id(text: &str) -> String {
    let p = plan::parse(text).expect("parses");
    plan::id_of(&plan::canonical(&p).expect("canonical"))
}

#[test]
fn the_id_follows_meaning_not_formatting() {
    let base = id(EXAMPLE);
    assert_eq!(base.len(), 64);
    // Comments, blank lines and spelled-out defaults do not change it.
    let reformatted = EXAMPLE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "usage = \"ca\"",
            "usage = \"ca\"\nnew_version = false\nextractable = false",
        );
    assert_eq!(id(&reformatted), base);
    // Key order inside a table does not change it.
    let reordered = EXAMPLE.replace(
        "kind = \"publish\"\nkey = \"assertion\"",
        "key = \"assertion\"\nkind = \"publish\"",
    );
    assert_ne!(reordered, EXAMPLE);
    assert_eq!(id(&reordered), base);
    // Any change of meaning does.
    for changed in [
        EXAMPLE.replace("validity_days = 365", "validity_days = 364"),
        EXAMPLE.replace("example\"", "example!\""),
        EXAMPLE.replace("ES384", "ES256"),
        EXAMPLE.replace(
            "C=DK\"\nvalidity_days = 3650",
            "C=SE\"\nvalidity_days = 3650",
        ),
    ] {
        assert_ne!(id(&changed), base, "{changed}");
    }
    // The canonical form round-trips.
    let p = plan::parse(EXAMPLE).expect("parses");
    let c = plan::canonical(&p).expect("canonical");
    assert_eq!(plan::from_canonical(&c).expect("back"), p);
    assert!(c.starts_with("{\"version\":1,\"description\":"), "{c}");
}

#[test]
fn validation_refusals_name_the_step_and_reason() {
    plan::validate(&plan::parse(EXAMPLE).expect("parses"), &ctx()).expect("valid");
    let step = |s: &str| format!("version = 1\n[[step]]\n{s}\n");
    let gen_ca = "kind = \"generate-key\"\nname = \"ca\"\nalgorithm = \"ES256\"\nusage = \"ca\"";
    let cases: Vec<(String, &str)> = vec![
        (step("kind = \"generate-key\"\nname = \"Bad Name\"\nalgorithm = \"ES256\"\nusage = \"ca\""), "key name is 1 to 64"),
        (step("kind = \"generate-key\"\nname = \"k\"\nalgorithm = \"HS256\"\nusage = \"ca\""), "unsupported algorithm"),
        (step("kind = \"generate-key\"\nname = \"c\"\nalgorithm = \"ES384\"\nusage = \"challenge\""), "algorithm must be ES256"),
        (format!("{}[[step]]\n{gen_ca}\n", step(gen_ca)), "duplicate key name"),
        (step(&format!("{gen_ca}\nextractable = true")), "non-extractable"),
        (step("kind = \"generate-key\"\nname = \"assertion\"\nalgorithm = \"ES256\"\nusage = \"signing\""), "exists already"),
        (format!("{}[[step]]\nkind = \"self-sign\"\nkey = \"ca\"\nsubject = \"CN=x\"\nvalidity_days = 4000\n", step(gen_ca)), "max_validity_days"),
        (format!("{}[[step]]\nkind = \"self-sign\"\nkey = \"ca\"\nsubject = \"CN=x\"\nvalidity_days = 0\n", step(gen_ca)), "validity_days 0"),
        (format!("{}[[step]]\nkind = \"self-sign\"\nkey = \"ca\"\nsubject = \"not a DN\"\nvalidity_days = 10\n", step(gen_ca)), "subject"),
        (step("kind = \"self-sign\"\nkey = \"ghost\"\nsubject = \"CN=x\"\nvalidity_days = 10"), "neither created"),
        (step("kind = \"publish\"\nkey = \"assertion\"\nversion = 7"), "has no version 7"),
        (format!("{}[[step]]\nkind = \"publish\"\nkey = \"ca\"\n", step(gen_ca)), "ca keys are never published"),
        (step("kind = \"generate-key\"\nname = \"s\"\nalgorithm = \"ES256\"\nusage = \"signing\"\n[[step]]\nkind = \"activate\"\nkey = \"s\""), "will be pending"),
        (format!("{}[[step]]\nkind = \"generate-key\"\nname = \"s\"\nalgorithm = \"ES256\"\nusage = \"signing\"\n[[step]]\nkind = \"issue-certificate\"\nissuer = \"ca\"\nkey = \"s\"\nsubject = \"CN=s\"\nvalidity_days = 10\nusage = \"signing\"\n", step(gen_ca)), "has no certificate yet"),
        (step("kind = \"destroy\"\nkey = \"assertion\"\nversion = 2"), "has no version 2"),
        (format!("{}[[step]]\nkind = \"destroy\"\nkey = \"ca\"\nversion = 1\n", step(gen_ca)), "does not destroy its own keys"),
        // Usages (`raw` keys and the usage of the service's own keys).
        (step("kind = \"generate-key\"\nname = \"assertion\"\nalgorithm = \"ES256\"\nusage = \"raw\"\nnew_version = true"), "is a signing key; a new version keeps its usage"),
        (step("kind = \"self-sign\"\nkey = \"assertion\"\nsubject = \"CN=x\"\nvalidity_days = 10"), "is a signing key; only a ca key is self-signed"),
        (step("kind = \"generate-key\"\nname = \"r\"\nalgorithm = \"ES256\"\nusage = \"raw\"\n[[step]]\nkind = \"self-sign\"\nkey = \"r\"\nsubject = \"CN=x\"\nvalidity_days = 10"), "is a raw key; only a ca key is self-signed"),
        (step("kind = \"generate-key\"\nname = \"r\"\nalgorithm = \"ES256\"\nusage = \"raw\"\n[[step]]\nkind = \"issue-certificate\"\nissuer = \"assertion\"\nkey = \"r\"\nsubject = \"CN=r\"\nvalidity_days = 10\nusage = \"raw\""), "issuer \"assertion\" is not a ca key"),
        (format!("{}[[step]]\nkind = \"self-sign\"\nkey = \"ca\"\nsubject = \"CN=ca\"\nvalidity_days = 10\n[[step]]\nkind = \"issue-certificate\"\nissuer = \"ca\"\nkey = \"assertion\"\nsubject = \"CN=a\"\nvalidity_days = 10\nusage = \"raw\"\n", step(gen_ca)), "usage raw does not match the usage signing of \"assertion\""),
    ];
    for (text, expected) in cases {
        let err = plan::parse(&text)
            .and_then(|p| plan::validate(&p, &ctx()))
            .expect_err(expected);
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidArgument(_)), "{msg}");
        assert!(msg.contains(expected), "{expected}: {msg}");
    }
}

fn backup_file_text(keys: &[(&str, u32, crate::signing::Usage)]) -> String {
    use super::backup_file::{BackupEntry, BackupFile, PublicKey, FORMAT};
    BackupFile {
        format: FORMAT.into(),
        plan_id: "ab".repeat(32),
        kek_label: "kek-1".into(),
        kek_check: "0123456789abcdef".into(),
        keys: keys
            .iter()
            .map(|(name, version, usage)| BackupEntry {
                name: (*name).into(),
                version: *version,
                algorithm: "ES256".into(),
                kind: "ec-p256".into(),
                usage: Some(*usage),
                id: "AQID".into(),
                public: PublicKey::Ec {
                    ec_point: "BAQE".into(),
                },
                wrapped_private_key: "CQkJ".into(),
                certificate_chain: Vec::new(),
            })
            .collect(),
    }
    .to_text()
    .expect("text")
}

#[test]
fn backup_and_restore_steps_are_validated() {
    let dir = tempfile::tempdir().expect("tempdir");
    use crate::signing::Usage;
    let restorable = backup_file_text(&[("other", 2, Usage::Signing), ("more", 1, Usage::Raw)]);
    let clashing = backup_file_text(&[("bk", 1, Usage::Signing)]);
    // `bk` is a signing key here: a raw `bk` v2 from a backup must not join it.
    let other_usage = backup_file_text(&[("bk", 2, Usage::Raw)]);
    std::fs::write(dir.path().join("b.json"), &restorable).unwrap();
    std::fs::write(dir.path().join("clash.json"), &clashing).unwrap();
    std::fs::write(dir.path().join("usage.json"), &other_usage).unwrap();
    let sha = super::backup_file::sha256_hex(&restorable);
    let clash_sha = super::backup_file::sha256_hex(&clashing);
    let usage_sha = super::backup_file::sha256_hex(&other_usage);
    let mut c = ctx();
    c.backup_dir = dir.path().to_owned();
    c.existing.insert(
        "bk".into(),
        vec![ExistingKey {
            version: 1,
            state: KeyState::Pending,
            origin: KeyOrigin::GeneratedForBackup,
            usage: crate::signing::Usage::Signing,
        }],
    );
    c.keks.insert(
        "kek-1".into(),
        super::shares::KekRecord {
            label: "kek-1".into(),
            check: "0123456789abcdef".into(),
            threshold: 2,
            shares: 3,
            created_at: 0,
        },
    );
    let plan = |steps: &[&str]| {
        let mut t = "version = 1\n".to_owned();
        for s in steps {
            t.push_str("[[step]]\n");
            t.push_str(s);
            t.push('\n');
        }
        t
    };
    let gen = |name: &str, backup: bool| {
        format!("kind = \"generate-key\"\nname = \"{name}\"\nalgorithm = \"ES256\"\nusage = \"signing\"\nbackup = {backup}")
    };
    let backup = |keys: &str, kek: &str, file: &str| {
        format!("kind = \"backup\"\nkeys = [{keys}]\nkek = \"{kek}\"\nfile = \"{file}\"")
    };
    let restore = |file: &str, sha: &str, keys: &str| {
        format!("kind = \"restore\"\nfile = \"{file}\"\nsha256 = \"{sha}\"\nkeys = [{keys}]")
    };
    for ok in [
        plan(&[&gen("n", true), &backup("\"n\"", "kek-1", "new.json")]),
        plan(&[&backup("\"bk\"", "kek-1", "new.json")]),
        plan(&[&restore("b.json", &sha, "")]),
        plan(&[
            &restore("b.json", &sha.to_uppercase(), "\"other\""),
            "kind = \"publish\"\nkey = \"other\"",
            "kind = \"activate\"\nkey = \"other\"",
        ]),
    ] {
        plan::validate(&plan::parse(&ok).expect("parses"), &c).expect(&ok);
    }
    let cases: Vec<(String, &str)> = vec![
        (
            plan(&[&backup("\"assertion\"", "kek-1", "x.json")]),
            "\"assertion\" was not generated for backup",
        ),
        (
            plan(&[&gen("n", false), &backup("\"n\"", "kek-1", "x.json")]),
            "\"n\" was not generated for backup",
        ),
        (
            plan(&[&backup("\"ghost\"", "kek-1", "x.json")]),
            "neither created",
        ),
        (
            plan(&[&backup("", "kek-1", "x.json")]),
            "keys must name 1 to 64 keys",
        ),
        (
            plan(&[&backup("\"bk\", \"bk\"", "kek-1", "x.json")]),
            "key \"bk\" named twice",
        ),
        (
            plan(&[&backup("\"bk\"", "kek-2", "x.json")]),
            "KEK \"kek-2\" is not provisioned",
        ),
        (plan(&[&backup("\"bk\"", "a b", "x.json")]), "KEK label"),
        (
            plan(&[&backup("\"bk\"", "kek-1", "../x.json")]),
            "backup file name",
        ),
        (
            plan(&[&backup("\"bk\"", "kek-1", "b.json")]),
            "exists already",
        ),
        (
            plan(&[
                &backup("\"bk\"", "kek-1", "x.json"),
                &backup("\"bk\"", "kek-1", "x.json"),
            ]),
            "step 2 (backup): an earlier step uses backup file",
        ),
        (
            plan(&[
                &backup("\"bk\"", "kek-1", "x.json"),
                &restore("x.json", &sha, ""),
            ]),
            "is written by this plan",
        ),
        (plan(&[&restore("b.json", &clash_sha, "")]), "has SHA-256"),
        (
            plan(&[&restore("b.json", "abc", "")]),
            "sha256 must be 64 hex digits",
        ),
        (plan(&[&restore("missing.json", &sha, "")]), "missing.json"),
        (
            plan(&[&restore("b.json", &sha, "\"nope\"")]),
            "no key \"nope\"",
        ),
        (
            plan(&[&restore("b.json", &sha, "\"other\", \"other\"")]),
            "named twice",
        ),
        (
            plan(&[&restore("clash.json", &clash_sha, "")]),
            "bk v1 exists on this service",
        ),
        (
            plan(&[&restore("usage.json", &usage_sha, "")]),
            "step 1 (restore): backup file usage.json has \"bk\" v2 as a raw key; \"bk\" is a signing key on this service",
        ),
        // The file's usage is tracked: a restored raw key is not certified as a CA.
        (
            plan(&[
                &restore("b.json", &sha, "\"more\""),
                "kind = \"self-sign\"\nkey = \"more\"\nsubject = \"CN=more\"\nvalidity_days = 10",
            ]),
            "step 2 (self-sign): \"more\" is a raw key; only a ca key is self-signed",
        ),
        (
            plan(&[&gen("other", false), &restore("b.json", &sha, "")]),
            "\"other\" is created by an earlier step",
        ),
        (
            plan(&[&restore("b.json", &sha, ""), &gen("other", false)]),
            "duplicate key name \"other\"",
        ),
    ];
    for (text, expected) in cases {
        let err = plan::parse(&text)
            .and_then(|p| plan::validate(&p, &c))
            .expect_err(expected);
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidArgument(_)), "{msg}");
        assert!(msg.contains(expected), "{expected}: {msg}");
    }
    // `backup = false` is left out of the canonical form: plans written before the
    // flag existed keep their ids.
    let without = plan(&[
        "kind = \"generate-key\"\nname = \"n\"\nalgorithm = \"ES256\"\nusage = \"signing\"",
    ]);
    assert_eq!(id(&without), id(&plan(&[&gen("n", false)])));
    assert_ne!(id(&without), id(&plan(&[&gen("n", true)])));
    let canonical = plan::canonical(&plan::parse(&without).unwrap()).unwrap();
    assert!(!canonical.contains("backup"), "{canonical}");
}

#[test]
fn rotate_seed_master_key_fields_are_validated() {
    let rotate =
        |extra: &str| format!("version = 1\n[[step]]\nkind = \"rotate-seed-master-key\"\n{extra}");
    let with_seeds = Context {
        seed_rotation: true,
        ..ctx()
    };
    let without = ctx();
    // Valid: default batch, explicit batch at both ends.
    for ok in [
        rotate(""),
        rotate("batch_size = 1\n"),
        rotate("batch_size = 5000\n"),
    ] {
        plan::validate(&plan::parse(&ok).expect("parses"), &with_seeds).expect(&ok);
    }
    // The default is spelled out in the canonical form (so it is part of the id).
    let p = plan::parse(&rotate("")).expect("parses");
    assert!(plan::canonical(&p)
        .expect("canonical")
        .contains("{\"kind\":\"rotate-seed-master-key\",\"batch_size\":500}"));
    assert_eq!(id(&rotate("")), id(&rotate("batch_size = 500\n")));
    let cases: Vec<(String, &str, &Context)> = vec![
        (
            rotate("batch_size = 0\n"),
            "batch_size 0 must be between 1 and 5000",
            &with_seeds,
        ),
        (
            rotate("batch_size = 5001\n"),
            "batch_size 5001 must be between 1 and 5000",
            &with_seeds,
        ),
        (
            format!(
                "{}[[step]]\nkind = \"rotate-seed-master-key\"\n",
                rotate("")
            ),
            "step 2 (rotate-seed-master-key): step 1 rotates the seed master key already",
            &with_seeds,
        ),
        (
            rotate(""),
            "no credential seed master key to rotate",
            &without,
        ),
    ];
    for (text, expected, c) in cases {
        let err = plan::parse(&text)
            .and_then(|p| plan::validate(&p, c))
            .expect_err(expected);
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidArgument(_)), "{msg}");
        assert!(msg.contains(expected), "{expected}: {msg}");
    }
    // Parse errors: unknown keys, wrong types, negative numbers.
    for (text, expected) in [
        (rotate("key = \"x\"\n"), "unknown field `key`"),
        (rotate("batch_size = \"big\"\n"), "invalid type"),
        (
            rotate("batch_size = -1\n"),
            "invalid value: integer `-1`, expected u32",
        ),
    ] {
        let err = plan::parse(&text).expect_err(expected);
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidArgument(_)), "{msg}");
        assert!(msg.contains(expected), "{expected}: {msg}");
    }
}

fn officer(n: u8) -> Identity {
    Identity {
        subject: format!("officer-{n}"),
        fingerprint: format!("{n:02x}").repeat(32),
        role: Role::Officer,
        signing_keys: None,
        acr: None,
        tenant: format!("officer-{n}"),
        unbound_assertions: false,
        rule: format!("[[client]] cn = \"officer-{n}\""),
    }
}

const SMALL: &str = "version = 1\ndescription = \"small\"\n[[step]]\nkind = \"generate-key\"\nname = \"ca-x\"\nalgorithm = \"ES256\"\nusage = \"ca\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_approvals_do_not_count() {
    let env = DevEnv::new();
    let server = env.start().await;
    let state = server.state().clone();
    let t = Arc::new(AtomicU64::new(1_000_000));
    let clock_t = t.clone();
    let c = Ceremonies::new(
        state.signing.clone(),
        state.store.clone(),
        env.config.ceremony.clone(),
        &env.config.data_dir,
        crate::common::Clock::from_secs_fn(move || clock_t.load(Ordering::SeqCst)),
    );
    let ttl = env.config.ceremony.approval_ttl_seconds;
    let id = c
        .propose(&officer(1), SMALL)
        .await
        .expect("propose")
        .record
        .id;
    c.approve(&officer(1), &id, None).await.expect("approve");
    c.approve(&officer(2), &id, None).await.expect("approve");
    assert_eq!(c.get(&id).await.expect("get").valid_approvals, 2);
    // Both approvals expire.
    t.fetch_add(ttl, Ordering::SeqCst);
    assert_eq!(c.get(&id).await.expect("get").valid_approvals, 0);
    let err = c.execute(&officer(3), &id).await.expect_err("expired");
    assert!(err.to_string().contains("0 valid approval"), "{err}");
    // One fresh approval and one expired one are still not enough.
    c.approve(&officer(1), &id, None).await.expect("approve");
    let err = c.execute(&officer(3), &id).await.expect_err("1 of 2");
    assert!(err.to_string().contains("1 valid approval"), "{err}");
    c.approve(&officer(3), &id, None).await.expect("approve");
    let x = c.execute(&officer(2), &id).await.expect("execute");
    assert_eq!(x.view.record.state, CeremonyState::Succeeded);
    // An identity outside the officer set counts for nothing.
    let mut outsider = officer(9);
    outsider.subject = "officer-9".into();
    let err = c.propose(&outsider, SMALL).await.expect_err("outsider");
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_stops_and_the_transcript_lists_what_was_made() {
    let env = DevEnv::new();
    let server = env.start().await;
    let state = server.state().clone();
    let c = &state.ceremonies;
    // Destroying the active version passes validation but fails at run time.
    let plan = format!("{SMALL}[[step]]\nkind = \"destroy\"\nkey = \"assertion\"\nversion = 1\n[[step]]\nkind = \"self-sign\"\nkey = \"ca-x\"\nsubject = \"CN=x\"\nvalidity_days = 10\n");
    let id = c
        .propose(&officer(1), &plan)
        .await
        .expect("propose")
        .record
        .id;
    c.approve(&officer(1), &id, None).await.expect("approve");
    c.approve(&officer(2), &id, None).await.expect("approve");
    let x = c.execute(&officer(1), &id).await.expect("executed");
    assert_eq!(x.view.record.state, CeremonyState::Failed);
    assert!(
        x.view.record.failure.starts_with("step 2 (destroy) failed"),
        "{}",
        x.view.record.failure
    );
    let t = &x.transcript;
    assert_eq!(t.outcome, "failed");
    assert_eq!(t.steps[0].outcome, "ok");
    assert_eq!(t.steps[1].outcome, "failed");
    assert_eq!(t.steps[2].outcome, "not run");
    assert_eq!(t.created_keys.len(), 1);
    assert_eq!(t.created_keys[0].name, "ca-x");
    assert!(c.transcript_paths(&id).0.exists());
    assert_eq!(
        c.key_origins()
            .await
            .expect("origins")
            .get(&("ca-x".to_owned(), 1)),
        Some(&id)
    );
    // A failed ceremony does not run again.
    let err = c.execute(&officer(1), &id).await.expect_err("again");
    assert!(err.to_string().contains("runs once"), "{err}");
    server.shutdown().await.expect("shutdown");
}

/// Ceremonies over a running server's signer and store with `config` (no audit log).
fn ceremonies_with(
    signing: &Arc<Signer>,
    store: &Arc<Store>,
    env: &DevEnv,
    config: crate::config::CeremonyConfig,
) -> Ceremonies {
    Ceremonies::new(
        signing.clone(),
        store.clone(),
        config,
        &env.config.data_dir,
        crate::common::Clock::system(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_certificates_of_one_officer_entry_count_once() {
    let env = DevEnv::new();
    let server = env.start().await;
    let state = server.state().clone();
    let c = ceremonies_with(
        &state.signing,
        &state.store,
        &env,
        env.config.ceremony.clone(),
    );
    let id = c
        .propose(&officer(1), SMALL)
        .await
        .expect("propose")
        .record
        .id;
    // officer-1's entry matches on the subject: a second certificate of it (another
    // fingerprint) is the same person.
    let mut second = officer(1);
    second.fingerprint = "ee".repeat(32);
    c.approve(&officer(1), &id, None).await.expect("approve");
    let v = c.approve(&second, &id, None).await.expect("approve");
    assert_eq!(
        v.record.approvals.len(),
        2,
        "both certificates are on record"
    );
    assert_eq!(v.valid_approvals, 1, "one officer-set entry counts once");
    let err = c.execute(&officer(1), &id).await.expect_err("1 of 2");
    assert!(err.to_string().contains("1 valid approval"), "{err}");
    c.approve(&officer(2), &id, None).await.expect("approve");
    let x = c.execute(&second, &id).await.expect("execute");
    assert_eq!(x.view.record.state, CeremonyState::Succeeded);
    drop(state);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_proposer_counts_false_the_proposers_approval_does_not_count() {
    let env = DevEnv::new();
    let server = env.start().await;
    let state = server.state().clone();
    // The default counts the proposer.
    assert!(env.config.ceremony.proposer_counts);
    let mut config = env.config.ceremony.clone();
    config.proposer_counts = false;
    let c = ceremonies_with(&state.signing, &state.store, &env, config);
    let id = c
        .propose(&officer(1), SMALL)
        .await
        .expect("propose")
        .record
        .id;
    assert_eq!(
        c.approve(&officer(1), &id, None)
            .await
            .expect("the proposer may approve")
            .valid_approvals,
        0,
        "but it does not count"
    );
    // Nor does another certificate of the proposer's entry.
    let mut second = officer(1);
    second.fingerprint = "ee".repeat(32);
    assert_eq!(
        c.approve(&second, &id, None)
            .await
            .expect("approve")
            .valid_approvals,
        0
    );
    assert_eq!(
        c.approve(&officer(2), &id, None)
            .await
            .expect("approve")
            .valid_approvals,
        1
    );
    let err = c.execute(&officer(1), &id).await.expect_err("1 of 2");
    let msg = err.to_string();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{msg}");
    assert!(msg.contains("1 valid approval"), "{msg}");
    assert!(
        msg.contains("the proposer's own approval does not count"),
        "{msg}"
    );
    assert_eq!(
        c.approve(&officer(3), &id, None)
            .await
            .expect("approve")
            .valid_approvals,
        2
    );
    let x = c.execute(&officer(1), &id).await.expect("execute");
    assert_eq!(x.view.record.state, CeremonyState::Succeeded);
    drop(state);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ceremony_interrupted_mid_run_fails_at_start_up_with_a_transcript() {
    let env = DevEnv::new();
    let server = env.start().await;
    let state = server.state().clone();
    let c = &state.ceremonies;
    let plan = format!("{SMALL}[[step]]\nkind = \"generate-key\"\nname = \"ca-y\"\nalgorithm = \"ES256\"\nusage = \"ca\"\n[[step]]\nkind = \"self-sign\"\nkey = \"ca-x\"\nsubject = \"CN=x\"\nvalidity_days = 10\n");
    let id = c
        .propose(&officer(1), &plan)
        .await
        .expect("propose")
        .record
        .id;
    c.approve(&officer(1), &id, None).await.expect("approve");
    c.approve(&officer(2), &id, None).await.expect("approve");
    // What a crash in step 2 leaves behind: the claim; the key step 1 generated and
    // recorded (as `steps::key_created` records it); the key step 2 generated in the
    // HSM, the crash coming before its record; step 3 never ran.
    let executed_at = crate::common::Clock::system().now();
    let k = state
        .signing
        .create_version(
            "ca-x",
            "ES256".parse().expect("alg"),
            crate::signing::Usage::Ca,
        )
        .await
        .expect("key");
    let unrecorded = state
        .signing
        .create_version(
            "ca-y",
            "ES256".parse().expect("alg"),
            crate::signing::Usage::Ca,
        )
        .await
        .expect("key");
    let (key, version) = (id.clone(), k.version);
    let executor = record::Officer {
        subject: "officer-3".into(),
        fingerprint: "03".repeat(32),
    };
    state
        .store
        .write(move |txn| {
            record::update(txn, &key, |current| {
                let mut rec = current.expect("proposed");
                rec.state = CeremonyState::Executing;
                rec.executed_by = Some(executor);
                rec.executed_at = executed_at;
                record::Change::Write(Box::new(rec), ())
            })?;
            record::put_key_origins(txn, &key, &[("ca-x".to_owned(), version)])
        })
        .await
        .expect("crafted");
    assert_eq!(
        c.get(&id).await.expect("get").record.state,
        CeremonyState::Executing
    );
    drop(state);
    server.shutdown().await.expect("shutdown");

    let server = env.start().await;
    let state = server.state().clone();
    let c = &state.ceremonies;
    let rec = c.get(&id).await.expect("get").record;
    assert_eq!(rec.state, CeremonyState::Failed);
    assert_eq!(rec.failure, "interrupted");
    let t: Transcript = serde_json::from_str(&rec.transcript_json).expect("transcript");
    assert_eq!(t.outcome, "failed");
    assert_eq!(t.failure, "interrupted");
    assert_eq!(
        t.executed_by.as_ref().map(|o| o.subject.as_str()),
        Some("officer-3")
    );
    // Both keys, not the dev bootstrap's assertion key (no name of the plan).
    let created: Vec<(&str, &str)> = t
        .created_keys
        .iter()
        .map(|e| (e.name.as_str(), e.kid.as_str()))
        .collect();
    assert_eq!(
        created,
        [("ca-x", k.kid.as_str()), ("ca-y", unrecorded.kid.as_str())]
    );
    // Both are now indexed as this ceremony's.
    let origins = c.key_origins().await.expect("origins");
    assert_eq!(origins.get(&("ca-y".to_owned(), 1)), Some(&id));
    assert!(
        t.steps.iter().all(|s| s.outcome == "unknown"),
        "{:?}",
        t.steps
    );
    let (json_path, text_path) = c.transcript_paths(&id);
    assert_eq!(
        std::fs::read_to_string(json_path).expect("json file"),
        rec.transcript_json
    );
    let text = std::fs::read_to_string(text_path).expect("text file");
    assert!(
        text.contains("outcome:     failed") && text.contains("interrupted"),
        "{text}"
    );
    // Audited, by the service, with what was created.
    let (trail, _) = state.audit.export_range(1, 100_000).await.expect("export");
    let records: Vec<serde_json::Value> = String::from_utf8(trail)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "ceremony.execute" && r["object"] == id.as_str())
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["outcome"], "failed: interrupted");
    assert_eq!(failed[0]["actor"]["subject"], "service");
    let details = failed[0]["details"]["details"].as_str().expect("details");
    assert!(
        details.contains("ca-x/v1") && details.contains("ca-y/v1"),
        "{details}"
    );
    // A failed ceremony does not run again.
    let err = c.execute(&officer(1), &id).await.expect_err("again");
    assert!(err.to_string().contains("runs once"), "{err}");
    drop(state);
    server.shutdown().await.expect("shutdown");

    // Nothing to recover the next time.
    let server = env.start().await;
    assert_eq!(
        server
            .state()
            .ceremonies
            .get(&id)
            .await
            .expect("get")
            .record
            .failure,
        "interrupted"
    );
    server.shutdown().await.expect("shutdown");
}

/// The restore path itself (behind plan validation, which refuses the same): a backed-up
/// version whose usage differs from its name's usage on this service is refused before
/// anything is put on the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_with_another_usage_is_refused_before_the_token() {
    use crate::hsm::{backup::WrappedKeyPair, KeyPairKind, PublicKeyAttributes};
    use crate::signing::{Algorithm, Usage};
    let env = DevEnv::new();
    let server = env.start().await;
    let signer = server.state().signing.clone();
    let point = p256::ecdsa::SigningKey::from_slice(&[7; 32])
        .unwrap()
        .verifying_key()
        .to_sec1_point(false);
    let mut ec_point = vec![0x04, 65];
    ec_point.extend_from_slice(point.as_bytes());
    let wrapped = WrappedKeyPair {
        kind: KeyPairKind::EcP256,
        id: vec![0xb0, 0x0b],
        public: PublicKeyAttributes::Ec { ec_point },
        wrapped_private_key: vec![9; 40],
    };
    // A zero KEK: had the restore reached the token, the unwrap would fail otherwise.
    let kek = || zeroize::Zeroizing::new(vec![0u8; 32]);
    for (name, usage, here) in [
        ("assertion", Usage::Raw, "signing"),
        ("documents", Usage::Signing, "raw"),
    ] {
        let err = signer
            .restore_version(
                crate::signing::BackedUpKey {
                    name,
                    version: 9,
                    algorithm: Algorithm::Es256,
                    usage: Some(usage),
                    wrapped: &wrapped,
                    certificate_chain: vec![],
                },
                kek(),
            )
            .await
            .expect_err("usage clash");
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert!(
            err.to_string().contains(&format!(
                "{name} v9 was backed up as a {usage} key; {name} is a {here} key"
            )),
            "{err}"
        );
        assert!(!signer.list(Some(name)).iter().any(|k| k.version == 9));
    }
    assert!(signer.hsm().private_key_facts(&[0xb0, 0x0b]).await.is_err());
    server.shutdown().await.expect("shutdown");
}
