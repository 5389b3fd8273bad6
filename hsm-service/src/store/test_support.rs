//! Helpers for tests that need a group-commit batch to form deterministically (the
//! store's own tests, and those of modules that write through it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Rollback, Store, StoreError};

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
