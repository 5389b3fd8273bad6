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

/// `hsmctl ceremony approve --share FILE`: the backup example on service A, then the
/// restore example on service B with the officers' share files handed in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_with_share_restores_a_backup_on_another_service() {
    let a = DevEnv::new();
    let so_pin = std::fs::read_to_string(a.dir.path().join("so.pin")).expect("so.pin");
    let shares = tempfile::tempdir().expect("tempdir");
    let store = hsm_service::server::open_store(&a.config, Default::default())
        .await
        .expect("store");
    let (paths, _) = hsm_service::ceremony::shares::backup_kek_offline(
        &a.config,
        store,
        &so_pin.trim().to_owned().into(),
        "backup-kek-1",
        2,
        3,
        shares.path(),
    )
    .await
    .expect("backup-kek");
    let share = |i: usize| paths[i].to_str().expect("utf-8").to_owned();
    let plans = concat!(env!("CARGO_MANIFEST_DIR"), "/../ceremonies/");
    let run = |env: &DevEnv, addr, who: &str, args: &[&str]| {
        let out = hsmctl(env, addr, who, args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        out
    };

    let server_a = a.start().await;
    let addr = server_a.local_addr();
    let backup_plan = format!("{plans}example-backup.toml");
    let out = run(
        &a,
        addr,
        "officer-1",
        &["ceremony", "propose", &backup_plan, "--json"],
    );
    let id = json(&out)["ceremony_id"].as_str().expect("id").to_owned();
    // A share for a ceremony without a restore step is refused.
    let out = hsmctl(
        &a,
        addr,
        "officer-1",
        &["ceremony", "approve", &id, "--share", &share(0), "--json"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(json(&out)["error"]["code"], "InvalidArgument");
    run(&a, addr, "officer-1", &["ceremony", "approve", &id]);
    run(&a, addr, "officer-2", &["ceremony", "approve", &id]);
    let out = run(
        &a,
        addr,
        "officer-3",
        &["ceremony", "execute", &id, "--json"],
    );
    let sha256 = json(&out)["transcript"]["steps"][3]["backup"]["sha256"]
        .as_str()
        .expect("sha256")
        .to_owned();
    let backup = a.dir.path().join("backups/assertion-backup.json");

    let b = DevEnv::new();
    let server_b = b.start().await;
    let addr = server_b.local_addr();
    std::fs::create_dir_all(b.dir.path().join("backups")).expect("mkdir");
    std::fs::copy(&backup, b.dir.path().join("backups/assertion-backup.json")).expect("copy");
    let restore_plan = b.dir.path().join("restore.toml");
    let text = std::fs::read_to_string(format!("{plans}example-restore.toml")).expect("plan");
    std::fs::write(&restore_plan, text.replace(&"0".repeat(64), &sha256)).expect("write");
    let restore_plan = restore_plan.to_str().expect("utf-8");
    let out = run(
        &b,
        addr,
        "officer-1",
        &["ceremony", "propose", restore_plan, "--json"],
    );
    let id = json(&out)["ceremony_id"].as_str().expect("id").to_owned();
    let out = run(
        &b,
        addr,
        "officer-1",
        &["ceremony", "approve", &id, "--share", &share(0)],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("KEK shares:  1 held"), "{text}");
    let share_line = std::fs::read_to_string(&paths[0]).expect("share");
    assert!(
        !text.contains(share_line.lines().nth(1).expect("line")),
        "{text}"
    );
    let out = hsmctl(
        &b,
        addr,
        "officer-2",
        &[
            "ceremony",
            "approve",
            &id,
            "--share",
            "/nonexistent/share",
            "--json",
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    let out = run(
        &b,
        addr,
        "officer-2",
        &["ceremony", "approve", &id, "--share", &share(1), "--json"],
    );
    assert_eq!(json(&out)["kek_shares_held"], 2);
    let out = run(
        &b,
        addr,
        "officer-3",
        &["ceremony", "execute", &id, "--json"],
    );
    assert_eq!(json(&out)["ceremony"]["state"], "succeeded");
    let out = run(&b, addr, "auditor", &["keys", "list", "--json"]);
    let keys = json(&out)["keys"].as_array().expect("keys").clone();
    let restored = keys
        .iter()
        .find(|k| k["name"] == "assertion" && k["version"] == 2)
        .expect("restored key");
    assert_eq!(restored["origin"], "restored");
    assert_eq!(restored["state"], "active");
    assert_eq!(restored["extractable"], false);
}
