//! Two real `hsm-service dev` processes over one data directory (one SoftHSM token, one
//! PKI) and one PostgreSQL test database: two instances of one service.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;

use hsm_client::HsmClient;
use hsm_service::store::postgres::testing::TestDatabase;

/// One `hsm-service dev` process.
pub struct Instance {
    pub child: Child,
    pub addr: SocketAddr,
    pub name: String,
}

impl Instance {
    /// A client of this instance with the dev identity `identity`.
    pub async fn client(&self, data_dir: &Path, identity: &str) -> HsmClient {
        super::client(data_dir, identity, self.addr).await
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) {
        super::kill(&mut self.child);
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Two instances `a` and `b` over one data directory and one database.
pub struct Cluster {
    pub a: Instance,
    pub b: Instance,
    pub db: TestDatabase,
    /// Keeps the data directory alive; dropped after the instances.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// `None` (a printed line) without `HSM_TEST_POSTGRES_URL`, except under CI=true,
    /// where that panics. Instance `a` makes the data directory with `--postgres` (which
    /// writes the database into its config.toml); `b` starts after it, without the
    /// flag, from what `a` wrote.
    pub async fn start() -> Option<Cluster> {
        let db = tokio::task::spawn_blocking(TestDatabase::create)
            .await
            .expect("set-up")?;
        let dir = tempfile::Builder::new()
            .prefix("hsm-test-cluster-")
            .tempdir()
            .expect("temporary directory");
        let data = dir.path().join("data");
        let a = spawn(&data, "a", &["--postgres", &db.url]);
        let b = spawn(&data, "b", &[]);
        Some(Cluster { a, b, db, dir })
    }

    /// [`Cluster::start`] with `tune` applied to the shared `config.toml` first (a test's
    /// own timeouts): instance `a` writes it on a first run and is stopped (SIGTERM)
    /// before both instances start from the tuned file.
    pub async fn start_tuned(tune: impl FnOnce(&mut toml::Table)) -> Option<Cluster> {
        let db = tokio::task::spawn_blocking(TestDatabase::create)
            .await
            .expect("set-up")?;
        let dir = tempfile::Builder::new()
            .prefix("hsm-test-cluster-")
            .tempdir()
            .expect("temporary directory");
        let data = dir.path().join("data");
        let mut first = spawn(&data, "a", &["--postgres", &db.url]);
        super::terminate(&mut first.child);
        let path = data.join("config.toml");
        let mut config: toml::Table = std::fs::read_to_string(&path)
            .expect("config.toml")
            .parse()
            .expect("config.toml parses");
        tune(&mut config);
        std::fs::write(&path, toml::to_string(&config).expect("serialise"))
            .expect("write config.toml");
        let a = spawn(&data, "a", &[]);
        let b = spawn(&data, "b", &[]);
        Some(Cluster { a, b, db, dir })
    }

    /// The shared data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

/// `hsm-service dev --data-dir DATA --listen 127.0.0.1:0 --instance NAME EXTRA..`, once it
/// listens.
pub fn spawn(data: &Path, name: &str, extra: &[&str]) -> Instance {
    let flags: Vec<&str> = ["--instance", name].iter().chain(extra).copied().collect();
    let (child, addr) = super::spawn_dev_quiet(data, &flags);
    Instance {
        child,
        addr,
        name: name.to_owned(),
    }
}
