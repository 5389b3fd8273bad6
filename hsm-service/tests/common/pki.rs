//! Test PKI on top of a dev data directory: the dev CA as an rcgen issuer (for CRLs and
//! extra certificates), further CAs, and client certificates of either.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use x509_cert::der::{DecodePem, Encode};

/// The dev CA of `data_dir` (same name and key as `hsm-service dev` made it).
pub fn dev_ca(data_dir: &Path) -> Issuer<'static, KeyPair> {
    let pem = std::fs::read_to_string(data_dir.join("pki/ca.key")).expect("ca.key");
    let key = KeyPair::from_pem(&pem).expect("CA key");
    Issuer::new(ca_params("hsm-service dev CA"), key)
}

/// A new CA: its issuer and its certificate (PEM).
pub fn new_ca(cn: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().expect("key");
    let params = ca_params(cn);
    let cert = params.self_signed(&key).expect("CA certificate");
    (Issuer::new(params, key), cert.pem())
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 12, 31);
    p
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "hsm-service dev");
    dn
}

/// A client certificate with common name `cn` issued by `issuer`, written as
/// `dir/<file>.crt` and `.key`.
pub fn client_cert(issuer: &Issuer<'_, KeyPair>, cn: &str, dir: &Path, file: &str) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name = name(cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 12, 31);
    let cert = p.signed_by(&key, issuer).expect("certificate");
    std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).expect("write crt");
    std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).expect("write key");
}

/// The serial number of the PEM certificate at `path`.
pub fn serial(path: &Path) -> SerialNumber {
    let pem = std::fs::read_to_string(path).expect("certificate");
    let cert = x509_cert::Certificate::from_pem(pem).expect("PEM certificate");
    SerialNumber::from_slice(cert.tbs_certificate().serial_number().as_bytes())
}

/// SHA-256 of the PEM certificate, lower-case hex, as `issuer_fingerprint` takes it.
pub fn fingerprint(pem: &str) -> String {
    let cert = x509_cert::Certificate::from_pem(pem).expect("PEM certificate");
    let der = cert.to_der().expect("DER");
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A CRL of `issuer` revoking `serials` (CRL number `number`): (PEM, DER).
pub fn crl(
    issuer: &Issuer<'_, KeyPair>,
    number: u64,
    serials: &[SerialNumber],
) -> (String, Vec<u8>) {
    let params = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2025, 6, 1),
        next_update: rcgen::date_time_ymd(2035, 12, 31),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: s.clone(),
                revocation_time: rcgen::date_time_ymd(2025, 6, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(issuer).expect("CRL");
    (crl.pem().expect("PEM"), crl.der().to_vec())
}
