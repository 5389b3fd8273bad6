//! The role check before a request body is read: a tower layer in front of every gRPC
//! service that maps the request path to the roles allowed to call it and refuses the
//! others from the verified peer certificate alone. A caller without the role never gets
//! its message decoded, handled or logged, whatever its size. The handlers still check
//! (`authorize`), with the request at hand, for the finer rules.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::{http, Service};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::{check, Authorizer, GatedCaller, Role};

const LOGIN: &[Role] = &[Role::LoginService];
const OFFICER: &[Role] = &[Role::Officer];
const AUDITOR: &[Role] = &[Role::Auditor];
const LOGIN_OR_OFFICER: &[Role] = &[Role::LoginService, Role::Officer];
const OFFICER_OR_AUDITOR: &[Role] = &[Role::Officer, Role::Auditor];
const ANYONE: &[Role] = &[Role::LoginService, Role::Officer, Role::Auditor];
const EVENT_READERS: &[Role] = &[Role::LoginService, Role::Notifier, Role::Auditor];

/// Every hsm.v1 method and the roles that may call it (the union, where a handler
/// narrows it further by the request, as UpdateCredentialState UNLOCK does).
pub const METHOD_ROLES: &[(&str, &[Role])] = &[
    ("hsm.v1.AdminService/GetStatus", OFFICER_OR_AUDITOR),
    ("hsm.v1.AuditService/ExportAudit", AUDITOR),
    ("hsm.v1.AuditService/GetAuditKeys", AUDITOR),
    ("hsm.v1.AuditService/CheckpointAudit", OFFICER_OR_AUDITOR),
    ("hsm.v1.AuditService/ListAuditChains", AUDITOR),
    ("hsm.v1.CeremonyService/ProposeCeremony", OFFICER),
    ("hsm.v1.CeremonyService/ApproveCeremony", OFFICER),
    ("hsm.v1.CeremonyService/ExecuteCeremony", OFFICER),
    ("hsm.v1.CeremonyService/GetCeremony", OFFICER_OR_AUDITOR),
    ("hsm.v1.CeremonyService/ListCeremonies", OFFICER_OR_AUDITOR),
    ("hsm.v1.CredentialService/CreateCredential", LOGIN),
    ("hsm.v1.CredentialService/VerifyCode", LOGIN),
    ("hsm.v1.CredentialService/ResyncCredential", LOGIN),
    ("hsm.v1.CredentialService/GetCredential", LOGIN_OR_OFFICER),
    ("hsm.v1.CredentialService/ListCredentials", LOGIN_OR_OFFICER),
    (
        "hsm.v1.CredentialService/UpdateCredentialState",
        LOGIN_OR_OFFICER,
    ),
    (
        "hsm.v1.CredentialService/DeleteCredential",
        LOGIN_OR_OFFICER,
    ),
    ("hsm.v1.CredentialService/ImportCredentials", LOGIN),
    ("hsm.v1.DeviceService/BeginActivation", LOGIN_OR_OFFICER),
    ("hsm.v1.DeviceService/CompleteActivation", LOGIN),
    ("hsm.v1.DeviceService/ListDevices", LOGIN_OR_OFFICER),
    ("hsm.v1.DeviceService/RevokeDevice", LOGIN_OR_OFFICER),
    // The app's calls are relayed by the login service; the device signature proves them.
    ("hsm.v1.ApprovalService/CreateChallenge", LOGIN),
    ("hsm.v1.ApprovalService/GetChallenge", LOGIN),
    ("hsm.v1.ApprovalService/ListPendingChallenges", LOGIN),
    ("hsm.v1.ApprovalService/AnswerChallenge", LOGIN),
    ("hsm.v1.SigningService/SignAssertion", LOGIN),
    ("hsm.v1.SigningService/Sign", LOGIN),
    ("hsm.v1.SigningService/GetJwks", ANYONE),
    ("hsm.v1.SigningService/GetCertificateChain", ANYONE),
    ("hsm.v1.KeyService/ListKeys", OFFICER_OR_AUDITOR),
    ("hsm.v1.KeyService/CreateCsr", OFFICER),
    ("hsm.v1.KeyService/SelfSignCertificate", OFFICER),
    ("hsm.v1.KeyService/IssueCertificate", OFFICER),
    ("hsm.v1.EventService/WatchEvents", EVENT_READERS),
    ("hsm.v1.EventService/ListEvents", EVENT_READERS),
    ("hsm.v1.EventService/SetNotificationPreference", LOGIN),
    ("hsm.v1.EventService/GetNotificationPreference", LOGIN),
];

/// The package whose methods need a role; health and reflection answer any client the
/// TLS layer let in.
const GATED_PREFIX: &str = "/hsm.v1.";

/// What a refusal of a method missing from the table records (the path is the
/// caller's text, of any length, and never goes into a record).
const UNKNOWN_METHOD: &str = "hsm.v1 (unknown method)";

/// The method's name as recorded and the roles that may call `path` (`/service/method`).
/// `None`: not gated (health, reflection); an hsm.v1 method missing from the table gets
/// no role at all.
fn allowed_roles(path: &str) -> Option<(&'static str, &'static [Role])> {
    if !path.starts_with(GATED_PREFIX) {
        return None;
    }
    let method = &path[1..];
    Some(
        METHOD_ROLES
            .iter()
            .find(|(m, _)| *m == method)
            .copied()
            .unwrap_or((UNKNOWN_METHOD, &[])),
    )
}

/// Adds [`RoleGate`] in front of a service.
#[derive(Clone)]
pub struct RoleGateLayer {
    authorizer: Arc<Authorizer>,
}

impl RoleGateLayer {
    /// A gate deciding with `authorizer` (its identity mapping and refusal records).
    pub fn new(authorizer: Arc<Authorizer>) -> RoleGateLayer {
        RoleGateLayer { authorizer }
    }
}

impl<S> tower_layer::Layer<S> for RoleGateLayer {
    type Service = RoleGate<S>;

    fn layer(&self, inner: S) -> RoleGate<S> {
        RoleGate {
            inner,
            authorizer: self.authorizer.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct RoleGate<S> {
    inner: S,
    authorizer: Arc<Authorizer>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<http::Request<B>> for RoleGate<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some((method, allowed)) = allowed_roles(request.uri().path()) {
            let certs = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
            let identity = match check(&self.authorizer, leaf, method, allowed) {
                Ok(identity) => identity,
                Err(e) => {
                    let status = tonic::Status::from(e);
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            };
            request
                .extensions_mut()
                .insert(GatedCaller { identity, method });
            // The handlers' own refusals (`authorize`) name the method from this: tonic's
            // generated servers do not set it (only its clients do).
            if let Some((service, name)) = method.split_once('/') {
                request
                    .extensions_mut()
                    .insert(tonic::GrpcMethod::new(service, name));
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the wire contract is in the table (a new RPC without an entry
    /// would be refused to everyone), and nothing else is.
    #[test]
    fn every_method_has_roles() {
        let protos = [
            include_str!("../../../proto/hsm/v1/admin.proto"),
            include_str!("../../../proto/hsm/v1/audit.proto"),
            include_str!("../../../proto/hsm/v1/ceremony.proto"),
            include_str!("../../../proto/hsm/v1/credentials.proto"),
            include_str!("../../../proto/hsm/v1/devices.proto"),
            include_str!("../../../proto/hsm/v1/events.proto"),
            include_str!("../../../proto/hsm/v1/signing.proto"),
        ];
        let mut declared = Vec::new();
        for text in protos {
            let mut service = "";
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next().unwrap_or_default();
                }
                if let Some(rest) = line.strip_prefix("rpc ") {
                    let name = rest.split('(').next().unwrap_or_default().trim();
                    declared.push(format!("hsm.v1.{service}/{name}"));
                }
            }
        }
        declared.sort();
        let mut table: Vec<String> = METHOD_ROLES.iter().map(|(m, _)| (*m).to_owned()).collect();
        table.sort();
        assert_eq!(declared, table);
        assert!(METHOD_ROLES.iter().all(|(_, roles)| !roles.is_empty()));
    }

    #[test]
    fn paths_map_to_roles() {
        assert_eq!(
            allowed_roles("/hsm.v1.CredentialService/VerifyCode"),
            Some(("hsm.v1.CredentialService/VerifyCode", LOGIN))
        );
        assert_eq!(
            allowed_roles("/hsm.v1.Nope/Nothing"),
            Some((UNKNOWN_METHOD, &[][..]))
        );
        assert_eq!(allowed_roles("/grpc.health.v1.Health/Check"), None);
    }
}
