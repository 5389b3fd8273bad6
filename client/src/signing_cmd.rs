//! `hsmctl sign ...` and `hsmctl keys ...`: assertions, raw signatures, the JWKS, the key
//! inventory and certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::{Args, Subcommand, ValueEnum};
use hsm_client::proto::{
    CreateCsrRequest, GetCertificateChainRequest, GetJwksRequest, IssueCertificateRequest,
    ListKeysRequest, SelfSignCertificateRequest, SignAssertionRequest, SignRequest,
    SignatureAlgorithm, SignatureEncoding,
};
use hsm_client::{ClientError, HsmClient};
use serde_json::{json, Value};

/// `hsmctl sign`.
#[derive(Subcommand)]
pub enum SignCommand {
    /// Sign an assertion (JWS); prints the compact JWS (role login-service).
    Assertion(AssertionArgs),
    /// Sign a message or a digest; prints the signature in base64 (role login-service).
    Raw(RawArgs),
    /// Verify an assertion as a relying party does: against the service's JWKS (usage
    /// signing), then exp/nbf and, with --aud, the audience; prints its claims; exits 0
    /// only when valid.
    Verify {
        /// The compact JWS (`-` reads it from stdin).
        jws: String,
        /// The audience that must be in `aud`.
        #[arg(long = "aud")]
        audience: Option<String>,
    },
}

/// Arguments of `hsmctl sign assertion`.
#[derive(Args)]
pub struct AssertionArgs {
    /// Signing key name (default: the service's default assertion key).
    #[arg(long, default_value = "")]
    signing_key: String,
    /// `sub`: who logged in.
    #[arg(long)]
    subject: String,
    /// `aud` (repeat for several).
    #[arg(long = "aud")]
    audience: Vec<String>,
    /// `nonce`.
    #[arg(long, default_value = "")]
    nonce: String,
    /// `acr`: the assurance level, one the service's [[signing.acr]] lets the evidence
    /// reach (or, unbound, one of its acr values).
    #[arg(long)]
    acr: String,
    /// `amr` (repeat for several; with --evidence the service derives it, leave it out).
    #[arg(long)]
    amr: Vec<String>,
    /// Lifetime in seconds (0: the service's default).
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    /// `auth_time`, Unix seconds (0: now; with --evidence the evidence's time).
    #[arg(long, default_value_t = 0)]
    auth_time: u64,
    /// Extra claims, a JSON object.
    #[arg(long, default_value = "")]
    claims: String,
    /// The evidence id `credential verify` printed for an accepted code (spent by this
    /// call). Required unless the caller's [[client]] rule has unbound_assertions.
    #[arg(long = "evidence", default_value = "")]
    evidence: String,
}

/// Arguments of `hsmctl sign raw`.
#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["message", "message_file", "digest"])))]
pub struct RawArgs {
    /// Raw key name (default: the service's default raw key, `documents` in dev mode).
    #[arg(long, default_value = "")]
    signing_key: String,
    /// The message, as text.
    #[arg(long)]
    message: Option<String>,
    /// The message, read from a file.
    #[arg(long)]
    message_file: Option<PathBuf>,
    /// A precomputed digest, hex (SHA-256 for ES256/PS256, SHA-384 for ES384).
    #[arg(long)]
    digest: Option<String>,
    /// Expected algorithm (default: the key's).
    #[arg(long, value_enum)]
    algorithm: Option<Alg>,
    /// Signature encoding: raw r||s (JWS) or DER (X.509); DER is for ECDSA keys only.
    #[arg(long, value_enum, default_value_t = Encoding::Raw)]
    encoding: Encoding,
}

/// JWS algorithms.
#[derive(Clone, Copy, ValueEnum)]
pub enum Alg {
    /// ECDSA P-256, SHA-256.
    Es256,
    /// ECDSA P-384, SHA-384.
    Es384,
    /// Ed25519.
    Eddsa,
    /// RSASSA-PSS, SHA-256.
    Ps256,
}

/// Signature encodings.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Encoding {
    /// Raw r||s (JWS).
    Raw,
    /// DER Ecdsa-Sig-Value (X.509).
    Der,
}

/// `hsmctl keys`.
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Print a JWK Set: the assertion keys relying parties verify with (default), or
    /// with `--usage raw` the keys `hsmctl sign raw` signs with.
    Jwks {
        /// Which key set: `signing` (assertions) or `raw` (raw signatures).
        #[arg(long, default_value = "signing")]
        usage: String,
    },
    /// List every key version and its state (role officer or auditor).
    List,
    /// Certificates of a key: show the stored chain, make a CSR, self-sign, issue.
    #[command(subcommand)]
    Cert(CertCommand),
}

/// Which key version.
#[derive(Args)]
pub struct KeyArg {
    /// Signing key name (default: the service's default assertion key).
    #[arg(long, default_value = "")]
    signing_key: String,
    /// Version (0: the current one).
    #[arg(long, default_value_t = 0)]
    version: u32,
}

/// What goes into a certificate.
#[derive(Args)]
pub struct CertArgs {
    /// Subject DN, RFC 4514, e.g. "CN=Assertions,O=Example,C=DK".
    #[arg(long)]
    subject: String,
    /// Validity from now, in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Make a CA certificate (keyCertSign, cRLSign). (`--ca` is the server CA file.)
    #[arg(long)]
    is_ca: bool,
    /// DNS subject alternative name (repeat for several).
    #[arg(long = "dns")]
    dns_names: Vec<String>,
}

/// `hsmctl keys cert`.
#[derive(Subcommand)]
pub enum CertCommand {
    /// Print the certificate chain stored for a key (PEM, leaf first).
    Show(KeyArg),
    /// Print a PKCS#10 request signed by the key (role officer).
    Csr {
        #[command(flatten)]
        key: KeyArg,
        /// Subject DN, RFC 4514.
        #[arg(long)]
        subject: String,
    },
    /// Self-sign a certificate for the key and store it as its chain (role officer).
    SelfSign {
        #[command(flatten)]
        key: KeyArg,
        #[command(flatten)]
        cert: CertArgs,
    },
    /// Issue a certificate for the key with a CA key of the service (role officer).
    Issue {
        #[command(flatten)]
        key: KeyArg,
        /// The issuing CA key (a signing key name).
        #[arg(long)]
        issuer: String,
        /// Its version (0: the current one).
        #[arg(long, default_value_t = 0)]
        issuer_version: u32,
        #[command(flatten)]
        cert: CertArgs,
    },
}

fn invalid(msg: String) -> ClientError {
    ClientError::Status(tonic::Status::invalid_argument(msg))
}

fn from_hex(s: &str) -> Result<Vec<u8>, ClientError> {
    let s = s.trim();
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "--digest: expected an even number of hex digits".into(),
        ));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| invalid(format!("--digest: {e}")))
        })
        .collect()
}

/// PEM, 64 characters a line (RFC 7468).
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn alg_name(value: i32) -> &'static str {
    match SignatureAlgorithm::try_from(value) {
        Ok(SignatureAlgorithm::Es256) => "ES256",
        Ok(SignatureAlgorithm::Es384) => "ES384",
        Ok(SignatureAlgorithm::Eddsa) => "EdDSA",
        Ok(SignatureAlgorithm::Ps256) => "PS256",
        _ => "unspecified",
    }
}

/// Run `hsmctl sign ...`.
pub async fn sign(
    client: &HsmClient,
    cmd: &SignCommand,
    as_json: bool,
) -> Result<ExitCode, ClientError> {
    match cmd {
        SignCommand::Verify { jws, audience } => {
            let jws = if jws == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|source| {
                    ClientError::Read {
                        path: PathBuf::from("-"),
                        source,
                    }
                })?;
                s
            } else {
                jws.clone()
            };
            let jwks = client
                .signing()
                .get_jwks(GetJwksRequest {
                    usage: "signing".into(),
                })
                .await?
                .into_inner()
                .jwks_json;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            return Ok(
                match hsm_client::jws::verify(&jws, &jwks, audience.as_deref(), now) {
                    Ok((header, claims)) => {
                        if as_json {
                            println!(
                                "{}",
                                json!({ "valid": true, "header": header, "claims": claims })
                            );
                        } else {
                            println!(
                                "VALID ({} kid {})",
                                header["alg"].as_str().unwrap_or(""),
                                header["kid"].as_str().unwrap_or("")
                            );
                            println!(
                                "{}",
                                serde_json::to_string_pretty(&claims).unwrap_or_default()
                            );
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        if as_json {
                            println!("{}", json!({ "valid": false, "reason": e.0 }));
                        } else {
                            println!("INVALID: {}", e.0);
                        }
                        ExitCode::FAILURE
                    }
                },
            );
        }
        SignCommand::Assertion(a) => {
            let r = client
                .signing()
                .sign_assertion(SignAssertionRequest {
                    key: a.signing_key.clone(),
                    subject: a.subject.clone(),
                    audience: a.audience.clone(),
                    nonce: a.nonce.clone(),
                    acr: a.acr.clone(),
                    amr: a.amr.clone(),
                    ttl_seconds: a.ttl,
                    auth_time: a.auth_time,
                    extra_claims_json: a.claims.clone(),
                    evidence_id: a.evidence.clone(),
                })
                .await?
                .into_inner();
            if as_json {
                println!(
                    "{}",
                    json!({ "jws": r.jws, "kid": r.kid, "expires_at": r.expires_at })
                );
            } else {
                println!("{}", r.jws);
            }
        }
        SignCommand::Raw(a) => {
            let (message, digest) = match (&a.message, &a.message_file, &a.digest) {
                (Some(m), _, _) => (Some(m.as_bytes().to_vec()), None),
                (_, Some(path), _) => (
                    Some(std::fs::read(path).map_err(|source| ClientError::Read {
                        path: path.clone(),
                        source,
                    })?),
                    None,
                ),
                (_, _, Some(d)) => (None, Some(from_hex(d)?)),
                _ => return Err(invalid("give --message, --message-file or --digest".into())),
            };
            let algorithm = match a.algorithm {
                None => SignatureAlgorithm::Unspecified,
                Some(Alg::Es256) => SignatureAlgorithm::Es256,
                Some(Alg::Es384) => SignatureAlgorithm::Es384,
                Some(Alg::Eddsa) => SignatureAlgorithm::Eddsa,
                Some(Alg::Ps256) => SignatureAlgorithm::Ps256,
            };
            let encoding = match a.encoding {
                Encoding::Raw => SignatureEncoding::Raw,
                Encoding::Der => SignatureEncoding::Der,
            };
            let r = client
                .signing()
                .sign(SignRequest {
                    key: a.signing_key.clone(),
                    message,
                    digest,
                    algorithm: algorithm.into(),
                    encoding: encoding.into(),
                })
                .await?
                .into_inner();
            let signature = STANDARD.encode(&r.signature);
            if as_json {
                let encoding = if r.encoding == SignatureEncoding::Der as i32 {
                    "der"
                } else {
                    "raw"
                };
                println!(
                    "{}",
                    json!({
                        "signature": signature,
                        "kid": r.kid,
                        "algorithm": alg_name(r.algorithm),
                        "encoding": encoding,
                    })
                );
            } else {
                println!("{signature}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn chain_json(chain: &[Vec<u8>]) -> Value {
    Value::Array(
        chain
            .iter()
            .map(
                |der| json!({ "pem": pem("CERTIFICATE", der), "der_base64": STANDARD.encode(der) }),
            )
            .collect(),
    )
}

fn print_chain(chain: &[Vec<u8>]) {
    for der in chain {
        print!("{}", pem("CERTIFICATE", der));
    }
}

/// Run `hsmctl keys ...`.
pub async fn keys(
    client: &HsmClient,
    cmd: &KeysCommand,
    as_json: bool,
) -> Result<ExitCode, ClientError> {
    match cmd {
        KeysCommand::Jwks { usage } => {
            let text = client
                .signing()
                .get_jwks(GetJwksRequest {
                    usage: usage.clone(),
                })
                .await?
                .into_inner()
                .jwks_json;
            if as_json {
                println!("{text}");
            } else {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
        }
        KeysCommand::List => {
            let keys = client
                .keys()
                .list_keys(ListKeysRequest {})
                .await?
                .into_inner()
                .keys;
            if as_json {
                let list: Vec<Value> = keys
                    .iter()
                    .map(|k| {
                        json!({
                            "name": k.name, "version": k.version, "state": k.state,
                            "algorithm": k.algorithm, "kid": k.kid, "key_id": k.key_id_hex,
                            "certificates": k.certificates, "created_at": k.created_at,
                            "published_at": k.published_at, "activated_at": k.activated_at,
                            "retired_at": k.retired_at, "destroyed_at": k.destroyed_at,
                            "last_expiry": k.last_expiry,
                            "public_key_sha256": k.public_key_sha256,
                            "ceremony_id": k.ceremony_id,
                            "sensitive": k.sensitive, "extractable": k.extractable,
                            "local": k.local, "origin": k.origin,
                            "wrap_with_trusted": k.wrap_with_trusted,
                            "usage": k.usage,
                        })
                    })
                    .collect();
                println!("{}", json!({ "keys": list }));
            } else {
                for k in keys {
                    let attrs = if k.state == "destroyed" {
                        "-".to_owned()
                    } else {
                        format!(
                            "sensitive={} extractable={} local={} wrap_with_trusted={} origin={}",
                            k.sensitive, k.extractable, k.local, k.wrap_with_trusted, k.origin
                        )
                    };
                    let origin = if k.ceremony_id.is_empty() {
                        "-"
                    } else {
                        &k.ceremony_id
                    };
                    println!(
                        "{} v{}  {:<11} {:<5} usage {:<7} kid {}  certificates {}  {attrs}  ceremony {origin}\n    public key SHA-256 {}",
                        k.name, k.version, k.state, k.algorithm, k.usage, k.kid, k.certificates, k.public_key_sha256
                    );
                }
            }
        }
        KeysCommand::Cert(CertCommand::Show(k)) => {
            let chain = client
                .signing()
                .get_certificate_chain(GetCertificateChainRequest {
                    key: k.signing_key.clone(),
                    version: k.version,
                })
                .await?
                .into_inner()
                .certificates_der;
            if as_json {
                println!("{}", json!({ "certificates": chain_json(&chain) }));
            } else {
                print_chain(&chain);
            }
        }
        KeysCommand::Cert(CertCommand::Csr { key, subject }) => {
            let csr = client
                .keys()
                .create_csr(CreateCsrRequest {
                    key: key.signing_key.clone(),
                    version: key.version,
                    subject: subject.clone(),
                })
                .await?
                .into_inner()
                .csr_der;
            let text = pem("CERTIFICATE REQUEST", &csr);
            if as_json {
                println!(
                    "{}",
                    json!({ "csr_pem": text, "der_base64": STANDARD.encode(&csr) })
                );
            } else {
                print!("{text}");
            }
        }
        KeysCommand::Cert(CertCommand::SelfSign { key, cert }) => {
            let r = client
                .keys()
                .self_sign_certificate(SelfSignCertificateRequest {
                    key: key.signing_key.clone(),
                    version: key.version,
                    subject: cert.subject.clone(),
                    validity_days: cert.days,
                    ca: cert.is_ca,
                    dns_names: cert.dns_names.clone(),
                })
                .await?
                .into_inner();
            if as_json {
                println!("{}", json!({ "certificates": chain_json(&r.chain_der) }));
            } else {
                print_chain(&r.chain_der);
            }
        }
        KeysCommand::Cert(CertCommand::Issue {
            key,
            issuer,
            issuer_version,
            cert,
        }) => {
            let r = client
                .keys()
                .issue_certificate(IssueCertificateRequest {
                    key: key.signing_key.clone(),
                    version: key.version,
                    issuer_key: issuer.clone(),
                    issuer_version: *issuer_version,
                    subject: cert.subject.clone(),
                    validity_days: cert.days,
                    ca: cert.is_ca,
                    dns_names: cert.dns_names.clone(),
                })
                .await?
                .into_inner();
            if as_json {
                println!("{}", json!({ "certificates": chain_json(&r.chain_der) }));
            } else {
                print_chain(&r.chain_der);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digest_parsing() {
        assert_eq!(from_hex("00ff10").expect("hex"), vec![0, 255, 16]);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let text = pem("CERTIFICATE", &[7u8; 100]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(*lines.last().expect("end"), "-----END CERTIFICATE-----");
    }
}
