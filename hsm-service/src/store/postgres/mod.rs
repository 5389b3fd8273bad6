//! The PostgreSQL backend: the shared store several service instances write through.
//! This module (and only it) names PostgreSQL types.
//!
//! # Crates, and why
//!
//! * `postgres` (the synchronous client over `tokio-postgres`, by the same maintainers):
//!   the unit of work is a synchronous closure run on the group committer's own OS
//!   thread, exactly as with redb, so a blocking client fits it without a runtime hop
//!   per statement (an async pool such as deadpool-postgres would make every `get` of a
//!   job a `block_on` from that thread). Reads run on a blocking thread
//!   ([`Backend::reads_block`] is true), where blocking calls are equally at home.
//! * `r2d2` for the read pool: the long-standing blocking pool (deadpool is async-only),
//!   with our own small connection manager rather than `r2d2_postgres`, so that each
//!   pooled connection carries its own prepared-statement cache.
//! * `tokio-postgres-rustls` for TLS to the database: the workspace's rustls 0.23 with
//!   the ring provider, as the gRPC side uses. TLS is on exactly when `store.ca_file` is
//!   set (SSL mode `require`, the server certificate verified against that CA and the
//!   URL's host name); without it the SSL mode is `disable`.
//!
//! # Transactions
//!
//! * A batch ([`Backend::begin_batch`]) is `BEGIN` … `COMMIT` on the committer's one
//!   dedicated connection, with `synchronous_commit = on` set as a start-up parameter of
//!   every session and checked when the session opens. Reads inside it are locking
//!   (`SELECT ... FOR UPDATE`); writes are buffered and flushed at commit with a few
//!   multi-row statements (see `batch`). A key read as absent is flushed with a plain
//!   `INSERT`, so two instances inserting it cannot both commit.
//! * A conflict with another instance's transaction (deadlock `40P01`, serialization
//!   failure `40001`, a unique violation of a key read as absent, a lock or statement
//!   timeout) fails the whole batch with [`StoreError::Aborted`]: nothing was written,
//!   the caller may retry. A lost connection fails it with [`StoreError::Unavailable`]
//!   (answered `UNAVAILABLE`); a batch is never answered `Ok` without a confirmed
//!   COMMIT, and the committer reconnects at the next batch.
//! * A read ([`Backend::read`]) runs on a pooled connection inside
//!   `BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ`: one snapshot. A pooled
//!   connection found dead is discarded and the read retried once on a fresh one.
//!
//! # Audit chains
//!
//! One chain per instance (`store.instance`). At start (and at every reconnect) the
//! committer's session takes a session-level advisory lock on its chain name, so a second
//! instance configured with the same name refuses to start, and a chain has one writer.
//!
//! # Schema
//!
//! Versioned migrations (`migrations/NNNN_*.sql`, embedded in the binary), applied in
//! order in one transaction at start-up and recorded in `schema_migrations`; a database
//! whose schema is newer than this binary knows is refused ([`StoreError::SchemaTooNew`]).
//! One table per [`Table`] (`k bytea primary key, v bytea not null`: bytea because keys
//! may hold NUL separators, which `text` cannot, and because bytea orders bytewise like
//! redb), plus `audit_log (chain, seq, line)`.

mod batch;
mod conn;
mod migrate;
#[doc(hidden)]
pub mod testing;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use secrecy::SecretString;

use self::conn::{map_err, ConnectInfo, Manager, PgConn, PoolErrors, Queries};
use super::backend::{Backend, BatchTxn};
use super::uow::{ChainName, KeyRange, ReadTxn, Table};
use super::{Rollback, StoreError};

pub use self::migrate::SCHEMA_VERSION;

/// How often the health probe asks the database whether it answers.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// [`PgOptions::connect_timeout`] unless configured (`store.connect_timeout_ms`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long start-up waits for the audit chain's lock before refusing.
const CHAIN_LOCK_WAIT: Duration = Duration::from_secs(3);

/// Longest chain (instance) name.
pub const MAX_INSTANCE_LEN: usize = 64;

/// Options of [`PgBackend::open`] (from the config's `[store]` section).
#[derive(Clone)]
pub struct PgOptions {
    /// Connection URL without a password, e.g. `postgresql://hsm@db.example:5432/hsm`.
    pub url: String,
    /// The password (from `store.password_file`), if the server asks for one.
    pub password: Option<SecretString>,
    /// Connections of the read pool (the committer has one more of its own).
    pub pool_size: u32,
    /// CA certificate(s) (PEM) that issued the server's certificate: TLS is on when set.
    pub ca_file: Option<PathBuf>,
    /// Longest a statement may run (a lock wait included) before the batch fails.
    pub statement_timeout: Duration,
    /// Longest one connection attempt, and a wait for a pooled connection, may take
    /// before the database counts as unreachable (the call answers UNAVAILABLE).
    pub connect_timeout: Duration,
    /// This instance's audit chain name.
    pub instance: String,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("pool_size", &self.pool_size)
            .field("ca_file", &self.ca_file)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("instance", &self.instance)
            .finish()
    }
}

impl PgOptions {
    /// Options with the defaults for everything but the URL and the instance.
    pub fn new(url: impl Into<String>, instance: impl Into<String>) -> PgOptions {
        PgOptions {
            url: url.into(),
            password: None,
            pool_size: 8,
            ca_file: None,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            instance: instance.into(),
        }
    }
}

/// Checks a `store.url` without connecting: it parses, names a host and a database, and
/// holds no password.
pub fn check_url(url: &str) -> Result<(), String> {
    conn::parse_url(url).map(|_| ())
}

/// Checks an instance (audit chain) name: 1 to [`MAX_INSTANCE_LEN`] characters of
/// `A-Z a-z 0-9 . _ -`.
pub fn check_instance(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_INSTANCE_LEN {
        return Err(format!(
            "store.instance must be 1 to {MAX_INSTANCE_LEN} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err("store.instance may contain only A-Z a-z 0-9 . _ -".into());
    }
    Ok(())
}

/// The PostgreSQL storage engine.
pub struct PgBackend {
    connect: Arc<ConnectInfo>,
    /// The committer's own session (None after it was lost: the next batch reconnects).
    committer: Mutex<Option<PgConn>>,
    /// Always `Some` until dropped (taken in `Drop`, see there).
    pool: Option<r2d2::Pool<Manager>>,
    chain: String,
    healthy: Arc<AtomicBool>,
    /// Dropping it stops the health probe.
    stop_probe: Option<mpsc::Sender<()>>,
    probe: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("chain", &self.chain)
            .field("healthy", &self.healthy())
            .finish_non_exhaustive()
    }
}

impl PgBackend {
    /// Connects, applies the migrations this binary carries (refusing a newer schema),
    /// takes this instance's audit chain lock, and starts the read pool and the health
    /// probe. Blocking: call it before serving, or from a blocking thread.
    pub fn open(opts: &PgOptions) -> Result<PgBackend, StoreError> {
        check_instance(&opts.instance).map_err(StoreError::Invalid)?;
        if opts.pool_size == 0 {
            return Err(StoreError::Invalid(
                "store.pool_size must be at least 1".into(),
            ));
        }
        let connect = Arc::new(ConnectInfo::new(opts)?);
        let mut conn = connect.checked_connect()?;
        let applied = migrate::apply(&mut conn.client)?;
        if applied > 0 {
            tracing::info!(
                applied,
                schema = SCHEMA_VERSION,
                "store: PostgreSQL schema migrated"
            );
        }
        lock_chain(&mut conn, &opts.instance, CHAIN_LOCK_WAIT)?;
        let pool = r2d2::Pool::builder()
            .max_size(opts.pool_size)
            .min_idle(Some(0))
            .test_on_check_out(false)
            .connection_timeout(opts.connect_timeout)
            .error_handler(Box::new(PoolErrors))
            .build_unchecked(Manager(connect.clone()));
        let healthy = Arc::new(AtomicBool::new(true));
        let (stop_probe, stopped) = mpsc::channel::<()>();
        let probe = {
            let (pool, healthy) = (pool.clone(), healthy.clone());
            std::thread::Builder::new()
                .name("store-pg-health".into())
                .spawn(move || probe(&pool, &healthy, &stopped))
                .map_err(|e| StoreError::Backend(format!("spawning the health probe: {e}")))?
        };
        Ok(PgBackend {
            connect,
            committer: Mutex::new(Some(conn)),
            pool: Some(pool),
            chain: opts.instance.clone(),
            healthy,
            stop_probe: Some(stop_probe),
            probe: Some(probe),
        })
    }

    /// The audit chain this instance writes (and holds the lock of).
    pub fn chain(&self) -> &str {
        &self.chain
    }

    fn pool(&self) -> Result<&r2d2::Pool<Manager>, StoreError> {
        self.pool.as_ref().ok_or(StoreError::Closed)
    }

    pub(super) fn set_healthy(&self, up: bool) {
        if self.healthy.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("store: PostgreSQL answers again");
            } else {
                tracing::warn!("store: PostgreSQL is unreachable");
            }
        }
    }

    fn read_once(
        &self,
        f: &mut dyn FnMut(&mut dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), ReadFailure> {
        let pool = self.pool().map_err(ReadFailure::After)?;
        let mut conn = pool.get().map_err(|e| {
            self.set_healthy(false);
            // The pool already waited for a connection: no retry.
            ReadFailure::After(StoreError::Unavailable(format!(
                "no PostgreSQL connection: {e}"
            )))
        })?;
        if let Err(e) = conn
            .client
            .batch_execute("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ")
        {
            conn.broken = true;
            let err = map_err(&e, "begin read");
            return Err(
                if matches!(err, StoreError::Unavailable(_)) || e.is_closed() {
                    ReadFailure::Before(err)
                } else {
                    ReadFailure::After(err)
                },
            );
        }
        let mut snapshot = Snapshot {
            q: Queries { conn: &mut conn },
        };
        let r = f(&mut snapshot);
        // Read-only: COMMIT and ROLLBACK are the same; a failure leaves the session in an
        // unknown state, so the pool drops it.
        if conn.client.batch_execute("COMMIT").is_err() {
            conn.broken = true;
        }
        if matches!(r, Err(StoreError::Unavailable(_))) {
            self.set_healthy(false);
        }
        r.map_err(ReadFailure::After)
    }
}

/// Why a read failed: before the closure ran (the connection was dead: retry on a
/// fresh one) or after.
enum ReadFailure {
    Before(StoreError),
    After(StoreError),
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        drop(self.stop_probe.take());
        if let Some(p) = self.probe.take() {
            let _ = p.join();
        }
        // A `postgres::Client` drives its own small runtime and closes the session with
        // it, which panics on a tokio worker (the last `Store` handle is often dropped
        // there). So the sessions are closed on a thread of their own.
        let committer = match self.committer.get_mut() {
            Ok(c) => c.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let pool = self.pool.take();
        if let Ok(closer) = std::thread::Builder::new()
            .name("store-pg-close".into())
            .spawn(move || drop((committer, pool)))
        {
            let _ = closer.join();
        }
    }
}

/// Takes the session-level advisory lock of `chain` on the committer's session, trying
/// for up to `wait` (a restarted instance's previous session may still be ending).
fn lock_chain(conn: &mut PgConn, chain: &str, wait: Duration) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let row = conn
            .client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('hsm-service audit chain ' || $1, 0))",
                &[&chain],
            )
            .map_err(|e| map_err(&e, "locking the audit chain"))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(StoreError::Unavailable(format!(
        "audit chain {chain:?} is in use by another running instance: give each instance \
         its own store.instance"
    )))
}

fn probe(pool: &r2d2::Pool<Manager>, healthy: &AtomicBool, stop: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(HEALTH_INTERVAL) {
        let up = match pool.get_timeout(HEALTH_INTERVAL.max(Duration::from_millis(500))) {
            Ok(mut conn) => match conn.client.simple_query("SELECT 1") {
                Ok(_) => true,
                Err(_) => {
                    conn.broken = true;
                    false
                }
            },
            Err(_) => false,
        };
        if healthy.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("store: PostgreSQL answers again");
            } else {
                tracing::warn!("store: PostgreSQL is unreachable");
            }
        }
    }
}

impl Backend for PgBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn begin_batch(&self) -> Result<Box<dyn BatchTxn + '_>, StoreError> {
        let mut guard = self.committer.lock().map_err(|_| StoreError::Closed)?;
        if guard.as_ref().is_some_and(PgConn::is_broken) {
            *guard = None;
        }
        if guard.is_none() {
            let mut conn = self.connect.checked_connect().inspect_err(|e| {
                if matches!(e, StoreError::Unavailable(_)) {
                    self.set_healthy(false);
                }
            })?;
            lock_chain(&mut conn, &self.chain, Duration::ZERO)?;
            tracing::info!(chain = %self.chain, "store: committer reconnected to PostgreSQL");
            *guard = Some(conn);
        }
        let conn = guard.as_mut().expect("connection just ensured");
        if let Err(e) = conn.client.batch_execute("BEGIN") {
            let err = map_err(&e, "begin");
            *guard = None;
            if matches!(err, StoreError::Unavailable(_)) {
                self.set_healthy(false);
            }
            return Err(err);
        }
        Ok(Box::new(batch::PgBatch::new(self, guard)))
    }

    fn read(
        &self,
        f: &mut dyn FnMut(&mut dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        // Every idle pooled connection may have died with the same outage; each one
        // found dead is discarded, so at most pool size + 1 attempts reach a fresh one.
        let mut attempts = self.pool()?.max_size() + 1;
        loop {
            attempts -= 1;
            match self.read_once(f) {
                Ok(()) => return Ok(()),
                Err(ReadFailure::After(e)) => return Err(e),
                Err(ReadFailure::Before(e)) if attempts == 0 => return Err(e),
                Err(ReadFailure::Before(e)) => {
                    tracing::debug!(error = %e, "store: retrying a read on a fresh connection");
                }
            }
        }
    }

    /// One autocommit `SELECT` on a pooled connection (a single statement is its own
    /// consistent snapshot): one round trip, where [`Backend::read`] takes three. It
    /// changes nothing, so one that fails on a dead pooled connection is retried on a
    /// fresh one, as a read whose `BEGIN` failed is.
    fn get_committed(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let pool = self.pool()?;
        let mut attempts = pool.max_size() + 1;
        loop {
            attempts -= 1;
            let mut conn = pool.get().map_err(|e| {
                self.set_healthy(false);
                StoreError::Unavailable(format!("no PostgreSQL connection: {e}"))
            })?;
            match (Queries { conn: &mut conn }).get(table, key, false) {
                Ok(v) => return Ok(v),
                Err(Rollback(e)) => {
                    if conn.is_broken() && attempts > 0 {
                        tracing::debug!(error = %e, "store: retrying a read on a fresh connection");
                        continue;
                    }
                    if matches!(e, StoreError::Unavailable(_)) {
                        self.set_healthy(false);
                    }
                    return Err(e);
                }
            }
        }
    }

    fn reads_block(&self) -> bool {
        true
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// A read-only snapshot on a pooled connection.
struct Snapshot<'c> {
    q: Queries<'c>,
}

impl ReadTxn for Snapshot<'_> {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
        self.q.get(table, key, false)
    }

    fn scan(
        &mut self,
        table: Table,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
        self.q.scan(table, range, limit)
    }

    fn count(&mut self, table: Table) -> Result<u64, Rollback> {
        self.q.count(table)
    }

    fn audit_last(&mut self, chain: &ChainName) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
        self.q.audit_last(chain)
    }

    fn audit_range(
        &mut self,
        chain: &ChainName,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
        self.q.audit_range(chain, from, limit)
    }

    fn audit_count(&mut self, chain: &ChainName) -> Result<u64, Rollback> {
        self.q.audit_count(chain)
    }

    fn audit_chains(&mut self) -> Result<Vec<String>, Rollback> {
        self.q.audit_chains()
    }
}
