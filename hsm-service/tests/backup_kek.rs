//! `hsm-service backup-kek`: offline creation of the trusted backup KEK and its share
//! files, and its refusals (one clear line, exit code 1).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn backup_kek(dir: &Path, out: &Path, label: &str, threshold: &str, shares: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hsm-service"))
        .arg("backup-kek")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .arg("--so-pin-file")
        .arg(dir.join("so.pin"))
        .args([
            "--label",
            label,
            "--threshold",
            threshold,
            "--shares",
            shares,
        ])
        .arg("--out")
        .arg(out)
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null())
        .output()
        .expect("run")
}

fn refusal(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "must refuse");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("hsm-service: "))
        .collect();
    assert_eq!(lines.len(), 1, "one line saying what is wrong: {stderr}");
    lines[0].to_owned()
}

#[test]
fn backup_kek_writes_m_of_n_share_files_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _) = common::spawn_dev(dir.path());
    assert!(common::terminate(&mut child).success());
    let so_pin = std::fs::read_to_string(dir.path().join("so.pin")).expect("so.pin");
    let shares = tempfile::tempdir().expect("tempdir");

    let out = backup_kek(dir.path(), shares.path(), "backup-kek-1", "2", "3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("2 of 3 shares needed"), "{stdout}");
    assert!(!stdout.contains(so_pin.trim()) && !stderr.contains(so_pin.trim()));
    let mut names: Vec<String> = std::fs::read_dir(shares.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "backup-kek-1.share-1",
            "backup-kek-1.share-2",
            "backup-kek-1.share-3"
        ]
    );
    for name in &names {
        let text = std::fs::read_to_string(shares.path().join(name)).expect("read");
        let body = text.lines().nth(1).expect("share line");
        assert!(!stdout.contains(body), "a share is never printed");
    }

    let line = refusal(&backup_kek(
        dir.path(),
        shares.path(),
        "backup-kek-1",
        "2",
        "3",
    ));
    assert!(line.contains("never overwritten"), "{line}");
    let other = tempfile::tempdir().expect("tempdir");
    let line = refusal(&backup_kek(
        dir.path(),
        other.path(),
        "backup-kek-1",
        "2",
        "3",
    ));
    assert!(line.contains("never replaced"), "{line}");
    let line = refusal(&backup_kek(
        dir.path(),
        other.path(),
        "backup-kek-2",
        "4",
        "3",
    ));
    assert!(line.contains("threshold 4 of 3"), "{line}");
    let line = refusal(&backup_kek(dir.path(), other.path(), "../kek", "2", "3"));
    assert!(line.contains("KEK label"), "{line}");
    let line = refusal(&backup_kek(
        dir.path(),
        &other.path().join("missing"),
        "backup-kek-2",
        "2",
        "3",
    ));
    assert!(line.contains("not a directory"), "{line}");
    assert!(std::fs::read_dir(other.path()).unwrap().next().is_none());

    // The store knows the KEK (for plans) and the audit trail has its record.
    let store = hsm_service::store::Store::open_redb(
        &dir.path().join(hsm_service::server::STORE_FILE),
        Default::default(),
    )
    .expect("store");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let keks = runtime
        .block_on(hsm_service::ceremony::shares::load_keks(&store))
        .expect("KEK records");
    let rec = keks.get("backup-kek-1").expect("record of backup-kek-1");
    assert!(stdout.contains(&rec.check), "{stdout}");
    assert_eq!((rec.threshold, rec.shares, keks.len()), (2, 3, 1));
    let audit: Vec<String> = store
        .read_blocking(|txn| {
            let lines = txn.audit_range(hsm_service::store::DEFAULT_CHAIN, 0, usize::MAX)?;
            Ok(lines
                .into_iter()
                .map(|(_, line)| String::from_utf8_lossy(&line).into_owned())
                .collect())
        })
        .expect("audit records");
    let created: Vec<&String> = audit
        .iter()
        .filter(|r| r.contains("backup-kek.create"))
        .collect();
    assert_eq!(created.len(), 1, "{audit:?}");
    assert!(created[0].contains("backup-kek-1") && created[0].contains(&rec.check));
    store.close().expect("close");

    // While the service runs, its store is locked: refused before the token is touched.
    let (mut child, _) = common::spawn_dev(dir.path());
    let running = tempfile::tempdir().expect("tempdir");
    let line = refusal(&backup_kek(
        dir.path(),
        running.path(),
        "backup-kek-3",
        "2",
        "3",
    ));
    assert!(common::terminate(&mut child).success());
    assert!(line.contains("with the service stopped"), "{line}");
    assert!(std::fs::read_dir(running.path()).unwrap().next().is_none());
}
