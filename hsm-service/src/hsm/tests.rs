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

/// A binding of `blob` to a test context, computed by the HSM.
pub(crate) async fn bound(hsm: &Hsm, blob: &[u8]) -> super::binding::SeedBinding {
    hsm.ensure_seed_binding_key().await.expect("binding key");
    let context = b"test context".to_vec();
    let mac = hsm
        .seed_bindings(vec![(context.clone(), blob.to_vec())])
        .await
        .expect("bind")[0];
    super::binding::SeedBinding { context, mac }
}

#[tokio::test]
async fn seeds_rewrap_under_a_new_master_key_inside_the_hsm() {
    let env = DevEnv::new();
    let hsm = open(&env, 2, 16);
    // A master key from before the unwrap template: the only kind a re-wrap starts from.
    assert!(hsm.create_seed_master_key(1, false).await.expect("v1"));
    assert!(!hsm.seed_master_key_confined(1).await.expect("confined"));
    let rfc = crate::otp::rfc_vectors::RFC4226_SEED;
    let a = wrapped_seed(&hsm, rfc).await;
    let b = wrapped_seed(&hsm, &[7u8; 20]).await;
    assert!(hsm.ensure_seed_master_key(2).await.expect("v2"));
    let (bound_a, bound_b) = (bound(&hsm, &a).await, bound(&hsm, &b).await);
    let out = hsm
        .rewrap_seeds(
            1,
            2,
            vec![(a.clone(), bound_a.clone()), (b.clone(), bound_b.clone())],
        )
        .await
        .expect("rewrap");
    let out: Vec<(Vec<u8>, [u8; 32])> = out.into_iter().map(|o| o.expect("bound")).collect();
    assert_eq!(out.len(), 2);
    assert_ne!(&out[0].0[..], &a[..]);
    // The new blob is bound to the same context, with a new MAC.
    assert_eq!(out[0].1, bound(&hsm, &out[0].0).await.mac);
    assert_ne!(out[0].1, bound_a.mac);
    // Under the new key the HSM computes the same HMAC as before.
    let mac = |version: u32, blob: std::sync::Arc<[u8]>| {
        let hsm = hsm.clone();
        async move {
            let binding = bound(&hsm, &blob).await;
            hsm.seed_macs(
                version,
                blob,
                binding,
                crate::otp::HashAlgorithm::Sha1,
                vec![crate::otp::moving_factor(0)],
            )
            .await
            .expect("macs")
        }
    };
    let new_a: std::sync::Arc<[u8]> = out[0].0.clone().into();
    let new_b: std::sync::Arc<[u8]> = out[1].0.clone().into();
    assert_eq!(
        &mac(2, new_a.clone()).await[..],
        &crate::otp::rfc_vectors::RFC4226_VECTORS[0].hmac[..]
    );
    assert_eq!(*mac(1, b.clone()).await, *mac(2, new_b).await);
    // A blob of the new key does not unwrap under the old one; nor to itself.
    let bound_new_a = bound(&hsm, &new_a).await;
    assert!(hsm
        .rewrap_seeds(1, 2, vec![(new_a.clone(), bound_new_a.clone())])
        .await
        .is_err());
    assert!(hsm
        .rewrap_seeds(2, 2, vec![(new_a.clone(), bound_new_a.clone())])
        .await
        .is_err());
    // A blob under another record's binding is not re-wrapped (that would launder it).
    let swapped = hsm
        .rewrap_seeds(1, 2, vec![(b.clone(), bound_a.clone()), (b, bound_b)])
        .await
        .expect("rewrap");
    assert!(swapped[0].is_none(), "a blob not bound to its record");
    assert!(swapped[1].is_some());
    // The new key has the unwrap template: its seeds never come out again, not even
    // re-wrapped under another master key.
    assert!(hsm.seed_master_key_confined(2).await.expect("confined"));
    assert!(hsm.ensure_seed_master_key(3).await.expect("v3"));
    let refused = hsm
        .rewrap_seeds(2, 3, vec![(new_a, bound_new_a)])
        .await
        .expect_err("confined");
    assert!(
        refused.to_string().contains("CKA_UNWRAP_TEMPLATE"),
        "{refused}"
    );
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
    let binding = bound(&hsm, &wrapped).await;
    let first = hsm
        .seed_macs(
            1,
            wrapped.clone(),
            binding.clone(),
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
        .seed_macs(
            1,
            wrapped,
            binding,
            crate::otp::HashAlgorithm::Sha1,
            factors(),
        )
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

/// Session secret keys on the token, as the one worker's session sees them.
async fn session_secret_keys(hsm: &Hsm) -> usize {
    hsm.inner
        .pool
        .submit(|w| {
            w.run(false, |s, _| {
                Ok(s.find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Token(false),
                ])?
                .len())
            })
        })
        .await
        .expect("find")
}

/// A deleted credential's seed (`forget_seed`) is destroyed on the token before the
/// worker's next operation, whatever it is; the other seeds stay cached. A worker that
/// fell behind the ring of forgotten seeds destroys its whole cache.
#[tokio::test]
async fn forgotten_seeds_are_destroyed_before_the_next_operation() {
    let env = DevEnv::new();
    let hsm = open(&env, 1, 16);
    let sha1 = crate::otp::HashAlgorithm::Sha1;
    let factors = || vec![crate::otp::moving_factor(0)];
    let a = wrapped_seed(&hsm, crate::otp::rfc_vectors::RFC4226_SEED).await;
    let b = wrapped_seed(&hsm, b"another seed of twenty").await;
    let (bound_a, bound_b) = (bound(&hsm, &a).await, bound(&hsm, &b).await);
    for (blob, binding) in [(&a, &bound_a), (&b, &bound_b)] {
        hsm.seed_macs(1, blob.clone(), binding.clone(), sha1, factors())
            .await
            .expect("macs");
    }
    assert_eq!(hsm.seed_cache_stats().2, 2);
    let on_token = session_secret_keys(&hsm).await;

    hsm.forget_seed(a.clone(), bound_a.clone());
    hsm.random(8).await.expect("any operation");
    assert_eq!(hsm.seed_cache_stats().2, 1, "a's copy dropped");
    assert_eq!(
        session_secret_keys(&hsm).await,
        on_token - 1,
        "and destroyed"
    );
    let hits = hsm.seed_cache_stats().0;
    hsm.seed_macs(1, b.clone(), bound_b.clone(), sha1, factors())
        .await
        .expect("b");
    assert_eq!(hsm.seed_cache_stats().0, hits + 1, "b still cached");

    // More forgotten than the ring holds since the worker last ran: it drops them all.
    for _ in 0..=super::seeds::FORGOTTEN_RING {
        hsm.forget_seed(std::sync::Arc::from(&b"not cached"[..]), bound_a.clone());
    }
    hsm.random(8).await.expect("any operation");
    assert_eq!(hsm.seed_cache_stats().2, 0);
    assert_eq!(session_secret_keys(&hsm).await, on_token - 2);
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
        let blob = wrapped_seed(&hsm, seed).await;
        let binding = bound(&hsm, &blob).await;
        blobs.push((blob, binding));
    }
    let mut calls = tokio::task::JoinSet::new();
    for round in 0..400usize {
        let i = if round % 3 == 0 {
            0
        } else {
            round % seeds.len()
        };
        let (hsm, (blob, binding), seed) = (hsm.clone(), blobs[i].clone(), seeds[i].clone());
        calls.spawn(async move {
            let factor = crate::otp::moving_factor(round as u64);
            let mac = hsm
                .seed_macs(
                    1,
                    blob,
                    binding,
                    crate::otp::HashAlgorithm::Sha1,
                    vec![factor],
                )
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
        blobs[0].0.clone(),
        blobs[0].1.clone(),
        crate::otp::HashAlgorithm::Sha1,
        vec![crate::otp::moving_factor(1)],
    )
    .await
    .expect("macs");
    let (_, after, _) = hsm.seed_cache_stats();
    assert_eq!(after, before + 1, "a cleared cache unwraps again");
}

/// What the token (SoftHSM 2.6.1; kryoptic 1.5 in the second-token run) does with
/// CKA_WRAP_WITH_TRUSTED and CKA_TRUSTED from a user session (the service's sessions):
/// the facts the README's backup notes rest on.
#[tokio::test]
async fn wrap_with_trusted_semantics() {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::KeyType;
    let env = DevEnv::new();
    let hsm = open(&env, 1, 4);
    let wrap = hsm.key_wrap();
    let facts = hsm
        .inner
        .pool
        .submit(move |w| {
            w.run(false, |s, _| {
                let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
                let pair = |wrap_with_trusted: bool| {
                    s.generate_key_pair(
                        &Mechanism::EccKeyPairGen,
                        &[
                            Attribute::Token(false),
                            Attribute::Verify(true),
                            Attribute::EcParams(p256.clone()),
                        ],
                        &[
                            Attribute::Token(false),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(true),
                            Attribute::Sign(true),
                            Attribute::WrapWithTrusted(wrap_with_trusted),
                        ],
                    )
                };
                let kek = |trusted: Option<bool>| {
                    let mut t = vec![
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::Token(false),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                        Attribute::Value(vec![0x42; 32]),
                    ];
                    if let Some(v) = trusted {
                        t.push(Attribute::Trusted(v));
                    }
                    s.create_object(&t)
                };
                let (_, plain) = pair(false)?;
                let (_, guarded) = pair(true)?;
                let untrusted = kek(None)?;
                let plain_wraps = s.wrap_key(&wrap.mechanism(), untrusted, plain).is_ok();
                let guarded_wraps = s
                    .wrap_key(&wrap.mechanism(), untrusted, guarded)
                    .map_err(|e| format!("{e:?}"));
                let user_sets_trusted = kek(Some(true)).map_err(|e| format!("{e:?}"));
                Ok((plain_wraps, guarded_wraps, user_sets_trusted.map(|_| ())))
            })
        })
        .await
        .expect("explore");
    let (plain_wraps, guarded_wraps, user_sets_trusted) = facts;
    // An extractable key without CKA_WRAP_WITH_TRUSTED wraps under any wrapping key.
    assert!(plain_wraps);
    // With CKA_WRAP_WITH_TRUSTED, the token refuses a wrapping key that is not trusted:
    // SoftHSM with CKR_KEY_NOT_WRAPPABLE, kryoptic with CKR_WRAPPING_KEY_HANDLE_INVALID.
    let e = guarded_wraps.expect_err("wrap-with-trusted enforced");
    assert!(
        e.contains("KeyNotWrappable") || e.contains("WrappingKeyHandleInvalid"),
        "{e}"
    );
    // And a user session cannot make a key trusted: only the SO can (SoftHSM:
    // CKR_ATTRIBUTE_READ_ONLY). kryoptic has no CKA_TRUSTED at all
    // (CKR_ATTRIBUTE_TYPE_INVALID, for the SO too): nothing wraps such a key there.
    let e = user_sets_trusted.expect_err("CKA_TRUSTED is SO-only");
    assert!(
        e.contains("AttributeReadOnly") || e.contains("AttributeTypeInvalid"),
        "{e}"
    );
    if e.contains("AttributeTypeInvalid") {
        let so_pin = secrecy::SecretString::from(
            std::fs::read_to_string(env.dir.path().join("so.pin"))
                .expect("so.pin")
                .trim()
                .to_owned(),
        );
        drop(hsm);
        let settings = HsmSettings {
            module: env.config.hsm.module.clone(),
            token: env.config.token(),
            sessions: 1,
            queue_capacity: 4,
            seed_cache_capacity: 1,
        };
        let e = super::backup::create_random_trusted_kek(&settings, &so_pin, "kek")
            .expect_err("no CKA_TRUSTED for the SO either");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("CKA_TRUSTED"), "{e}");
    }
}

/// Unwraps `blob` under master key 1 with `template` straight through cryptoki, as
/// anyone holding the user PIN could; `Ok` carries whether the seed could get out of the
/// object made: its value readable, or it extractable, derivable or on the token.
async fn unwrap_as_pin_holder(
    hsm: &Hsm,
    blob: std::sync::Arc<[u8]>,
    template: Vec<Attribute>,
) -> std::result::Result<bool, String> {
    let master = hsm
        .find_object(ObjectClass::SECRET_KEY, &super::seeds::master_key_label(1))
        .await
        .expect("find")
        .expect("master key");
    let wrap = hsm.key_wrap();
    hsm.inner
        .pool
        .submit(move |w| {
            w.run(false, |s, _| {
                let out = s
                    .unwrap_key(&wrap.mechanism(), master, &blob, &template)
                    .map_err(|e| format!("{e:?}"));
                Ok(match out {
                    Ok(h) => {
                        use cryptoki::object::AttributeType as T;
                        let value = s.get_attributes(h, &[T::Value]);
                        let flags = s.get_attributes(h, &[T::Extractable, T::Derive, T::Token]);
                        let _ = s.destroy_object(h);
                        let readable = matches!(value.as_deref(), Ok([Attribute::Value(_)]));
                        flags.map_err(|e| format!("{e:?}")).map(|flags| {
                            readable
                                || flags.iter().any(|a| {
                                    matches!(
                                        a,
                                        Attribute::Extractable(true)
                                            | Attribute::Derive(true)
                                            | Attribute::Token(true)
                                    )
                                })
                        })
                    }
                    Err(e) => Err(e),
                })
            })
        })
        .await
        .expect("pool")
}

#[tokio::test]
async fn master_key_unwraps_only_into_sensitive_sign_only_session_keys() {
    use cryptoki::object::KeyType;
    let env = DevEnv::new();
    let hsm = open(&env, 1, 4);
    let blob = wrapped_seed(&hsm, crate::otp::rfc_vectors::RFC4226_SEED).await;
    assert!(hsm.seed_master_key_confined(1).await.expect("confined"));
    let base = |extractable: bool, sensitive: bool| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(sensitive),
            Attribute::Extractable(extractable),
            Attribute::Sign(true),
            Attribute::Verify(false),
            Attribute::Derive(false),
        ]
    };
    // Each a way to get the seed out: the token refuses them all.
    let attempts: Vec<(&str, Vec<Attribute>)> = vec![
        ("extractable", base(true, true)),
        ("readable", base(false, false)),
        ("readable and extractable", base(true, false)),
        ("on the token", {
            let mut t = base(false, true);
            t[2] = Attribute::Token(true);
            t
        }),
        ("able to derive", {
            let mut t = base(false, true);
            t[8] = Attribute::Derive(true);
            t
        }),
        ("attributes left to the token's defaults", {
            let mut t = base(false, true);
            t.truncate(2);
            t
        }),
    ];
    for (what, template) in attempts {
        let r = unwrap_as_pin_holder(&hsm, blob.clone(), template).await;
        // A template that leaves attributes unsaid: SoftHSM refuses it; kryoptic fills
        // them in from CKA_UNWRAP_TEMPLATE, which gives a confined key just the same.
        if what.contains("defaults") && r == Ok(false) {
            continue;
        }
        assert!(r.is_err(), "unwrap into a key {what}: {r:?}");
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("TemplateInconsistent")),
            "{what}: {r:?}"
        );
    }
    // The verification shape still unwraps (and its value cannot be read).
    assert_eq!(
        unwrap_as_pin_holder(&hsm, blob.clone(), base(false, true)).await,
        Ok(false)
    );
    let binding = bound(&hsm, &blob).await;
    let macs = hsm
        .seed_macs(
            1,
            blob,
            binding,
            crate::otp::HashAlgorithm::Sha1,
            vec![crate::otp::moving_factor(0)],
        )
        .await
        .expect("macs");
    assert_eq!(
        &macs[..],
        &crate::otp::rfc_vectors::RFC4226_VECTORS[0].hmac[..]
    );
}

/// A blob is unwrapped only under the binding the HSM computed for it, and the check
/// holds even while another record's handle for the same blob is cached.
#[tokio::test]
async fn seed_macs_refuse_a_blob_under_another_binding_before_unwrapping() {
    let env = DevEnv::new();
    let hsm = open(&env, 1, 4);
    let blob = wrapped_seed(&hsm, crate::otp::rfc_vectors::RFC4226_SEED).await;
    let a = bound(&hsm, &blob).await;
    let factors = || vec![crate::otp::moving_factor(0)];
    let sha1 = crate::otp::HashAlgorithm::Sha1;
    hsm.seed_macs(1, blob.clone(), a.clone(), sha1, factors())
        .await
        .expect("bound");
    let (hits, misses, entries) = hsm.seed_cache_stats();
    // Another record's context with A's MAC, then with a MAC of another blob.
    let other_blob = wrapped_seed(&hsm, &[9u8; 20]).await;
    let mut b_context = a.context.clone();
    b_context.extend_from_slice(b" of b");
    let refusals = [
        super::binding::SeedBinding {
            context: b_context.clone(),
            mac: a.mac,
        },
        super::binding::SeedBinding {
            context: a.context.clone(),
            mac: bound(&hsm, &other_blob).await.mac,
        },
        super::binding::SeedBinding {
            context: a.context.clone(),
            mac: [0; 32],
        },
    ];
    for b in refusals {
        let r = hsm.seed_macs(1, blob.clone(), b, sha1, factors()).await;
        assert!(matches!(r, Err(Error::BindingMismatch)), "{r:?}");
    }
    let after = hsm.seed_cache_stats();
    assert_eq!(
        after.0, hits,
        "a refused binding never uses the cached handle"
    );
    assert_eq!(after.1, misses + 3);
    assert_eq!(after.2, entries, "and nothing was unwrapped");
    // The right binding still hits the cache: no HSM check on the hot path.
    hsm.seed_macs(1, blob, a, sha1, factors())
        .await
        .expect("bound");
    assert_eq!(hsm.seed_cache_stats().0, hits + 1);
}

/// The RFC 5649 known answer of each token the suite runs on: SoftHSM 2.6.1 pads a key's
/// value with zeros to a multiple of 8 before wrapping; kryoptic wraps it as RFC 5649
/// says. The service accepts both (see `mechanisms::known_answer`).
#[tokio::test]
async fn key_wrap_known_answer_of_this_token() {
    use super::mechanisms::{known_answer, KeyWrapAnswer};
    let env = DevEnv::new();
    let ctx = module::load(&env.config.hsm.module).expect("load");
    let slot = module::find_token(&ctx, &env.config.token()).expect("token");
    let checked = super::mechanisms::check(&ctx, slot).expect("mechanisms");
    let pin = env.config.user_pin().expect("pin");
    let answer = known_answer(&ctx, slot, &pin, checked.key_wrap).expect("known answer");
    match crate::testing::SoftToken::of_module(&env.config.hsm.module) {
        crate::testing::SoftToken::SoftHsm => {
            assert_eq!(checked.key_wrap, KeyWrap::Pad);
            assert_eq!(answer, KeyWrapAnswer::ZeroPaddedFirst);
        }
        crate::testing::SoftToken::Kryoptic => {
            assert_eq!(checked.key_wrap, KeyWrap::Kwp);
            assert_eq!(answer, KeyWrapAnswer::Rfc5649);
            assert!(!checked.eddsa, "kryoptic on OpenSSL 3.0 has no EdDSA");
        }
    }
}
