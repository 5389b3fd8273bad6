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
        let from = request.get_ref().from_seq.max(1);
        let log = self.state.audit.clone();
        let chains = match request.get_ref().chain.as_str() {
            "" => log.chain_names().await?,
            name => {
                crate::audit::check_chain_name(name).map_err(|e| {
                    Status::invalid_argument(format!("ExportAuditRequest.chain: {e}"))
                })?;
                if !log.chain_names().await?.iter().any(|c| c == name) {
                    return Err(Status::not_found(format!(
                        "no audit chain {name} (hsmctl audit chains lists them)"
                    )));
                }
                vec![name.to_owned()]
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for chain in chains {
                let mut next = from;
                loop {
                    // The store moves the read off the runtime's workers when its engine's
                    // reads block.
                    let (jsonl, records) = match log.export_chain_range(&chain, next, CHUNK).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    };
                    if records == 0 {
                        break;
                    }
                    let chunk = pb::AuditChunk {
                        jsonl,
                        records,
                        chain: chain.clone(),
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    next += u64::from(records);
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_audit_chains(
        &self,
        request: Request<pb::ListAuditChainsRequest>,
    ) -> Result<Response<pb::ListAuditChainsResponse>, Status> {
        authorize(&self.state.authorizer, &request, &[Role::Auditor])?;
        let chains = self
            .state
            .audit
            .chains()
            .await?
            .into_iter()
            .map(|c| {
                let (last_checkpoint_seq, last_checkpoint_head_seq) =
                    c.last_checkpoint.unwrap_or((0, 0));
                let (head_seq, head_hash) = c.head.map_or((0, String::new()), |h| (h.seq, h.hash));
                pb::AuditChainInfo {
                    chain: c.chain,
                    records: c.records,
                    head_seq,
                    head_hash,
                    last_checkpoint_seq,
                    last_checkpoint_head_seq,
                }
            })
            .collect();
        Ok(Response::new(pb::ListAuditChainsResponse {
            chains,
            own_chain: self.state.audit.chain().to_string(),
        }))
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
