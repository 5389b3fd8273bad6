//! Helpers for tests that need a group-commit batch to form deterministically (the
//! store's own tests, and those of modules that write through it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CredentialRecord, Rollback, Store, StoreError};
use crate::otp::{HashAlgorithm, OtpKind};

/// Occupies the committer with a job that blocks until released, so that the
/// jobs queued meanwhile deterministically form the next batch.
pub(crate) struct Gate {
    pub(crate) release: std::sync::mpsc::Sender<()>,
    pub(crate) task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

impl Gate {
    pub(crate) async fn open(self) {
        self.release.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

pub(crate) async fn gate(store: &Arc<Store>) -> Gate {
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let s = store.clone();
    let task = tokio::spawn(async move {
        s.write(move |_txn| {
            started_tx.send(()).unwrap();
            let _ = release_rx.recv();
            Ok::<(), Rollback>(())
        })
        .await
    });
    tokio::task::spawn_blocking(move || {
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("gate job did not start")
    })
    .await
    .unwrap();
    Gate { release, task }
}

pub(crate) async fn wait_queued(store: &Store, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.queued() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} jobs queued",
            store.queued()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// An in-memory [`super::Backend`] for tests that need what the embedded store cannot
/// hold (several audit chains) without a database server: a batch works on a copy of
/// the state and replaces it on commit; a read sees a copy of committed state. Also lets
/// a test remove an audit record (tampering no interface offers).
#[derive(Default)]
pub(crate) struct MemoryBackend {
    state: std::sync::Mutex<MemState>,
}

#[derive(Default, Clone)]
struct MemState {
    tables: std::collections::BTreeMap<(super::Table, String), Vec<u8>>,
    chains: std::collections::BTreeMap<String, std::collections::BTreeMap<u64, Vec<u8>>>,
}

impl MemoryBackend {
    /// Removes record `seq` of `chain` behind the store's back; whether it was there.
    pub(crate) fn remove_audit_record(&self, chain: &str, seq: u64) -> bool {
        let mut state = self.state.lock().unwrap();
        state
            .chains
            .get_mut(chain)
            .is_some_and(|c| c.remove(&seq).is_some())
    }
}

struct MemTxn<'a> {
    backend: &'a MemoryBackend,
    state: MemState,
}

impl super::ReadTxn for MemState {
    fn get(&mut self, table: super::Table, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
        Ok(self.tables.get(&(table, key.to_owned())).cloned())
    }

    fn scan(
        &mut self,
        table: super::Table,
        range: &super::KeyRange,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
        Ok(self
            .tables
            .iter()
            .filter(|((t, k), _)| *t == table && range.contains(k))
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn count(&mut self, table: super::Table) -> Result<u64, Rollback> {
        Ok(self.tables.keys().filter(|(t, _)| *t == table).count() as u64)
    }

    fn audit_last(&mut self, chain: &str) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
        Ok(self
            .chains
            .get(chain)
            .and_then(|c| c.last_key_value())
            .map(|(s, v)| (*s, v.clone())))
    }

    fn audit_range(
        &mut self,
        chain: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
        Ok(self.chains.get(chain).map_or_else(Vec::new, |c| {
            c.range(from..)
                .take(limit)
                .map(|(s, v)| (*s, v.clone()))
                .collect()
        }))
    }

    fn audit_count(&mut self, chain: &str) -> Result<u64, Rollback> {
        Ok(self.chains.get(chain).map_or(0, |c| c.len() as u64))
    }

    fn audit_chains(&mut self) -> Result<Vec<String>, Rollback> {
        Ok(self
            .chains
            .iter()
            .filter(|(_, c)| !c.is_empty())
            .map(|(n, _)| n.clone())
            .collect())
    }
}

macro_rules! delegate_read {
    () => {
        fn get(&mut self, table: super::Table, key: &str) -> Result<Option<Vec<u8>>, Rollback> {
            self.state.get(table, key)
        }
        fn scan(
            &mut self,
            table: super::Table,
            range: &super::KeyRange,
            limit: usize,
        ) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
            self.state.scan(table, range, limit)
        }
        fn count(&mut self, table: super::Table) -> Result<u64, Rollback> {
            self.state.count(table)
        }
        fn audit_last(&mut self, chain: &str) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
            self.state.audit_last(chain)
        }
        fn audit_range(
            &mut self,
            chain: &str,
            from: u64,
            limit: usize,
        ) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
            self.state.audit_range(chain, from, limit)
        }
        fn audit_count(&mut self, chain: &str) -> Result<u64, Rollback> {
            self.state.audit_count(chain)
        }
        fn audit_chains(&mut self) -> Result<Vec<String>, Rollback> {
            self.state.audit_chains()
        }
    };
}

impl super::ReadTxn for MemTxn<'_> {
    delegate_read!();
}

impl super::Txn for MemTxn<'_> {
    fn put(&mut self, table: super::Table, key: &str, value: &[u8]) -> Result<(), Rollback> {
        self.state
            .tables
            .insert((table, key.to_owned()), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, table: super::Table, key: &str) -> Result<bool, Rollback> {
        Ok(self.state.tables.remove(&(table, key.to_owned())).is_some())
    }

    fn audit_put(&mut self, chain: &str, seq: u64, line: &[u8]) -> Result<(), Rollback> {
        let c = self.state.chains.entry(chain.to_owned()).or_default();
        if c.contains_key(&seq) {
            return Err(Rollback(StoreError::Invalid(format!(
                "audit chain {chain:?} already holds seq {seq}"
            ))));
        }
        c.insert(seq, line.to_vec());
        Ok(())
    }
}

impl super::BatchTxn for MemTxn<'_> {
    fn as_txn(&mut self) -> &mut dyn super::Txn {
        self
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        *self.backend.state.lock().unwrap() = self.state;
        Ok(())
    }
}

impl super::Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn begin_batch(&self) -> Result<Box<dyn super::BatchTxn + '_>, StoreError> {
        let state = self.state.lock().unwrap().clone();
        Ok(Box::new(MemTxn {
            backend: self,
            state,
        }))
    }

    fn read(
        &self,
        f: &mut dyn FnMut(&mut dyn super::ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut snapshot = self.state.lock().unwrap().clone();
        f(&mut snapshot)
    }

    fn reads_block(&self) -> bool {
        false
    }
}

/// The tenant of the records the store's tests use.
pub(crate) const T: &str = "tenant-a";

/// A plausible TOTP record of tenant [`T`] (the seed bytes are a placeholder, never
/// unwrapped), for tests that exercise storage rather than the HSM.
pub(crate) fn rec(id: &str) -> CredentialRecord {
    CredentialRecord {
        tenant: T.into(),
        id: id.into(),
        subject: Some(format!("subject-{id}")),
        kind: OtpKind::Totp,
        algorithm: HashAlgorithm::Sha256,
        digits: 6,
        period_seconds: 30,
        t0: 0,
        wrapped_seed: vec![0xA5; 40],
        master_key_version: 1,
        seed_binding: None,
        issuer: "Example eID".into(),
        account_name: format!("user-{id}"),
        last_accepted: None,
        next_counter: 0,
        drift_steps: 0,
        failures: 0,
        failure_times: Vec::new(),
        locked_until: 0,
        hard_locked: false,
        disabled: false,
        created_at: 1_700_000_000,
        updated_at: 1_700_000_000,
    }
}
