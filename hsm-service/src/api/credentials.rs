//! `hsm.v1.CredentialService`: proto <-> domain, and who may call what.

use hsm_proto::v1 as pb;
use hsm_proto::v1::credential_service_server::CredentialService;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::State;
use crate::auth::{authorize, Role};
use crate::credentials::{Action, NewCredential, Outcome, Verdict};
use crate::error::Error;
use crate::otp::{HashAlgorithm, OtpKind};
use crate::store::CredentialRecord;

const LOGIN: &[Role] = &[Role::LoginService];
const LOGIN_OR_OFFICER: &[Role] = &[Role::LoginService, Role::Officer];

/// The credential service handler.
pub struct CredentialApi {
    state: State,
}

impl CredentialApi {
    /// A handler over the shared state.
    pub fn new(state: State) -> CredentialApi {
        CredentialApi { state }
    }
}

fn invalid(m: impl Into<String>) -> Status {
    Status::from(Error::InvalidArgument(m.into()))
}

#[tonic::async_trait]
impl CredentialService for CredentialApi {
    async fn create_credential(
        &self,
        request: Request<pb::CreateCredentialRequest>,
    ) -> Result<Response<pb::CreateCredentialResponse>, Status> {
        let caller = authorize(&self.state.authorizer, &request, LOGIN)?;
        let mut r = request.into_inner();
        let kind = match pb::OtpKind::try_from(r.kind) {
            Ok(pb::OtpKind::Hotp) => OtpKind::Hotp,
            Ok(pb::OtpKind::Totp) => OtpKind::Totp,
            _ => return Err(invalid("kind must be OTP_KIND_HOTP or OTP_KIND_TOTP")),
        };
        let algorithm = match pb::HashAlgorithm::try_from(r.algorithm) {
            Ok(pb::HashAlgorithm::Unspecified | pb::HashAlgorithm::Sha1) => HashAlgorithm::Sha1,
            Ok(pb::HashAlgorithm::Sha256) => HashAlgorithm::Sha256,
            Ok(pb::HashAlgorithm::Sha512) => HashAlgorithm::Sha512,
            Err(_) => return Err(invalid("algorithm must be a HashAlgorithm value")),
        };
        // Move the seed out of the request into a buffer that is zeroized on drop.
        let seed = std::mem::take(&mut r.seed);
        let seed = (!seed.is_empty()).then(|| Zeroizing::new(seed));
        let created = self
            .state
            .credentials
            .create_by(
                Some(&caller.actor()),
                NewCredential {
                    id: (!r.credential_id.is_empty()).then_some(r.credential_id),
                    kind,
                    algorithm,
                    digits: if r.digits == 0 { 6 } else { r.digits },
                    period_seconds: r.period_seconds,
                    seed,
                    reveal_seed: r.reveal_seed,
                    issuer: r.issuer,
                    account_name: r.account_name,
                    initial_counter: r.initial_counter,
                },
            )
            .await?;
        let now = self.state.clock.now();
        Ok(Response::new(pb::CreateCredentialResponse {
            credential: Some(to_proto(&created.record, now)),
            provisioning_uri: created
                .provisioning_uri
                .map(|u| u.as_str().to_owned())
                .unwrap_or_default(),
        }))
    }

    async fn verify_code(
        &self,
        request: Request<pb::VerifyCodeRequest>,
    ) -> Result<Response<pb::VerifyCodeResponse>, Status> {
        let caller = authorize(&self.state.authorizer, &request, LOGIN)?;
        let r = request.into_inner();
        let code = Zeroizing::new(r.code);
        let o = self
            .state
            .credentials
            .verify_by(Some(&caller.actor()), &r.credential_id, &code)
            .await?;
        Ok(Response::new(pb::VerifyCodeResponse {
            result: verdict(o.verdict) as i32,
            remaining_attempts: o.remaining_attempts,
            retry_after_seconds: o.retry_after_seconds,
        }))
    }

    async fn resync_credential(
        &self,
        request: Request<pb::ResyncCredentialRequest>,
    ) -> Result<Response<pb::ResyncCredentialResponse>, Status> {
        let caller = authorize(&self.state.authorizer, &request, LOGIN)?;
        let r = request.into_inner();
        let (code1, code2) = (Zeroizing::new(r.code1), Zeroizing::new(r.code2));
        let (o, rec): (Outcome, CredentialRecord) = self
            .state
            .credentials
            .resync_by(Some(&caller.actor()), &r.credential_id, &code1, &code2)
            .await?;
        let now = self.state.clock.now();
        Ok(Response::new(pb::ResyncCredentialResponse {
            result: verdict(o.verdict) as i32,
            remaining_attempts: o.remaining_attempts,
            retry_after_seconds: o.retry_after_seconds,
            credential: Some(to_proto(&rec, now)),
        }))
    }

    async fn get_credential(
        &self,
        request: Request<pb::GetCredentialRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        authorize(&self.state.authorizer, &request, LOGIN_OR_OFFICER)?;
        let rec = self
            .state
            .credentials
            .get(&request.get_ref().credential_id)
            .await?;
        Ok(Response::new(to_proto(&rec, self.state.clock.now())))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        authorize(&self.state.authorizer, &request, LOGIN_OR_OFFICER)?;
        let r = request.into_inner();
        let size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(invalid("page_size must be at most 1000")),
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            crate::credentials::check_id(&r.page_token)
                .map_err(|_| invalid("page_token is not a token from a previous page"))?;
            Some(r.page_token.as_str())
        };
        let page = self.state.credentials.list(after, size).await?;
        let next_page_token = if page.len() == size {
            page.last().map(|c| c.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let now = self.state.clock.now();
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: page.iter().map(|c| to_proto(c, now)).collect(),
            next_page_token,
        }))
    }

    async fn update_credential_state(
        &self,
        request: Request<pb::UpdateCredentialStateRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let action = match pb::CredentialAction::try_from(request.get_ref().action) {
            Ok(pb::CredentialAction::Enable) => Action::Enable,
            Ok(pb::CredentialAction::Disable) => Action::Disable,
            Ok(pb::CredentialAction::Unlock) => Action::Unlock,
            _ => return Err(invalid("action must be ENABLE, DISABLE or UNLOCK")),
        };
        // Lifting a lock is an officer's decision: a login service could otherwise
        // undo the brute-force protection of the very credentials it verifies.
        let roles: &[Role] = if action == Action::Unlock {
            &[Role::Officer]
        } else {
            LOGIN_OR_OFFICER
        };
        let caller = authorize(&self.state.authorizer, &request, roles)?;
        let rec = self
            .state
            .credentials
            .update_state_by(
                Some(&caller.actor()),
                &request.get_ref().credential_id,
                action,
            )
            .await?;
        Ok(Response::new(to_proto(&rec, self.state.clock.now())))
    }

    async fn delete_credential(
        &self,
        request: Request<pb::DeleteCredentialRequest>,
    ) -> Result<Response<pb::DeleteCredentialResponse>, Status> {
        let caller = authorize(&self.state.authorizer, &request, LOGIN_OR_OFFICER)?;
        let id = &request.get_ref().credential_id;
        self.state
            .credentials
            .delete_by(Some(&caller.actor()), id)
            .await?;
        Ok(Response::new(pb::DeleteCredentialResponse {}))
    }
}

fn verdict(v: Verdict) -> pb::VerifyResult {
    match v {
        Verdict::Accepted => pb::VerifyResult::Accepted,
        Verdict::Rejected => pb::VerifyResult::Rejected,
        Verdict::Replayed => pb::VerifyResult::Replayed,
        Verdict::Locked => pb::VerifyResult::Locked,
        Verdict::Disabled => pb::VerifyResult::Disabled,
    }
}

/// The record as callers see it: parameters and state, never the seed.
pub fn to_proto(r: &CredentialRecord, now: u64) -> pb::Credential {
    let state = if r.disabled {
        pb::CredentialState::Disabled
    } else if r.hard_locked {
        pb::CredentialState::HardLocked
    } else if r.locked_until > now {
        pb::CredentialState::Locked
    } else {
        pb::CredentialState::Active
    };
    pb::Credential {
        credential_id: r.id.clone(),
        kind: match r.kind {
            OtpKind::Hotp => pb::OtpKind::Hotp,
            OtpKind::Totp => pb::OtpKind::Totp,
        } as i32,
        algorithm: match r.algorithm {
            HashAlgorithm::Sha1 => pb::HashAlgorithm::Sha1,
            HashAlgorithm::Sha256 => pb::HashAlgorithm::Sha256,
            HashAlgorithm::Sha512 => pb::HashAlgorithm::Sha512,
        } as i32,
        digits: u32::from(r.digits),
        period_seconds: r.period_seconds,
        issuer: r.issuer.clone(),
        account_name: r.account_name.clone(),
        state: state as i32,
        failures: r.failures,
        locked_until: r.locked_until,
        counter: r.next_counter,
        drift_steps: r.drift_steps,
        created_at: r.created_at,
        updated_at: r.updated_at,
        last_accepted: r.last_accepted,
    }
}
