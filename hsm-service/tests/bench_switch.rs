//! The bench-only no-fsync store switch: reachable from the test-support `DevEnv`
//! only, never from a configuration file.

use hsm_service::config::Config;
use hsm_service::testing::DevEnv;

#[test]
fn no_config_key_turns_durability_off() {
    let env = DevEnv::new();
    let path = env.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path).expect("dev config.toml");
    assert!(Config::load(&path).is_ok(), "the dev config itself loads");
    let attempts = [
        format!("durable = false\n{text}"),
        format!("fsync = false\n{text}"),
        text.replace("[hsm]\n", "[hsm]\ndurable = false\n"),
        format!("{text}\n[store]\ndurable = false\n"),
    ];
    for (i, bad) in attempts.iter().enumerate() {
        let p = env.dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&p, bad).expect("write config");
        let err = Config::load(&p).expect_err("a durability key must be refused");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}

#[tokio::test]
async fn dev_env_starts_without_fsync_for_benches() {
    let env = DevEnv::new();
    let server = env.start_without_fsync_bench_only().await;
    server.shutdown().await.expect("clean shutdown");
}
