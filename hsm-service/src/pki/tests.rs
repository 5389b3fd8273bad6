//! Software keys stand in for the HSM; OpenSSL (`/usr/bin/openssl`) is the
//! independent verifier.

use std::{path::Path, process::Command, str::FromStr};

use der::Decode;
use x509_cert::{
    certificate::Certificate,
    ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier},
    request::CertReq,
};

use super::*;
use crate::common::soft_key::SoftKey;
use crate::common::{Algorithm, PublicKey};

/// 2023-11-14: inside the validity of the certificates below. OpenSSL is
/// pinned to it with `-attime` so the tests do not depend on the clock.
const AT: u64 = 1_700_000_000;
const ROOT_DN: &str = "CN=Example Root,O=Example,C=DK";

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn write_pem(dir: &Path, name: &str, label: &str, der: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, to_pem(label, der)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Signs a to-be-signed structure the way the HSM module would.
fn sign(tbs: ToBeSigned, key: &SoftKey) -> Vec<u8> {
    assert_eq!(tbs.algorithm(), key.algorithm());
    let sig = key.sign(tbs.bytes(), tbs.digest());
    tbs.assemble(&sig).unwrap()
}

fn ca_params(subject: &str) -> CertificateParams {
    CertificateParams {
        subject: subject.into(),
        serial: vec![0xa5; 16], // high bit set: must still encode as positive
        not_before: AT - 86_400,
        not_after: AT + 10 * 365 * 86_400,
        is_ca: true,
        path_len: Some(0),
        key_usage: KeyUsage::CA,
        dns_names: vec![],
    }
}

fn leaf_params(cn: &str) -> CertificateParams {
    CertificateParams {
        subject: format!("CN={cn},O=Example,C=DK"),
        serial: (1..=16).collect(),
        not_before: AT - 3600,
        not_after: AT + 86_400,
        is_ca: false,
        path_len: None,
        key_usage: KeyUsage::SIGNING,
        dns_names: vec!["idp.example.dk".into()],
    }
}

fn self_signed(key: &SoftKey, subject: &str) -> Vec<u8> {
    let pk = key.public();
    let name = Name::from_str(subject).unwrap();
    let tbs = certificate_to_sign(
        &ca_params(subject),
        &pk,
        IssuerRef::new(&name, &pk, key.algorithm()),
    )
    .unwrap();
    sign(tbs, key)
}

/// A self-signed CA certificate, for other modules' tests.
pub(crate) fn self_signed_ca_der() -> Vec<u8> {
    self_signed(&SoftKey::p256(7), ROOT_DN)
}

/// A leaf (not CA) certificate issued by [`self_signed_ca_der`], for other modules' tests.
pub(crate) fn leaf_der() -> Vec<u8> {
    let root = SoftKey::p256(7);
    issue(
        &self_signed(&root, ROOT_DN),
        &root,
        &SoftKey::p256(8),
        "Leaf",
    )
}

fn issue(issuer_der: &[u8], issuer_key: &SoftKey, leaf_key: &SoftKey, cn: &str) -> Vec<u8> {
    let issuer = IssuerCertificate::from_der(issuer_der).unwrap();
    let tbs =
        certificate_to_sign(&leaf_params(cn), &leaf_key.public(), issuer.issuer_ref()).unwrap();
    sign(tbs, issuer_key)
}

fn verify(dir: &Path, root: &[u8], leaf: &[u8]) -> (bool, String) {
    let root = write_pem(dir, "root.pem", "CERTIFICATE", root);
    let leaf = write_pem(dir, "leaf.pem", "CERTIFICATE", leaf);
    openssl(&[
        "verify",
        "-attime",
        &AT.to_string(),
        "-CAfile",
        &root,
        &leaf,
    ])
}

fn all_keys() -> Vec<SoftKey> {
    vec![
        SoftKey::p256(21),
        SoftKey::p384(21),
        SoftKey::ed25519(21),
        SoftKey::rsa(),
    ]
}

#[test]
fn csr_verifies_with_openssl_for_each_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    for key in all_keys() {
        let der = sign(
            csr_to_sign(
                "CN=hsm-signer,O=Example,C=DK",
                &key.public(),
                key.algorithm(),
            )
            .unwrap(),
            &key,
        );
        let req = CertReq::from_der(&der).unwrap();
        assert_eq!(req.info.subject.to_string(), "CN=hsm-signer,O=Example,C=DK");

        let path = write_pem(dir.path(), "req.pem", "CERTIFICATE REQUEST", &der);
        let (ok, out) = openssl(&["req", "-in", &path, "-verify", "-noout"]);
        assert!(
            ok && out.contains("verify OK"),
            "{:?}: {out}",
            key.algorithm()
        );

        // A corrupted signature must be rejected.
        let mut bad = der.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x01;
        let path = write_pem(dir.path(), "bad.pem", "CERTIFICATE REQUEST", &bad);
        let (ok, out) = openssl(&["req", "-in", &path, "-verify", "-noout"]);
        assert!(!ok || !out.contains("verify OK"), "{out}");
    }
}

#[test]
fn p256_root_issues_leaves_for_each_key_type() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = SoftKey::p256(1);
    let root = self_signed(&root_key, ROOT_DN);
    let (ok, out) = verify(dir.path(), &root, &root);
    assert!(ok, "root: {out}");

    for leaf_key in all_keys() {
        let leaf = issue(&root, &root_key, &leaf_key, "leaf");
        let (ok, out) = verify(dir.path(), &root, &leaf);
        assert!(
            ok && out.contains(": OK"),
            "{:?}: {out}",
            leaf_key.algorithm()
        );
        let cert = Certificate::from_der(&leaf).unwrap();
        assert_eq!(
            PublicKey::from_spki_der(
                &der::Encode::to_der(cert.tbs_certificate().subject_public_key_info()).unwrap()
            )
            .unwrap(),
            leaf_key.public()
        );
    }
}

#[test]
fn each_algorithm_signs_certificates_openssl_accepts() {
    // Roots of every type, each issuing a P-256 leaf: exercises every
    // signatureAlgorithm encoding, RSASSA-PSS parameters included.
    let dir = tempfile::tempdir().unwrap();
    for root_key in all_keys() {
        let root = self_signed(&root_key, ROOT_DN);
        let leaf = issue(&root, &root_key, &SoftKey::p256(2), "leaf");
        let (ok, out) = verify(dir.path(), &root, &leaf);
        assert!(
            ok && out.contains(": OK"),
            "{:?}: {out}",
            root_key.algorithm()
        );

        let leaf_pem = write_pem(dir.path(), "leaf.pem", "CERTIFICATE", &leaf);
        let (_, text) = openssl(&["x509", "-in", &leaf_pem, "-noout", "-text"]);
        if root_key.algorithm() == Algorithm::Ps256 {
            for want in [
                "rsassaPss",
                "Hash Algorithm: sha256",
                "Mask Algorithm: mgf1 with sha256",
                "Salt Length: 0x20",
            ] {
                assert!(text.contains(want), "missing {want:?} in {text}");
            }
        }
    }
}

#[test]
fn tampered_certificate_fails_openssl_verify() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = SoftKey::p256(1);
    let root = self_signed(&root_key, ROOT_DN);
    let leaf = issue(&root, &root_key, &SoftKey::ed25519(4), "leaf");
    assert!(verify(dir.path(), &root, &leaf).0);

    // Flip a bit in the subject CN (signed data) and in the signature itself.
    let pos = leaf.windows(4).position(|w| w == b"leaf").unwrap();
    let mut tampered = leaf.clone();
    tampered[pos] ^= 0x20;
    let (ok, out) = verify(dir.path(), &root, &tampered);
    assert!(!ok, "{out}");
    let mut bad_sig = leaf.clone();
    let last = bad_sig.len() - 3;
    bad_sig[last] ^= 0x01;
    let (ok, out) = verify(dir.path(), &root, &bad_sig);
    assert!(!ok, "{out}");

    // A leaf signed by another key with the same issuer name fails too.
    let impostor = issue(&root, &SoftKey::p256(99), &SoftKey::ed25519(4), "leaf");
    assert!(!verify(dir.path(), &root, &impostor).0);
}

#[test]
fn certificate_contents() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = SoftKey::p256(1);
    let root = self_signed(&root_key, ROOT_DN);
    let leaf = issue(&root, &root_key, &SoftKey::p384(5), "leaf");

    let root_pem = write_pem(dir.path(), "root.pem", "CERTIFICATE", &root);
    let (_, text) = openssl(&[
        "x509",
        "-in",
        &root_pem,
        "-noout",
        "-text",
        "-fingerprint",
        "-sha256",
    ]);
    for want in [
        "Version: 3 (0x2)",
        "Issuer: C = DK, O = Example, CN = Example Root",
        "Subject: C = DK, O = Example, CN = Example Root",
        "X509v3 Basic Constraints: critical\n                CA:TRUE, pathlen:0",
        "X509v3 Key Usage: critical\n                Certificate Sign, CRL Sign",
        "X509v3 Subject Key Identifier",
        "X509v3 Authority Key Identifier",
        "ecdsa-with-SHA256",
        &format!("sha256 Fingerprint={}", sha256_fingerprint(&root)),
    ] {
        assert!(text.contains(want), "missing {want:?} in {text}");
    }
    let leaf_pem = write_pem(dir.path(), "leaf.pem", "CERTIFICATE", &leaf);
    let (_, text) = openssl(&["x509", "-in", &leaf_pem, "-noout", "-text"]);
    for want in [
        "Serial Number:\n            01:02:03:04:05:06:07:08:09:0a:0b:0c:0d:0e:0f:10",
        "CA:FALSE",
        "X509v3 Key Usage: critical\n                Digital Signature",
        "DNS:idp.example.dk",
        "NIST CURVE: P-384",
    ] {
        assert!(text.contains(want), "missing {want:?} in {text}");
    }

    // SKI/AKI chain up: the root's AKI is its own SKI, the leaf's AKI the root's SKI.
    let ski = |der: &[u8]| {
        let c = Certificate::from_der(der).unwrap();
        let s = c
            .tbs_certificate()
            .get_extension::<SubjectKeyIdentifier>()
            .unwrap()
            .unwrap()
            .1;
        let a = c
            .tbs_certificate()
            .get_extension::<AuthorityKeyIdentifier>()
            .unwrap()
            .unwrap()
            .1;
        (
            s.0.as_bytes().to_vec(),
            a.key_identifier.unwrap().as_bytes().to_vec(),
        )
    };
    let (root_ski, root_aki) = ski(&root);
    let (_, leaf_aki) = ski(&leaf);
    assert_eq!(root_ski, root_aki);
    assert_eq!(leaf_aki, root_ski);
    assert_eq!(root_ski.len(), 20);

    // Serial with the high bit set stays positive (leading zero byte).
    let serial = Certificate::from_der(&root)
        .unwrap()
        .tbs_certificate()
        .serial_number()
        .as_bytes()
        .to_vec();
    assert_eq!(serial[0], 0);
    assert_eq!(serial[1..], [0xa5; 16]);
}

#[test]
fn validity_after_2049_uses_generalized_time() {
    let dir = tempfile::tempdir().unwrap();
    let key = SoftKey::p256(8);
    let pk = key.public();
    let name = Name::from_str(ROOT_DN).unwrap();
    let mut p = ca_params(ROOT_DN);
    p.not_after = 2_840_140_800; // 2060-01-01
    let der = sign(
        certificate_to_sign(&p, &pk, IssuerRef::new(&name, &pk, Algorithm::Es256)).unwrap(),
        &key,
    );
    assert!(
        der.windows(2).any(|w| w == [0x18, 0x0f]),
        "GeneralizedTime tag"
    );
    let pem = write_pem(dir.path(), "c.pem", "CERTIFICATE", &der);
    let (_, text) = openssl(&["x509", "-in", &pem, "-noout", "-enddate"]);
    assert!(text.contains("Jan  1 00:00:00 2060 GMT"), "{text}");
}

#[test]
fn invalid_inputs_are_rejected() {
    let key = SoftKey::p256(1);
    let pk = key.public();
    let name = Name::from_str(ROOT_DN).unwrap();
    let issuer = IssuerRef::new(&name, &pk, Algorithm::Es256);
    let err = |p: CertificateParams| match certificate_to_sign(&p, &pk, issuer) {
        Err(PkiError::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let mut p = leaf_params("x");
    p.key_usage = KeyUsage::CA;
    assert!(err(p).contains("is_ca"));
    let mut p = leaf_params("x");
    p.not_after = p.not_before;
    assert!(err(p).contains("not_after"));
    let mut p = leaf_params("x");
    p.serial = vec![0; 16];
    assert!(err(p).contains("serial"));
    let mut p = leaf_params("x");
    p.serial = vec![1; 21];
    assert!(err(p).contains("serial"));
    let mut p = leaf_params("x");
    p.key_usage = KeyUsage::default();
    assert!(err(p).contains("key_usage"));
    let mut p = leaf_params("x");
    p.dns_names = vec!["bad name æ".into()];
    assert!(err(p).contains("DNS"));
    let mut p = leaf_params("x");
    p.subject = String::new();
    assert!(err(p).contains("name"));

    let wrong = IssuerRef::new(&name, &pk, Algorithm::Es384);
    assert!(certificate_to_sign(&leaf_params("x"), &pk, wrong).is_err());
    assert!(csr_to_sign("CN=x", &pk, Algorithm::EdDsa).is_err());
    assert!(Name::from_str("NOPE").is_err());

    // Wrong signature length from the HSM is caught before producing DER.
    let tbs = csr_to_sign("CN=x", &pk, Algorithm::Es256).unwrap();
    assert!(matches!(
        tbs.assemble(&[1; 63]),
        Err(PkiError::InvalidSignature(_))
    ));

    // Only CA certificates can be issuers.
    let leaf = issue(&self_signed(&key, ROOT_DN), &key, &SoftKey::p256(3), "leaf");
    assert!(IssuerCertificate::from_der(&leaf).is_err());
}

#[test]
fn pem_and_fingerprint_format() {
    let der: Vec<u8> = (0..=255).collect();
    let pem = to_pem("CERTIFICATE", &der);
    let lines: Vec<&str> = pem.lines().collect();
    assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
    assert_eq!(*lines.last().unwrap(), "-----END CERTIFICATE-----");
    assert!(lines[1..lines.len() - 1].iter().all(|l| l.len() <= 64));
    assert!(pem.ends_with("-----\n"));
    let fp = sha256_fingerprint(b"");
    assert!(fp.starts_with("E3:B0:C4:42:98:FC:1C:14"));
    assert_eq!(fp.len(), 32 * 3 - 1);
}
