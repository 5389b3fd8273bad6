//! `hsm-client`: a typed, mutually authenticated channel to hsm-service.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hsm_client::ClientError> {
//! let client = hsm_client::ClientConfig::dev(".hsm-dev", "login-service").connect().await?;
//! let status = client.health().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

pub use hsm_proto::v1 as proto;

pub mod app;
pub mod cursor;
pub mod import;
pub mod jws;
pub mod load;
pub mod qr;
use proto::admin_service_client::AdminServiceClient;
use proto::key_service_client::KeyServiceClient;
use proto::signing_service_client::SigningServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Default endpoint of the dev service.
pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:50051";

/// Where the service is and which certificate to present.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://HOST:PORT`.
    pub endpoint: String,
    /// CA certificate (PEM) that the server certificate chains to.
    pub ca: PathBuf,
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Client private key (PEM).
    pub key: PathBuf,
}

/// Why a call did not happen or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The endpoint is malformed or the TLS settings are unusable.
    #[error("invalid endpoint {endpoint}: {detail}")]
    Endpoint {
        /// Endpoint given.
        endpoint: String,
        /// What is wrong.
        detail: String,
    },
    /// Connecting (TCP or the TLS handshake) failed.
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect {
        /// Endpoint.
        endpoint: String,
        /// Cause, with its sources.
        detail: String,
    },
    /// The service answered with an error status.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// A relay's cursor file cannot be read or written.
    #[error(transparent)]
    Cursor(#[from] cursor::CursorError),
    /// The reference app refused (an untrusted challenge, a bad state file or link).
    #[error(transparent)]
    App(app::AppError),
    /// A QR code could not be made or written.
    #[error(transparent)]
    Qr(#[from] qr::QrError),
    /// Writing the command's output failed.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl ClientConfig {
    /// The dev service's defaults: `https://127.0.0.1:50051` and
    /// `<data_dir>/pki/{ca.crt, <identity>.crt, <identity>.key}`.
    pub fn dev(data_dir: impl AsRef<Path>, identity: &str) -> ClientConfig {
        let pki = data_dir.as_ref().join("pki");
        ClientConfig {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            ca: pki.join("ca.crt"),
            cert: pki.join(format!("{identity}.crt")),
            key: pki.join(format!("{identity}.key")),
        }
    }

    /// The same with another endpoint.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> ClientConfig {
        self.endpoint = endpoint.into();
        self
    }

    /// Open the mTLS channel (connects eagerly, so a bad certificate fails here).
    pub async fn connect(&self) -> Result<HsmClient, ClientError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| ClientError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let ca = read(&self.ca)?;
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        let bad = |detail: String| ClientError::Endpoint {
            endpoint: self.endpoint.clone(),
            detail,
        };
        let uri: tonic::codegen::http::Uri =
            self.endpoint.parse().map_err(|e| bad(format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https".into()));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(host);
        let channel = Channel::builder(uri)
            .tls_config(tls)
            .map_err(|e| bad(error_chain(&e)))?
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                endpoint: self.endpoint.clone(),
                detail: error_chain(&e),
            })?;
        Ok(HsmClient { channel })
    }
}

/// `e` and its sources on one line: tonic's top-level transport error alone says only
/// "transport error".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A connected client; cheap to clone.
#[derive(Debug, Clone)]
pub struct HsmClient {
    channel: Channel,
}

impl HsmClient {
    /// The underlying channel, for any generated client.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// `hsm.v1.AdminService`.
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    /// `hsm.v1.AuditService`.
    pub fn audit(&self) -> proto::audit_service_client::AuditServiceClient<Channel> {
        proto::audit_service_client::AuditServiceClient::new(self.channel.clone())
    }

    /// `hsm.v1.CredentialService`.
    pub fn credentials(
        &self,
    ) -> proto::credential_service_client::CredentialServiceClient<Channel> {
        proto::credential_service_client::CredentialServiceClient::new(self.channel.clone())
    }

    /// `hsm.v1.SigningService`: assertions, raw signatures, JWKS, certificate chains.
    pub fn signing(&self) -> SigningServiceClient<Channel> {
        SigningServiceClient::new(self.channel.clone())
    }

    /// `hsm.v1.KeyService`: key inventory, CSRs and certificates (officers).
    pub fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel.clone())
    }

    /// `hsm.v1.CeremonyService`: key ceremonies (officers; auditors read).
    pub fn ceremonies(&self) -> proto::ceremony_service_client::CeremonyServiceClient<Channel> {
        proto::ceremony_service_client::CeremonyServiceClient::new(self.channel.clone())
    }

    /// `hsm.v1.EventService`: the event stream and notification preferences.
    pub fn events(&self) -> proto::event_service_client::EventServiceClient<Channel> {
        proto::event_service_client::EventServiceClient::new(self.channel.clone())
    }

    /// `hsm.v1.DeviceService`: device activation, listing, revocation.
    pub fn devices(&self) -> proto::device_service_client::DeviceServiceClient<Channel> {
        proto::device_service_client::DeviceServiceClient::new(self.channel.clone())
    }

    /// `hsm.v1.ApprovalService`: challenges and the app's answers.
    pub fn approvals(&self) -> proto::approval_service_client::ApprovalServiceClient<Channel> {
        proto::approval_service_client::ApprovalServiceClient::new(self.channel.clone())
    }

    /// `grpc.health.v1.Health/Check` for the whole server.
    pub async fn health(&self) -> Result<ServingStatus, ClientError> {
        self.health_of("").await
    }

    /// `grpc.health.v1.Health/Check` for one service (empty: the server).
    pub async fn health_of(&self, service: &str) -> Result<ServingStatus, ClientError> {
        let reply = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        Ok(reply.into_inner().status())
    }
}
