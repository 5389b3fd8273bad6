//! Transport: revocation (CRLs, reloaded), issuer pinning, decode limits and the role
//! check before decoding, against the real server and client.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use common::pki;
use hsm_client::proto::{ApproveCeremonyRequest, GetStatusRequest, VerifyCodeRequest};
use hsm_client::ClientConfig;
use hsm_service::testing::DevEnv;
use tonic::Code;

/// A client of `addr` with the certificate `dir/<file>.crt` and `.key`.
fn config(env: &DevEnv, addr: std::net::SocketAddr, dir: &Path, file: &str) -> ClientConfig {
    ClientConfig {
        endpoint: format!("https://{addr}"),
        ca: env.pki("ca.crt"),
        cert: dir.join(format!("{file}.crt")),
        key: dir.join(format!("{file}.key")),
    }
}

/// Whether a handshake with `config` is refused: at connect, or (TLS 1.3 lets the client
/// finish first) at its first call.
async fn refused(config: &ClientConfig) -> bool {
    match config.connect().await {
        Err(_) => true,
        Ok(client) => client.health().await.is_err(),
    }
}

async fn serves(config: &ClientConfig) -> bool {
    match config.connect().await {
        Err(_) => false,
        Ok(client) => client.health().await.is_ok(),
    }
}

#[tokio::test]
async fn revoked_certificate_fails_the_handshake_and_crls_reload() {
    let mut env = DevEnv::new();
    let pki_dir = env.dir.path().join("pki");
    let ca = pki::dev_ca(env.dir.path());
    let crl_path = env.dir.path().join("clients.crl");
    // Start with a CRL (PEM) that revokes nothing.
    std::fs::write(&crl_path, pki::crl(&ca, 1, &[]).0).expect("write CRL");
    env.config.server.client_crls = vec![crl_path.clone()];
    let server = env.start().await;
    let addr = server.local_addr();
    let login = config(&env, addr, &pki_dir, "login-service");
    let officer = config(&env, addr, &pki_dir, "officer-1");
    assert!(serves(&login).await, "not revoked yet");

    // Revoke login-service (a DER CRL this time) and reload as SIGHUP does.
    let revoked = pki::serial(&pki_dir.join("login-service.crt"));
    std::fs::write(&crl_path, pki::crl(&ca, 2, &[revoked]).1).expect("write CRL");
    assert_eq!(server.reload_crls(), Ok(1));
    assert!(refused(&login).await, "revoked certificate accepted");
    assert!(serves(&officer).await, "other certificates still work");

    // A broken file keeps the previous CRLs in force.
    std::fs::write(&crl_path, b"not a CRL").expect("write");
    let err = server.reload_crls().expect_err("a bad CRL file is refused");
    assert!(err.contains("clients.crl"), "{err}");
    assert!(refused(&login).await, "the old CRLs must stay in force");
    assert!(serves(&officer).await);

    // An empty CRL again: the certificate works again.
    std::fs::write(&crl_path, pki::crl(&ca, 3, &[]).0).expect("write CRL");
    assert_eq!(server.reload_crls(), Ok(1));
    assert!(serves(&login).await);
    server.shutdown().await.expect("shutdown");
}

/// The real binary: `serve` with a CRL, the CRL file replaced, SIGHUP.
#[tokio::test]
async fn sighup_reloads_the_crls_of_a_running_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _) = common::spawn_dev(dir.path());
    assert!(common::terminate(&mut child).success());
    let ca = pki::dev_ca(dir.path());
    let crl_path = dir.path().join("clients.crl");
    std::fs::write(&crl_path, pki::crl(&ca, 1, &[]).0).expect("write CRL");
    let dev_config = std::fs::read_to_string(dir.path().join("config.toml")).expect("config");
    assert!(dev_config.contains("client_crls = []"), "{dev_config}");
    let config = dev_config
        .replace("127.0.0.1:50051", "127.0.0.1:0")
        .replace("client_crls = []", "client_crls = [\"clients.crl\"]");
    let path = dir.path().join("serve.toml");
    std::fs::write(&path, config).expect("write");
    let (mut child, addr) = common::spawn_serve(&path);
    let pki_dir = dir.path().join("pki");
    let login = ClientConfig {
        endpoint: format!("https://{addr}"),
        ca: pki_dir.join("ca.crt"),
        cert: pki_dir.join("login-service.crt"),
        key: pki_dir.join("login-service.key"),
    };
    let officer = ClientConfig {
        cert: pki_dir.join("officer-1.crt"),
        key: pki_dir.join("officer-1.key"),
        ..login.clone()
    };
    assert!(serves(&login).await);

    let revoked = pki::serial(&pki_dir.join("login-service.crt"));
    std::fs::write(&crl_path, pki::crl(&ca, 2, &[revoked]).0).expect("write CRL");
    common::hangup(&child);
    // The signal is handled asynchronously: wait (bounded) for the new CRLs to apply.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !refused(&login).await {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the CRLs"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(serves(&officer).await);
    assert!(
        common::terminate(&mut child).success(),
        "SIGHUP must not stop it"
    );
}

/// The server's HTTP/2 SETTINGS carry the configured stream limit (tonic's default is
/// none at all), read with a raw h2 client over the same mTLS.
#[tokio::test]
async fn http2_settings_carry_the_stream_limit() {
    let mut env = DevEnv::new();
    env.config.server.limits.max_concurrent_streams = 77;
    env.config.server.limits.max_concurrent_calls_per_connection = 7;
    let server = env.start().await;

    let stream = raw_tls(&env, server.local_addr()).await;
    let (mut client, mut connection) = h2::client::handshake(stream).await.expect("h2");
    // One health call, so the server's SETTINGS have surely arrived.
    let request = http::Request::post("https://localhost/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut body) = client.send_request(request, false).expect("send");
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .expect("empty HealthCheckRequest");
    let response = tokio::select! {
        r = response => r.expect("response"),
        c = &mut connection => panic!("connection ended first: {c:?}"),
    };
    assert_eq!(response.status(), 200);
    assert_eq!(connection.max_concurrent_send_streams(), 77);
    // Close it: an unpolled connection would hold the graceful shutdown until the
    // server's keepalive gives up on it.
    drop((client, connection));
    server.shutdown().await.expect("shutdown");
}

/// An mTLS connection (ALPN h2) as the dev auditor, for speaking HTTP/2 by hand.
async fn raw_tls(
    env: &DevEnv,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(env.pki("ca.crt")).expect("ca"))
        .expect("root");
    let chain = vec![CertificateDer::from_pem_file(env.pki("auditor.crt")).expect("crt")];
    let key = PrivateKeyDer::from_pem_file(env.pki("auditor.key")).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client config");
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("mTLS handshake")
}

/// A peer that never answers the server's keepalive PINGs is disconnected after
/// `keepalive_interval_seconds` + `keepalive_timeout_seconds`.
#[tokio::test]
async fn an_unresponsive_peer_is_dropped_by_keepalive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = DevEnv::new();
    env.config.server.limits.keepalive_interval_seconds = 1;
    env.config.server.limits.keepalive_timeout_seconds = 1;
    let server = env.start().await;
    let mut stream = raw_tls(&env, server.local_addr()).await;
    // The client preface and an empty SETTINGS frame, then silence.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let mut received = Vec::new();
    // Ends with a TLS close_notify or a reset: either way the connection is gone.
    let _ended = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        stream.read_to_end(&mut received),
    )
    .await
    .expect("the server closes the connection");
    let mut frame_types = Vec::new();
    let mut rest = &received[..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        frame_types.push(rest[3]);
        rest = &rest[(9 + len).min(rest.len())..];
    }
    const PING: u8 = 6;
    assert!(
        frame_types.contains(&PING),
        "no keepalive PING: {frame_types:?}"
    );
    server.shutdown().await.expect("shutdown");
}

/// A client that connects and never finishes its handshake delays nobody, and is
/// dropped after `handshake_timeout_seconds`.
#[tokio::test]
async fn a_stalled_handshake_does_not_stall_the_accept_loop() {
    use tokio::io::AsyncReadExt;
    let mut env = DevEnv::new();
    env.config.server.limits.handshake_timeout_seconds = 5;
    let server = env.start().await;
    let addr = server.local_addr();
    let mut stalled: Vec<tokio::net::TcpStream> = Vec::new();
    for _ in 0..8 {
        stalled.push(tokio::net::TcpStream::connect(addr).await.expect("tcp"));
    }
    // Served while the stalled handshakes are still pending (a serial accept loop
    // would serve it only after their timeouts).
    let client = common::client(env.dir.path(), "auditor", addr).await;
    client.health().await.expect("health while others stall");
    for conn in &stalled {
        let mut buf = [0u8; 16];
        let still_open = matches!(
            conn.try_read(&mut buf),
            Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock
        );
        assert!(still_open, "served only after the stalled handshakes ended");
    }
    // The stalled connections are closed by the server once their time is up.
    for conn in &mut stalled {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(std::time::Duration::from_secs(60), conn.read(&mut buf))
            .await
            .expect("the server closes a stalled handshake");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_bad_crl_file_stops_the_start_with_its_name() {
    let mut env = DevEnv::new();
    let crl_path = env.dir.path().join("broken.crl");
    std::fs::write(
        &crl_path,
        b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .expect("write");
    env.config.server.client_crls = vec![crl_path];
    let err = hsm_service::server::start(env.config.clone())
        .await
        .err()
        .expect("start refused")
        .to_string();
    assert!(err.contains("broken.crl"), "{err}");
}

#[tokio::test]
async fn issuer_fingerprint_keeps_a_shared_ca_from_minting_a_role() {
    let mut env = DevEnv::new();
    let dir = env.dir.path().to_owned();
    let (officers_ca, officers_ca_pem) = pki::new_ca("officers CA");
    // Both CAs are client CAs; only the officers' one may issue officer-1.
    let dev_ca_pem = std::fs::read_to_string(env.pki("ca.crt")).expect("ca.crt");
    let client_cas = dir.join("client-cas.pem");
    std::fs::write(&client_cas, format!("{dev_ca_pem}{officers_ca_pem}")).expect("write");
    env.config.server.client_ca = client_cas;
    pki::client_cert(&officers_ca, "officer-1", &dir, "officer-1-pinned");
    let rule = env
        .config
        .clients
        .iter_mut()
        .find(|r| r.cn.as_deref() == Some("officer-1"))
        .expect("officer-1 rule");
    rule.issuer_fingerprint = Some(pki::fingerprint(&officers_ca_pem).to_uppercase());
    let server = env.start().await;
    let addr = server.local_addr();

    let pinned = config(&env, addr, &dir, "officer-1-pinned")
        .connect()
        .await
        .expect("connect");
    let status = pinned
        .admin()
        .get_status(GetStatusRequest {})
        .await
        .expect("the pinned CA's officer-1 is an officer")
        .into_inner();
    assert_eq!(status.caller_role, "officer");

    // The shared dev CA's officer-1: a valid client certificate with the right name,
    // but not from the pinned CA.
    let minted = config(&env, addr, &dir.join("pki"), "officer-1")
        .connect()
        .await
        .expect("connect");
    let err = minted
        .admin()
        .get_status(GetStatusRequest {})
        .await
        .expect_err("officer-1 from the shared CA");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("not mapped to a role"),
        "{}",
        err.message()
    );
    server.shutdown().await.expect("shutdown");

    // A fingerprint that names no client CA stops the start.
    let mut env2 = DevEnv::new();
    env2.config.clients[0].issuer_fingerprint = Some("ab".repeat(32));
    let err = hsm_service::server::start(env2.config.clone())
        .await
        .err()
        .expect("start refused")
        .to_string();
    assert!(err.contains("client[0].issuer_fingerprint"), "{err}");
}

#[tokio::test]
async fn oversized_verify_code_is_resource_exhausted() {
    let env = DevEnv::new();
    let server = env.start().await;
    let login = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    let limit = env.config.server.limits.max_request_bytes;
    let err = login
        .credentials()
        .verify_code(VerifyCodeRequest {
            credential_id: "x".into(),
            code: "1".repeat(limit + 1),
        })
        .await
        .expect_err("oversized");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    // Within the limit the request reaches the handler (which does not know the id).
    let err = login
        .credentials()
        .verify_code(VerifyCodeRequest {
            credential_id: "x".into(),
            code: "123456".into(),
        })
        .await
        .expect_err("unknown credential");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    server.shutdown().await.expect("shutdown");
}

/// Every log line of this test process, for the check that a refused body never
/// reaches one.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("hsm_service=trace")
            .with_writer(move || LogSink(sink.clone()))
            .init();
        logs
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_login_service_s_huge_ceremony_id_is_refused_before_decoding() {
    let logs = captured_logs();
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let login = common::client(env.dir.path(), "login-service", addr).await;
    let huge = "z".repeat(1 << 20);
    let approve = |id: &str| ApproveCeremonyRequest {
        ceremony_id: id.to_owned(),
        kek_share: String::new(),
    };
    let err = login
        .ceremonies()
        .approve_ceremony(approve(&huge))
        .await
        .expect_err("login-service may not approve");
    // PERMISSION_DENIED, not RESOURCE_EXHAUSTED: the 1 MiB body (beyond the ceremony
    // decode limit) was never decoded.
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("role login-service"),
        "{}",
        err.message()
    );

    // An officer's 1 MiB id is decoded, and too large for the ceremony service.
    let officer = common::client(env.dir.path(), "officer-1", addr).await;
    let err = officer
        .ceremonies()
        .approve_ceremony(approve(&huge))
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    server.shutdown().await.expect("shutdown");

    let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
    assert!(
        text.contains("caller's role lacks the permission"),
        "the refusal is logged"
    );
    assert!(
        !text.contains(&"z".repeat(64)),
        "the body reached a log line"
    );
}

/// The reference config's `client_crls` paths resolve against the config's directory.
#[test]
fn crl_paths_are_relative_to_the_config() {
    let text = include_str!("../config.example.toml");
    let mut config: hsm_service::config::Config = toml::from_str(text).expect("parses");
    config.server.client_crls = vec![PathBuf::from("crl/clients.crl")];
    config.resolve(Path::new("/etc/hsm-service"));
    assert_eq!(
        config.server.client_crls,
        vec![PathBuf::from("/etc/hsm-service/crl/clients.crl")]
    );
}
