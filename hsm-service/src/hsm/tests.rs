//! Pool and boundary tests against a real SoftHSM token.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cryptoki::object::{Attribute, ObjectClass};

use super::*;
use crate::testing::DevEnv;

pub(crate) fn open(env: &DevEnv, sessions: usize, queue: usize) -> Hsm {
    let settings = HsmSettings {
        module: env.config.hsm.module.clone(),
        token: env.config.token(),
        sessions,
        queue_capacity: queue,
        seed_cache_capacity: 16,
    };
    Hsm::open(&settings, env.config.user_pin().expect("pin")).expect("open")
}

#[tokio::test]
async fn random_through_the_pool() {
    let env = DevEnv::new();
    let hsm = open(&env, 2, 16);
    let a = hsm.random(16).await.expect("random");
    let b = hsm.random(16).await.expect("random");
    assert_eq!(a.len(), 16);
    assert_ne!(*a, *b);
    assert!(hsm.is_logged_in().await);
    assert_eq!(hsm.completed(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_busy() {
    let env = DevEnv::new();
    let hsm = open(&env, 1, 1);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    // Occupy the only worker, then fill the one queue slot.
    let blocker = {
        let hsm = hsm.clone();
        tokio::spawn(async move {
            hsm.inner
                .pool
                .submit(move |_| {
                    started_tx.send(()).ok();
                    release_rx.recv().ok();
                    Ok(())
                })
                .await
        })
    };
    tokio::task::spawn_blocking(move || started_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .expect("join")
        .expect("worker busy");
    let queued = {
        let hsm = hsm.clone();
        tokio::spawn(async move { hsm.random(8).await.map(|r| r.len()) })
    };
    while hsm.queued() == 0 {
        tokio::task::yield_now().await;
    }
    let refused = hsm.random(8).await;
    assert!(matches!(refused, Err(Error::Busy)), "{refused:?}");
    assert_eq!(hsm.stats().rejected_busy.load(Ordering::Relaxed), 1);
    release_tx.send(()).expect("release");
    blocker.await.expect("join").expect("blocker");
    assert_eq!(queued.await.expect("join").expect("queued"), 8);
}

#[tokio::test]
async fn lost_login_is_recovered_on_a_new_session() {
    let env = DevEnv::new();
    let hsm = open(&env, 1, 4);
    // A private token object: finding it needs a logged-in session.
    let label = "recover-me";
    hsm.inner
        .pool
        .submit(move |w| {
            w.run(false, |s, _| {
                s.create_object(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Value(vec![1, 2, 3]),
                ])?;
                // Simulate the token dropping the login (as after a device reset).
                s.logout()?;
                Ok(())
            })
        })
        .await
        .expect("setup");
    assert!(!hsm.is_logged_in().await);
    // An operation that needs the login fails once with CKR_USER_NOT_LOGGED_IN, the worker
    // replaces its session (logging in again) and the retry succeeds.
    hsm.inner
        .pool
        .submit(|w| {
            w.run(true, |s, _| {
                if !matches!(
                    s.get_session_info()?.session_state(),
                    cryptoki::session::SessionState::RwUser
                ) {
                    return Err(Error::Pkcs11 {
                        function: cryptoki::context::Function::FindObjects,
                        rv: cryptoki::error::RvError::UserNotLoggedIn,
                    });
                }
                Ok(())
            })
        })
        .await
        .expect("retried on a new session");
    assert_eq!(hsm.stats().sessions_replaced.load(Ordering::Relaxed), 1);
    assert!(hsm.is_logged_in().await);
}

#[tokio::test]
async fn handles_are_searched_once() {
    let env = DevEnv::new();
    let hsm = open(&env, 2, 16);
    hsm.inner
        .pool
        .submit(|w| {
            w.run(false, |s, _| {
                s.create_object(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(b"cached".to_vec()),
                    Attribute::Value(vec![7]),
                ])?;
                Ok(())
            })
        })
        .await
        .expect("create");
    let first = hsm
        .find_object(ObjectClass::DATA, "cached")
        .await
        .expect("find");
    let second = hsm
        .find_object(ObjectClass::DATA, "cached")
        .await
        .expect("find");
    assert!(first.is_some());
    assert_eq!(first, second);
    assert_eq!(hsm.object_searches(), 1);
    assert_eq!(
        hsm.find_object(ObjectClass::DATA, "absent")
            .await
            .expect("find"),
        None
    );
    assert_eq!(hsm.object_searches(), 2);
}

#[test]
fn wrong_pin_and_missing_token_fail_at_open() {
    let env = DevEnv::new();
    let mut settings = HsmSettings {
        module: env.config.hsm.module.clone(),
        token: env.config.token(),
        sessions: 1,
        queue_capacity: 1,
        seed_cache_capacity: 16,
    };
    let err =
        Hsm::open(&settings, SecretString::from("wrong-pin".to_owned())).expect_err("wrong PIN");
    assert_eq!(err.kind(), ErrorKind::Authentication, "{err}");
    assert!(
        err.to_string()
            .contains("C_Login failed: CKR_PIN_INCORRECT"),
        "{err}"
    );
    settings.token = TokenSelector::Label("no-such-token".into());
    let err = Hsm::open(&settings, env.config.user_pin().expect("pin")).expect_err("no token");
    assert!(matches!(err, Error::TokenNotFound(_)), "{err}");
}

async fn wrapped_seed(hsm: &Hsm, seed: &[u8]) -> std::sync::Arc<[u8]> {
    let padded = crate::otp::pad_seed(seed, crate::otp::HashAlgorithm::Sha1);
    hsm.ensure_seed_master_key(1).await.expect("master key");
    hsm.wrap_seed(1, padded).await.expect("wrap").into()
}

#[tokio::test]
async fn seeds_rewrap_under_a_new_master_key_inside_the_hsm() {
    let env = DevEnv::new();
    let hsm = open(&env, 2, 16);
    let rfc = crate::otp::rfc_vectors::RFC4226_SEED;
    let a = wrapped_seed(&hsm, rfc).await;
    let b = wrapped_seed(&hsm, &[7u8; 20]).await;
    assert!(hsm.ensure_seed_master_key(2).await.expect("v2"));
    let out = hsm
        .rewrap_seeds(1, 2, vec![a.clone(), b.clone()])
        .await
        .expect("rewrap");
    assert_eq!(out.len(), 2);
    assert_ne!(&out[0][..], &a[..]);
    // Under the new key the HSM computes the same HMAC as before.
    let mac = |version: u32, blob: std::sync::Arc<[u8]>| {
        let hsm = hsm.clone();
        async move {
            hsm.seed_macs(
                version,
                blob,
                crate::otp::HashAlgorithm::Sha1,
                vec![crate::otp::moving_factor(0)],
            )
            .await
            .expect("macs")
        }
    };
    let new_a: std::sync::Arc<[u8]> = out[0].clone().into();
    assert_eq!(
        &mac(2, new_a.clone()).await[..],
        &crate::otp::rfc_vectors::RFC4226_VECTORS[0].hmac[..]
    );
    assert_eq!(*mac(1, b).await, *mac(2, out[1].clone().into()).await);
    // A blob of the new key does not unwrap under the old one; nor to itself.
    assert!(hsm.rewrap_seeds(1, 2, vec![new_a.clone()]).await.is_err());
    assert!(hsm.rewrap_seeds(2, 2, vec![new_a]).await.is_err());
    // Both master keys remain on the token.
    for v in [1, 2] {
        assert!(hsm
            .find_object(ObjectClass::SECRET_KEY, &super::seeds::master_key_label(v))
            .await
            .expect("find")
            .is_some());
    }
}

#[tokio::test]
async fn stale_unwrapped_seed_is_unwrapped_again() {
    let env = DevEnv::new();
    // One session, so the test's job runs on the worker that holds the cached handle.
    let hsm = open(&env, 1, 16);
    let wrapped = wrapped_seed(&hsm, crate::otp::rfc_vectors::RFC4226_SEED).await;
    let factors = || vec![crate::otp::moving_factor(0)];
    let first = hsm
        .seed_macs(
            1,
            wrapped.clone(),
            crate::otp::HashAlgorithm::Sha1,
            factors(),
        )
        .await
        .expect("macs");
    // Destroy the cached object behind the cache's back, as a lost session would.
    let key = wrapped.clone();
    hsm.inner
        .pool
        .submit(move |w| {
            w.run(false, |s, seeds| {
                let handle = seeds.peek(&key).expect("cached");
                Ok(s.destroy_object(handle)?)
            })
        })
        .await
        .expect("destroy");
    let again = hsm
        .seed_macs(1, wrapped, crate::otp::HashAlgorithm::Sha1, factors())
        .await
        .expect("recovered");
    assert_eq!(*first, *again);
    assert_eq!(
        &first[..],
        &crate::otp::rfc_vectors::RFC4226_VECTORS[0].hmac[..],
        "the HSM's HMAC is RFC 4226's"
    );
    let (_, misses, entries) = hsm.seed_cache_stats();
    assert_eq!(
        (misses, entries),
        (2, 1),
        "unwrapped once more after the stale handle"
    );
}

/// Many concurrent HMACs of one seed (identical credentials have identical wrapped
/// blobs) and of others, with a cache small enough to evict all the time: every MAC
/// must be the right one. A cache shared between sessions failed this: a handle one
/// worker destroyed was reused by the token for another object that a second worker
/// then signed with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_hmacs_with_eviction_use_the_right_seed() {
    let env = DevEnv::new();
    let settings = HsmSettings {
        module: env.config.hsm.module.clone(),
        token: env.config.token(),
        sessions: 4,
        queue_capacity: 4096,
        seed_cache_capacity: 8,
    };
    let hsm = Hsm::open(&settings, env.config.user_pin().expect("pin")).expect("open");
    let seeds: Vec<Vec<u8>> = (0..6)
        .map(|i| format!("seed-number-{i:02}-abcdef").into_bytes())
        .collect();
    let mut blobs = Vec::new();
    for seed in &seeds {
        blobs.push(wrapped_seed(&hsm, seed).await);
    }
    let mut calls = tokio::task::JoinSet::new();
    for round in 0..400usize {
        let i = if round % 3 == 0 {
            0
        } else {
            round % seeds.len()
        };
        let (hsm, blob, seed) = (hsm.clone(), blobs[i].clone(), seeds[i].clone());
        calls.spawn(async move {
            let factor = crate::otp::moving_factor(round as u64);
            let mac = hsm
                .seed_macs(1, blob, crate::otp::HashAlgorithm::Sha1, vec![factor])
                .await
                .expect("macs");
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &seed);
            assert_eq!(
                &mac[..],
                ring::hmac::sign(&key, &factor).as_ref(),
                "round {round}"
            );
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("a MAC was wrong or failed");
    }
    hsm.clear_seed_cache();
    let (_, before, _) = hsm.seed_cache_stats();
    hsm.seed_macs(
        1,
        blobs[0].clone(),
        crate::otp::HashAlgorithm::Sha1,
        vec![crate::otp::moving_factor(1)],
    )
    .await
    .expect("macs");
    let (_, after, _) = hsm.seed_cache_stats();
    assert_eq!(after, before + 1, "a cleared cache unwraps again");
}
