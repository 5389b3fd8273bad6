//! Certificates and CSRs for key versions (driven by ceremonies and officers).

use std::str::FromStr;

use super::signer::{invalid, store_err, KeyRef, Signer};
use super::versions::{self, KeyVersion, Usage};
use crate::audit::log::append_in;
use crate::audit::{Actor, Details};
use crate::common::hex;
use crate::error::{Error, Result};
use crate::pki::{self, CertificateParams, IssuerCertificate, IssuerRef, KeyUsage, Name};

/// Audit action of an issued certificate (object: the certified key version).
pub const CERTIFICATE_ACTION: &str = "certificate.issue";

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

/// On whose authority a certificate is made. A `ca` key signs only inside an executed
/// key ceremony; an officer's direct request may certify the other keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issuance {
    /// A direct KeyService request by this officer.
    Officer(Actor),
    /// A step of the executed ceremony `id`, run by `actor`.
    Ceremony {
        /// The ceremony id.
        id: String,
        /// The officer who executes it.
        actor: Actor,
    },
}

impl Issuance {
    fn actor(&self) -> &Actor {
        match self {
            Issuance::Officer(a) | Issuance::Ceremony { actor: a, .. } => a,
        }
    }

    fn ceremony(&self) -> &str {
        match self {
            Issuance::Officer(_) => "",
            Issuance::Ceremony { id, .. } => id,
        }
    }

    /// Refuse a `ca` key outside a ceremony.
    fn allows(&self, k: &KeyVersion) -> Result<()> {
        if k.usage == Usage::Ca && matches!(self, Issuance::Officer(_)) {
            return Err(Error::PermissionDenied(format!(
                "{} v{} is a ca key: it signs certificates only inside an executed ceremony; \
                 use a key ceremony",
                k.name, k.version
            )));
        }
        Ok(())
    }
}

/// A CA certificate is for a `ca` key, and a `ca` key gets CA certificates only.
fn check_kind(k: &KeyVersion, req: &CertificateRequest) -> Result<()> {
    if req.is_ca != (k.usage == Usage::Ca) {
        return Err(Error::FailedPrecondition(format!(
            "{} v{} is a {} key: {}",
            k.name,
            k.version,
            k.usage,
            if req.is_ca {
                "only ca keys get CA certificates"
            } else {
                "a ca key gets CA certificates only"
            }
        )));
    }
    Ok(())
}

impl Signer {
    /// A PKCS#10 request for `key`, signed by it (DER).
    pub async fn create_csr(&self, key: &KeyRef, subject: &str) -> Result<Vec<u8>> {
        let k = self.looked_up(|s| s.usable(key)).await?;
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

    /// Store `chain` for `k` and the audit record of its leaf (serial, subject, issuer
    /// kid) in one transaction.
    async fn store_chain(
        &self,
        k: &KeyVersion,
        chain: Vec<Vec<u8>>,
        issuer: &KeyVersion,
        req: &CertificateRequest,
        serial: &[u8],
        by: &Issuance,
    ) -> Result<()> {
        let _w = self.writes.lock().await;
        let mut k = self.get(&KeyRef::new(k.name.clone(), k.version))?;
        k.certificate_chain = chain;
        let event = self
            .event(
                by.actor(),
                CERTIFICATE_ACTION,
                &format!("{}/v{}", k.name, k.version),
            )
            .with_details(
                Details::new()
                    .str("serial", &hex(serial))
                    .str("subject", &req.subject)
                    .bool("ca", req.is_ca)
                    .str("kid", &k.kid)
                    .str("issuer_kid", &issuer.kid)
                    .str("issuer", &format!("{}/v{}", issuer.name, issuer.version))
                    .str("ceremony", by.ceremony()),
            );
        let before = self.get(&KeyRef::new(k.name.clone(), k.version))?;
        let change = [(Some(before), k.clone())];
        let chain = self.audit.chain();
        let written = self
            .store
            .write(move |txn| {
                if let Err(changed) = versions::put_unchanged(txn, &change)? {
                    return Ok(Err(changed));
                }
                append_in(txn, &chain, event)?;
                Ok(Ok(()))
            })
            .await
            .map_err(store_err)?;
        if let Err(changed) = written {
            if let Err(e) = self.refresh_locked().await {
                tracing::warn!(error = %e, "signing keys: reload after a conflict failed");
            }
            return Err(Error::FailedPrecondition(format!(
                "{changed} was changed by another instance of the service; look again and retry"
            )));
        }
        self.audit.appended(1);
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.insert((k.name.clone(), k.version), k);
        Ok(())
    }

    /// A self-signed certificate for `key` (DER), stored as its chain. A `ca` key only
    /// in a ceremony (PERMISSION_DENIED "use a key ceremony" otherwise).
    pub async fn self_sign(
        &self,
        key: &KeyRef,
        req: &CertificateRequest,
        by: &Issuance,
    ) -> Result<Vec<u8>> {
        let k = self.looked_up(|s| s.usable(key)).await?;
        by.allows(&k)?;
        check_kind(&k, req)?;
        let serial = self.serial().await?;
        let params = self.params(req, serial.clone())?;
        let pk = k.public_key()?;
        let name = Name::from_str(&req.subject)?;
        let tbs = pki::certificate_to_sign(&params, &pk, IssuerRef::new(&name, &pk, k.algorithm))?;
        let signature = self.hsm_sign(&k, tbs.bytes()).await?;
        let cert = tbs.assemble(&signature)?;
        self.store_chain(&k, vec![cert.clone()], &k, req, &serial, by)
            .await?;
        Ok(cert)
    }

    /// A certificate for `key` issued by `issuer`, a `ca` key whose stored chain starts
    /// with a CA certificate; only inside a ceremony (PERMISSION_DENIED otherwise).
    /// Stores and returns the chain, leaf first.
    pub async fn issue_certificate(
        &self,
        key: &KeyRef,
        issuer: &KeyRef,
        req: &CertificateRequest,
        by: &Issuance,
    ) -> Result<Vec<Vec<u8>>> {
        let k = self.looked_up(|s| s.usable(key)).await?;
        let ca = self.looked_up(|s| s.usable(issuer)).await?;
        if ca.usage != Usage::Ca {
            return Err(Error::PermissionDenied(format!(
                "issuer {} v{} is a {} key; only ca keys issue certificates",
                ca.name, ca.version, ca.usage
            )));
        }
        by.allows(&ca)?;
        by.allows(&k)?;
        check_kind(&k, req)?;
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
        let serial = self.serial().await?;
        let params = self.params(req, serial.clone())?;
        let tbs = pki::certificate_to_sign(&params, &k.public_key()?, ca_info.issuer_ref())?;
        let signature = self.hsm_sign(&ca, tbs.bytes()).await?;
        let leaf = tbs.assemble(&signature)?;
        let mut chain = vec![leaf];
        chain.extend(ca.certificate_chain.iter().cloned());
        self.store_chain(&k, chain.clone(), &ca, req, &serial, by)
            .await?;
        Ok(chain)
    }

    /// The certificate chain stored for `key` (DER, leaf first; empty when none).
    pub fn certificate_chain(&self, key: &KeyRef) -> Result<Vec<Vec<u8>>> {
        Ok(self.get(key)?.certificate_chain)
    }
}
