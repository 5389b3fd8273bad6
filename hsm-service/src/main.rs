//! `hsm-service`: `dev` for a ready-to-use local service, `serve --config FILE` for
//! production.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hsm_service::config::{Config, LogFormat};
use hsm_service::dev::{self, DevOptions};
use hsm_service::{logging, server};

#[derive(Parser)]
#[command(
    name = "hsm-service",
    version,
    about = "HSM-backed credential and signing service"
)]
struct Cli {
    /// Log format (overrides the config file).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run with a SoftHSM token and a development PKI, created on first run.
    Dev {
        /// Data directory (token, PINs, PKI, config, state).
        #[arg(long, default_value = dev::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Keep the state in this PostgreSQL database (URL without a password) instead of
        /// the embedded file: written into the data directory's config.toml on first run,
        /// used from there afterwards. Several `dev` processes over one such data
        /// directory, each with its own --listen, are one service.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// File holding the database password (with --postgres).
        #[arg(long, value_name = "FILE")]
        postgres_password_file: Option<PathBuf>,
        /// This instance's name, its audit chain (PostgreSQL store only); default
        /// store.instance of the config, else dev-<ip>-<port> of the listen address.
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
        /// Address of the Prometheus metrics endpoint (plain HTTP, GET /metrics); default
        /// `[metrics] listen` of the config, else 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Run with a configuration file.
    Serve {
        /// The TOML configuration (see hsm-service/config.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Offline, with the service stopped: create the trusted backup KEK on the token (as
    /// the security officer, value from the token's RNG) and write its M-of-N shares, one
    /// file per officer (`OUT/<label>.share-<i>`, mode 0600). The KEK itself is never
    /// written anywhere.
    BackupKek {
        /// The service's TOML configuration (which token).
        #[arg(long)]
        config: PathBuf,
        /// File holding the token's SO PIN (dev mode: DATA_DIR/so.pin).
        #[arg(long)]
        so_pin_file: PathBuf,
        /// Label of the KEK on the token, and prefix of the share files.
        #[arg(long)]
        label: String,
        /// Shares needed to restore (M, at least 2).
        #[arg(long)]
        threshold: u8,
        /// Shares made (N, one per officer).
        #[arg(long)]
        shares: u8,
        /// Existing directory for the share files; existing files are never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Offline, with the service stopped: create the RSA-3072 key pair PSKC vendors
    /// encrypt seeds to (RFC 6030 section 6.3), label `pskc-transport-NAME` (private key
    /// sensitive, never extractable, decrypt/unwrap only), and print its public key
    /// (PEM) for the vendor. With --show, print the existing one's.
    PskcTransportKey {
        /// The service's TOML configuration (which token).
        #[arg(long)]
        config: PathBuf,
        /// Print the public key of an existing transport key instead of creating one.
        #[arg(long)]
        show: bool,
        /// The key's name (as `hsmctl credential import --transport-key NAME` gives it).
        name: String,
    },
    /// Offline, with the service stopped: copy every table and every audit chain of the
    /// config's embedded store into an EMPTY PostgreSQL database (migrations applied
    /// first; a non-empty one is refused), page by page; then verify row counts and the
    /// audit trail on the target, and print what to change in the config.
    MigrateStore {
        /// The service's TOML configuration (its embedded store is the source).
        #[arg(long)]
        config: PathBuf,
        /// The target database, without a password, e.g. postgresql://hsm@db:5432/hsm.
        #[arg(long, value_name = "URL")]
        to_postgres: String,
        /// File holding the database password.
        #[arg(long)]
        password_file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::MigrateStore { .. } = &cli.command {
        return match migrate_store(&cli.command) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(message) => {
                eprintln!("hsm-service: {message}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::PskcTransportKey { .. } = &cli.command {
        return match pskc_transport_key(&cli.command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("hsm-service: {message}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::BackupKek { .. } = &cli.command {
        return match backup_kek(&cli.command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("hsm-service: {message}");
                ExitCode::FAILURE
            }
        };
    }
    // Everything that touches the process environment (SOFTHSM2_CONF) and the token set-up
    // happens here, before the runtime's threads exist.
    let (config, dev_dir) = match prepare(&cli) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("hsm-service: {message}");
            return ExitCode::FAILURE;
        }
    };
    logging::init(
        cli.log_format.unwrap_or(config.log.format),
        config.log.filter.as_deref(),
    );
    #[cfg(feature = "fault-injection")]
    tracing::warn!(
        "this binary was built with the test-only feature fault-injection; \
         never deploy it (see hsm-service/src/hsm/faults.rs)"
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hsm-service: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let signal = shutdown_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        server::run(config, signal, |addr, metrics| {
        println!("hsm-service listening on {addr} (gRPC, mutual TLS)");
        if let Some(m) = metrics {
            println!("hsm-service metrics on http://{m}/metrics");
        }
        if let Some(dir) = &dev_dir {
            let pki = dir.join("pki");
            println!("dev PKI: {} (ca.crt; login-service, officer-1..3, auditor .crt/.key)", pki.display());
            println!("try:     cargo run -p hsm-client --bin hsmctl -- health --endpoint https://{addr}");
        }
        })
        .await
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("hsm-service: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `backup-kek`: a single-thread runtime for the store write, no logging of anything
/// secret; one line per share file.
fn backup_kek(command: &Command) -> Result<(), String> {
    let Command::BackupKek {
        config,
        so_pin_file,
        label,
        threshold,
        shares,
        out,
    } = command
    else {
        return Err("not backup-kek".into());
    };
    let config = Config::load(config).map_err(|e| e.to_string())?;
    if let Some(conf) = &config.hsm.softhsm2_conf {
        dev::point_softhsm_at(conf)?;
    }
    if let Some(conf) = &config.hsm.kryoptic_conf {
        dev::SoftToken::Kryoptic.point_at(conf)?;
    }
    let pin = zeroize::Zeroizing::new(
        std::fs::read_to_string(so_pin_file)
            .map_err(|e| format!("SO PIN file {}: {e}", so_pin_file.display()))?,
    );
    let so_pin = secrecy::SecretString::from(pin.trim().to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("backup-kek: runtime: {e}"))?;
    let (paths, check) = runtime.block_on(async {
        let store = hsm_service::server::open_store(&config, Default::default())
            .await
            .map_err(|e| format!("backup-kek: {e} (backup-kek runs with the service stopped)"))?;
        hsm_service::ceremony::shares::backup_kek_offline(
            &config, store, &so_pin, label, *threshold, *shares, out,
        )
        .await
        .map_err(|e| format!("backup-kek: {e}"))
    })?;
    println!("trusted KEK {label:?} created (check value {check}); {threshold} of {shares} shares needed to restore:");
    for p in &paths {
        println!("{}", p.display());
    }
    println!("recorded in the service's store, with an audit record; plans may now name it");
    Ok(())
}

/// `pskc-transport-key`: the key pair on the token (no store change), its public key as
/// a PEM SubjectPublicKeyInfo on stdout. No CSR: the private key may not sign (its one
/// usage is decrypting what vendors encrypt to it).
fn pskc_transport_key(command: &Command) -> Result<(), String> {
    use base64::Engine as _;
    let Command::PskcTransportKey { config, show, name } = command else {
        return Err("not pskc-transport-key".into());
    };
    if !hsm_service::common::valid_key_name(name) {
        return Err(format!(
            "pskc-transport-key: {}",
            hsm_service::common::KEY_NAME_RULE
        ));
    }
    let config = Config::load(config).map_err(|e| e.to_string())?;
    if let Some(conf) = &config.hsm.softhsm2_conf {
        dev::point_softhsm_at(conf)?;
    }
    let settings = hsm_service::hsm::HsmSettings {
        module: config.hsm.module.clone(),
        token: config.token(),
        sessions: 1,
        queue_capacity: 1,
        seed_cache_capacity: 1,
    };
    let pin = config.user_pin()?;
    let hsm = hsm_service::hsm::Hsm::open(&settings, pin)
        .map_err(|e| format!("pskc-transport-key: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("pskc-transport-key: runtime: {e}"))?;
    let (n, e) = runtime
        .block_on(async {
            if *show {
                hsm.transport_public_key(name).await
            } else {
                hsm.create_transport_key(name).await
            }
        })
        .map_err(|e| format!("pskc-transport-key: {e}"))?;
    let der = hsm_service::common::PublicKey::from_rsa_components(&n, &e)
        .and_then(|k| k.to_spki_der())
        .map_err(|e| format!("pskc-transport-key: {e}"))?;
    let fingerprint = hsm_service::audit::sha256_hex(&der);
    if !*show {
        // Recorded like the backup KEK: an audit record in the service's store.
        let event = hsm_service::audit::Event::new(
            hsm_service::common::Clock::system().now_ms(),
            hsm_service::audit::Actor::new("operator (offline pskc-transport-key)", ""),
            "pskc-transport-key.create",
            name,
        )
        .with_details(
            hsm_service::audit::Details::new()
                .str("label", &hsm_service::hsm::import::transport_label(name))
                .str("spki_sha256", &fingerprint)
                .u64("modulus_bits", hsm_service::hsm::import::TRANSPORT_RSA_BITS),
        );
        runtime
            .block_on(async {
                let store = hsm_service::server::open_store(&config, Default::default())
                    .await
                    .map_err(|e| {
                        format!("{e} (pskc-transport-key runs with the service stopped)")
                    })?;
                store
                    .write(move |txn| {
                        hsm_service::audit::log::append_in(
                            txn,
                            hsm_service::store::DEFAULT_CHAIN,
                            event,
                        )
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                store.close().map_err(|e| e.to_string())
            })
            .map_err(|e| {
                format!("pskc-transport-key: the key pair was made, but recording it failed: {e}")
            })?;
        eprintln!(
            "transport key {name:?} created on the token (label {}, SPKI SHA-256 {fingerprint}); recorded in the audit trail; give the vendor this public key:",
            hsm_service::hsm::import::transport_label(name)
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    println!("-----BEGIN PUBLIC KEY-----");
    for line in b64.as_bytes().chunks(64) {
        println!("{}", String::from_utf8_lossy(line));
    }
    println!("-----END PUBLIC KEY-----");
    Ok(())
}

/// `migrate-store`: blocking from start to end (no runtime: the PostgreSQL client runs its
/// own); `Ok(false)` when the copy did not verify.
fn migrate_store(command: &Command) -> Result<bool, String> {
    use hsm_service::config::StoreBackendKind;
    use hsm_service::server::migrate;
    let Command::MigrateStore {
        config,
        to_postgres,
        password_file,
    } = command
    else {
        return Err("not migrate-store".into());
    };
    let config = Config::load(config).map_err(|e| e.to_string())?;
    hsm_service::store::postgres::check_url(to_postgres)
        .map_err(|e| format!("migrate-store: --to-postgres: {e}"))?;
    if config.store.backend != StoreBackendKind::Redb {
        return Err(
            "migrate-store: the config's store is already PostgreSQL; the source is an embedded store".into(),
        );
    }
    let path = config.data_dir.join(hsm_service::store::EMBEDDED_FILE);
    if !path.is_file() {
        return Err(format!(
            "migrate-store: no embedded store at {}",
            path.display()
        ));
    }
    let source =
        hsm_service::store::RedbBackend::open(&path, &Default::default()).map_err(|e| {
            format!(
                "migrate-store: {}: {e} (run it with the service stopped)",
                path.display()
            )
        })?;
    let mut target_config = config.store.clone();
    target_config.backend = StoreBackendKind::Postgres;
    target_config.url = Some(to_postgres.clone());
    target_config.password_file = Some(password_file.clone());
    target_config.instance = Some(hsm_service::store::DEFAULT_CHAIN.to_owned());
    let options = target_config
        .postgres_options()
        .map_err(|e| format!("migrate-store: {e}"))?;
    let target = hsm_service::store::postgres::PgBackend::open(&options)
        .map_err(|e| format!("migrate-store: {to_postgres}: {e}"))?;
    let summary = migrate::copy_store(&source, &target, |line| println!("{line}"))
        .map_err(|e| format!("migrate-store: {e}"))?;
    print!("{summary}");
    if !summary.is_ok() {
        println!("migrate-store: the copy does NOT verify (see above): keep the embedded store");
        return Ok(false);
    }
    let chains: Vec<String> = summary.chains.iter().map(|(c, _, _)| c.clone()).collect();
    println!("migrate-store: every table and audit chain copied and verified");
    print!(
        "{}",
        migrate::config_advice(to_postgres, password_file, &chains)
    );
    Ok(true)
}

fn prepare(cli: &Cli) -> Result<(Config, Option<PathBuf>), String> {
    match &cli.command {
        Command::Dev {
            data_dir,
            listen,
            postgres,
            postgres_password_file,
            instance,
            metrics_listen,
        } => {
            let mut opts = DevOptions::new(data_dir);
            opts.metrics_listen = *metrics_listen;
            opts.listen = *listen;
            opts.postgres = postgres.clone();
            opts.postgres_password_file = postgres_password_file.clone();
            opts.instance = instance.clone();
            let config = dev::prepare(&opts)?;
            Ok((config, Some(data_dir.clone())))
        }
        Command::BackupKek { .. } => Err("backup-kek runs without the service".into()),
        Command::PskcTransportKey { .. } => {
            Err("pskc-transport-key runs without the service".into())
        }
        Command::MigrateStore { .. } => Err("migrate-store runs without the service".into()),
        Command::Serve { config } => {
            let config = Config::load_for_serve(config).map_err(|e| e.to_string())?;
            if let Some(conf) = &config.hsm.softhsm2_conf {
                dev::point_softhsm_at(conf)?;
            }
            if let Some(conf) = &config.hsm.kryoptic_conf {
                dev::SoftToken::Kryoptic.point_at(conf)?;
            }
            Ok((config, None))
        }
    }
}

/// A future that resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives right after the
/// "listening" line is not lost to the default action.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
