//! Errors of the writing side ([`super::Chain`], record parsing).

/// Why a chain operation or a record parse failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The record to resume from does not match its own hash or is otherwise unusable.
    #[error("cannot resume from record seq {seq}: {reason}")]
    BadResumePoint {
        /// The record's seq.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint was requested on a chain with no records.
    #[error("nothing to checkpoint: the chain is empty")]
    EmptyChain,
    /// The checkpoint head is not a record of this chain as far as it can tell.
    #[error("checkpoint head seq {head_seq} rejected: {reason}")]
    BadCheckpointHead {
        /// The head seq that was passed in.
        head_seq: u64,
        /// Why it was rejected.
        reason: String,
    },
    /// The signature is not a raw 64-byte `r||s` ECDSA P-256 signature.
    #[error("checkpoint signature must be 64 bytes (raw r||s), got {0}")]
    BadSignatureLength(usize),
    /// The key id is empty.
    #[error("checkpoint key id must not be empty")]
    EmptyKeyId,
    /// The HSM signer reported an error.
    #[error("checkpoint signer failed: {0}")]
    Signer(String),
    /// A line is not a well-formed record.
    #[error("invalid audit record: {0}")]
    Json(#[from] serde_json::Error),
}
