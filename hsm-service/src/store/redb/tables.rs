//! Every redb table of the data file, in one place.
//!
//! Every [`Table`] of the unit of work is a redb table of the same name, typed
//! `&str -> &[u8]` ([`def`]); the audit log keeps its own `u64 -> &[u8]` table
//! ([`AUDIT_LOG`]) as the single chain [`crate::store::uow::DEFAULT_CHAIN`]. A change
//! that an older build could misread bumps [`SCHEMA_VERSION`] and gets a migration in
//! `super::open`.

use redb::TableDefinition;

use crate::store::uow::Table;

/// The redb table behind `table`: same name, text keys, byte values.
pub(super) fn def(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

/// Schema 1's credential table (id -> record, no tenant); migrated into
/// [`Table::Credentials`] under the tenant `default` and deleted at open.
pub(super) const LEGACY_CREDENTIALS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("credentials");

/// Schema 2's evidence expiry index, `(expires_at, evidence id) -> ()`; replaced in
/// schema 3 by [`Table::EvidenceExpiry`] (text keys, same name) and rebuilt from the
/// evidence table at open.
pub(super) const LEGACY_EVIDENCE_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("evidence_expiry");

/// The audit trail (the one chain of an embedded store): seq -> one canonical JSON line.
pub(super) const AUDIT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_log");

/// Meta key of the schema version (u32, little endian).
pub(super) const SCHEMA_VERSION_KEY: &str = "store.schema_version";

/// Schema version this build writes and understands. A file with a higher
/// version is refused at open; older ones are migrated at open.
///
/// 1: first release. 2: credentials keyed by tenant and id, evidence tables.
/// 3: the evidence expiry index keyed by text (`expires_at` in 20 digits, NUL, id), like
/// every other table of the unit of work. 4: the event outbox (`events`,
/// `notification_prefs`); bumped so that an older build, which would commit changes
/// without their events, refuses the file. 5: the app authenticator (`devices`,
/// `device_subjects`, `device_activations`, `challenges`, `device_expiry`) and evidence format 2 (the
/// approved text's hash); bumped so that an older build, which cannot read app evidence,
/// refuses the file.
pub(super) const SCHEMA_VERSION: u32 = 5;

/// Creates every table in `txn` (redb creates a table on first write-open),
/// so read transactions never see "table does not exist".
pub(super) fn create_all(txn: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    for &table in Table::ALL {
        txn.open_table(def(table))?;
    }
    txn.open_table(AUDIT_LOG)?;
    Ok(())
}
