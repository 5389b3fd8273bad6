//! `hsm.v1.DeviceService` and `hsm.v1.ApprovalService`: proto <-> domain, and who may
//! call what. ListPendingChallenges and AnswerChallenge are the app's calls relayed by
//! the login service: the device signature proves them, the caller's role only admits
//! the relay.

use hsm_proto::v1 as pb;
use hsm_proto::v1::approval_service_server::ApprovalService;
use hsm_proto::v1::device_service_server::DeviceService;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::State;
use crate::auth::{authorize, Identity, Role};
use crate::devices::activation::Completion;
use crate::devices::challenges::{Answer, Decision, NewChallenge};
use crate::devices::{Caller, ChallengeRecord, ChallengeState, DeviceRecord, Purpose};
use crate::error::Error;

const LOGIN: &[Role] = &[Role::LoginService];
const LOGIN_OR_OFFICER: &[Role] = &[Role::LoginService, Role::Officer];

/// The device service handler.
pub struct DeviceApi {
    state: State,
}

impl DeviceApi {
    /// A handler over the shared state.
    pub fn new(state: State) -> DeviceApi {
        DeviceApi { state }
    }
}

/// The approval service handler.
pub struct ApprovalApi {
    state: State,
}

impl ApprovalApi {
    /// A handler over the shared state.
    pub fn new(state: State) -> ApprovalApi {
        ApprovalApi { state }
    }
}

fn invalid(m: impl Into<String>) -> Status {
    Status::from(Error::InvalidArgument(m.into()))
}

/// The caller as the domain sees it: a login service acts on its own tenant (it may not
/// name one); an officer names the tenant (required).
fn caller_of(identity: &Identity, requested_tenant: &str) -> Result<Caller, Status> {
    let officer = identity.role == Role::Officer;
    let tenant = if officer {
        if requested_tenant.is_empty() {
            return Err(invalid("tenant: officers must name the subject's tenant"));
        }
        crate::store::validate_tenant(requested_tenant)
            .map_err(|e| invalid(format!("tenant: {e}")))?;
        requested_tenant.to_owned()
    } else {
        if !requested_tenant.is_empty() {
            return Err(invalid(
                "tenant is for officers: a login service acts on its own tenant's devices",
            ));
        }
        identity.tenant.clone()
    };
    Ok(Caller {
        actor: identity.actor(),
        tenant,
        officer,
    })
}

fn device_to_proto(d: &DeviceRecord) -> pb::Device {
    pb::Device {
        device_id: d.id.clone(),
        subject: d.subject.clone(),
        display_name: d.display_name.clone(),
        state: if d.active() {
            pb::DeviceState::Active
        } else {
            pb::DeviceState::Revoked
        } as i32,
        created_at: d.created_at,
        public_key_sha256: crate::audit::sha256_hex(&d.public_key),
        last_used_at: d.last_used_at,
        tenant: d.tenant.clone(),
        revoked_at: d.revoked_at,
        activated_by_officer: d.activated_by_officer,
    }
}

fn purpose_to_proto(p: Purpose) -> pb::ChallengePurpose {
    match p {
        Purpose::Login => pb::ChallengePurpose::Login,
        Purpose::Transaction => pb::ChallengePurpose::Transaction,
        Purpose::ActivateDevice => pb::ChallengePurpose::ActivateDevice,
    }
}

fn state_to_proto(s: ChallengeState) -> pb::ChallengeState {
    match s {
        ChallengeState::Pending => pb::ChallengeState::Pending,
        ChallengeState::Approved => pb::ChallengeState::Approved,
        ChallengeState::Denied => pb::ChallengeState::Denied,
        ChallengeState::Reported => pb::ChallengeState::Reported,
        ChallengeState::Expired => pb::ChallengeState::Expired,
        ChallengeState::Cancelled => pb::ChallengeState::Cancelled,
    }
}

/// `for_login_page`: with the binding code and the evidence (GetChallenge,
/// CreateChallenge); otherwise both empty (what a device may see).
fn challenge_to_proto(c: &ChallengeRecord, for_login_page: bool) -> pb::Challenge {
    pb::Challenge {
        challenge_id: c.id.clone(),
        subject: c.subject.clone(),
        text: c.text.clone(),
        service_provider: c.service_provider.clone(),
        purpose: purpose_to_proto(c.purpose) as i32,
        state: state_to_proto(c.state) as i32,
        binding_code: if for_login_page {
            c.binding_code.clone()
        } else {
            String::new()
        },
        created_at: c.created_at,
        expires_at: c.expires_at,
        payload: crate::devices::challenges::payload_of(c),
        server_signature: c.server_signature.clone(),
        server_kid: c.server_kid.clone(),
        answered_by_device_id: c.answered_by.clone(),
        evidence_id: if for_login_page {
            c.evidence_id.clone()
        } else {
            String::new()
        },
        answered_at: c.answered_at,
        tenant: c.tenant.clone(),
    }
}

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    async fn begin_activation(
        &self,
        request: Request<pb::BeginActivationRequest>,
    ) -> Result<Response<pb::BeginActivationResponse>, Status> {
        let identity = authorize(&self.state.authorizer, &request, LOGIN_OR_OFFICER)?;
        let r = request.into_inner();
        let caller = caller_of(&identity, &r.tenant)?;
        let begun = self
            .state
            .devices
            .begin_activation(
                &caller,
                &r.subject,
                &r.display_name,
                &r.authorized_by_challenge_id,
            )
            .await?;
        Ok(Response::new(pb::BeginActivationResponse {
            activation_id: begun.activation_id.clone(),
            activation_code: begun.code.to_string(),
            payload: begun.payload.clone(),
            expires_at: begun.expires_at,
        }))
    }

    async fn complete_activation(
        &self,
        request: Request<pb::CompleteActivationRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let identity = authorize(&self.state.authorizer, &request, LOGIN)?;
        let caller = caller_of(&identity, "")?;
        let mut r = request.into_inner();
        let code = Zeroizing::new(std::mem::take(&mut r.activation_code));
        let d = self
            .state
            .devices
            .complete_activation(
                &caller,
                Completion {
                    activation_id: r.activation_id,
                    code,
                    public_key: r.public_key,
                    signature: r.signature,
                },
            )
            .await?;
        Ok(Response::new(device_to_proto(&d)))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let identity = authorize(&self.state.authorizer, &request, LOGIN_OR_OFFICER)?;
        let r = request.into_inner();
        let caller = caller_of(&identity, &r.tenant)?;
        let devices = self
            .state
            .devices
            .list_devices(&caller.tenant, &r.subject)
            .await?;
        Ok(Response::new(pb::ListDevicesResponse {
            devices: devices.iter().map(device_to_proto).collect(),
        }))
    }

    async fn revoke_device(
        &self,
        request: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let identity = authorize(&self.state.authorizer, &request, LOGIN_OR_OFFICER)?;
        let r = request.into_inner();
        let caller = caller_of(&identity, &r.tenant)?;
        let d = self
            .state
            .devices
            .revoke_device(&caller, &r.device_id)
            .await?;
        Ok(Response::new(device_to_proto(&d)))
    }
}

#[tonic::async_trait]
impl ApprovalService for ApprovalApi {
    async fn create_challenge(
        &self,
        request: Request<pb::CreateChallengeRequest>,
    ) -> Result<Response<pb::Challenge>, Status> {
        let identity = authorize(&self.state.authorizer, &request, LOGIN)?;
        let caller = caller_of(&identity, "")?;
        let r = request.into_inner();
        let purpose = match pb::ChallengePurpose::try_from(r.purpose) {
            Ok(pb::ChallengePurpose::Login) => Purpose::Login,
            Ok(pb::ChallengePurpose::Transaction) => Purpose::Transaction,
            Ok(pb::ChallengePurpose::ActivateDevice) => Purpose::ActivateDevice,
            _ => {
                return Err(invalid(
                    "purpose must be CHALLENGE_PURPOSE_LOGIN, _TRANSACTION or _ACTIVATE_DEVICE",
                ))
            }
        };
        let c = self
            .state
            .devices
            .create_challenge(
                &caller,
                NewChallenge {
                    subject: r.subject,
                    text: r.text,
                    service_provider: r.service_provider,
                    purpose,
                    ttl_seconds: r.ttl_seconds,
                },
            )
            .await?;
        Ok(Response::new(challenge_to_proto(&c, true)))
    }

    async fn get_challenge(
        &self,
        request: Request<pb::GetChallengeRequest>,
    ) -> Result<Response<pb::Challenge>, Status> {
        let identity = authorize(&self.state.authorizer, &request, LOGIN)?;
        let r = request.into_inner();
        let c = self
            .state
            .devices
            .get_challenge(&identity.tenant, &r.challenge_id)
            .await?;
        Ok(Response::new(challenge_to_proto(&c, true)))
    }

    async fn list_pending_challenges(
        &self,
        request: Request<pb::ListPendingChallengesRequest>,
    ) -> Result<Response<pb::ListPendingChallengesResponse>, Status> {
        let identity = authorize(&self.state.authorizer, &request, LOGIN)?;
        let r = request.into_inner();
        let pending = self
            .state
            .devices
            .list_pending(&identity.tenant, &r.device_id, r.timestamp, &r.signature)
            .await?;
        Ok(Response::new(pb::ListPendingChallengesResponse {
            challenges: pending
                .iter()
                .map(|c| challenge_to_proto(c, false))
                .collect(),
        }))
    }

    async fn answer_challenge(
        &self,
        request: Request<pb::AnswerChallengeRequest>,
    ) -> Result<Response<pb::Challenge>, Status> {
        let identity = authorize(&self.state.authorizer, &request, LOGIN)?;
        let caller = caller_of(&identity, "")?;
        let r = request.into_inner();
        let decision = match pb::ChallengeDecision::try_from(r.decision) {
            Ok(pb::ChallengeDecision::Approve) => Decision::Approve,
            Ok(pb::ChallengeDecision::Deny) => Decision::Deny,
            Ok(pb::ChallengeDecision::NotMe) => Decision::NotMe,
            _ => {
                return Err(invalid(
                    "decision must be CHALLENGE_DECISION_APPROVE, _DENY or _NOT_ME",
                ))
            }
        };
        let c = self
            .state
            .devices
            .answer_challenge(
                &caller,
                Answer {
                    challenge_id: r.challenge_id,
                    device_id: r.device_id,
                    decision,
                    binding_code: r.binding_code,
                    signature: r.signature,
                },
            )
            .await?;
        // The answer goes back to the device (relayed): no binding code; the evidence is
        // for the login service, which reads it with GetChallenge.
        Ok(Response::new(challenge_to_proto(&c, false)))
    }
}
