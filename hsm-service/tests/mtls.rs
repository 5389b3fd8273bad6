//! Mutual TLS and roles, against the real server on 127.0.0.1:0 and the real client.

mod common;

use hsm_client::proto::GetStatusRequest;
use hsm_client::ClientConfig;
use hsm_service::testing::DevEnv;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn health_is_serving_and_reflection_lists_the_services() {
    let env = DevEnv::new();
    let server = env.start().await;
    let client = common::client(env.dir.path(), "login-service", server.local_addr()).await;
    assert_eq!(
        client.health().await.expect("health"),
        ServingStatus::Serving
    );
    assert_eq!(
        client
            .health_of("hsm.v1.AdminService")
            .await
            .expect("health"),
        ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(client.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies
        .message()
        .await
        .expect("message")
        .expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["hsm.v1.AdminService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn handshake_without_a_client_certificate_fails() {
    let env = DevEnv::new();
    let server = env.start().await;
    let ca = std::fs::read(env.pki("ca.crt")).expect("ca");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", server.local_addr()))
        .expect("uri")
        .tls_config(tls)
        .expect("tls");
    // TLS 1.3 lets the client finish its side before the server's verdict arrives, so the
    // refusal may surface at connect or at the first call; either way nothing is served.
    match channel.connect().await {
        Err(_) => {}
        Ok(ch) => {
            let err = tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .expect_err("a call without a client certificate must fail");
            let chain = hsm_client::error_chain(&err);
            assert!(
                chain.contains("received fatal alert: CertificateRequired"),
                "{chain}"
            );
        }
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn certificate_from_another_ca_fails() {
    let env = DevEnv::new();
    let other = DevEnv::new();
    let server = env.start().await;
    // The right server CA, but a client certificate issued by another CA.
    let config = ClientConfig {
        endpoint: format!("https://{}", server.local_addr()),
        ca: env.pki("ca.crt"),
        cert: other.pki("login-service.crt"),
        key: other.pki("login-service.key"),
    };
    match config.connect().await {
        Err(_) => {}
        Ok(client) => {
            let err = client
                .health()
                .await
                .expect_err("foreign client certificate must fail");
            let chain = hsm_client::error_chain(&err);
            // The foreign CA has the same name as ours, so its signature is what fails.
            assert!(chain.contains("received fatal alert"), "{chain}");
        }
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn roles_are_enforced_per_method() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();

    let login = common::client(env.dir.path(), "login-service", addr).await;
    let err = login
        .admin()
        .get_status(GetStatusRequest {})
        .await
        .expect_err("login-service may not read status");
    assert_eq!(err.code(), Code::PermissionDenied);

    for (identity, role) in [("officer-2", "officer"), ("auditor", "auditor")] {
        let c = common::client(env.dir.path(), identity, addr).await;
        let status = c
            .admin()
            .get_status(GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.caller_role, role);
        assert_eq!(status.caller_subject, identity);
        let token = status.token.expect("token");
        assert!(token.logged_in);
        assert_eq!(
            token.label,
            env.config.hsm.token_label.clone().expect("label")
        );
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn certificate_not_in_the_role_table_is_denied() {
    let mut env = DevEnv::new();
    env.config
        .clients
        .retain(|rule| rule.cn.as_deref() != Some("auditor"));
    let server = env.start().await;
    let auditor = common::client(env.dir.path(), "auditor", server.local_addr()).await;
    let err = auditor
        .admin()
        .get_status(GetStatusRequest {})
        .await
        .expect_err("unmapped certificate");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("not mapped to a role"),
        "{}",
        err.message()
    );
    server.shutdown().await.expect("shutdown");
}
