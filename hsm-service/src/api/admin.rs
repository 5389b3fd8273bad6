//! `hsm.v1.AdminService`.

use hsm_proto::v1::admin_service_server::AdminService;
use hsm_proto::v1::{GetStatusRequest, GetStatusResponse, MetricsSummary, PoolInfo, TokenInfo};
use tonic::{Request, Response, Status};

use super::State;
use crate::auth::{authorize, Role};

/// Service status for officers and auditors.
pub struct Admin {
    state: State,
}

impl Admin {
    /// A handler over the shared state.
    pub fn new(state: State) -> Admin {
        Admin { state }
    }
}

/// The registry's main figures (see `crate::metrics::summary`).
fn metrics_summary(endpoint: Option<std::net::SocketAddr>) -> MetricsSummary {
    let m = crate::metrics::summary();
    MetricsSummary {
        endpoint: endpoint.map_or_else(String::new, |a| {
            format!("http://{a}{}", crate::metrics::PATH)
        }),
        rpc_requests: m.rpc_requests,
        rpc_failed: m.rpc_failed,
        verify_accepted: m.verify_accepted,
        verify_not_accepted: m.verify_not_accepted,
        hsm_errors: m.hsm_errors,
        seed_cache_hits: m.seed_cache_hits,
        seed_cache_misses: m.seed_cache_misses,
        seed_cache_evictions: m.seed_cache_evictions,
        commits: m.commits,
        committed_jobs: m.committed_jobs,
        audit_records: m.audit_records,
        audit_checkpoints: m.audit_checkpoints,
        event_watches_open: m.event_watches_open,
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let caller = authorize(
            &self.state.authorizer,
            &request,
            &[Role::Officer, Role::Auditor],
        )?;
        let hsm = &self.state.hsm;
        let facts = hsm.facts();
        let stats = hsm.stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        Ok(Response::new(GetStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.state.started.elapsed().as_secs(),
            token: Some(TokenInfo {
                label: facts.label.clone(),
                serial_number: facts.serial_number.clone(),
                manufacturer: facts.manufacturer.clone(),
                model: facts.model.clone(),
                library: facts.library.clone(),
                logged_in: hsm.is_logged_in().await,
            }),
            pool: Some(PoolInfo {
                sessions: u32::try_from(hsm.sessions()).unwrap_or(u32::MAX),
                queue_capacity: u32::try_from(hsm.queue_capacity()).unwrap_or(u32::MAX),
                queued: u32::try_from(hsm.queued()).unwrap_or(u32::MAX),
                completed: load(&stats.completed),
                rejected_busy: load(&stats.rejected_busy),
                sessions_replaced: load(&stats.sessions_replaced),
            }),
            caller_role: caller.role.as_str().to_owned(),
            caller_subject: caller.subject,
            metrics: Some(metrics_summary(self.state.metrics_addr)),
        }))
    }
}
