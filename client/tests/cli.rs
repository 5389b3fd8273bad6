//! `hsmctl`, subcommand by subcommand, against a real service started in this process.

mod common;

use std::process::Command;

use common::{hsmctl, stdout};

use hsm_service::testing::DevEnv;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_text_and_json() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let out = hsmctl(&env, addr, "login-service", &["health"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "SERVING");
    let out = hsmctl(&env, addr, "login-service", &["health", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["status"], "SERVING");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["health", "--service", "hsm.v1.AdminService", "--json"],
    );
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["service"], "hsm.v1.AdminService");
    assert_eq!(v["status"], "SERVING");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_for_officer_and_refusal_for_login_service() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let out = hsmctl(&env, addr, "officer-1", &["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["caller"]["role"], "officer");
    assert_eq!(v["token"]["logged_in"], true);
    assert_eq!(v["pool"]["sessions"], 4);
    let metrics = server.metrics_addr().expect("dev mode serves metrics");
    assert_eq!(
        v["metrics"]["endpoint"],
        format!("http://{metrics}/metrics")
    );
    assert!(v["metrics"]["rpc_requests"].as_u64().is_some(), "{v}");
    assert!(v["metrics"]["audit_records"].as_u64() >= Some(1), "{v}");
    let out = hsmctl(&env, addr, "officer-1", &["status"]);
    let text = stdout(&out);
    assert!(text.contains("logged in: true"), "{text}");
    assert!(
        text.contains(&format!("metrics: http://{metrics}/metrics")),
        "{text}"
    );
    for line in [
        "rpc:     ",
        "verify:  ",
        "seeds:   cache ",
        "store:   ",
        "audit:   ",
    ] {
        assert!(text.contains(line), "{line:?} missing: {text}");
    }

    let out = hsmctl(&env, addr, "login-service", &["status", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["error"]["code"], "PermissionDenied");
    let out = hsmctl(&env, addr, "login-service", &["status"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"),
        "{out:?}"
    );
    server.shutdown().await.expect("shutdown");
}

#[test]
fn connection_errors_are_one_clear_line() {
    let env = DevEnv::new();
    // Nothing listens on this port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let out = hsmctl(&env, addr, "login-service", &["health"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("hsmctl: cannot connect to https://127.0.0.1:"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hsmctl"))
        .args(["--ca", "/nonexistent/ca.crt", "health"])
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/ca.crt"),
        "{out:?}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hsmctl"))
        .args(["--endpoint", "http://127.0.0.1:1"])
        .arg("--ca")
        .arg(env.pki("ca.crt"))
        .arg("--cert")
        .arg(env.pki("login-service.crt"))
        .arg("--key")
        .arg(env.pki("login-service.key"))
        .arg("health")
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the scheme must be https"),
        "{out:?}"
    );
}
