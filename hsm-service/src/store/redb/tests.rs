//! Tests of what is particular to the embedded engine: the file's schema versions and
//! their migrations. Everything else is tested through [`Store`] in `store::tests`.

use redb::{ReadableDatabase, ReadableTableMetadata};

use super::tables::{
    def, LEGACY_CREDENTIALS, LEGACY_EVIDENCE_EXPIRY, SCHEMA_VERSION, SCHEMA_VERSION_KEY,
};
use crate::store::test_support::{rec, T};
use crate::store::{
    CredentialRecord, CredentialStore, EvidenceRecord, Store, StoreError, StoreOptions, Table,
    Update, DEFAULT_TENANT,
};

fn db_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join(super::FILE_NAME)
}

#[test]
fn refuses_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    drop(Store::open_redb(&path, StoreOptions::default()).unwrap());
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(def(Table::Meta))
            .unwrap()
            .insert(SCHEMA_VERSION_KEY, 99u32.to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open_redb(&path, StoreOptions::default()).unwrap_err();
    assert_eq!(
        err,
        StoreError::SchemaTooNew {
            found: 99,
            supported: SCHEMA_VERSION
        }
    );
    assert!(err.to_string().contains("newer"));
    // Nothing was rewritten by the refused open.
    let db = redb::Database::create(&path).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let v = redb::ReadableTable::get(
        &txn.open_table(def(Table::Meta)).unwrap(),
        SCHEMA_VERSION_KEY,
    )
    .unwrap()
    .unwrap()
    .value()
    .to_vec();
    assert_eq!(v, 99u32.to_le_bytes());
}

/// A data file as schema 1 wrote it: id-keyed credentials in format 1.
fn write_schema_1(path: &std::path::Path, recs: &[CredentialRecord]) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(def(Table::Meta)).unwrap();
        meta.insert(SCHEMA_VERSION_KEY, 1u32.to_le_bytes().as_slice())
            .unwrap();
        let mut t = txn.open_table(LEGACY_CREDENTIALS).unwrap();
        for r in recs {
            t.insert(r.id.as_str(), crate::store::record::encode_v1(r).as_slice())
                .unwrap();
        }
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn schema_1_migrates_to_the_default_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let old: Vec<CredentialRecord> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            let mut r = rec(id);
            r.tenant = DEFAULT_TENANT.into();
            r.subject = None;
            r.failures = 2;
            // Format 1 kept a count only: its failures count from the last change.
            r.failure_times = vec![r.updated_at; 2];
            r
        })
        .collect();
    write_schema_1(&path, &old);
    {
        let store = Store::open_redb(&path, StoreOptions::default()).unwrap();
        assert_eq!(
            store.get_meta(SCHEMA_VERSION_KEY).await.unwrap(),
            Some(SCHEMA_VERSION.to_le_bytes().to_vec())
        );
        assert_eq!(store.count().await.unwrap(), 3);
        assert_eq!(
            store.list(Some(DEFAULT_TENANT), None, 10).await.unwrap(),
            old
        );
        assert_eq!(store.get(T, "a").await.unwrap(), None);
        // Migrated records keep working: updates rewrite them in the new format.
        store
            .update(DEFAULT_TENANT, "a", |r| {
                r.failures = 0;
                Update::Write(())
            })
            .await
            .unwrap();
    }
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(
            matches!(
                txn.open_table(LEGACY_CREDENTIALS),
                Err(redb::TableError::TableDoesNotExist(_))
            ),
            "the schema 1 table is dropped"
        );
    }
    // A second open finds the current schema and migrates nothing again.
    let store = Store::open_redb(&path, StoreOptions::default()).unwrap();
    assert_eq!(store.count().await.unwrap(), 3);
    assert_eq!(
        store
            .get(DEFAULT_TENANT, "a")
            .await
            .unwrap()
            .unwrap()
            .failures,
        0
    );
}

#[test]
fn schema_1_with_a_corrupt_record_is_not_half_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    write_schema_1(&path, &[rec("a")]);
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(LEGACY_CREDENTIALS)
            .unwrap()
            .insert("z", [1u8, 0xff].as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open_redb(&path, StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    let db = redb::Database::create(&path).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let v = redb::ReadableTable::get(
        &txn.open_table(def(Table::Meta)).unwrap(),
        SCHEMA_VERSION_KEY,
    )
    .unwrap()
    .unwrap()
    .value()
    .to_vec();
    assert_eq!(v, 1u32.to_le_bytes(), "still schema 1");
    assert_eq!(
        redb::ReadableTableMetadata::len(&txn.open_table(LEGACY_CREDENTIALS).unwrap()).unwrap(),
        2
    );
}

fn evidence(id: &str, expires_at: u64) -> EvidenceRecord {
    EvidenceRecord {
        id: id.into(),
        tenant: T.into(),
        credential_id: "x".into(),
        subject: "subject-x".into(),
        method: crate::common::AuthMethod::Otp,
        auth_time: expires_at - 120,
        expires_at,
        spent_at: None,
        txn_text_sha256: None,
    }
}

/// A data file as schema 2 wrote it: the evidence expiry index keyed `(u64, &str)`.
fn write_schema_2(path: &std::path::Path, evidence: &[EvidenceRecord]) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        txn.open_table(def(Table::Meta))
            .unwrap()
            .insert(SCHEMA_VERSION_KEY, 2u32.to_le_bytes().as_slice())
            .unwrap();
        txn.open_table(def(Table::Credentials)).unwrap();
        let mut records = txn.open_table(def(Table::Evidence)).unwrap();
        let mut index = txn.open_table(LEGACY_EVIDENCE_EXPIRY).unwrap();
        for e in evidence {
            records
                .insert(e.id.as_str(), crate::store::evidence::encode(e).as_slice())
                .unwrap();
            index.insert((e.expires_at, e.id.as_str()), ()).unwrap();
        }
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn schema_2_rebuilds_the_evidence_expiry_index_with_text_keys() {
    use crate::store::evidence::{expiry_key, insert_in, PURGE_GRACE_SECONDS};
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let old = [evidence("e-late", 5_000), evidence("e-early", 1_000)];
    write_schema_2(&path, &old);
    let store = Store::open_redb(&path, StoreOptions::default()).unwrap();
    assert_eq!(
        store.get_meta(SCHEMA_VERSION_KEY).await.unwrap(),
        Some(SCHEMA_VERSION.to_le_bytes().to_vec())
    );
    let index = store
        .read(|txn| Ok(txn.scan(Table::EvidenceExpiry, &crate::store::KeyRange::all(), 10)?))
        .await
        .unwrap();
    let keys: Vec<String> = index.into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        vec![expiry_key(1_000, "e-early"), expiry_key(5_000, "e-late")],
        "one entry per record, in expiry order"
    );
    for e in &old {
        assert_eq!(store.get_evidence(&e.id).await.unwrap().as_ref(), Some(e));
    }
    // The rebuilt index drives the purge: a later insert removes the stale record only.
    let now = 1_000 + PURGE_GRACE_SECONDS + 1;
    let fresh = evidence("e-new", now + 120);
    store
        .write(move |txn| insert_in(txn, &fresh, now))
        .await
        .unwrap();
    assert_eq!(store.get_evidence("e-early").await.unwrap(), None);
    assert!(store.get_evidence("e-late").await.unwrap().is_some());
    assert_eq!(store.evidence_count().await.unwrap(), 2);
    drop(store);
    // Reopened: current schema, nothing migrated again, the index still typed by text.
    let store = Store::open_redb(&path, StoreOptions::default()).unwrap();
    assert_eq!(store.evidence_count().await.unwrap(), 2);
    drop(store);
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    assert_eq!(
        txn.open_table(def(Table::EvidenceExpiry))
            .unwrap()
            .len()
            .unwrap(),
        2
    );
    assert!(
        txn.open_table(LEGACY_EVIDENCE_EXPIRY).is_err(),
        "the (u64, &str) index is gone"
    );
}

#[test]
fn schema_2_with_corrupt_evidence_is_not_half_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    write_schema_2(&path, &[evidence("e1", 1_000)]);
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(def(Table::Evidence))
            .unwrap()
            .insert("bad", [7u8, 1].as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open_redb(&path, StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let v = txn
        .open_table(def(Table::Meta))
        .unwrap()
        .get(SCHEMA_VERSION_KEY)
        .unwrap()
        .unwrap()
        .value()
        .to_vec();
    assert_eq!(v, 2u32.to_le_bytes(), "still schema 2");
    assert_eq!(
        txn.open_table(LEGACY_EVIDENCE_EXPIRY)
            .unwrap()
            .len()
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn other_audit_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_redb(&db_path(&dir), StoreOptions::default()).unwrap();
    let err = store
        .write(|txn| txn.audit_put("instance-2", 1, b"{}"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.contains("instance-2") && m.contains("one audit chain")),
        "{err}"
    );
    let err = store
        .read(|txn| Ok(txn.audit_count("instance-2")?))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert_eq!(
        store.read(|txn| Ok(txn.audit_chains()?)).await.unwrap(),
        Vec::<String>::new()
    );
    store
        .write(|txn| txn.audit_put(crate::store::DEFAULT_CHAIN, 1, b"{}"))
        .await
        .unwrap();
    assert_eq!(
        store.read(|txn| Ok(txn.audit_chains()?)).await.unwrap(),
        vec![crate::store::DEFAULT_CHAIN.to_owned()]
    );
    // A taken seq is refused, so two writers of one chain cannot both commit.
    let err = store
        .write(|txn| txn.audit_put(crate::store::DEFAULT_CHAIN, 1, b"{}"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}
