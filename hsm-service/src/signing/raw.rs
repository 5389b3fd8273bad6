//! Raw signatures over caller bytes: [`Signer::sign_raw`].

use super::signer::{invalid, mechanism_of, store_err, Caller, Signer};
use super::versions::Usage;
use super::{ecdsa_raw_to_der, Algorithm};
use crate::audit::log::append_in;
use crate::audit::{sha256_hex, Details};
use crate::error::Result;

/// Audit action of a raw signature (object: the key version's `kid`).
pub const RAW_SIGNATURE_ACTION: &str = "signature.sign";

/// Largest message a raw signature may cover.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// What a raw signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignInput {
    /// The message; hashed here (ECDSA, RSA-PSS) or signed whole (EdDSA).
    Message(Vec<u8>),
    /// A digest the caller computed with the key's hash (SHA-256 or SHA-384).
    Digest(Vec<u8>),
}

/// How an ECDSA signature is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureEncoding {
    /// Raw `r || s` (JWS); the only form of EdDSA and RSA-PSS signatures.
    #[default]
    Raw,
    /// DER `Ecdsa-Sig-Value` (X.509, CMS); ECDSA only.
    Der,
}

/// A raw signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSignature {
    /// The signature.
    pub signature: Vec<u8>,
    /// `kid` of the key version.
    pub kid: String,
    /// The algorithm it was made with.
    pub algorithm: Algorithm,
    /// Its encoding.
    pub encoding: SignatureEncoding,
}

impl Signer {
    /// A raw signature by the active version of `name` (empty: the default raw key), a
    /// `raw` key the caller's grant names. `algorithm`, when given, must be the key's.
    /// The signature leaves only once its record (kid, SHA-256 of the message or of the
    /// digest as given) is in the audit trail: one store write job per call.
    pub async fn sign_raw(
        &self,
        caller: &Caller,
        name: &str,
        algorithm: Option<Algorithm>,
        input: SignInput,
        encoding: SignatureEncoding,
    ) -> Result<RawSignature> {
        let (name, k) = self
            .looked_up(|s| {
                let name = s.granted(&caller.grant, name, Usage::Raw)?;
                let k = s.signing_version(&name, Usage::Raw)?;
                Ok((name, k))
            })
            .await?;
        if let Some(alg) = algorithm {
            if alg != k.algorithm {
                return Err(invalid(format!(
                    "algorithm {alg} does not match key {name:?}, which signs {}",
                    k.algorithm
                )));
            }
        }
        let is_ecdsa = matches!(k.algorithm, Algorithm::Es256 | Algorithm::Es384);
        if encoding == SignatureEncoding::Der && !is_ecdsa {
            return Err(invalid(format!(
                "DER encoding applies to ECDSA signatures only, not {}",
                k.algorithm
            )));
        }
        let input_kind = match &input {
            SignInput::Message(_) => "message",
            SignInput::Digest(_) => "digest",
        };
        let input_sha256;
        let to_sign = match input {
            SignInput::Message(m) => {
                if m.len() > MAX_MESSAGE_LEN {
                    return Err(invalid(format!(
                        "message is {} bytes, the limit is {MAX_MESSAGE_LEN}",
                        m.len()
                    )));
                }
                input_sha256 = sha256_hex(&m);
                k.algorithm.digest(&m).unwrap_or(m)
            }
            SignInput::Digest(d) => match k.algorithm.digest_algorithm() {
                None => {
                    return Err(invalid(format!(
                        "{} signs whole messages; send message, not digest",
                        k.algorithm
                    )))
                }
                Some(h) => {
                    let want = h.digest(b"").len();
                    if d.len() != want {
                        return Err(invalid(format!(
                            "digest must be {want} bytes for {}, got {}",
                            k.algorithm,
                            d.len()
                        )));
                    }
                    input_sha256 = sha256_hex(&d);
                    d
                }
            },
        };
        let raw = self
            .hsm
            .sign(&k.key_id, mechanism_of(k.algorithm), to_sign)
            .await?;
        let signature = match encoding {
            SignatureEncoding::Der => ecdsa_raw_to_der(&raw)?,
            SignatureEncoding::Raw => raw,
        };
        let event = self
            .event(&caller.actor, RAW_SIGNATURE_ACTION, &k.kid)
            .with_details(
                Details::new()
                    .str("key", &k.name)
                    .u64("version", u64::from(k.version))
                    .str("algorithm", k.algorithm.jws_name())
                    .str("input", input_kind)
                    .str("sha256", &input_sha256)
                    .str("tenant", &caller.grant.tenant),
            );
        let chain = self.audit.chain();
        self.store
            .write(move |txn| append_in(txn, &chain, event))
            .await
            .map_err(store_err)?;
        self.audit.appended(1);
        Ok(RawSignature {
            signature,
            kid: k.kid,
            algorithm: k.algorithm,
            encoding,
        })
    }
}
