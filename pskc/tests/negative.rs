//! Refusals: wrong/missing MAC, wrong key or password, truncated and malformed
//! XML, entity bombs and external entities, unknown algorithms, key lengths,
//! duplicate ids, unknown elements, limits, policies; and no secret in any
//! error or Debug output.

use std::io::BufReader;

use pskc::crypto::{pbkdf2, Decryptor, MacStatus};
use pskc::{
    CryptoError, EntryErrorKind, Error, KeyPackage, Limits, Options, Prf, Reader, SecretBytes,
    SecretValue, Unsupported,
};
use secrecy::ExposeSecret;

fn data(name: &str) -> String {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

type Parsed<'a> = (
    Reader<BufReader<&'a [u8]>>,
    Vec<Result<KeyPackage, pskc::EntryError>>,
);

/// Parses the whole document: the header, then every entry.
fn parse(doc: &str) -> Result<Parsed<'_>, Error> {
    parse_with(doc, Options::default())
}

fn parse_with(doc: &str, opts: Options) -> Result<Parsed<'_>, Error> {
    let mut r = Reader::with_options(BufReader::new(doc.as_bytes()), opts)?;
    let mut out = Vec::new();
    while let Some(e) = r.next_entry()? {
        out.push(e);
    }
    Ok((r, out))
}

fn psk6() -> SecretBytes {
    SecretBytes::new(hex("12345678901234567890123456789012"))
}

fn secret_of(p: &KeyPackage) -> &SecretValue {
    p.key.data.secret.as_ref().unwrap()
}

fn entry_err(doc: &str) -> EntryErrorKind {
    let (_, e) = parse(doc).expect("file accepted");
    e.into_iter()
        .next()
        .unwrap()
        .expect_err("entry refused")
        .kind
}

const PLAIN: &str = r#"<?xml version="1.0"?>
<KeyContainer Version="1.0" xmlns="urn:ietf:params:xml:ns:keyprov:pskc">
  <KeyPackage>
    <Key Id="K1" Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:hotp">
      <Data><Secret><PlainValue>MTIzNDU2Nzg5MDEyMzQ1Njc4OTA=</PlainValue></Secret></Data>
      EXTRA
    </Key>
  </KeyPackage>
</KeyContainer>"#;

fn plain_with(extra: &str) -> String {
    PLAIN.replace("EXTRA", extra)
}

#[test]
fn wrong_mac_is_refused_before_decryption() {
    let doc = data("figure6.xml").replace(
        "Su+NvtQfmvfJzF6bmQiJqoLRExc=",
        "Tu+NvtQfmvfJzF6bmQiJqoLRExc=",
    );
    let (r, e) = parse(&doc).unwrap();
    let dec = Decryptor::from_psk(r.header(), psk6()).unwrap();
    let p = e[0].as_ref().unwrap();
    assert_eq!(
        dec.secret(secret_of(p)).unwrap_err(),
        CryptoError::MacMismatch
    );
    let SecretValue::Encrypted { value, mac } = secret_of(p) else {
        panic!()
    };
    assert_eq!(
        dec.verify_mac(value, mac.as_deref()),
        Err(CryptoError::MacMismatch)
    );
    // A truncated MAC is a mismatch too, not a shorter comparison.
    assert_eq!(
        dec.verify_mac(value, Some(&mac.as_ref().unwrap()[..10])),
        Err(CryptoError::MacMismatch)
    );
    // An altered cipher value with the original MAC.
    let mut altered = value.clone();
    altered.cipher_value[20] ^= 1;
    let orig = data("figure6.xml");
    let (r, e) = parse(&orig).unwrap();
    let dec = Decryptor::from_psk(r.header(), psk6()).unwrap();
    let SecretValue::Encrypted { mac, .. } = secret_of(e[0].as_ref().unwrap()) else {
        panic!()
    };
    assert_eq!(
        dec.decrypt(&altered, mac.as_deref()).unwrap_err(),
        CryptoError::MacMismatch
    );
}

#[test]
fn missing_mac_is_refused_unless_allowed() {
    let doc = data("figure6.xml").replace(
        "<ValueMAC>Su+NvtQfmvfJzF6bmQiJqoLRExc=\n                    </ValueMAC>",
        "",
    );
    assert!(!doc.contains("ValueMAC"));
    let (r, e) = parse(&doc).unwrap();
    let p = e[0].as_ref().unwrap();
    let dec = Decryptor::from_psk(r.header(), psk6()).unwrap();
    assert_eq!(
        dec.secret(secret_of(p)).unwrap_err(),
        CryptoError::MissingMac
    );
    let dec = dec.allow_unmaced(true);
    let (s, st) = dec.secret(secret_of(p)).unwrap();
    assert_eq!(st, Some(MacStatus::Unmaced));
    assert_eq!(s.expose_secret(), b"12345678901234567890");
}

#[test]
fn wrong_psk_is_refused() {
    let doc = data("figure6.xml");
    let (r, e) = parse(&doc).unwrap();
    let p = e[0].as_ref().unwrap();
    for k in [
        "12345678901234567890123456789013",
        "00000000000000000000000000000000",
    ] {
        let res = Decryptor::from_psk(r.header(), SecretBytes::new(hex(k)))
            .and_then(|d| d.secret(secret_of(p)).map(|_| ()));
        assert!(
            matches!(
                res,
                Err(CryptoError::DecryptFailed | CryptoError::MacMismatch)
            ),
            "{res:?}"
        );
    }
    // Wrong lengths.
    for len in [15, 17, 33] {
        assert!(matches!(
            Decryptor::from_psk(r.header(), SecretBytes::new(vec![1; len])),
            Err(CryptoError::KeyLength { .. })
        ));
    }
    // A 32-byte key for AES-128 data.
    let res = Decryptor::from_psk(r.header(), SecretBytes::new(vec![1; 32]));
    assert!(
        matches!(
            res,
            Err(CryptoError::KeyLength {
                need: 16,
                got: 32,
                ..
            })
        ),
        "{res:?}"
    );
    // A password for a PSK file.
    assert!(matches!(
        Decryptor::from_password(r.header(), b"qwerty"),
        Err(CryptoError::WrongKeyKind(_))
    ));
}

#[test]
fn wrong_password_is_refused() {
    let doc = data("figure7.xml");
    let (r, e) = parse(&doc).unwrap();
    let p = e[0].as_ref().unwrap();
    for pw in [&b"qwertz"[..], b"", b"QWERTY", b"qwerty\n"] {
        let res = Decryptor::from_password(r.header(), pw)
            .and_then(|d| d.secret(secret_of(p)).map(|_| ()));
        assert!(
            matches!(
                res,
                Err(CryptoError::DecryptFailed | CryptoError::MacMismatch)
            ),
            "{res:?}"
        );
    }
    assert!(matches!(
        Decryptor::from_psk(r.header(), SecretBytes::new(vec![0; 16])),
        Err(CryptoError::WrongKeyKind(_))
    ));
}

#[test]
fn pbkdf2_sha256_prf() {
    // RFC 7914 §11: PBKDF2-HMAC-SHA256("passwd", "salt", 1).
    let k = pbkdf2(Prf::HmacSha256, b"passwd", b"salt", 1, 16);
    assert_eq!(
        k.expose_secret(),
        &hex("55ac046e56e3089fec1691c22544b605")[..]
    );
    // RFC 6070: PBKDF2-HMAC-SHA1("password", "salt", 2, 20).
    let k = pbkdf2(Prf::HmacSha1, b"password", b"salt", 2, 20);
    assert_eq!(
        k.expose_secret(),
        &hex("ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957")[..]
    );
    // The PRF attribute is read from the file.
    let doc = data("figure7.xml").replace(
        "<PRF/>",
        r#"<PRF Algorithm="http://www.w3.org/2001/04/xmldsig-more#hmac-sha256"/>"#,
    );
    let r = Reader::new(BufReader::new(doc.as_bytes())).unwrap();
    let Some(pskc::EncryptionKey::DerivedKey(d)) = &r.header().encryption_key else {
        panic!()
    };
    assert_eq!(d.prf, Prf::HmacSha256);
    // An unknown PRF refuses the file.
    let doc = data("figure7.xml").replace("<PRF/>", r#"<PRF Algorithm="urn:x:md5"/>"#);
    assert!(matches!(
        Reader::new(BufReader::new(doc.as_bytes())),
        Err(Error::Header(_))
    ));
}

#[test]
fn truncated_documents_are_refused_at_every_length() {
    for name in ["figure6.xml", "figure10.xml"] {
        let doc = data(name);
        let full = doc.trim_end().len();
        for cut in 0..full {
            let res = parse(&doc[..cut]);
            assert!(res.is_err(), "{name} cut at {cut} was accepted");
        }
        assert!(parse(&doc).is_ok());
    }
}

#[test]
fn malformed_xml_is_refused() {
    for doc in [
        "<KeyContainer Version=\"1.0\" xmlns=\"urn:ietf:params:xml:ns:keyprov:pskc\"><KeyPackage></Key></KeyContainer>",
        "<KeyContainer Version=\"1.0\" xmlns=\"urn:ietf:params:xml:ns:keyprov:pskc\"><KeyPackage><</KeyPackage></KeyContainer>",
        "<KeyContainer Version=\"1.0\" xmlns=\"urn:ietf:params:xml:ns:keyprov:pskc\"><x:Foo/></KeyContainer>",
        "<KeyContainer Version=\"1.0\" xmlns=\"urn:ietf:params:xml:ns:keyprov:pskc\"></KeyContainer><KeyContainer/>",
        "<KeyContainer Version=\"1.0\" xmlns=\"urn:ietf:params:xml:ns:keyprov:pskc\"><KeyPackage a=\"1\" a=\"2\"/></KeyContainer>",
        "<KeyContainer Version=\"2.0\" xmlns=\"urn:ietf:params:xml:ns:keyprov:pskc\"></KeyContainer>",
        "<KeyContainer Version=\"1.0\"></KeyContainer>",
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><KeyContainer Version=\"1.0\" xmlns=\"urn:ietf:params:xml:ns:keyprov:pskc\"/>",
        "",
        "just text",
    ] {
        assert!(parse(doc).is_err(), "accepted: {doc}");
    }
}

#[test]
fn entity_expansion_bomb_is_refused() {
    let bomb = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<KeyContainer Version="1.0" xmlns="urn:ietf:params:xml:ns:keyprov:pskc">
  <KeyPackage><Key Id="&lol9;" Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:hotp"/></KeyPackage>
</KeyContainer>"#;
    assert!(matches!(parse(bomb), Err(Error::Doctype { .. })));
    // Even without the DTD, an undeclared entity is refused (not left as text).
    let doc = plain_with("<Issuer>&lol9;</Issuer>");
    assert!(
        matches!(parse(&doc), Err(Error::Entity { .. })),
        "{:?}",
        parse(&doc).err()
    );
    let doc = PLAIN.replace("Id=\"K1\"", "Id=\"&lol9;\"");
    assert!(
        matches!(parse(&doc), Err(Error::Entity { .. })),
        "{:?}",
        parse(&doc).err()
    );
    // Predefined entities and character references are fine.
    let doc = plain_with("<Issuer>A&amp;B &#x41;&#66;</Issuer>");
    let (_, e) = parse(&doc).unwrap();
    assert_eq!(e[0].as_ref().unwrap().key.issuer.as_deref(), Some("A&B AB"));
}

#[test]
fn external_entity_is_refused() {
    for doc in [
        r#"<?xml version="1.0"?><!DOCTYPE KeyContainer [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><KeyContainer Version="1.0" xmlns="urn:ietf:params:xml:ns:keyprov:pskc"><KeyPackage><Key Id="1" Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:hotp"><Issuer>&xxe;</Issuer></Key></KeyPackage></KeyContainer>"#,
        r#"<!DOCTYPE KeyContainer SYSTEM "http://example.invalid/pskc.dtd"><KeyContainer Version="1.0" xmlns="urn:ietf:params:xml:ns:keyprov:pskc"/>"#,
        r#"<!doctype KeyContainer><KeyContainer Version="1.0" xmlns="urn:ietf:params:xml:ns:keyprov:pskc"/>"#,
    ] {
        assert!(
            matches!(parse(doc), Err(Error::Doctype { .. })),
            "{:?}",
            parse(doc).err()
        );
    }
    // A DOCTYPE after the root start is refused too.
    let doc = PLAIN.replace("EXTRA", "<!DOCTYPE x>");
    assert!(parse(&doc).is_err());
}

#[test]
fn unknown_algorithm_uris() {
    // Key algorithm: recorded, the key is unsupported.
    let doc = PLAIN.replace("pskc:hotp", "pskc:ocra");
    let (_, e) = parse(&doc).unwrap();
    let k = &e[0].as_ref().unwrap().key;
    assert_eq!(
        k.unsupported(),
        vec![Unsupported::Algorithm(
            "urn:ietf:params:xml:ns:keyprov:pskc:ocra".into()
        )]
    );
    // Encryption algorithm of a value: refused at decryption.
    let doc = data("figure6.xml").replacen(
        "http://www.w3.org/2001/04/xmlenc#aes128-cbc\"/>\n                        <xenc:CipherData>",
        "http://www.w3.org/2001/04/xmlenc#tripledes-cbc\"/>\n                        <xenc:CipherData>",
        1,
    );
    assert!(doc.contains("tripledes"));
    let (r, e) = parse(&doc).unwrap();
    let dec = Decryptor::from_psk(r.header(), psk6()).unwrap();
    assert!(matches!(
        dec.secret(secret_of(e[0].as_ref().unwrap())),
        Err(CryptoError::UnsupportedAlgorithm(u)) if u.ends_with("tripledes-cbc")
    ));
    // MAC algorithm or MACKey algorithm: the whole file.
    let doc = data("figure6.xml").replace("xmldsig#hmac-sha1", "xmldsig#hmac-md5");
    assert!(matches!(parse(&doc), Err(Error::Header(_))));
    let doc = data("figure6.xml").replacen("xmlenc#aes128-cbc", "xmlenc#aes999-cbc", 1);
    assert!(matches!(parse(&doc), Err(Error::Header(_))));
}

#[test]
fn secret_too_short_or_too_long() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    for (len, ok) in [(15, false), (16, true), (64, true), (65, false)] {
        let doc = PLAIN.replace("MTIzNDU2Nzg5MDEyMzQ1Njc4OTA=", &b64.encode(vec![7u8; len]));
        let (_, e) = parse(&doc).unwrap();
        let res = pskc::crypto::plain_secret(
            secret_of(e[0].as_ref().unwrap()),
            &pskc::crypto::DEFAULT_SECRET_LEN,
        );
        assert_eq!(res.is_ok(), ok, "{len}: {res:?}");
        if !ok {
            assert!(matches!(res, Err(CryptoError::SecretLength { got, .. }) if got == len));
        }
    }
    // Encrypted: a generated file decrypts, with too narrow bounds it is refused.
    let mut f = Vec::new();
    pskc::testdata::write_encrypted(&mut f, &pskc::testdata::Spec::new(1)).unwrap();
    let mut r = Reader::new(BufReader::new(&f[..])).unwrap();
    let spec = pskc::testdata::Spec::new(1);
    let dec = Decryptor::from_psk(r.header(), SecretBytes::new(spec.transport_key())).unwrap();
    let p = r.next_entry().unwrap().unwrap().unwrap();
    assert!(dec.secret(secret_of(&p)).is_ok());
    let dec = dec.secret_len(21..=64);
    assert!(matches!(
        dec.secret(secret_of(&p)),
        Err(CryptoError::SecretLength { got: 20, .. })
    ));
}

#[test]
fn duplicate_key_ids_refuse_the_file() {
    let doc = data("figure10.xml").replace("Key Id=\"3\"", "Key Id=\"1\"");
    let mut r = Reader::new(BufReader::new(doc.as_bytes())).unwrap();
    assert!(r.next_entry().unwrap().unwrap().is_ok());
    assert!(r.next_entry().unwrap().unwrap().is_ok());
    match r.next_entry() {
        Err(Error::DuplicateKeyId { id, index }) => assert_eq!((id.as_str(), index), ("1", 2)),
        other => panic!("{other:?}"),
    }
    // After a whole-file error, nothing more.
    assert!(r.next_entry().unwrap().is_none());
    // Can be turned off (a caller that checks ids itself).
    let mut opts = Options::default();
    opts.check_duplicate_ids = false;
    let (_, e) = parse_with(&doc, opts).unwrap();
    assert_eq!(e.len(), 4);
}

#[test]
fn unknown_elements_refused_or_recorded() {
    // An unknown PSKC element in a Key: the entry is refused.
    assert_eq!(
        entry_err(&plain_with("<Frobnicate/>")),
        EntryErrorKind::UnknownElement("pskc:Frobnicate".into())
    );
    // An unknown xmlenc element in Data.
    let doc = plain_with("").replace(
        "<Data>",
        "<Data><e:Foo xmlns:e=\"http://www.w3.org/2001/04/xmlenc#\"/>",
    );
    assert_eq!(
        entry_err(&doc),
        EntryErrorKind::UnknownElement("xenc:Foo".into())
    );
    // Extensions and foreign namespaces: recorded, the entry is fine.
    let doc = plain_with(
        "<Extensions><v:Colour xmlns:v=\"urn:vendor\">red</v:Colour></Extensions><v:Note xmlns:v=\"urn:vendor\">x</v:Note>",
    );
    let (_, e) = parse(&doc).unwrap();
    assert_eq!(
        e[0].as_ref().unwrap().ignored,
        vec![
            "pskc:Extensions".to_string(),
            "{urn:vendor}Note".to_string()
        ]
    );
    // Any prefix works for the PSKC namespace.
    let doc = PLAIN
        .replace(
            "<KeyContainer Version=\"1.0\" xmlns=",
            "<p:KeyContainer Version=\"1.0\" xmlns:p=",
        )
        .replace("</KeyContainer>", "</p:KeyContainer>")
        .replace("<KeyPackage>", "<p:KeyPackage>")
        .replace("</KeyPackage>", "</p:KeyPackage>")
        .replace("<Key ", "<p:Key ")
        .replace("</Key>", "</p:Key>")
        .replace(
            "<Data><Secret><PlainValue>",
            "<p:Data><p:Secret><p:PlainValue>",
        )
        .replace(
            "</PlainValue></Secret></Data>",
            "</p:PlainValue></p:Secret></p:Data>",
        )
        .replace("EXTRA", "");
    let (_, e) = parse(&doc).unwrap();
    assert_eq!(e[0].as_ref().unwrap().key.id, "K1");
    // Unprefixed elements in no namespace are not PSKC elements.
    let doc = PLAIN.replace(" xmlns=\"urn:ietf:params:xml:ns:keyprov:pskc\"", "");
    assert!(matches!(parse(&doc), Err(Error::Structure(_))));
    // Unknown element at the top level: the file.
    let doc = PLAIN.replace("<KeyPackage>", "<Bogus/><KeyPackage>");
    assert!(matches!(parse(&doc), Err(Error::Structure(_))));
}

#[test]
fn entry_errors_do_not_stop_the_file() {
    let doc = data("figure10.xml")
        .replacen(
            "<PlainValue>0</PlainValue>",
            "<PlainValue>zero</PlainValue>",
            1,
        )
        .replace("Key Id=\"2\"", "Key");
    let (_, e) = parse(&doc).unwrap();
    assert_eq!(e.len(), 4);
    let e0 = e[0].as_ref().unwrap_err();
    assert_eq!(
        (e0.index, e0.key_id.as_deref(), e0.serial_no.as_deref()),
        (0, Some("1"), Some("654321"))
    );
    assert!(
        matches!(&e0.kind, EntryErrorKind::InvalidValue { element, .. } if element == "Counter")
    );
    assert_eq!(
        e[1].as_ref().unwrap_err().kind,
        EntryErrorKind::MissingKeyId
    );
    assert!(e[2].is_ok() && e[3].is_ok());
    // Bad base64 in a secret, and duplicate elements.
    let doc = PLAIN.replace("MTIzNDU2Nzg5MDEyMzQ1Njc4OTA=", "!!!");
    assert!(matches!(
        entry_err(&doc),
        EntryErrorKind::InvalidValue { .. }
    ));
    let doc = plain_with("<Issuer>a</Issuer><Issuer>b</Issuer>");
    assert_eq!(
        entry_err(&doc),
        EntryErrorKind::DuplicateElement("pskc:Issuer".into())
    );
    let doc = PLAIN
        .replace("<Key Id", "<Keyx Id")
        .replace("</Key>", "</Keyx>");
    assert!(matches!(entry_err(&doc), EntryErrorKind::UnknownElement(_)));
}

#[test]
fn limits_are_enforced() {
    // Depth.
    let deep = format!(
        "{}{}",
        "<Extensions>".repeat(40),
        "</Extensions>".repeat(40)
    );
    assert!(matches!(
        parse(&plain_with(&deep)),
        Err(Error::Limit { what, .. }) if what.contains("depth")
    ));
    // One huge text run: stopped by the event limit before it is buffered.
    let huge = format!("<Issuer>{}</Issuer>", "A".repeat(300 * 1024));
    assert!(matches!(
        parse(&plain_with(&huge)),
        Err(Error::Limit { .. })
    ));
    // A huge attribute containing '>' (cannot evade the event limit).
    let huge = format!("<Issuer a=\"{}\"/>", "a>".repeat(200 * 1024));
    assert!(matches!(
        parse(&plain_with(&huge)),
        Err(Error::Limit { .. })
    ));
    // A huge comment containing '<' and '>'.
    let huge = format!("<!-- {} -->", "<a>".repeat(100 * 1024));
    assert!(matches!(
        parse(&plain_with(&huge)),
        Err(Error::Limit { .. })
    ));
    // Text per element.
    let t = format!("<Issuer>{}</Issuer>", "A&amp;".repeat(40 * 1024));
    assert!(
        matches!(parse(&plain_with(&t)), Err(Error::Limit { what, .. }) if what.contains("text"))
    );
    // Elements per package.
    let many = "<Extensions/>".repeat(600);
    assert!(matches!(
        parse(&plain_with(&many)),
        Err(Error::Limit { .. })
    ));
    // Entry count and document size.
    let mut opts = Options::default();
    opts.limits.max_entries = Some(3);
    assert!(matches!(
        parse_with(&data("figure10.xml"), opts),
        Err(Error::Limit { limit: 3, .. })
    ));
    let mut opts = Options::default();
    opts.limits = Limits::default();
    opts.limits.max_document_bytes = Some(1000);
    assert!(matches!(
        parse_with(&data("figure10.xml"), opts),
        Err(Error::Limit { .. })
    ));
}

#[test]
fn policy_decisions() {
    let pol = |p: &str| {
        let doc = plain_with(&format!("<Policy>{p}</Policy>"));
        let (_, e) = parse(&doc).unwrap();
        e[0].as_ref().unwrap().key.unsupported()
    };
    assert!(pol("<KeyUsage>OTP</KeyUsage><KeyUsage>CR</KeyUsage>").is_empty());
    assert_eq!(
        pol("<KeyUsage>Encrypt</KeyUsage>"),
        vec![Unsupported::NotForOtp]
    );
    assert!(pol(r#"<PINPolicy PINUsageMode="Local" MaxFailedAttempts="3"/>"#).is_empty());
    for mode in ["Prepend", "Append", "Algorithmic", "Telepathic"] {
        let u = pol(&format!(r#"<PINPolicy PINUsageMode="{mode}"/>"#));
        assert!(
            matches!(u.as_slice(), [Unsupported::ServerPin(_)]),
            "{mode}: {u:?}"
        );
    }
    assert_eq!(
        pol("<NumberOfTransactions>100</NumberOfTransactions>"),
        vec![Unsupported::NumberOfTransactions(100)]
    );
    assert_eq!(
        pol("<StartDate>2030-01-01T00:00:00Z</StartDate><ExpiryDate>2029-01-01T00:00:00Z</ExpiryDate>"),
        vec![Unsupported::EmptyValidity]
    );
    assert!(pol(
        "<StartDate>2029-01-01T00:00:00Z</StartDate><ExpiryDate>2030-01-01T00:00:00Z</ExpiryDate>"
    )
    .is_empty());
    // Malformed dates refuse the entry.
    let doc = plain_with("<Policy><StartDate>soon</StartDate></Policy>");
    assert!(matches!(
        entry_err(&doc),
        EntryErrorKind::InvalidValue { .. }
    ));
    // Challenge-response and non-decimal responses are not OTP codes we verify.
    let doc = plain_with(
        r#"<AlgorithmParameters><ChallengeFormat Encoding="DECIMAL" Min="8" Max="8"/><ResponseFormat Length="8" Encoding="HEXADECIMAL"/></AlgorithmParameters>"#,
    );
    let (_, e) = parse(&doc).unwrap();
    let u = e[0].as_ref().unwrap().key.unsupported();
    assert!(u.contains(&Unsupported::ChallengeResponse), "{u:?}");
    assert!(
        u.iter()
            .any(|x| matches!(x, Unsupported::ResponseFormat(_))),
        "{u:?}"
    );
}

#[test]
fn key_wrap_values() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    // RFC 3394 §4.1: 128-bit key data wrapped with a 128-bit KEK.
    let kek = hex("000102030405060708090A0B0C0D0E0F");
    let wrapped = pskc::crypto::wrap_kw(
        &pskc::EncryptionAlgorithm::KwAes128,
        &kek,
        &hex("00112233445566778899AABBCCDDEEFF"),
    )
    .unwrap();
    assert_eq!(
        wrapped,
        hex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5")
    );
    let mac_key = b"0123456789abcdef01234567";
    let mk_wrapped =
        pskc::crypto::wrap_kw(&pskc::EncryptionAlgorithm::KwAes128, &kek, mac_key).unwrap();
    let vm = pskc::crypto::mac(pskc::MacAlgorithm::HmacSha256, mac_key, &wrapped);
    let doc = format!(
        r#"<KeyContainer Version="1.0" xmlns="urn:ietf:params:xml:ns:keyprov:pskc" xmlns:xenc="http://www.w3.org/2001/04/xmlenc#">
  <MACMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#hmac-sha256">
    <MACKey><xenc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#kw-aes128"/>
      <xenc:CipherData><xenc:CipherValue>{}</xenc:CipherValue></xenc:CipherData></MACKey>
  </MACMethod>
  <KeyPackage><Key Id="kw" Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:totp"><Data><Secret>
    <EncryptedValue><xenc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#kw-aes128"/>
      <xenc:CipherData><xenc:CipherValue>{}</xenc:CipherValue></xenc:CipherData></EncryptedValue>
    <ValueMAC>{}</ValueMAC></Secret>
    <TimeInterval><PlainValue>30</PlainValue></TimeInterval></Data></Key></KeyPackage>
</KeyContainer>"#,
        b64.encode(&mk_wrapped),
        b64.encode(&wrapped),
        b64.encode(&vm)
    );
    let (r, e) = parse(&doc).unwrap();
    let dec = Decryptor::from_psk(r.header(), SecretBytes::new(kek.clone())).unwrap();
    assert_eq!(dec.mac_key().unwrap().1.expose_secret(), &mac_key[..]);
    let p = e[0].as_ref().unwrap();
    let (s, st) = dec.secret(secret_of(p)).unwrap();
    assert_eq!(st, Some(MacStatus::Verified));
    assert_eq!(
        s.expose_secret(),
        &hex("00112233445566778899AABBCCDDEEFF")[..]
    );
    assert_eq!(p.key.data.time_interval.as_ref().unwrap().plain(), Some(30));
    // A ValueMAC made with another MAC key does not verify.
    let other = pskc::crypto::mac(pskc::MacAlgorithm::HmacSha256, b"another mac key", &wrapped);
    let doc = doc.replace(&b64.encode(&vm), &b64.encode(other));
    let (_, e) = parse(&doc).unwrap();
    assert_eq!(
        dec.secret(secret_of(e[0].as_ref().unwrap())).unwrap_err(),
        CryptoError::MacMismatch
    );
    // A corrupted wrap fails the integrity check of RFC 3394 (with the MAC allowed off).
    let mut bad = pskc::EncryptedValue::new(pskc::EncryptionAlgorithm::KwAes128, wrapped.clone());
    bad.cipher_value[3] ^= 1;
    assert_eq!(
        pskc::crypto::decrypt_raw(&hex("000102030405060708090A0B0C0D0E0F"), &bad).unwrap_err(),
        CryptoError::DecryptFailed
    );
}

#[test]
fn no_secret_in_debug_or_errors() {
    let doc = data("figure3.xml");
    let (_, e) = parse(&doc).unwrap();
    let dbg = format!("{:?}", e);
    assert!(!dbg.contains("1234567890"), "{dbg}");
    assert!(!dbg.contains("MTIzNDU2Nzg5MDEyMzQ1Njc4OTA"), "{dbg}");
    assert!(dbg.contains("REDACTED"));
    // Decryptor Debug shows neither the transport key nor the MAC key.
    let fig6 = data("figure6.xml");
    let (r, _) = parse(&fig6).unwrap();
    let dec = Decryptor::from_psk(r.header(), psk6()).unwrap();
    let dbg = format!("{dec:?}");
    assert!(
        !dbg.contains("18, 52") && !dbg.contains("0x12") && !dbg.contains("17, 34"),
        "{dbg}"
    );
    // A bad secret value's error names the element, not the value.
    let doc = PLAIN.replace("MTIzNDU2Nzg5MDEyMzQ1Njc4OTA=", "c2VjcmV0c2VjcmV0c2VjcmV0!");
    let err = entry_err(&doc);
    assert!(!format!("{err} {err:?}").contains("c2VjcmV0"), "{err:?}");
}
