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
    },
    /// Run with a configuration file.
    Serve {
        /// The TOML configuration (see hsm-service/config.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        server::run(config, signal, |addr| {
        println!("hsm-service listening on {addr} (gRPC, mutual TLS)");
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

fn prepare(cli: &Cli) -> Result<(Config, Option<PathBuf>), String> {
    match &cli.command {
        Command::Dev { data_dir, listen } => {
            let mut opts = DevOptions::new(data_dir);
            opts.listen = *listen;
            let config = dev::prepare(&opts)?;
            Ok((config, Some(data_dir.clone())))
        }
        Command::Serve { config } => {
            let config = Config::load(config).map_err(|e| e.to_string())?;
            if let Some(conf) = &config.hsm.softhsm2_conf {
                dev::point_softhsm_at(conf)?;
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
