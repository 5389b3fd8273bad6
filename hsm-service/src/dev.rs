//! Dev mode: everything a first run needs, created under one data directory.
//!
//! `hsm-service dev` creates (once) a SoftHSM configuration whose token directory is
//! inside the data directory (the system token directory is never touched), a token with
//! random SO and user PINs (files with mode 0600: dev only), a development PKI, and a
//! `config.toml`; a second run reuses all of it. Tests use the same code with a
//! throw-away directory, so what the tests run is what a developer runs.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use secrecy::SecretString;

use crate::auth::Role;
use crate::config::{ClientRule, Config, CredentialsConfig, HsmConfig, LogConfig, ServerConfig};
use crate::hsm::{module, TokenSelector};

/// Client certificates the dev PKI issues, and the role each maps to. The two login
/// services are two tenants (each its cn), so tenant separation can be tried by hand.
pub const DEV_CLIENTS: [(&str, Role); 7] = [
    ("login-service", Role::LoginService),
    ("login-service-b", Role::LoginService),
    ("officer-1", Role::Officer),
    ("officer-2", Role::Officer),
    ("officer-3", Role::Officer),
    ("auditor", Role::Auditor),
    ("notifier", Role::Notifier),
];

/// Default data directory of dev mode.
pub const DEFAULT_DATA_DIR: &str = ".hsm-dev";
/// Default token label of dev mode.
pub const DEFAULT_TOKEN_LABEL: &str = "hsm-dev";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// What `hsm-service dev` was asked for.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The data directory (created if missing).
    pub data_dir: PathBuf,
    /// Listen address; overrides the one in an existing config.
    pub listen: Option<SocketAddr>,
    /// Token label.
    pub token_label: String,
    /// Use this token configuration (`softhsm2.conf`, or `kryoptic.conf` with kryoptic's
    /// module, see [`SoftToken`]) instead of writing one into the data directory. A
    /// process can use only one configuration of a module, so tests that run several
    /// services in one process share one, with one token each.
    pub softhsm2_conf: Option<PathBuf>,
    /// `--postgres URL`: the data directory's store is this PostgreSQL database. Written
    /// into `config.toml` (`[store]`) on first run; later runs use what is there.
    pub postgres: Option<String>,
    /// `--postgres-password-file F`: the database password, with `postgres`.
    pub postgres_password_file: Option<PathBuf>,
    /// `--instance NAME`: this instance's name (its audit chain) with a PostgreSQL store;
    /// default `store.instance` of the config, else one derived from the listen address
    /// ([`instance_from_listen`]).
    pub instance: Option<String>,
    /// `--metrics-listen ADDR`: the metrics endpoint's address (default
    /// [`crate::config::DEV_METRICS_LISTEN`], or the config's `[metrics] listen`).
    pub metrics_listen: Option<SocketAddr>,
}

impl DevOptions {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> DevOptions {
        DevOptions {
            data_dir: data_dir.into(),
            listen: None,
            token_label: DEFAULT_TOKEN_LABEL.to_owned(),
            softhsm2_conf: None,
            postgres: None,
            postgres_password_file: None,
            instance: None,
            metrics_listen: None,
        }
    }
}

/// Where the PKCS#11 library of dev mode (and the tests) is: `HSM_PKCS11_MODULE` if set
/// (e.g. kryoptic's, the second token of the test suite: `scripts/token2.sh env`), else
/// SoftHSM's in the usual Debian, Ubuntu and Fedora locations.
pub fn softhsm_module() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("HSM_PKCS11_MODULE") {
        return Ok(PathBuf::from(p));
    }
    const CANDIDATES: [&str; 5] = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ];
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "SoftHSM2 is not installed (no libsofthsm2.so found); run softhsm-config/setup.sh \
             or set HSM_PKCS11_MODULE"
                .to_owned()
        })
}

/// Point SoftHSM at `conf` (sets `SOFTHSM2_CONF`). Must happen before the library is
/// initialized, and before other threads read the environment: `main` calls it before
/// the runtime starts; tests call it once per process through `testing`.
pub fn point_softhsm_at(conf: &Path) -> Result<(), String> {
    SoftToken::SoftHsm.point_at(conf)
}

/// The software tokens that dev mode and the tests can give a token directory of their
/// own (inside the data directory, never the system's), told apart by the module's file
/// name. Any other module is treated as SoftHSM-like: dev mode writes a `softhsm2.conf`
/// that it ignores, and needs a slot with an uninitialized token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftToken {
    /// SoftHSM v2: `softhsm2.conf` (`SOFTHSM2_CONF`); it always offers one more free slot.
    SoftHsm,
    /// kryoptic: `kryoptic.conf` (`KRYOPTIC_CONF`): a fixed list of slots, one sqlite
    /// file each, every one uninitialized until a token is made on it.
    Kryoptic,
}

/// Slots of the `kryoptic.conf` dev mode writes (one token each; dev mode needs one).
pub const DEV_KRYOPTIC_SLOTS: usize = 4;

impl SoftToken {
    /// Which one `module` is (by its file name).
    pub fn of_module(module: &Path) -> SoftToken {
        match module.file_name().and_then(|n| n.to_str()) {
            Some(name) if name.contains("kryoptic") => SoftToken::Kryoptic,
            _ => SoftToken::SoftHsm,
        }
    }

    /// File name of its configuration.
    pub fn conf_name(self) -> &'static str {
        match self {
            SoftToken::SoftHsm => "softhsm2.conf",
            SoftToken::Kryoptic => "kryoptic.conf",
        }
    }

    /// The environment variable that names its configuration.
    pub fn env_var(self) -> &'static str {
        match self {
            SoftToken::SoftHsm => "SOFTHSM2_CONF",
            SoftToken::Kryoptic => "KRYOPTIC_CONF",
        }
    }

    /// Set [`SoftToken::env_var`] to `conf` (see [`point_softhsm_at`] for when).
    pub fn point_at(self, conf: &Path) -> Result<(), String> {
        match std::env::var_os(self.env_var()) {
            Some(current) if Path::new(&current) == conf => Ok(()),
            _ => {
                std::env::set_var(self.env_var(), conf);
                Ok(())
            }
        }
    }

    /// The text of a configuration whose tokens live in `tokens` (kryoptic: `slots`
    /// slots, numbered from 1).
    pub fn conf_text(self, tokens: &Path, slots: usize) -> String {
        match self {
            SoftToken::SoftHsm => {
                let template = include_str!("../../softhsm-config/softhsm2.conf.template");
                template.replace("@TOKEN_DIR@", &tokens.display().to_string())
            }
            SoftToken::Kryoptic => {
                let mut text = String::from(
                    "# kryoptic configuration written by hsm-service (dev mode and tests).\n\
                     # Tokens live under the service's data directory, one sqlite file each.\n",
                );
                for n in 1..=slots.max(1) {
                    let db = tokens.join(format!("token-{n}.sql"));
                    text.push_str(&format!(
                        "\n[[slots]]\nslot = {n}\ndbtype = \"sqlite\"\ndbargs = {}\n",
                        toml::Value::String(db.display().to_string())
                    ));
                }
                text
            }
        }
    }
}

/// Create whatever is missing under the data directory and return the config to run.
/// Blocking (token initialization, key generation): call before serving.
pub fn prepare(opts: &DevOptions) -> Result<Config, String> {
    let dir = &opts.data_dir;
    create_private_dir(dir)?;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("data directory {}: {e}", dir.display()))?;

    let module_path = softhsm_module()?;
    let kind = SoftToken::of_module(&module_path);
    let conf = match &opts.softhsm2_conf {
        Some(shared) => shared.clone(),
        None => write_token_conf(&dir, kind)?,
    };
    kind.point_at(&conf)?;

    let so_pin = pin_file(&dir.join("so.pin"))?;
    let user_pin = pin_file(&dir.join("user.pin"))?;
    ensure_token(&module_path, &opts.token_label, &so_pin, &user_pin)?;
    ensure_pki(&dir.join("pki"))?;

    let config_path = dir.join("config.toml");
    let store = dev_store(opts)?;
    if !config_path.exists() {
        // The file gets the default address; --listen overrides it per run.
        let listen = DEFAULT_LISTEN.parse().expect("valid default address");
        let mut config = dev_config(
            &module_path,
            &opts.token_label,
            listen,
            opts.softhsm2_conf.is_none().then_some(kind),
        );
        if let Some(store) = &store {
            config.store = store.clone();
        }
        let text = toml::to_string_pretty(&config).map_err(|e| format!("config: {e}"))?;
        let header = "# Written by `hsm-service dev` on first run; edit freely, it is reused.\n\
                      # Every key is explained in hsm-service/config.example.toml.\n\n";
        write_file(&config_path, format!("{header}{text}").as_bytes(), 0o600)?;
    }
    let mut config = Config::load(&config_path).map_err(|e| e.to_string())?;
    if let Some(listen) = opts.listen {
        config.server.listen = listen;
    }
    // Metrics are on in dev mode: where asked, else where the config says, else on the
    // default address, which may be taken by another dev instance (then: a warning).
    match (opts.metrics_listen, config.metrics.listen) {
        (Some(addr), _) => config.metrics.listen = Some(addr),
        (None, Some(_)) => {}
        (None, None) => {
            config.metrics.listen = Some(
                crate::config::DEV_METRICS_LISTEN
                    .parse()
                    .expect("valid default address"),
            );
            config.metrics.best_effort = true;
        }
    }
    config
        .metrics
        .validate(&config.server)
        .map_err(|e| format!("--metrics-listen: {e}"))?;
    if let Some(wanted) = &store {
        let same = config.store.backend == wanted.backend
            && config.store.url == wanted.url
            && (wanted.password_file.is_none()
                || config.store.password_file == wanted.password_file);
        if !same {
            return Err(format!(
                "{} already names another store ({}); edit it, or use a fresh --data-dir \
                 for --postgres",
                config_path.display(),
                config
                    .store
                    .url
                    .as_deref()
                    .unwrap_or("the embedded store.redb")
            ));
        }
    }
    if config.store.backend == crate::config::StoreBackendKind::Postgres {
        let name = match (&opts.instance, &config.store.instance) {
            (Some(name), _) => name.clone(),
            (None, Some(name)) => name.clone(),
            (None, None) => instance_from_listen(config.server.listen),
        };
        crate::store::postgres::check_instance(&name).map_err(|e| format!("--instance: {e}"))?;
        config.store.instance = Some(name);
    } else if opts.instance.is_some() {
        return Err(
            "--instance names an instance of a PostgreSQL store; this data directory's store \
             is the embedded one (one instance)"
                .into(),
        );
    }
    Ok(config)
}

/// The `[store]` section `--postgres` asks for (`None`: no flag).
fn dev_store(opts: &DevOptions) -> Result<Option<crate::config::StoreConfig>, String> {
    let Some(url) = &opts.postgres else {
        if opts.postgres_password_file.is_some() {
            return Err("--postgres-password-file needs --postgres URL".into());
        }
        return Ok(None);
    };
    let password_file = match &opts.postgres_password_file {
        Some(f) => Some(
            f.canonicalize()
                .map_err(|e| format!("--postgres-password-file {}: {e}", f.display()))?,
        ),
        None => None,
    };
    let store = crate::config::StoreConfig {
        backend: crate::config::StoreBackendKind::Postgres,
        url: Some(url.clone()),
        password_file,
        ..Default::default()
    };
    store.validate().map_err(|e| format!("--postgres: {e}"))?;
    Ok(Some(store))
}

/// The instance name dev mode gives an instance with a PostgreSQL store when none is
/// configured: `dev-<ip>-<port>` of its listen address (every instance of one machine
/// listens on its own port, and a restart on the same port continues the same audit
/// chain). Port 0 (a port chosen at start) gives no stable name: the process id is added.
pub fn instance_from_listen(listen: SocketAddr) -> String {
    let ip: String = listen
        .ip()
        .to_string()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    match listen.port() {
        0 => format!("dev-{ip}-0-pid{}", std::process::id()),
        port => format!("dev-{ip}-{port}"),
    }
}

fn dev_config(
    module: &Path,
    label: &str,
    listen: SocketAddr,
    own_conf: Option<SoftToken>,
) -> Config {
    Config {
        data_dir: PathBuf::from("."),
        server: ServerConfig {
            listen,
            cert: "pki/server.crt".into(),
            key: "pki/server.key".into(),
            client_ca: "pki/ca.crt".into(),
            shutdown_grace_seconds: 10,
            client_crls: Vec::new(),
            limits: crate::config::TransportLimits::default(),
            health_interval_ms: crate::config::DEFAULT_HEALTH_INTERVAL_MS,
        },
        hsm: HsmConfig {
            module: module.to_owned(),
            token_label: Some(label.to_owned()),
            token_serial: None,
            user_pin_file: Some("user.pin".into()),
            user_pin_env: None,
            sessions: 4,
            queue_capacity: 4096,
            seed_cache_capacity: 100_000,
            softhsm2_conf: (own_conf == Some(SoftToken::SoftHsm))
                .then(|| PathBuf::from(SoftToken::SoftHsm.conf_name())),
            kryoptic_conf: (own_conf == Some(SoftToken::Kryoptic))
                .then(|| PathBuf::from(SoftToken::Kryoptic.conf_name())),
        },
        log: LogConfig::default(),
        credentials: CredentialsConfig::default(),
        audit: crate::config::AuditConfig::default(),
        store: crate::config::StoreConfig::default(),
        clients: DEV_CLIENTS
            .iter()
            .map(|(cn, role)| ClientRule {
                cn: Some((*cn).to_owned()),
                uri: None,
                role: *role,
                signing_keys: None,
                acr: None,
                tenant: None,
                unbound_assertions: false,
                issuer_fingerprint: None,
            })
            .collect(),
        signing: crate::signing::dev_config(),
        events: crate::config::EventsConfig::default(),
        devices: crate::config::DevicesConfig::default(),
        metrics: crate::config::MetricsConfig::default(),
        ceremony: crate::config::CeremonyConfig {
            officers: DEV_CLIENTS
                .iter()
                .filter(|(_, role)| *role == Role::Officer)
                .map(|(cn, _)| crate::config::OfficerRule {
                    cn: Some((*cn).to_owned()),
                    fingerprint: None,
                })
                .collect(),
            threshold: 2,
            ..Default::default()
        },
    }
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A softhsm2.conf (or kryoptic.conf) whose tokens live in `<dir>/tokens`.
fn write_token_conf(dir: &Path, kind: SoftToken) -> Result<PathBuf, String> {
    let conf = dir.join(kind.conf_name());
    let tokens = dir.join("tokens");
    create_private_dir(&tokens)?;
    if !conf.exists() {
        let text = kind.conf_text(&tokens, DEV_KRYOPTIC_SLOTS);
        write_file(&conf, text.as_bytes(), 0o600)?;
    }
    Ok(conf)
}

/// The PIN in `path`, generating a random one (hex of 16 bytes) the first time.
fn pin_file(path: &Path) -> Result<SecretString, String> {
    if !path.exists() {
        let mut bytes = zeroize::Zeroizing::new([0u8; 16]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes.as_mut())
            .map_err(|_| "system RNG failed".to_owned())?;
        let pin = zeroize::Zeroizing::new(crate::common::hex(bytes.as_ref()));
        write_file(path, pin.as_bytes(), 0o600)?;
    }
    let text = zeroize::Zeroizing::new(
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    Ok(SecretString::from(text.trim().to_owned()))
}

fn ensure_token(
    module_path: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), String> {
    let ctx = module::load(module_path).map_err(|e| e.to_string())?;
    match module::find_token(&ctx, &TokenSelector::Label(label.to_owned())) {
        Ok(_) => Ok(()),
        Err(crate::hsm::Error::TokenNotFound(_)) => {
            module::init_token(&ctx, label, so_pin, user_pin).map_err(|e| e.to_string())?;
            tracing::info!(label, "initialized a new software token");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The dev PKI: a CA, a server certificate for localhost, and one client certificate per
/// entry of [`DEV_CLIENTS`]. Made as a whole when `ca.crt` is missing.
fn ensure_pki(dir: &Path) -> Result<(), String> {
    if dir.join("ca.crt").exists() {
        if !dir.join("login-service-b.crt").exists() {
            tracing::warn!(
                "this dev directory predates pki/login-service-b.*: delete it to get the second tenant"
            );
        }
        if !dir.join("notifier.crt").exists() {
            tracing::warn!(
                "this dev directory predates pki/notifier.*: delete it to get the notifier"
            );
        }
        return Ok(());
    }
    create_private_dir(dir)?;
    let err = |e: rcgen::Error| format!("dev PKI: {e}");

    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.distinguished_name = name("hsm-service dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    write_file(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &dir.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str,
                sans: Vec<SanType>,
                eku: ExtendedKeyUsagePurpose|
     -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name = name(cn);
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        validity(&mut p);
        let cert = p.signed_by(&key, &issuer).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    };

    let server_sans = vec![
        SanType::DnsName("localhost".try_into().map_err(err)?),
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
    ];
    let (crt, key) = leaf(
        "localhost",
        server_sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    write_file(&dir.join("server.crt"), crt.as_bytes(), 0o644)?;
    write_file(&dir.join("server.key"), key.as_bytes(), 0o600)?;
    for (cn, _) in DEV_CLIENTS {
        let (crt, key) = leaf(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;
        write_file(&dir.join(format!("{cn}.crt")), crt.as_bytes(), 0o644)?;
        write_file(&dir.join(format!("{cn}.key")), key.as_bytes(), 0o600)?;
    }
    Ok(())
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "hsm-service dev");
    dn
}

fn validity(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 12, 31);
}
