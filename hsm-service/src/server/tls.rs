//! The server's rustls configuration: its certificate, the client CAs and their
//! revocation lists. Built here rather than by tonic so that client certificates are
//! checked against CRLs, and so that the CRLs can be replaced while serving (SIGHUP).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::StartError;
use crate::config::Config;

/// The TLS files of the config, read and checked once at start.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

/// The current server TLS configuration, and what it takes to rebuild it with new CRLs.
pub struct TlsConfigSource {
    material: Material,
    crl_paths: Vec<PathBuf>,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsConfigSource {
    /// Read the config's TLS files and CRLs; any problem is one line naming the file.
    pub fn load(config: &Config) -> Result<TlsConfigSource, StartError> {
        let material = Material::load(config)?;
        let crls = read_crls(&config.server.client_crls).map_err(StartError::Tls)?;
        let current = build(&material, crls).map_err(StartError::Tls)?;
        Ok(TlsConfigSource {
            material,
            crl_paths: config.server.client_crls.clone(),
            current: RwLock::new(Arc::new(current)),
        })
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-read the CRL files and use them for every later handshake. On any problem the
    /// previous set stays in force and the error says which file.
    pub fn reload_crls(&self) -> Result<usize, String> {
        let crls = read_crls(&self.crl_paths)?;
        let count = crls.len();
        let next = build(&self.material, crls)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(count)
    }

    /// The client CA certificates (DER), for issuer pinning.
    pub fn client_cas(config: &Config) -> Result<Vec<CertificateDer<'static>>, StartError> {
        read_client_cas(&config.server.client_ca)
    }
}

impl Material {
    fn load(config: &Config) -> Result<Material, StartError> {
        let s = &config.server;
        let cert_pem = read("server.cert", &s.cert)?;
        let key_pem = read("server.key", &s.key)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| StartError::Tls(format!("server.cert {}: {e}", s.cert.display())))?;
        if chain.is_empty() {
            return Err(StartError::Tls(format!(
                "server.cert {}: no certificate in the file",
                s.cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| StartError::Tls(format!("server.key {}: {e}", s.key.display())))?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| StartError::Tls(format!("server.key {}: {e}", s.key.display())))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|_| {
                StartError::Tls(format!(
                    "server.key {} does not match the certificate in server.cert {}",
                    s.key.display(),
                    s.cert.display()
                ))
            })?;
        let mut roots = RootCertStore::empty();
        for ca in read_client_cas(&s.client_ca)? {
            roots.add(ca).map_err(|e| {
                StartError::Tls(format!("server.client_ca {}: {e}", s.client_ca.display()))
            })?;
        }
        Ok(Material {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|e| StartError::Tls(format!("{what} {}: {e}", path.display())))
}

fn read_client_cas(path: &Path) -> Result<Vec<CertificateDer<'static>>, StartError> {
    let pem = read("server.client_ca", path)?;
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| StartError::Tls(format!("server.client_ca {}: {e}", path.display())))?;
    if cas.is_empty() {
        return Err(StartError::Tls(format!(
            "server.client_ca {}: no certificate in the file",
            path.display()
        )));
    }
    Ok(cas)
}

/// Every CRL of every file: PEM (one or more `X509 CRL` blocks) or a single DER CRL.
fn read_crls(paths: &[PathBuf]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let mut crls = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("server.client_crls {}: {e}", path.display()))?;
        let before = crls.len();
        if bytes.starts_with(b"-----") {
            for crl in CertificateRevocationListDer::pem_slice_iter(&bytes) {
                crls.push(crl.map_err(|e| format!("server.client_crls {}: {e}", path.display()))?);
            }
        } else {
            crls.push(CertificateRevocationListDer::from(bytes));
        }
        let added = &crls[before..];
        if added.is_empty() {
            return Err(format!(
                "server.client_crls {}: no CRL in the file",
                path.display()
            ));
        }
        // Parse here so the error names the file; the verifier parses them again.
        for crl in added {
            webpki::OwnedCertRevocationList::from_der(crl.as_ref())
                .map_err(|e| format!("server.client_crls {}: not a CRL: {e:?}", path.display()))?;
        }
    }
    Ok(crls)
}

/// A server config that requires a client certificate of one of the client CAs, not
/// revoked by any of `crls` (only the client's own certificate is looked up; with CRLs
/// configured, a certificate whose CA has no CRL in the set is refused).
fn build(
    material: &Material,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<ServerConfig, String> {
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(material.roots.clone(), provider());
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|e| format!("server certificate: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
