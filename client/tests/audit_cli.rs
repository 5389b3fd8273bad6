//! `hsmctl audit export|keys|checkpoint|verify` against a real service: the trail records
//! what happened, verifies when untouched, and pinpoints an edited, a deleted and a
//! swapped record.

mod common;

use std::path::{Path, PathBuf};

use common::{hsmctl, json, stdout};
use hsm_service::testing::DevEnv;

const SEED_HEX: &str = "3132333435363738393031323334353637383930";

fn code(counter: u64) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        b"12345678901234567890",
    );
    let tag = ring::hmac::sign(&key, &counter.to_be_bytes());
    let mac = tag.as_ref();
    let off = usize::from(mac[19] & 0x0f);
    let bin = u32::from_be_bytes([mac[off] & 0x7f, mac[off + 1], mac[off + 2], mac[off + 3]]);
    format!("{:06}", bin % 1_000_000)
}

/// Some activity, then an export and the keys; returns (log, keys).
async fn exported(env: &DevEnv) -> (PathBuf, PathBuf) {
    let server = env.start().await;
    let addr = server.local_addr();
    let seed = env.dir.path().join("seed.hex");
    std::fs::write(&seed, SEED_HEX).expect("seed");
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
            "a1",
            "--seed-file",
            &seed.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(hsmctl(
        env,
        addr,
        "login-service",
        &["credential", "verify", "a1", &code(0)]
    )
    .status
    .success());
    hsmctl(
        env,
        addr,
        "login-service",
        &["credential", "verify", "a1", &code(0)],
    );
    // A refused call is recorded too.
    let out = hsmctl(env, addr, "login-service", &["status"]);
    assert_eq!(out.status.code(), Some(2));
    // Refusals are written per window; the checkpoint below writes the open one first.
    let log = env.dir.path().join("audit.jsonl");
    let keys = env.dir.path().join("audit-keys.json");
    let out = hsmctl(
        env,
        addr,
        "auditor",
        &[
            "audit",
            "export",
            "--checkpoint",
            "--out",
            &log.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let out = hsmctl(
        env,
        addr,
        "auditor",
        &["audit", "keys", "--out", &keys.display().to_string()],
    );
    assert!(out.status.success(), "{out:?}");
    let out = hsmctl(env, addr, "login-service", &["audit", "export"]);
    assert_eq!(json_error(&out), "PermissionDenied", "only auditors export");
    server.shutdown().await.expect("shutdown");
    (log, keys)
}

fn json_error(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .split(':')
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_owned()
}

fn verify(env: &DevEnv, log: &Path, keys: &Path) -> std::process::Output {
    // Offline: the endpoint is never contacted.
    hsmctl(
        env,
        "127.0.0.1:9".parse().expect("addr"),
        "auditor",
        &[
            "audit",
            "verify",
            &log.display().to_string(),
            "--keys",
            &keys.display().to_string(),
            "--json",
        ],
    )
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .expect("log")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(log: &Path, lines: &[String]) {
    std::fs::write(log, lines.join("\n") + "\n").expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untouched_log_verifies_and_records_what_happened() {
    let env = DevEnv::new();
    let (log, keys) = exported(&env).await;
    let text = std::fs::read_to_string(&log).expect("log");
    for action in [
        "\"service.start\"",
        "\"credential.create\"",
        "\"credential.verify\"",
        "\"auth.denied\"",
        "\"audit.checkpoint\"",
    ] {
        assert!(text.contains(action), "{action} missing from the trail");
    }
    assert!(text.contains("\"result\":\"accepted\"") && text.contains("\"result\":\"replayed\""));
    assert!(
        !text.contains(&code(0)),
        "a code must never be in the trail"
    );
    let out = verify(&env, &log, &keys);
    assert!(out.status.success(), "{}", stdout(&out));
    let v = json(&out);
    assert_eq!(v["ok"], true);
    assert_eq!(v["uncovered_tail"], 0);
    assert!(v["checkpoints"].as_u64().expect("checkpoints") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_record_is_pinpointed() {
    let env = DevEnv::new();
    let (log, keys) = exported(&env).await;
    let mut l = lines(&log);
    let i = l
        .iter()
        .position(|r| r.contains("\"result\":\"replayed\""))
        .expect("replayed record");
    l[i] = l[i].replace("\"result\":\"replayed\"", "\"result\":\"accepted\"");
    write_lines(&log, &l);
    let out = verify(&env, &log, &keys);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    let p = &v["problems"][0];
    assert_eq!(
        (p["kind"].as_str(), p["line"].as_u64()),
        (Some("Altered"), Some(i as u64 + 1)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_record_is_pinpointed() {
    let env = DevEnv::new();
    let (log, keys) = exported(&env).await;
    let mut l = lines(&log);
    let i = l
        .iter()
        .position(|r| r.contains("\"auth.denied\""))
        .expect("refusal record");
    l.remove(i);
    write_lines(&log, &l);
    let out = verify(&env, &log, &keys);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    let p = &v["problems"][0];
    assert_eq!(p["kind"], "Removed", "{v}");
    assert!(
        p["message"]
            .as_str()
            .expect("message")
            .contains(&format!("record {} removed", i + 1)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_records_are_pinpointed() {
    let env = DevEnv::new();
    let (log, keys) = exported(&env).await;
    let mut l = lines(&log);
    l.swap(1, 2);
    write_lines(&log, &l);
    let out = verify(&env, &log, &keys);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    let p = &v["problems"][0];
    assert_eq!(
        (p["kind"].as_str(), p["line"].as_u64()),
        (Some("Reordered"), Some(2)),
        "{v}"
    );
}
