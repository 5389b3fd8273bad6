//! Test and bench support: a throw-away dev service, exactly as `hsm-service dev` makes
//! it, in a temporary directory.
//!
//! A process can load SoftHSM with one configuration only, so every service started in
//! one process shares one temporary token directory and gets a token of its own (a
//! unique label). Nothing here touches `.hsm-dev/` or the system token directory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use crate::config::Config;
/// Which software token the tests run on (SoftHSM, or kryoptic: `HSM_PKCS11_MODULE`).
pub use crate::dev::SoftToken;
use crate::dev::{self, DevOptions};
use crate::server::{self, RunningServer};
use crate::store::StoreOptions;

struct SharedSoftHsm {
    _dir: tempfile::TempDir,
    conf: PathBuf,
}

/// Slots of the shared `kryoptic.conf` of a test process (`HSM_TEST_KRYOPTIC_SLOTS`,
/// default 96): kryoptic's slots are fixed when the library is initialized, and every
/// [`DevEnv`] of the process takes one.
fn kryoptic_slots() -> usize {
    std::env::var("HSM_TEST_KRYOPTIC_SLOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

fn shared_softhsm() -> &'static SharedSoftHsm {
    static SHARED: OnceLock<SharedSoftHsm> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("hsm-test-softhsm-")
            .tempdir()
            .expect("temporary directory");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("token directory");
        // SoftHSM's, or kryoptic's when HSM_PKCS11_MODULE names it (the second token).
        let kind = dev::softhsm_module()
            .map(|m| dev::SoftToken::of_module(&m))
            .unwrap_or(dev::SoftToken::SoftHsm);
        let conf = dir.path().join(kind.conf_name());
        std::fs::write(&conf, kind.conf_text(&tokens, kryoptic_slots()))
            .expect("token configuration");
        kind.point_at(&conf).expect("token configuration variable");
        SharedSoftHsm { _dir: dir, conf }
    })
}

/// A dev data directory with its own token, PKI and config.
pub struct DevEnv {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The config `hsm-service dev` would run with (listening on 127.0.0.1:0, metrics on
    /// another 127.0.0.1:0).
    pub config: Config,
}

impl DevEnv {
    /// Create one. Blocking.
    pub fn new() -> DevEnv {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let shared = shared_softhsm();
        let dir = tempfile::Builder::new()
            .prefix("hsm-test-data-")
            .tempdir()
            .expect("temporary directory");
        let label = format!(
            "t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut opts = DevOptions::new(dir.path());
        opts.listen = Some("127.0.0.1:0".parse().expect("address"));
        opts.token_label = label;
        opts.softhsm2_conf = Some(shared.conf.clone());
        // Each test server gets a metrics endpoint of its own, on a free port.
        opts.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
        let config = dev::prepare(&opts).expect("dev bootstrap");
        DevEnv { dir, config }
    }

    /// Let the dev client `cn` sign assertions without evidence (`unbound_assertions =
    /// true` in its `[[client]]` rule), for tests and benches of signing itself.
    pub fn allow_unbound_assertions(&mut self, cn: &str) -> &mut DevEnv {
        for rule in &mut self.config.clients {
            if rule.cn.as_deref() == Some(cn) {
                rule.unbound_assertions = true;
            }
        }
        self
    }

    /// Path of a file of the dev PKI, e.g. `pki("officer-1.crt")`.
    pub fn pki(&self, file: &str) -> PathBuf {
        self.dir.path().join("pki").join(file)
    }

    /// Put seed master key `version` on this env's token the way versions before the
    /// unwrap template made it (no `CKA_UNWRAP_TEMPLATE`): the state of an existing
    /// deployment, for tests of its migration. Call it before [`DevEnv::start`].
    pub async fn legacy_seed_master_key(&self, version: u32) {
        let settings = crate::hsm::HsmSettings {
            module: self.config.hsm.module.clone(),
            token: self.config.token(),
            sessions: 1,
            queue_capacity: 4,
            seed_cache_capacity: 1,
        };
        let pin = self.config.user_pin().expect("user PIN");
        let hsm = tokio::task::spawn_blocking(move || crate::hsm::Hsm::open(&settings, pin))
            .await
            .expect("join")
            .expect("open the token");
        assert!(
            hsm.create_seed_master_key(version, false)
                .await
                .expect("legacy master key"),
            "seed master key {version} exists already"
        );
    }

    /// Start the service on 127.0.0.1:0.
    pub async fn start(&self) -> RunningServer {
        server::start(self.config.clone())
            .await
            .expect("server starts")
    }

    /// Start the service on `clock` (a [`crate::common::Clock::manual`] one moves time for
    /// expiry tests; TLS certificate checks keep the system clock).
    pub async fn start_with_clock(&self, clock: crate::common::Clock) -> RunningServer {
        server::start_with(self.config.clone(), StoreOptions::default(), clock)
            .await
            .expect("server starts")
    }

    /// Start the service with a credential store that does **not** fsync its
    /// commits. Benchmark only (measures the cost of durable group commit):
    /// a "successful" update can vanish on a crash, which re-opens replay of
    /// accepted OTPs. There is no config key for this; this test-support
    /// entry is the only way to reach it.
    #[doc(hidden)]
    pub async fn start_without_fsync_bench_only(&self) -> RunningServer {
        let options = StoreOptions {
            durable: false,
            ..StoreOptions::default()
        };
        server::start_with_store(self.config.clone(), options)
            .await
            .expect("server starts")
    }
}

impl Default for DevEnv {
    fn default() -> Self {
        DevEnv::new()
    }
}

/// `message` as a handler receives it once the role gate has let `identity` call
/// `method` (`service/method`): for driving the API handlers in process (the fuzz
/// targets), without a TLS connection. The handler still makes its own role check.
pub fn gated_request<T>(
    message: T,
    identity: crate::auth::Identity,
    method: &'static str,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .extensions_mut()
        .insert(crate::auth::GatedCaller { identity, method });
    request
}
