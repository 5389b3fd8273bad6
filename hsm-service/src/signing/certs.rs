//! Certificates and CSRs for key versions (driven by ceremonies and officers).

use std::str::FromStr;

use super::signer::{invalid, KeyRef, Signer};
use super::versions::KeyVersion;
use crate::error::{Error, Result};
use crate::pki::{self, CertificateParams, IssuerCertificate, IssuerRef, KeyUsage, Name};

/// Longest certificate validity the service issues, in days.
const MAX_VALIDITY_DAYS: u32 = 20 * 366;

/// What a certificate made by the service says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRequest {
    /// Subject DN, RFC 4514 (e.g. `CN=Assertions,O=Example,C=DK`).
    pub subject: String,
    /// Validity from now, in days.
    pub validity_days: u32,
    /// A CA certificate (keyCertSign, cRLSign) rather than a signing one.
    pub is_ca: bool,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
}

impl Signer {
    /// A PKCS#10 request for `key`, signed by it (DER).
    pub async fn create_csr(&self, key: &KeyRef, subject: &str) -> Result<Vec<u8>> {
        let k = self.usable(key)?;
        let tbs = pki::csr_to_sign(subject, &k.public_key()?, k.algorithm)?;
        let signature = self.hsm_sign(&k, tbs.bytes()).await?;
        Ok(tbs.assemble(&signature)?)
    }

    async fn serial(&self) -> Result<Vec<u8>> {
        let mut serial = self.hsm.random(16).await?.to_vec();
        // Positive and never zero, whatever the RNG gave.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        Ok(serial)
    }

    fn params(&self, req: &CertificateRequest, serial: Vec<u8>) -> Result<CertificateParams> {
        if req.validity_days == 0 || req.validity_days > MAX_VALIDITY_DAYS {
            return Err(invalid(format!(
                "validity_days must be between 1 and {MAX_VALIDITY_DAYS}"
            )));
        }
        let t = self.clock.now();
        Ok(CertificateParams {
            subject: req.subject.clone(),
            serial,
            not_before: t.saturating_sub(300),
            not_after: t + u64::from(req.validity_days) * 86_400,
            is_ca: req.is_ca,
            path_len: None,
            key_usage: if req.is_ca {
                KeyUsage::CA
            } else {
                KeyUsage::SIGNING
            },
            dns_names: req.dns_names.clone(),
        })
    }

    async fn store_chain(&self, k: &KeyVersion, chain: Vec<Vec<u8>>) -> Result<()> {
        let _w = self.writes.lock().await;
        let mut k = self.get(&KeyRef::new(k.name.clone(), k.version))?;
        k.certificate_chain = chain;
        self.put(vec![k]).await
    }

    /// A self-signed certificate for `key` (DER), stored as its chain.
    pub async fn self_sign(&self, key: &KeyRef, req: &CertificateRequest) -> Result<Vec<u8>> {
        let k = self.usable(key)?;
        let params = self.params(req, self.serial().await?)?;
        let pk = k.public_key()?;
        let name = Name::from_str(&req.subject)?;
        let tbs = pki::certificate_to_sign(&params, &pk, IssuerRef::new(&name, &pk, k.algorithm))?;
        let signature = self.hsm_sign(&k, tbs.bytes()).await?;
        let cert = tbs.assemble(&signature)?;
        self.store_chain(&k, vec![cert.clone()]).await?;
        Ok(cert)
    }

    /// A certificate for `key` issued by `issuer`, a key whose stored chain starts with
    /// a CA certificate. Stores and returns the chain, leaf first.
    pub async fn issue_certificate(
        &self,
        key: &KeyRef,
        issuer: &KeyRef,
        req: &CertificateRequest,
    ) -> Result<Vec<Vec<u8>>> {
        let k = self.usable(key)?;
        let ca = self.usable(issuer)?;
        let Some(ca_cert) = ca.certificate_chain.first() else {
            return Err(Error::FailedPrecondition(format!(
                "issuer {} v{} has no certificate; self-sign it or import its chain first",
                ca.name, ca.version
            )));
        };
        let ca_info = IssuerCertificate::from_der(ca_cert).map_err(|e| {
            Error::FailedPrecondition(format!(
                "issuer {} v{} cannot issue: {e}",
                ca.name, ca.version
            ))
        })?;
        if ca_info.public_key != ca.public_key()? {
            return Err(Error::FailedPrecondition(format!(
                "the certificate stored for {} v{} is not for its key",
                ca.name, ca.version
            )));
        }
        let params = self.params(req, self.serial().await?)?;
        let tbs = pki::certificate_to_sign(&params, &k.public_key()?, ca_info.issuer_ref())?;
        let signature = self.hsm_sign(&ca, tbs.bytes()).await?;
        let leaf = tbs.assemble(&signature)?;
        let mut chain = vec![leaf];
        chain.extend(ca.certificate_chain.iter().cloned());
        self.store_chain(&k, chain.clone()).await?;
        Ok(chain)
    }

    /// The certificate chain stored for `key` (DER, leaf first; empty when none).
    pub fn certificate_chain(&self, key: &KeyRef) -> Result<Vec<Vec<u8>>> {
        Ok(self.get(key)?.certificate_chain)
    }
}
