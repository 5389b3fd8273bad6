//! Seed master key rotation seen by every instance: the store's version is the one new
//! enrolments wrap under, whichever instance rotated (redb: two services over one store;
//! PostgreSQL: two stores, two token handles, one database, as two processes are).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::rotation::ROTATION_META;
use super::*;
use crate::hsm::objects::ObjectClass;
use crate::hsm::seeds::master_key_label;
use crate::hsm::{Hsm, HsmSettings};
use crate::otp::rfc_vectors::{RFC4226_SEED, RFC4226_VECTORS};
use crate::store::{Store, StoreOptions, EMBEDDED_FILE};
use crate::testing::DevEnv;

const T: &str = "tenant-a";

fn hsm(env: &DevEnv) -> Hsm {
    let settings = HsmSettings {
        module: env.config.hsm.module.clone(),
        token: env.config.token(),
        sessions: 2,
        queue_capacity: 64,
        seed_cache_capacity: 16,
    };
    Hsm::open(&settings, env.config.user_pin().expect("pin")).expect("open the token")
}

fn hotp(id: &str) -> NewCredential {
    NewCredential {
        id: Some(id.into()),
        kind: OtpKind::Hotp,
        algorithm: HashAlgorithm::Sha1,
        digits: 6,
        period_seconds: 0,
        seed: Some(Zeroizing::new(RFC4226_SEED.to_vec())),
        reveal_seed: false,
        issuer: "Test".into(),
        account_name: "alice".into(),
        initial_counter: 0,
        subject: None,
    }
}

fn code(counter: usize) -> String {
    format!("{:06}", RFC4226_VECTORS[counter].code)
}

/// A deployment whose master key 1 predates the unwrap template, as the server starts
/// it: version 1 recorded, key on the token, binding key made.
async fn legacy_deployment(hsm: &Hsm, store: &Arc<Store>) {
    assert!(hsm.create_seed_master_key(1, false).await.expect("key 1"));
    store
        .put_meta(MASTER_KEY_VERSION_META, 1u32.to_be_bytes().to_vec())
        .await
        .expect("version 1");
    ensure_master_key(hsm, store.as_ref(), 1)
        .await
        .expect("master key");
    binding::migrate(hsm, store.as_ref(), 500)
        .await
        .expect("binding key");
}

fn service(hsm: &Hsm, store: &Arc<Store>) -> Credentials<Store> {
    Credentials::new(
        hsm.clone(),
        store.clone(),
        Policy::default(),
        1,
        Clock::from_secs_fn(|| 1_700_000_000),
    )
}

/// Instance A rotates; instance B, whose cached version is still the old one, enrols
/// under the new key at once (without a restart), and its own rotator starts from the
/// store's version, not its cache.
async fn rotation_on_a_reaches_b(store_a: Arc<Store>, store_b: Arc<Store>, two_tokens: bool) {
    let env = DevEnv::new();
    let hsm_a = hsm(&env);
    let hsm_b = if two_tokens { hsm(&env) } else { hsm_a.clone() };
    legacy_deployment(&hsm_a, &store_a).await;
    let a = service(&hsm_a, &store_a);
    let b = service(&hsm_b, &store_b);

    let before = b.create(T, hotp("before")).await.expect("create before");
    assert_eq!(before.record.master_key_version, 1);

    let r = a.seed_rotator().rotate(10).await.expect("rotate on A");
    assert_eq!(r.old_key_label, master_key_label(1));
    assert_eq!(r.new_key_label, master_key_label(2));
    assert_eq!((r.rewrapped, r.already_rewrapped), (1, 0));
    assert_eq!(a.master_key_version().load(Ordering::SeqCst), 2);
    assert_eq!(
        b.master_key_version().load(Ordering::SeqCst),
        1,
        "B has not heard of the rotation yet"
    );

    // B's first enrolment after the switch: its cache said 1, the unit of work said 2.
    let after = b.create(T, hotp("after")).await.expect("create after");
    assert_eq!(after.record.master_key_version, 2);
    assert_eq!(b.master_key_version().load(Ordering::SeqCst), 2);
    let stored = store_b.get(T, "after").await.expect("get").expect("stored");
    assert_eq!(stored.master_key_version, 2);
    // The next one goes straight to 2; a generated seed too.
    let generated = b
        .create(
            T,
            NewCredential {
                id: Some("generated".into()),
                seed: None,
                ..hotp("generated")
            },
        )
        .await
        .expect("create generated");
    assert_eq!(generated.record.master_key_version, 2);

    // Both verify on both instances.
    assert_eq!(
        b.verify(T, "after", &code(0))
            .await
            .expect("verify")
            .verdict,
        Verdict::Accepted
    );
    assert_eq!(
        a.verify(T, "after", &code(1))
            .await
            .expect("verify")
            .verdict,
        Verdict::Accepted
    );
    assert_eq!(
        b.verify(T, "before", &code(0))
            .await
            .expect("verify")
            .verdict,
        Verdict::Accepted
    );
    for rec in store_a.list(None, None, 10).await.expect("list") {
        assert_eq!(rec.master_key_version, 2, "{}", rec.id);
    }
    assert_eq!(
        store_b.get_meta(ROTATION_META).await.expect("meta"),
        None,
        "the rotation is recorded as done"
    );

    // B's rotator reads the store's version (2, which has the unwrap template): refused
    // before it makes a key; with its stale cache it would have rotated 1 -> 2 again.
    let err = b
        .seed_rotator()
        .rotate(10)
        .await
        .expect_err("second rotation");
    assert!(
        err.to_string()
            .contains("seed-master-key-2 already confines what it unwraps"),
        "{err}"
    );
    assert!(hsm_b
        .find_object(ObjectClass::SECRET_KEY, &master_key_label(3))
        .await
        .expect("find")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_reaches_another_service_over_the_same_redb_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(
        Store::open_redb(&dir.path().join(EMBEDDED_FILE), StoreOptions::default()).expect("store"),
    );
    rotation_on_a_reaches_b(store.clone(), store, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_instance_reaches_the_other_over_postgres() {
    let Some(db) = crate::store::postgres::testing::TestDatabase::create() else {
        return;
    };
    rotation_on_a_reaches_b(db.store("instance-a"), db.store("instance-b"), true).await;
}

/// A rotation that died after its switch (records under both keys, the rotation still
/// recorded as running) is finished by the next one, which makes no new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rotation_is_finished_by_the_next() {
    let env = DevEnv::new();
    let hsm = hsm(&env);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(
        Store::open_redb(&dir.path().join(EMBEDDED_FILE), StoreOptions::default()).expect("store"),
    );
    legacy_deployment(&hsm, &store).await;
    let s = service(&hsm, &store);
    for id in ["x1", "x2"] {
        s.create(T, hotp(id)).await.expect("create");
    }
    // What the switch wrote before the process died.
    assert!(hsm.ensure_seed_master_key(2).await.expect("key 2"));
    store
        .put_meta(MASTER_KEY_VERSION_META, 2u32.to_be_bytes().to_vec())
        .await
        .expect("version 2");
    store
        .put_meta(ROTATION_META, 1u32.to_be_bytes().to_vec())
        .await
        .expect("running");
    // A restarted instance enrols under 2.
    let restarted = service(&hsm, &store);
    let x3 = restarted.create(T, hotp("x3")).await.expect("create x3");
    assert_eq!(x3.record.master_key_version, 2);

    let r = restarted.seed_rotator().rotate(1).await.expect("resume");
    assert_eq!(r.old_key_label, master_key_label(1));
    assert_eq!(r.new_key_label, master_key_label(2));
    assert_eq!((r.rewrapped, r.already_rewrapped), (2, 1));
    assert_eq!(store.get_meta(ROTATION_META).await.expect("meta"), None);
    for rec in store.list(None, None, 10).await.expect("list") {
        assert_eq!(rec.master_key_version, 2, "{}", rec.id);
    }
    assert_eq!(
        restarted
            .verify(T, "x1", &code(0))
            .await
            .expect("verify")
            .verdict,
        Verdict::Accepted
    );
    assert!(hsm
        .find_object(ObjectClass::SECRET_KEY, &master_key_label(3))
        .await
        .expect("find")
        .is_none());
}
