//! `hsm-service migrate-store`: copy every table and every audit chain of one store into
//! an empty other one (the embedded store into PostgreSQL), page by page, then verify
//! the copy: row counts per table, record counts per chain, and every chain on the
//! target with the audit verifier `hsmctl audit verify` runs.
//!
//! Written against [`Backend`] only, so it copies between any two engines; run with the
//! service stopped (nothing else may write the source meanwhile).

use std::fmt::Write as _;

use crate::audit::log::{stored_keys, verify_stored_chains};
use crate::audit::ChainsReport;
use crate::store::ops::RESERVED_META_PREFIX;
use crate::store::{Backend, KeyRange, ReadTxn, StoreError, Table};

/// Rows (or audit records) per read page and per target transaction: a page is all that
/// is ever in memory, whatever the store's size.
pub const PAGE: usize = 1000;

/// What was copied and what the verification found.
#[derive(Debug)]
pub struct MigrateSummary {
    /// Per table: its name, rows in the source (meta: without the engine's own `store.*`
    /// settings), rows in the target after the copy.
    pub tables: Vec<(&'static str, u64, u64)>,
    /// Per audit chain: its name, records in the source, records in the target.
    pub chains: Vec<(String, u64, u64)>,
    /// The audit verifier's report on the target.
    pub audit: ChainsReport,
}

impl MigrateSummary {
    /// True when every count matches and every chain on the target verifies.
    pub fn is_ok(&self) -> bool {
        self.tables.iter().all(|(_, s, t)| s == t)
            && self.chains.iter().all(|(_, s, t)| s == t)
            && self.audit.is_ok()
    }
}

impl std::fmt::Display for MigrateSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, source, target) in &self.tables {
            let verdict = if source == target { "ok" } else { "MISMATCH" };
            writeln!(
                f,
                "table {name:<20} {source:>10} rows in the source, {target:>10} on the target: {verdict}"
            )?;
        }
        for (name, source, target) in &self.chains {
            let verdict = if source == target { "ok" } else { "MISMATCH" };
            writeln!(
                f,
                "audit chain {name:<14} {source:>10} records in the source, {target:>10} on the target: {verdict}"
            )?;
        }
        write!(
            f,
            "verification of the target's audit trail:\n{}",
            self.audit
        )
    }
}

/// Meta key of the target while a copy into it runs: written (in a transaction of its
/// own) before the first row, removed after the last. A target that holds it is what a
/// run that stopped part-way left behind.
pub const INCOMPLETE_META: &str = "migrate_store.incomplete";

/// Why a migration did not happen or did not verify.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The target holds data already: nothing was written.
    #[error(
        "the target store is not empty ({0}): migrate-store copies only into an empty database; name a new, empty one (CREATE DATABASE), or drop and create this one again if nothing in it is needed"
    )]
    NotEmpty(String),
    /// The target holds what an earlier run left when it stopped part-way: nothing was
    /// written.
    #[error(
        "the target store holds a partial copy ({0}) left by an earlier migrate-store run that stopped part-way: drop the database and create it again empty (DROP DATABASE ...; CREATE DATABASE ...), then run migrate-store again; the source was not changed"
    )]
    Incomplete(String),
    /// Reading the source or writing the target failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

fn read<T>(
    backend: &dyn Backend,
    f: impl FnOnce(&mut dyn ReadTxn) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut f = Some(f);
    let mut out = None;
    backend.read(&mut |txn| {
        if let Some(f) = f.take() {
            out = Some(f(txn)?);
        }
        Ok(())
    })?;
    out.ok_or_else(|| StoreError::Backend("the read did not run".into()))
}

/// Refuses a target that holds any row or audit record, naming the first it found (and
/// saying so when it is a partial copy of an earlier run).
pub fn check_empty(target: &dyn Backend) -> Result<(), MigrateError> {
    let partial = read(target, |txn| {
        Ok(txn.get(Table::Meta, INCOMPLETE_META)?.is_some())
    })?;
    let found = read(target, |txn| {
        for &table in Table::ALL {
            let n = txn.count(table)?;
            if n > 0 {
                return Ok(Some(format!("table {} holds {n} rows", table.name())));
            }
        }
        Ok(txn
            .audit_chains()?
            .first()
            .map(|c| format!("audit chain {c} holds records")))
    })?;
    match found {
        Some(what) if partial => Err(MigrateError::Incomplete(what)),
        Some(what) => Err(MigrateError::NotEmpty(what)),
        None => Ok(()),
    }
}

/// Keys of the source the target must not get: the engine's own settings (`store.*` in
/// meta: its schema version), which the target keeps its own way.
fn copied(table: Table, key: &str) -> bool {
    table != Table::Meta || !key.starts_with(RESERVED_META_PREFIX)
}

/// Copies every table ([`Table::ALL`]) and every audit chain of `source` into `target`
/// (which must be empty: see [`check_empty`]), [`PAGE`] rows per transaction, calling
/// `progress` after each table and chain; then verifies the copy.
pub fn copy_store(
    source: &dyn Backend,
    target: &dyn Backend,
    mut progress: impl FnMut(&str),
) -> Result<MigrateSummary, MigrateError> {
    check_empty(target)?;
    // What the source holds, counted apart from the copy (the engine's own settings excluded).
    let source_counts = read(source, |txn| {
        let mut counts = Vec::new();
        for &table in Table::ALL {
            let mut n = txn.count(table)?;
            if table == Table::Meta {
                n -= txn
                    .scan(table, &KeyRange::prefix(RESERVED_META_PREFIX), usize::MAX)?
                    .len() as u64;
            }
            counts.push(n);
        }
        Ok(counts)
    })?;
    let mut mark = target.begin_batch()?;
    mark.put(Table::Meta, INCOMPLETE_META, b"")
        .map_err(StoreError::from)?;
    mark.commit()?;
    let mut tables = Vec::new();
    for &table in Table::ALL {
        let mut range = KeyRange::all();
        let mut copied_rows = 0u64;
        loop {
            let page = read(source, |txn| Ok(txn.scan(table, &range, PAGE)?))?;
            let Some((last, _)) = page.last() else { break };
            range = KeyRange {
                start: last.clone(),
                after: true,
                end: None,
            };
            let full = page.len() == PAGE;
            let mut batch = target.begin_batch()?;
            for (key, value) in page.iter().filter(|(k, _)| copied(table, k)) {
                batch.put(table, key, value).map_err(StoreError::from)?;
                copied_rows += 1;
            }
            batch.commit()?;
            if !full {
                break;
            }
        }
        progress(&format!(
            "table {}: {copied_rows} rows copied",
            table.name()
        ));
        tables.push(table);
    }
    let chains = read(source, |txn| Ok(txn.audit_chains()?))?;
    let mut chain_counts = Vec::new();
    for chain in &chains {
        let mut from = 0u64;
        let mut n = 0u64;
        loop {
            let page = read(source, |txn| Ok(txn.audit_range(chain, from, PAGE)?))?;
            let Some(&(last, _)) = page.last() else { break };
            let mut batch = target.begin_batch()?;
            for (seq, line) in &page {
                batch
                    .audit_put(chain, *seq, line)
                    .map_err(StoreError::from)?;
            }
            batch.commit()?;
            n += page.len() as u64;
            if page.len() < PAGE {
                break;
            }
            from = last + 1;
        }
        progress(&format!("audit chain {chain}: {n} records copied"));
        chain_counts.push((chain.clone(), n));
    }

    let mut done = target.begin_batch()?;
    done.delete(Table::Meta, INCOMPLETE_META)
        .map_err(StoreError::from)?;
    done.commit()?;

    // Verify: counts on the target, and every chain with the audit verifier.
    let (target_tables, target_chains, audit) = read(target, |txn| {
        let mut t = Vec::new();
        for &table in Table::ALL {
            t.push(txn.count(table)?);
        }
        let mut c = Vec::new();
        for (chain, _) in &chain_counts {
            c.push(txn.audit_count(chain)?);
        }
        let keys = stored_keys(txn)?;
        Ok((t, c, verify_stored_chains(txn, &keys)?))
    })?;
    Ok(MigrateSummary {
        tables: tables
            .iter()
            .zip(source_counts)
            .zip(target_tables)
            .map(|((table, s), t)| (table.name(), s, t))
            .collect(),
        chains: chain_counts
            .into_iter()
            .zip(target_chains)
            .map(|((c, s), t)| (c, s, t))
            .collect(),
        audit,
    })
}

/// What the operator changes in the config after a migration to `url`.
pub fn config_advice(url: &str, password_file: &std::path::Path, chains: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Now change the config's [store] section (the embedded store file stays as it was; keep it until the new setup is verified):"
    );
    let _ = writeln!(s, "  [store]");
    let _ = writeln!(s, "  backend = \"postgres\"");
    let _ = writeln!(s, "  url = \"{url}\"");
    let _ = writeln!(s, "  password_file = \"{}\"", password_file.display());
    let default = crate::store::DEFAULT_CHAIN;
    if chains.iter().any(|c| c == default) {
        let _ = writeln!(
            s,
            "  instance = \"{default}\"   # continues the migrated audit chain {default}; a further instance needs a name of its own (its own chain)"
        );
    } else {
        let _ = writeln!(
            s,
            "  instance = \"NAME\"   # each instance its own name (its audit chain)"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, Chain, Event};
    use crate::store::test_support::MemoryBackend;

    /// Pages (more rows than [`PAGE`]), several chains, the engine's own settings left
    /// behind, and a second copy refused.
    #[test]
    fn every_table_and_chain_is_copied_page_by_page() {
        let source = MemoryBackend::default();
        let mut b = source.begin_batch().unwrap();
        for i in 0..(2 * PAGE + 7) {
            b.put(Table::Credentials, &format!("t\0c-{i:05}"), b"record")
                .unwrap();
        }
        b.put(Table::Meta, "store.schema_version", &[0, 0, 0, 3])
            .unwrap();
        b.put(Table::Meta, "audit.key_id", b"id").unwrap();
        for (chain, n) in [("default", PAGE as u64 + 3), ("node-2", 5)] {
            let mut c = Chain::new();
            for i in 0..n {
                let r = c.append(Event::new(i, Actor::service(), "test.event", "x"));
                b.audit_put(chain, r.seq, r.to_json_line().as_bytes())
                    .unwrap();
            }
        }
        b.commit().unwrap();

        let target = MemoryBackend::default();
        let mut lines = Vec::new();
        let summary = copy_store(&source, &target, |l| lines.push(l.to_owned())).unwrap();
        assert!(summary.is_ok(), "{summary}");
        let credentials = summary.tables.iter().find(|t| t.0 == "tenant_credentials");
        assert_eq!(credentials, Some(&("tenant_credentials", 2007, 2007)));
        assert!(summary.tables.contains(&("meta", 1, 1)), "{summary}");
        assert_eq!(
            summary.chains,
            [
                ("default".to_owned(), 1003, 1003),
                ("node-2".to_owned(), 5, 5)
            ]
        );
        assert_eq!(summary.audit.chains.len(), 2);
        assert!(lines.contains(&"audit chain node-2: 5 records copied".to_owned()));
        let err = copy_store(&source, &target, |_| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the target store is not empty (table tenant_credentials holds 2007 rows): migrate-store copies only into an empty database; name a new, empty one (CREATE DATABASE), or drop and create this one again if nothing in it is needed"
        );
    }

    /// A target that fails after `batches` transactions (as a database that goes away).
    struct FailsAfter {
        inner: MemoryBackend,
        batches: std::sync::atomic::AtomicUsize,
    }

    impl Backend for FailsAfter {
        fn kind(&self) -> &'static str {
            "memory"
        }

        fn begin_batch(&self) -> Result<Box<dyn crate::store::BatchTxn + '_>, StoreError> {
            use std::sync::atomic::Ordering;
            if self
                .batches
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return Err(StoreError::Unavailable("connection lost".into()));
            }
            self.inner.begin_batch()
        }

        fn read(
            &self,
            f: &mut dyn FnMut(&mut dyn ReadTxn) -> Result<(), StoreError>,
        ) -> Result<(), StoreError> {
            self.inner.read(f)
        }

        fn reads_block(&self) -> bool {
            false
        }
    }

    /// A copy that stops part-way leaves a partial target; the next run refuses it with
    /// a line that says what to do, and a completed copy leaves no mark.
    #[test]
    fn a_partial_copy_is_refused_with_what_to_do() {
        let source = MemoryBackend::default();
        let mut b = source.begin_batch().unwrap();
        for i in 0..(PAGE + 1) {
            b.put(Table::Credentials, &format!("t\0c-{i:05}"), b"record")
                .unwrap();
        }
        b.commit().unwrap();
        // The mark and the first page commit, the second page does not.
        let target = FailsAfter {
            inner: MemoryBackend::default(),
            batches: 2.into(),
        };
        let err = copy_store(&source, &target, |_| {}).unwrap_err();
        assert!(
            matches!(err, MigrateError::Store(StoreError::Unavailable(_))),
            "{err}"
        );
        target
            .batches
            .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
        let err = copy_store(&source, &target, |_| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the target store holds a partial copy (table tenant_credentials holds 1000 rows) left by an earlier migrate-store run that stopped part-way: drop the database and create it again empty (DROP DATABASE ...; CREATE DATABASE ...), then run migrate-store again; the source was not changed"
        );
        // Into an empty one it completes, and the mark is gone.
        let fresh = MemoryBackend::default();
        let summary = copy_store(&source, &fresh, |_| {}).unwrap();
        assert!(summary.is_ok(), "{summary}");
        let mark = read(&fresh, |txn| Ok(txn.get(Table::Meta, INCOMPLETE_META)?)).unwrap();
        assert_eq!(mark, None);
        assert!(summary.tables.contains(&("meta", 0, 0)), "{summary}");
    }
}
