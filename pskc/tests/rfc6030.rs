//! RFC 6030 figures 2 to 10, with the values and secrets the RFC states.

use std::io::BufReader;

use pskc::crypto::{plain_secret, Decryptor, MacStatus, DEFAULT_SECRET_LEN};
use pskc::{
    Algorithm, CryptoError, Encoding, EncryptionAlgorithm, EncryptionKey, Header, KeyPackage,
    KeyUsage, MacAlgorithm, PinUsageMode, Prf, Reader, SecretBytes, SecretValue, Trailer,
    Unsupported,
};
use secrecy::ExposeSecret;

fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn read(name: &str) -> (Header, Vec<KeyPackage>, Trailer) {
    let bytes = data(name);
    let mut r = Reader::new(BufReader::new(&bytes[..])).expect("header");
    let header = r.header().clone();
    let mut out = Vec::new();
    while let Some(e) = r.next_entry().expect("file") {
        out.push(e.expect("entry"));
    }
    (header, out, r.trailer().clone())
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn plain(p: &KeyPackage) -> Vec<u8> {
    match p.key.data.secret.as_ref().expect("secret") {
        SecretValue::Plain(s) => s.expose_secret().to_vec(),
        other => panic!("not plain: {other:?}"),
    }
}

#[test]
fn figure2_basic_container() {
    let (h, p, _) = read("figure2.xml");
    assert_eq!(h.version, "1.0");
    assert_eq!(h.id.as_deref(), Some("exampleID1"));
    assert!(h.encryption_key.is_none() && h.mac_method.is_none());
    assert_eq!(p.len(), 1);
    let k = &p[0].key;
    assert_eq!(k.id, "12345678");
    assert_eq!(k.algorithm, Algorithm::Hotp);
    assert_eq!(k.issuer.as_deref(), Some("Issuer-A"));
    assert_eq!(plain(&p[0]), b"1234");
    // A 4-byte HOTP secret is below RFC 4226's 128 bits: refused by the length check.
    assert!(matches!(
        plain_secret(k.data.secret.as_ref().unwrap(), &DEFAULT_SECRET_LEN),
        Err(CryptoError::SecretLength { got: 4, .. })
    ));
}

#[test]
fn figure3_supplementary_data() {
    let (_, p, _) = read("figure3.xml");
    let pkg = &p[0];
    assert_eq!(
        pkg.device_info.manufacturer.as_deref(),
        Some("Manufacturer")
    );
    assert_eq!(pkg.device_info.serial_no.as_deref(), Some("987654321"));
    assert_eq!(
        pkg.device_info.user_id.as_deref(),
        Some("DC=example-bank,DC=net")
    );
    assert_eq!(
        pkg.crypto_module_info.as_ref().unwrap().id.as_deref(),
        Some("CM_ID_001")
    );
    let k = &pkg.key;
    assert_eq!(k.issuer.as_deref(), Some("Issuer"));
    let rf = k.algorithm_parameters.response_format.as_ref().unwrap();
    assert_eq!((rf.length, &rf.encoding), (8, &Encoding::Decimal));
    assert_eq!(plain(pkg), b"12345678901234567890");
    assert_eq!(k.data.counter.as_ref().unwrap().plain(), Some(0));
    assert_eq!(
        k.user_id.as_deref(),
        Some("UID=jsmith,DC=example-bank,DC=net")
    );
    assert!(k.unsupported().is_empty(), "{:?}", k.unsupported());
    let s = plain_secret(k.data.secret.as_ref().unwrap(), &DEFAULT_SECRET_LEN).unwrap();
    assert_eq!(s.expose_secret(), b"12345678901234567890");
}

#[test]
fn figure4_key_derivation_values() {
    let (_, p, _) = read("figure4.xml");
    let k = &p[0].key;
    assert_eq!(k.key_profile_id.as_deref(), Some("keyProfile1"));
    assert_eq!(k.key_reference.as_deref(), Some("MasterKeyLabel"));
    assert!(k.data.secret.is_none());
    assert_eq!(k.policy.key_usage, vec![KeyUsage::Otp]);
    // No secret to import: the key must be derived from a master key we don't hold.
    assert_eq!(k.unsupported(), vec![Unsupported::NoSecret]);
}

#[test]
fn figure5_pin_policy() {
    let (_, p, _) = read("figure5.xml");
    assert_eq!(p.len(), 2);
    let k = &p[0].key;
    let pin = k.policy.pin_policy.as_ref().unwrap();
    assert_eq!(pin.min_length, Some(4));
    assert_eq!(pin.max_length, Some(4));
    assert_eq!(pin.pin_key_id.as_deref(), Some("123456781"));
    assert_eq!(pin.encoding, Some(Encoding::Decimal));
    assert_eq!(pin.usage_mode, PinUsageMode::Local);
    assert_eq!(k.policy.key_usage, vec![KeyUsage::Otp]);
    // Local PIN: checked by the device, the OTP is importable.
    assert!(k.unsupported().is_empty(), "{:?}", k.unsupported());
    assert_eq!(plain(&p[0]), b"12345678901234567890");
    // The PIN itself is a key of algorithm ...:pskc:pin: not an OTP key.
    let pin_key = &p[1].key;
    assert_eq!(pin_key.id, "123456781");
    assert_eq!(
        pin_key.algorithm,
        Algorithm::Unknown("urn:ietf:params:xml:ns:keyprov:pskc:pin".into())
    );
    assert!(pin_key.unsupported().contains(&Unsupported::Algorithm(
        "urn:ietf:params:xml:ns:keyprov:pskc:pin".into()
    )));
    assert_eq!(plain(&p[1]), b"1234");
}

#[test]
fn figure6_psk_aes128_cbc_with_mac() {
    let (h, p, _) = read("figure6.xml");
    assert!(matches!(&h.encryption_key, Some(EncryptionKey::KeyName(n)) if n == "Pre-shared-key"));
    let mm = h.mac_method.as_ref().unwrap();
    assert_eq!(mm.algorithm, MacAlgorithm::HmacSha1);
    let psk = SecretBytes::new(hex("12345678901234567890123456789012"));
    let dec = Decryptor::from_psk(&h, psk).unwrap();
    // The MAC key the RFC states.
    let (alg, mk) = dec.mac_key().unwrap();
    assert_eq!(alg, MacAlgorithm::HmacSha1);
    assert_eq!(
        mk.expose_secret(),
        &hex("1122334455667788990011223344556677889900")[..]
    );
    let secret = p[0].key.data.secret.as_ref().unwrap();
    let SecretValue::Encrypted { value, mac } = secret else {
        panic!("not encrypted")
    };
    assert_eq!(value.algorithm, EncryptionAlgorithm::Aes128Cbc);
    // The IV the RFC used (000102...0f) is the first 16 bytes.
    let (iv, ct) = value.cbc_parts().unwrap();
    assert_eq!(iv, &hex("000102030405060708090a0b0c0d0e0f")[..]);
    assert_eq!(ct.len(), 32);
    assert_eq!(mac.as_ref().unwrap().len(), 20);
    assert_eq!(
        dec.verify_mac(value, mac.as_deref()),
        Ok(MacStatus::Verified)
    );
    let (s, st) = dec.secret(secret).unwrap();
    assert_eq!(st, Some(MacStatus::Verified));
    assert_eq!(s.expose_secret(), b"12345678901234567890");
    assert_eq!(p[0].key.data.counter.as_ref().unwrap().plain(), Some(0));
}

#[test]
fn figure7_pbkdf2_password() {
    let (h, p, _) = read("figure7.xml");
    let Some(EncryptionKey::DerivedKey(d)) = &h.encryption_key else {
        panic!("no DerivedKey")
    };
    assert_eq!(d.iteration_count, 1000);
    assert_eq!(d.key_length, Some(16));
    assert_eq!(d.prf, Prf::HmacSha1);
    assert_eq!(d.salt, hex("123eff3c4a72129c"));
    assert_eq!(d.master_key_name.as_deref(), Some("My Password 1"));
    let dec = Decryptor::from_password(&h, b"qwerty").unwrap();
    // The derived key the RFC states.
    assert_eq!(
        dec.transport_key().expose_secret(),
        &hex("651e63cd57008476af1ff6422cd02e41")[..]
    );
    let pkg = &p[0];
    assert_eq!(
        pkg.device_info.manufacturer.as_deref(),
        Some("TokenVendorAcme")
    );
    assert_eq!(pkg.key.id, "123456");
    assert_eq!(pkg.key.issuer.as_deref(), Some("Example-Issuer"));
    let secret = pkg.key.data.secret.as_ref().unwrap();
    let SecretValue::Encrypted { value, .. } = secret else {
        panic!("not encrypted")
    };
    assert_eq!(value.id.as_deref(), Some("ED"));
    // The secret the RFC states, "12345678901234567890" (as in figures 3 and 6).
    let (s, st) = dec.secret(secret).unwrap();
    assert_eq!(st, Some(MacStatus::Verified));
    assert_eq!(s.expose_secret(), b"12345678901234567890");
}

#[test]
fn figure8_asymmetric_rsa_1_5() {
    let (h, p, _) = read("figure8.xml");
    let Some(EncryptionKey::X509 { certificates }) = &h.encryption_key else {
        panic!("no X509Data")
    };
    assert_eq!(certificates.len(), 1);
    assert_eq!(certificates[0][0], 0x30, "DER SEQUENCE");
    let k = &p[0].key;
    assert_eq!(k.id, "MBK000000001");
    let rf = k.algorithm_parameters.response_format.as_ref().unwrap();
    assert_eq!(rf.length, 6);
    let SecretValue::Encrypted { value, mac } = k.data.secret.as_ref().unwrap() else {
        panic!("not encrypted")
    };
    assert_eq!(value.algorithm, EncryptionAlgorithm::Rsa15);
    assert!(value.algorithm.is_rsa());
    // RSA-1024: one 128-byte block, for the HSM to decrypt.
    assert_eq!(value.cipher_value.len(), 128);
    assert!(mac.is_none());
    // No PSK/password applies; the secret needs the RSA key.
    assert!(matches!(
        Decryptor::from_psk(&h, SecretBytes::new(vec![0; 16])),
        Err(CryptoError::WrongKeyKind(_))
    ));
    assert!(matches!(
        plain_secret(k.data.secret.as_ref().unwrap(), &DEFAULT_SECRET_LEN),
        Err(CryptoError::NeedsRsa(_))
    ));
}

#[test]
fn figure9_signature_recorded() {
    let (_, p, t) = read("figure9.xml");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].device_info.serial_no.as_deref(), Some("0755225266"));
    assert_eq!(p[0].key.id, "123");
    assert_eq!(plain(&p[0]), b"12345678901234567890");
    assert!(t.signature, "the Signature is recorded");
}

#[test]
fn figure10_bulk_provisioning() {
    let (_, p, _) = read("figure10.xml");
    assert_eq!(p.len(), 4);
    let ids: Vec<_> = p.iter().map(|p| p.key.id.as_str()).collect();
    assert_eq!(ids, ["1", "2", "3", "4"]);
    let serials: Vec<_> = p
        .iter()
        .map(|p| p.device_info.serial_no.as_deref().unwrap())
        .collect();
    assert_eq!(serials, ["654321", "123456", "9999999", "9999999"]);
    for (i, pkg) in p.iter().enumerate() {
        assert_eq!(pkg.index, i as u64);
        assert_eq!(plain(pkg), b"12345678901234567890");
        assert!(pkg.key.unsupported().is_empty());
    }
    let pol = &p[0].key.policy;
    assert_eq!(
        pol.start_date.as_ref().unwrap().text,
        "2006-05-01T00:00:00Z"
    );
    assert_eq!(pol.start_date.as_ref().unwrap().unix, 1_146_441_600);
    assert_eq!(
        pol.expiry_date.as_ref().unwrap().unix,
        1_146_441_600 + 30 * 86_400
    );
    assert_eq!(
        p[3].key.policy.expiry_date.as_ref().unwrap().text,
        "2006-04-30T00:00:00Z"
    );
}
