//! `hsm.v1.SigningService` and `hsm.v1.KeyService`: proto <-> [`crate::signing`].

use hsm_proto::v1::key_service_server::KeyService;
use hsm_proto::v1::signing_service_server::SigningService;
use hsm_proto::v1::{
    CertificateResponse, CreateCsrRequest, CreateCsrResponse, GetCertificateChainRequest,
    GetCertificateChainResponse, GetJwksRequest, GetJwksResponse, IssueCertificateRequest,
    KeyVersionInfo, ListKeysRequest, ListKeysResponse, SelfSignCertificateRequest,
    SignAssertionRequest, SignAssertionResponse, SignRequest, SignResponse,
    SignatureAlgorithm as PbAlgorithm, SignatureEncoding as PbEncoding,
};
use tonic::{Request, Response, Status};

use super::State;
use crate::auth::{authorize, Identity, Role};
use crate::common::hex;
use crate::error::Error;
use crate::signing::{
    Algorithm, AssertionRequest, Caller, CertificateRequest, Grant, Issuance, KeyRef, KeyVersion,
    SignInput, SignatureEncoding, Usage,
};

/// Every role may read public keys and certificates.
const ANYONE: [Role; 3] = [Role::LoginService, Role::Officer, Role::Auditor];

/// The signing handlers.
pub struct Signing {
    state: State,
}

impl Signing {
    /// A handler over the shared state.
    pub fn new(state: State) -> Signing {
        Signing { state }
    }
}

/// The officers' key handlers.
pub struct Keys {
    state: State,
}

impl Keys {
    /// A handler over the shared state.
    pub fn new(state: State) -> Keys {
        Keys { state }
    }
}

/// The signer's view of a caller: its grant (tenant included) and its audit actor.
fn caller(identity: Identity) -> Caller {
    Caller {
        actor: identity.actor(),
        grant: Grant {
            keys: identity.signing_keys,
            acr: identity.acr,
            tenant: identity.tenant,
            unbound_assertions: identity.unbound_assertions,
            rule: identity.rule,
        },
    }
}

/// `GetJwksRequest.usage`: empty is the assertion key set.
fn jwks_usage(usage: &str) -> Result<Usage, Error> {
    match usage {
        "" => Ok(Usage::Signing),
        u => u.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "usage {u:?} is not a key set (expected empty, \"signing\", \"raw\" or \"challenge\")"
            ))
        }),
    }
}

fn algorithm_from(value: i32) -> Result<Option<Algorithm>, Error> {
    match PbAlgorithm::try_from(value) {
        Ok(PbAlgorithm::Unspecified) => Ok(None),
        Ok(PbAlgorithm::Es256) => Ok(Some(Algorithm::Es256)),
        Ok(PbAlgorithm::Es384) => Ok(Some(Algorithm::Es384)),
        Ok(PbAlgorithm::Eddsa) => Ok(Some(Algorithm::EdDsa)),
        Ok(PbAlgorithm::Ps256) => Ok(Some(Algorithm::Ps256)),
        Err(_) => Err(Error::InvalidArgument(format!(
            "algorithm: unknown value {value}"
        ))),
    }
}

fn algorithm_to(alg: Algorithm) -> PbAlgorithm {
    match alg {
        Algorithm::Es256 => PbAlgorithm::Es256,
        Algorithm::Es384 => PbAlgorithm::Es384,
        Algorithm::EdDsa => PbAlgorithm::Eddsa,
        Algorithm::Ps256 => PbAlgorithm::Ps256,
    }
}

fn encoding_from(value: i32) -> Result<SignatureEncoding, Error> {
    match PbEncoding::try_from(value) {
        Ok(PbEncoding::Unspecified | PbEncoding::Raw) => Ok(SignatureEncoding::Raw),
        Ok(PbEncoding::Der) => Ok(SignatureEncoding::Der),
        Err(_) => Err(Error::InvalidArgument(format!(
            "encoding: unknown value {value}"
        ))),
    }
}

/// A key version named on the wire; an empty name is the default assertion key.
fn key_ref(state: &State, name: String, version: u32) -> KeyRef {
    let name = if name.is_empty() {
        state.signing.config().default_key.clone()
    } else {
        name
    };
    KeyRef::new(name, version)
}

#[tonic::async_trait]
impl SigningService for Signing {
    async fn sign_assertion(
        &self,
        request: Request<SignAssertionRequest>,
    ) -> Result<Response<SignAssertionResponse>, Status> {
        let identity = authorize(&self.state.authorizer, &request, &[Role::LoginService])?;
        let r = request.into_inner();
        let req = AssertionRequest {
            key: r.key,
            subject: r.subject,
            audience: r.audience,
            nonce: r.nonce,
            acr: r.acr,
            amr: r.amr,
            ttl_seconds: r.ttl_seconds,
            auth_time: r.auth_time,
            extra_claims_json: r.extra_claims_json,
            evidence_id: r.evidence_id,
        };
        let signed = self
            .state
            .signing
            .sign_assertion(&caller(identity), &req)
            .await?;
        Ok(Response::new(SignAssertionResponse {
            jws: signed.jws,
            kid: signed.kid,
            expires_at: signed.expires_at,
        }))
    }

    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let identity = authorize(&self.state.authorizer, &request, &[Role::LoginService])?;
        let r = request.into_inner();
        let input = match (r.message, r.digest) {
            (Some(m), None) => SignInput::Message(m),
            (None, Some(d)) => SignInput::Digest(d),
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "set exactly one of message and digest, not both".into(),
                )
                .into())
            }
            (None, None) => {
                return Err(
                    Error::InvalidArgument("set exactly one of message and digest".into()).into(),
                )
            }
        };
        let algorithm = algorithm_from(r.algorithm)?;
        let encoding = encoding_from(r.encoding)?;
        let sig = self
            .state
            .signing
            .sign_raw(&caller(identity), &r.key, algorithm, input, encoding)
            .await?;
        Ok(Response::new(SignResponse {
            signature: sig.signature,
            kid: sig.kid,
            algorithm: algorithm_to(sig.algorithm).into(),
            encoding: match sig.encoding {
                SignatureEncoding::Raw => PbEncoding::Raw,
                SignatureEncoding::Der => PbEncoding::Der,
            }
            .into(),
        }))
    }

    async fn get_jwks(
        &self,
        request: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        authorize(&self.state.authorizer, &request, &ANYONE)?;
        let usage = jwks_usage(&request.get_ref().usage)?;
        Ok(Response::new(GetJwksResponse {
            jwks_json: self.state.signing.jwks(usage)?,
        }))
    }

    async fn get_certificate_chain(
        &self,
        request: Request<GetCertificateChainRequest>,
    ) -> Result<Response<GetCertificateChainResponse>, Status> {
        authorize(&self.state.authorizer, &request, &ANYONE)?;
        let r = request.into_inner();
        let key = key_ref(&self.state, r.key, r.version);
        Ok(Response::new(GetCertificateChainResponse {
            certificates_der: self.state.signing.certificate_chain(&key)?,
        }))
    }
}

fn info(k: KeyVersion) -> KeyVersionInfo {
    KeyVersionInfo {
        public_key_sha256: crate::pki::sha256_fingerprint(&k.public_key_der),
        state: k.state.as_str().to_owned(),
        algorithm: k.algorithm.jws_name().to_owned(),
        key_id_hex: hex(&k.key_id),
        certificates: u32::try_from(k.certificate_chain.len()).unwrap_or(u32::MAX),
        name: k.name,
        version: k.version,
        kid: k.kid,
        public_key_der: k.public_key_der,
        created_at: k.created_at,
        published_at: k.published_at,
        activated_at: k.activated_at,
        retired_at: k.retired_at,
        destroyed_at: k.destroyed_at,
        last_expiry: k.last_expiry,
        ceremony_id: String::new(),
        sensitive: false,
        extractable: false,
        local: false,
        origin: k.origin.as_str().to_owned(),
        wrap_with_trusted: false,
        usage: k.usage.as_str().to_owned(),
    }
}

#[tonic::async_trait]
impl KeyService for Keys {
    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        authorize(
            &self.state.authorizer,
            &request,
            &[Role::Officer, Role::Auditor],
        )?;
        let origins = self.state.ceremonies.key_origins().await?;
        let mut keys = Vec::new();
        for k in self.state.signing.list(None) {
            let facts = if k.state == crate::signing::KeyState::Destroyed {
                None
            } else {
                Some(
                    self.state
                        .hsm
                        .private_key_facts(&k.key_id)
                        .await
                        .map_err(Error::from)?,
                )
            };
            let origin = origins
                .get(&(k.name.clone(), k.version))
                .cloned()
                .unwrap_or_default();
            let mut i = info(k);
            i.ceremony_id = origin;
            if let Some(f) = facts {
                i.sensitive = f.sensitive;
                i.extractable = f.extractable;
                i.local = f.local;
                i.wrap_with_trusted = f.wrap_with_trusted;
            }
            keys.push(i);
        }
        Ok(Response::new(ListKeysResponse { keys }))
    }

    async fn create_csr(
        &self,
        request: Request<CreateCsrRequest>,
    ) -> Result<Response<CreateCsrResponse>, Status> {
        authorize(&self.state.authorizer, &request, &[Role::Officer])?;
        let r = request.into_inner();
        let key = key_ref(&self.state, r.key, r.version);
        let csr_der = self.state.signing.create_csr(&key, &r.subject).await?;
        Ok(Response::new(CreateCsrResponse { csr_der }))
    }

    async fn self_sign_certificate(
        &self,
        request: Request<SelfSignCertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let officer = authorize(&self.state.authorizer, &request, &[Role::Officer])?;
        let r = request.into_inner();
        let key = key_ref(&self.state, r.key, r.version);
        let req = CertificateRequest {
            subject: r.subject,
            validity_days: r.validity_days,
            is_ca: r.ca,
            dns_names: r.dns_names,
        };
        let by = Issuance::Officer(officer.actor());
        let cert = self.state.signing.self_sign(&key, &req, &by).await?;
        Ok(Response::new(CertificateResponse {
            certificate_der: cert.clone(),
            chain_der: vec![cert],
        }))
    }

    async fn issue_certificate(
        &self,
        request: Request<IssueCertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let officer = authorize(&self.state.authorizer, &request, &[Role::Officer])?;
        let r = request.into_inner();
        if r.issuer_key.is_empty() {
            return Err(Error::InvalidArgument("issuer_key must not be empty".into()).into());
        }
        let key = key_ref(&self.state, r.key, r.version);
        let issuer = key_ref(&self.state, r.issuer_key, r.issuer_version);
        let req = CertificateRequest {
            subject: r.subject,
            validity_days: r.validity_days,
            is_ca: r.ca,
            dns_names: r.dns_names,
        };
        let chain = self
            .state
            .signing
            .issue_certificate(&key, &issuer, &req, &Issuance::Officer(officer.actor()))
            .await?;
        Ok(Response::new(CertificateResponse {
            certificate_der: chain.first().cloned().unwrap_or_default(),
            chain_der: chain,
        }))
    }
}
