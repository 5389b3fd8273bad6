//! Runs the real `hsmctl` binary against a service started in the test process.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};

use hsm_service::testing::DevEnv;

/// `hsmctl` with connection flags for `identity`, then `args`.
pub fn hsmctl(env: &DevEnv, addr: SocketAddr, identity: &str, args: &[&str]) -> Output {
    command(env, addr, identity)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hsmctl")
}

/// The command, for callers that need stdin.
pub fn command(env: &DevEnv, addr: SocketAddr, identity: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hsmctl"));
    c.arg("--endpoint")
        .arg(format!("https://{addr}"))
        .arg("--ca")
        .arg(env.pki("ca.crt"))
        .arg("--cert")
        .arg(env.pki(&format!("{identity}.crt")))
        .arg("--key")
        .arg(env.pki(&format!("{identity}.key")));
    c
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard output parsed as JSON.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {o:?}"))
}
