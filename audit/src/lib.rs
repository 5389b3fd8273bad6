#![forbid(unsafe_code)]
#![warn(missing_docs)]
//! Tamper-evident audit trail.
//!
//! Every security-relevant event (ceremony proposals, approvals, refusals and steps, key
//! state changes, credential creation/lock/unlock/delete, failed authorizations, service
//! start/stop, and high-volume events such as each code verification) is appended as an
//! [`AuditRecord`] to a hash chain:
//!
//! * `seq` runs 1, 2, 3, … with no gaps;
//! * `prev` is the `hash` of the previous record (64 zeros for seq 1);
//! * `hash` is the lowercase hex SHA-256 of the record's canonical bytes (every field
//!   but `hash`; see [`AuditRecord::canonical_bytes`]).
//!
//! Every N ordinary records ([`Chain::checkpoint_due`]) and at shutdown, a checkpoint
//! record (action [`CHECKPOINT_ACTION`]) is appended carrying an ECDSA P-256 signature,
//! by an audit key held in the HSM, over [`checkpoint_statement`] of a head (seq and
//! hash). Signing is two-phase because HSM calls are asynchronous: take
//! [`Chain::head`], sign [`checkpoint_statement`] of it, then
//! [`Chain::checkpoint_record`] with the signature.
//!
//! The export format is JSON Lines: one [`AuditRecord::to_json_line`] per line, in seq
//! order ([`write_jsonl`]). [`verify()`] checks such a file offline and reports exactly
//! where and how it was altered (its documentation states the attribution rules) in a
//! [`VerifyReport`].
//!
//! A deployment of several instances keeps one chain per instance; [`verify_chains`]
//! checks an export of several chains, each on its own (see the `chains` module for the
//! format: a header line names the chain of the records after it).
//!
//! **No secret ever goes into a record** (see [`Details`]).

mod chain;
mod chains;
mod error;

mod record;
pub mod text;
mod verify;

#[cfg(test)]
mod tests;

use std::io::{self, Write};

pub use self::chain::{
    checkpoint_statement, verify_checkpoint_signature, Chain, CheckpointClaim, CheckpointSigner,
    Event, CHECKPOINT_STATEMENT_PREFIX, DEFAULT_CHECKPOINT_INTERVAL,
};
pub use self::chains::{
    chain_header, check_chain_name, parse_chain_header, verify_chains, ChainReport, ChainsOptions,
    ChainsReport, ChainsVerifier, DEFAULT_CHAIN, MAX_CHAIN_NAME_LEN,
};
pub use self::error::AuditError;
pub use self::record::{
    sha256_hex, Actor, AuditRecord, DetailValue, Details, Head, GENESIS_PREV, SERVICE_SUBJECT,
};
pub use self::verify::{
    verify, verify_with, KeyPin, Problem, ProblemKind, VerifyOptions, VerifyReport,
};

/// The action of checkpoint records (reserved: never use it for an [`Event`]).
pub const CHECKPOINT_ACTION: &str = "audit.checkpoint";

/// The object of checkpoint records.
pub const CHECKPOINT_OBJECT: &str = "audit-log";

/// How far (in records) a checkpoint's head may lag behind the checkpoint record, to
/// allow appends while an HSM signature is in flight. [`Chain::checkpoint_record`]
/// refuses more; [`verify()`] looks a head up within this many records.
pub const MAX_CHECKPOINT_LAG: u64 = 65_536;

/// Writes records as JSON Lines (one [`AuditRecord::to_json_line`] plus `\n` each).
/// Pass them in seq order.
pub fn write_jsonl<'a, W: Write>(
    mut out: W,
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> io::Result<()> {
    for r in records {
        out.write_all(r.to_json_line().as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}
