//! Test support: a private database per test on the cluster `HSM_TEST_POSTGRES_URL`
//! names (`scripts/postgres.sh start DIR` starts one and prints its URL;
//! `scripts/test.sh` does so for CI), so tests run in parallel without seeing each other.
//!
//! Without the variable a test that needs PostgreSQL prints one line and skips, except
//! under `CI=true`, where it fails: CI must never pass by skipping.

use std::sync::atomic::{AtomicU32, Ordering};

use std::sync::Arc;

use super::{PgBackend, PgOptions};
use crate::store::{Store, StoreOptions};

/// Runs `f` on a thread of its own: a `postgres::Client` drives its own runtime, which
/// must not be started or dropped on a tokio worker, so every helper here is safe to call
/// from an async test.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// The variable naming the test cluster (a superuser URL with trust authentication).
pub const URL_VAR: &str = "HSM_TEST_POSTGRES_URL";

/// The test cluster's URL; `None` (after printing why) when there is none and this is
/// not CI. Panics under `CI=true` without one.
pub fn cluster_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_owned()),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "CI=true but {URL_VAR} is not set: scripts/test.sh starts a private \
                     PostgreSQL cluster (scripts/postgres.sh) and exports it"
                );
            }
            eprintln!(
                "skipping a PostgreSQL test: {URL_VAR} is not set \
                 (scripts/postgres.sh start DIR prints one)"
            );
            None
        }
    }
}

/// The variable naming the test cluster's CA certificate (PEM), set when the cluster
/// serves TLS (`scripts/postgres.sh start DIR PORT --tls`; `scripts/postgres.sh ca DIR`
/// prints the path).
pub const CA_VAR: &str = "HSM_TEST_POSTGRES_CA";

/// The CA that signed the test cluster's server certificate; `None` (after printing why)
/// when the cluster serves no TLS and this is not CI. Panics under `CI=true` without one.
pub fn cluster_ca() -> Option<std::path::PathBuf> {
    match std::env::var_os(CA_VAR) {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "CI=true but {CA_VAR} is not set: scripts/test.sh starts the private \
                     PostgreSQL cluster with --tls and exports its CA"
                );
            }
            eprintln!(
                "skipping a PostgreSQL TLS test: {CA_VAR} is not set \
                 (scripts/postgres.sh start DIR PORT --tls; scripts/postgres.sh ca DIR)"
            );
            None
        }
    }
}

/// A database of its own, dropped (with its sessions) when this is dropped.
pub struct TestDatabase {
    admin_url: String,
    /// The database's name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("url", &self.url)
            .finish()
    }
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (head, query) = match url.find('?') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let after_scheme = head.find("://").map_or(0, |i| i + 3);
    let base = match head[after_scheme..].find('/') {
        Some(i) => &head[..after_scheme + i],
        None => head,
    };
    format!("{base}/{db}{query}")
}

impl TestDatabase {
    /// Creates a fresh, empty database; `None` when PostgreSQL tests are skipped.
    pub fn create() -> Option<TestDatabase> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let admin_url = cluster_url()?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "hsm_test_{}_{}_{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let db = TestDatabase {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        };
        db.admin(&format!("CREATE DATABASE {}", db.name));
        Some(db)
    }

    /// Runs `sql` on the cluster's admin database.
    pub fn admin(&self, sql: &str) {
        run(&self.admin_url, sql);
    }

    /// Runs `sql` in this database (as the cluster's admin user, outside any backend).
    pub fn execute(&self, sql: &str) {
        run(&self.url, sql);
    }

    /// The first column of the first row of `sql` in this database, as text.
    pub fn query_text(&self, sql: &str) -> Option<String> {
        off_runtime(|| {
            let mut c = postgres::Client::connect(&self.url, postgres::NoTls)
                .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url));
            let rows = c.simple_query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            rows.into_iter().find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
        })
    }

    /// Ends every session of this database (as a database restart or a network cut
    /// would): the backends' committer and pooled connections die.
    pub fn kill_sessions(&self) {
        self.admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            self.name
        ));
    }

    /// Makes the database refuse (`false`) or accept new sessions.
    pub fn allow_connections(&self, allow: bool) {
        self.admin(&format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}",
            self.name
        ));
    }

    /// Options for a backend on this database with chain `instance`.
    pub fn options(&self, instance: &str) -> PgOptions {
        let mut o = PgOptions::new(self.url.clone(), instance);
        o.pool_size = 4;
        o
    }

    /// A backend on this database with chain `instance`.
    pub fn backend(&self, instance: &str) -> PgBackend {
        let o = self.options(instance);
        off_runtime(move || PgBackend::open(&o).expect("open the PostgreSQL backend"))
    }

    /// A [`Store`] (group commit and all) on this database with chain `instance`: one
    /// service instance's store.
    pub fn store(&self, instance: &str) -> Arc<Store> {
        let backend = self.backend(instance);
        Arc::new(
            Store::with_backend(Arc::new(backend), StoreOptions::default())
                .expect("a store over PostgreSQL"),
        )
    }
}

/// Runs `sql` on the database `url` names.
fn run(url: &str, sql: &str) {
    off_runtime(|| {
        let mut c = postgres::Client::connect(url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        c.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    });
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let url = &self.admin_url;
        off_runtime(move || {
            if let Ok(mut c) = postgres::Client::connect(url, postgres::NoTls) {
                let _ = c.batch_execute(&sql);
            }
        });
    }
}

/// A [`Store`] over PostgreSQL on a database of its own, chain `default`; `None` when
/// PostgreSQL tests are skipped (see [`cluster_url`]). The store is dropped before its
/// database.
pub struct PgTestStore {
    /// The store (field order: dropped first).
    pub store: Arc<Store>,
    /// Its database (more instances: [`TestDatabase::store`] with another chain).
    pub db: TestDatabase,
}

/// The conformance suite's one call: a fresh PostgreSQL-backed [`Store`].
pub fn test_postgres_store() -> Option<PgTestStore> {
    let db = TestDatabase::create()?;
    let store = db.store(crate::store::DEFAULT_CHAIN);
    Some(PgTestStore { store, db })
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_is_replaced_in_the_url() {
        use super::with_database;
        assert_eq!(
            with_database("postgresql://u@127.0.0.1:5433/postgres", "x"),
            "postgresql://u@127.0.0.1:5433/x"
        );
        assert_eq!(
            with_database("postgresql://u@h:1/postgres?sslmode=disable", "x"),
            "postgresql://u@h:1/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://u@h:1", "x"),
            "postgresql://u@h:1/x"
        );
    }
}
