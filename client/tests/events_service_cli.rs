//! `hsmctl events ...` against the real service: events caused by `hsmctl credential`,
//! preferences, roles, tenants, the relay, and OUT_OF_RANGE after compaction.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{hsmctl, json, stdout};
use hsm_service::otp::{self, Digits};
use hsm_service::testing::DevEnv;
use serde_json::Value;

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

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// Enrol HOTP credential `id` for `subject` as login-service.
fn enrol(env: &DevEnv, addr: SocketAddr, id: &str, subject: &str) {
    let seed = env.dir.path().join("seed.hex");
    std::fs::write(&seed, format!("{SEED_HEX}\n")).expect("seed");
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
            id,
            "--seed-file",
            &arg(&seed),
            "--subject",
            subject,
        ],
    );
    assert!(out.status.success(), "{out:?}");
}

fn verify(env: &DevEnv, addr: SocketAddr, id: &str, code: &str) -> bool {
    hsmctl(
        env,
        addr,
        "login-service",
        &["credential", "verify", id, code],
    )
    .status
    .success()
}

/// `events list --json` as `who`: (kind, subject, critical, notify) of each event.
fn list(env: &DevEnv, addr: SocketAddr, who: &str) -> Vec<Value> {
    let out = hsmctl(
        env,
        addr,
        who,
        &["events", "list", "--limit", "1000", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    json(&out)["events"].as_array().expect("events").clone()
}

async fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seqs_in(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_events_prefs_roles_and_the_relay() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();

    // Preferences: never set, then set; the notifier sets nothing.
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["events", "prefs", "get", "citizen-4711", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(
        (v["every_use"].as_bool(), v["updated_at"].as_u64()),
        (Some(false), Some(0))
    );

    enrol(&env, addr, "tok-1", "citizen-4711");
    assert!(verify(&env, addr, "tok-1", &hotp(0)));
    assert!(!verify(&env, addr, "tok-1", "000000"));
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "events",
            "prefs",
            "set",
            "citizen-4711",
            "--every-use",
            "true",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["every_use"], true);
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["events", "prefs", "get", "citizen-4711", "--json"],
    );
    let v = json(&out);
    assert_eq!(v["every_use"], true);
    assert!(v["updated_at"].as_u64().expect("updated_at") > 0, "{v}");
    assert!(verify(&env, addr, "tok-1", &hotp(1)));
    let out = hsmctl(
        &env,
        addr,
        "notifier",
        &[
            "events",
            "prefs",
            "set",
            "citizen-4711",
            "--every-use",
            "false",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("PermissionDenied"), "{out:?}");

    // What happened, as the tenant and as the notifier; the other tenant sees nothing.
    let events = list(&env, addr, "login-service");
    let summary: Vec<(String, bool, bool)> = events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().expect("kind").to_owned(),
                e["critical"].as_bool().expect("critical"),
                e["notify"].as_bool().expect("notify"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("credential.created".to_owned(), true, true),
            ("credential.used".to_owned(), false, false),
            ("credential.rejected".to_owned(), false, false),
            ("credential.used".to_owned(), false, true),
        ]
    );
    for e in &events {
        assert_eq!(e["subject"], "citizen-4711");
        assert_eq!(e["tenant"], "login-service");
        assert_eq!(e["object_id"], "tok-1");
    }
    assert_eq!(list(&env, addr, "notifier"), events);
    assert!(list(&env, addr, "login-service-b").is_empty());

    // The relay with the notifier certificate: a command that fails twice per event,
    // then succeeds, sees every event exactly once; its cursor resumes a second run.
    let dir = env.dir.path().join("relay");
    let attempts = dir.join("attempts");
    std::fs::create_dir_all(&attempts).expect("mkdir");
    let delivered = dir.join("delivered");
    let cursor = dir.join("cursor");
    let cmd = format!(
        "f={a}/$HSM_EVENT_SEQ; n=$(cat \"$f\" 2>/dev/null || echo 0); n=$((n+1)); echo $n > \"$f\"; \
         [ $n -gt 2 ] || exit 1; cat >> {d}",
        a = arg(&attempts),
        d = arg(&delivered),
    );
    let relay = |extra: &[&str]| {
        let mut args = vec![
            "events",
            "watch",
            "--exec",
            &cmd,
            "--retry-delay",
            "5ms",
            "--retry-max-delay",
            "20ms",
        ];
        let c = arg(&cursor);
        args.extend_from_slice(&["--cursor-file", &c]);
        args.extend_from_slice(extra);
        hsmctl(&env, addr, "notifier", &args)
    };
    let out = relay(&[]);
    assert!(out.status.success(), "{out:?}");
    let want: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs_in(&delivered), want);
    assert_eq!(
        std::fs::read_to_string(&cursor).expect("cursor"),
        format!("{}\n", want.last().expect("events"))
    );
    assert!(verify(&env, addr, "tok-1", &hotp(2)));
    let out = relay(&[]);
    assert!(out.status.success(), "{out:?}");
    let got = seqs_in(&delivered);
    assert_eq!(got.len(), want.len() + 1, "only the new event: {got:?}");
    let text = std::fs::read_to_string(&delivered).expect("delivered");
    let last: Value = serde_json::from_str(text.lines().last().expect("line")).expect("json");
    assert_eq!(
        (last["kind"].as_str(), last["notify"].as_bool()),
        (Some("credential.used"), Some(true))
    );

    // Following: new events arrive as they commit.
    let out_file = dir.join("follow.out");
    let mut child = common::command(&env, addr, "notifier")
        .args([
            "events",
            "watch",
            "--follow",
            "--json",
            "--kind",
            "credential.deleted",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).expect("out"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "delete", "tok-1"],
    );
    assert!(out.status.success(), "{out:?}");
    let start = Instant::now();
    while std::fs::read_to_string(&out_file)
        .unwrap_or_default()
        .lines()
        .count()
        < 1
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no credential.deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    let line = std::fs::read_to_string(&out_file).expect("out");
    let v: Value = serde_json::from_str(line.trim()).expect("json");
    assert_eq!(
        (v["kind"].as_str(), v["critical"].as_bool()),
        (Some("credential.deleted"), Some(true))
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_after_compaction() {
    let mut env = DevEnv::new();
    env.config.events.max_events = 2;
    env.config.events.compact_interval_seconds = 1;
    let server = env.start().await;
    let addr = server.local_addr();
    enrol(&env, addr, "tok-1", "citizen-1");
    for c in 0..4 {
        assert!(verify(&env, addr, "tok-1", &hotp(c)));
    }
    // Compaction runs in the background: wait until seq 1 is gone.
    let start = Instant::now();
    loop {
        let out = hsmctl(&env, addr, "notifier", &["events", "list", "--from", "1"]);
        if out.status.code() == Some(3) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never compacted: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cursor = env.dir.path().join("cursor");
    std::fs::write(&cursor, "0\n").expect("cursor");
    let c = arg(&cursor);
    let out = hsmctl(
        &env,
        addr,
        "notifier",
        &["events", "watch", "--cursor-file", &c],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stderr(&out).contains("oldest"), "{out:?}");
    assert!(stdout(&out).is_empty(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&cursor).expect("cursor"), "0\n");
    let out = hsmctl(
        &env,
        addr,
        "notifier",
        &[
            "events",
            "watch",
            "--cursor-file",
            &c,
            "--resume-from-oldest",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let got: Vec<u64> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert!(!got.is_empty() && got.len() <= 2, "{got:?}");
    assert_eq!(*got.last().expect("seq"), 5, "{got:?}");
    assert_eq!(std::fs::read_to_string(&cursor).expect("cursor"), "5\n");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_resumes_from_its_cursor_against_the_service() {
    let mut env = DevEnv::new();
    env.config.events.heartbeat_seconds = 1;
    let server = env.start().await;
    let addr = server.local_addr();
    enrol(&env, addr, "tok-1", "citizen-1");
    for c in 0..7 {
        assert!(verify(&env, addr, "tok-1", &hotp(c)));
    }
    // seq 1 credential.created, 2..=8 credential.used
    let dir = env.dir.path().join("relay");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let delivered = dir.join("delivered");
    let cursor = dir.join("cursor");
    let cmd = format!("cat >> {}; sleep 0.1", arg(&delivered));
    let c = arg(&cursor);
    let args = [
        "events",
        "watch",
        "--follow",
        "--cursor-file",
        &c,
        "--exec",
        &cmd,
        "--idle-timeout",
        "5s",
    ];
    let spawn = || {
        common::command(&env, addr, "notifier")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let mut child = spawn();
    wait_for("three events", || seqs_in(&delivered).len() >= 3).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let at_kill: u64 = std::fs::read_to_string(&cursor)
        .expect("cursor")
        .trim()
        .parse()
        .expect("a seq");
    let mut child = spawn();
    // Committed while the second relay follows.
    assert!(verify(&env, addr, "tok-1", &hotp(7)));
    wait_for("every event", || {
        std::fs::read_to_string(&cursor).unwrap_or_default() == "9\n"
    })
    .await;
    child.kill().expect("kill");
    child.wait().expect("wait");
    let got = seqs_in(&delivered);
    let mut dedup = got.clone();
    dedup.dedup();
    assert_eq!(dedup, (1..=9).collect::<Vec<_>>(), "{got:?}");
    assert!(got.len() <= 10, "{got:?}");
    if got.len() == 10 {
        assert_eq!(got[at_kill as usize], at_kill + 1, "{got:?}");
    }
    server.shutdown().await.expect("shutdown");
}
