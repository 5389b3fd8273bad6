//! Every redb table of the data file, in one place.
//!
//! Later modules (audit log, signing key metadata) add their definitions
//! here, create them in `create_all`, and bump
//! [`SCHEMA_VERSION`] if an older build could misread the file.

use redb::TableDefinition;

/// Credential records: id -> encoded [`super::CredentialRecord`] (without id).
pub const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");

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
/// version is refused at open.
pub const SCHEMA_VERSION: u32 = 1;

/// Creates every table in `txn` (redb creates a table on first write-open),
/// so read transactions never see "table does not exist".
pub(super) fn create_all(txn: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(CREDENTIALS)?;
    txn.open_table(META)?;
    txn.open_table(SIGNING_KEYS)?;
    txn.open_table(AUDIT_LOG)?;
    txn.open_table(CEREMONIES)?;
    txn.open_table(CEREMONY_KEYS)?;
    Ok(())
}
