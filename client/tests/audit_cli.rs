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

/// `hsmctl audit verify` with any flags, offline, JSON output.
fn verify_with(env: &DevEnv, args: &[&str]) -> std::process::Output {
    let mut all = vec!["audit", "verify", "--json"];
    all.extend_from_slice(args);
    hsmctl(env, "127.0.0.1:9".parse().expect("addr"), "auditor", &all)
}

/// The (only) key of a keys file as `KEYID:HEX`.
fn pin_of(keys: &Path) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(keys).expect("keys")).expect("json");
    let (id, hex) = map.iter().next().expect("one key");
    format!("{id}:{}", hex.as_str().expect("hex"))
}

fn other_public_key_hex() -> String {
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key");
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("key");
    pair.public_key()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_key_pins_the_checkpoint_key() {
    let env = DevEnv::new();
    let (log, keys) = exported(&env).await;
    let log = log.display().to_string();
    let pin = pin_of(&keys);

    // The pin alone is enough: no keys file needed.
    let out = verify_with(&env, &[&log, "--expect-key", &pin]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(json(&out)["checkpoints"].as_u64().expect("n") >= 1);

    // Pinned to another key: every checkpoint is refused, though the keys file trusts
    // the key that signed them.
    let other = format!("audit-other:{}", other_public_key_hex());
    let keys = keys.display().to_string();
    let out = verify_with(&env, &[&log, "--keys", &keys, "--expect-key", &other]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let v = json(&out);
    let problems = v["problems"].as_array().expect("problems");
    assert!(!problems.is_empty());
    assert!(
        problems
            .iter()
            .all(|p| p["kind"] == "CheckpointNotPinnedKey"),
        "{v}"
    );

    // The service's key id with another public key: the keys file contradicts the pin.
    let id = pin.split(':').next().expect("id");
    let wrong = format!("{id}:{}", other_public_key_hex());
    let out = verify_with(&env, &[&log, "--keys", &keys, "--expect-key", &wrong]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("another public key than --expect-key"),
        "{out:?}"
    );
    let out = verify_with(&env, &[&log, "--expect-key", &wrong]);
    assert_eq!(out.status.code(), Some(1));
    assert!(json(&out)["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .all(|p| p["kind"] == "CheckpointSignatureInvalid"));

    // A malformed pin is refused before anything is read.
    let out = verify_with(&env, &[&log, "--expect-key", "audit-1:xyz"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--expect-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_anchor_verifies_a_segment_against_a_value_kept_out_of_band() {
    let env = DevEnv::new();
    let (log, keys) = exported(&env).await;
    let keys = keys.display().to_string();

    // The whole log verifies and prints its head: the anchor of the next segment.
    let out = verify_with(&env, &[&log.display().to_string(), "--keys", &keys]);
    assert!(out.status.success());
    let head = &json(&out)["head"];
    assert!(head["seq"].as_u64().expect("seq") > 3);

    // A segment from record 4 on, anchored at record 3 (seq:hash kept out of band).
    let l = lines(&log);
    let third = hsm_service::audit::AuditRecord::from_json_line(&l[2]).expect("record");
    let segment = env.dir.path().join("segment.jsonl");
    write_lines(&segment, &l[3..]);
    let segment = segment.display().to_string();
    let anchor = format!("{}:{}", third.seq, third.hash);
    let out = verify_with(&env, &[&segment, "--keys", &keys, "--from-anchor", &anchor]);
    assert!(out.status.success(), "{}", stdout(&out));

    // A wrong anchor is refused at the first record.
    let wrong = format!(
        "{}:{}",
        third.seq,
        hsm_service::audit::sha256_hex(b"elsewhere")
    );
    let out = verify_with(&env, &[&segment, "--keys", &keys, "--from-anchor", &wrong]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(
        (
            v["problems"][0]["kind"].as_str(),
            v["problems"][0]["line"].as_u64()
        ),
        (Some("Altered"), Some(1)),
        "{v}"
    );
    // So is an anchor at the wrong seq, and a malformed one.
    let out = verify_with(
        &env,
        &[
            &segment,
            "--keys",
            &keys,
            "--from-anchor",
            &format!("2:{}", third.hash),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let out = verify_with(&env, &[&segment, "--keys", &keys, "--from-anchor", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SEQ:HASH"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_are_listed_and_exported_one_by_one() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let out = hsmctl(&env, addr, "auditor", &["audit", "checkpoint"]);
    assert!(out.status.success(), "{out:?}");
    let out = hsmctl(&env, addr, "auditor", &["audit", "chains", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["own_chain"], "default", "{v}");
    let chains = v["chains"].as_array().expect("chains");
    assert_eq!(chains.len(), 1, "the embedded store has one chain: {v}");
    let c = &chains[0];
    assert_eq!(c["chain"], "default");
    let head = c["head"]["seq"].as_u64().expect("head");
    assert!(head >= 2 && c["records"].as_u64() == Some(head), "{v}");
    assert_eq!(c["last_checkpoint"]["seq"].as_u64(), Some(head), "{v}");
    assert_eq!(c["after_last_checkpoint"], 1, "the checkpoint itself: {v}");
    let out = hsmctl(&env, addr, "auditor", &["audit", "chains"]);
    assert!(
        stdout(&out).starts_with("default (this instance): "),
        "{out:?}"
    );

    // One chain's export is the plain record stream (no header): as before chains.
    let all = hsmctl(&env, addr, "auditor", &["audit", "export"]);
    let one = hsmctl(
        &env,
        addr,
        "auditor",
        &["audit", "export", "--chain", "default"],
    );
    assert!(all.status.success() && one.status.success());
    assert!(stdout(&all).starts_with("{\"seq\":1,"), "{}", stdout(&all));
    assert_eq!(stdout(&all), stdout(&one));
    // After the two exports: a refused call is recorded (aggregated, flushed later), so
    // made earlier its record could land between them.
    let out = hsmctl(&env, addr, "login-service", &["audit", "chains"]);
    assert_eq!(json_error(&out), "PermissionDenied");
    let none = hsmctl(
        &env,
        addr,
        "auditor",
        &["audit", "export", "--chain", "node-9"],
    );
    assert_eq!(json_error(&none), "NotFound", "{none:?}");
    let bad = hsmctl(
        &env,
        addr,
        "auditor",
        &["audit", "export", "--chain", "a b"],
    );
    assert_eq!(bad.status.code(), Some(2));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chain_of_an_export_is_verified_and_a_gap_names_its_chain() {
    let env = DevEnv::new();
    let (log, keys) = exported(&env).await;
    let keys = keys.display().to_string();
    // A second instance's chain: its own sequence from 1 after its header. (The same
    // records form a valid chain of their own: each chain starts from the genesis hash.)
    let first = lines(&log);
    let mut both = first.clone();
    both.push(hsm_service::audit::chain_header("node-2"));
    both.extend(first.iter().cloned());
    let two = env.dir.path().join("two.jsonl");
    write_lines(&two, &both);
    let two_s = two.display().to_string();

    let out = verify_with(&env, &[&two_s, "--keys", &keys]);
    assert!(out.status.success(), "{}", stdout(&out));
    let v = json(&out);
    let chains = v["chains"].as_array().expect("chains");
    let names: Vec<_> = chains.iter().map(|c| c["chain"].as_str()).collect();
    assert_eq!(names, [Some("default"), Some("node-2")], "{v}");
    for c in chains {
        assert_eq!(c["records"].as_u64(), Some(first.len() as u64), "{v}");
        assert_eq!(c["head"]["seq"].as_u64(), Some(first.len() as u64), "{v}");
        assert_eq!(
            c["last_checkpoint"].as_u64(),
            Some(first.len() as u64),
            "{v}"
        );
        assert_eq!(c["uncovered_tail"], 0, "{v}");
    }
    let out = hsmctl(
        &env,
        "127.0.0.1:9".parse().expect("addr"),
        "auditor",
        &["audit", "verify", &two_s, "--keys", &keys],
    );
    let shown = stdout(&out);
    assert!(shown.contains("audit chain default OK"), "{shown}");
    assert!(shown.contains("audit chain node-2 OK"), "{shown}");
    assert!(shown.contains("audit trail OK: 2 chains"), "{shown}");

    // Record 2 of node-2 removed: a gap of node-2, pinned to its line; default is intact.
    let mut cut = both.clone();
    let at = first.len() + 2; // header, then node-2's seq 1, then seq 2 (0-based index)
    assert!(cut[at].starts_with("{\"seq\":2,"), "{}", cut[at]);
    cut.remove(at);
    write_lines(&two, &cut);
    let out = verify_with(&env, &[&two_s, "--keys", &keys]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let v = json(&out);
    assert_eq!(v["chains"][0]["ok"], true, "{v}");
    let node = &v["chains"][1];
    assert_eq!(
        (node["chain"].as_str(), node["ok"].as_bool()),
        (Some("node-2"), Some(false))
    );
    assert_eq!(node["gaps"].as_array().expect("gaps").len(), 1, "{v}");
    let p = &v["problems"][0];
    assert_eq!(
        (p["chain"].as_str(), p["kind"].as_str(), p["line"].as_u64()),
        (Some("node-2"), Some("Removed"), Some(at as u64 + 1)),
        "{v}"
    );
    assert!(
        p["message"]
            .as_str()
            .expect("m")
            .contains("record 2 removed"),
        "{v}"
    );
    let out = hsmctl(
        &env,
        "127.0.0.1:9".parse().expect("addr"),
        "auditor",
        &["audit", "verify", &two_s, "--keys", &keys],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("audit chain node-2 FAILED"),
        "{}",
        stdout(&out)
    );

    // --chain restricts: the intact chain alone verifies; an absent one is a problem.
    let out = verify_with(&env, &[&two_s, "--keys", &keys, "--chain", "default"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(json(&out)["chains"].as_array().map(Vec::len), Some(1));
    let out = verify_with(&env, &[&two_s, "--keys", &keys, "--chain", "node-3"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["problems"][0]["kind"], "UnexpectedChain");

    // --from-anchor with two chains needs the chain named.
    let third = hsm_service::audit::AuditRecord::from_json_line(&first[2]).expect("record");
    let anchor = format!("{}:{}", third.seq, third.hash);
    let mut seg = first[..].to_vec();
    seg.push(hsm_service::audit::chain_header("node-2"));
    seg.extend(first[3..].iter().cloned());
    write_lines(&two, &seg);
    let out = verify_with(&env, &[&two_s, "--keys", &keys, "--from-anchor", &anchor]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let out = verify_with(
        &env,
        &[
            &two_s,
            "--keys",
            &keys,
            "--from-anchor",
            &anchor,
            "--chain",
            "node-2",
        ],
    );
    assert!(out.status.success(), "{}", stdout(&out));
}
