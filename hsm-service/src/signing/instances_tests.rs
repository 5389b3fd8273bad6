//! Two signers over one store and one token: what two service instances are to each
//! other. Neither sees the other's memory; everything goes through the store.

use std::sync::Arc;

use super::versions::{self, KeyState, Usage};
use super::{KeyRef, Signer};
use crate::error::Error;
use crate::testing::DevEnv;

/// A second signer over the running server's token, store and audit log (what
/// another instance has), with nothing in memory but what it loads.
macro_rules! second {
    ($state:expr) => {{
        let state = &$state;
        let mut config = state.signing.config().clone();
        config.bootstrap_default_key = false;
        Arc::new(
            Signer::open(
                state.hsm.clone(),
                state.store.clone(),
                config,
                state.clock.clone(),
                state.audit.clone(),
            )
            .await
            .expect("second signer"),
        )
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_on_one_instance_is_used_by_the_other_without_a_restart() {
    let env = DevEnv::new();
    let server = env.start().await;
    let state = server.state().clone();
    let (a, b) = (state.signing.clone(), second!(state));

    let made = a
        .create_version("k-shared", "ES256".parse().expect("alg"), Usage::Signing)
        .await
        .expect("create on a");
    assert!(b.list(Some("k-shared")).is_empty(), "b has not looked yet");
    // A miss reloads once: b signs with a key it has never seen (its HSM handle cache
    // searches the token for the new CKA_ID).
    let csr = b
        .create_csr(&KeyRef::new("k-shared", 0), "CN=shared")
        .await
        .expect("csr on b");
    assert!(!csr.is_empty());
    assert_eq!(b.list(Some("k-shared")), vec![made.clone()]);
    // Nothing changed since: a refresh is one read and no reload.
    assert!(!b.refresh().await.expect("refresh"));

    // A state change on a reaches b by the poll (here: one refresh).
    a.publish("k-shared", 1).await.expect("publish on a");
    assert!(b.refresh().await.expect("refresh"));
    assert_eq!(
        b.get(&KeyRef::new("k-shared", 1)).expect("get").state,
        KeyState::Published
    );

    // The background watch does it without being asked.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(
        b.clone()
            .watch(std::time::Duration::from_millis(20), stop_rx),
    );
    a.activate("k-shared", 1).await.expect("activate on a");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while b.get(&KeyRef::new("k-shared", 1)).expect("get").state != KeyState::Active {
        assert!(
            std::time::Instant::now() < deadline,
            "b never saw the activation"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop_tx.send(true).expect("stop");
    watcher.await.expect("watch ends");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_instance_never_overwrites_a_newer_version_record() {
    let env = DevEnv::new();
    let server = env.start().await;
    let state = server.state().clone();
    let (a, b) = (state.signing.clone(), second!(state));
    let alg = "ES256".parse().expect("alg");

    // Both make a version of one name at once: each gets its own number or is refused;
    // never do two records share a number (the second would overwrite the first).
    let (x, y) = tokio::join!(
        a.create_version("k-race", alg, Usage::Raw),
        b.create_version("k-race", alg, Usage::Raw)
    );
    let made: Vec<_> = [x, y].into_iter().filter_map(|r| r.ok()).collect();
    assert!(!made.is_empty());
    let stored = state
        .store
        .read(|txn| versions::load_all(txn))
        .await
        .expect("load")
        .into_iter()
        .filter(|k| k.name == "k-race")
        .collect::<Vec<_>>();
    assert_eq!(stored.len(), made.len(), "{stored:?}");
    for k in &made {
        assert!(stored.contains(k), "{k:?} lost");
    }
    // Versions made one after the other on both instances are numbered on.
    b.refresh().await.expect("refresh");
    let next = b
        .create_version("k-race", alg, Usage::Raw)
        .await
        .expect("b");
    assert_eq!(next.version as usize, made.len() + 1);

    // A record changed under a stale copy: the compare-and-set refuses the write.
    let before = next.clone();
    let mut published = before.clone();
    published.state = KeyState::Published;
    let mut destroyed = before.clone();
    destroyed.state = KeyState::Destroyed;
    let first = [(Some(before.clone()), published.clone())];
    let stale = [(Some(before), destroyed)];
    let (one, two) = state
        .store
        .write(move |txn| {
            let one = versions::put_unchanged(txn, &first)?;
            let two = versions::put_unchanged(txn, &stale)?;
            Ok((one, two))
        })
        .await
        .expect("write");
    assert_eq!(one, Ok(()));
    assert_eq!(two, Err(format!("k-race v{}", next.version)));
    // And a's transition, from memory that has not seen that write, reloads first.
    let err = a
        .publish("k-race", next.version)
        .await
        .expect_err("already published");
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("is published")),
        "{err}"
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_write_moves_the_generation() {
    let env = DevEnv::new();
    let server = env.start().await;
    let state = server.state().clone();
    let generation = || state.store.read(|txn| versions::generation(txn));
    let g0 = generation().await.expect("generation");
    assert!(g0 > 0, "the bootstrap keys were written");
    let k = state
        .signing
        .create_version("k-gen", "ES256".parse().expect("alg"), Usage::Signing)
        .await
        .expect("create");
    let g1 = generation().await.expect("generation");
    assert!(g1 > g0);
    let (name, version) = (k.name.clone(), k.version);
    state
        .store
        .write(move |txn| versions::raise_last_expiry(txn, &name, version, 10_000))
        .await
        .expect("write")
        .expect("raised");
    assert!(generation().await.expect("generation") > g1);
    server.shutdown().await.expect("shutdown");
}
