//! Start-up, serving and shutdown.
//!
//! Start-up checks everything that can be checked before the first request (TLS files,
//! that the server key matches its certificate, the token, the PIN) and fails with one
//! line that says what is wrong. Serving is mTLS only; health reports SERVING only while
//! the token's sessions are logged in. Shutdown stops accepting, lets in-flight calls
//! finish, then closes the HSM sessions.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_proto::v1::admin_service_server::AdminServiceServer;
use hsm_proto::v1::audit_service_server::AuditServiceServer;
use hsm_proto::v1::ceremony_service_server::CeremonyServiceServer;
use hsm_proto::v1::credential_service_server::CredentialServiceServer;
use hsm_proto::v1::event_service_server::EventServiceServer;
use hsm_proto::v1::key_service_server::KeyServiceServer;
use hsm_proto::v1::signing_service_server::SigningServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::api::audit::AuditApi;
use crate::api::ceremony::CeremonyApi;
use crate::api::signing::{Keys, Signing};
use crate::api::{admin::Admin, credentials::CredentialApi, AppState, State};
use crate::audit::log::AuditLog;
use crate::audit::{Actor, Details, Event};
use crate::auth::{Authorizer, RoleGateLayer};
use crate::config::{Config, TransportLimits};
use crate::credentials::Credentials;
use crate::hsm::{Hsm, HsmSettings};
use crate::store::{Store, StoreOptions};

mod accept;
mod metrics_http;
pub mod migrate;
mod oversize;
mod rpc_metrics;
mod timeout;
mod tls;

pub use tls::TlsConfigSource;

/// Why the service did not start. One line each, naming what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// TLS material is missing, unreadable or inconsistent.
    #[error("TLS: {0}")]
    Tls(String),
    /// The token could not be opened or logged in to.
    #[error("HSM: {0}")]
    Hsm(String),
    /// The durable store could not be opened.
    #[error("store: {0}")]
    Store(String),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The metrics listener (`metrics.listen`) could not be bound.
    #[error("cannot listen on {addr} (metrics.listen): {source}")]
    MetricsBind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Anything else at start.
    #[error("{0}")]
    Other(String),
}

/// A running server.
pub struct RunningServer {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    grace: Duration,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    state: State,
    tls: Arc<TlsConfigSource>,
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics endpoint's bound address (`None`: no endpoint).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shared state, for tests and benches in the same process.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Stop accepting, let in-flight calls finish, and wait.
    pub async fn shutdown(self) -> Result<(), String> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// Wait until the server stops (after [`RunningServer::shutdown`] or a fatal error).
    pub async fn wait(self) -> Result<(), String> {
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("server failed: {e}")),
            Err(e) => Err(format!("server task failed: {e}")),
        }
    }

    /// Re-read `server.client_crls` for every later handshake (what SIGHUP does). On a
    /// bad file the previous CRLs stay in force; either way one log line says so.
    pub fn reload_crls(&self) -> Result<usize, String> {
        reload_crls(&self.tls)
    }

    /// A sender that stops the server when `true` is sent.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Check the config's TLS files, open the token, bind, and serve in a background task.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    start_with_store(config, StoreOptions::default()).await
}

/// [`start`] with explicit store options. Crate-private: the only caller with
/// non-default options is [`crate::testing::DevEnv`] (the bench-only
/// no-fsync switch); no config key reaches it.
pub(crate) async fn start_with_store(
    config: Config,
    store_options: StoreOptions,
) -> Result<RunningServer, StartError> {
    start_with(config, store_options, crate::common::Clock::system()).await
}

/// [`start_with_store`] on `clock` (tests that move time: expiries). Crate-private, like
/// the store options: only [`crate::testing::DevEnv`] reaches it.
pub(crate) async fn start_with(
    config: Config,
    store_options: StoreOptions,
    clock: crate::common::Clock,
) -> Result<RunningServer, StartError> {
    let tls = Arc::new(TlsConfigSource::load(&config)?);
    let client_cas: Vec<Vec<u8>> = TlsConfigSource::client_cas(&config)?
        .iter()
        .map(|c| c.to_vec())
        .collect();
    let authorizer = Authorizer::new(config.clients.clone())
        .with_client_cas(&client_cas)
        .map_err(StartError::Tls)?;
    let pin = config.user_pin().map_err(StartError::Hsm)?;
    let settings = HsmSettings {
        module: config.hsm.module.clone(),
        token: config.token(),
        sessions: config.hsm.sessions,
        queue_capacity: config.hsm.queue_capacity,
        seed_cache_capacity: config.hsm.seed_cache_capacity,
    };
    let hsm = tokio::task::spawn_blocking(move || Hsm::open(&settings, pin))
        .await
        .map_err(|e| StartError::Other(format!("HSM start-up task failed: {e}")))?
        .map_err(|e| StartError::Hsm(hsm_start_message(&e)))?;
    tracing::info!(
        token = %hsm.facts().label,
        serial = %hsm.facts().serial_number,
        library = %hsm.facts().library,
        sessions = hsm.sessions(),
        "HSM token opened"
    );

    let store = Arc::new(open_store(&config, store_options).await?);
    let audit = AuditLog::open_chain(
        store.clone(),
        &config.store.audit_chain(),
        hsm.clone(),
        config.audit.checkpoint_interval,
        clock.clone(),
    )
    .await
    .map_err(|e| StartError::Hsm(format!("audit key: {e}")))?;
    let credentials = open_credentials(&config, &hsm, &store, clock.clone())
        .await?
        .with_audit(audit.clone());
    let signing = crate::signing::Signer::open(
        hsm.clone(),
        store.clone(),
        config.signing.clone(),
        clock.clone(),
        audit.clone(),
    )
    .await
    .map(Arc::new)
    .map_err(|e| StartError::Other(format!("signing keys: {e}")))?;
    let ceremonies = Arc::new(
        crate::ceremony::Ceremonies::new(
            signing.clone(),
            store.clone(),
            config.ceremony.clone(),
            &config.data_dir,
            clock.clone(),
        )
        .with_audit(audit.clone())
        .with_seed_master(credentials.seed_rotator()),
    );
    ceremonies
        .recover_interrupted()
        .await
        .map_err(|e| StartError::Store(format!("interrupted ceremonies: {e}")))?;

    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(format!("local address: {e}")))?;

    let metrics_listener = bind_metrics(&config).await?;
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(
            l.local_addr()
                .map_err(|e| StartError::Other(format!("metrics local address: {e}")))?,
        ),
        None => None,
    };

    let events = crate::events::Events::new(store.clone(), config.events.clone(), clock.clone());
    let _compaction = events.spawn_compaction();
    let devices = Arc::new(crate::devices::Devices::new(
        hsm.clone(),
        store.clone(),
        signing.clone(),
        config.devices.clone(),
        clock.clone(),
        audit.clone(),
    ));
    let state: State = Arc::new(AppState {
        hsm: hsm.clone(),
        store,
        credentials,
        clock: clock.clone(),
        audit: audit.clone(),
        authorizer: Arc::new(authorizer.with_audit(audit.clone())),
        started: Instant::now(),
        signing,
        ceremonies,
        events: events.clone(),
        devices,
        metrics_addr,
    });

    let start_event = Event::new(
        clock.now_ms(),
        Actor::service(),
        "service.start",
        "hsm-service",
    )
    .with_details(
        Details::new()
            .str("version", env!("CARGO_PKG_VERSION"))
            .str("token", &state.hsm.facts().label)
            .str("listen", &addr.to_string()),
    );
    audit
        .record(start_event)
        .await
        .map_err(|e| StartError::Store(format!("audit: {e}")))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hsm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Other(format!("reflection: {e}")))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // The first probe before the listener answers: a health check right after start
    // must see a status, not "service not registered".
    let health_interval = Duration::from_millis(config.server.health_interval_ms);
    let first = probe_health(&hsm, &state.store, health_interval, hsm.completed()).await;
    publish_health(&health, &state.store, first).await;
    tokio::spawn(monitor_health(
        hsm.clone(),
        state.store.clone(),
        health,
        health_interval,
        shutdown_rx.clone(),
        first.0,
    ));
    // Key versions another instance changes (a ceremony run there) reach this one
    // within a refresh period (see signing::signer).
    tokio::spawn(
        state
            .signing
            .clone()
            .watch(crate::signing::REFRESH_PERIOD, shutdown_rx.clone()),
    );

    let limits = &config.server.limits;
    let small = limits.max_request_bytes;
    let signing_size = limits.max_signing_request_bytes;
    let router = transport(limits)
        .layer(rpc_metrics::RpcMetricsLayer)
        .layer(oversize::OversizeStatusLayer)
        .layer(timeout::RequestTimeoutLayer::new(Duration::from_secs(
            limits.request_timeout_seconds,
        )))
        .layer(RoleGateLayer::new(state.authorizer.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            AdminServiceServer::new(Admin::new(state.clone())).max_decoding_message_size(small),
        )
        .add_service(
            AuditServiceServer::new(AuditApi::new(state.clone())).max_decoding_message_size(small),
        )
        .add_service(
            CredentialServiceServer::new(CredentialApi::new(state.clone()))
                .max_decoding_message_size(small),
        )
        .add_service(
            SigningServiceServer::new(Signing::new(state.clone()))
                .max_decoding_message_size(signing_size),
        )
        .add_service(
            KeyServiceServer::new(Keys::new(state.clone())).max_decoding_message_size(signing_size),
        )
        .add_service(
            hsm_proto::v1::device_service_server::DeviceServiceServer::new(
                crate::api::devices::DeviceApi::new(state.clone()),
            )
            .max_decoding_message_size(small),
        )
        .add_service(
            hsm_proto::v1::approval_service_server::ApprovalServiceServer::new(
                crate::api::devices::ApprovalApi::new(state.clone()),
            )
            .max_decoding_message_size(small),
        )
        .add_service(
            EventServiceServer::new(crate::api::events::EventApi::new(state.clone()))
                .max_decoding_message_size(small),
        )
        .add_service(
            CeremonyServiceServer::new(CeremonyApi::new(state.clone()))
                .max_decoding_message_size(limits.max_ceremony_request_bytes),
        );

    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let incoming = accept::incoming(
        listener,
        tls.clone(),
        accept::AcceptOptions {
            handshake_timeout: Duration::from_secs(limits.handshake_timeout_seconds),
            max_pending: limits.max_pending_handshakes,
        },
    );
    if let Some(listener) = metrics_listener {
        metrics_http::spawn(listener, shutdown_rx.clone());
    }
    let task = tokio::spawn(async move {
        let mut rx = shutdown_rx;
        let signal = async move {
            let _ = rx.wait_for(|stop| *stop).await;
            tracing::info!(
                grace_seconds = grace.as_secs(),
                "shutting down: finishing in-flight calls"
            );
        };
        let result = router.serve_with_incoming_shutdown(incoming, signal).await;
        // Close the HSM sessions (the pool joins its threads on drop) off the runtime.
        // The last records: the refusals still being counted, the stop, then a
        // checkpoint that covers everything.
        if let Err(e) = audit.flush_denied().await {
            tracing::error!(error = %e, "audit: cannot record refused calls");
        }
        let stop = Event::new(
            clock.now_ms(),
            Actor::service(),
            "service.stop",
            "hsm-service",
        );
        if let Err(e) = audit.record(stop).await {
            tracing::error!(error = %e, "audit: cannot record the stop");
        }
        if let Err(e) = audit.checkpoint().await {
            tracing::error!(error = %e, "audit: final checkpoint failed");
        }
        drop(audit);
        drop(hsm);
        result
    });
    tracing::info!(%addr, "serving gRPC over mutual TLS");
    if let Some(m) = metrics_addr {
        tracing::info!(addr = %m, "serving metrics at http://{m}{}", crate::metrics::PATH);
    }
    Ok(RunningServer {
        addr,
        metrics_addr,
        grace,
        shutdown: shutdown_tx,
        task,
        state,
        tls,
    })
}

/// The metrics listener of `metrics.listen`, if any. Dev mode's default address is
/// best effort: taken (another dev instance has it), the service starts without it.
async fn bind_metrics(config: &Config) -> Result<Option<TcpListener>, StartError> {
    let Some(addr) = config.metrics.listen else {
        return Ok(None);
    };
    match TcpListener::bind(addr).await {
        Ok(l) => {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the metrics endpoint is plain HTTP without authentication on a non-loopback address: restrict who can reach it");
            }
            Ok(Some(l))
        }
        Err(source) if config.metrics.best_effort => {
            tracing::warn!(%addr, error = %source, "dev mode: no metrics endpoint (its default address is taken; --metrics-listen moves it)");
            Ok(None)
        }
        Err(source) => Err(StartError::MetricsBind { addr, source }),
    }
}

/// The HTTP/2 server with the config's limits: tonic's defaults leave streams per
/// connection unbounded, the local reset-stream limit off, and no timeout, keepalive or
/// connection age at all.
fn transport(limits: &TransportLimits) -> tonic::transport::Server {
    let secs = Duration::from_secs;
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .concurrency_limit_per_connection(limits.max_concurrent_calls_per_connection)
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_reset_streams))
        .http2_max_local_error_reset_streams(Some(limits.max_local_reset_streams))
        .http2_keepalive_interval(Some(secs(limits.keepalive_interval_seconds)))
        .http2_keepalive_timeout(Some(secs(limits.keepalive_timeout_seconds)))
        .max_connection_age(secs(limits.max_connection_age_seconds))
        .max_connection_age_grace(secs(limits.max_connection_age_grace_seconds))
}

/// [`RunningServer::reload_crls`], logging the outcome in one line.
fn reload_crls(tls: &TlsConfigSource) -> Result<usize, String> {
    match tls.reload_crls() {
        Ok(count) => {
            tracing::info!(crls = count, "client CRLs reloaded");
            Ok(count)
        }
        Err(e) => {
            tracing::error!(error = %e, "client CRLs not reloaded; the previous ones stay in force");
            Err(e)
        }
    }
}

/// Serve until `signal` resolves, then shut down gracefully.
pub async fn run(
    config: Config,
    signal: impl Future<Output = ()>,
    on_ready: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<(), String> {
    let server = start(config).await.map_err(|e| e.to_string())?;
    on_ready(server.local_addr(), server.metrics_addr());
    let stop = server.shutdown_handle();
    let grace = server.grace;
    spawn_reload_on_sighup(server.tls.clone(), stop.subscribe())
        .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
    tokio::select! {
        () = signal => { let _ = stop.send(true); }
        _ = stop.closed() => {}
    }
    match tokio::time::timeout(grace, server.wait()).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                "in-flight calls did not finish in time; stopping anyway"
            );
            Ok(())
        }
    }
}

/// Reload the CRLs on each SIGHUP until the server stops.
fn spawn_reload_on_sighup(
    tls: Arc<TlsConfigSource>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                received = hangup.recv() => {
                    if received.is_none() {
                        return;
                    }
                    let _ = reload_crls(&tls);
                }
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
    Ok(())
}

/// The hsm.v1 services, as the health service names them.
pub const SERVICES: [&str; 6] = [
    "hsm.v1.AdminService",
    "hsm.v1.AuditService",
    "hsm.v1.CredentialService",
    "hsm.v1.SigningService",
    "hsm.v1.KeyService",
    "hsm.v1.CeremonyService",
];

/// Read the master key version from the store (1 on first start), make sure the key is
/// on the token, and build the credential service.
async fn open_credentials(
    config: &Config,
    hsm: &Hsm,
    store: &Arc<Store>,
    clock: crate::common::Clock,
) -> Result<Credentials<Store>, StartError> {
    use crate::credentials::MASTER_KEY_VERSION_META;
    let version = match store.get_meta(MASTER_KEY_VERSION_META).await {
        Ok(Some(bytes)) => {
            let arr: [u8; 4] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| StartError::Store(format!("{MASTER_KEY_VERSION_META} is corrupt")))?;
            u32::from_be_bytes(arr)
        }
        Ok(None) => {
            store
                .put_meta(MASTER_KEY_VERSION_META, 1u32.to_be_bytes().to_vec())
                .await
                .map_err(|e| StartError::Store(e.to_string()))?;
            1
        }
        Err(e) => return Err(StartError::Store(e.to_string())),
    };
    crate::credentials::ensure_master_key(hsm, store.as_ref(), version)
        .await
        .map_err(|e| StartError::Hsm(format!("seed master key: {e}")))?;
    // Before serving: after it, a record without a seed binding is refused.
    crate::credentials::binding::migrate(hsm, store, 500)
        .await
        .map_err(|e| StartError::Hsm(format!("seed bindings: {e}")))?;
    Ok(Credentials::new(
        hsm.clone(),
        store.clone(),
        config.credentials.clone(),
        version,
        clock,
    )
    .with_evidence_ttl(config.signing.evidence_ttl_seconds))
}

/// File name of the embedded store under the data directory.
pub const STORE_FILE: &str = crate::store::EMBEDDED_FILE;

/// Opens the store of `config` (the embedded one in its data directory, created if
/// missing), off the runtime's workers.
pub async fn open_store(config: &Config, options: StoreOptions) -> Result<Store, StartError> {
    if config.store.backend == crate::config::StoreBackendKind::Postgres {
        let pg = config.store.postgres_options().map_err(StartError::Store)?;
        return tokio::task::spawn_blocking(move || {
            let backend = crate::store::postgres::PgBackend::open(&pg)
                .map_err(|e| StartError::Store(format!("postgres: {e}")))?;
            tracing::info!(
                chain = backend.chain(),
                schema = crate::store::postgres::SCHEMA_VERSION,
                "store: PostgreSQL opened"
            );
            Store::with_backend(Arc::new(backend), options)
                .map_err(|e| StartError::Store(format!("postgres: {e}")))
        })
        .await
        .map_err(|e| StartError::Other(format!("store start-up task failed: {e}")))?;
    }
    let dir = config.data_dir.clone();
    let options = config.store.apply(options);
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| StartError::Store(format!("data_dir {}: {e}", dir.display())))?;
        let path = dir.join(STORE_FILE);
        Store::open_redb(&path, options)
            .map_err(|e| StartError::Store(format!("{}: {e}", path.display())))
    })
    .await
    .map_err(|e| StartError::Other(format!("store start-up task failed: {e}")))?
}

fn hsm_start_message(e: &crate::hsm::Error) -> String {
    use crate::hsm::ErrorKind;
    match e.kind() {
        ErrorKind::Authentication => format!("{e} (is the user PIN right?)"),
        _ => e.to_string(),
    }
}

/// Keep the health service in step with the token and the store: SERVING only while
/// the sessions are logged in and the store's engine answers (a PostgreSQL database can
/// become unreachable; the embedded file cannot). Looks every `interval`
/// (`server.health_interval_ms`); a token that does not answer within `interval` counts
/// as lost (see hsm/faults.rs, design note), so a hung HSM turns health NOT_SERVING
/// within two intervals.
async fn monitor_health(
    hsm: Hsm,
    store: Arc<Store>,
    health: tonic_health::server::HealthReporter,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    first: ServingStatus,
) {
    let mut last = first;
    let mut completed = hsm.completed();
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            changed = stop.changed() => changed.is_err() || *stop.borrow_and_update(),
        };
        if stopping {
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            return;
        }
        let probe = probe_health(&hsm, &store, interval, completed).await;
        completed = hsm.completed();
        if last != probe.0 {
            publish_health(&health, &store, probe).await;
            last = probe.0;
        }
    }
}

/// One health probe: the HSM answers within `interval` and the store is reachable.
async fn probe_health(
    hsm: &Hsm,
    store: &Store,
    interval: Duration,
    completed: u64,
) -> (ServingStatus, bool, bool) {
    let logged_in = hsm.serving(interval, completed).await;
    let store_up = store.healthy();
    let status = if logged_in && store_up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    (status, logged_in, store_up)
}

/// Sets every service's status, saying why when it is NOT_SERVING.
async fn publish_health(
    health: &tonic_health::server::HealthReporter,
    store: &Store,
    (status, logged_in, store_up): (ServingStatus, bool, bool),
) {
    if !logged_in {
        tracing::warn!("HSM sessions are not logged in: health NOT_SERVING");
    }
    if !store_up {
        tracing::warn!(
            backend = store.kind(),
            "store unreachable: health NOT_SERVING"
        );
    }
    health.set_service_status("", status).await;
    for name in SERVICES {
        health.set_service_status(name, status).await;
    }
}
