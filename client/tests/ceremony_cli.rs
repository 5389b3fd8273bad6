//! `hsmctl ceremony ...` and `hsmctl keys list` against a real service in this process.

use std::net::SocketAddr;
use std::process::{Command, Output};

use hsm_service::testing::DevEnv;
use serde_json::Value;

fn hsmctl(env: &DevEnv, addr: SocketAddr, identity: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hsmctl"))
        .arg("--endpoint")
        .arg(format!("https://{addr}"))
        .arg("--ca")
        .arg(env.pki("ca.crt"))
        .arg("--cert")
        .arg(env.pki(&format!("{identity}.crt")))
        .arg("--key")
        .arg(env.pki(&format!("{identity}.key")))
        .args(args)
        .output()
        .expect("run hsmctl")
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&String::from_utf8_lossy(&o.stdout))
        .unwrap_or_else(|e| panic!("{e}: {o:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_approve_execute_show_list() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let plan = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ceremonies/example-root-and-assertion.toml"
    );

    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["ceremony", "propose", plan, "--json"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(json(&out)["error"]["code"], "PermissionDenied");

    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &["ceremony", "propose", plan, "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let id = json(&out)["ceremony_id"].as_str().expect("id").to_owned();
    let out = hsmctl(&env, addr, "officer-1", &["ceremony", "approve", &id]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 valid of 2 needed"),
        "{out:?}"
    );
    let out = hsmctl(
        &env,
        addr,
        "officer-2",
        &["ceremony", "execute", &id, "--json"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(json(&out)["error"]["code"], "FailedPrecondition");
    let out = hsmctl(
        &env,
        addr,
        "officer-2",
        &["ceremony", "approve", &id, "--json"],
    );
    assert_eq!(json(&out)["valid_approvals"], 2);

    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().to_str().expect("utf-8");
    let out = hsmctl(
        &env,
        addr,
        "officer-3",
        &["ceremony", "execute", &id, "--out", out_dir],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("KEY CEREMONY TRANSCRIPT"), "{text}");
    assert!(dir.path().join(format!("{id}.json")).is_file());
    assert!(dir.path().join(format!("{id}.txt")).is_file());

    let out = hsmctl(&env, addr, "auditor", &["ceremony", "show", &id, "--json"]);
    assert_eq!(json(&out)["state"], "succeeded");
    let out = hsmctl(&env, addr, "auditor", &["ceremony", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&id),
        "{out:?}"
    );
    let out = hsmctl(
        &env,
        addr,
        "officer-1",
        &["ceremony", "show", "xyz", "--json"],
    );
    assert_eq!(json(&out)["error"]["code"], "InvalidArgument");

    let out = hsmctl(&env, addr, "auditor", &["keys", "list", "--json"]);
    let keys = json(&out)["keys"].as_array().expect("keys").clone();
    let root = keys
        .iter()
        .find(|k| k["name"] == "root-ca")
        .expect("root-ca");
    assert_eq!(root["ceremony_id"], id.as_str());
    assert_eq!(root["extractable"], false);
    assert_eq!(root["sensitive"], true);
    let out = hsmctl(&env, addr, "auditor", &["keys", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("ceremony {id}")),
        "{out:?}"
    );
    server.shutdown().await.expect("shutdown");
}
