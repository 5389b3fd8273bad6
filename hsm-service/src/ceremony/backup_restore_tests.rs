//! Backups across tokens: a key pair wrapped under the trusted KEK on one token,
//! restored onto another from M of the officers' KEK shares (`shares`), through the
//! `hsm` boundary. (Here rather than in `hsm`'s tests: `hsm` never imports `ceremony`.)

use crate::hsm::tests::open;
use crate::hsm::{HsmSettings, KeyPairKind, PublicKeyAttributes, SignMechanism};
use crate::testing::DevEnv;

/// True (the test has nothing more to do) when `e` is the refusal of a token without
/// CKA_TRUSTED (kryoptic, the second token); never on SoftHSM.
fn no_trusted_keks_here(env: &DevEnv, e: &crate::hsm::Error) -> bool {
    if e.kind() != crate::hsm::ErrorKind::Unsupported {
        return false;
    }
    assert!(e.to_string().contains("CKA_TRUSTED"), "{e}");
    assert_ne!(
        crate::testing::SoftToken::of_module(&env.config.hsm.module),
        crate::testing::SoftToken::SoftHsm,
        "SoftHSM has CKA_TRUSTED: {e}"
    );
    true
}

/// A backup key pair wrapped under a trusted KEK (made by the SO before the service logs
/// in), the KEK split 2-of-3, restored onto another token from 2 shares: a signature made
/// there verifies under the original public key. One share is refused; a KEK made from
/// one share by lying about the threshold fails the unwrap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_key_pair_restores_onto_another_token_from_m_shares() {
    use super::shares;
    use crate::hsm::backup::{self, KEK_LEN};
    use zeroize::Zeroizing;

    let a = DevEnv::new();
    let settings = |env: &DevEnv| HsmSettings {
        module: env.config.hsm.module.clone(),
        token: env.config.token(),
        sessions: 1,
        queue_capacity: 4,
        seed_cache_capacity: 16,
    };
    let so_pin = secrecy::SecretString::from(
        std::fs::read_to_string(a.dir.path().join("so.pin"))
            .expect("so.pin")
            .trim()
            .to_owned(),
    );
    let mut kek = Zeroizing::new(vec![0u8; KEK_LEN]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut kek[..]).expect("rng");
    match backup::create_trusted_kek(&settings(&a), &so_pin, "backup-kek-1", kek.clone()) {
        Err(e) if no_trusted_keks_here(&a, &e) => return,
        other => other.expect("SO creates the trusted KEK"),
    }
    let shares = shares::split(&kek, 2, 3).expect("split");
    drop(kek);

    let hsm_a = open(&a, 1, 4);
    let kind = KeyPairKind::EcP256;
    let pair = hsm_a
        .generate_backup_key_pair(kind, "assertion/v9")
        .await
        .expect("generate");
    let facts = hsm_a.private_key_facts(&pair.id).await.expect("facts");
    assert!(facts.sensitive && facts.extractable && !facts.never_extractable);
    // A key of the normal kind does not wrap at all (not extractable).
    let normal = hsm_a
        .generate_signing_key_pair(kind, "normal")
        .await
        .expect("normal");
    assert!(hsm_a
        .wrap_key_pair_for_backup(kind, &normal.id, "backup-kek-1")
        .await
        .is_err());
    let wrapped = hsm_a
        .wrap_key_pair_for_backup(kind, &pair.id, "backup-kek-1")
        .await
        .expect("wrap under the trusted KEK");
    assert_eq!(wrapped.public, pair.public);

    let b = DevEnv::new();
    let hsm_b = open(&b, 1, 4);
    // One share is not enough.
    let e = shares::combine(2, &shares[..1]).expect_err("1 of 2");
    assert!(e.to_string().contains("2 distinct ones needed"), "{e}");
    // Claiming threshold 1 is refused; a KEK forced out of one share is wrong, and the
    // unwrap's integrity check refuses it.
    assert!(shares::combine(1, &shares[..1]).is_err());
    let mut forged = Zeroizing::new(shares[0][1..].to_vec());
    forged[0] ^= 1;
    assert!(hsm_b
        .restore_key_pair(&wrapped, "assertion/v9", forged)
        .await
        .is_err());
    assert_eq!(
        hsm_b.count_objects_with_id(&pair.id).await.expect("count"),
        0
    );

    let kek = shares::combine(2, &[shares[2].clone(), shares[0].clone()]).expect("2 of 3");
    hsm_b
        .restore_key_pair(&wrapped, "assertion/v9", kek)
        .await
        .expect("restore");
    let restored = hsm_b.private_key_facts(&pair.id).await.expect("facts");
    assert!(restored.sensitive && !restored.extractable && restored.sign && !restored.local);
    assert_eq!(
        hsm_b
            .public_key_attributes(&pair.id, kind)
            .await
            .expect("public"),
        pair.public
    );

    let message = b"signed on the restored token";
    let digest = ring::digest::digest(&ring::digest::SHA256, message);
    let sig = hsm_b
        .sign(&pair.id, SignMechanism::Ecdsa, digest.as_ref().to_vec())
        .await
        .expect("sign on B");
    let PublicKeyAttributes::Ec { ec_point } = &pair.public else {
        panic!("EC key");
    };
    let point = if ec_point.len() == 67 && ec_point[0] == 0x04 {
        &ec_point[2..]
    } else {
        &ec_point[..]
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(message, &sig)
        .expect("B's signature verifies under A's public key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_kek_share_files_restore_a_backup_on_a_new_token() {
    use super::shares::{self, ShareFile};

    let a = DevEnv::new();
    let settings = HsmSettings {
        module: a.config.hsm.module.clone(),
        token: a.config.token(),
        sessions: 1,
        queue_capacity: 4,
        seed_cache_capacity: 16,
    };
    let so_pin = secrecy::SecretString::from(
        std::fs::read_to_string(a.dir.path().join("so.pin"))
            .expect("so.pin")
            .trim()
            .to_owned(),
    );
    let out = tempfile::tempdir().expect("tempdir");
    let (paths, check) =
        match shares::provision_backup_kek(&settings, &so_pin, "backup-kek-1", 2, 3, out.path()) {
            Err(crate::error::Error::Hsm(e)) if no_trusted_keks_here(&a, &e) => return,
            other => other.expect("provision 2 of 3"),
        };
    assert_eq!(paths.len(), 3);
    // Existing share files, or an existing KEK label, are refused.
    let e = shares::provision_backup_kek(&settings, &so_pin, "backup-kek-1", 2, 3, out.path())
        .expect_err("files exist");
    assert!(e.to_string().contains("never overwritten"), "{e}");
    let other = tempfile::tempdir().expect("tempdir");
    let e = shares::provision_backup_kek(&settings, &so_pin, "backup-kek-1", 2, 3, other.path())
        .expect_err("label exists");
    assert!(e.to_string().contains("never replaced"), "{e}");
    assert!(std::fs::read_dir(other.path()).unwrap().next().is_none());
    let e = shares::provision_backup_kek(&settings, &so_pin, "backup-kek-2", 1, 3, other.path())
        .expect_err("1 of 3");
    assert!(e.to_string().contains("threshold 1 of 3"), "{e}");

    let hsm_a = open(&a, 1, 4);
    let kind = KeyPairKind::EcP256;
    let pair = hsm_a
        .generate_backup_key_pair(kind, "assertion/v9")
        .await
        .expect("generate");
    let wrapped = hsm_a
        .wrap_key_pair_for_backup(kind, &pair.id, "backup-kek-1")
        .await
        .expect("wrap under the provisioned KEK");

    let read = |i: usize| {
        let f =
            ShareFile::parse(&std::fs::read_to_string(&paths[i]).expect("read")).expect("parse");
        assert_eq!(f.check, check);
        f
    };
    let b = DevEnv::new();
    let hsm_b = open(&b, 1, 4);
    let e = shares::combine_share_files("backup-kek-1", &[read(1)]).expect_err("1 of 2");
    assert!(e.to_string().contains("1 distinct share(s)"), "{e}");
    assert_eq!(
        hsm_b.count_objects_with_id(&pair.id).await.expect("count"),
        0
    );
    let kek = shares::combine_share_files("backup-kek-1", &[read(2), read(0)]).expect("2 of 3");
    hsm_b
        .restore_key_pair(&wrapped, "assertion/v9", kek)
        .await
        .expect("restore");
    // A second restore of the same pair is refused and adds nothing.
    let kek = shares::combine_share_files("backup-kek-1", &[read(0), read(1)]).expect("2 of 3");
    let e = hsm_b
        .restore_key_pair(&wrapped, "assertion/v9", kek)
        .await
        .expect_err("restore over an existing key");
    assert!(e.to_string().contains("never replaces"), "{e}");
    assert_eq!(
        hsm_b.count_objects_with_id(&pair.id).await.expect("count"),
        2
    );
    let message = b"signed on the new token";
    let digest = ring::digest::digest(&ring::digest::SHA256, message);
    let sig = hsm_b
        .sign(&pair.id, SignMechanism::Ecdsa, digest.as_ref().to_vec())
        .await
        .expect("sign on B");
    let PublicKeyAttributes::Ec { ec_point } = &pair.public else {
        panic!("EC key");
    };
    let point = if ec_point.len() == 67 && ec_point[0] == 0x04 {
        &ec_point[2..]
    } else {
        &ec_point[..]
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(message, &sig)
        .expect("B's signature verifies under A's public key");
}
