//! Every redb table of the data file, in one place.
//!
//! Later modules (audit log, signing key metadata) add their definitions
//! here, create them in `create_all`, and bump
//! [`SCHEMA_VERSION`] if an older build could misread the file.

use redb::TableDefinition;

/// Credential records: `tenant NUL id` -> encoded [`super::CredentialRecord`] (without
/// tenant and id). Since schema 2.
pub const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenant_credentials");

/// Schema 1's credential table (id -> record, no tenant); migrated into
/// [`CREDENTIALS`] under the tenant `default` and deleted at open.
pub const LEGACY_CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");

/// Evidence of accepted codes: evidence id -> encoded `super::EvidenceRecord`.
pub const EVIDENCE: TableDefinition<&str, &[u8]> = TableDefinition::new("evidence");

/// Expiry index of [`EVIDENCE`]: (expires_at, evidence id) -> (), for purging.
pub const EVIDENCE_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("evidence_expiry");

/// Small key-value settings: key -> opaque bytes. Keys starting with
/// [`RESERVED_META_PREFIX`] belong to the store itself.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Signing key versions: `"<name>/<version, 10 digits>"` -> encoded
/// `crate::signing::KeyVersion` (public metadata only; private keys stay in the HSM).
pub const SIGNING_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("signing_keys");

/// The audit trail: seq -> one canonical JSON line (`crate::audit::AuditRecord`).
pub const AUDIT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_log");

/// Key ceremonies: ceremony id (64 lower-case hex digits) -> encoded
/// `crate::ceremony::CeremonyRecord` (the canonical plan, approvals, outcome).
pub const CEREMONIES: TableDefinition<&str, &[u8]> = TableDefinition::new("ceremonies");

/// Which ceremony created a signing key version: `"<name>/<version, 10 digits>"` ->
/// ceremony id (UTF-8).
pub const CEREMONY_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("ceremony_keys");

/// Meta keys with this prefix are written only by the store.
pub const RESERVED_META_PREFIX: &str = "store.";

/// Meta key of the schema version (u32, little endian).
pub const SCHEMA_VERSION_KEY: &str = "store.schema_version";

/// Schema version this build writes and understands. A file with a higher
/// version is refused at open; version 1 (credentials keyed by id alone) is
/// migrated at open.
///
/// 1: first release. 2: credentials keyed by tenant and id, evidence tables.
pub const SCHEMA_VERSION: u32 = 2;

/// Creates every table in `txn` (redb creates a table on first write-open),
/// so read transactions never see "table does not exist".
pub(super) fn create_all(txn: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(CREDENTIALS)?;
    txn.open_table(EVIDENCE)?;
    txn.open_table(EVIDENCE_EXPIRY)?;
    txn.open_table(META)?;
    txn.open_table(SIGNING_KEYS)?;
    txn.open_table(AUDIT_LOG)?;
    txn.open_table(CEREMONIES)?;
    txn.open_table(CEREMONY_KEYS)?;
    Ok(())
}
