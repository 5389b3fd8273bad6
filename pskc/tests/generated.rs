//! The testdata generator round-trips through the reader and the decryptor.

use std::io::BufReader;

use pskc::crypto::{Decryptor, MacStatus};
use pskc::testdata::{key_id, seed, serial_no, write_encrypted, Spec};
use pskc::{Algorithm, EncryptionAlgorithm, MacAlgorithm, Reader, SecretBytes};
use secrecy::ExposeSecret;

fn roundtrip(spec: &Spec) {
    let mut file = Vec::new();
    write_encrypted(&mut file, spec).unwrap();
    let mut r = Reader::new(BufReader::new(&file[..])).unwrap();
    let dec = Decryptor::from_psk(r.header(), SecretBytes::new(spec.transport_key())).unwrap();
    let mut n = 0;
    while let Some(e) = r.next_entry().unwrap() {
        let p = e.unwrap();
        assert_eq!(p.key.id, key_id(&spec.id_prefix, n));
        assert_eq!(p.device_info.serial_no.as_deref(), Some(&serial_no(n)[..]));
        let want = if spec.is_totp(n) {
            Algorithm::Totp
        } else {
            Algorithm::Hotp
        };
        assert_eq!(p.key.algorithm, want);
        assert!(p.key.unsupported().is_empty());
        let (s, st) = dec.secret(p.key.data.secret.as_ref().unwrap()).unwrap();
        assert_eq!(st, Some(MacStatus::Verified));
        assert_eq!(s.expose_secret(), &seed(n)[..]);
        n += 1;
    }
    assert_eq!(n, spec.entries);
}

#[test]
fn generated_files_decrypt_to_the_known_seeds() {
    roundtrip(&Spec::new(50));
    roundtrip(
        &Spec::new(20)
            .algorithm(EncryptionAlgorithm::Aes256Cbc)
            .mac(MacAlgorithm::HmacSha256)
            .totp_every(3)
            .id_prefix("x-"),
    );
    roundtrip(&Spec::new(5).algorithm(EncryptionAlgorithm::Aes192Cbc));
}
