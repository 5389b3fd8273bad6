//! `scripts/dev-cluster.sh status` tells a running database (its URL) from a stopped one
//! (no URL: nothing answers there). Starts a private PostgreSQL cluster of its own
//! (`scripts/postgres.sh`), so it runs where the PostgreSQL tests run: it needs
//! `HSM_TEST_POSTGRES_URL` set (which proves initdb is installed), skips with a printed
//! line without it, and fails under CI=true.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn script(name: &str, args: &[&str], cluster_dir: &Path) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts").join(name))
        .args(args)
        .env("HSM_DEV_CLUSTER_DIR", cluster_dir)
        // Ports nothing listens on: the instances are not running in this test.
        .env("HSM_DEV_CLUSTER_PORTS", "1 2")
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Stops the cluster however the test ends.
struct Stop(PathBuf);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = script("postgres.sh", &["stop", &self.0.to_string_lossy()], &self.0);
    }
}

#[test]
fn status_prints_the_database_url_only_while_it_runs() {
    if hsm_service::store::postgres::testing::cluster_url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // As root the cluster belongs to another user, who must reach its directory.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let pg = dir.path().join("postgres");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("addr")
        .port()
        .to_string();
    let _stop = Stop(pg.clone());

    let none = script("dev-cluster.sh", &["status"], dir.path());
    assert!(text(&none).contains("database: none"), "{}", text(&none));

    let started = script(
        "postgres.sh",
        &["start", &pg.to_string_lossy(), &port],
        dir.path(),
    );
    assert!(started.status.success(), "{}", text(&started));
    let url = format!("postgresql://hsm@127.0.0.1:{port}/postgres");
    let running = script("dev-cluster.sh", &["status"], dir.path());
    assert!(
        text(&running).contains(&format!("database: {url}")),
        "{}",
        text(&running)
    );

    let stopped = script("postgres.sh", &["stop", &pg.to_string_lossy()], dir.path());
    assert!(stopped.status.success(), "{}", text(&stopped));
    let status = script("dev-cluster.sh", &["status"], dir.path());
    let out = text(&status);
    assert!(out.contains("database: stopped"), "{out}");
    assert!(
        !out.contains("postgresql://"),
        "no URL for a stopped database: {out}"
    );
    assert!(
        !status.status.success(),
        "status fails while the database is down: {out}"
    );
}
