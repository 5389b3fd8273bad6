//! Who is calling: verified client certificate -> identity -> role.
//!
//! The TLS layer has already checked the chain against the configured client CA (a
//! connection without such a certificate never reaches a handler). Here the leaf is
//! mapped to a role by the config's `[[client]]` table. The role never comes from a
//! request field.

use std::collections::HashMap;
use std::sync::Mutex;

use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

use std::sync::Arc;

use crate::audit::log::AuditLog;
use crate::audit::Actor;
use crate::common::hex;
use crate::config::ClientRule;
use crate::error::Error;

pub mod gate;

pub use gate::RoleGateLayer;
// The role names are configuration vocabulary too, so they live in the leaf `common`.
pub use crate::common::Role;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Subject common name of the client certificate (empty when it has none).
    pub subject: String,
    /// SHA-256 of the certificate DER, lower-case hex.
    pub fingerprint: String,
    /// The role the certificate maps to.
    pub role: Role,
    /// Signing keys the caller may use (`signing_keys` of its rule; `None`: the default).
    pub signing_keys: Option<Vec<String>>,
    /// `acr` values the caller may assert (`acr` of its rule; `None`: all configured).
    pub acr: Option<Vec<String>>,
    /// The tenant whose credentials and evidence the caller sees (its rule's `tenant`,
    /// default the rule's cn or uri). From the verified certificate's rule only.
    pub tenant: String,
    /// Whether its rule allows assertions without evidence (`unbound_assertions`).
    pub unbound_assertions: bool,
    /// The rule that matched, for messages (e.g. `[[client]] cn = "login-service"`).
    pub rule: String,
}

/// Maps certificates to identities, with a small cache so that the DER is parsed once
/// per client certificate rather than once per call.
pub struct Authorizer {
    rules: Vec<ClientRule>,
    /// The client CA certificates (DER) by SHA-256 fingerprint (lower-case hex), for
    /// the rules' `issuer_fingerprint`.
    issuers: HashMap<String, Vec<u8>>,
    audit: Option<Arc<AuditLog>>,
    cache: Mutex<HashMap<[u8; 32], Result<Identity, String>>>,
}

/// Distinct client certificates remembered; beyond it the cache starts over.
const CACHE_LIMIT: usize = 4096;

impl Authorizer {
    /// An authorizer for the config's client table.
    pub fn new(rules: Vec<ClientRule>) -> Authorizer {
        Authorizer {
            rules,
            issuers: HashMap::new(),
            audit: None,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The client CA certificates (DER) that `issuer_fingerprint` may name. A rule whose
    /// fingerprint names none of them is refused here, with the rule's index.
    pub fn with_client_cas(mut self, cas: &[Vec<u8>]) -> Result<Authorizer, String> {
        self.issuers = cas
            .iter()
            .map(|der| (fingerprint(der), der.clone()))
            .collect();
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(fp) = &rule.issuer_fingerprint {
                if !self.issuers.contains_key(&fp.to_ascii_lowercase()) {
                    return Err(format!(
                        "client[{i}].issuer_fingerprint {fp} is not the SHA-256 of a certificate in server.client_ca"
                    ));
                }
            }
        }
        Ok(self)
    }

    /// Whether the CA certificate with fingerprint `fp` issued `leaf` itself: the leaf
    /// verifies with that certificate as its only trust anchor and no intermediates.
    fn issued_by(&self, leaf: &[u8], fp: &str) -> bool {
        let Some(ca) = self.issuers.get(&fp.to_ascii_lowercase()) else {
            return false;
        };
        let ca = rustls::pki_types::CertificateDer::from(ca.as_slice());
        let leaf = rustls::pki_types::CertificateDer::from(leaf);
        let (Ok(anchor), Ok(end_entity)) = (
            webpki::anchor_from_trusted_cert(&ca),
            webpki::EndEntityCert::try_from(&leaf),
        ) else {
            return false;
        };
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[anchor],
                &[],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .is_ok()
    }

    /// Record every refused call in `log`.
    pub fn with_audit(mut self, log: Arc<AuditLog>) -> Authorizer {
        self.audit = Some(log);
        self
    }

    /// Record a refused call: counted in the audit log's current window and written
    /// with the other refusals of that window, one record per caller (fingerprint) and
    /// reason with a count (see [`crate::audit::denied`]), so a flood of refused calls
    /// costs no write per call and cannot crowd verifications off the commit path.
    /// Every place that refuses a caller reports here (handlers through [`authorize`],
    /// and any layer that refuses before a handler runs).
    pub fn record_denied(&self, subject: &str, fingerprint: &str, method: &str, why: &str) {
        if let Some(log) = &self.audit {
            log.denied(subject, fingerprint, method, why);
        }
    }

    /// The identity of the leaf certificate `der`, or PERMISSION_DENIED when no rule
    /// maps it to a role.
    pub fn identify(&self, der: &[u8]) -> Result<Identity, Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache.get(&key) {
            return hit.clone().map_err(Error::PermissionDenied);
        }
        let outcome = self.map(der, &key);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, outcome.clone());
        outcome.map_err(Error::PermissionDenied)
    }

    fn map(&self, der: &[u8], fingerprint: &[u8; 32]) -> Result<Identity, String> {
        let cert =
            Certificate::from_der(der).map_err(|_| "unparsable client certificate".to_owned())?;
        let tbs = cert.tbs_certificate();
        let subject = tbs
            .subject()
            .common_name()
            .ok()
            .flatten()
            .map(String::from)
            .unwrap_or_default();
        let uris: Vec<String> = match tbs.get_extension::<SubjectAltName>() {
            Ok(Some((_, san))) => san
                .0
                .into_iter()
                .filter_map(|n| match n {
                    GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let rule = self.rules.iter().find(|r| {
            let named = match (&r.cn, &r.uri) {
                (Some(cn), _) => !subject.is_empty() && *cn == subject,
                (None, Some(uri)) => uris.iter().any(|u| u == uri),
                (None, None) => false,
            };
            named
                && r.issuer_fingerprint
                    .as_deref()
                    .is_none_or(|fp| self.issued_by(der, fp))
        });
        match rule {
            Some(rule) => Ok(Identity {
                subject,
                fingerprint: hex(fingerprint),
                role: rule.role,
                signing_keys: rule.signing_keys.clone(),
                acr: rule.acr.clone(),
                tenant: rule.tenant().to_owned(),
                unbound_assertions: rule.unbound_assertions,
                rule: rule.describe(),
            }),
            None => Err(format!(
                "client certificate {subject:?} is not mapped to a role"
            )),
        }
    }
}

/// The caller of `request`, required to hold one of `allowed`. Refusals are recorded in
/// the audit trail with the method and the certificate's subject and fingerprint.
pub fn authorize<T>(
    authorizer: &Authorizer,
    request: &tonic::Request<T>,
    allowed: &[Role],
) -> Result<Identity, Error> {
    // The role gate has mapped the certificate already: only the handler's (possibly
    // narrower) role check is left, without a second fingerprint and cache lookup.
    if let Some(gated) = request.extensions().get::<GatedCaller>() {
        return require_role(authorizer, gated.identity.clone(), gated.method, allowed);
    }
    let method = request
        .extensions()
        .get::<tonic::GrpcMethod>()
        .map(|m| format!("{}/{}", m.service(), m.method()))
        .unwrap_or_default();
    let leaf = request.peer_certs().and_then(|c| c.first().cloned());
    check(
        authorizer,
        leaf.as_ref().map(|c| c.as_ref()),
        &method,
        allowed,
    )
}

/// The caller with leaf certificate `leaf`, required to hold one of `allowed` to call
/// `method` (`service/method`); the one place that decides and records refusals, used by
/// [`authorize`] in the handlers and by [`gate`] before a request body is read.
pub(crate) fn check(
    authorizer: &Authorizer,
    leaf: Option<&[u8]>,
    method: &str,
    allowed: &[Role],
) -> Result<Identity, Error> {
    let Some(leaf) = leaf else {
        authorizer.record_denied("", "", method, "no client certificate");
        return Err(Error::PermissionDenied("no client certificate".into()));
    };
    let identity = match authorizer.identify(leaf) {
        Ok(identity) => identity,
        Err(e) => {
            let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, leaf).as_ref());
            authorizer.record_denied("", &fingerprint, method, "certificate not mapped to a role");
            return Err(e);
        }
    };
    require_role(authorizer, identity, method, allowed)
}

/// What the role gate established for a request it let through: the caller and the
/// method (`service/method`), carried to the handler in the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct GatedCaller {
    pub(crate) identity: Identity,
    pub(crate) method: &'static str,
}

/// `identity` if its role is one of `allowed`, else PERMISSION_DENIED, recorded.
fn require_role(
    authorizer: &Authorizer,
    identity: Identity,
    method: &str,
    allowed: &[Role],
) -> Result<Identity, Error> {
    if allowed.contains(&identity.role) {
        Ok(identity)
    } else {
        tracing::warn!(
            subject = %identity.subject,
            role = identity.role.as_str(),
            method,
            "caller's role lacks the permission"
        );
        authorizer.record_denied(
            &identity.subject,
            &identity.fingerprint,
            method,
            identity.role.as_str(),
        );
        Err(Error::PermissionDenied(format!(
            "role {} may not call this method",
            identity.role.as_str()
        )))
    }
}

/// SHA-256 of `der`, lower-case hex, as fingerprints are written in the config.
fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

impl Identity {
    /// The audit actor for this caller.
    pub fn actor(&self) -> Actor {
        Actor::new(&self.subject, &self.fingerprint)
    }
}
