//! `hsm.v1.CeremonyService`: proto <-> [`crate::ceremony`].

use hsm_proto::v1::ceremony_service_server::CeremonyService;
use hsm_proto::v1::{
    ApproveCeremonyRequest, CeremonyApproval, CeremonyInfo, ExecuteCeremonyRequest,
    ExecuteCeremonyResponse, GetCeremonyRequest, ListCeremoniesRequest, ListCeremoniesResponse,
    ProposeCeremonyRequest,
};
use tonic::{Request, Response, Status};

use super::State;
use crate::auth::{Identity, Role};
use crate::ceremony::CeremonyView;
use crate::error::Error;

/// The ceremony handlers.
pub struct CeremonyApi {
    state: State,
}

impl CeremonyApi {
    /// A handler over the shared state.
    pub fn new(state: State) -> CeremonyApi {
        CeremonyApi { state }
    }

    /// The caller, required to hold one of `allowed`; a refusal is recorded by the
    /// authorizer like every other refused call.
    fn caller<T>(&self, request: &Request<T>, allowed: &[Role]) -> Result<Identity, Error> {
        crate::auth::authorize(&self.state.authorizer, request, allowed)
    }
}

fn info(v: CeremonyView) -> CeremonyInfo {
    let ttl = v.approval_ttl_seconds;
    let r = v.record;
    CeremonyInfo {
        ceremony_id: r.id,
        state: r.state.as_str().to_owned(),
        description: v.description,
        steps: v.steps,
        canonical_plan: r.canonical_plan,
        plan_toml: r.plan_toml,
        proposed_by: r.proposed_by.subject,
        proposed_at: r.proposed_at,
        approvals: r
            .approvals
            .into_iter()
            .map(|a| CeremonyApproval {
                subject: a.officer.subject,
                fingerprint: a.officer.fingerprint,
                approved_at: a.approved_at,
                expires_at: a.approved_at.saturating_add(ttl),
            })
            .collect(),
        valid_approvals: v.valid_approvals,
        threshold: v.threshold,
        executed_by: r.executed_by.map(|o| o.subject).unwrap_or_default(),
        executed_at: r.executed_at,
        failure: r.failure,
        kek_shares_held: v.kek_shares_held,
    }
}

#[tonic::async_trait]
impl CeremonyService for CeremonyApi {
    async fn propose_ceremony(
        &self,
        request: Request<ProposeCeremonyRequest>,
    ) -> Result<Response<CeremonyInfo>, Status> {
        let caller = self.caller(&request, &[Role::Officer])?;
        let r = request.into_inner();
        let v = self.state.ceremonies.propose(&caller, &r.plan_toml).await?;
        Ok(Response::new(info(v)))
    }

    async fn approve_ceremony(
        &self,
        request: Request<ApproveCeremonyRequest>,
    ) -> Result<Response<CeremonyInfo>, Status> {
        let object = request.get_ref().ceremony_id.clone();
        let caller = self.caller(&request, &[Role::Officer])?;
        // The share is secret: zeroized when this call ends; only its parsed form stays
        // (in memory, see `ceremony`).
        let share = zeroize::Zeroizing::new(request.into_inner().kek_share);
        let share = (!share.is_empty()).then_some(share.as_str());
        let v = self
            .state
            .ceremonies
            .approve(&caller, &object, share)
            .await?;
        Ok(Response::new(info(v)))
    }

    async fn execute_ceremony(
        &self,
        request: Request<ExecuteCeremonyRequest>,
    ) -> Result<Response<ExecuteCeremonyResponse>, Status> {
        let object = request.get_ref().ceremony_id.clone();
        let caller = self.caller(&request, &[Role::Officer])?;
        let x = self
            .state
            .ceremonies
            .execute_to_completion(&caller, &object)
            .await?;
        Ok(Response::new(ExecuteCeremonyResponse {
            ceremony: Some(info(x.view)),
            transcript_json: x.transcript_json,
            transcript_text: x.transcript_text,
        }))
    }

    async fn get_ceremony(
        &self,
        request: Request<GetCeremonyRequest>,
    ) -> Result<Response<CeremonyInfo>, Status> {
        let object = request.get_ref().ceremony_id.clone();
        self.caller(&request, &[Role::Officer, Role::Auditor])?;
        Ok(Response::new(info(
            self.state.ceremonies.get(&object).await?,
        )))
    }

    async fn list_ceremonies(
        &self,
        request: Request<ListCeremoniesRequest>,
    ) -> Result<Response<ListCeremoniesResponse>, Status> {
        self.caller(&request, &[Role::Officer, Role::Auditor])?;
        Ok(Response::new(ListCeremoniesResponse {
            ceremonies: self
                .state
                .ceremonies
                .list()
                .await?
                .into_iter()
                .map(info)
                .collect(),
        }))
    }
}
