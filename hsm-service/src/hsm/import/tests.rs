//! The import path against SoftHSM, with RFC 6030 figure 6 (pre-shared AES-128 key,
//! HMAC-SHA-1 MAC) as typed in from the RFC.

use std::sync::Arc;

use base64::Engine;
use zeroize::Zeroizing;

use super::*;
use crate::hsm::tests::open;
use crate::testing::DevEnv;

pub(crate) const FIG6_PSK: &str = "12345678901234567890123456789012";
pub(crate) const FIG6_MAC_KEY: &str =
    "ESIzRFVmd4iZABEiM0RVZgKn6WjLaTC1sbeBMSvIhRejN9vJa2BOlSaMrR7I5wSX";
pub(crate) const FIG6_SECRET: &str =
    "AAECAwQFBgcICQoLDA0OD+cIHItlB3Wra1DUpxVvOx2lef1VmNPCMl8jwZqIUqGv";
pub(crate) const FIG6_VALUE_MAC: &str = "Su+NvtQfmvfJzF6bmQiJqoLRExc=";

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn fig6_batch(items: Vec<Item>) -> Batch {
    Batch {
        transport: Arc::new(Transport::Aes(Zeroizing::new(unhex(FIG6_PSK)))),
        mac_key: Some(MacKey {
            algorithm: MacAlgorithm::Sha1,
            method: Encryption::AesCbc(16),
            cipher_value: b64(FIG6_MAC_KEY),
        }),
        master_version: 1,
        items,
        allow_rsa_1_5: false,
    }
}

fn fig6_item(value_mac: Option<Vec<u8>>, existing: Option<(u32, Vec<u8>)>) -> Item {
    Item {
        secret: Secret::Encrypted {
            method: Encryption::AesCbc(16),
            cipher_value: b64(FIG6_SECRET),
            value_mac,
        },
        pad_to: 20,
        lengths: 10..=64,
        context: b"ctx".to_vec(),
        existing,
    }
}

async fn ready(env: &DevEnv) -> Hsm {
    let hsm = open(env, 2, 16);
    hsm.ensure_seed_master_key(1).await.expect("master");
    hsm.ensure_seed_binding_key().await.expect("binding");
    hsm
}

#[tokio::test]
async fn rfc6030_figure6_decrypts_in_the_hsm_to_the_rfc_seed() {
    let env = DevEnv::new();
    let hsm = ready(&env).await;
    let out = hsm
        .import_batch(fig6_batch(vec![fig6_item(Some(b64(FIG6_VALUE_MAC)), None)]))
        .await
        .expect("batch");
    let Outcome::Wrapped {
        wrapped,
        binding,
        in_hsm,
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    // SoftHSM 2.6.1 has no CBC unwrap (C_UnwrapKey with CKM_AES_CBC_PAD answers
    // CKR_MECHANISM_INVALID): the zeroized-buffer path. A token with it decrypts inside.
    assert!(
        !*in_hsm,
        "SoftHSM gained CBC unwrap: update the README's import section"
    );
    // The same seed wrapped the ordinary way is the same blob (deterministic wrap).
    let direct = hsm
        .wrap_seed(1, Zeroizing::new(b"12345678901234567890".to_vec()))
        .await
        .expect("wrap");
    assert_eq!(&direct, wrapped);
    let bound = hsm
        .seed_bindings(vec![(b"ctx".to_vec(), direct.clone())])
        .await
        .expect("bind");
    assert_eq!(&bound[0], binding);
    // Comparing with an existing record: same seed, other seed.
    let other = hsm
        .wrap_seed(1, Zeroizing::new(b"abcdefghijabcdefghij".to_vec()))
        .await
        .expect("wrap");
    let out = hsm
        .import_batch(fig6_batch(vec![
            fig6_item(Some(b64(FIG6_VALUE_MAC)), Some((1, direct))),
            fig6_item(Some(b64(FIG6_VALUE_MAC)), Some((1, other))),
        ]))
        .await
        .expect("batch");
    assert_eq!(
        out,
        vec![
            Outcome::Same { in_hsm: false },
            Outcome::Different { in_hsm: false }
        ]
    );
}

#[tokio::test]
async fn a_wrong_mac_or_key_is_refused_before_decryption() {
    let env = DevEnv::new();
    let hsm = ready(&env).await;
    let mut bad = b64(FIG6_VALUE_MAC);
    bad[0] ^= 1;
    let out = hsm
        .import_batch(fig6_batch(vec![fig6_item(Some(bad), None)]))
        .await
        .expect("batch");
    assert!(
        matches!(&out[0], Outcome::Refused(r) if r.contains("ValueMAC")),
        "{out:?}"
    );
    // A wrong transport key: the MAC key does not decrypt (or, by chance, to a key
    // under which no MAC matches).
    let mut batch = fig6_batch(vec![fig6_item(Some(b64(FIG6_VALUE_MAC)), None)]);
    batch.transport = Arc::new(Transport::Aes(Zeroizing::new(vec![7; 16])));
    match hsm.import_batch(batch).await {
        Err(BatchRefused::Transport(m)) => assert!(m.contains("MAC key"), "{m}"),
        Ok(out) => assert!(matches!(&out[0], Outcome::Refused(_)), "{out:?}"),
        Err(e) => panic!("{e}"),
    }
    // A method that does not fit the key.
    let mut item = fig6_item(None, None);
    item.secret = Secret::Encrypted {
        method: Encryption::AesCbc(32),
        cipher_value: b64(FIG6_SECRET),
        value_mac: None,
    };
    let out = hsm
        .import_batch(fig6_batch(vec![item]))
        .await
        .expect("batch");
    assert!(
        matches!(&out[0], Outcome::Refused(r) if r.contains("aes256")),
        "{out:?}"
    );
}

#[tokio::test]
async fn short_seeds_and_plain_values_go_through_a_zeroized_buffer() {
    let env = DevEnv::new();
    let hsm = ready(&env).await;
    // Plain 20-byte seed for HMAC-SHA-256: padded to 32 bytes.
    let item = Item {
        secret: Secret::Plain(Zeroizing::new(b"12345678901234567890".to_vec())),
        pad_to: 32,
        lengths: 10..=64,
        context: b"ctx".to_vec(),
        existing: None,
    };
    let out = hsm
        .import_batch(fig6_batch(vec![item]))
        .await
        .expect("batch");
    let mut padded = b"12345678901234567890".to_vec();
    padded.resize(32, 0);
    let direct = hsm
        .wrap_seed(1, Zeroizing::new(padded))
        .await
        .expect("wrap");
    assert!(
        matches!(&out[0], Outcome::Wrapped { wrapped, in_hsm: false, .. } if *wrapped == direct),
        "{out:?}"
    );
    // The figure 6 seed for SHA-256: decrypted in the HSM, too short, so again through
    // the buffer, and the same blob.
    let mut item = fig6_item(Some(b64(FIG6_VALUE_MAC)), None);
    item.pad_to = 32;
    let out = hsm
        .import_batch(fig6_batch(vec![item]))
        .await
        .expect("batch");
    assert!(
        matches!(&out[0], Outcome::Wrapped { wrapped, in_hsm: false, .. } if *wrapped == direct),
        "{out:?}"
    );
    // A length outside the accepted range.
    let mut item = fig6_item(Some(b64(FIG6_VALUE_MAC)), None);
    item.lengths = 32..=64;
    let out = hsm
        .import_batch(fig6_batch(vec![item]))
        .await
        .expect("batch");
    assert!(
        matches!(&out[0], Outcome::Refused(r) if r.contains("20 bytes")),
        "{out:?}"
    );
}

/// Runs `f` on a pool session (test set-up: encrypting test vectors with the token).
async fn on_session<T: Send + 'static>(
    hsm: &Hsm,
    f: impl Fn(&Session) -> Result<T> + Send + 'static,
) -> T {
    hsm.inner
        .pool
        .submit(move |w| w.run(false, |s, _| f(s)))
        .await
        .expect("session job")
}

#[tokio::test]
async fn kw_aes_and_rsa_oaep_decrypt_inside_the_hsm() {
    let env = DevEnv::new();
    let hsm = ready(&env).await;
    let seed: Vec<u8> = (0u8..32).collect();
    let psk = vec![0x42u8; 16];
    // The vendor's side: the seed wrapped with RFC 3394 under the pre-shared key.
    let (s2, p2) = (seed.clone(), psk.clone());
    let kw = on_session(&hsm, move |s| {
        let k = s.create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Wrap(true),
            Attribute::Value(p2.clone()),
        ])?;
        let mut t = seed_template();
        t.push(Attribute::Value(s2.clone()));
        let seed = s.create_object(&t)?;
        Ok(s.wrap_key(&Mechanism::AesKeyWrap, k, seed)?)
    })
    .await;
    let item = |method, cipher_value| Item {
        secret: Secret::Encrypted {
            method,
            cipher_value,
            value_mac: None,
        },
        pad_to: 32,
        lengths: 10..=64,
        context: b"ctx".to_vec(),
        existing: None,
    };
    let direct = hsm
        .wrap_seed(1, Zeroizing::new(seed.clone()))
        .await
        .expect("wrap");
    let batch = Batch {
        transport: Arc::new(Transport::Aes(Zeroizing::new(psk))),
        mac_key: None,
        master_version: 1,
        items: vec![item(Encryption::KwAes(16), kw)],
        allow_rsa_1_5: false,
    };
    let out = hsm.import_batch(batch).await.expect("batch");
    assert!(
        matches!(&out[0], Outcome::Wrapped { wrapped, in_hsm: true, .. } if *wrapped == direct),
        "{out:?}"
    );

    // RSA: a transport key pair of the token, the seed encrypted to its public key.
    let (n, e) = hsm.create_transport_key("vendor-a").await.expect("create");
    assert_eq!(n.len(), 384);
    assert_eq!(e, vec![1, 0, 1]);
    assert!(
        hsm.create_transport_key("vendor-a").await.is_err(),
        "names are unique"
    );
    assert_eq!(
        hsm.transport_public_key("vendor-a").await.expect("public"),
        (n, e)
    );
    let pubh = hsm
        .find_object(ObjectClass::PUBLIC_KEY, &transport_label("vendor-a"))
        .await
        .expect("find")
        .expect("public key");
    let s2 = seed.clone();
    let (oaep_ct, pkcs1_ct) = on_session(&hsm, move |s| {
        Ok((
            s.encrypt(&oaep(), pubh, &s2)?,
            s.encrypt(&Mechanism::RsaPkcs, pubh, &s2)?,
        ))
    })
    .await;
    let rsa = |items, allow_rsa_1_5| Batch {
        transport: Arc::new(Transport::Rsa("vendor-a".into())),
        mac_key: None,
        master_version: 1,
        items,
        allow_rsa_1_5,
    };
    let out = hsm
        .import_batch(rsa(
            vec![
                item(Encryption::RsaOaep, oaep_ct.clone()),
                item(Encryption::RsaPkcs1, pkcs1_ct.clone()),
                item(Encryption::AesCbc(16), b64(FIG6_SECRET)),
            ],
            false,
        ))
        .await
        .expect("batch");
    assert!(
        matches!(&out[0], Outcome::Wrapped { wrapped, in_hsm: true, .. } if *wrapped == direct),
        "{out:?}"
    );
    assert!(
        matches!(&out[1], Outcome::Refused(r) if r.contains("Bleichenbacher")),
        "{out:?}"
    );
    assert!(matches!(&out[2], Outcome::Refused(_)), "{out:?}");
    let out = hsm
        .import_batch(rsa(vec![item(Encryption::RsaPkcs1, pkcs1_ct)], true))
        .await
        .expect("batch");
    assert!(
        matches!(&out[0], Outcome::Wrapped { wrapped, in_hsm: true, .. } if *wrapped == direct),
        "{out:?}"
    );
    let mut bad = oaep_ct;
    bad[10] ^= 1;
    let out = hsm
        .import_batch(rsa(vec![item(Encryption::RsaOaep, bad)], false))
        .await
        .expect("batch");
    assert!(matches!(&out[0], Outcome::Refused(_)), "{out:?}");
    match hsm
        .import_batch(Batch {
            transport: Arc::new(Transport::Rsa("nobody".into())),
            ..rsa(vec![], false)
        })
        .await
    {
        Err(BatchRefused::NoTransportKey(m)) => assert!(m.contains("nobody"), "{m}"),
        other => panic!("{other:?}"),
    }
}
