//! Versioned schema migrations, embedded in the binary and applied at start-up.
//!
//! Adding one: a file `migrations/NNNN_what.sql` and its entry in [`MIGRATIONS`] (the
//! next number). Never edit a migration that has shipped: databases that applied it will
//! not apply it again.

use postgres::Client;

use super::conn::map_err;
use crate::store::StoreError;

/// Every migration, in order: (version, SQL).
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("migrations/0001_tables.sql")),
    (2, include_str!("migrations/0002_events.sql")),
    (3, include_str!("migrations/0003_devices.sql")),
];

/// The newest schema this binary knows.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// A transaction-level advisory lock that serializes the start-up of instances (two
/// instances starting at once must not both create the tables).
const MIGRATION_LOCK: i64 = 0x6873_6d2d_6d69_6772; // "hsm-migr"

/// Applies the migrations the database lacks, in one transaction; how many were applied.
/// Refuses a database that records a version this binary does not know, writing nothing.
pub(super) fn apply(client: &mut Client) -> Result<u32, StoreError> {
    let err = |e: postgres::Error| map_err(&e, "applying the schema migrations");
    let mut tx = client.transaction().map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ( \
             version integer PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .map_err(err)?;
    let found: Option<i32> = tx
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .map_err(err)?
        .get(0);
    let found = found.map_or(0, |v| u32::try_from(v).unwrap_or(0));
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let mut applied = 0;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql)
            .map_err(|e| map_err(&e, &format!("applying schema migration {version}")))?;
        let v = i32::try_from(*version).expect("migration numbers are small");
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&v])
            .map_err(err)?;
        applied += 1;
    }
    tx.commit().map_err(err)?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, (v, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v as usize, i + 1);
            assert!(!sql.trim().is_empty());
        }
    }

    #[test]
    fn the_migrations_create_every_table() {
        let sql: String = MIGRATIONS.iter().map(|(_, s)| *s).collect();
        for t in crate::store::uow::Table::ALL {
            assert!(
                sql.contains(&format!("CREATE TABLE {} (", t.name())),
                "no migration creates table {}",
                t.name()
            );
        }
        assert!(sql.contains("CREATE TABLE audit_log ("));
    }
}
