//! `hsmctl`: the command line for officers, auditors and performance engineers.
//!
//! Every subcommand takes the same connection flags (`--endpoint`, `--ca`, `--cert`,
//! `--key`, or their `HSMCTL_*` environment variables); the defaults find the dev
//! service and its `login-service` certificate under `.hsm-dev/`.

mod signing_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

mod app_cmd;
mod audit_cmd;
mod bench_cmd;
mod ceremony_cmd;
mod credential_cmd;
mod events_cmd;

use clap::{Args, Parser, Subcommand};
use hsm_client::proto::GetStatusRequest;
use hsm_client::{ClientConfig, ClientError, HsmClient};
use serde_json::json;

#[derive(Parser)]
#[command(name = "hsmctl", version, about = "Command line for hsm-service")]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Connection {
    /// Service endpoint.
    #[arg(long, global = true, env = "HSMCTL_ENDPOINT", default_value = hsm_client::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// CA certificate (PEM) of the server.
    #[arg(
        long,
        global = true,
        env = "HSMCTL_CA",
        default_value = ".hsm-dev/pki/ca.crt"
    )]
    ca: PathBuf,
    /// Client certificate (PEM).
    #[arg(
        long,
        global = true,
        env = "HSMCTL_CERT",
        default_value = ".hsm-dev/pki/login-service.crt"
    )]
    cert: PathBuf,
    /// Client private key (PEM).
    #[arg(
        long,
        global = true,
        env = "HSMCTL_KEY",
        default_value = ".hsm-dev/pki/login-service.key"
    )]
    key: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Ask the standard health service; exits 0 only when SERVING.
    Health {
        /// One service's status instead of the server's.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Token, pool and caller information (role officer or auditor).
    Status,
    /// The audit trail: export, checkpoint keys, offline verification.
    #[command(subcommand)]
    Audit(audit_cmd::Cmd),
    /// Load generator: closed or open loop, latency percentiles, --json, --plot.
    Bench(bench_cmd::BenchArgs),
    /// HOTP/TOTP credentials.
    #[command(subcommand)]
    Credential(credential_cmd::Cmd),
    /// Sign assertions and messages (role login-service).
    #[command(subcommand)]
    Sign(signing_cmd::SignCommand),
    /// Public keys, key inventory and certificates.
    #[command(subcommand)]
    Keys(signing_cmd::KeysCommand),
    /// Key ceremonies: propose a plan, approve, execute, show, list (role officer).
    #[command(subcommand)]
    Ceremony(ceremony_cmd::Cmd),
    /// The event stream (watch, list; the notification relay) and notification
    /// preferences.
    #[command(subcommand)]
    Events(events_cmd::Cmd),
    /// App devices: begin an activation, list, revoke (role login-service; officers).
    #[command(subcommand)]
    Device(app_cmd::DeviceCmd),
    /// Approval challenges as the login service asks them: create, get, wait.
    #[command(subcommand)]
    Approval(app_cmd::ApprovalCmd),
    /// The reference app (plays the citizen's phone): activate, pending, approve, deny,
    /// not-me.
    #[command(subcommand)]
    App(app_cmd::AppCmd),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                let code = match &e {
                    ClientError::Status(s) => format!("{:?}", s.code()),
                    ClientError::Cursor(_) => "Cursor".to_owned(),
                    ClientError::Output(_) => "Output".to_owned(),
                    ClientError::App(_) => "App".to_owned(),
                    ClientError::Qr(_) => "Qr".to_owned(),
                    _ => "Unavailable".to_owned(),
                };
                println!(
                    "{}",
                    json!({ "error": { "code": code, "message": e.to_string() } })
                );
            } else {
                eprintln!("hsmctl: {e}");
            }
            ExitCode::from(2)
        }
    }
}

/// The metrics lines of `hsmctl status`.
fn print_metrics(m: &hsm_client::proto::MetricsSummary) {
    let ratio = |part: u64, whole: u64| {
        if whole == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", part as f64 * 100.0 / whole as f64)
        }
    };
    let endpoint = if m.endpoint.is_empty() {
        "off ([metrics] listen)"
    } else {
        &m.endpoint
    };
    println!("metrics: {endpoint}");
    println!("rpc:     {} calls, {} not OK", m.rpc_requests, m.rpc_failed);
    println!(
        "verify:  {} accepted, {} not accepted",
        m.verify_accepted, m.verify_not_accepted
    );
    println!(
        "seeds:   cache {} hits, {} misses ({} hit rate), {} evictions; {} PKCS#11 errors",
        m.seed_cache_hits,
        m.seed_cache_misses,
        ratio(m.seed_cache_hits, m.seed_cache_hits + m.seed_cache_misses),
        m.seed_cache_evictions,
        m.hsm_errors
    );
    let per_commit = if m.commits == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}", m.committed_jobs as f64 / m.commits as f64)
    };
    println!(
        "store:   {} commits, {} writes ({per_commit} per commit)",
        m.commits, m.committed_jobs
    );
    println!(
        "audit:   {} records, {} checkpoints; {} open event watches",
        m.audit_records, m.audit_checkpoints, m.event_watches_open
    );
}

fn client_config(conn: &Connection) -> ClientConfig {
    ClientConfig {
        endpoint: conn.endpoint.clone(),
        ca: conn.ca.clone(),
        cert: conn.cert.clone(),
        key: conn.key.clone(),
    }
}

async fn connect(conn: &Connection) -> Result<HsmClient, ClientError> {
    client_config(conn).connect().await
}

async fn run(cli: &Cli) -> Result<ExitCode, ClientError> {
    if let Command::Audit(cmd) = &cli.command {
        if cmd.offline() {
            return audit_cmd::verify(cmd, cli.json);
        }
    }
    if let Command::Bench(args) = &cli.command {
        // Its own targets: every `--addr`, or `--endpoint`.
        let targets = bench_cmd::connect_targets(&client_config(&cli.conn), args).await?;
        return bench_cmd::run(&targets, args, cli.json).await;
    }
    if let Command::Events(events_cmd::Cmd::Watch(args)) = &cli.command {
        let cursor = events_cmd::open_cursor(args)?;
        let client = connect(&cli.conn).await?;
        return events_cmd::watch(&client, args, cursor, cli.json).await;
    }
    let client = connect(&cli.conn).await?;
    match &cli.command {
        Command::Sign(cmd) => signing_cmd::sign(&client, cmd, cli.json).await,
        Command::Keys(cmd) => signing_cmd::keys(&client, cmd, cli.json).await,
        Command::Ceremony(cmd) => ceremony_cmd::run(&client, cmd, cli.json).await,
        Command::Events(cmd) => events_cmd::run(&client, cmd, cli.json).await,
        Command::Device(cmd) => app_cmd::device(&client, cmd, cli.json).await,
        Command::Approval(cmd) => app_cmd::approval(&client, cmd, cli.json).await,
        Command::App(cmd) => app_cmd::app(&client, cmd, cli.json).await,
        Command::Health { service } => {
            let status = client.health_of(service).await?;
            let name = status.as_str_name();
            if cli.json {
                println!("{}", json!({ "service": service, "status": name }));
            } else {
                println!("{name}");
            }
            Ok(if name == "SERVING" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Audit(cmd) => audit_cmd::run(&client, cmd, cli.json).await,
        Command::Bench(_) => unreachable!("handled above"),
        Command::Credential(cmd) => credential_cmd::run(&client, cmd, cli.json).await,
        Command::Status => {
            let s = client
                .admin()
                .get_status(GetStatusRequest {})
                .await?
                .into_inner();
            let token = s.token.unwrap_or_default();
            let pool = s.pool.unwrap_or_default();
            let m = s.metrics.unwrap_or_default();
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "version": s.version,
                        "uptime_seconds": s.uptime_seconds,
                        "caller": { "role": s.caller_role, "subject": s.caller_subject },
                        "token": {
                            "label": token.label, "serial_number": token.serial_number,
                            "manufacturer": token.manufacturer, "model": token.model,
                            "library": token.library, "logged_in": token.logged_in,
                        },
                        "pool": {
                            "sessions": pool.sessions, "queue_capacity": pool.queue_capacity,
                            "queued": pool.queued, "completed": pool.completed,
                            "rejected_busy": pool.rejected_busy, "sessions_replaced": pool.sessions_replaced,
                        },
                        "metrics": {
                            "endpoint": m.endpoint,
                            "rpc_requests": m.rpc_requests, "rpc_failed": m.rpc_failed,
                            "verify_accepted": m.verify_accepted, "verify_not_accepted": m.verify_not_accepted,
                            "hsm_errors": m.hsm_errors,
                            "seed_cache_hits": m.seed_cache_hits, "seed_cache_misses": m.seed_cache_misses,
                            "seed_cache_evictions": m.seed_cache_evictions,
                            "commits": m.commits, "committed_jobs": m.committed_jobs,
                            "audit_records": m.audit_records, "audit_checkpoints": m.audit_checkpoints,
                            "event_watches_open": m.event_watches_open,
                        },
                    })
                );
            } else {
                println!("hsm-service {} (up {} s)", s.version, s.uptime_seconds);
                println!("caller:  {} ({})", s.caller_subject, s.caller_role);
                println!(
                    "token:   {} serial {} ({} {}), {}, logged in: {}",
                    token.label,
                    token.serial_number,
                    token.manufacturer,
                    token.model,
                    token.library,
                    token.logged_in
                );
                println!(
                    "pool:    {} sessions, queue {}/{}, {} done, {} refused busy, {} sessions replaced",
                    pool.sessions, pool.queued, pool.queue_capacity, pool.completed, pool.rejected_busy, pool.sessions_replaced
                );
                print_metrics(&m);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
