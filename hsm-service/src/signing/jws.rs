//! Compact JWS assertions (signed JWTs), built in two phases around the HSM.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Algorithm, SigningError};

/// Caller claims are attacker-adjacent input: bound them so a token stays small.
const MAX_EXTRA_CLAIMS_LEN: usize = 16 * 1024;
/// Deep enough for OIDC `verified_claims`, shallow enough to be sane.
const MAX_EXTRA_DEPTH: usize = 16;
/// The claim of an assertion on app evidence of a TRANSACTION challenge: the SHA-256 of
/// the text the citizen approved (its UTF-8 bytes, exactly as shown), lower-case hex. A
/// relying party compares it with the hash of the transaction it asked to have approved.
pub const TXN_TEXT_SHA256_CLAIM: &str = "txn_text_sha256";

/// Claims this module sets itself; callers must not be able to override them.
const RESERVED_CLAIMS: [&str; 12] = [
    "iss",
    "sub",
    "aud",
    "iat",
    "nbf",
    "exp",
    "jti",
    "nonce",
    "acr",
    "amr",
    "auth_time",
    TXN_TEXT_SHA256_CLAIM,
];

/// Inputs of one assertion. Times are Unix seconds supplied by the caller.
#[derive(Debug, Clone, Copy)]
pub struct AssertionParams<'a> {
    /// `iss`; must be non-empty.
    pub issuer: &'a str,
    /// `sub`; must be non-empty.
    pub subject: &'a str,
    /// `aud`: a string for one entry, an array for several, omitted when empty.
    pub audience: &'a [String],
    /// `nonce`, omitted when empty.
    pub nonce: &'a str,
    /// `acr`.
    pub acr: &'a str,
    /// `amr`, omitted when empty.
    pub amr: &'a [String],
    /// `auth_time`.
    pub auth_time: u64,
    /// Current time: becomes `iat` and `nbf`.
    pub now: u64,
    /// Lifetime: `exp = now + ttl_seconds`; must be positive.
    pub ttl_seconds: u32,
    /// `jti`; must be non-empty (replay detection relies on it).
    pub jti: &'a str,
    /// Additional claims as a JSON object text, or empty for none. Must not
    /// contain any claim this module sets (iss, sub, aud, iat, nbf, exp, jti,
    /// nonce, acr, amr, auth_time, txn_text_sha256).
    pub extra_claims_json: &'a str,
    /// [`TXN_TEXT_SHA256_CLAIM`] (lower-case hex), from app evidence of a transaction.
    pub txn_text_sha256: Option<&'a str>,
}

/// The JWS signing input `BASE64URL(header) "." BASE64URL(payload)`,
/// waiting for its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningInput {
    /// Holds the signing input; `finish` appends the signature in place, and
    /// the capacity was reserved for it up front.
    token: String,
    expires_at: u64,
}

impl SigningInput {
    /// The ASCII bytes to sign (for EdDSA, the message to pass to the HSM).
    pub fn bytes(&self) -> &[u8] {
        self.token.as_bytes()
    }

    /// The digest to give the HSM for `alg` (which should be the algorithm
    /// the input was prepared for); `None` for EdDSA, which signs
    /// [`bytes`](Self::bytes) whole.
    pub fn digest(&self, alg: Algorithm) -> Option<Vec<u8>> {
        alg.digest(self.bytes())
    }

    /// The compact JWS, given the signature in JWS form: raw `r || s` for
    /// ECDSA (what `CKM_ECDSA` returns), the plain signature otherwise.
    pub fn finish(mut self, signature: &[u8]) -> String {
        self.token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut self.token);
        self.token
    }

    /// The `exp` claim, for caching or logging by the caller.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'static str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Audience<'a> {
    One(&'a str),
    Many(&'a [String]),
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<Audience<'a>>,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    nonce: &'a str,
    acr: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    amr: &'a [String],
    auth_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    txn_text_sha256: Option<&'a str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    extra: Option<&'a Map<String, Value>>,
}

/// Builds the signing input of a JWT assertion with header
/// `{"alg":..,"kid":..,"typ":"JWT"}`.
pub fn prepare_assertion(
    alg: Algorithm,
    kid: &str,
    p: &AssertionParams,
) -> Result<SigningInput, SigningError> {
    for (name, value) in [("subject", p.subject), ("issuer", p.issuer), ("jti", p.jti)] {
        if value.is_empty() {
            return Err(invalid(format!("{name} must not be empty")));
        }
    }
    if p.audience.iter().any(String::is_empty) {
        return Err(invalid("audience entries must not be empty".into()));
    }
    if p.ttl_seconds == 0 {
        return Err(invalid("ttl_seconds must be positive".into()));
    }
    let exp = p
        .now
        .checked_add(u64::from(p.ttl_seconds))
        .ok_or_else(|| invalid("now + ttl_seconds overflows".into()))?;
    let extra = parse_extra_claims(p.extra_claims_json)?;

    let claims = Claims {
        iss: p.issuer,
        sub: p.subject,
        aud: match p.audience {
            [] => None,
            [one] => Some(Audience::One(one)),
            many => Some(Audience::Many(many)),
        },
        iat: p.now,
        nbf: p.now,
        exp,
        jti: p.jti,
        nonce: p.nonce,
        acr: p.acr,
        amr: p.amr,
        auth_time: p.auth_time,
        txn_text_sha256: p.txn_text_sha256,
        extra: extra.as_ref(),
    };
    let header = Header {
        alg: alg.jws_name(),
        kid,
        typ: "JWT",
    };

    // One JSON buffer for header and payload, one output string sized for the
    // final token: two allocations on the common path.
    let mut json = Vec::with_capacity(
        256 + kid.len()
            + p.issuer.len()
            + p.subject.len()
            + p.nonce.len()
            + p.jti.len()
            + p.acr.len()
            + p.audience
                .iter()
                .chain(p.amr)
                .map(|s| s.len() + 3)
                .sum::<usize>()
            + p.extra_claims_json.len()
            + p.txn_text_sha256.map_or(0, |h| h.len() + 20),
    );
    serde_json::to_writer(&mut json, &header).map_err(json_err)?;
    let header_len = json.len();
    serde_json::to_writer(&mut json, &claims).map_err(json_err)?;
    let (header_json, claims_json) = json.split_at(header_len);

    let b64_len = |n| base64::encoded_len(n, false).unwrap_or(0);
    let mut token = String::with_capacity(
        b64_len(header_json.len())
            + b64_len(claims_json.len())
            + b64_len(alg.max_signature_len())
            + 2,
    );
    URL_SAFE_NO_PAD.encode_string(header_json, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(claims_json, &mut token);
    Ok(SigningInput {
        token,
        expires_at: exp,
    })
}

/// Validates the caller's extra claims; `None` when there are none.
fn parse_extra_claims(json: &str) -> Result<Option<Map<String, Value>>, SigningError> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    if json.len() > MAX_EXTRA_CLAIMS_LEN {
        return Err(invalid(format!(
            "extra_claims_json is {} bytes, the limit is {MAX_EXTRA_CLAIMS_LEN}",
            json.len()
        )));
    }
    // serde_json caps recursion at 128, so parsing hostile nesting is safe.
    let value: Value = serde_json::from_str(json)
        .map_err(|e| invalid(format!("extra_claims_json is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(invalid(
            "extra_claims_json must be a JSON object or empty".into(),
        ));
    };
    if let Some(claim) = RESERVED_CLAIMS.iter().find(|c| map.contains_key(**c)) {
        return Err(invalid(format!(
            "extra_claims_json must not set the reserved claim \"{claim}\""
        )));
    }
    if map.values().any(|v| depth(v) >= MAX_EXTRA_DEPTH) {
        return Err(invalid(format!(
            "extra_claims_json nests deeper than {MAX_EXTRA_DEPTH} levels"
        )));
    }
    Ok((!map.is_empty()).then_some(map))
}

/// Nesting depth of a value; bounded by serde_json's recursion limit.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn invalid(msg: String) -> SigningError {
    SigningError::InvalidArgument(msg)
}

fn json_err(e: serde_json::Error) -> SigningError {
    SigningError::Encoding(e.to_string())
}
