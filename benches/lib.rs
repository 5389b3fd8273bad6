//! Shared set-up for the criterion benches: a throw-away dev token, and a bare cryptoki
//! session on it for the "no service around it" baselines.
//!
//! The benches measure the service's own code paths against the same operation done
//! directly through cryptoki in the same run, so that figures are read as ratios.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use hsm_service::credentials::{self, Credentials, NewCredential, Policy};
use hsm_service::hsm::{module, Hsm, HsmSettings};
use hsm_service::otp::{self, HashAlgorithm, OtpKind};
use hsm_service::store::{Store, StoreOptions};
use hsm_service::testing::DevEnv;
use secrecy::SecretString;
use zeroize::Zeroizing;

/// A dev token with the service's session pool and a direct session next to it.
pub struct Bench {
    /// Keeps the token directory alive.
    pub env: DevEnv,
    /// The service's HSM handle (pool of `sessions`).
    pub hsm: Hsm,
}

impl Bench {
    /// A fresh token, and a pool of `sessions` sessions on it.
    pub fn new(sessions: usize) -> Bench {
        Bench::with_seed_cache(sessions, 100_000)
    }

    /// The same with an unwrapped-seed cache of `capacity` entries.
    pub fn with_seed_cache(sessions: usize, capacity: usize) -> Bench {
        let env = DevEnv::new();
        let settings = HsmSettings {
            module: env.config.hsm.module.clone(),
            token: env.config.token(),
            sessions,
            queue_capacity: 4096,
            seed_cache_capacity: capacity,
        };
        let hsm = Hsm::open(&settings, env.config.user_pin().expect("pin")).expect("open HSM");
        Bench { env, hsm }
    }

    /// A logged-in cryptoki session on the same token, outside the service.
    pub fn direct_session(&self) -> Session {
        let ctx = module::load(&self.env.config.hsm.module).expect("module");
        let slot = module::find_token(&ctx, &self.env.config.token()).expect("token");
        let session = ctx.open_rw_session(slot).expect("session");
        let pin: SecretString = self.env.config.user_pin().expect("pin");
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => panic!("login: {e}"),
        }
        session
    }
}

/// A credential service on a bench token, with a store in a temporary directory and a
/// clock the bench moves.
pub struct CredentialBench {
    /// The token and pool.
    pub bench: Bench,
    /// Keeps the store directory alive.
    pub dir: tempfile::TempDir,
    /// The store.
    pub store: Arc<Store>,
    /// The service.
    pub service: Arc<Credentials<Store>>,
    /// The service's clock, in unix seconds.
    pub now: Arc<AtomicU64>,
}

impl CredentialBench {
    /// `sessions` pool sessions; `durable` false only to measure what fsync costs.
    /// Lockout is effectively off, so wrong codes can be verified in a loop.
    pub fn new(rt: &tokio::runtime::Runtime, sessions: usize, durable: bool) -> CredentialBench {
        CredentialBench::build(rt, Bench::new(sessions), durable)
    }

    /// A durable one whose unwrapped-seed cache holds `capacity` seeds.
    pub fn with_seed_cache(
        rt: &tokio::runtime::Runtime,
        sessions: usize,
        capacity: usize,
    ) -> CredentialBench {
        CredentialBench::build(rt, Bench::with_seed_cache(sessions, capacity), true)
    }

    fn build(rt: &tokio::runtime::Runtime, bench: Bench, durable: bool) -> CredentialBench {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions {
            durable,
            ..StoreOptions::default()
        };
        let store = Arc::new(
            Store::open_redb(&dir.path().join(hsm_service::store::EMBEDDED_FILE), options)
                .expect("store"),
        );
        CredentialBench::on_store(rt, bench, dir, store)
    }

    /// The same over `store` (any backend); `dir` is kept alive with it.
    pub fn on_store(
        rt: &tokio::runtime::Runtime,
        bench: Bench,
        dir: tempfile::TempDir,
        store: Arc<Store>,
    ) -> CredentialBench {
        rt.block_on(credentials::ensure_master_key(
            &bench.hsm,
            store.as_ref(),
            1,
        ))
        .expect("master key");
        rt.block_on(credentials::binding::migrate(
            &bench.hsm,
            store.as_ref(),
            500,
        ))
        .expect("binding key");
        let now = Arc::new(AtomicU64::new(1_700_000_000));
        let clock_now = now.clone();
        let policy = Policy {
            lockout_threshold: u32::MAX - 1,
            hard_lockout_threshold: 0,
            ..Policy::default()
        };
        let service = Arc::new(Credentials::new(
            bench.hsm.clone(),
            store.clone(),
            policy,
            1,
            hsm_service::common::Clock::from_secs_fn(move || clock_now.load(Ordering::Relaxed)),
        ));
        CredentialBench {
            bench,
            dir,
            store,
            service,
            now,
        }
    }

    /// Import `seed` as credential `id`.
    pub fn import(&self, rt: &tokio::runtime::Runtime, id: &str, kind: OtpKind, seed: &[u8]) {
        rt.block_on(self.service.create(
            BENCH_TENANT,
            NewCredential {
                id: Some(id.to_owned()),
                kind,
                algorithm: HashAlgorithm::Sha1,
                digits: 6,
                period_seconds: 0,
                seed: Some(Zeroizing::new(seed.to_vec())),
                reveal_seed: false,
                issuer: String::new(),
                account_name: String::new(),
                initial_counter: 0,
                // A subject, as a login service sets it: an accepted code also writes its
                // evidence record, which is part of the hot path being measured.
                subject: Some(format!("subject-{id}")),
            },
        ))
        .expect("create");
    }
}

/// The tenant of the benches' credentials.
pub const BENCH_TENANT: &str = "bench";

/// The TOTP/HOTP code of `seed` (HMAC-SHA-1, 6 digits) for `factor`, in software.
pub fn software_code(seed: &[u8], factor: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, seed);
    let tag = ring::hmac::sign(&key, &otp::moving_factor(factor));
    format!(
        "{:06}",
        otp::truncate(tag.as_ref(), otp::Digits::new(6).expect("digits"))
    )
}

/// The binding `blob` needs for `seed_macs`, to a bench context, computed by the HSM.
pub fn seed_binding(
    rt: &tokio::runtime::Runtime,
    hsm: &hsm_service::hsm::Hsm,
    blob: &[u8],
) -> hsm_service::hsm::binding::SeedBinding {
    rt.block_on(hsm.ensure_seed_binding_key())
        .expect("binding key");
    let context = b"bench context".to_vec();
    let mac = rt
        .block_on(hsm.seed_bindings(vec![(context.clone(), blob.to_vec())]))
        .expect("bind")[0];
    hsm_service::hsm::binding::SeedBinding { context, mac }
}

/// An HMAC key as the service's seed cache holds one: a sensitive, sign-only session
/// object with value `seed`, on `session`.
pub fn session_hmac_key(session: &Session, seed: &[u8]) -> ObjectHandle {
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Sign(true),
            Attribute::Value(seed.to_vec()),
        ])
        .expect("session HMAC key")
}

/// A private PostgreSQL cluster for one bench run, in a temporary directory
/// (`scripts/postgres.sh start`, with `pg_stat_statements` loaded), stopped on drop.
/// Databases on it: [`PgCluster::database`].
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// Superuser URL (trust authentication, loopback only).
    pub url: String,
}

/// The repository's `scripts/postgres.sh`.
pub const POSTGRES_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres.sh");

impl PgCluster {
    /// Starts one on a free loopback port. `Err` (with the script's output) when
    /// PostgreSQL is not installed and cannot be, or the server does not start.
    pub fn start() -> Result<PgCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("hsm-bench-pg-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let out = std::process::Command::new("bash")
            .arg(POSTGRES_SH)
            .arg("start")
            .arg(dir.path())
            .arg(port.to_string())
            .env(
                "PG_EXTRA_OPTS",
                "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_utility=on",
            )
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("{POSTGRES_SH}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{POSTGRES_SH} start failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // The test-support databases (`TestDatabase`) are made on the cluster this names.
        std::env::set_var(hsm_service::store::postgres::testing::URL_VAR, &url);
        Ok(PgCluster { dir, url })
    }

    /// A fresh database of its own (dropped with the value), with `pg_stat_statements`.
    pub fn database(&self) -> hsm_service::store::postgres::testing::TestDatabase {
        let db = hsm_service::store::postgres::testing::TestDatabase::create()
            .expect("a database on the bench cluster");
        db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
        db
    }

    /// Process ids of the server: the postmaster and every process it started (one per
    /// session, plus its background workers).
    pub fn pids(&self) -> Vec<u32> {
        let Some(master) = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return Vec::new();
        };
        let mut pids = vec![master];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                if proc_stat(pid).is_some_and(|s| s.ppid == master) {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(POSTGRES_SH)
            .arg("stop")
            .arg(self.dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// The fields of `/proc/PID/stat` the benches use.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    /// Parent process id.
    pub ppid: u32,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

/// `/proc/PID/stat` of a live process.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after its last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state (3), ppid (4), ..., utime (14), stime (15).
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(ticks(1)?).ok()?,
        cpu_ticks: ticks(11)? + ticks(12)?,
    })
}

/// CPU seconds (user + system) the processes `pids` have used so far (the live ones).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| proc_stat(*p))
        .map(|s| s.cpu_ticks)
        .sum::<u64>() as f64
        / clock_ticks_per_second()
}

/// `getconf CLK_TCK` (100 on Linux unless someone built it otherwise).
pub fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}
