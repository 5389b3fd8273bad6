//! `hsm.v1.AuditService`: the audit trail for auditors.

use std::pin::Pin;

use hsm_proto::v1 as pb;
use hsm_proto::v1::audit_service_server::AuditService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::State;
use crate::auth::{authorize, Role};

/// Records per streamed chunk.
const CHUNK: usize = 1000;

/// The audit service handler.
pub struct AuditApi {
    state: State,
}

impl AuditApi {
    /// A handler over the shared state.
    pub fn new(state: State) -> AuditApi {
        AuditApi { state }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::AuditChunk, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditApi {
    type ExportAuditStream = ChunkStream;

    async fn export_audit(
        &self,
        request: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        authorize(&self.state.authorizer, &request, &[Role::Auditor])?;
        let mut next = request.get_ref().from_seq.max(1);
        let log = self.state.audit.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let from = next;
                // The store moves the read off the runtime's workers when its engine's
                // reads block.
                let (jsonl, records) = match log.export_range(from, CHUNK).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                if records == 0
                    || tx
                        .send(Ok(pb::AuditChunk { jsonl, records }))
                        .await
                        .is_err()
                {
                    return;
                }
                next += u64::from(records);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_audit_keys(
        &self,
        request: Request<pb::GetAuditKeysRequest>,
    ) -> Result<Response<pb::GetAuditKeysResponse>, Status> {
        authorize(&self.state.authorizer, &request, &[Role::Auditor])?;
        let keys = self
            .state
            .audit
            .trusted_keys()
            .into_iter()
            .map(|(key_id, public_key)| pb::AuditKey { key_id, public_key })
            .collect();
        Ok(Response::new(pb::GetAuditKeysResponse { keys }))
    }

    async fn checkpoint_audit(
        &self,
        request: Request<pb::CheckpointAuditRequest>,
    ) -> Result<Response<pb::CheckpointAuditResponse>, Status> {
        authorize(
            &self.state.authorizer,
            &request,
            &[Role::Auditor, Role::Officer],
        )?;
        let record = self.state.audit.checkpoint().await?;
        let (seq, head_seq) = record.map_or((0, 0), |r| {
            let head = r
                .details
                .as_ref()
                .and_then(|d| d.get("head_seq"))
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            (r.seq, head)
        });
        Ok(Response::new(pb::CheckpointAuditResponse { seq, head_seq }))
    }
}
