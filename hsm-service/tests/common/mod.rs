//! Shared helpers for the integration tests: clients for each dev identity, and the real
//! `hsm-service` binary run as a child process.
#![allow(dead_code, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hsm_client::{ClientConfig, HsmClient};

/// A client of `addr` presenting the dev certificate `identity` of `data_dir`.
pub async fn client(data_dir: &Path, identity: &str, addr: SocketAddr) -> HsmClient {
    ClientConfig::dev(data_dir, identity)
        .with_endpoint(format!("https://{addr}"))
        .connect()
        .await
        .expect("connect")
}

/// `hsm-service dev` as a child process on 127.0.0.1:0; returns it and its address once
/// it prints that it is listening.
pub fn spawn_dev(data_dir: &Path) -> (Child, SocketAddr) {
    spawn_dev_with(data_dir, &[])
}

/// The same with extra global flags (e.g. `--log-format json`).
pub fn spawn_dev_with(data_dir: &Path, flags: &[&str]) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-service"))
        .args(flags)
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hsm-service");
    let addr = read_listen_addr(&mut child);
    (child, addr)
}

/// `hsm-service serve --config FILE` as a child process.
pub fn spawn_serve(config: &Path) -> (Child, SocketAddr) {
    let mut child = serve_command(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hsm-service");
    let addr = read_listen_addr(&mut child);
    (child, addr)
}

pub fn serve_command(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hsm-service"));
    c.args(["serve", "--config"])
        .arg(config)
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null());
    c
}

fn read_listen_addr(child: &mut Child) -> SocketAddr {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    match first {
        Some(Ok(line)) if line.starts_with("hsm-service listening on ") => line
            .trim_start_matches("hsm-service listening on ")
            .split_whitespace()
            .next()
            .expect("address")
            .parse()
            .expect("socket address"),
        other => {
            let status = child.wait().expect("wait");
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).ok();
            }
            panic!("hsm-service did not start ({status}): {other:?}\n{err}");
        }
    }
}

/// Send SIGTERM and wait (bounded) for the exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    signal(child, "TERM");
    wait_bounded(child, Duration::from_secs(30))
}

/// Send SIGKILL and reap.
pub fn kill(child: &mut Child) {
    signal(child, "KILL");
    wait_bounded(child, Duration::from_secs(30));
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{name} failed");
}

fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("hsm-service did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
