//! Signature namespaces, encrypted integers, OAEP parameters, Suite, robustness
//! against byte mutations.

use std::io::BufReader;

use pskc::crypto::{encrypt_cbc, mac, Decryptor};
use pskc::{
    parse_all, EncryptionAlgorithm, IntValue, MacAlgorithm, Options, OtpHash, Reader, SecretBytes,
    Unsupported,
};

fn data(name: &str) -> String {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn signature_in_either_namespace_is_recorded() {
    let fig9 = data("figure9.xml");
    for doc in [
        fig9.clone(),
        fig9.replace("<ds:Signature>", "<Signature>")
            .replace("</ds:Signature>", "</Signature>"),
    ] {
        let d = parse_all(BufReader::new(doc.as_bytes()), Options::default()).unwrap();
        assert!(d.trailer.signature);
        assert_eq!(d.entries.len(), 1);
    }
    // Nothing may follow the Signature but the end of the container.
    let doc = fig9.replace("</KeyContainer>", "<KeyPackage/></KeyContainer>");
    assert!(parse_all(BufReader::new(doc.as_bytes()), Options::default()).is_err());
}

#[test]
fn encrypted_counter_and_oaep_parameters() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = [7u8; 16];
    let mk = [9u8; 20];
    let alg = EncryptionAlgorithm::Aes128Cbc;
    let mac_key = encrypt_cbc(&alg, &key, &[1; 16], &mk).unwrap();
    let counter = encrypt_cbc(&alg, &key, &[2; 16], &42u64.to_be_bytes()).unwrap();
    let counter_mac = mac(MacAlgorithm::HmacSha1, &mk, &counter);
    let doc = format!(
        r#"<KeyContainer Version="1.0" xmlns="urn:ietf:params:xml:ns:keyprov:pskc" xmlns:xenc="http://www.w3.org/2001/04/xmlenc#" xmlns:ds="http://www.w3.org/2000/09/xmldsig#">
  <MACMethod Algorithm="http://www.w3.org/2000/09/xmldsig#hmac-sha1">
    <MACKey><xenc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>
      <xenc:CipherData><xenc:CipherValue>{}</xenc:CipherValue></xenc:CipherData></MACKey>
  </MACMethod>
  <KeyPackage><Key Id="c" Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:hotp">
    <AlgorithmParameters><Suite>HMAC-SHA256</Suite></AlgorithmParameters>
    <Data><Secret><EncryptedValue>
      <xenc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#rsa-oaep-mgf1p">
        <ds:DigestMethod Algorithm="http://www.w3.org/2000/09/xmldsig#sha1"/>
        <xenc:OAEPparams>bGFiZWw=</xenc:OAEPparams>
      </xenc:EncryptionMethod>
      <xenc:CipherData><xenc:CipherValue>AAAA</xenc:CipherValue></xenc:CipherData></EncryptedValue></Secret>
    <Counter><EncryptedValue><xenc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>
      <xenc:CipherData><xenc:CipherValue>{}</xenc:CipherValue></xenc:CipherData></EncryptedValue>
      <ValueMAC>{}</ValueMAC></Counter>
    </Data></Key></KeyPackage>
</KeyContainer>"#,
        b64.encode(mac_key),
        b64.encode(&counter),
        b64.encode(counter_mac)
    );
    let d = parse_all(BufReader::new(doc.as_bytes()), Options::default()).unwrap();
    let k = &d.entries[0].as_ref().unwrap().key;
    assert_eq!(k.otp_hash(), Ok(OtpHash::Sha256));
    let dec = Decryptor::from_psk(&d.header, SecretBytes::new(key.to_vec())).unwrap();
    let c = k.data.counter.as_ref().unwrap();
    assert!(matches!(c, IntValue::Encrypted { .. }));
    assert_eq!(dec.int(c), Ok(42));
    let pskc::SecretValue::Encrypted { value, .. } = k.data.secret.as_ref().unwrap() else {
        panic!()
    };
    assert_eq!(value.algorithm, EncryptionAlgorithm::RsaOaepMgf1p);
    assert_eq!(
        value.oaep_digest.as_deref(),
        Some("http://www.w3.org/2000/09/xmldsig#sha1")
    );
    assert_eq!(value.oaep_params.as_deref(), Some(&b"label"[..]));
    assert!(matches!(
        dec.secret(k.data.secret.as_ref().unwrap()),
        Err(pskc::CryptoError::NeedsRsa(_))
    ));
    // The same MAC key given directly (e.g. RSA-decrypted in an HSM).
    let dec2 = Decryptor::from_parts(
        SecretBytes::new(key.to_vec()),
        Some((MacAlgorithm::HmacSha1, SecretBytes::new(mk.to_vec()))),
    );
    assert_eq!(dec2.int(c), Ok(42));
}

#[test]
fn suites() {
    for (s, h) in [
        ("HMAC-SHA1", Some(OtpHash::Sha1)),
        ("hmac-sha-256", Some(OtpHash::Sha256)),
        ("SHA512", Some(OtpHash::Sha512)),
        ("HMAC-MD5", None),
    ] {
        assert_eq!(OtpHash::from_suite(s), h, "{s}");
    }
    let doc = data("figure3.xml").replace(
        "<AlgorithmParameters>",
        "<AlgorithmParameters><Suite>HMAC-MD5</Suite>",
    );
    let d = parse_all(BufReader::new(doc.as_bytes()), Options::default()).unwrap();
    assert_eq!(
        d.entries[0].as_ref().unwrap().key.unsupported(),
        vec![Unsupported::Suite("HMAC-MD5".into())]
    );
}

#[test]
fn byte_mutations_never_panic() {
    // Every position of two figures, four replacement bytes each: a result
    // (accepted or refused), never a panic or a hang.
    let mut refused = 0;
    for name in ["figure6.xml", "figure7.xml"] {
        let doc = data(name).into_bytes();
        for i in 0..doc.len() {
            for b in [b'<', b'&', b'"', 0xff] {
                let mut m = doc.clone();
                m[i] = b;
                let r = Reader::new(BufReader::new(&m[..])).and_then(|mut r| {
                    while r.next_entry()?.is_some() {}
                    Ok(())
                });
                refused += r.is_err() as usize;
            }
        }
    }
    assert!(refused > 0);
}
