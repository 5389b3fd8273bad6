//! The unit of work: the one interface every backend implements and every domain module
//! writes through.
//!
//! Why tables of opaque bytes rather than one trait per aggregate: every aggregate
//! already has its own versioned record encoding, owned by the module that understands
//! it (credentials and evidence here in `store`, key versions in `signing`, ceremonies
//! in `ceremony`, audit lines in `audit`). What a backend must get right is the same for
//! all of them: a transaction that sees its own writes, that commits everything a job
//! wrote (the change, its audit record, later its event) or nothing, and whose reads of a
//! row it then writes cannot be overtaken by another writer (another instance) before
//! the commit. So the backend contract is small and is proved once, by the conformance
//! suite (`tests/store_conformance.rs`), for every backend; the typed operations on top
//! (`ops`, `evidence`, the domain modules' `load`/`put` functions) are written once for
//! all backends.
//!
//! Rules a backend must keep:
//! * A write [`Txn`] sees its own earlier writes (and those of earlier jobs of the same
//!   group-commit batch).
//! * [`ReadTxn::get`] inside a write [`Txn`] is a *locking* read: no other transaction
//!   (of this or any other instance) may commit a change to that key between this read
//!   and this transaction's commit (redb: one writer; PostgreSQL: `SELECT ... FOR UPDATE`
//!   and a key that does not exist yet is protected by the primary key at commit). That
//!   is the compare-and-set every exactly-once guarantee rests on.
//! * A read-only [`ReadTxn`] is one consistent snapshot of committed state.
//! * Keys are UTF-8 strings compared bytewise; scans return ascending key order.
//! * Errors are [`Rollback`]: the job's batch is rolled back, nothing of it commits.

use super::{Rollback, StoreError};

/// The tables every backend holds. Each is `key (text) -> value (bytes)`; what the key
/// and the value mean is documented on the variant and owned by one module.
///
/// Adding a table: a variant here, its name in [`Table::name`], an entry in
/// [`Table::ALL`], and a migration in each backend that creates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Table {
    /// `tenant NUL id` -> `store::record` encoding of a credential.
    Credentials,
    /// evidence id -> `store::evidence` encoding.
    Evidence,
    /// `expires_at (20 digits) NUL evidence id` -> empty: the purge index of [`Table::Evidence`].
    EvidenceExpiry,
    /// Small settings: key -> bytes. Keys starting with `store.` belong to the store.
    Meta,
    /// `name/version (10 digits)` -> `signing::versions` encoding (public metadata only).
    SigningKeys,
    /// ceremony id (64 hex) -> `ceremony::record` encoding.
    Ceremonies,
    /// `name/version (10 digits)` -> id of the ceremony that created that key version.
    CeremonyKeys,
    /// seq (20 digits) -> `store::events` encoding of an event (the outbox).
    Events,
    /// `tenant NUL subject` -> `store::events` encoding of a notification preference.
    NotificationPrefs,
    /// `tenant NUL device id` -> `devices::records` encoding of an app device.
    Devices,
    /// `tenant NUL subject` -> `devices::records` encoding of a subject's app state (its
    /// devices, pending challenge, throttles, suspension): the row every change of the
    /// subject's devices and challenges locks.
    DeviceSubjects,
    /// `tenant NUL activation id` -> `devices::records` encoding of a device activation.
    Activations,
    /// `tenant NUL challenge id` -> `devices::records` encoding of an approval challenge.
    Challenges,
    /// `purge_at (20 digits) NUL kind NUL tenant NUL id` -> empty: the purge index of
    /// [`Table::Activations`] (kind `a`) and [`Table::Challenges`] (kind `c`).
    DeviceExpiry,
}

impl Table {
    /// Every table, for copying and counting (migrate-store, conformance suite).
    pub const ALL: &'static [Table] = &[
        Table::Credentials,
        Table::Evidence,
        Table::EvidenceExpiry,
        Table::Meta,
        Table::SigningKeys,
        Table::Ceremonies,
        Table::CeremonyKeys,
        Table::Events,
        Table::NotificationPrefs,
        Table::Devices,
        Table::DeviceSubjects,
        Table::Activations,
        Table::Challenges,
        Table::DeviceExpiry,
    ];

    /// The table's name in every backend (redb table name, PostgreSQL table name).
    pub fn name(self) -> &'static str {
        match self {
            Table::Credentials => "tenant_credentials",
            Table::Evidence => "evidence",
            Table::EvidenceExpiry => "evidence_expiry",
            Table::Meta => "meta",
            Table::SigningKeys => "signing_keys",
            Table::Ceremonies => "ceremonies",
            Table::CeremonyKeys => "ceremony_keys",
            Table::Events => "events",
            Table::NotificationPrefs => "notification_prefs",
            Table::Devices => "devices",
            Table::DeviceSubjects => "device_subjects",
            Table::Activations => "device_activations",
            Table::Challenges => "challenges",
            Table::DeviceExpiry => "device_expiry",
        }
    }
}

/// A key range for [`ReadTxn::scan`]: keys `k` with `start <= k` (or `start < k` when
/// `after`), and `k < end` when `end` is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRange {
    /// Lower bound.
    pub start: String,
    /// The lower bound itself is excluded (paging: "keys after the last one seen").
    pub after: bool,
    /// Exclusive upper bound; `None`: to the end of the table.
    pub end: Option<String>,
}

impl KeyRange {
    /// Every key.
    pub fn all() -> KeyRange {
        KeyRange::default()
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &str) -> KeyRange {
        KeyRange {
            start: prefix.to_owned(),
            after: false,
            end: prefix_end(prefix),
        }
    }

    /// Whether `key` is inside the range.
    pub fn contains(&self, key: &str) -> bool {
        let low = if self.after {
            key > self.start.as_str()
        } else {
            key >= self.start.as_str()
        };
        low && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// The smallest string greater than every string starting with `prefix`, if any.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = char::from_u32(last as u32 + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The name of one audit chain. Each service instance appends to its own chain (see the
/// README's design section: one chain per instance, each with its own sequence and
/// checkpoints, so instances never contend for one chain head); the embedded store has
/// one instance and therefore one chain, [`DEFAULT_CHAIN`].
pub type ChainName = str;

/// The chain of a single-instance deployment (and of every redb store).
pub const DEFAULT_CHAIN: &str = "default";

/// Reads, inside a write [`Txn`] (locking, sees own writes) or a read-only snapshot.
pub trait ReadTxn {
    /// The value at `key`.
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, Rollback>;

    /// The values at `keys`, in their order: [`ReadTxn::get`] of each (the default),
    /// which a backend may do in one request (PostgreSQL: one locking read of them all).
    fn get_many(
        &mut self,
        table: Table,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, Rollback> {
        keys.iter().map(|k| self.get(table, k)).collect()
    }

    /// Up to `limit` entries of `range`, ascending by key.
    fn scan(
        &mut self,
        table: Table,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Rollback>;

    /// Number of entries of `table`.
    fn count(&mut self, table: Table) -> Result<u64, Rollback>;

    /// The last record of `chain`: its seq and stored line.
    fn audit_last(&mut self, chain: &ChainName) -> Result<Option<(u64, Vec<u8>)>, Rollback>;

    /// Up to `limit` records of `chain` with seq `>= from`, ascending.
    fn audit_range(
        &mut self,
        chain: &ChainName,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Rollback>;

    /// Number of records of `chain`.
    fn audit_count(&mut self, chain: &ChainName) -> Result<u64, Rollback>;

    /// Every chain that holds at least one record, ascending.
    fn audit_chains(&mut self) -> Result<Vec<String>, Rollback>;
}

/// One write transaction (a group-commit batch), as one job sees it.
pub trait Txn: ReadTxn {
    /// Sets `key` to `value`.
    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), Rollback>;

    /// Inserts `value` at a `key` the caller knows to be new (a fresh 128-bit random id):
    /// a key that exists fails the batch, here or at the commit. Default: a locking
    /// [`ReadTxn::get`], refusing an existing key as [`StoreError::AlreadyExists`], then
    /// [`Txn::put`]. A backend may skip the read (PostgreSQL: a plain `INSERT` at the
    /// flush, which the primary key refuses: [`StoreError::Aborted`]).
    fn insert_new(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), Rollback> {
        if self.get(table, key)?.is_some() {
            return Err(Rollback(StoreError::AlreadyExists));
        }
        self.put(table, key, value)
    }

    /// Removes `key`; whether it existed.
    fn delete(&mut self, table: Table, key: &str) -> Result<bool, Rollback>;

    /// Appends record `seq` to `chain`. The caller (the audit module) computed `seq` as
    /// the chain's last seq + 1 inside this transaction; a backend refuses (as a
    /// [`Rollback`]) a seq that is already taken, so two writers of one chain cannot
    /// both commit.
    fn audit_put(&mut self, chain: &ChainName, seq: u64, line: &[u8]) -> Result<(), Rollback>;
}

/// A read-only closure, type-erased so that backends stay object safe.
pub type ReadJob<'a> = Box<dyn FnOnce(&mut dyn ReadTxn) -> Result<(), StoreError> + Send + 'a>;
