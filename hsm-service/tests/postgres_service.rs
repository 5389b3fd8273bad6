//! The whole service with `[store] backend = "postgres"`: it serves from the database,
//! writes its audit chain under its instance name, and while the database is unreachable
//! reports NOT_SERVING and answers UNAVAILABLE (never ACCEPTED without a commit), then
//! recovers by itself. Needs `HSM_TEST_POSTGRES_URL` (see scripts/postgres.sh); skips
//! without it, except under CI=true.

mod common;

use std::time::{Duration, Instant};

use hsm_client::proto::{VerifyCodeRequest, VerifyResult};
use hsm_client::HsmClient;
use hsm_service::config::{StoreBackendKind, StoreConfig};
use hsm_service::store::postgres::testing::TestDatabase;
use hsm_service::testing::DevEnv;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

async fn wait_health(c: &HsmClient, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if c.health().await.ok() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_on_postgres_and_rides_out_an_outage() {
    let Some(db) = tokio::task::spawn_blocking(TestDatabase::create)
        .await
        .expect("set-up")
    else {
        return;
    };
    let mut env = DevEnv::new();
    env.config.store = StoreConfig {
        backend: StoreBackendKind::Postgres,
        url: Some(db.url.clone()),
        instance: Some("it-1".into()),
        pool_size: 2,
        ..StoreConfig::default()
    };
    let server = env.start().await;
    let c = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    assert_eq!(c.health().await.expect("health"), ServingStatus::Serving);

    common::enrol(&c, "pg-1", "citizen-1").await;
    let r = common::verify_hotp(&c, "pg-1", 0).await;
    assert_eq!(r.result, VerifyResult::Accepted as i32);
    let r = common::verify_hotp(&c, "pg-1", 0).await;
    assert_eq!(r.result, VerifyResult::Replayed as i32);
    // State and audit trail are in the database, the trail in this instance's chain.
    assert_eq!(
        db.query_text("SELECT count(*) FROM tenant_credentials")
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        db.query_text("SELECT count(*) > 2 FROM audit_log WHERE chain = 'it-1'")
            .as_deref(),
        Some("t")
    );

    // The database goes away: NOT_SERVING, and a verification is UNAVAILABLE.
    db.allow_connections(false);
    db.kill_sessions();
    wait_health(&c, ServingStatus::NotServing).await;
    let err = c
        .credentials()
        .verify_code(VerifyCodeRequest {
            credential_id: "pg-1".into(),
            code: common::hotp(common::EVIDENCE_SEED, 1),
        })
        .await
        .expect_err("no answer without the database");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(!err.message().contains("SQLSTATE"), "{}", err.message());

    // It comes back: SERVING, and the same code is accepted now (it was never committed).
    db.allow_connections(true);
    wait_health(&c, ServingStatus::Serving).await;
    let r = common::verify_hotp(&c, "pg-1", 1).await;
    assert_eq!(r.result, VerifyResult::Accepted as i32);
    server.shutdown().await.expect("clean shutdown");
}
