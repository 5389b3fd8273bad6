//! Every RPC's request message through its handler, in process: one dev service (SoftHSM
//! token, redb store, dev PKI) built once per fuzz process, as parsec's fuzz target
//! builds its front end once, and its handlers called directly as the role gate hands
//! them a request.
//!
//! Input: byte 0 picks the method ([`METHODS`]), byte 1 the caller (a dev identity), the
//! rest is the request message's protobuf encoding; for the client-streaming
//! `ImportCredentials`, a sequence of messages, each a 2-byte little-endian length and
//! that many bytes, which reach the handler as a gRPC request stream (a message there
//! that does not decode is the handler's to answer). An undecodable message is the
//! codec's business (tonic refuses it before any handler), so it is skipped; a caller
//! whose role the gate refuses for that method never reaches the handler, so it is
//! skipped too. What reaches a handler must come back as a response or as a status
//! other than `INTERNAL` and `UNKNOWN`, without a panic.

use std::sync::OnceLock;
use std::time::Duration;

use hsm_proto::v1 as pb;
use hsm_proto::v1::admin_service_server::AdminService;
use hsm_proto::v1::approval_service_server::ApprovalService;
use hsm_proto::v1::audit_service_server::AuditService;
use hsm_proto::v1::ceremony_service_server::CeremonyService;
use hsm_proto::v1::credential_service_server::CredentialService;
use hsm_proto::v1::device_service_server::DeviceService;
use hsm_proto::v1::event_service_server::EventService;
use hsm_proto::v1::key_service_server::KeyService;
use hsm_proto::v1::signing_service_server::SigningService;
use hsm_service::api::{self, State};
use hsm_service::auth::Identity;
use hsm_service::server::RunningServer;
use hsm_service::testing::{gated_request, DevEnv};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

/// Every RPC of the wire contract, as `package.Service/Method`; byte 0 of an input
/// indexes it. A test checks it against the generated descriptors.
pub const METHODS: &[&str] = &[
    "hsm.v1.AdminService/GetStatus",
    "hsm.v1.AuditService/ExportAudit",
    "hsm.v1.AuditService/GetAuditKeys",
    "hsm.v1.AuditService/CheckpointAudit",
    "hsm.v1.AuditService/ListAuditChains",
    "hsm.v1.CeremonyService/ProposeCeremony",
    "hsm.v1.CeremonyService/ApproveCeremony",
    "hsm.v1.CeremonyService/ExecuteCeremony",
    "hsm.v1.CeremonyService/GetCeremony",
    "hsm.v1.CeremonyService/ListCeremonies",
    "hsm.v1.CredentialService/CreateCredential",
    "hsm.v1.CredentialService/VerifyCode",
    "hsm.v1.CredentialService/ResyncCredential",
    "hsm.v1.CredentialService/GetCredential",
    "hsm.v1.CredentialService/ListCredentials",
    "hsm.v1.CredentialService/UpdateCredentialState",
    "hsm.v1.CredentialService/DeleteCredential",
    "hsm.v1.CredentialService/ImportCredentials",
    "hsm.v1.EventService/WatchEvents",
    "hsm.v1.EventService/ListEvents",
    "hsm.v1.EventService/SetNotificationPreference",
    "hsm.v1.EventService/GetNotificationPreference",
    "hsm.v1.SigningService/SignAssertion",
    "hsm.v1.SigningService/Sign",
    "hsm.v1.SigningService/GetJwks",
    "hsm.v1.SigningService/GetCertificateChain",
    "hsm.v1.KeyService/ListKeys",
    "hsm.v1.KeyService/CreateCsr",
    "hsm.v1.KeyService/SelfSignCertificate",
    "hsm.v1.KeyService/IssueCertificate",
    "hsm.v1.DeviceService/BeginActivation",
    "hsm.v1.DeviceService/CompleteActivation",
    "hsm.v1.DeviceService/ListDevices",
    "hsm.v1.DeviceService/RevokeDevice",
    "hsm.v1.ApprovalService/CreateChallenge",
    "hsm.v1.ApprovalService/GetChallenge",
    "hsm.v1.ApprovalService/ListPendingChallenges",
    "hsm.v1.ApprovalService/AnswerChallenge",
];

/// RPCs of the proto files that the service does not serve yet (no handler, not in the
/// role gate's table): nothing to fuzz. A test fails as soon as one of them is in the
/// gate's table, so a newly served RPC cannot be left out of [`METHODS`].
pub const NOT_SERVED: &[&str] = &[];

/// The dev identities a request can come from (byte 1 of an input).
pub const CALLERS: &[&str] = &[
    "login-service",
    "login-service-b",
    "officer-1",
    "officer-2",
    "officer-3",
    "auditor",
    "notifier",
];

struct Service {
    runtime: tokio::runtime::Runtime,
    state: State,
    callers: Vec<Identity>,
    _server: RunningServer,
    _env: DevEnv,
}

fn service() -> &'static Service {
    static SERVICE: OnceLock<Service> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let env = DevEnv::new();
        // Without fsync: in-process fuzzing never crashes the machine, and a durable
        // commit per accepted request would make the target a disk benchmark.
        let server = runtime.block_on(env.start_without_fsync_bench_only());
        let state = server.state().clone();
        let callers = CALLERS
            .iter()
            .map(|cn| {
                use rustls::pki_types::{pem::PemObject, CertificateDer};
                let der = CertificateDer::from_pem_file(env.pki(&format!("{cn}.crt")))
                    .expect("dev certificate");
                state.authorizer.identify(&der).expect("dev identity")
            })
            .collect();
        Service {
            runtime,
            state,
            callers,
            _server: server,
            _env: env,
        }
    })
}

/// Whether the role gate lets `caller` call `method` (else the handler is never reached).
fn gate_allows(method: &str, caller: &Identity) -> bool {
    hsm_service::auth::gate::METHOD_ROLES
        .iter()
        .any(|(m, roles)| *m == method && roles.contains(&caller.role))
}

fn check(method: &str, result: Result<(), Status>) {
    if let Err(status) = result {
        assert!(
            !matches!(status.code(), Code::Internal | Code::Unknown),
            "{method} answered {:?}: {}",
            status.code(),
            status.message()
        );
    }
}

/// Run the fuzz input `data` (see the module documentation).
pub fn requests(data: &[u8]) {
    let [m, c, body @ ..] = data else {
        return;
    };
    let service = service();
    let method = METHODS[usize::from(*m) % METHODS.len()];
    let caller = &service.callers[usize::from(*c) % service.callers.len()];
    if !gate_allows(method, caller) {
        return;
    }
    let Some(result) = service
        .runtime
        .block_on(call(&service.state, method, caller.clone(), body))
    else {
        return;
    };
    check(method, result);
}

/// At most this many messages of a streaming answer are read, each within this time (a
/// watch follows forever).
const STREAM_ITEMS: usize = 4;
const STREAM_WAIT: Duration = Duration::from_millis(20);

async fn drain<S, T>(mut stream: S) -> Result<(), Status>
where
    S: tokio_stream::Stream<Item = Result<T, Status>> + Unpin,
{
    for _ in 0..STREAM_ITEMS {
        match tokio::time::timeout(STREAM_WAIT, stream.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(status))) => return Err(status),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(())
}

/// Decode `body` as `method`'s request and call its handler as `caller`; `None` if the
/// body does not decode.
async fn call(
    state: &State,
    method: &'static str,
    caller: Identity,
    body: &[u8],
) -> Option<Result<(), Status>> {
    macro_rules! unary {
        ($api:expr, $handler:ident, $req:ty) => {{
            let message = <$req>::decode(body).ok()?;
            let request = gated_request(message, caller, method);
            $api.$handler(request).await.map(|_| ())
        }};
    }
    macro_rules! streaming {
        ($api:expr, $handler:ident, $req:ty) => {{
            let message = <$req>::decode(body).ok()?;
            let request = gated_request(message, caller, method);
            match $api.$handler(request).await {
                Ok(response) => drain(response.into_inner()).await,
                Err(status) => Err(status),
            }
        }};
    }
    let s = || state.clone();
    let result = match method {
        "hsm.v1.AdminService/GetStatus" => {
            unary!(
                api::admin::Admin::new(s()),
                get_status,
                pb::GetStatusRequest
            )
        }
        "hsm.v1.AuditService/ExportAudit" => streaming!(
            api::audit::AuditApi::new(s()),
            export_audit,
            pb::ExportAuditRequest
        ),
        "hsm.v1.AuditService/GetAuditKeys" => unary!(
            api::audit::AuditApi::new(s()),
            get_audit_keys,
            pb::GetAuditKeysRequest
        ),
        "hsm.v1.AuditService/CheckpointAudit" => unary!(
            api::audit::AuditApi::new(s()),
            checkpoint_audit,
            pb::CheckpointAuditRequest
        ),
        "hsm.v1.AuditService/ListAuditChains" => unary!(
            api::audit::AuditApi::new(s()),
            list_audit_chains,
            pb::ListAuditChainsRequest
        ),
        "hsm.v1.CeremonyService/ProposeCeremony" => unary!(
            api::ceremony::CeremonyApi::new(s()),
            propose_ceremony,
            pb::ProposeCeremonyRequest
        ),
        "hsm.v1.CeremonyService/ApproveCeremony" => unary!(
            api::ceremony::CeremonyApi::new(s()),
            approve_ceremony,
            pb::ApproveCeremonyRequest
        ),
        "hsm.v1.CeremonyService/ExecuteCeremony" => unary!(
            api::ceremony::CeremonyApi::new(s()),
            execute_ceremony,
            pb::ExecuteCeremonyRequest
        ),
        "hsm.v1.CeremonyService/GetCeremony" => unary!(
            api::ceremony::CeremonyApi::new(s()),
            get_ceremony,
            pb::GetCeremonyRequest
        ),
        "hsm.v1.CeremonyService/ListCeremonies" => unary!(
            api::ceremony::CeremonyApi::new(s()),
            list_ceremonies,
            pb::ListCeremoniesRequest
        ),
        "hsm.v1.CredentialService/CreateCredential" => unary!(
            api::credentials::CredentialApi::new(s()),
            create_credential,
            pb::CreateCredentialRequest
        ),
        "hsm.v1.CredentialService/VerifyCode" => unary!(
            api::credentials::CredentialApi::new(s()),
            verify_code,
            pb::VerifyCodeRequest
        ),
        "hsm.v1.CredentialService/ResyncCredential" => unary!(
            api::credentials::CredentialApi::new(s()),
            resync_credential,
            pb::ResyncCredentialRequest
        ),
        "hsm.v1.CredentialService/GetCredential" => unary!(
            api::credentials::CredentialApi::new(s()),
            get_credential,
            pb::GetCredentialRequest
        ),
        "hsm.v1.CredentialService/ListCredentials" => unary!(
            api::credentials::CredentialApi::new(s()),
            list_credentials,
            pb::ListCredentialsRequest
        ),
        "hsm.v1.CredentialService/UpdateCredentialState" => unary!(
            api::credentials::CredentialApi::new(s()),
            update_credential_state,
            pb::UpdateCredentialStateRequest
        ),
        "hsm.v1.CredentialService/DeleteCredential" => unary!(
            api::credentials::CredentialApi::new(s()),
            delete_credential,
            pb::DeleteCredentialRequest
        ),
        "hsm.v1.EventService/WatchEvents" => streaming!(
            api::events::EventApi::new(s()),
            watch_events,
            pb::WatchEventsRequest
        ),
        "hsm.v1.EventService/ListEvents" => unary!(
            api::events::EventApi::new(s()),
            list_events,
            pb::ListEventsRequest
        ),
        "hsm.v1.EventService/SetNotificationPreference" => unary!(
            api::events::EventApi::new(s()),
            set_notification_preference,
            pb::SetNotificationPreferenceRequest
        ),
        "hsm.v1.EventService/GetNotificationPreference" => unary!(
            api::events::EventApi::new(s()),
            get_notification_preference,
            pb::GetNotificationPreferenceRequest
        ),
        "hsm.v1.SigningService/SignAssertion" => unary!(
            api::signing::Signing::new(s()),
            sign_assertion,
            pb::SignAssertionRequest
        ),
        "hsm.v1.SigningService/Sign" => {
            unary!(api::signing::Signing::new(s()), sign, pb::SignRequest)
        }
        "hsm.v1.SigningService/GetJwks" => unary!(
            api::signing::Signing::new(s()),
            get_jwks,
            pb::GetJwksRequest
        ),
        "hsm.v1.SigningService/GetCertificateChain" => unary!(
            api::signing::Signing::new(s()),
            get_certificate_chain,
            pb::GetCertificateChainRequest
        ),
        "hsm.v1.KeyService/ListKeys" => {
            unary!(api::signing::Keys::new(s()), list_keys, pb::ListKeysRequest)
        }
        "hsm.v1.KeyService/CreateCsr" => unary!(
            api::signing::Keys::new(s()),
            create_csr,
            pb::CreateCsrRequest
        ),
        "hsm.v1.KeyService/SelfSignCertificate" => unary!(
            api::signing::Keys::new(s()),
            self_sign_certificate,
            pb::SelfSignCertificateRequest
        ),
        "hsm.v1.KeyService/IssueCertificate" => unary!(
            api::signing::Keys::new(s()),
            issue_certificate,
            pb::IssueCertificateRequest
        ),
        "hsm.v1.DeviceService/BeginActivation" => unary!(
            api::devices::DeviceApi::new(s()),
            begin_activation,
            pb::BeginActivationRequest
        ),
        "hsm.v1.DeviceService/CompleteActivation" => unary!(
            api::devices::DeviceApi::new(s()),
            complete_activation,
            pb::CompleteActivationRequest
        ),
        "hsm.v1.DeviceService/ListDevices" => unary!(
            api::devices::DeviceApi::new(s()),
            list_devices,
            pb::ListDevicesRequest
        ),
        "hsm.v1.DeviceService/RevokeDevice" => unary!(
            api::devices::DeviceApi::new(s()),
            revoke_device,
            pb::RevokeDeviceRequest
        ),
        "hsm.v1.ApprovalService/CreateChallenge" => unary!(
            api::devices::ApprovalApi::new(s()),
            create_challenge,
            pb::CreateChallengeRequest
        ),
        "hsm.v1.ApprovalService/GetChallenge" => unary!(
            api::devices::ApprovalApi::new(s()),
            get_challenge,
            pb::GetChallengeRequest
        ),
        "hsm.v1.ApprovalService/ListPendingChallenges" => unary!(
            api::devices::ApprovalApi::new(s()),
            list_pending_challenges,
            pb::ListPendingChallengesRequest
        ),
        "hsm.v1.ApprovalService/AnswerChallenge" => unary!(
            api::devices::ApprovalApi::new(s()),
            answer_challenge,
            pb::AnswerChallengeRequest
        ),
        "hsm.v1.CredentialService/ImportCredentials" => {
            let stream =
                request_stream::<pb::ImportCredentialsResponse, pb::ImportCredentialsRequest>(body);
            let request = gated_request(stream, caller, method);
            api::credentials::CredentialApi::new(s())
                .import_credentials(request)
                .await
                .map(|_| ())
        }
        other => unreachable!("method {other} is in METHODS but has no handler call"),
    };
    Some(result)
}

/// Messages of a client-streaming request read from `body` (see the module
/// documentation): at most this many.
const STREAM_MESSAGES: usize = 64;

/// `body` split into length-prefixed messages, framed as gRPC frames and decoded by the
/// service's own codec, as the generated server hands them to the handler.
fn request_stream<Resp, Req>(mut body: &[u8]) -> tonic::Streaming<Req>
where
    Resp: Message + Send + 'static,
    Req: Message + Default + Send + 'static,
{
    use tonic::codec::Codec as _;
    let mut framed = Vec::new();
    for _ in 0..STREAM_MESSAGES {
        let [a, b, rest @ ..] = body else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
        let (message, rest) = rest.split_at(len);
        framed.push(0u8);
        framed.extend_from_slice(&u32::try_from(len).expect("u16").to_be_bytes());
        framed.extend_from_slice(message);
        body = rest;
    }
    let decoder = hsm_proto::codec::Codec::<Resp, Req>::default().decoder();
    let body = http_body_util::Full::new(bytes::Bytes::from(framed));
    tonic::Streaming::new_request(decoder, body, None, None)
}
