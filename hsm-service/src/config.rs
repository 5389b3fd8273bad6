//! The service configuration file (TOML).
//!
//! Every struct denies unknown keys: a typo in a security setting must stop the service,
//! not be ignored. Relative paths are relative to the directory of the config file, so a
//! data directory can be moved as a whole. `config.example.toml` documents every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::common::Role;

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the service keeps its state (store, audit log).
    pub data_dir: PathBuf,
    /// gRPC listener and TLS material.
    pub server: ServerConfig,
    /// The PKCS#11 module and token.
    pub hsm: HsmConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Verification policy.
    #[serde(default)]
    pub credentials: CredentialsConfig,
    /// Audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Where durable state lives: the embedded file (default) or PostgreSQL. Not written
    /// out when it is the default (a dev config keeps naming no store).
    #[serde(default, skip_serializing_if = "StoreConfig::is_default")]
    pub store: StoreConfig,
    /// Client certificate to role mapping; first match wins.
    #[serde(default, rename = "client")]
    pub clients: Vec<ClientRule>,
    /// Assertion signing: issuer, default key, lifetimes, accepted acr values.
    #[serde(default)]
    pub signing: SigningConfig,
    /// Key ceremonies: the officer quorum, approval expiry, validity cap, transcripts.
    #[serde(default)]
    pub ceremony: CeremonyConfig,
    /// The citizen-notification event stream: retention, watchers, heartbeats.
    #[serde(default)]
    pub events: EventsConfig,
    /// The app authenticator: activations, devices, challenges.
    #[serde(default)]
    pub devices: DevicesConfig,
    /// The Prometheus metrics endpoint (off unless `listen` is set; dev mode turns it
    /// on). Not written out when off.
    #[serde(default, skip_serializing_if = "MetricsConfig::is_off")]
    pub metrics: MetricsConfig,
}

/// Dev mode's metrics address (`hsm-service dev --metrics-listen` moves it).
pub const DEV_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// `[metrics]`: the Prometheus endpoint, `GET /metrics` on a listener of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address (IP and port) of the plain-HTTP listener; absent: no endpoint (the
    /// default of `hsm-service serve`). Nothing served there is secret, but keep it on
    /// loopback or a monitoring network.
    #[serde(
        default,
        deserialize_with = "metrics_listen",
        skip_serializing_if = "Option::is_none"
    )]
    pub listen: Option<SocketAddr>,
    /// Set by dev mode for its default address only: when that port is taken the service
    /// starts anyway, without metrics, and says so (several dev instances on one
    /// machine). Never from the file: a configured address that cannot be bound stops
    /// the start.
    #[serde(skip)]
    pub best_effort: bool,
}

impl MetricsConfig {
    fn is_off(&self) -> bool {
        self.listen.is_none()
    }

    /// Rules the schema cannot express: not the gRPC listener's address.
    pub fn validate(&self, server: &ServerConfig) -> Result<(), String> {
        match self.listen {
            Some(addr) if addr.port() != 0 && addr == server.listen => Err(format!(
                "metrics.listen ({addr}) must differ from server.listen: the metrics \
                 endpoint is plain HTTP on a listener of its own"
            )),
            _ => Ok(()),
        }
    }
}

/// `metrics.listen`: an IP address and a port, with a message that says so.
fn metrics_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "metrics.listen: {:?} is not an IP address and port (e.g. \"{DEV_METRICS_LISTEN}\"; \
             host names are not resolved)",
            text.chars().take(64).collect::<String>()
        ))
    })
}

/// `[devices]`: the app authenticator (DeviceService, ApprovalService).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// Seconds an activation code (and an approving ACTIVATE_DEVICE challenge) is good
    /// for, 60..=3600. Default 600.
    #[serde(default = "default_activation_ttl_seconds")]
    pub activation_ttl_seconds: u64,
    /// Active devices one subject may have, 1..=50. Default 5.
    #[serde(default = "default_max_devices_per_subject")]
    pub max_devices_per_subject: u32,
    /// Challenges one subject may be sent per minute (push fatigue), 1..=1000.
    /// Default 10.
    #[serde(default = "default_max_challenges_per_minute")]
    pub max_challenges_per_minute: u32,
    /// A NOT_ME answer suspends the subject's approvals for `report_suspend_seconds`.
    /// Default true.
    #[serde(default = "default_true")]
    pub suspend_on_report: bool,
    /// Seconds of that suspension, 1..=86400. Default 900.
    #[serde(default = "default_report_suspend_seconds")]
    pub report_suspend_seconds: u64,
    /// Wrong binding codes (each cancels its challenge) within `binding_lockout_seconds`
    /// after which the subject's approvals are locked for `binding_lockout_seconds`,
    /// 1..=100. Default 5.
    #[serde(default = "default_max_binding_failures")]
    pub max_binding_failures: u32,
    /// The window and the lock of `max_binding_failures`, 1..=86400. Default 900.
    #[serde(default = "default_binding_lockout_seconds")]
    pub binding_lockout_seconds: u64,
}

fn default_activation_ttl_seconds() -> u64 {
    600
}
fn default_max_devices_per_subject() -> u32 {
    5
}
fn default_max_challenges_per_minute() -> u32 {
    10
}
fn default_true() -> bool {
    true
}
fn default_report_suspend_seconds() -> u64 {
    900
}
fn default_max_binding_failures() -> u32 {
    5
}
fn default_binding_lockout_seconds() -> u64 {
    900
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            activation_ttl_seconds: default_activation_ttl_seconds(),
            max_devices_per_subject: default_max_devices_per_subject(),
            max_challenges_per_minute: default_max_challenges_per_minute(),
            suspend_on_report: true,
            report_suspend_seconds: default_report_suspend_seconds(),
            max_binding_failures: default_max_binding_failures(),
            binding_lockout_seconds: default_binding_lockout_seconds(),
        }
    }
}

impl DevicesConfig {
    /// Bounds of every setting of `[devices]`.
    pub fn validate(&self) -> Result<(), String> {
        check_bounds(&[
            (
                "devices.activation_ttl_seconds",
                self.activation_ttl_seconds,
                60,
                3600,
            ),
            (
                "devices.max_devices_per_subject",
                u64::from(self.max_devices_per_subject),
                1,
                50,
            ),
            (
                "devices.max_challenges_per_minute",
                u64::from(self.max_challenges_per_minute),
                1,
                1000,
            ),
            (
                "devices.report_suspend_seconds",
                self.report_suspend_seconds,
                1,
                DAY,
            ),
            (
                "devices.max_binding_failures",
                u64::from(self.max_binding_failures),
                1,
                100,
            ),
            (
                "devices.binding_lockout_seconds",
                self.binding_lockout_seconds,
                1,
                DAY,
            ),
        ])
    }
}

/// `[events]`: the event outbox's retention and its readers' limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Events older than this many days are compacted away. Default 30.
    #[serde(default = "default_retention_days")]
    pub retention_days: u64,
    /// At most this many events are kept (the oldest go first). Default 10,000,000.
    #[serde(default = "default_max_events")]
    pub max_events: u64,
    /// Open WatchEvents streams allowed at once; beyond: RESOURCE_EXHAUSTED. Default 1024.
    #[serde(default = "default_max_watchers")]
    pub max_watchers: u64,
    /// A following watch sends a heartbeat (a batch without events) at least this often.
    /// Default 15.
    #[serde(default = "default_heartbeat_seconds")]
    pub heartbeat_seconds: u64,
    /// How often (milliseconds) a following watch polls the head for commits of other
    /// instances (local commits wake it at once). Default 250.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// How often (seconds) the background compaction runs. Default 60.
    #[serde(default = "default_compact_interval_seconds")]
    pub compact_interval_seconds: u64,
}

fn default_retention_days() -> u64 {
    30
}
fn default_max_events() -> u64 {
    10_000_000
}
fn default_max_watchers() -> u64 {
    1024
}
fn default_heartbeat_seconds() -> u64 {
    15
}
fn default_poll_ms() -> u64 {
    250
}
fn default_compact_interval_seconds() -> u64 {
    60
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention_days: default_retention_days(),
            max_events: default_max_events(),
            max_watchers: default_max_watchers(),
            heartbeat_seconds: default_heartbeat_seconds(),
            poll_ms: default_poll_ms(),
            compact_interval_seconds: default_compact_interval_seconds(),
        }
    }
}

impl EventsConfig {
    /// Bounds of every setting of `[events]`.
    pub fn validate(&self) -> Result<(), String> {
        check_bounds(&[
            ("events.retention_days", self.retention_days, 1, 3650),
            ("events.max_events", self.max_events, 1, 1 << 40),
            ("events.max_watchers", self.max_watchers, 1, 100_000),
            ("events.heartbeat_seconds", self.heartbeat_seconds, 1, 3600),
            ("events.poll_ms", self.poll_ms, 10, 60_000),
            (
                "events.compact_interval_seconds",
                self.compact_interval_seconds,
                1,
                DAY,
            ),
        ])
    }
}

/// Listener and TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Server certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Server private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// Seconds that in-flight calls get to finish after SIGTERM.
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// Certificate revocation lists (PEM or DER files) of the client CAs; re-read on
    /// SIGHUP. Empty: no revocation check.
    #[serde(default)]
    pub client_crls: Vec<PathBuf>,
    /// HTTP/2, timeouts and decode limits.
    #[serde(default)]
    pub limits: TransportLimits,
    /// Milliseconds between two looks of the health monitor at the token and the store
    /// (how soon health turns NOT_SERVING, and SERVING again). 100..60000.
    #[serde(default = "default_health_interval")]
    pub health_interval_ms: u64,
}

fn default_grace() -> u64 {
    30
}

/// [`ServerConfig::health_interval_ms`] unless configured.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 5000;

fn default_health_interval() -> u64 {
    DEFAULT_HEALTH_INTERVAL_MS
}

/// Transport limits (`[server.limits]`): what one connection or one call may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportLimits {
    /// Seconds a TLS handshake may take; slower ones are dropped.
    pub handshake_timeout_seconds: u64,
    /// TLS handshakes in progress at once; further connections wait to be accepted.
    pub max_pending_handshakes: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls one connection may have open.
    pub max_concurrent_streams: u32,
    /// Calls of one connection that run at once; the others of its open streams wait.
    pub max_concurrent_calls_per_connection: usize,
    /// Streams a client may reset before they are accepted before the connection gets
    /// a GOAWAY (h2's rapid-reset protection).
    pub max_pending_reset_streams: usize,
    /// Streams the server may reset for protocol errors on one connection before it
    /// closes it.
    pub max_local_reset_streams: usize,
    /// Seconds a call may take (ExecuteCeremony exempt); a client's shorter
    /// `grpc-timeout` wins.
    pub request_timeout_seconds: u64,
    /// Seconds between HTTP/2 keepalive pings on an idle connection.
    pub keepalive_interval_seconds: u64,
    /// Seconds a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout_seconds: u64,
    /// Seconds after which a connection is asked to close (GOAWAY); clients reconnect.
    pub max_connection_age_seconds: u64,
    /// Seconds a connection past its age gets to finish its calls before it is closed.
    pub max_connection_age_grace_seconds: u64,
    /// Largest request message of CredentialService, AdminService and AuditService, in
    /// bytes.
    pub max_request_bytes: usize,
    /// Largest request message of SigningService and KeyService (claims, messages to
    /// sign, CSRs), in bytes.
    pub max_signing_request_bytes: usize,
    /// Largest request message of CeremonyService (plans, shares), in bytes.
    pub max_ceremony_request_bytes: usize,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            handshake_timeout_seconds: 10,
            max_pending_handshakes: 256,
            max_concurrent_streams: 128,
            max_concurrent_calls_per_connection: 32,
            max_pending_reset_streams: 20,
            max_local_reset_streams: 1024,
            request_timeout_seconds: 30,
            keepalive_interval_seconds: 60,
            keepalive_timeout_seconds: 20,
            max_connection_age_seconds: 3600,
            max_connection_age_grace_seconds: 60,
            max_request_bytes: 4 * 1024,
            max_signing_request_bytes: 64 * 1024,
            max_ceremony_request_bytes: 256 * 1024,
        }
    }
}

/// `(key, value, lowest, highest)`: a bounded setting, checked by [`check_bounds`].
type Bound<'a> = (&'a str, u64, u64, u64);

/// Every bound in `bounds`, with one message naming the key and its range.
fn check_bounds(bounds: &[Bound<'_>]) -> Result<(), String> {
    for &(key, value, low, high) in bounds {
        if value < low || value > high {
            return Err(format!(
                "{key} must be between {low} and {high} (is {value})"
            ));
        }
    }
    Ok(())
}

/// One day, in seconds: the upper bound of most durations.
const DAY: u64 = 86_400;

impl TransportLimits {
    /// Lower and upper bounds of every limit.
    pub fn validate(&self) -> Result<(), String> {
        let l = self;
        check_bounds(&[
            (
                "server.limits.handshake_timeout_seconds",
                l.handshake_timeout_seconds,
                1,
                60,
            ),
            (
                "server.limits.max_pending_handshakes",
                l.max_pending_handshakes as u64,
                1,
                65_536,
            ),
            (
                "server.limits.max_concurrent_streams",
                u64::from(l.max_concurrent_streams),
                1,
                1024,
            ),
            (
                "server.limits.max_concurrent_calls_per_connection",
                l.max_concurrent_calls_per_connection as u64,
                1,
                u64::from(l.max_concurrent_streams),
            ),
            (
                "server.limits.max_pending_reset_streams",
                l.max_pending_reset_streams as u64,
                1,
                1000,
            ),
            (
                "server.limits.max_local_reset_streams",
                l.max_local_reset_streams as u64,
                1,
                10_000,
            ),
            (
                "server.limits.request_timeout_seconds",
                l.request_timeout_seconds,
                1,
                600,
            ),
            (
                "server.limits.keepalive_interval_seconds",
                l.keepalive_interval_seconds,
                1,
                3600,
            ),
            (
                "server.limits.keepalive_timeout_seconds",
                l.keepalive_timeout_seconds,
                1,
                300,
            ),
            (
                "server.limits.max_connection_age_seconds",
                l.max_connection_age_seconds,
                60,
                7 * DAY,
            ),
            (
                "server.limits.max_connection_age_grace_seconds",
                l.max_connection_age_grace_seconds,
                1,
                3600,
            ),
            (
                "server.limits.max_request_bytes",
                l.max_request_bytes as u64,
                1024,
                1 << 20,
            ),
            (
                "server.limits.max_signing_request_bytes",
                l.max_signing_request_bytes as u64,
                4 * 1024,
                2 << 20,
            ),
            (
                "server.limits.max_ceremony_request_bytes",
                l.max_ceremony_request_bytes as u64,
                64 * 1024,
                16 << 20,
            ),
        ])
    }
}

/// PKCS#11 module, token and session pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// Path of the PKCS#11 library.
    pub module: PathBuf,
    /// Token label (exactly one of `token_label`, `token_serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_label: Option<String>,
    /// Token serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_serial: Option<String>,
    /// File holding the user PIN (exactly one of `user_pin_file`, `user_pin_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_pin_env: Option<String>,
    /// Logged-in sessions, each on its own thread.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// Requests that may wait for a session; beyond it callers get RESOURCE_EXHAUSTED.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Unwrapped seeds kept in the HSM as session objects for fast verification.
    #[serde(default = "default_seed_cache")]
    pub seed_cache_capacity: usize,
    /// SoftHSM only: the softhsm2.conf to use (sets SOFTHSM2_CONF before loading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softhsm2_conf: Option<PathBuf>,
    /// kryoptic only: the kryoptic.conf to use (sets KRYOPTIC_CONF before loading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kryoptic_conf: Option<PathBuf>,
}

fn default_sessions() -> usize {
    4
}

fn default_queue() -> usize {
    4096
}

fn default_seed_cache() -> usize {
    100_000
}

/// The audit trail.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Records between two checkpoints signed by the audit key in the HSM.
    pub checkpoint_interval: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_interval: 1000,
        }
    }
}

/// The storage engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackendKind {
    /// One embedded file (redb) in `data_dir`: nothing to install, one instance.
    #[default]
    Redb,
    /// A PostgreSQL database several instances share.
    Postgres,
}

/// `[store]`: where durable state lives. `cache_mib` is for the embedded store only; every
/// other key but `backend` is for PostgreSQL only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `redb` (default) or `postgres`.
    pub backend: StoreBackendKind,
    /// Embedded store only: its page cache in MiB (heap; it fills up to this and stays
    /// there). 16..65536, default 512: more than the whole file at a million credentials.
    pub cache_mib: u32,
    /// Connection URL without a password, e.g. `postgresql://hsm@db.example:5432/hsm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// File holding the database password (surrounding whitespace is not part of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Connections of the read pool (the committer has one more). 1..256, default 8.
    pub pool_size: u32,
    /// CA certificate(s), PEM, of the database server: TLS (verified) when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Longest a statement may run, a lock wait included. 100..600000, default 5000.
    pub statement_timeout_ms: u64,
    /// Longest a connection attempt, or a wait for a pooled connection, may take before
    /// the database counts as unreachable. 100..60000, default 5000.
    pub connect_timeout_ms: u64,
    /// This instance's name: its audit chain. Unique per running instance; default the
    /// host name (or `default` when it is not a valid name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackendKind::Redb,
            cache_mib: DEFAULT_STORE_CACHE_MIB,
            url: None,
            password_file: None,
            pool_size: 8,
            ca_file: None,
            statement_timeout_ms: 5000,
            connect_timeout_ms: 5000,
            instance: None,
        }
    }
}

/// `store.cache_mib` unless set: [`crate::store::StoreOptions`]'s default page cache.
const DEFAULT_STORE_CACHE_MIB: u32 = 512;

impl StoreConfig {
    /// `options` with this section's embedded-store settings applied.
    pub fn apply(&self, mut options: crate::store::StoreOptions) -> crate::store::StoreOptions {
        options.cache_size_bytes = (self.cache_mib as usize) << 20;
        options
    }

    fn is_default(&self) -> bool {
        *self == StoreConfig::default()
    }

    /// Checks the section (files are checked for existence by [`Config::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        match self.backend {
            StoreBackendKind::Redb => {
                let stray = [
                    ("url", self.url.is_some()),
                    ("password_file", self.password_file.is_some()),
                    ("ca_file", self.ca_file.is_some()),
                    ("instance", self.instance.is_some()),
                ];
                if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "store.{key} is set but store.backend is \"redb\" (set backend = \"postgres\")"
                    ));
                }
                check_bounds(&[("store.cache_mib", u64::from(self.cache_mib), 16, 65_536)])
            }
            StoreBackendKind::Postgres => {
                let url = self
                    .url
                    .as_deref()
                    .ok_or("store.backend = \"postgres\" needs store.url")?;
                crate::store::postgres::check_url(url)?;
                if self.cache_mib != DEFAULT_STORE_CACHE_MIB {
                    return Err(
                        "store.cache_mib is for the embedded store (backend = \"redb\"); PostgreSQL caches in the database server".into(),
                    );
                }
                check_bounds(&[
                    ("store.pool_size", u64::from(self.pool_size), 1, 256),
                    (
                        "store.statement_timeout_ms",
                        self.statement_timeout_ms,
                        100,
                        600_000,
                    ),
                    (
                        "store.connect_timeout_ms",
                        self.connect_timeout_ms,
                        100,
                        60_000,
                    ),
                ])?;
                if let Some(name) = &self.instance {
                    crate::store::postgres::check_instance(name)?;
                }
                Ok(())
            }
        }
    }

    /// The instance (audit chain) name: `instance`, else the host name when it is a
    /// valid name, else `default`.
    pub fn instance_name(&self) -> String {
        if let Some(name) = &self.instance {
            return name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let host = host.trim();
        if crate::store::postgres::check_instance(host).is_ok() {
            host.to_owned()
        } else {
            crate::store::uow::DEFAULT_CHAIN.to_owned()
        }
    }

    /// The audit chain this instance appends to: [`crate::store::DEFAULT_CHAIN`] in the
    /// embedded store (one instance), the instance name in PostgreSQL.
    pub fn audit_chain(&self) -> String {
        match self.backend {
            StoreBackendKind::Redb => crate::store::uow::DEFAULT_CHAIN.to_owned(),
            StoreBackendKind::Postgres => self.instance_name(),
        }
    }

    /// The PostgreSQL options this section describes (reads the password file).
    pub fn postgres_options(&self) -> Result<crate::store::postgres::PgOptions, String> {
        let url = self.url.clone().ok_or("store.url is not set")?;
        let mut o = crate::store::postgres::PgOptions::new(url, self.instance_name());
        if let Some(file) = &self.password_file {
            let raw = zeroize::Zeroizing::new(
                std::fs::read_to_string(file)
                    .map_err(|e| format!("store.password_file {}: {e}", file.display()))?,
            );
            let password = raw.trim();
            if password.is_empty() {
                return Err(format!("store.password_file {} is empty", file.display()));
            }
            o.password = Some(secrecy::SecretString::from(password.to_owned()));
        }
        o.pool_size = self.pool_size;
        o.ca_file = self.ca_file.clone();
        o.statement_timeout = std::time::Duration::from_millis(self.statement_timeout_ms);
        o.connect_timeout = std::time::Duration::from_millis(self.connect_timeout_ms);
        Ok(o)
    }
}

/// Highest lockout thresholds: NIST SP 800-63B §5.2.2 allows at most 100 consecutive
/// failed attempts on one account.
pub const MAX_FAILURE_THRESHOLD: u32 = 100;

/// Longest failure window: 30 days.
pub const MAX_FAILURE_WINDOW_SECONDS: u32 = 30 * 86_400;

/// Verification policy of HOTP/TOTP credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialsConfig {
    /// TOTP: steps accepted either side of the current one.
    pub totp_window: u32,
    /// HOTP: counters looked ahead of the expected one.
    pub hotp_look_ahead: u32,
    /// Seconds a failed verification counts towards a lock; older ones are forgotten.
    pub failure_window_seconds: u32,
    /// Failures (inside the window, since the last success) at which the credential
    /// locks with back-off.
    pub lockout_threshold: u32,
    /// Failures inside the window at which it stays locked until an officer unlocks
    /// it; 0 (the default) turns the hard lock off.
    pub hard_lockout_threshold: u32,
    /// Back-off of the first lock in seconds; doubles with each further failure.
    pub base_backoff_seconds: u32,
    /// Longest back-off in seconds.
    pub max_backoff_seconds: u32,
    /// HOTP resync: counters searched ahead for two consecutive codes.
    pub resync_hotp_look_ahead: u32,
    /// TOTP resync: steps searched either side of the current one.
    pub resync_totp_window: u32,
    /// TOTP epoch T0 in unix seconds.
    pub totp_t0: u64,
    /// Issuer put in provisioning URIs when a request gives none.
    pub default_issuer: String,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        CredentialsConfig {
            totp_window: 1,
            hotp_look_ahead: 10,
            failure_window_seconds: 86_400,
            lockout_threshold: 5,
            hard_lockout_threshold: 0,
            base_backoff_seconds: 30,
            max_backoff_seconds: 86_400,
            resync_hotp_look_ahead: 1000,
            resync_totp_window: 10,
            totp_t0: 0,
            default_issuer: String::new(),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `hsm_service=debug` (RUST_LOG wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Maps a verified client certificate to a role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRule {
    /// Match the subject common name exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cn: Option<String>,
    /// Match a URI subject alternative name exactly (e.g. a SPIFFE id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The role granted.
    pub role: Role,
    /// Signing keys (by name) this client may sign with. Absent: only
    /// `signing.default_key` and `signing.default_raw_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_keys: Option<Vec<String>>,
    /// `acr` values this client may put in assertions; each must be a
    /// `[[signing.acr]]` value or one of `signing.acr_values`. Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<Vec<String>>,
    /// The tenant whose credentials this client sees and acts on (login services).
    /// Absent: the rule's `cn` or `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// May sign assertions without `evidence_id`, taking `acr`, `amr` and `auth_time`
    /// on the caller's word (the behaviour before evidence existed). Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unbound_assertions: bool,
    /// SHA-256 (64 hex digits) of the CA certificate in `server.client_ca` that must have
    /// issued the client certificate. Absent: any of the client CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_fingerprint: Option<String>,
}

/// Whether `fp` is a SHA-256 fingerprint as the config writes them: 64 hex digits.
pub fn is_fingerprint(fp: &str) -> bool {
    fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ClientRule {
    /// The rule's tenant: `tenant`, else its `cn`, else its `uri`.
    pub fn tenant(&self) -> &str {
        self.tenant
            .as_deref()
            .or(self.cn.as_deref())
            .or(self.uri.as_deref())
            .unwrap_or_default()
    }

    /// How messages name the rule, e.g. `[[client]] cn = "login-service"`.
    pub fn describe(&self) -> String {
        match (&self.cn, &self.uri) {
            (Some(cn), _) => format!("[[client]] cn = {cn:?}"),
            (None, Some(uri)) => format!("[[client]] uri = {uri:?}"),
            (None, None) => "[[client]] (no cn, no uri)".to_owned(),
        }
    }
}

/// Which evidence reaches an `acr` value (`[[signing.acr]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcrRule {
    /// The `acr` value, e.g. `https://data.gov.dk/concept/core/nsis/Substantial`.
    pub value: String,
    /// Evidence methods (e.g. `"otp"`) that reach it; empty: none yet, so an assertion
    /// with evidence is refused this value.
    #[serde(default)]
    pub evidence: Vec<String>,
}

/// Longest `[signing] evidence_ttl_seconds`.
pub const MAX_EVIDENCE_TTL_SECONDS: u64 = 900;

/// Evidence lifetime when none is configured, in seconds.
pub const DEFAULT_EVIDENCE_TTL_SECONDS: u64 = 120;

/// Assertion signing (`[signing]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// The `iss` claim of every assertion. Empty: SignAssertion is refused.
    #[serde(default)]
    pub issuer: String,
    /// Key used when a SignAssertion request names none (usage `signing`).
    #[serde(default = "default_signing_key")]
    pub default_key: String,
    /// Key used when a Sign request names none (usage `raw`).
    #[serde(default = "default_raw_key")]
    pub default_raw_key: String,
    /// Key that signs app challenges (usage `challenge`, ES256). Default "challenges".
    #[serde(default = "default_challenge_key")]
    pub default_challenge_key: String,
    /// Lifetime of an assertion whose request gives none, in seconds.
    #[serde(default = "default_ttl")]
    pub default_ttl_seconds: u32,
    /// Longest lifetime a request may ask for, in seconds.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_seconds: u32,
    /// Deprecated: `acr` values accepted in unbound assertions only (clients with
    /// `unbound_assertions = true`), no evidence reaches them. Use `[[signing.acr]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acr_values: Vec<String>,
    /// `acr` values and the evidence methods that reach each (`[[signing.acr]]`).
    #[serde(default, rename = "acr", skip_serializing_if = "Vec::is_empty")]
    pub acr: Vec<AcrRule>,
    /// Seconds an evidence (an accepted code) may be cited by SignAssertion, 1..=900.
    #[serde(default = "default_evidence_ttl")]
    pub evidence_ttl_seconds: u64,
    /// Oldest `auth_time` accepted, in seconds before now.
    #[serde(default = "default_max_auth_age")]
    pub max_auth_age_seconds: u64,
    /// Dev and tests: create `default_key` (ES256, usage `signing`),
    /// `default_raw_key` (ES256, usage `raw`) and `default_challenge_key` (ES256, usage
    /// `challenge`) and make them active at start when they have no version yet. Production keys come from key ceremonies.
    #[serde(default)]
    pub bootstrap_default_key: bool,
}

fn default_signing_key() -> String {
    "assertion".to_owned()
}

fn default_raw_key() -> String {
    "documents".to_owned()
}

fn default_challenge_key() -> String {
    "challenges".to_owned()
}

fn default_ttl() -> u32 {
    300
}

fn default_max_ttl() -> u32 {
    3600
}

fn default_max_auth_age() -> u64 {
    86_400
}

fn default_evidence_ttl() -> u64 {
    DEFAULT_EVIDENCE_TTL_SECONDS
}
/// The longest `signing.max_auth_age_seconds` (30 days): `auth_time` arithmetic stays
/// far from overflow and an assertion never vouches for a month-old login.
pub const MAX_AUTH_AGE_SECONDS: u64 = 30 * DAY;

impl Default for SigningConfig {
    fn default() -> Self {
        SigningConfig {
            issuer: String::new(),
            default_key: default_signing_key(),
            default_raw_key: default_raw_key(),
            default_challenge_key: default_challenge_key(),
            default_ttl_seconds: default_ttl(),
            max_ttl_seconds: default_max_ttl(),
            acr_values: Vec::new(),
            acr: Vec::new(),
            evidence_ttl_seconds: default_evidence_ttl(),
            max_auth_age_seconds: default_max_auth_age(),
            bootstrap_default_key: false,
        }
    }
}

impl SigningConfig {
    /// Whether `acr` is accepted at all (a `[[signing.acr]]` value or a deprecated
    /// `acr_values` entry).
    pub fn accepts_acr(&self, acr: &str) -> bool {
        self.acr.iter().any(|r| r.value == acr) || self.acr_values.iter().any(|v| v == acr)
    }

    /// Every accepted `acr` value, `[[signing.acr]]` first.
    pub fn accepted_acr(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.acr.iter().map(|r| r.value.as_str()).collect();
        for v in &self.acr_values {
            if !out.contains(&v.as_str()) {
                out.push(v);
            }
        }
        out
    }

    /// Whether evidence of `method` reaches `acr` (`[[signing.acr]]` only).
    pub fn evidence_reaches(&self, acr: &str, method: crate::common::AuthMethod) -> bool {
        self.acr
            .iter()
            .any(|r| r.value == acr && r.evidence.iter().any(|m| m == method.as_str()))
    }

    /// Consistency checks of `[signing]` and of the clients' signing grants.
    pub fn validate(&self, clients: &[ClientRule]) -> Result<(), String> {
        if !crate::common::valid_key_name(&self.default_key) {
            return Err(format!(
                "signing.default_key {:?}: {}",
                self.default_key,
                crate::common::KEY_NAME_RULE
            ));
        }
        if !crate::common::valid_key_name(&self.default_raw_key) {
            return Err(format!(
                "signing.default_raw_key {:?}: {}",
                self.default_raw_key,
                crate::common::KEY_NAME_RULE
            ));
        }
        if !crate::common::valid_key_name(&self.default_challenge_key) {
            return Err(format!(
                "signing.default_challenge_key {:?}: {}",
                self.default_challenge_key,
                crate::common::KEY_NAME_RULE
            ));
        }
        if self.default_challenge_key == self.default_key
            || self.default_challenge_key == self.default_raw_key
        {
            return Err(format!(
                "signing.default_challenge_key {:?} is another default key: a key signs for one usage only",
                self.default_challenge_key
            ));
        }
        if self.default_raw_key == self.default_key {
            return Err(format!(
                "signing.default_raw_key {:?} is signing.default_key: a key signs for one usage only",
                self.default_raw_key
            ));
        }
        if self.default_ttl_seconds == 0 || self.default_ttl_seconds > self.max_ttl_seconds {
            return Err(
                "signing.default_ttl_seconds must be between 1 and signing.max_ttl_seconds".into(),
            );
        }
        check_bounds(&[
            (
                "signing.max_ttl_seconds",
                u64::from(self.max_ttl_seconds),
                1,
                DAY,
            ),
            (
                "signing.max_auth_age_seconds",
                self.max_auth_age_seconds,
                1,
                MAX_AUTH_AGE_SECONDS,
            ),
        ])?;
        if self.acr_values.iter().any(String::is_empty) {
            return Err("signing.acr_values must not contain an empty value".into());
        }
        for (i, rule) in self.acr.iter().enumerate() {
            if rule.value.is_empty() {
                return Err(format!("signing.acr[{i}].value must not be empty"));
            }
            if self.acr[..i].iter().any(|r| r.value == rule.value) {
                return Err(format!(
                    "signing.acr[{i}].value {:?} is listed twice",
                    rule.value
                ));
            }
            for m in &rule.evidence {
                if crate::common::AuthMethod::parse(m).is_none() {
                    let known: Vec<&str> = crate::common::AuthMethod::ALL
                        .iter()
                        .map(|m| m.as_str())
                        .collect();
                    return Err(format!(
                        "signing.acr[{i}].evidence {m:?} is not an evidence method (known: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        if self.evidence_ttl_seconds == 0 || self.evidence_ttl_seconds > MAX_EVIDENCE_TTL_SECONDS {
            return Err(format!(
                "signing.evidence_ttl_seconds must be between 1 and {MAX_EVIDENCE_TTL_SECONDS}"
            ));
        }
        for (i, rule) in clients.iter().enumerate() {
            for key in rule.signing_keys.iter().flatten() {
                if !crate::common::valid_key_name(key) {
                    return Err(format!(
                        "client[{i}].signing_keys {key:?}: {}",
                        crate::common::KEY_NAME_RULE
                    ));
                }
            }
            for acr in rule.acr.iter().flatten() {
                if !self.accepts_acr(acr) {
                    return Err(format!(
                        "client[{i}].acr {acr:?} is neither a [[signing.acr]] value nor one of signing.acr_values"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One member of the ceremony officer set (`[[ceremony.officer]]`): matched on exactly
/// one of the subject common name or the SHA-256 fingerprint of the client certificate.
/// The caller must also hold the `officer` role through a `[[client]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfficerRule {
    /// The subject common name, exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cn: Option<String>,
    /// SHA-256 of the certificate DER, 64 hex digits (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// Key ceremonies (`[ceremony]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeremonyConfig {
    /// The officers whose approvals count. Empty: ceremonies are refused.
    #[serde(default, rename = "officer")]
    pub officers: Vec<OfficerRule>,
    /// M: distinct, unexpired officer approvals a ceremony needs before it may run. At
    /// least 2 in `serve` mode (see [`CeremonyConfig::validate_for_serve`]).
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    /// Whether the proposer's own approval counts towards M. With false, M other
    /// officers must approve (the proposer's approval is recorded but not counted).
    #[serde(default = "default_proposer_counts")]
    pub proposer_counts: bool,
    /// Seconds an approval counts after it was given.
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl_seconds: u64,
    /// Longest certificate validity a plan may ask for, in days.
    #[serde(default = "default_max_validity_days")]
    pub max_validity_days: u32,
    /// Where transcripts are written; relative paths are under `data_dir`.
    #[serde(default = "default_transcript_dir")]
    pub transcript_dir: PathBuf,
    /// Where `backup` steps write and `restore` steps read backup files; relative paths
    /// are under `data_dir`.
    #[serde(default = "default_backup_dir")]
    pub backup_dir: PathBuf,
}

fn default_threshold() -> u32 {
    2
}

fn default_proposer_counts() -> bool {
    true
}

fn default_approval_ttl() -> u64 {
    86_400
}

fn default_max_validity_days() -> u32 {
    3660
}

fn default_transcript_dir() -> PathBuf {
    PathBuf::from("ceremonies")
}

fn default_backup_dir() -> PathBuf {
    PathBuf::from("backups")
}

/// The longest certificate validity the service issues at all (20 years).
pub const MAX_CERTIFICATE_VALIDITY_DAYS: u32 = 20 * 366;

impl Default for CeremonyConfig {
    fn default() -> Self {
        CeremonyConfig {
            officers: Vec::new(),
            threshold: default_threshold(),
            proposer_counts: default_proposer_counts(),
            approval_ttl_seconds: default_approval_ttl(),
            max_validity_days: default_max_validity_days(),
            transcript_dir: default_transcript_dir(),
            backup_dir: default_backup_dir(),
        }
    }
}

impl CeremonyConfig {
    /// The rules of `[ceremony]` for `hsm-service serve` on top of [`Self::validate`]: a
    /// ceremony needs at least two officers (`threshold >= 2`), so no single person can
    /// generate, activate or destroy a long-term key. Dev mode keeps its own config.
    pub fn validate_for_serve(&self) -> Result<(), String> {
        if self.threshold < 2 {
            return Err(format!(
                "ceremony.threshold is {}; `serve` needs at least 2 (no single officer runs a \
                 key ceremony)",
                self.threshold
            ));
        }
        Ok(())
    }

    /// Consistency checks of `[ceremony]`.
    pub fn validate(&self) -> Result<(), String> {
        for (i, o) in self.officers.iter().enumerate() {
            match (&o.cn, &o.fingerprint) {
                (Some(cn), None) if !cn.is_empty() => {}
                (None, Some(fp)) if is_fingerprint(fp) => {}
                (None, Some(_)) => {
                    return Err(format!(
                        "ceremony.officer[{i}].fingerprint must be 64 hex digits (SHA-256 of the certificate DER)"
                    ))
                }
                _ => {
                    return Err(format!(
                        "ceremony.officer[{i}]: set exactly one of cn and fingerprint"
                    ))
                }
            }
        }
        if !self.officers.is_empty()
            && (self.threshold == 0 || self.threshold as usize > self.officers.len())
        {
            return Err(format!(
                "ceremony.threshold must be between 1 and the number of officers ({})",
                self.officers.len()
            ));
        }
        if !self.officers.is_empty()
            && !self.proposer_counts
            && self.threshold as usize >= self.officers.len()
        {
            return Err(format!(
                "ceremony.threshold {} with proposer_counts = false needs more officers than \
                 that ({} configured): the proposer's approval does not count",
                self.threshold,
                self.officers.len()
            ));
        }
        check_bounds(&[(
            "ceremony.approval_ttl_seconds",
            self.approval_ttl_seconds,
            60,
            30 * DAY,
        )])?;
        if self.max_validity_days == 0 || self.max_validity_days > MAX_CERTIFICATE_VALIDITY_DAYS {
            return Err(format!(
                "ceremony.max_validity_days must be between 1 and {MAX_CERTIFICATE_VALIDITY_DAYS}"
            ));
        }
        Ok(())
    }
}

/// Why a config cannot be used. Each message is one line that says what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// Config path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid for this schema.
    #[error("config {path}, line {line}: {message}")]
    Parse {
        /// Config path.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is inconsistent or a referenced file is missing.
    #[error("config {path}: {message}")]
    Invalid {
        /// Config path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Read, parse, resolve relative paths and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse, resolve relative paths and validate the text of the config file at `path`
    /// (which only names the file in errors and anchors its relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            line: e
                .span()
                .map_or(1, |s| text[..s.start].matches('\n').count() + 1),
            message: e.message().trim().replace('\n', " "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// [`Config::load`] plus the rules that hold for `hsm-service serve` only (dev mode
    /// writes and loads its own config with [`Config::load`]).
    pub fn load_for_serve(path: &Path) -> Result<Config, ConfigError> {
        let config = Config::load(path)?;
        config
            .ceremony
            .validate_for_serve()
            .map_err(|message| ConfigError::Invalid {
                path: path.to_owned(),
                message,
            })?;
        Ok(config)
    }

    /// Make relative paths absolute against `base`.
    pub fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.server.cert);
        fix(&mut self.server.key);
        fix(&mut self.server.client_ca);
        for crl in &mut self.server.client_crls {
            fix(crl);
        }
        if self.ceremony.transcript_dir.is_relative() {
            self.ceremony.transcript_dir = self.data_dir.join(&self.ceremony.transcript_dir);
        }
        if self.ceremony.backup_dir.is_relative() {
            self.ceremony.backup_dir = self.data_dir.join(&self.ceremony.backup_dir);
        }
        if let Some(p) = self.hsm.user_pin_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.hsm.softhsm2_conf.as_mut() {
            fix(p);
        }
        if let Some(p) = self.hsm.kryoptic_conf.as_mut() {
            fix(p);
        }
        if let Some(p) = self.store.password_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.store.ca_file.as_mut() {
            fix(p);
        }
    }

    /// Consistency checks that the schema cannot express.
    pub fn validate(&self) -> Result<(), String> {
        let files = [
            ("server.cert", Some(&self.server.cert)),
            ("server.key", Some(&self.server.key)),
            ("server.client_ca", Some(&self.server.client_ca)),
            ("hsm.module", Some(&self.hsm.module)),
            ("hsm.user_pin_file", self.hsm.user_pin_file.as_ref()),
            ("hsm.softhsm2_conf", self.hsm.softhsm2_conf.as_ref()),
            ("hsm.kryoptic_conf", self.hsm.kryoptic_conf.as_ref()),
            ("store.password_file", self.store.password_file.as_ref()),
            ("store.ca_file", self.store.ca_file.as_ref()),
        ];
        for (key, path) in files {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(format!("{key}: file {} does not exist", p.display()));
                }
            }
        }
        for crl in &self.server.client_crls {
            if !crl.is_file() {
                return Err(format!(
                    "server.client_crls: file {} does not exist",
                    crl.display()
                ));
            }
        }
        match (&self.hsm.token_label, &self.hsm.token_serial) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err("set exactly one of hsm.token_label and hsm.token_serial".into()),
        }
        match (&self.hsm.user_pin_file, &self.hsm.user_pin_env) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err("set exactly one of hsm.user_pin_file and hsm.user_pin_env".into()),
        }
        if self.hsm.sessions == 0 || self.hsm.sessions > 256 {
            return Err("hsm.sessions must be between 1 and 256".into());
        }
        if self.hsm.queue_capacity == 0 {
            return Err("hsm.queue_capacity must be at least 1".into());
        }
        let c = &self.credentials;
        check_bounds(&[
            (
                "credentials.max_backoff_seconds",
                u64::from(c.max_backoff_seconds),
                1,
                30 * DAY,
            ),
            // 2100-01-01: a T0 beyond it is a typo, and keeps step arithmetic small.
            ("credentials.totp_t0", c.totp_t0, 0, 4_102_444_800),
            (
                "server.shutdown_grace_seconds",
                self.server.shutdown_grace_seconds,
                0,
                3600,
            ),
            (
                "server.health_interval_ms",
                self.server.health_interval_ms,
                100,
                60_000,
            ),
        ])?;
        self.server.limits.validate()?;
        if c.totp_window > 10 {
            return Err("credentials.totp_window must be at most 10".into());
        }
        if c.hotp_look_ahead > 100 {
            return Err("credentials.hotp_look_ahead must be at most 100".into());
        }
        if c.lockout_threshold == 0 || c.lockout_threshold > MAX_FAILURE_THRESHOLD {
            return Err(format!(
                "credentials.lockout_threshold must be 1..{MAX_FAILURE_THRESHOLD}"
            ));
        }
        if c.hard_lockout_threshold != 0
            && !(c.lockout_threshold..=MAX_FAILURE_THRESHOLD).contains(&c.hard_lockout_threshold)
        {
            return Err(format!(
                "credentials.hard_lockout_threshold must be 0 (off) or lockout_threshold..{MAX_FAILURE_THRESHOLD}"
            ));
        }
        if !(60..=MAX_FAILURE_WINDOW_SECONDS).contains(&c.failure_window_seconds) {
            return Err(format!(
                "credentials.failure_window_seconds must be 60..{MAX_FAILURE_WINDOW_SECONDS} (30 days)"
            ));
        }
        if c.base_backoff_seconds == 0 || c.max_backoff_seconds < c.base_backoff_seconds {
            return Err(
                "credentials: need 1 <= base_backoff_seconds <= max_backoff_seconds".into(),
            );
        }
        if c.resync_hotp_look_ahead > 10_000 || c.resync_totp_window > 100 {
            return Err(
                "credentials: resync windows are at most 10000 (HOTP) and 100 (TOTP)".into(),
            );
        }
        if self.audit.checkpoint_interval == 0 || self.audit.checkpoint_interval > 65_536 {
            return Err("audit.checkpoint_interval must be 1..65536".into());
        }
        if self.hsm.seed_cache_capacity == 0 {
            return Err("hsm.seed_cache_capacity must be at least 1".into());
        }
        for (i, rule) in self.clients.iter().enumerate() {
            match (&rule.cn, &rule.uri) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err(format!("client[{i}]: set exactly one of cn and uri")),
            }
            if let Err(e) = crate::store::validate_tenant(rule.tenant()) {
                return Err(format!("client[{i}] tenant {:?}: {e}", rule.tenant()));
            }
            if rule
                .issuer_fingerprint
                .as_deref()
                .is_some_and(|fp| !is_fingerprint(fp))
            {
                return Err(format!(
                    "client[{i}].issuer_fingerprint must be 64 hex digits (SHA-256 of the issuing CA certificate)"
                ));
            }
        }
        self.signing.validate(&self.clients)?;
        self.ceremony.validate()?;
        self.store.validate()?;
        self.events.validate()?;
        self.metrics.validate(&self.server)?;
        self.devices.validate()?;
        Ok(())
    }

    /// The token selector this config names.
    pub fn token(&self) -> crate::hsm::TokenSelector {
        match (&self.hsm.token_label, &self.hsm.token_serial) {
            (Some(l), _) => crate::hsm::TokenSelector::Label(l.clone()),
            (None, Some(s)) => crate::hsm::TokenSelector::Serial(s.clone()),
            (None, None) => crate::hsm::TokenSelector::Label(String::new()),
        }
    }

    /// Read the user PIN from its file or environment variable. Surrounding whitespace
    /// (a trailing newline from `echo`) is not part of the PIN.
    pub fn user_pin(&self) -> Result<secrecy::SecretString, String> {
        let raw =
            match (&self.hsm.user_pin_file, &self.hsm.user_pin_env) {
                (Some(file), _) => zeroize::Zeroizing::new(
                    std::fs::read_to_string(file)
                        .map_err(|e| format!("hsm.user_pin_file {}: {e}", file.display()))?,
                ),
                (None, Some(var)) => zeroize::Zeroizing::new(std::env::var(var).map_err(|_| {
                    format!("hsm.user_pin_env: environment variable {var} is not set")
                })?),
                (None, None) => return Err("no user PIN source configured".into()),
            };
        let pin = raw.trim();
        if pin.is_empty() {
            return Err("the user PIN is empty".into());
        }
        Ok(secrecy::SecretString::from(pin.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[events]`: the reference values are the defaults, unknown keys and out-of-range
    /// values are refused with the key's name.
    #[test]
    fn events_section_is_strict_and_bounded() {
        let text = include_str!("../config.example.toml");
        let config: Config = toml::from_str(text).expect("config.example.toml parses");
        assert_eq!(config.events, EventsConfig::default());
        assert_eq!(config.events.retention_days, 30);
        assert!(toml::from_str::<EventsConfig>("retention = 3").is_err());
        let parsed: EventsConfig = toml::from_str("max_watchers = 2").expect("parses");
        assert_eq!(parsed.max_watchers, 2);
        assert_eq!(parsed.heartbeat_seconds, 15);
        for (key, bad) in [
            ("retention_days", 0),
            ("max_events", 0),
            ("max_watchers", 0),
            ("heartbeat_seconds", 0),
            ("poll_ms", 1),
            ("compact_interval_seconds", 0),
        ] {
            let c: EventsConfig = toml::from_str(&format!("{key} = {bad}")).expect("parses");
            let err = c.validate().expect_err(key);
            assert!(err.contains(&format!("events.{key}")), "{err}");
        }
        assert_eq!(EventsConfig::default().validate(), Ok(()));
    }

    /// `[metrics]`: off in the reference config, its commented address parses, a bad one
    /// names the key.
    #[test]
    fn metrics_section_is_off_by_default_and_strict() {
        let text = include_str!("../config.example.toml");
        let config: Config = toml::from_str(text).expect("config.example.toml parses");
        assert_eq!(config.metrics, MetricsConfig::default());
        let on = text.replace(
            "#listen = \"127.0.0.1:9464\"",
            "listen = \"127.0.0.1:9464\"",
        );
        let config: Config = toml::from_str(&on).expect("parses");
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert!(!config.metrics.best_effort, "never from the file");
        let err = toml::from_str::<MetricsConfig>("listen = \"[::1]\"").expect_err("no port");
        assert!(
            err.to_string()
                .contains("metrics.listen: \"[::1]\" is not an IP address and port"),
            "{err}"
        );
        assert!(toml::from_str::<MetricsConfig>("best_effort = true").is_err());
    }

    /// The reference config parses with the same schema the service uses, so a key added
    /// to one and not the other fails here.
    #[test]
    fn reference_config_parses() {
        let text = include_str!("../config.example.toml");
        let config: Config = toml::from_str(text).expect("config.example.toml parses");
        assert_eq!(config.hsm.sessions, 4);
        assert_eq!(config.clients.len(), 3);
        assert_eq!(config.clients[0].role, Role::LoginService);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.signing.issuer, "https://login.eid.example");
        assert!(config.signing.acr_values.is_empty(), "deprecated");
        assert_eq!(config.signing.acr.len(), 2);
        assert_eq!(config.signing.evidence_ttl_seconds, 120);
        let otp = crate::common::AuthMethod::Otp;
        assert!(config
            .signing
            .evidence_reaches("https://data.gov.dk/concept/core/nsis/Substantial", otp));
        assert!(!config
            .signing
            .evidence_reaches("https://data.gov.dk/concept/core/nsis/High", otp));
        assert_eq!(config.clients[0].tenant(), "default");
        assert_eq!(config.clients[1].tenant(), "officer-alice");
        assert!(!config.clients[0].unbound_assertions);
        assert!(!config.signing.bootstrap_default_key);
        assert_eq!(
            config.clients[0].signing_keys,
            Some(vec!["assertion".to_owned()])
        );
        assert_eq!(config.clients[1].signing_keys, None);
        assert!(config.signing.validate(&config.clients).is_ok());
        assert_eq!(config.ceremony.threshold, 2);
        assert_eq!(config.ceremony.officers.len(), 3);
        assert_eq!(config.ceremony.approval_ttl_seconds, 86_400);
        assert_eq!(config.ceremony.max_validity_days, 3660);
        assert_eq!(config.ceremony.transcript_dir, PathBuf::from("ceremonies"));
        assert_eq!(config.ceremony.backup_dir, PathBuf::from("backups"));
        assert!(config.ceremony.validate().is_ok());
    }

    #[test]
    fn ceremony_section_defaults_and_checks() {
        let text = include_str!("../config.example.toml");
        let start = text.find("[ceremony]").expect("[ceremony]");
        let end = text[start..].find("# Client certificate").expect("end") + start;
        let without = format!("{}{}", &text[..start], &text[end..]);
        let config: Config = toml::from_str(&without).expect("parses without [ceremony]");
        assert_eq!(config.ceremony, CeremonyConfig::default());
        assert!(config.ceremony.officers.is_empty());

        let base: Config = toml::from_str(text).expect("parses");
        type Mutation = Box<dyn Fn(&mut CeremonyConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.threshold = 0), "ceremony.threshold"),
            (Box::new(|c| c.threshold = 4), "ceremony.threshold"),
            (
                Box::new(|c| c.approval_ttl_seconds = 10),
                "approval_ttl_seconds",
            ),
            (Box::new(|c| c.max_validity_days = 0), "max_validity_days"),
            (
                Box::new(|c| c.max_validity_days = 9000),
                "max_validity_days",
            ),
            (
                Box::new(|c| c.officers[0].fingerprint = Some("ab".repeat(32))),
                "exactly one of cn and fingerprint",
            ),
            (
                Box::new(|c| c.officers[2].fingerprint = Some("xyz".into())),
                "64 hex digits",
            ),
        ];
        for (mutate, expected) in cases {
            let mut c = base.ceremony.clone();
            mutate(&mut c);
            let err = c.validate().expect_err(expected);
            assert!(err.contains(expected), "{err}");
        }
        let err = toml::from_str::<Config>(&text.replace("approval_ttl_seconds", "approval_ttl"))
            .expect_err("unknown key");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn serve_needs_two_officers_and_proposer_counts_is_checked() {
        let text = include_str!("../config.example.toml");
        let base: Config = toml::from_str(text).expect("parses");
        assert!(base.ceremony.proposer_counts, "documented default: true");
        assert!(base.ceremony.validate_for_serve().is_ok());
        // Dev mode may keep M = 1 (Config::load); serve refuses it.
        let mut one = base.ceremony.clone();
        one.threshold = 1;
        assert!(one.validate().is_ok());
        let err = one.validate_for_serve().expect_err("M = 1 in serve");
        assert!(
            err.contains("ceremony.threshold is 1") && err.contains("at least 2"),
            "{err}"
        );
        // Without officers too: the rule is about the config, not the officer count.
        let none = CeremonyConfig {
            threshold: 1,
            ..Default::default()
        };
        assert!(none.validate_for_serve().is_err());
        assert!(CeremonyConfig::default().validate_for_serve().is_ok());
        // proposer_counts = false needs M officers besides the proposer.
        let mut strict = base.ceremony.clone();
        strict.proposer_counts = false;
        assert!(strict.validate().is_ok(), "M = 2 of 3, proposer excluded");
        strict.threshold = 3;
        let err = strict.validate().expect_err("3 of 3 without the proposer");
        assert!(err.contains("proposer_counts = false"), "{err}");
        let flipped = text.replace("proposer_counts = true\n", "proposer_counts = false\n");
        assert_ne!(flipped, text);
        let parsed: Config = toml::from_str(&flipped).expect("parses");
        assert!(!parsed.ceremony.proposer_counts);
    }

    #[test]
    fn signing_section_defaults_and_checks() {
        let text = include_str!("../config.example.toml");
        let start = text.find("[signing]").expect("[signing]");
        let end = text[start..].find("# Client certificate").expect("end") + start;
        let without = format!("{}{}", &text[..start], &text[end..])
            .replace("signing_keys = [\"assertion\"]\n", "")
            .replace(
                "acr = [\"https://data.gov.dk/concept/core/nsis/Substantial\", \"https://data.gov.dk/concept/core/nsis/High\"]\n",
                "",
            );
        let config: Config = toml::from_str(&without).expect("parses without [signing]");
        assert_eq!(config.signing, SigningConfig::default());
        assert_eq!(config.signing.default_key, "assertion");
        assert_eq!(config.signing.default_raw_key, "documents");
        assert_eq!(config.signing.max_ttl_seconds, 3600);

        let base: Config = toml::from_str(text).expect("parses");
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.signing.default_ttl_seconds = 7200),
                "default_ttl_seconds",
            ),
            (
                Box::new(|c| c.signing.default_key = "Bad Name".into()),
                "signing.default_key",
            ),
            (
                Box::new(|c| c.signing.default_raw_key = "Bad Name".into()),
                "signing.default_raw_key",
            ),
            (
                Box::new(|c| c.signing.default_raw_key = "assertion".into()),
                "a key signs for one usage only",
            ),
            (
                Box::new(|c| c.clients[0].acr = Some(vec!["urn:other".into()])),
                "client[0].acr",
            ),
            (
                Box::new(|c| c.clients[0].signing_keys = Some(vec!["a/b".into()])),
                "client[0].signing_keys",
            ),
            (
                Box::new(|c| c.signing.acr_values.push(String::new())),
                "empty value",
            ),
            (
                Box::new(|c| c.signing.acr[0].value = String::new()),
                "signing.acr[0].value must not be empty",
            ),
            (
                Box::new(|c| c.signing.acr[1].value = c.signing.acr[0].value.clone()),
                "signing.acr[1].value",
            ),
            (
                Box::new(|c| c.signing.acr[0].evidence = vec!["sms".into()]),
                "not an evidence method (known: otp, app)",
            ),
            (
                Box::new(|c| c.signing.evidence_ttl_seconds = 0),
                "evidence_ttl_seconds",
            ),
            (
                Box::new(|c| c.signing.evidence_ttl_seconds = MAX_EVIDENCE_TTL_SECONDS + 1),
                "evidence_ttl_seconds",
            ),
        ];
        for (mutate, expected) in cases {
            let mut c = base.clone();
            mutate(&mut c);
            let err = c.signing.validate(&c.clients).expect_err(expected);
            assert!(err.contains(expected), "{err}");
        }
        let err = toml::from_str::<Config>(&text.replace("max_auth_age_seconds", "max_auth_age"))
            .expect_err("unknown key");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn store_section_defaults_and_checks() {
        let text = include_str!("../config.example.toml");
        let base: Config = toml::from_str(text).expect("parses");
        assert_eq!(
            base.store,
            StoreConfig::default(),
            "the reference config keeps redb"
        );
        assert_eq!(base.store.backend, StoreBackendKind::Redb);
        assert!(base.store.validate().is_ok());

        let pg = |c: &mut Config| {
            c.store.backend = StoreBackendKind::Postgres;
            c.store.url = Some("postgresql://hsm@db.example:5432/hsm".into());
        };
        let mut ok = base.clone();
        pg(&mut ok);
        assert!(ok.store.validate().is_ok());
        ok.store.instance = Some("node-1.eu_west".into());
        assert!(ok.store.validate().is_ok());
        assert_eq!(ok.store.instance_name(), "node-1.eu_west");
        ok.store.instance = None;
        assert!(crate::store::postgres::check_instance(&ok.store.instance_name()).is_ok());
        let o = ok.store.postgres_options().expect("options");
        assert_eq!(o.pool_size, 8);
        assert_eq!(o.statement_timeout, std::time::Duration::from_millis(5000));
        assert!(o.password.is_none());

        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.store.url = Some("postgresql://h/db".into())),
                "store.url is set but store.backend is \"redb\"",
            ),
            (
                Box::new(|c| c.store.instance = Some("a".into())),
                "store.instance is set but",
            ),
            (
                Box::new(|c| c.store.cache_mib = 8),
                "store.cache_mib must be between 16 and 65536 (is 8)",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.cache_mib = 64;
                }),
                "store.cache_mib is for the embedded store",
            ),
            (
                Box::new(|c| c.store.backend = StoreBackendKind::Postgres),
                "needs store.url",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.url = Some("postgresql://hsm:hunter2@db.example/hsm".into());
                }),
                "must not contain a password",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.url = Some("postgresql://hsm@db.example".into());
                }),
                "names no database",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.url = Some("mysql://x".into());
                }),
                "not a PostgreSQL connection URL",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.pool_size = 0;
                }),
                "store.pool_size must be between 1 and 256",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.pool_size = 257;
                }),
                "store.pool_size",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.statement_timeout_ms = 10;
                }),
                "store.statement_timeout_ms must be between 100 and 600000",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.instance = Some(String::new());
                }),
                "store.instance must be 1 to 64",
            ),
            (
                Box::new(move |c| {
                    pg(c);
                    c.store.instance = Some("a b".into());
                }),
                "store.instance may contain only",
            ),
        ];
        for (mutate, expected) in cases {
            let mut c = base.clone();
            mutate(&mut c);
            let err = c.store.validate().expect_err(expected);
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }

        // The reference config's commented postgres keys are the schema's keys.
        let start = text.find("[store]").expect("[store]");
        let end = text[start..].find("[ceremony]").expect("end") + start;
        let section: String = text[start..end]
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|l| l.contains(" = "))
                    .unwrap_or(l)
            })
            .map(|l| l.replace("backend = \"redb\"", "backend = \"postgres\""))
            .collect::<Vec<_>>()
            .join("\n");
        let documented: Config =
            toml::from_str(&format!("{}{section}\n{}", &text[..start], &text[end..]))
                .expect("the documented [store] keys parse");
        assert_eq!(documented.store.backend, StoreBackendKind::Postgres);
        assert_eq!(documented.store.instance.as_deref(), Some("hsm-1"));
        assert_eq!(documented.store.pool_size, StoreConfig::default().pool_size);
        assert_eq!(
            documented.store.statement_timeout_ms,
            StoreConfig::default().statement_timeout_ms
        );
        assert_eq!(
            documented.store.connect_timeout_ms,
            StoreConfig::default().connect_timeout_ms
        );
        assert_eq!(
            std::time::Duration::from_millis(documented.store.connect_timeout_ms),
            crate::store::postgres::DEFAULT_CONNECT_TIMEOUT
        );
        assert!(documented.store.validate().is_ok());

        // Parsing: the backend names, an unknown key, relative files.
        let without = format!("{}{}", &text[..start], &text[end..]);
        let parse = |extra: &str| toml::from_str::<Config>(&format!("{without}\n[store]\n{extra}"));
        let c =
            parse("backend = \"postgres\"\nurl = \"postgresql://hsm@db/hsm\"\n").expect("parses");
        assert_eq!(c.store.backend, StoreBackendKind::Postgres);
        let err = parse("backend = \"sqlite\"\n").expect_err("unknown backend");
        assert!(err.to_string().contains("unknown variant"), "{err}");
        let err = parse("pool = 3\n").expect_err("unknown key");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let mut c = parse("backend = \"postgres\"\nurl = \"postgresql://hsm@db/hsm\"\npassword_file = \"pg.pw\"\nca_file = \"pg-ca.pem\"\n")
            .expect("parses");
        c.resolve(Path::new("/etc/hsm"));
        assert_eq!(c.store.password_file, Some(PathBuf::from("/etc/hsm/pg.pw")));
        assert_eq!(c.store.ca_file, Some(PathBuf::from("/etc/hsm/pg-ca.pem")));
        let err = c.validate().expect_err("missing files");
        assert!(
            err.contains("store.password_file") || err.contains("server."),
            "{err}"
        );

        // The password file: read, trimmed, never empty.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        let mut c = ok.clone();
        c.store.password_file = Some(file.clone());
        std::fs::write(&file, "s3cret\n").expect("write");
        let o = c.store.postgres_options().expect("options");
        use secrecy::ExposeSecret;
        assert_eq!(
            o.password.as_ref().map(|p| p.expose_secret()),
            Some("s3cret")
        );
        assert!(!format!("{o:?}").contains("s3cret"), "Debug redacts it");
        std::fs::write(&file, " \n").expect("write");
        let err = c.store.postgres_options().expect_err("empty");
        assert!(err.contains("is empty"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_with_a_line_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        let text = include_str!("../config.example.toml")
            .replace("sessions = 4", "sessions = 4\nsesions = 5");
        std::fs::write(&path, text).expect("write");
        let err = Config::load(&path).expect_err("typo").to_string();
        assert!(err.contains("unknown field `sesions`"), "{err}");
        assert!(err.contains("line "), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn validation_table() {
        let base: Config = toml::from_str(include_str!("../config.example.toml")).expect("parses");
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutation, &str)> = vec![
            (
                "both token selectors",
                Box::new(|c| c.hsm.token_serial = Some("x".into())),
                "exactly one of hsm.token_label",
            ),
            (
                "no token selector",
                Box::new(|c| c.hsm.token_label = None),
                "exactly one of hsm.token_label",
            ),
            (
                "two PIN sources",
                Box::new(|c| c.hsm.user_pin_env = Some("X".into())),
                "exactly one of hsm.user_pin_file",
            ),
            (
                "zero sessions",
                Box::new(|c| c.hsm.sessions = 0),
                "hsm.sessions",
            ),
            (
                "rule with cn and uri",
                Box::new(|c| c.clients[1].uri = Some("u".into())),
                "client[1]",
            ),
            (
                "no lockout",
                Box::new(|c| c.credentials.lockout_threshold = 0),
                "credentials.lockout_threshold must be 1..100",
            ),
            (
                "lockout beyond NIST's 100",
                Box::new(|c| c.credentials.lockout_threshold = 101),
                "credentials.lockout_threshold must be 1..100",
            ),
            (
                "hard lock before the temporary one",
                Box::new(|c| {
                    c.credentials.lockout_threshold = 5;
                    c.credentials.hard_lockout_threshold = 4;
                }),
                "hard_lockout_threshold must be 0 (off) or lockout_threshold..100",
            ),
            (
                "hard lock beyond NIST's 100",
                Box::new(|c| c.credentials.hard_lockout_threshold = 101),
                "hard_lockout_threshold must be 0 (off) or lockout_threshold..100",
            ),
            (
                "failure window too short",
                Box::new(|c| c.credentials.failure_window_seconds = 59),
                "credentials.failure_window_seconds must be 60..2592000",
            ),
            (
                "failure window too long",
                Box::new(|c| c.credentials.failure_window_seconds = 30 * 86_400 + 1),
                "credentials.failure_window_seconds must be 60..2592000",
            ),
            (
                "empty tenant",
                Box::new(|c| c.clients[0].tenant = Some(String::new())),
                "client[0] tenant",
            ),
            (
                "control character in tenant",
                Box::new(|c| c.clients[0].tenant = Some("a\u{0}b".into())),
                "client[0] tenant",
            ),
            (
                "issuer fingerprint not hex",
                Box::new(|c| c.clients[2].issuer_fingerprint = Some("ab".into())),
                "client[2].issuer_fingerprint",
            ),
            (
                "missing CRL file",
                Box::new(|c| c.server.client_crls = vec![PathBuf::from("/nonexistent.crl")]),
                "server.client_crls",
            ),
        ];
        for (name, mutate, expected) in cases {
            let mut c = base.clone();
            // Point every file at one that exists so only the case under test fails.
            let existing = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
            c.server.cert = existing.clone();
            c.server.key = existing.clone();
            c.server.client_ca = existing.clone();
            c.hsm.module = existing.clone();
            c.server.client_crls = vec![existing.clone()];
            c.hsm.user_pin_file = Some(existing);
            assert!(c.validate().is_ok(), "base config must be valid");
            mutate(&mut c);
            let err = c.validate().expect_err(name);
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    /// Every duration and limit has a lower and an upper bound; each side of each bound
    /// is refused with the key's name, and the bound itself is accepted.
    #[test]
    fn bounds_table() {
        let mut base: Config =
            toml::from_str(include_str!("../config.example.toml")).expect("parses");
        let existing = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        base.server.cert = existing.clone();
        base.server.key = existing.clone();
        base.server.client_ca = existing.clone();
        base.hsm.module = existing.clone();
        base.server.client_crls = vec![existing.clone()];
        base.hsm.user_pin_file = Some(existing);
        assert_eq!(base.validate(), Ok(()));
        type Set = fn(&mut Config, u64);
        let cases: Vec<(&str, Set, u64, u64)> = vec![
            (
                "server.shutdown_grace_seconds",
                |c, v| c.server.shutdown_grace_seconds = v,
                0,
                3600,
            ),
            (
                "server.health_interval_ms",
                |c, v| c.server.health_interval_ms = v,
                100,
                60_000,
            ),
            (
                "server.limits.handshake_timeout_seconds",
                |c, v| c.server.limits.handshake_timeout_seconds = v,
                1,
                60,
            ),
            (
                "server.limits.max_pending_handshakes",
                |c, v| c.server.limits.max_pending_handshakes = v as usize,
                1,
                65_536,
            ),
            (
                "server.limits.max_concurrent_streams",
                |c, v| {
                    c.server.limits.max_concurrent_streams = v as u32;
                    c.server.limits.max_concurrent_calls_per_connection = 1;
                },
                1,
                1024,
            ),
            (
                "server.limits.max_concurrent_calls_per_connection",
                |c, v| c.server.limits.max_concurrent_calls_per_connection = v as usize,
                1,
                128,
            ),
            (
                "server.limits.max_pending_reset_streams",
                |c, v| c.server.limits.max_pending_reset_streams = v as usize,
                1,
                1000,
            ),
            (
                "server.limits.max_local_reset_streams",
                |c, v| c.server.limits.max_local_reset_streams = v as usize,
                1,
                10_000,
            ),
            (
                "server.limits.request_timeout_seconds",
                |c, v| c.server.limits.request_timeout_seconds = v,
                1,
                600,
            ),
            (
                "server.limits.keepalive_interval_seconds",
                |c, v| c.server.limits.keepalive_interval_seconds = v,
                1,
                3600,
            ),
            (
                "server.limits.keepalive_timeout_seconds",
                |c, v| c.server.limits.keepalive_timeout_seconds = v,
                1,
                300,
            ),
            (
                "server.limits.max_connection_age_seconds",
                |c, v| c.server.limits.max_connection_age_seconds = v,
                60,
                7 * DAY,
            ),
            (
                "server.limits.max_connection_age_grace_seconds",
                |c, v| c.server.limits.max_connection_age_grace_seconds = v,
                1,
                3600,
            ),
            (
                "server.limits.max_request_bytes",
                |c, v| c.server.limits.max_request_bytes = v as usize,
                1024,
                1 << 20,
            ),
            (
                "server.limits.max_signing_request_bytes",
                |c, v| c.server.limits.max_signing_request_bytes = v as usize,
                4096,
                2 << 20,
            ),
            (
                "server.limits.max_ceremony_request_bytes",
                |c, v| c.server.limits.max_ceremony_request_bytes = v as usize,
                64 * 1024,
                16 << 20,
            ),
            (
                "credentials.max_backoff_seconds",
                |c, v| {
                    c.credentials.max_backoff_seconds = v as u32;
                    c.credentials.base_backoff_seconds = 1;
                },
                1,
                30 * DAY,
            ),
            (
                "credentials.totp_t0",
                |c, v| c.credentials.totp_t0 = v,
                0,
                4_102_444_800,
            ),
            (
                "signing.max_ttl_seconds",
                |c, v| c.signing.max_ttl_seconds = v as u32,
                300,
                DAY,
            ),
            (
                "signing.max_auth_age_seconds",
                |c, v| c.signing.max_auth_age_seconds = v,
                1,
                MAX_AUTH_AGE_SECONDS,
            ),
            (
                "signing.evidence_ttl_seconds",
                |c, v| c.signing.evidence_ttl_seconds = v,
                1,
                MAX_EVIDENCE_TTL_SECONDS,
            ),
            (
                "ceremony.approval_ttl_seconds",
                |c, v| c.ceremony.approval_ttl_seconds = v,
                60,
                30 * DAY,
            ),
        ];
        for (key, set, low, high) in cases {
            for ok in [low, high] {
                let mut c = base.clone();
                set(&mut c, ok);
                assert_eq!(c.validate(), Ok(()), "{key} = {ok}");
            }
            let mut outside = vec![high + 1];
            if low > 0 {
                outside.push(low - 1);
            }
            for bad in outside {
                let mut c = base.clone();
                set(&mut c, bad);
                let err = c.validate().expect_err(key);
                assert!(err.contains(key), "{key} = {bad}: {err}");
            }
        }
        // u64::MAX seconds of auth age, the release-mode overflow of issue 10, is refused.
        let mut c = base.clone();
        c.signing.max_auth_age_seconds = u64::MAX;
        assert!(c.validate().is_err());
    }

    /// `store.password_file` against a server that asks for the password: the right one
    /// opens the store; a wrong or missing one fails with one line that says where to
    /// look and holds neither password.
    #[test]
    fn the_postgres_password_file_is_used_and_a_wrong_one_fails_clearly() {
        use crate::store::postgres::testing::TestDatabase;
        use crate::store::postgres::PgBackend;

        let Some(db) = TestDatabase::create() else {
            return;
        };
        // scripts/postgres.sh makes members of this role authenticate with a password.
        let rule = db.query_text(
            "SELECT count(*) FROM pg_hba_file_rules \
             WHERE '+hsm_password_login' = ANY(user_name) AND auth_method = 'scram-sha-256'",
        );
        if rule.as_deref() != Some("1") {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the test cluster has no password rule (scripts/postgres.sh)"
            );
            eprintln!("skipping: the test cluster predates scripts/postgres.sh's password rule");
            return;
        }
        let user = format!("{}_pw", db.name);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let right = format!("Right{nanos}Secret");
        let wrong = format!("Wrong{nanos}Secret");
        db.admin(
            "DO $$ BEGIN CREATE ROLE hsm_password_login NOLOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
        );
        db.admin(&format!(
            "CREATE ROLE {user} LOGIN PASSWORD '{right}' IN ROLE hsm_password_login"
        ));
        struct Role<'a>(&'a TestDatabase, String);
        impl Drop for Role<'_> {
            fn drop(&mut self) {
                self.0.execute(&format!("DROP OWNED BY {}", self.1));
                self.0.admin(&format!("DROP ROLE {}", self.1));
            }
        }
        let _role = Role(&db, user.clone());
        db.execute(&format!("GRANT CREATE ON SCHEMA public TO {user}"));

        let at = db.url.find("://").expect("scheme") + 3;
        let host = &db.url[at + db.url[at..].find('@').expect("user") + 1..];
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pg-password");
        let store = |password: Option<&str>| {
            let password_file = password.map(|p| {
                std::fs::write(&file, format!("{p}\n")).expect("write");
                file.clone()
            });
            let cfg = StoreConfig {
                backend: StoreBackendKind::Postgres,
                url: Some(format!("postgresql://{user}@{host}")),
                password_file,
                instance: Some("pw".into()),
                ..StoreConfig::default()
            };
            cfg.validate().expect("valid");
            let o = cfg.postgres_options().expect("options");
            assert!(
                !format!("{o:?}").contains(password.unwrap_or("\0")),
                "{o:?}"
            );
            PgBackend::open(&o).map(drop)
        };

        store(Some(&right)).expect("the right password opens the store");
        for (password, expect) in [
            (Some(wrong.as_str()), "store.password_file"),
            (None, "store.password_file is not set"),
        ] {
            let err = store(password).expect_err("refused");
            let text = err.to_string();
            println!("{text}");
            assert!(text.contains(expect), "{text}");
            assert!(!text.contains('\n'), "one line: {text}");
            assert!(!text.contains(&right) && !text.contains(&wrong), "{text}");
            assert!(!format!("{err:?}").contains(&wrong), "{err:?}");
        }
    }
}
