//! The real binary: dev mode on a fresh directory, graceful shutdown, and every refusal
//! to start with a bad configuration (one clear line, exit code 1).

mod common;

use std::path::Path;
use std::process::Stdio;

use tonic_health::pb::health_check_response::ServingStatus;

/// A dev data directory made by the binary itself, with the service stopped again.
fn dev_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _) = common::spawn_dev(dir.path());
    assert!(common::terminate(&mut child).success());
    dir
}

/// Run `serve` with `config_text` written next to the dev files; expect a refusal.
fn refusal(dir: &Path, config_text: &str) -> String {
    let path = dir.join("bad.toml");
    std::fs::write(&path, config_text).expect("write config");
    let out = common::serve_command(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "must refuse to start");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("hsm-service: "))
        .collect();
    assert_eq!(lines.len(), 1, "one line saying what is wrong: {stderr}");
    lines[0].to_owned()
}

fn dev_config(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("config.toml")).expect("config.toml")
}

#[tokio::test]
async fn dev_mode_comes_up_is_reused_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = common::spawn_dev(dir.path());
    for file in [
        "config.toml",
        "user.pin",
        "so.pin",
        "softhsm2.conf",
        "pki/ca.crt",
        "pki/server.crt",
        "pki/login-service.key",
        "pki/login-service-b.crt",
        "pki/login-service-b.key",
        "pki/officer-3.crt",
        "pki/auditor.key",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    // The second login service is its own tenant (its cn); neither may sign unbound, and
    // OTP evidence reaches NSIS Substantial but not High.
    let written: hsm_service::config::Config =
        toml::from_str(&std::fs::read_to_string(dir.path().join("config.toml")).expect("config"))
            .expect("parses");
    let b = written
        .clients
        .iter()
        .find(|r| r.cn.as_deref() == Some("login-service-b"))
        .expect("a rule for login-service-b");
    assert_eq!(b.tenant(), "login-service-b");
    assert!(written.clients.iter().all(|r| !r.unbound_assertions));
    let otp = hsm_service::common::AuthMethod::Otp;
    let nsis = hsm_service::signing::NSIS_ACR_VALUES;
    assert!(written.signing.evidence_reaches(nsis[0], otp));
    assert!(!written.signing.evidence_reaches(nsis[1], otp));
    assert!(written.signing.accepts_acr(nsis[1]));
    use std::os::unix::fs::PermissionsExt;
    for secret in [
        "user.pin",
        "so.pin",
        "pki/ca.key",
        "pki/login-service.key",
        "pki/login-service-b.key",
    ] {
        let mode = std::fs::metadata(dir.path().join(secret))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret} must be private, mode {mode:o}");
    }
    let client = common::client(dir.path(), "login-service", addr).await;
    assert_eq!(
        client.health().await.expect("health"),
        ServingStatus::Serving
    );
    let status = common::terminate(&mut child);
    assert!(status.success(), "exit status {status}");

    // Second run: same token, same PKI, same PINs.
    let pin_before = std::fs::read(dir.path().join("user.pin")).expect("pin");
    let ca_before = std::fs::read(dir.path().join("pki/ca.crt")).expect("ca");
    let (mut child, addr) = common::spawn_dev(dir.path());
    let client = common::client(dir.path(), "officer-1", addr).await;
    assert_eq!(
        client.health().await.expect("health"),
        ServingStatus::Serving
    );
    assert_eq!(
        std::fs::read(dir.path().join("user.pin")).expect("pin"),
        pin_before
    );
    assert_eq!(
        std::fs::read(dir.path().join("pki/ca.crt")).expect("ca"),
        ca_before
    );
    assert!(common::terminate(&mut child).success());
}

#[tokio::test]
async fn serve_runs_the_config_that_dev_mode_wrote() {
    let dir = dev_dir();
    let config = dev_config(dir.path()).replace("127.0.0.1:50051", "127.0.0.1:0");
    let path = dir.path().join("serve.toml");
    std::fs::write(&path, config).expect("write");
    let (mut child, addr) = common::spawn_serve(&path);
    let client = common::client(dir.path(), "auditor", addr).await;
    assert_eq!(
        client.health().await.expect("health"),
        ServingStatus::Serving
    );
    assert!(common::terminate(&mut child).success());
}

#[test]
fn refuses_an_unknown_config_key() {
    let dir = dev_dir();
    let text = dev_config(dir.path()).replace("[hsm]\n", "[hsm]\ntoken_lable = \"typo\"\n");
    let line = refusal(dir.path(), &text);
    assert!(line.contains("unknown field `token_lable`"), "{line}");
    assert!(line.contains("line "), "{line}");
}

#[test]
fn serve_refuses_a_ceremony_threshold_below_two() {
    let dir = dev_dir();
    let text = dev_config(dir.path());
    let at = text
        .find("[ceremony]")
        .expect("[ceremony] in the dev config");
    let (head, tail) = text.split_at(at);
    assert!(tail.contains("\nthreshold = 2\n"), "{tail}");
    let text = format!(
        "{head}{}",
        tail.replacen("\nthreshold = 2\n", "\nthreshold = 1\n", 1)
    );
    let line = refusal(dir.path(), &text);
    assert!(
        line.contains("ceremony.threshold is 1") && line.contains("at least 2"),
        "{line}"
    );
}

#[test]
fn refuses_a_missing_file() {
    let dir = dev_dir();
    let text = dev_config(dir.path()).replace("pki/server.crt", "pki/nope.crt");
    let line = refusal(dir.path(), &text);
    assert!(
        line.contains("server.cert")
            && line.contains("nope.crt")
            && line.contains("does not exist"),
        "{line}"
    );
}

#[test]
fn refuses_a_token_that_is_not_there() {
    let dir = dev_dir();
    let text = dev_config(dir.path()).replace(
        "token_label = \"hsm-dev\"",
        "token_label = \"no-such-token\"",
    );
    let line = refusal(dir.path(), &text);
    assert!(
        line.contains("no initialized token with label \"no-such-token\""),
        "{line}"
    );
}

#[test]
fn refuses_a_wrong_pin() {
    let dir = dev_dir();
    std::fs::write(dir.path().join("wrong.pin"), "0000000000\n").expect("pin");
    let text = dev_config(dir.path()).replace(
        "user_pin_file = \"user.pin\"",
        "user_pin_file = \"wrong.pin\"",
    );
    let line = refusal(dir.path(), &text);
    assert!(line.contains("C_Login failed: CKR_PIN_INCORRECT"), "{line}");
}

#[test]
fn refuses_a_server_key_that_does_not_match_the_certificate() {
    let dir = dev_dir();
    let text = dev_config(dir.path()).replace("pki/server.key", "pki/officer-1.key");
    let line = refusal(dir.path(), &text);
    assert!(line.contains("does not match the certificate"), "{line}");
}

#[test]
fn refuses_a_pin_from_an_unset_environment_variable() {
    let dir = dev_dir();
    let text = dev_config(dir.path()).replace(
        "user_pin_file = \"user.pin\"",
        "user_pin_env = \"HSM_TEST_PIN_NOT_SET\"",
    );
    let line = refusal(dir.path(), &text);
    assert!(line.contains("HSM_TEST_PIN_NOT_SET is not set"), "{line}");
}

#[tokio::test]
async fn json_logs_carry_no_pin_no_seed_no_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = common::spawn_dev_with(dir.path(), &["--log-format", "json"]);
    let client = common::client(dir.path(), "login-service", addr).await;
    let mut creds = hsm_client::proto::credential_service_client::CredentialServiceClient::new(
        client.channel(),
    );
    let seed = b"log-secret-seed-0001".to_vec();
    creds
        .create_credential(hsm_client::proto::CreateCredentialRequest {
            credential_id: "logged".into(),
            kind: hsm_client::proto::OtpKind::Hotp as i32,
            seed: seed.clone(),
            ..Default::default()
        })
        .await
        .expect("create");
    for code in ["135791", "246802"] {
        creds
            .verify_code(hsm_client::proto::VerifyCodeRequest {
                credential_id: "logged".into(),
                code: code.into(),
            })
            .await
            .expect("verify");
    }
    // A refused call and a bad request produce log lines too.
    let officer_only = client
        .admin()
        .get_status(hsm_client::proto::GetStatusRequest {})
        .await;
    assert!(officer_only.is_err());
    assert!(common::terminate(&mut child).success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read");
    let mut lines = 0;
    for line in stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
        lines += 1;
    }
    assert!(
        lines >= 3,
        "expected start, refusal and stop lines, got {lines}"
    );
    let pin = std::fs::read_to_string(dir.path().join("user.pin")).expect("pin");
    let so_pin = std::fs::read_to_string(dir.path().join("so.pin")).expect("so pin");
    for secret in [
        pin.trim(),
        so_pin.trim(),
        "135791",
        "246802",
        "log-secret-seed-0001",
    ] {
        assert!(!stderr.contains(secret), "a secret reached the log");
    }
}
