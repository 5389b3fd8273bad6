//! `hsmctl events ...` and the reference relay (`watch --cursor-file --exec`).
//!
//! The relay's failure handling (a broken stream, an event sent twice, compaction, a
//! failing command, a killed relay) runs against `fake_events`, an in-memory
//! EventService behind the dev PKI, where each failure can be produced on demand.

mod common;
mod fake_events;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{hsmctl, stdout};
use fake_events::Fake;
use hsm_service::testing::DevEnv;
use serde_json::Value;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// The seqs in a file of JSON lines.
fn seqs(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            v["seq"].as_u64().expect("seq")
        })
        .collect()
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A shell command for `--exec` that fails its first `fail` runs for each event, then
/// appends the event's JSON (its stdin) to `delivered`.
fn flaky_command(dir: &Path, delivered: &Path, fail: u32) -> String {
    let attempts = dir.join("attempts");
    std::fs::create_dir_all(&attempts).expect("mkdir");
    format!(
        "f={a}/$HSM_EVENT_SEQ; n=$(cat \"$f\" 2>/dev/null || echo 0); n=$((n+1)); echo $n > \"$f\"; \
         [ $n -gt {fail} ] || exit 1; cat >> {d}",
        a = arg(&attempts),
        d = arg(delivered),
    )
}

fn attempts(dir: &Path, seq: u64) -> u32 {
    std::fs::read_to_string(dir.join("attempts").join(seq.to_string()))
        .expect("attempts")
        .trim()
        .parse()
        .expect("number")
}

/// Connection flags for the fake: any dev certificate will do.
const WHO: &str = "login-service";

/// `hsmctl events watch ARGS` in the background, stderr into `log`.
fn relay(env: &DevEnv, fake: &Fake, args: &[&str], log: &Path) -> Child {
    let mut c = common::command(env, fake.addr, WHO);
    c.args(["events", "watch"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    c.spawn().expect("spawn hsmctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_with_a_command_that_fails_twice_delivers_every_event_exactly_once() {
    let env = DevEnv::new();
    let fake = Fake::start(&env).await;
    for i in 0..5 {
        fake.append("credential.used", &format!("citizen-{i}"));
    }
    // The stream breaks after every 2 events and each new stream resends one event.
    fake.break_after(Some(2));
    fake.resend_previous(true);
    let dir = env.dir.path().join("relay");
    let delivered = dir.join("delivered");
    let cursor = dir.join("cursor");
    let cmd = flaky_command(&dir, &delivered, 2);
    let log = dir.join("relay.log");
    let mut child = relay(
        &env,
        &fake,
        &[
            "--follow",
            "--cursor-file",
            &arg(&cursor),
            "--exec",
            &cmd,
            "--retry-delay",
            "5ms",
            "--retry-max-delay",
            "20ms",
        ],
        &log,
    );
    wait_for("the first events", Duration::from_secs(30), || {
        seqs(&delivered).len() >= 5
    })
    .await;
    // Events committed while the relay follows.
    for i in 5..8 {
        fake.append("credential.created", &format!("citizen-{i}"));
    }
    wait_for("every event", Duration::from_secs(30), || {
        seqs(&delivered).len() >= 8
    })
    .await;
    // Give a wrong relay the time to deliver something twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert_eq!(seqs(&delivered), (1..=8).collect::<Vec<_>>());
    for seq in 1..=8 {
        assert_eq!(
            attempts(&dir, seq),
            3,
            "event {seq}: two failures, one success"
        );
    }
    assert_eq!(std::fs::read_to_string(&cursor).expect("cursor"), "8\n");
    let log = std::fs::read_to_string(&log).expect("log");
    assert!(
        log.contains("--exec for event 1 (credential.used) failed (attempt 2"),
        "{log}"
    );
    assert!(log.contains("stream broken (Unavailable"), "{log}");
    // Every reconnection resumed after the last delivered event.
    let froms = fake.watch_froms();
    assert_eq!(froms[0], 0, "no cursor file and no --from: the oldest");
    assert!(froms.windows(2).all(|w| w[0] <= w[1]), "{froms:?}");
    assert!(froms.len() >= 4, "{froms:?}");
    // The delivered JSON carries every field.
    let text = std::fs::read_to_string(&delivered).expect("delivered");
    let first: Value = serde_json::from_str(text.lines().next().expect("line")).expect("json");
    for field in [
        "seq",
        "time_ms",
        "kind",
        "tenant",
        "subject",
        "object_id",
        "critical",
        "notify",
        "details_json",
    ] {
        assert!(first.get(field).is_some(), "{field} missing: {first}");
    }
    assert_eq!(first["details"]["n"], 1);
    assert_eq!(first["subject"], "citizen-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_resumes_from_its_cursor_file() {
    let env = DevEnv::new();
    let fake = Fake::start(&env).await;
    for i in 0..10 {
        fake.append("credential.used", &format!("citizen-{i}"));
    }
    let dir = env.dir.path().join("relay");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let delivered = dir.join("delivered");
    let cursor = dir.join("cursor");
    // Slow enough that the kill lands mid-stream.
    let env_file = dir.join("env");
    let cmd = format!(
        "cat >> {}; echo \"$HSM_EVENT_SEQ $HSM_EVENT_KIND $HSM_EVENT_SUBJECT $HSM_EVENT_NOTIFY\" >> {}; sleep 0.1",
        arg(&delivered),
        arg(&env_file)
    );
    let args = [
        "--follow",
        "--cursor-file",
        &arg(&cursor),
        "--exec",
        &cmd,
        "--retry-delay",
        "5ms",
    ];
    let mut child = relay(&env, &fake, &args, &dir.join("1.log"));
    wait_for("three events", Duration::from_secs(30), || {
        seqs(&delivered).len() >= 3
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let at_kill: u64 = std::fs::read_to_string(&cursor)
        .expect("cursor")
        .trim()
        .parse()
        .expect("a seq, never a torn file");
    let before = seqs(&delivered);
    assert!((2..10).contains(&at_kill), "{at_kill} {before:?}");
    let mut child = relay(&env, &fake, &args, &dir.join("2.log"));
    wait_for("the rest", Duration::from_secs(30), || {
        std::fs::read_to_string(&cursor).unwrap_or_default() == "10\n"
    })
    .await;
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert_eq!(*fake.watch_froms().last().expect("watch"), at_kill + 1);
    // Nothing missing, in order; at most the one event handled but not yet recorded
    // when the relay died is handed over twice.
    let got = seqs(&delivered);
    let mut dedup = got.clone();
    dedup.dedup();
    assert_eq!(dedup, (1..=10).collect::<Vec<_>>(), "{got:?}");
    assert!(got.len() <= 11, "{got:?}");
    if got.len() == 11 {
        assert_eq!(got[at_kill as usize], at_kill + 1, "{got:?}");
    }
    assert_eq!(std::fs::read_to_string(&cursor).expect("cursor"), "10\n");
    let env_lines = std::fs::read_to_string(&env_file).expect("env");
    assert_eq!(
        env_lines.lines().next(),
        Some("1 credential.used citizen-0 false")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reconnects_when_the_service_goes_away_and_comes_back() {
    let env = DevEnv::new();
    let fake = Fake::start(&env).await;
    for i in 0..3 {
        fake.append("credential.used", &format!("citizen-{i}"));
    }
    let dir = env.dir.path().join("relay");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let delivered = dir.join("delivered");
    let cursor = dir.join("cursor");
    let cmd = format!("cat >> {}", arg(&delivered));
    let log = dir.join("relay.log");
    let mut child = relay(
        &env,
        &fake,
        &[
            "--follow",
            "--cursor-file",
            &arg(&cursor),
            "--exec",
            &cmd,
            "--retry-delay",
            "20ms",
            "--retry-max-delay",
            "100ms",
            "--verbose",
        ],
        &log,
    );
    wait_for("the first events", Duration::from_secs(30), || {
        seqs(&delivered).len() == 3
    })
    .await;
    fake.stop().await;
    // Committed while the relay cannot connect.
    for i in 3..6 {
        fake.append("credential.used", &format!("citizen-{i}"));
    }
    wait_for("failed reconnections", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("reconnecting from seq 4")
            .count()
            >= 2
    })
    .await;
    fake.resume().await;
    wait_for("the rest", Duration::from_secs(30), || {
        std::fs::read_to_string(&cursor).unwrap_or_default() == "6\n"
    })
    .await;
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert_eq!(seqs(&delivered), (1..=6).collect::<Vec<_>>());
    assert_eq!(*fake.watch_froms().last().expect("watch"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_start_is_out_of_range_unless_resuming_from_the_oldest() {
    let env = DevEnv::new();
    let fake = Fake::start(&env).await;
    for _ in 0..10 {
        fake.append("credential.used", "citizen-1");
    }
    fake.compact_before(6);
    let dir = env.dir.path();
    let watch = |extra: &[&str]| {
        let mut args = vec!["events", "watch"];
        args.extend_from_slice(extra);
        hsmctl(&env, fake.addr, WHO, &args)
    };
    let out = watch(&["--from", "2"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stderr(&out).contains("the oldest retained seq is 6"),
        "{out:?}"
    );
    assert!(stderr(&out).contains("--resume-from-oldest"), "{out:?}");
    assert!(stdout(&out).is_empty());
    let out = watch(&["--from", "2", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v = common::json(&out);
    assert_eq!(v["error"]["code"], "OutOfRange");

    // A cursor behind the oldest retained event: refused, the cursor left as it was.
    let cursor = dir.join("cursor");
    std::fs::write(&cursor, "3\n").expect("cursor");
    let out = watch(&["--cursor-file", &arg(&cursor)]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(std::fs::read_to_string(&cursor).expect("cursor"), "3\n");
    assert_eq!(*fake.watch_froms().last().expect("watch"), 4);

    // Explicitly resuming from the oldest retained: 6..10, with a warning.
    let out = watch(&[
        "--cursor-file",
        &arg(&cursor),
        "--resume-from-oldest",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let got: Vec<u64> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(got, vec![6, 7, 8, 9, 10]);
    assert!(
        stderr(&out).contains("warning: events from seq 4 on were compacted away"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&cursor).expect("cursor"), "10\n");

    let out = hsmctl(&env, fake.addr, WHO, &["events", "list", "--from", "1"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_lines_or_json_filters_and_hides_heartbeats() {
    let env = DevEnv::new();
    let fake = Fake::start(&env).await;
    fake.append("credential.created", "citizen-1");
    fake.append("credential.used", "citizen-1");
    fake.append("credential.used", "citizen-2");
    let out = hsmctl(&env, fake.addr, WHO, &["events", "watch"]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        lines[0],
        "1 2027-01-01T00:00:00.001Z credential.created tenant=login-service subject=citizen-1 \
         object=cred-1 critical notify {\"n\":1}"
    );
    assert!(
        lines[1].starts_with("2 2027-01-01T00:00:00.002Z credential.used "),
        "{lines:?}"
    );
    let out = hsmctl(
        &env,
        fake.addr,
        WHO,
        &[
            "events",
            "watch",
            "--from",
            "2",
            "--kind",
            "credential.used",
            "--kind",
            "credential.locked",
            "--subject",
            "citizen-2",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let req = fake.watch_requests().pop().expect("request");
    assert_eq!(req.from_seq, 2);
    assert!(!req.follow);
    assert_eq!(req.kinds, ["credential.used", "credential.locked"]);
    assert_eq!(req.subject, "citizen-2");
    let v: Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON line");
    assert_eq!(
        (v["seq"].as_u64(), v["subject"].as_str()),
        (Some(3), Some("citizen-2"))
    );

    // Following: heartbeats are not printed, only reported with --verbose.
    let dir = env.dir.path();
    let out_file = dir.join("watch.out");
    let log = dir.join("watch.log");
    let mut child = common::command(&env, fake.addr, WHO)
        .args(["events", "watch", "--follow", "--verbose", "--from", "3"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).expect("out"))
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    wait_for("a heartbeat", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("heartbeat, head seq 3")
    })
    .await;
    fake.append("credential.deleted", "citizen-2");
    wait_for("the new event", Duration::from_secs(30), || {
        std::fs::read_to_string(&out_file)
            .unwrap_or_default()
            .lines()
            .count()
            == 2
    })
    .await;
    child.kill().expect("kill");
    child.wait().expect("wait");
    let printed = std::fs::read_to_string(&out_file).expect("out");
    assert!(!printed.contains("heartbeat"), "{printed}");
    assert!(
        printed
            .lines()
            .nth(1)
            .expect("line")
            .contains("credential.deleted"),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_prefs() {
    let env = DevEnv::new();
    let fake = Fake::start(&env).await;
    for i in 0..5 {
        fake.append("credential.used", &format!("citizen-{i}"));
    }
    let out = hsmctl(
        &env,
        fake.addr,
        WHO,
        &["events", "list", "--from", "2", "--limit", "2", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let v = common::json(&out);
    let seqs: Vec<u64> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(
        (v["next_seq"].as_u64(), v["head_seq"].as_u64()),
        (Some(4), Some(5))
    );
    let out = hsmctl(&env, fake.addr, WHO, &["events", "list", "--from", "4"]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.ends_with("next: --from 6 (head seq 5)\n"), "{text}");

    let out = hsmctl(
        &env,
        fake.addr,
        WHO,
        &["events", "prefs", "get", "citizen-1", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let v = common::json(&out);
    assert_eq!(
        (v["every_use"].as_bool(), v["updated_at"].as_u64()),
        (Some(false), Some(0))
    );
    let out = hsmctl(
        &env,
        fake.addr,
        WHO,
        &["events", "prefs", "set", "citizen-1", "--every-use", "true"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "citizen-1\tevery_use=true\tupdated_at=2027-01-01T00:00:00.000Z\n"
    );
    let out = hsmctl(
        &env,
        fake.addr,
        WHO,
        &["events", "prefs", "get", "citizen-1", "--json"],
    );
    assert_eq!(common::json(&out)["every_use"], true);
    let out = hsmctl(
        &env,
        fake.addr,
        WHO,
        &["events", "prefs", "set", "", "--every-use", "false"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("InvalidArgument"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_locked_cursor_file_is_an_error_never_a_restart_from_zero() {
    let env = DevEnv::new();
    let fake = Fake::start(&env).await;
    fake.append("credential.used", "citizen-1");
    let cursor = env.dir.path().join("cursor");
    std::fs::write(&cursor, "12abc\n").expect("write");
    let out = hsmctl(
        &env,
        fake.addr,
        WHO,
        &["events", "watch", "--cursor-file", &arg(&cursor)],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("is corrupt"), "{out:?}");
    assert!(stdout(&out).is_empty(), "{out:?}");
    assert!(fake.watch_froms().is_empty(), "no watch was started");
    assert_eq!(std::fs::read_to_string(&cursor).expect("cursor"), "12abc\n");
    // Refused before connecting: the same answer with no service at all.
    let out = Command::new(env!("CARGO_BIN_EXE_hsmctl"))
        .args([
            "--endpoint",
            "https://127.0.0.1:1",
            "events",
            "watch",
            "--cursor-file",
        ])
        .arg(&cursor)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("is corrupt"), "{out:?}");

    // Two relays on one cursor file.
    std::fs::write(&cursor, "0\n").expect("write");
    let log = env.dir.path().join("1.log");
    let mut first = relay(
        &env,
        &fake,
        &["--follow", "--cursor-file", &arg(&cursor)],
        &log,
    );
    wait_for("the first relay", Duration::from_secs(30), || {
        std::fs::read_to_string(&cursor).unwrap_or_default() == "1\n"
    })
    .await;
    let out = hsmctl(
        &env,
        fake.addr,
        WHO,
        &["events", "watch", "--cursor-file", &arg(&cursor)],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("in use by another relay"), "{out:?}");
    first.kill().expect("kill");
    first.wait().expect("wait");
}

#[test]
fn malformed_flags_are_usage_errors() {
    let bad: &[&[&str]] = &[
        &["events", "watch", "--from", "abc"],
        &["events", "watch", "--from", "-1"],
        &["events", "watch", "--retry-max-delay", "5h"],
        &["events", "watch", "--retry-delay", "1.5s"],
        &["events", "watch", "--cursor-file"],
        &["events", "watch", "--bogus"],
        &["events", "list", "--limit", "0"],
        &["events", "list", "--limit", "1001"],
        &["events", "prefs", "set", "citizen-1"],
        &[
            "events",
            "prefs",
            "set",
            "citizen-1",
            "--every-use",
            "maybe",
        ],
        &["events", "prefs", "get"],
        &["events", "frobnicate"],
    ];
    for args in bad {
        let out = Command::new(env!("CARGO_BIN_EXE_hsmctl"))
            .args(*args)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(stderr(&out).contains("error:"), "{args:?}: {out:?}");
        assert!(stdout(&out).is_empty(), "{args:?}: {out:?}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hsmctl"))
        .args(["events", "watch", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = stdout(&out);
    for flag in [
        "--cursor-file",
        "--exec",
        "--retry-max-delay",
        "--resume-from-oldest",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
}
