//! Several instances: two real `hsm-service dev` processes over one data directory (one
//! token, one PKI) and one PostgreSQL database are one service. Exactly-once verification
//! across them, an acknowledged ACCEPTED surviving the loss of its instance, a ceremony
//! executed once, keys made on one used by the other without a restart, and a database
//! outage ridden out by both. Needs `HSM_TEST_POSTGRES_URL` (scripts/postgres.sh); skips
//! with a printed line without it, and fails under CI=true. The embedded store serves one
//! instance: a second process on it is refused (no database needed).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use hsm_client::proto::{VerifyCodeRequest, VerifyResult};
use hsm_client::HsmClient;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const PLAN: &str = include_str!("../../ceremonies/example-root-and-assertion.toml");

async fn verify(c: &HsmClient, id: &str, counter: u64) -> Result<i32, tonic::Status> {
    c.credentials()
        .verify_code(VerifyCodeRequest {
            credential_id: id.into(),
            code: common::hotp(common::EVIDENCE_SEED, counter),
        })
        .await
        .map(|r| r.into_inner().result)
}

async fn wait_health(c: &HsmClient, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.health().await.ok() != Some(want) {
        assert!(Instant::now() < deadline, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_code_sent_32_times_to_two_instances_is_accepted_once() {
    let Some(cl) = Cluster::start().await else {
        return;
    };
    let data = cl.data_dir();
    let a = cl.a.client(&data, "login-service").await;
    let b = cl.b.client(&data, "login-service").await;
    // Created on a, verified on both: the record is in the shared database.
    common::enrol(&a, "shared-1", "citizen-1").await;
    let calls = (0..32).map(|i| {
        let c = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { verify(&c, "shared-1", 0).await })
    });
    let mut accepted = 0;
    for call in calls {
        let result = call.await.expect("task").expect("every call is answered");
        if result == VerifyResult::Accepted as i32 {
            accepted += 1;
        } else {
            assert_eq!(result, VerifyResult::Replayed as i32);
        }
    }
    assert_eq!(accepted, 1, "exactly one ACCEPTED across both instances");
    // Each instance wrote its own audit chain.
    let chains = cl
        .db
        .query_text("SELECT string_agg(DISTINCT chain, ',' ORDER BY chain) FROM audit_log");
    assert_eq!(chains.as_deref(), Some("a,b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_killed_instance_acknowledged_is_replayed_on_the_other() {
    let Some(mut cl) = Cluster::start().await else {
        return;
    };
    let data = cl.data_dir();
    let a = cl.a.client(&data, "login-service").await;
    let b = cl.b.client(&data, "login-service").await;
    // One code per credential, so that every acknowledged code is the last accepted of
    // its credential (an HOTP replay is recognised for the last accepted counter).
    const N: usize = 160;
    let ids: Vec<String> = (0..N).map(|i| format!("load-{i}")).collect();
    for chunk in ids.chunks(16) {
        let made = chunk.iter().map(|id| {
            let (a, id) = (a.clone(), id.clone());
            tokio::spawn(async move { common::enrol(&a, &id, "").await })
        });
        for m in made {
            m.await.expect("enrol");
        }
    }
    // Load on a, 8 in flight; a is SIGKILLed once a quarter has been acknowledged.
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (a, ids, next, acked) =
                (a.clone(), ids.clone(), next.clone(), acknowledged.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(id) = ids.get(i) else { return };
                    match verify(&a, id, 0).await {
                        Ok(r) if r == VerifyResult::Accepted as i32 => {
                            acked.lock().unwrap().insert(id.clone());
                        }
                        Ok(other) => panic!("{id}: {other}"),
                        Err(_) => return, // the instance is gone
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() < N / 4 {
        assert!(Instant::now() < deadline, "no load");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cl.a.kill();
    for w in workers {
        w.await.expect("worker");
    }
    let acked = acknowledged.lock().unwrap().clone();
    assert!(acked.len() < N, "a was killed under load, not after it");
    // Every ACCEPTED a acknowledged is durable: b answers REPLAYED for each.
    for id in &acked {
        let r = verify(&b, id, 0).await.expect("b answers");
        assert_eq!(
            r,
            VerifyResult::Replayed as i32,
            "{id} was acknowledged by a"
        );
    }
    // And b keeps serving: the next code of an acknowledged credential, and the first of
    // one a never got to.
    let first = acked.iter().next().expect("one");
    assert_eq!(
        verify(&b, first, 1).await.unwrap(),
        VerifyResult::Accepted as i32
    );
    let untouched = &ids[N - 1];
    let r = verify(&b, untouched, 0).await.expect("b answers");
    assert!(
        r == VerifyResult::Accepted as i32 || r == VerifyResult::Replayed as i32,
        "{r}"
    );
    assert_eq!(b.health().await.expect("health"), ServingStatus::Serving);
}

/// The kid `c` signs the default assertion with.
async fn assertion_kid(c: &HsmClient) -> String {
    common::sign_default_assertion(c).await.kid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ceremony_runs_once_across_instances_and_its_keys_are_used_by_both() {
    let Some(cl) = Cluster::start().await else {
        return;
    };
    let data = cl.data_dir();
    let officer = |i: usize, n: u8| {
        let inst = if i == 0 { &cl.a } else { &cl.b };
        inst.client(
            &data,
            match n {
                1 => "officer-1",
                2 => "officer-2",
                _ => "officer-3",
            },
        )
    };
    let (o1a, o2b, o3a, o3b) = (
        officer(0, 1).await,
        officer(1, 2).await,
        officer(0, 3).await,
        officer(1, 3).await,
    );
    let login_a = cl.a.client(&data, "login-service").await;
    let login_b = cl.b.client(&data, "login-service").await;
    let old_kid = assertion_kid(&login_b).await;
    assert_eq!(assertion_kid(&login_a).await, old_kid, "one bootstrap key");

    // Proposed and approved on a, approved on b: the quorum is in the database.
    let id = common::propose(&o1a, PLAN).await.expect("propose on a");
    common::approve_with_share(&o1a, &id, "")
        .await
        .expect("approve on a");
    let info = common::approve_with_share(&o2b, &id, "")
        .await
        .expect("approve on b");
    assert_eq!(info.valid_approvals, 2);
    // Executed on both at once: it runs once, the other attempt is refused.
    let (x, y) = tokio::join!(common::execute(&o3a, &id), common::execute(&o3b, &id));
    let (ran, refused, runner) = match (x, y) {
        (Ok(r), Err(e)) => (r, e, &login_a),
        (Err(e), Ok(r)) => (r, e, &login_b),
        (x, y) => panic!("exactly one execution expected: {x:?} / {y:?}"),
    };
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let transcript: serde_json::Value =
        serde_json::from_str(&ran.transcript_json).expect("transcript");
    assert_eq!(transcript["outcome"], "succeeded", "{transcript}");

    // The new assertion key: the executing instance signs with it at once, the other
    // one without a restart (within its refresh period).
    let new_kid = assertion_kid(runner).await;
    assert_ne!(new_kid, old_kid);
    let other = if std::ptr::eq(runner, &login_a) {
        &login_b
    } else {
        &login_a
    };
    let start = Instant::now();
    while assertion_kid(other).await != new_kid {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the other instance kept the old key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let set = common::jwks(other).await;
    assert!(set.find(&new_kid).is_some() && set.find(&old_kid).is_some());
    let signed = common::sign_default_assertion(other).await;
    common::verify(&signed.jws, &set).expect("verifies with the other instance's JWKS");
    // The run is recorded once, by the instance that ran it.
    let claims = cl.db.query_text(
        "SELECT count(*) FROM audit_log WHERE convert_from(line, 'UTF8') LIKE '%ceremony.execute%started%'",
    );
    assert_eq!(claims.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_instances_ride_out_a_database_outage() {
    // Short timeouts, so the test waits on the outage rather than on the defaults (5 s
    // for a call to give up on the database, 5 s between two health looks): each step
    // below still has to happen, only sooner.
    let Some(cl) = Cluster::start_tuned(|config| {
        for (section, key, value) in [
            ("server", "health_interval_ms", 200),
            ("store", "connect_timeout_ms", 500),
        ] {
            config
                .get_mut(section)
                .and_then(toml::Value::as_table_mut)
                .unwrap_or_else(|| panic!("[{section}] in config.toml"))
                .insert(key.into(), value.into());
        }
    })
    .await
    else {
        return;
    };
    let started = Instant::now();
    let data = cl.data_dir();
    let a = cl.a.client(&data, "login-service").await;
    let b = cl.b.client(&data, "login-service").await;
    common::enrol(&a, "outage-1", "").await;
    cl.db.allow_connections(false);
    cl.db.kill_sessions();
    tokio::join!(
        wait_health(&a, ServingStatus::NotServing),
        wait_health(&b, ServingStatus::NotServing)
    );
    let (x, y) = tokio::join!(verify(&a, "outage-1", 0), verify(&b, "outage-1", 0));
    for r in [x, y] {
        let err = r.expect_err("no answer without the database");
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    }
    cl.db.allow_connections(true);
    tokio::join!(
        wait_health(&a, ServingStatus::Serving),
        wait_health(&b, ServingStatus::Serving)
    );
    // Nothing was accepted during the outage: the code is fresh, accepted once.
    assert_eq!(
        verify(&b, "outage-1", 0).await.unwrap(),
        VerifyResult::Accepted as i32
    );
    assert_eq!(
        verify(&a, "outage-1", 0).await.unwrap(),
        VerifyResult::Replayed as i32
    );
    eprintln!("outage ridden out in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_an_embedded_store_is_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut first, _) = common::spawn_dev(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsm-service"))
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "off")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("in use by another hsm-service process")
            && lines[0].contains("--postgres"),
        "{err}"
    );
    // --instance means nothing for the embedded store: refused too.
    common::terminate(&mut first);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsm-service"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--instance",
            "x",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("SOFTHSM2_CONF")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--instance"));
}
