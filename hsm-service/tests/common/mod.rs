//! Shared helpers for the integration tests: clients for each dev identity, and the real
//! `hsm-service` binary run as a child process.
#![allow(dead_code, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hsm_client::{ClientConfig, HsmClient};

pub mod app;
pub mod cluster;
pub mod pki;

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
        .env_remove("KRYOPTIC_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hsm-service");
    let addr = read_listen_addr(&mut child);
    (child, addr)
}

/// `hsm-service dev` with `dev_flags` after `dev` (e.g. `--instance NAME`, `--postgres
/// URL`), logging warnings only, its stderr drained so that a long run never blocks on a
/// full pipe; returns it and its address once it listens.
pub fn spawn_dev_quiet(data_dir: &Path, dev_flags: &[&str]) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-service"))
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(dev_flags)
        .env_remove("SOFTHSM2_CONF")
        .env_remove("KRYOPTIC_CONF")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hsm-service");
    // Reads stderr itself if the child fails to start, so it is drained only after.
    let addr = read_listen_addr(&mut child);
    if let Some(mut err) = child.stderr.take() {
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()).ok());
    }
    (child, addr)
}

/// `hsm-service dev` with `dev_flags` after `dev` (e.g. `--metrics-listen ADDR`); returns
/// it, its gRPC address and the metrics address it prints (`None`: it printed none).
pub fn spawn_dev_metrics(
    data_dir: &Path,
    dev_flags: &[&str],
) -> (Child, SocketAddr, Option<SocketAddr>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-service"))
        .args(["dev", "--listen", "127.0.0.1:0"])
        .args(dev_flags)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hsm-service");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut addr_after = |prefix: &str| {
        let line = lines.next()?.ok()?;
        line.strip_prefix(prefix)?
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()?
            .parse::<SocketAddr>()
            .ok()
    };
    let Some(grpc) = addr_after("hsm-service listening on ") else {
        let status = child.wait().expect("wait");
        panic!("hsm-service dev did not start ({status})");
    };
    let metrics = addr_after("hsm-service metrics on http://");
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, grpc, metrics)
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
        .env_remove("KRYOPTIC_CONF")
        .stdin(Stdio::null());
    c
}

pub fn read_listen_addr(child: &mut Child) -> SocketAddr {
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

/// Send SIGHUP (the service re-reads its CRLs).
pub fn hangup(child: &Child) {
    signal(child, "HUP");
}

/// Send SIGKILL and reap.
pub fn kill(child: &mut Child) {
    signal(child, "KILL");
    wait_bounded(child, Duration::from_secs(30));
}

pub fn signal(child: &Child, name: &str) {
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

/// The service's JWK Set as a relying party fetches it.
pub async fn jwks(client: &HsmClient) -> jsonwebtoken::jwk::JwkSet {
    let text = client
        .signing()
        .get_jwks(hsm_client::proto::GetJwksRequest::default())
        .await
        .expect("jwks")
        .into_inner()
        .jwks_json;
    serde_json::from_str(&text).expect("a JWK Set")
}

/// The service's JWK Set of the keys of `usage` (`GetJwks` with that usage).
pub async fn jwks_of_usage(client: &HsmClient, usage: &str) -> jsonwebtoken::jwk::JwkSet {
    let text = client
        .signing()
        .get_jwks(hsm_client::proto::GetJwksRequest {
            usage: usage.to_owned(),
        })
        .await
        .expect("jwks")
        .into_inner()
        .jwks_json;
    serde_json::from_str(&text).expect("a JWK Set")
}

/// Verify `jws` the way a relying party does: pick the JWK by `kid`, check signature,
/// issuer, audience and expiry with jsonwebtoken (audience `https://bank.example`).
pub fn verify(jws: &str, set: &jsonwebtoken::jwk::JwkSet) -> Result<serde_json::Value, String> {
    let header = jsonwebtoken::decode_header(jws).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = set.find(&kid).ok_or(format!("kid {kid} not in the JWKS"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&["https://hsm-service.dev.local"]);
    validation.set_audience(&["https://bank.example"]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
    jsonwebtoken::decode::<serde_json::Value>(jws, &key, &validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// `ProposeCeremony`: the ceremony id.
pub async fn propose(c: &HsmClient, plan: &str) -> Result<String, tonic::Status> {
    c.ceremonies()
        .propose_ceremony(hsm_client::proto::ProposeCeremonyRequest {
            plan_toml: plan.to_owned(),
        })
        .await
        .map(|r| r.into_inner().ceremony_id)
}

/// `ApproveCeremony`, with the text of a KEK share file or `""` for none.
pub async fn approve_with_share(
    c: &HsmClient,
    id: &str,
    kek_share: &str,
) -> Result<hsm_client::proto::CeremonyInfo, tonic::Status> {
    c.ceremonies()
        .approve_ceremony(hsm_client::proto::ApproveCeremonyRequest {
            ceremony_id: id.to_owned(),
            kek_share: kek_share.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
}

/// `ExecuteCeremony`.
pub async fn execute(
    c: &HsmClient,
    id: &str,
) -> Result<hsm_client::proto::ExecuteCeremonyResponse, tonic::Status> {
    c.ceremonies()
        .execute_ceremony(hsm_client::proto::ExecuteCeremonyRequest {
            ceremony_id: id.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
}

/// The HOTP code (HMAC-SHA-1, 6 digits) of `seed` at `counter`, in software.
pub fn hotp(seed: &[u8], counter: u64) -> String {
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, seed),
        &hsm_service::otp::moving_factor(counter),
    );
    let digits = hsm_service::otp::Digits::new(6).expect("digits");
    format!("{:06}", hsm_service::otp::truncate(tag.as_ref(), digits))
}

/// The seed of the credentials [`enrol`] makes.
pub const EVIDENCE_SEED: &[u8] = b"evidence-seed-000001";

/// Enrol HOTP credential `id` with [`EVIDENCE_SEED`] for `subject` (empty: none).
pub async fn enrol(c: &HsmClient, id: &str, subject: &str) {
    c.credentials()
        .create_credential(hsm_client::proto::CreateCredentialRequest {
            credential_id: id.into(),
            kind: hsm_client::proto::OtpKind::Hotp as i32,
            seed: EVIDENCE_SEED.to_vec(),
            subject: subject.into(),
            ..Default::default()
        })
        .await
        .expect("create credential");
}

/// VerifyCode of credential `id` (made by [`enrol`]) at HOTP `counter`: the response.
pub async fn verify_hotp(
    c: &HsmClient,
    id: &str,
    counter: u64,
) -> hsm_client::proto::VerifyCodeResponse {
    c.credentials()
        .verify_code(hsm_client::proto::VerifyCodeRequest {
            credential_id: id.into(),
            code: hotp(EVIDENCE_SEED, counter),
        })
        .await
        .expect("verify")
        .into_inner()
}

/// Evidence of a fresh authentication of `subject`: enrols a credential for it and
/// verifies its first code; the evidence id of that ACCEPTED.
pub async fn evidence_for(c: &HsmClient, subject: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("evidence-{}-{n}", std::process::id());
    enrol(c, &id, subject).await;
    let r = verify_hotp(c, &id, 0).await;
    assert_eq!(r.result, hsm_client::proto::VerifyResult::Accepted as i32);
    assert_eq!(
        r.evidence_id.len(),
        32,
        "an ACCEPTED code of a subject gives evidence"
    );
    r.evidence_id
}

/// `SignAssertion` with the default key for `citizen-1`, audience `https://bank.example`
/// (what [`verify`] expects), bound to the evidence of a fresh authentication of
/// `citizen-1` (so it needs no `unbound_assertions`).
pub async fn sign_default_assertion(c: &HsmClient) -> hsm_client::proto::SignAssertionResponse {
    let evidence_id = evidence_for(c, "citizen-1").await;
    c.signing()
        .sign_assertion(hsm_client::proto::SignAssertionRequest {
            subject: "citizen-1".into(),
            audience: vec!["https://bank.example".into()],
            acr: hsm_service::signing::NSIS_ACR_VALUES[0].into(),
            evidence_id,
            ..Default::default()
        })
        .await
        .expect("sign assertion")
        .into_inner()
}

/// The whole audit trail as an auditor exports it, parsed record by record.
pub async fn audit_records(auditor: &HsmClient) -> Vec<hsm_service::audit::AuditRecord> {
    let mut stream = auditor
        .audit()
        .export_audit(hsm_client::proto::ExportAuditRequest {
            from_seq: 1,
            chain: String::new(),
        })
        .await
        .expect("export")
        .into_inner();
    let mut jsonl = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        jsonl.extend_from_slice(&chunk.jsonl);
    }
    String::from_utf8(jsonl)
        .expect("utf-8")
        .lines()
        .map(|l| hsm_service::audit::AuditRecord::from_json_line(l).expect("a record"))
        .collect()
}

/// The string detail `key` of `record` (empty when absent).
pub fn detail<'a>(record: &'a hsm_service::audit::AuditRecord, key: &str) -> &'a str {
    record
        .details
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| v.as_str())
        .unwrap_or("")
}
