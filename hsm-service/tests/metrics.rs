//! The metrics endpoint (issue 15 §1): a dev service's `GET /metrics` before and after a
//! short load (create a credential, verify codes, sign an assertion, watch events, a
//! checkpoint, app approvals, a device hiccup), every family the issue names present and moving; no
//! label carrying a credential id, subject or code; `[metrics]` config validation;
//! `hsm-service dev --metrics-listen`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hsm_client::proto as pb;
use hsm_service::config::Config;
use hsm_service::testing::DevEnv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` over plain HTTP/1.1: (status line, headers and body).
async fn http_get(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("answer within 10 s")
        .expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("headers end");
    (head.to_owned(), body.to_owned())
}

/// The scrape as `series -> value` (`name{labels}` as printed).
async fn scrape(addr: SocketAddr) -> (String, BTreeMap<String, f64>) {
    let (head, body) = http_get(addr, "GET", "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let mut series = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("series and value");
        series.insert(name.to_owned(), value.parse().expect("a number"));
    }
    (body, series)
}

/// The value of the series `name` whose labels include every `k="v"` of `labels` (summed
/// over the others).
fn value(series: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    series
        .iter()
        .filter(|(s, _)| {
            let (n, l) = s.split_once('{').unwrap_or((s.as_str(), ""));
            n == name && labels.iter().all(|want| l.contains(want))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_family_is_exposed_and_moves_under_load() {
    let mut env = DevEnv::new();
    // A checkpoint every few records, so the load makes some.
    env.config.audit.checkpoint_interval = 4;
    let server = env.start().await;
    let metrics = server.metrics_addr().expect("dev mode serves metrics");
    let dir = env.dir.path();
    let login = common::client(dir, "login-service", server.local_addr()).await;
    let officer = common::client(dir, "officer-1", server.local_addr()).await;
    let notifier = common::client(dir, "notifier", server.local_addr()).await;

    let (_, before) = scrape(metrics).await;

    // The load: a credential, codes right, wrong and replayed, an assertion (its own
    // credential and evidence), a watch that sees events, a checkpoint, a refused call.
    let id = "metrics-cred-0001";
    let subject = "metrics-subject-0001";
    common::enrol(&login, id, subject).await;
    let accepted = common::verify_hotp(&login, id, 0).await;
    assert_eq!(accepted.result, pb::VerifyResult::Accepted as i32);
    // More codes than the pool has sessions: some session sees the seed again (a hit).
    for counter in 1..=8 {
        let r = common::verify_hotp(&login, id, counter).await;
        assert_eq!(r.result, pb::VerifyResult::Accepted as i32);
    }
    let replayed = common::verify_hotp(&login, id, 8).await;
    assert_eq!(replayed.result, pb::VerifyResult::Replayed as i32);
    let wrong = login
        .credentials()
        .verify_code(pb::VerifyCodeRequest {
            credential_id: id.into(),
            code: "000000".into(),
        })
        .await
        .expect("verify")
        .into_inner();
    // (000000 could be right at some counter: then it is ACCEPTED; either is a verdict.)
    assert_ne!(wrong.result, pb::VerifyResult::Unspecified as i32);
    let signed = common::sign_default_assertion(&login).await;
    assert!(!signed.jws.is_empty());
    // An app approval: a challenge made (pending), one superseded by the next
    // (cancelled), that one approved, and one denied.
    let phone = common::app::activate(&login, subject).await;
    let login_purpose = pb::ChallengePurpose::Login;
    common::app::challenge(&login, subject, login_purpose, "Log in to Test Bank", 0)
        .await
        .expect("challenge");
    let ch = common::app::challenge(&login, subject, login_purpose, "Log in to Test Bank", 0)
        .await
        .expect("challenge");
    let approved = common::app::answer(
        &login,
        &phone,
        &ch,
        pb::ChallengeDecision::Approve,
        &ch.binding_code,
    )
    .await
    .expect("approve");
    assert_eq!(approved.state, pb::ChallengeState::Approved as i32);
    let ch = common::app::challenge(&login, subject, login_purpose, "Log in again", 0)
        .await
        .expect("challenge");
    let denied = common::app::answer(&login, &phone, &ch, pb::ChallengeDecision::Deny, "")
        .await
        .expect("deny");
    assert_eq!(denied.state, pb::ChallengeState::Denied as i32);
    let mut watch = notifier
        .events()
        .watch_events(pb::WatchEventsRequest {
            from_seq: 0,
            follow: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let batch = tokio::time::timeout(Duration::from_secs(20), watch.message())
        .await
        .expect("a batch within 20 s")
        .expect("stream ok")
        .expect("a batch");
    assert!(!batch.events.is_empty(), "the load made events");
    let (_, during) = scrape(metrics).await;
    assert!(
        value(&during, "hsm_event_watches_open", &[]) >= 1.0,
        "the watch is open"
    );
    drop(watch);
    login
        .admin()
        .get_status(pb::GetStatusRequest {})
        .await
        .expect_err("a login service may not call GetStatus");
    officer
        .audit()
        .checkpoint_audit(pb::CheckpointAuditRequest::default())
        .await
        .expect("checkpoint");
    let status = officer
        .admin()
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    // A device hiccup, last: the token logs the service out (as after a reset). The next
    // operation fails (a non-idempotent one is not retried: UNAVAILABLE) and its worker
    // replaces its session. (Recovering the cached handles after such a reset is issue
    // 15 §2's: this test only needs the failure counted.)
    token_logout(&env);
    let hiccup = login
        .credentials()
        .create_credential(pb::CreateCredentialRequest {
            credential_id: "metrics-cred-0002".into(),
            kind: pb::OtpKind::Hotp as i32,
            seed: common::EVIDENCE_SEED.to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("the token logged the service out");
    assert_eq!(hiccup.code(), tonic::Code::Unavailable, "{hiccup:?}");

    let (text, after) = scrape(metrics).await;
    let moved = |name: &str, labels: &[&str]| {
        let (b, a) = (value(&before, name, labels), value(&after, name, labels));
        assert!(a > b, "{name}{labels:?} did not move ({b} -> {a}):\n{text}");
    };
    let verify = [
        "method=\"hsm.v1.CredentialService/VerifyCode\"",
        "status=\"OK\"",
    ];
    moved("hsm_rpc_requests_total", &verify);
    moved("hsm_rpc_duration_seconds_count", &verify);
    moved("hsm_rpc_duration_seconds_bucket", &verify);
    moved(
        "hsm_rpc_requests_total",
        &[
            "method=\"hsm.v1.AdminService/GetStatus\"",
            "status=\"PERMISSION_DENIED\"",
        ],
    );
    moved(
        "hsm_rpc_requests_total",
        &[
            "method=\"hsm.v1.SigningService/SignAssertion\"",
            "status=\"OK\"",
        ],
    );
    moved("hsm_verify_results_total", &["result=\"accepted\""]);
    moved("hsm_verify_results_total", &["result=\"replayed\""]);
    moved("hsm_pool_queue_wait_seconds_count", &[]);
    moved("hsm_pool_job_duration_seconds_count", &[]);
    moved(
        "hsm_pkcs11_errors_total",
        &["rv=\"CKR_USER_NOT_LOGGED_IN\""],
    );
    moved("hsm_pool_sessions_replaced_total", &[]);
    moved("hsm_seed_cache_misses_total", &[]);
    moved("hsm_seed_cache_hits_total", &[]);
    moved("hsm_store_batch_size_count", &[]);
    moved("hsm_store_commit_duration_seconds_count", &[]);
    moved("hsm_audit_records_total", &[]);
    moved("hsm_audit_checkpoints_total", &[]);
    moved("hsm_event_lag_seconds_count", &[]);
    moved("hsm_events_delivered_total", &[]);
    for state in ["pending", "cancelled", "approved", "denied"] {
        moved("hsm_challenges_total", &[&format!("state=\"{state}\"")]);
    }
    // Gauges and counters that a healthy short load need not move: present.
    for family in [
        "hsm_pool_queue_depth",
        "hsm_pool_rejected_busy_total",
        "hsm_seed_cache_evictions_total",
        "hsm_store_failed_batches_total",
        "hsm_event_watches_open",
    ] {
        assert!(
            after.keys().any(|s| s.split('{').next() == Some(family)),
            "{family} missing:\n{text}"
        );
    }
    // Every verdict and challenge state has its series from the start (expired and
    // reported too).
    for state in hsm_service::metrics::CHALLENGE_STATES {
        let series = format!("hsm_challenges_total{{state=\"{state}\"}}");
        assert!(after.contains_key(&series), "{series} missing:\n{text}");
    }
    for result in hsm_service::metrics::VERIFY_RESULTS {
        let series = format!("hsm_verify_results_total{{result=\"{result}\"}}");
        assert!(after.contains_key(&series), "{series} missing:\n{text}");
    }

    // Nothing the load named reaches a label value (ids, subjects, codes, the binding
    // code). Histogram bounds (`le`) are fixed numbers, and a two-digit binding code can
    // equal one ("60" did, once in CI).
    let values: Vec<&str> = after
        .keys()
        .filter_map(|series| series.split_once('{').map(|(_, l)| l.trim_end_matches('}')))
        .flat_map(|labels| labels.split("\","))
        .filter_map(|pair| pair.split_once("=\""))
        .filter(|(key, _)| *key != "le")
        .map(|(_, value)| value.trim_end_matches('"'))
        .collect();
    assert!(
        values.contains(&"hsm.v1.CredentialService/VerifyCode") && values.contains(&"OK"),
        "label values not parsed:\n{text}"
    );
    let code = common::hotp(common::EVIDENCE_SEED, 0);
    for secret in [id, subject, "citizen-1", &phone.device_id, &code] {
        assert!(
            values.iter().all(|v| !v.contains(secret)),
            "{secret:?} appears in a label:\n{text}"
        );
    }
    assert!(
        values.iter().all(|v| *v != ch.binding_code),
        "the binding code is a label value:\n{text}"
    );

    // GetStatus carries the same figures (what `hsmctl status` prints).
    let m = status.metrics.expect("metrics summary");
    assert_eq!(m.endpoint, format!("http://{metrics}/metrics"));
    assert!(m.rpc_requests >= 5 && m.rpc_failed >= 1, "{m:?}");
    assert!(
        m.verify_accepted >= 1 && m.verify_not_accepted >= 1,
        "{m:?}"
    );
    assert!(m.seed_cache_misses >= 1 && m.commits >= 1 && m.committed_jobs >= m.commits);
    assert!(m.audit_records >= 1 && m.audit_checkpoints >= 1, "{m:?}");

    // Only GET /metrics is served.
    let (head, _) = http_get(metrics, "GET", "/").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http_get(metrics, "POST", "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    server.shutdown().await.expect("shutdown");
}

/// `C_Logout` from a second PKCS#11 context of this process on `env`'s token: the login
/// state is per application, so the server's sessions lose their login too.
fn token_logout(env: &DevEnv) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::session::UserType;
    let ctx = Pkcs11::new(&env.config.hsm.module).expect("load the module");
    // The server initialized the library in this process already.
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let label = env.config.hsm.token_label.clone().expect("token label");
    let slot = ctx
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|t| t.label().trim_end() == label)
        })
        .expect("the env's token");
    let session = ctx.open_ro_session(slot).expect("session");
    let pin = env.config.user_pin().expect("PIN");
    // Logged in already (the server's sessions): log out the application.
    match session.login(UserType::User, Some(&pin)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    session.logout().expect("logout");
    drop(session);
    // Dropping the context would C_Finalize the library under the running server.
    std::mem::forget(ctx);
}

fn dev_config_text(env: &DevEnv, metrics: &str) -> String {
    let path = env.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    format!("{text}\n[metrics]\n{metrics}\n")
}

#[test]
fn metrics_config_is_off_by_default_and_checked() {
    let env = DevEnv::new();
    let path = env.dir.path().join("config.toml");
    let plain = Config::load(&path).expect("dev config");
    assert_eq!(
        plain.metrics.listen, None,
        "serve mode: off unless configured"
    );

    let write = |metrics: &str| {
        let p = env.dir.path().join("metrics-test.toml");
        std::fs::write(&p, dev_config_text(&env, metrics)).expect("write");
        Config::load(&p)
    };
    let on = write("listen = \"127.0.0.1:9999\"").expect("valid");
    assert_eq!(on.metrics.listen, Some("127.0.0.1:9999".parse().unwrap()));

    for (bad, wanted) in [
        (
            "listen = \"localhost:9464\"",
            "is not an IP address and port",
        ),
        ("listen = \"127.0.0.1\"", "is not an IP address and port"),
        (
            "listen = \"127.0.0.1:99999\"",
            "is not an IP address and port",
        ),
        ("listen = 9464", "string"),
        ("address = \"127.0.0.1:9464\"", "unknown field"),
    ] {
        let e = write(bad).expect_err(bad).to_string();
        assert!(e.contains(wanted), "{bad}: {e}");
    }
    let same = format!("listen = \"{}\"", plain.server.listen);
    let e = write(&same).expect_err("same as server.listen").to_string();
    assert!(e.contains("must differ from server.listen"), "{e}");
}

#[tokio::test]
async fn a_taken_metrics_address_stops_serve_but_not_dev_mode() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let mut env = DevEnv::new();
    env.config.metrics.listen = Some(addr);
    let e = hsm_service::server::start(env.config.clone())
        .await
        .err()
        .expect("a configured address that is taken stops the start");
    assert_eq!(
        e.to_string(),
        format!("cannot listen on {addr} (metrics.listen): Address already in use (os error 98)")
    );
    env.config.metrics.best_effort = true;
    let server = hsm_service::server::start(env.config.clone())
        .await
        .expect("dev mode's default address is best effort");
    assert_eq!(server.metrics_addr(), None);
    server.shutdown().await.expect("shutdown");
}

#[test]
fn dev_metrics_listen_moves_the_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _, metrics) =
        common::spawn_dev_metrics(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics.expect("the metrics line");
    assert_ne!(metrics.port(), 9464);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_, series) = runtime.block_on(scrape(metrics));
    assert!(series
        .keys()
        .any(|s| s.starts_with("hsm_audit_records_total")));
    assert!(common::terminate(&mut child).success());
}
