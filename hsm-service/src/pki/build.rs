//! Building to-be-signed structures and assembling them once signed.

use std::{str::FromStr, time::Duration};

use der::{
    asn1::{AnyRef, BitStringRef, Ia5String, ObjectIdentifier, OctetString},
    flagset::FlagSet,
    oid::AssociatedOid,
    DateTime, Decode, Encode, Sequence,
};
use x509_cert::{
    certificate::Certificate,
    ext::{
        pkix::{
            name::GeneralName, AuthorityKeyIdentifier, BasicConstraints, KeyUsage as X509KeyUsage,
            KeyUsages, SubjectAltName, SubjectKeyIdentifier,
        },
        Extension,
    },
    request::{CertReqInfo, Version as CsrVersion},
    serial_number::SerialNumber,
    spki::{AlgorithmIdentifierOwned, AlgorithmIdentifierRef, SubjectPublicKeyInfoOwned},
    time::{Time, Validity},
};

use super::{Name, PkiError};
use crate::common::{ecdsa_raw_to_der, Algorithm, PublicKey};

const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const ID_RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");

/// RFC 4055 `RSASSA-PSS-params` for PS256: hashAlgorithm [0] sha256,
/// maskGenAlgorithm [1] mgf1(sha256), saltLength [2] 32, trailerField
/// omitted (DEFAULT 1). The hash AlgorithmIdentifiers carry explicit NULL
/// parameters, as RFC 4055 §2.1 asks and OpenSSL emits.
const PSS_SHA256_PARAMS: &[u8] = &[
    0x30, 0x34, // SEQUENCE
    0xa0, 0x0f, 0x30, 0x0d, // [0] AlgorithmIdentifier
    0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, // sha256, NULL
    0xa1, 0x1c, 0x30, 0x1a, // [1] AlgorithmIdentifier
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08, // id-mgf1
    0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, // sha256, NULL
    0xa2, 0x03, 0x02, 0x01, 0x20, // [2] INTEGER 32
];

/// Key usages to assert (the KeyUsage extension is always critical).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct KeyUsage {
    /// Signing assertions, TLS, etc.
    pub digital_signature: bool,
    /// Signing certificates; requires `is_ca`.
    pub key_cert_sign: bool,
    /// Signing CRLs.
    pub crl_sign: bool,
}

impl KeyUsage {
    /// For CA certificates: keyCertSign and cRLSign.
    pub const CA: Self = Self {
        digital_signature: false,
        key_cert_sign: true,
        crl_sign: true,
    };
    /// For signing end-entity certificates: digitalSignature.
    pub const SIGNING: Self = Self {
        digital_signature: true,
        key_cert_sign: false,
        crl_sign: false,
    };
}

/// What goes into a certificate besides the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateParams {
    /// Subject DN, RFC 4514 style (see [`Name`]).
    pub subject: String,
    /// Serial number as an unsigned big-endian integer, e.g. 16 random bytes
    /// from the HSM RNG. Encoded as a positive INTEGER (a zero byte is
    /// prepended when the top bit is set), which must fit in 20 bytes.
    pub serial: Vec<u8>,
    /// Start of validity, Unix seconds.
    pub not_before: u64,
    /// End of validity, Unix seconds; must be after `not_before`.
    pub not_after: u64,
    /// BasicConstraints cA.
    pub is_ca: bool,
    /// BasicConstraints pathLenConstraint; only for CAs.
    pub path_len: Option<u8>,
    /// KeyUsage bits.
    pub key_usage: KeyUsage,
    /// DNS names for a SubjectAltName extension (none when empty).
    pub dns_names: Vec<String>,
}

/// The signer of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct IssuerRef<'a> {
    /// Issuer DN; must equal the issuer certificate's subject (for a
    /// self-signed certificate, parse the same subject string).
    pub name: &'a Name,
    /// Issuer public key (for a self-signed certificate the subject key).
    pub public_key: &'a PublicKey,
    /// Algorithm the issuer key signs with; must fit `public_key`.
    pub alg: Algorithm,
    /// AuthorityKeyIdentifier to use; `None` derives it from `public_key`
    /// the way this module derives SubjectKeyIdentifiers. Set it to the
    /// issuer certificate's SKI when the issuer was made elsewhere.
    pub key_identifier: Option<&'a [u8]>,
}

impl<'a> IssuerRef<'a> {
    /// An issuer whose key identifier is derived from its key.
    pub fn new(name: &'a Name, public_key: &'a PublicKey, alg: Algorithm) -> Self {
        Self {
            name,
            public_key,
            alg,
            key_identifier: None,
        }
    }
}

/// What a CA certificate says about itself, for issuing under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerCertificate {
    /// The certificate's subject, i.e. the issuer name of what it signs.
    pub name: Name,
    /// The certificate's public key.
    pub public_key: PublicKey,
    /// Its SubjectKeyIdentifier, if it has one.
    pub key_identifier: Option<Vec<u8>>,
}

impl IssuerCertificate {
    /// Reads a DER CA certificate; fails unless BasicConstraints says cA.
    pub fn from_der(cert_der: &[u8]) -> Result<Self, PkiError> {
        let cert = Certificate::from_der(cert_der)?;
        let tbs = cert.tbs_certificate();
        match tbs.get_extension::<BasicConstraints>()? {
            Some((_, bc)) if bc.ca => {}
            _ => {
                return Err(PkiError::InvalidArgument(
                    "issuer certificate is not a CA certificate".into(),
                ))
            }
        }
        let public_key = PublicKey::from_spki_der(&tbs.subject_public_key_info().to_der()?)?;
        let key_identifier = tbs
            .get_extension::<SubjectKeyIdentifier>()?
            .map(|(_, ski)| ski.0.as_bytes().to_vec());
        Ok(Self {
            name: Name(tbs.subject().clone()),
            public_key,
            key_identifier,
        })
    }

    /// An [`IssuerRef`] signing with the key's algorithm.
    pub fn issuer_ref(&self) -> IssuerRef<'_> {
        IssuerRef {
            name: &self.name,
            public_key: &self.public_key,
            alg: self.public_key.algorithm(),
            key_identifier: self.key_identifier.as_deref(),
        }
    }
}

/// DER waiting for the HSM's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToBeSigned {
    tbs: Vec<u8>,
    alg: Algorithm,
    signature_len: usize,
}

impl ToBeSigned {
    /// The DER to sign (for EdDSA, the message to pass to the HSM).
    pub fn bytes(&self) -> &[u8] {
        &self.tbs
    }

    /// The digest to give the HSM; `None` for EdDSA.
    pub fn digest(&self) -> Option<Vec<u8>> {
        self.alg.digest(&self.tbs)
    }

    /// The algorithm the signature must be made with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The signed DER structure, given the signature as the HSM returns it:
    /// raw `r || s` for ECDSA (converted to DER here), the plain signature
    /// for Ed25519 and RSA-PSS. Its length is checked against the signer key.
    pub fn assemble(self, signature: &[u8]) -> Result<Vec<u8>, PkiError> {
        if signature.len() != self.signature_len {
            return Err(PkiError::InvalidSignature(format!(
                "{} signature must be {} bytes, got {}",
                self.alg,
                self.signature_len,
                signature.len()
            )));
        }
        let der_sig;
        let signature = match self.alg {
            Algorithm::Es256 | Algorithm::Es384 => {
                der_sig = ecdsa_raw_to_der(signature)?;
                &der_sig[..]
            }
            Algorithm::EdDsa | Algorithm::Ps256 => signature,
        };
        // Certificate and CertificationRequest share this outer shape.
        Ok(Signed {
            tbs: AnyRef::from_der(&self.tbs)?,
            algorithm: signature_algorithm(self.alg)?,
            signature: BitStringRef::from_bytes(signature)?,
        }
        .to_der()?)
    }
}

/// `SEQUENCE { toBeSigned, signatureAlgorithm, signature BIT STRING }`.
#[derive(Sequence)]
struct Signed<'a> {
    tbs: AnyRef<'a>,
    algorithm: AlgorithmIdentifierOwned,
    signature: BitStringRef<'a>,
}

/// RFC 5280 TBSCertificate, always v3 and without unique identifiers.
#[derive(Sequence)]
struct TbsCertificate {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    version: u8,
    serial_number: SerialNumber,
    signature: AlgorithmIdentifierOwned,
    issuer: x509_cert::name::Name,
    validity: Validity,
    subject: x509_cert::name::Name,
    subject_public_key_info: SubjectPublicKeyInfoOwned,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT")]
    extensions: Vec<Extension>,
}

const X509_V3: u8 = 2;

/// A PKCS#10 request for `subject`, to be signed with `subject_pk`'s private
/// key (proof of possession), which must use `alg`.
pub fn csr_to_sign(
    subject: &str,
    subject_pk: &PublicKey,
    alg: Algorithm,
) -> Result<ToBeSigned, PkiError> {
    check_alg(subject_pk, alg)?;
    let info = CertReqInfo {
        version: CsrVersion::V1,
        subject: Name::from_str(subject)?.0,
        public_key: subject_pk.spki()?,
        attributes: Default::default(),
    };
    Ok(ToBeSigned {
        tbs: info.to_der()?,
        alg,
        signature_len: subject_pk.signature_len(),
    })
}

/// A v3 certificate for `subject_pk`, to be signed by `issuer`.
///
/// Carries BasicConstraints and KeyUsage (both critical), SubjectKeyIdentifier
/// (SHA-1 of the key bits, RFC 5280 §4.2.1.2 method 1, what OpenSSL
/// computes), AuthorityKeyIdentifier and, with `dns_names`, SubjectAltName.
pub fn certificate_to_sign(
    params: &CertificateParams,
    subject_pk: &PublicKey,
    issuer: IssuerRef,
) -> Result<ToBeSigned, PkiError> {
    check_alg(issuer.public_key, issuer.alg)?;
    let invalid = |m: &str| Err(PkiError::InvalidArgument(m.into()));
    if params.serial.iter().all(|&b| b == 0) {
        return invalid("serial must be a positive number");
    }
    if params.not_after <= params.not_before {
        return invalid("not_after must be later than not_before");
    }
    let ku = params.key_usage;
    if !(ku.digital_signature || ku.key_cert_sign || ku.crl_sign) {
        return invalid("key_usage must set at least one usage");
    }
    if !params.is_ca && (ku.key_cert_sign || params.path_len.is_some()) {
        return invalid("key_cert_sign and path_len need is_ca (RFC 5280 §4.2.1.9)");
    }

    let spki = subject_pk.spki()?;
    let ski = key_id(&spki);
    let aki = match issuer.key_identifier {
        Some(id) => id.to_vec(),
        None => key_id(&issuer.public_key.spki()?),
    };
    let mut usages = FlagSet::<KeyUsages>::default();
    for (set, usage) in [
        (ku.digital_signature, KeyUsages::DigitalSignature),
        (ku.key_cert_sign, KeyUsages::KeyCertSign),
        (ku.crl_sign, KeyUsages::CRLSign),
    ] {
        if set {
            usages |= usage;
        }
    }
    let mut extensions = vec![
        extension(
            true,
            &BasicConstraints {
                ca: params.is_ca,
                path_len_constraint: params.path_len,
            },
        )?,
        extension(true, &X509KeyUsage(usages))?,
        extension(false, &SubjectKeyIdentifier(OctetString::new(ski)?))?,
        extension(
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(aki)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?,
    ];
    if !params.dns_names.is_empty() {
        let names = params
            .dns_names
            .iter()
            .map(|d| match Ia5String::new(d) {
                Ok(s) if !d.is_empty() => Ok(GeneralName::DnsName(s)),
                _ => Err(PkiError::InvalidArgument(format!("invalid DNS name {d:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Non-critical: the subject DN is never empty here (RFC 5280 §4.2.1.6).
        extensions.push(extension(false, &SubjectAltName(names))?);
    }

    let tbs = TbsCertificate {
        version: X509_V3,
        serial_number: SerialNumber::new(&params.serial)
            .map_err(|e| PkiError::InvalidArgument(format!("serial: {e} (max 20 bytes)")))?,
        signature: signature_algorithm(issuer.alg)?,
        issuer: issuer.name.0.clone(),
        validity: Validity::new(time(params.not_before)?, time(params.not_after)?),
        subject: Name::from_str(&params.subject)?.0,
        subject_public_key_info: spki,
        extensions,
    };
    Ok(ToBeSigned {
        tbs: tbs.to_der()?,
        alg: issuer.alg,
        signature_len: issuer.public_key.signature_len(),
    })
}

fn check_alg(pk: &PublicKey, alg: Algorithm) -> Result<(), PkiError> {
    if pk.algorithm() == alg {
        Ok(())
    } else {
        Err(PkiError::InvalidArgument(format!(
            "algorithm {alg} does not fit a {} key",
            pk.algorithm()
        )))
    }
}

fn signature_algorithm(alg: Algorithm) -> Result<AlgorithmIdentifierOwned, PkiError> {
    // ECDSA and Ed25519 identifiers have absent parameters (RFC 5758, RFC 8410).
    let (oid, parameters) = match alg {
        Algorithm::Es256 => (ECDSA_WITH_SHA256, None),
        Algorithm::Es384 => (ECDSA_WITH_SHA384, None),
        Algorithm::EdDsa => (ID_ED25519, None),
        Algorithm::Ps256 => (ID_RSASSA_PSS, Some(AnyRef::from_der(PSS_SHA256_PARAMS)?)),
    };
    Ok(AlgorithmIdentifierRef { oid, parameters }.into())
}

/// SHA-1 of the subjectPublicKey BIT STRING contents (RFC 5280 §4.2.1.2 (1)).
fn key_id(spki: &SubjectPublicKeyInfoOwned) -> Vec<u8> {
    let bits = spki.subject_public_key.raw_bytes();
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, bits)
        .as_ref()
        .to_vec()
}

fn extension<T: AssociatedOid + Encode>(critical: bool, value: &T) -> Result<Extension, PkiError> {
    Ok(Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

/// UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 §4.1.2.5).
fn time(unix: u64) -> Result<Time, PkiError> {
    let dt = DateTime::from_unix_duration(Duration::from_secs(unix))
        .map_err(|e| PkiError::InvalidArgument(format!("time {unix} out of range: {e}")))?;
    Ok(Time::from(dt))
}
