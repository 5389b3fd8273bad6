//! `hsm.v1.CredentialService`: proto <-> domain, and who may call what.

use hsm_proto::v1 as pb;
use hsm_proto::v1::credential_service_server::CredentialService;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::State;
use crate::auth::{authorize, Identity, Role};
use crate::credentials::{Action, NewCredential, Outcome, Verdict};
use crate::error::Error;
use crate::otp::{HashAlgorithm, OtpKind};
use crate::store::{CredentialKey, CredentialRecord};

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

/// The tenant a call acts on: a login service's own (from its certificate's rule; it may
/// not name one), or for an officer the one the request names (required).
fn tenant_of(caller: &Identity, requested: &str) -> Result<String, Status> {
    match caller.role {
        Role::Officer => {
            if requested.is_empty() {
                return Err(invalid(
                    "tenant: officers must name the credential's tenant",
                ));
            }
            crate::credentials::check_tenant(requested)?;
            Ok(requested.to_owned())
        }
        _ if !requested.is_empty() => Err(invalid(
            "tenant is for officers: a login service acts on its own tenant's credentials",
        )),
        _ => Ok(caller.tenant.clone()),
    }
}

/// Which tenant a listing covers: a login service's own; for an officer the named one,
/// or every tenant (`None`).
fn list_scope(caller: &Identity, requested: &str) -> Result<Option<String>, Status> {
    if caller.role == Role::Officer && requested.is_empty() {
        Ok(None)
    } else {
        tenant_of(caller, requested).map(Some)
    }
}

/// Page tokens: the last id of a one-tenant listing; for a listing of every tenant,
/// `hex(tenant):id` (hex, so that any tenant name survives and ':' separates).
fn page_token(scoped: bool, last: &CredentialRecord) -> String {
    if scoped {
        last.id.clone()
    } else {
        format!("{}:{}", crate::common::hex(last.tenant.as_bytes()), last.id)
    }
}

fn parse_page_token(scope: Option<&str>, token: &str) -> Result<Option<CredentialKey>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token is not a token from a previous page");
    let (tenant, id) = match scope {
        Some(t) => (t.to_owned(), token),
        None => {
            let (h, id) = token.split_once(':').ok_or_else(bad)?;
            let bytes = (0..h.len())
                .step_by(2)
                .map(|i| h.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(bad)?;
            let tenant = String::from_utf8(bytes).map_err(|_| bad())?;
            crate::credentials::check_tenant(&tenant).map_err(|_| bad())?;
            (tenant, id)
        }
    };
    crate::credentials::check_id(id).map_err(|_| bad())?;
    Ok(Some(CredentialKey {
        tenant,
        id: id.to_owned(),
    }))
}

#[tonic::async_trait]
impl CredentialService for CredentialApi {
    async fn import_credentials(
        &self,
        request: Request<tonic::Streaming<pb::ImportCredentialsRequest>>,
    ) -> Result<Response<pb::ImportCredentialsResponse>, Status> {
        let caller = authorize(&self.state.authorizer, &request, LOGIN)?;
        let stream = request.into_inner();
        super::import::run(&self.state, &caller, stream)
            .await
            .map(Response::new)
    }

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
                &caller.tenant,
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
                    subject: (!r.subject.is_empty()).then_some(r.subject),
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
        let v = self
            .state
            .credentials
            .verify_by(
                Some(&caller.actor()),
                &caller.tenant,
                &r.credential_id,
                &code,
            )
            .await?;
        crate::metrics::verify_result(verdict_label(v.outcome.verdict));
        Ok(Response::new(pb::VerifyCodeResponse {
            result: verdict(v.outcome.verdict) as i32,
            remaining_attempts: v.outcome.remaining_attempts,
            retry_after_seconds: v.outcome.retry_after_seconds,
            evidence_id: v.evidence_id.unwrap_or_default(),
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
            .resync_by(
                Some(&caller.actor()),
                &caller.tenant,
                &r.credential_id,
                &code1,
                &code2,
            )
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
        let caller = authorize(&self.state.authorizer, &request, LOGIN_OR_OFFICER)?;
        let r = request.get_ref();
        let tenant = tenant_of(&caller, &r.tenant)?;
        let rec = self
            .state
            .credentials
            .get(&tenant, &r.credential_id)
            .await?;
        Ok(Response::new(to_proto(&rec, self.state.clock.now())))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let caller = authorize(&self.state.authorizer, &request, LOGIN_OR_OFFICER)?;
        let r = request.into_inner();
        let size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(invalid("page_size must be at most 1000")),
        };
        let scope = list_scope(&caller, &r.tenant)?;
        let after = parse_page_token(scope.as_deref(), &r.page_token)?;
        let page = self
            .state
            .credentials
            .list(scope.as_deref(), after.as_ref(), size)
            .await?;
        let next_page_token = match page.last() {
            Some(last) if page.len() == size => page_token(scope.is_some(), last),
            _ => String::new(),
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
        let tenant = tenant_of(&caller, &request.get_ref().tenant)?;
        let rec = self
            .state
            .credentials
            .update_state_by(
                Some(&caller.actor()),
                caller.role.as_str(),
                &tenant,
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
        let tenant = tenant_of(&caller, &request.get_ref().tenant)?;
        self.state
            .credentials
            .delete_by(Some(&caller.actor()), &tenant, id)
            .await?;
        Ok(Response::new(pb::DeleteCredentialResponse {}))
    }
}

/// The `result` label of `hsm_verify_results_total`.
fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::Accepted => "accepted",
        Verdict::Rejected => "rejected",
        Verdict::Replayed => "replayed",
        Verdict::Locked => "locked",
        Verdict::Disabled => "disabled",
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
        subject: r.subject.clone().unwrap_or_default(),
        tenant: r.tenant.clone(),
    }
}
