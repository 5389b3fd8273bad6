//! `hsmctl credential ...`, one test per subcommand family.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{hsmctl, json, stdout};
use hsm_service::otp::{self, Digits};
use hsm_service::testing::DevEnv;

const SEED_HEX: &str = "3132333435363738393031323334353637383930"; // RFC 4226 seed

fn hotp(counter: u64) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        b"12345678901234567890",
    );
    let tag = ring::hmac::sign(&key, &otp::moving_factor(counter));
    format!(
        "{:06}",
        otp::truncate(tag.as_ref(), Digits::new(6).expect("digits"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_verify_resync_get_list() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let seed_file = env.dir.path().join("seed.hex");
    std::fs::write(&seed_file, format!("{SEED_HEX}\n")).expect("seed file");
    let seed_arg = seed_file.display().to_string();

    // create: import from a file
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "credential",
            "create",
            "--kind",
            "hotp",
            "--id",
            "tok-1",
            "--seed-file",
            &seed_arg,
            "--subject",
            "citizen-4711",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(
        (
            v["credential_id"].as_str(),
            v["kind"].as_str(),
            v["state"].as_str()
        ),
        (Some("tok-1"), Some("hotp"), Some("active"))
    );
    assert_eq!(
        (v["subject"].as_str(), v["tenant"].as_str()),
        (Some("citizen-4711"), Some("login-service"))
    );
    assert!(v.get("provisioning_uri").is_none());

    // create: import from stdin, as base32
    let mut child = common::command(&env, addr, "login-service")
        .args([
            "credential",
            "create",
            "--kind",
            "totp",
            "--id",
            "app-1",
            "--seed-file",
            "-",
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["period_seconds"], 30);

    // create: generated with reveal
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "credential",
            "create",
            "--kind",
            "totp",
            "--reveal",
            "--issuer",
            "MitID",
            "--account",
            "alice",
            "--json",
        ],
    );
    let v = json(&out);
    assert!(v["provisioning_uri"]
        .as_str()
        .expect("uri")
        .starts_with("otpauth://totp/MitID:alice?secret="));
    assert_eq!(v["credential_id"].as_str().expect("id").len(), 32);

    // verify: ACCEPTED exits 0 with the evidence id, REPLAYED exits 1 without
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "verify", "tok-1", &hotp(0), "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["result"], "ACCEPTED");
    assert_eq!(v["evidence_id"].as_str().expect("evidence").len(), 32);
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "verify", "tok-1", &hotp(1)],
    );
    assert!(out.status.success(), "{out:?}");
    let line = stdout(&out);
    let evidence = line
        .lines()
        .find_map(|l| l.strip_prefix("evidence "))
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(evidence.len(), 32, "{line}");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "verify", "tok-1", &hotp(1)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("REPLAYED"), "{out:?}");
    assert!(!stdout(&out).contains("evidence"), "{out:?}");

    // resync: 300 presses later
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "credential",
            "resync",
            "tok-1",
            &hotp(300),
            &hotp(301),
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(
        (v["result"].as_str(), v["credential"]["counter"].as_u64()),
        (Some("ACCEPTED"), Some(302))
    );

    // get and list
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "get", "tok-1", "--json"],
    );
    assert_eq!(json(&out)["last_accepted"], 301);
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "list", "--page-size", "1", "--all", "--json"],
    );
    let v = json(&out);
    assert_eq!(v["credentials"].as_array().expect("list").len(), 3);
    assert_eq!(v["next_page_token"], "");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "list", "--page-size", "2"],
    );
    assert!(
        stdout(&out).contains("next page: --page-token "),
        "{}",
        stdout(&out)
    );

    // Tenants: the second dev login service sees none of it; officers see all.
    let out = hsmctl(
        &env,
        addr,
        "login-service-b",
        &["credential", "get", "tok-1", "--json"],
    );
    assert_eq!(json(&out)["error"]["code"], "NotFound");
    let out = hsmctl(
        &env,
        addr,
        "login-service-b",
        &["credential", "list", "--json"],
    );
    assert_eq!(json(&out)["credentials"], serde_json::json!([]));
    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &["credential", "list", "--all", "--page-size", "2", "--json"],
    );
    let v = json(&out);
    let all = v["credentials"].as_array().expect("list");
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|c| c["tenant"] == "login-service"), "{v}");
    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &[
            "credential",
            "get",
            "tok-1",
            "--tenant",
            "login-service",
            "--json",
        ],
    );
    assert_eq!(json(&out)["subject"], "citizen-4711");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_enable_unlock_delete() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let seed_file = env.dir.path().join("seed.hex");
    std::fs::write(&seed_file, SEED_HEX).expect("seed file");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "credential",
            "create",
            "--kind",
            "hotp",
            "--id",
            "t",
            "--seed-file",
            &seed_file.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{out:?}");

    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "disable", "t", "--json"],
    );
    assert_eq!(json(&out)["state"], "disabled");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "verify", "t", &hotp(0), "--json"],
    );
    assert_eq!(json(&out)["result"], "DISABLED");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "enable", "t", "--json"],
    );
    assert_eq!(json(&out)["state"], "active");

    for _ in 0..5 {
        hsmctl(
            &env,
            addr,
            "login-service",
            &["credential", "verify", "t", "999999"],
        );
    }
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "get", "t", "--json"],
    );
    let v = json(&out);
    if hotp(0) != "999999" {
        assert_eq!(v["state"], "locked");
    }
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "unlock", "t", "--json"],
    );
    assert_eq!(out.status.code(), Some(2), "login services may not unlock");
    assert_eq!(json(&out)["error"]["code"], "PermissionDenied");
    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &["credential", "unlock", "t", "--json"],
    );
    assert_eq!(
        json(&out)["error"]["code"],
        "InvalidArgument",
        "officers name the tenant"
    );
    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &[
            "credential",
            "unlock",
            "t",
            "--tenant",
            "login-service",
            "--json",
        ],
    );
    let v = json(&out);
    assert_eq!(
        (v["state"].as_str(), v["failures"].as_u64()),
        (Some("active"), Some(0))
    );

    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "delete", "t", "--json"],
    );
    assert_eq!(json(&out)["deleted"], "t");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "get", "t", "--json"],
    );
    assert_eq!(json(&out)["error"]["code"], "NotFound");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_seed_file_is_refused() {
    let env = DevEnv::new();
    let server = env.start().await;
    let bad = env.dir.path().join("bad.seed");
    std::fs::write(&bad, "not a seed!").expect("write");
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &[
            "credential",
            "create",
            "--kind",
            "hotp",
            "--seed-file",
            &bad.display().to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("neither hex nor base32"), "{err}");
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &["credential", "list", "--json"],
    );
    assert_eq!(
        json(&out)["credentials"].as_array().map(Vec::len),
        Some(0),
        "nothing was created"
    );
    server.shutdown().await.expect("shutdown");
}
