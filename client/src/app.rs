//! The reference app authenticator (issue 13): what a phone does, for demos, tests and
//! load. A device key pair (ECDSA P-256, `p256`), the exact byte strings the device signs
//! (proto/hsm/v1/devices.proto), the payload decoders, the check that a challenge was
//! signed by the service (its `challenge` keys in the JWKS), and the 0600 state file.
//!
//! The private key never appears in output, logs or `Debug`; its hex form is zeroized
//! after use.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::proto as pb;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use serde_json::{json, Value};
use zeroize::Zeroizing;

/// Tag that starts an activation payload.
pub const ACTIVATION_TAG: &[u8] = b"hsm.v1.activation.v1\0";
/// Tag that starts a challenge payload.
pub const CHALLENGE_TAG: &[u8] = b"hsm.v1.challenge.v1\0";

/// Why an app operation cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A payload does not decode as the proto describes.
    #[error("malformed {what} payload: {detail}")]
    Payload {
        /// activation or challenge.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A challenge is not signed by a `challenge` key of the service, or its fields
    /// differ from its signed payload.
    #[error("challenge {challenge_id} not accepted: {detail}")]
    Untrusted {
        /// The challenge.
        challenge_id: String,
        /// Why.
        detail: String,
    },
    /// The JWKS cannot be used.
    #[error("the challenge JWKS cannot be used: {0}")]
    Jwks(String),
    /// The state file cannot be read or written, or holds something else.
    #[error("state file {path}: {detail}")]
    State {
        /// File.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Input that cannot be used (an activation link, a code, a flag).
    #[error("{0}")]
    Usage(String),
}

/// A device key pair, generated here (on a phone: in its secure hardware).
pub struct DeviceKey(SigningKey);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey(public {})", self.public_key_sha256())
    }
}

impl DeviceKey {
    /// A fresh key from the system RNG.
    pub fn generate() -> DeviceKey {
        let rng = ring::rand::SystemRandom::new();
        loop {
            let mut b = Zeroizing::new([0u8; 32]);
            ring::rand::SecureRandom::fill(&rng, b.as_mut()).expect("system RNG");
            // Zero or >= n (probability ~2^-32): draw again.
            if let Ok(k) = SigningKey::from_slice(b.as_ref()) {
                return DeviceKey(k);
            }
        }
    }

    /// From the 32-byte scalar.
    pub fn from_bytes(b: &[u8]) -> Option<DeviceKey> {
        SigningKey::from_slice(b).ok().map(DeviceKey)
    }

    /// The SEC1 uncompressed public point (65 bytes), as CompleteActivation wants it.
    pub fn public_sec1(&self) -> Vec<u8> {
        self.0
            .verifying_key()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec()
    }

    /// SHA-256 of [`Self::public_sec1`], lowercase hex (Device.public_key_sha256).
    pub fn public_key_sha256(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, &self.public_sec1()).as_ref())
    }

    /// DER ECDSA P-256/SHA-256 over `msg`.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = self.0.sign(msg);
        sig.to_der().as_bytes().to_vec()
    }

    fn secret_hex(&self) -> Zeroizing<String> {
        let b = Zeroizing::new(self.0.to_bytes());
        Zeroizing::new(hex(b.as_slice()))
    }
}

/// `"list-pending\n" || device_id || "\n" || timestamp` (ListPendingChallengesRequest).
pub fn list_pending_message(device_id: &str, timestamp: u64) -> Vec<u8> {
    format!("list-pending\n{device_id}\n{timestamp}").into_bytes()
}

/// The decision's ASCII name in the signed answer.
pub fn decision_name(d: pb::ChallengeDecision) -> &'static str {
    match d {
        pb::ChallengeDecision::Approve => "APPROVE",
        pb::ChallengeDecision::Deny => "DENY",
        pb::ChallengeDecision::NotMe => "NOT_ME",
        pb::ChallengeDecision::Unspecified => "UNSPECIFIED",
    }
}

/// `payload || 0x00 || decision || 0x00 || binding_code` (AnswerChallengeRequest).
pub fn answer_message(payload: &[u8], decision: pb::ChallengeDecision, binding: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(payload.len() + 16);
    m.extend_from_slice(payload);
    m.push(0);
    m.extend_from_slice(decision_name(decision).as_bytes());
    m.push(0);
    m.extend_from_slice(binding.as_bytes());
    m
}

/// A signed ListPendingChallenges request for `device_id` at `timestamp`.
pub fn list_pending_request(
    key: &DeviceKey,
    device_id: &str,
    timestamp: u64,
) -> pb::ListPendingChallengesRequest {
    pb::ListPendingChallengesRequest {
        device_id: device_id.to_owned(),
        timestamp,
        signature: key.sign(&list_pending_message(device_id, timestamp)),
    }
}

/// A signed answer to a challenge whose payload is `payload`.
pub fn answer_request(
    key: &DeviceKey,
    device_id: &str,
    challenge_id: &str,
    payload: &[u8],
    decision: pb::ChallengeDecision,
    binding: &str,
) -> pb::AnswerChallengeRequest {
    pb::AnswerChallengeRequest {
        challenge_id: challenge_id.to_owned(),
        device_id: device_id.to_owned(),
        decision: decision as i32,
        binding_code: binding.to_owned(),
        signature: key.sign(&answer_message(payload, decision, binding)),
    }
}

/// Reads the payload encodings (u32/u64 big-endian, length-prefixed strings).
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, detail: impl Into<String>) -> AppError {
        AppError::Payload {
            what: self.what,
            detail: detail.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], AppError> {
        if self.b.len() < n {
            return Err(self.err("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, AppError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, AppError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], AppError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self, field: &str) -> Result<String, AppError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{field} is not UTF-8")))
    }
    fn end(&self) -> Result<(), AppError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.b.len())))
        }
    }
}

/// The fields of an activation payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationPayload {
    /// Activation id.
    pub activation_id: String,
    /// Tenant of the login service.
    pub tenant: String,
    /// The citizen.
    pub subject: String,
    /// The device's name.
    pub display_name: String,
    /// Unix seconds.
    pub expires_at: u64,
}

impl ActivationPayload {
    /// Decode `payload`.
    pub fn decode(payload: &[u8]) -> Result<ActivationPayload, AppError> {
        let mut r = Reader {
            b: payload,
            what: "activation",
        };
        if r.take(ACTIVATION_TAG.len()).ok() != Some(ACTIVATION_TAG) {
            return Err(r.err("it does not start with the activation tag"));
        }
        let p = ActivationPayload {
            activation_id: r.str("activation_id")?,
            tenant: r.str("tenant")?,
            subject: r.str("subject")?,
            display_name: r.str("display_name")?,
            expires_at: r.u64()?,
        };
        let _nonce = r.bytes()?;
        r.end()?;
        Ok(p)
    }
}

/// The fields of a challenge payload: what the app shows (never the unsigned fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengePayload {
    /// Challenge id.
    pub challenge_id: String,
    /// Tenant of the login service.
    pub tenant: String,
    /// The citizen.
    pub subject: String,
    /// What the citizen approves.
    pub text: String,
    /// Who asks.
    pub service_provider: String,
    /// "LOGIN", "TRANSACTION" or "ACTIVATE_DEVICE".
    pub purpose: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
}

impl ChallengePayload {
    /// Decode `payload`.
    pub fn decode(payload: &[u8]) -> Result<ChallengePayload, AppError> {
        let mut r = Reader {
            b: payload,
            what: "challenge",
        };
        if r.take(CHALLENGE_TAG.len()).ok() != Some(CHALLENGE_TAG) {
            return Err(r.err("it does not start with the challenge tag"));
        }
        let p = ChallengePayload {
            challenge_id: r.str("challenge_id")?,
            tenant: r.str("tenant")?,
            subject: r.str("subject")?,
            text: r.str("text")?,
            service_provider: r.str("service_provider")?,
            purpose: r.str("purpose")?,
            created_at: r.u64()?,
            expires_at: r.u64()?,
        };
        let _nonce = r.bytes()?;
        r.end()?;
        Ok(p)
    }
}

/// The ChallengePurpose name without its prefix ("LOGIN", ...), as in the payload.
pub fn purpose_name(p: i32) -> String {
    pb::ChallengePurpose::try_from(p)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("CHALLENGE_PURPOSE_")
                .to_owned()
        })
        .unwrap_or_else(|_| p.to_string())
}

/// The ChallengeState name without its prefix ("PENDING", ...).
pub fn state_name(s: i32) -> String {
    pb::ChallengeState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("CHALLENGE_STATE_")
                .to_owned()
        })
        .unwrap_or_else(|_| s.to_string())
}

/// The service's challenge-signing public keys by kid (GetJwks usage "challenge").
#[derive(Debug, Clone, Default)]
pub struct ChallengeKeys(BTreeMap<String, VerifyingKey>);

impl ChallengeKeys {
    /// From a JWK Set: every P-256 key (kty EC, crv P-256) with a kid.
    pub fn from_jwks(jwks_json: &str) -> Result<ChallengeKeys, AppError> {
        let v: Value =
            serde_json::from_str(jwks_json).map_err(|e| AppError::Jwks(e.to_string()))?;
        let keys = v["keys"]
            .as_array()
            .ok_or_else(|| AppError::Jwks("no \"keys\" array".into()))?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut out = BTreeMap::new();
        for k in keys {
            if k["kty"] != "EC" || k["crv"] != "P-256" {
                continue;
            }
            let (Some(kid), Some(x), Some(y)) =
                (k["kid"].as_str(), k["x"].as_str(), k["y"].as_str())
            else {
                continue;
            };
            let (Ok(x), Ok(y)) = (b64.decode(x), b64.decode(y)) else {
                return Err(AppError::Jwks(format!(
                    "key {kid}: x or y is not base64url"
                )));
            };
            if x.len() != 32 || y.len() != 32 {
                return Err(AppError::Jwks(format!(
                    "key {kid}: x and y must be 32 bytes"
                )));
            }
            let point = [&[4u8][..], &x, &y].concat();
            let key = VerifyingKey::from_sec1_bytes(&point)
                .map_err(|_| AppError::Jwks(format!("key {kid}: not a P-256 point")))?;
            out.insert(kid.to_owned(), key);
        }
        if out.is_empty() {
            return Err(AppError::Jwks("no P-256 key".into()));
        }
        Ok(ChallengeKeys(out))
    }

    /// Fetch them from the service.
    pub async fn fetch(client: &crate::HsmClient) -> Result<ChallengeKeys, crate::ClientError> {
        let r = client
            .signing()
            .get_jwks(pb::GetJwksRequest {
                usage: "challenge".into(),
            })
            .await?
            .into_inner();
        ChallengeKeys::from_jwks(&r.jwks_json).map_err(crate::ClientError::from)
    }

    /// Check that `c` was signed by the service (server_signature over payload with the
    /// key server_kid) and that its fields are those of the signed payload; the decoded
    /// payload, which is what the app shows.
    pub fn verify(&self, c: &pb::Challenge) -> Result<ChallengePayload, AppError> {
        let fail = |detail: String| AppError::Untrusted {
            challenge_id: c.challenge_id.clone(),
            detail,
        };
        let key = self.0.get(&c.server_kid).ok_or_else(|| {
            fail(format!(
                "kid {:?} is no challenge key of the JWKS",
                c.server_kid
            ))
        })?;
        let sig = DerSignature::from_bytes(&c.server_signature)
            .map_err(|_| fail("server_signature is not a DER ECDSA signature".into()))?;
        let sig = Signature::try_from(sig)
            .map_err(|_| fail("server_signature is not a DER ECDSA signature".into()))?;
        key.verify(&c.payload, &sig)
            .map_err(|_| fail("server_signature does not verify".into()))?;
        let p = ChallengePayload::decode(&c.payload).map_err(|e| fail(e.to_string()))?;
        let same = p.challenge_id == c.challenge_id
            && p.subject == c.subject
            && p.text == c.text
            && p.service_provider == c.service_provider
            && p.purpose == purpose_name(c.purpose)
            && p.created_at == c.created_at
            && p.expires_at == c.expires_at;
        if !same {
            return Err(fail("its fields differ from its signed payload".into()));
        }
        Ok(p)
    }
}

impl From<AppError> for crate::ClientError {
    fn from(e: AppError) -> Self {
        crate::ClientError::App(e)
    }
}

/// What `hsmctl app` keeps about one activated device (the state file).
#[derive(Debug)]
pub struct DeviceState {
    /// The device id.
    pub device_id: String,
    /// The citizen.
    pub subject: String,
    /// The tenant.
    pub tenant: String,
    /// The device's name.
    pub display_name: String,
    /// The device key.
    pub key: DeviceKey,
    /// Timestamp of the last signed ListPendingChallenges: the service refuses one that
    /// is not later than the device's previous (replay protection), so two listings in
    /// one second need the second one's timestamp moved on.
    pub last_list_timestamp: u64,
}

impl DeviceState {
    /// The timestamp for the next listing, at Unix time `now`: `now`, or one past the
    /// last one when that is not earlier (the service accepts ±60 s).
    pub fn next_list_timestamp(&self, now: u64) -> Result<u64, AppError> {
        let ts = now.max(self.last_list_timestamp + 1);
        if ts > now + 30 {
            return Err(AppError::Usage(
                "too many listings in the last seconds: wait a little".into(),
            ));
        }
        Ok(ts)
    }

    /// Rewrite the state file at `path` (a new file of mode 0600 renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), AppError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = DeviceState::create_file(&tmp)?;
        self.write(&mut f, &tmp)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| AppError::State {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Create `path` (it must not exist: a device key is never overwritten) with mode
    /// 0600, empty; [`DeviceState::write`] fills it.
    pub fn create_file(path: &Path) -> Result<std::fs::File, AppError> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        opts.open(path).map_err(|e| AppError::State {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Write the state to `file` (made by [`DeviceState::create_file`]) and sync it.
    pub fn write(&self, file: &mut std::fs::File, path: &Path) -> Result<(), AppError> {
        let secret = self.key.secret_hex();
        let text = Zeroizing::new(
            json!({
                "version": 1,
                "device_id": self.device_id,
                "subject": self.subject,
                "tenant": self.tenant,
                "display_name": self.display_name,
                "public_key_sha256": self.key.public_key_sha256(),
                "private_key_p256_hex": secret.as_str(),
                "last_list_timestamp": self.last_list_timestamp,
            })
            .to_string(),
        );
        file.write_all(text.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(|e| AppError::State {
                path: path.to_owned(),
                detail: e.to_string(),
            })
    }

    /// Read `path`; refused when others may read it (mode wider than 0600), like ssh.
    pub fn load(path: &Path) -> Result<DeviceState, AppError> {
        let fail = |detail: String| AppError::State {
            path: path.to_owned(),
            detail,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(fail(format!(
                    "mode {mode:o} lets others read the device key; chmod 600 it"
                )));
            }
        }
        #[cfg(not(unix))]
        let _ = meta;
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?);
        let v: Value =
            serde_json::from_str(&text).map_err(|_| fail("not a state file (JSON)".into()))?;
        if v["version"] != 1 {
            return Err(fail("unknown state file version".into()));
        }
        let field = |name: &str| {
            v[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| fail(format!("no {name}")))
        };
        let secret = Zeroizing::new(field("private_key_p256_hex")?);
        let bytes = Zeroizing::new(
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(secret.as_bytes())
                .map_err(|_| fail("the key is not hex".into()))?,
        );
        let key = DeviceKey::from_bytes(&bytes).ok_or_else(|| fail("not a P-256 key".into()))?;
        Ok(DeviceState {
            device_id: field("device_id")?,
            subject: field("subject")?,
            tenant: field("tenant")?,
            display_name: field("display_name")?,
            key,
            last_list_timestamp: v["last_list_timestamp"].as_u64().unwrap_or(0),
        })
    }
}

/// An activation link: what `hsmctl device begin` prints and draws as a QR code, and
/// `hsmctl app activate --activation` reads:
/// `hsm-activation:?id=<activation_id>&code=<activation_code>&payload=<base64url>`.
/// It holds the one-time activation code: shown to the citizen once.
#[derive(Clone, PartialEq, Eq)]
pub struct ActivationLink {
    /// The activation id.
    pub activation_id: String,
    /// The activation code (may be empty: then typed with `--code`).
    pub code: Zeroizing<String>,
    /// The payload the device signs.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for ActivationLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationLink")
            .field("activation_id", &self.activation_id)
            .finish_non_exhaustive()
    }
}

/// Scheme of activation links.
pub const ACTIVATION_SCHEME: &str = "hsm-activation:";

impl ActivationLink {
    /// The link text.
    pub fn to_uri(&self) -> Zeroizing<String> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut s = format!("{ACTIVATION_SCHEME}?id={}", self.activation_id);
        if !self.code.is_empty() {
            s.push_str("&code=");
            s.push_str(&self.code);
        }
        s.push_str("&payload=");
        s.push_str(&b64.encode(&self.payload));
        Zeroizing::new(s)
    }

    /// Parse a link.
    pub fn parse(uri: &str) -> Result<ActivationLink, AppError> {
        let bad = |d: &str| {
            AppError::Usage(format!(
                "not an activation link ({ACTIVATION_SCHEME}?id=...&payload=...): {d}"
            ))
        };
        let query = uri
            .strip_prefix(ACTIVATION_SCHEME)
            .and_then(|r| r.strip_prefix('?'))
            .ok_or_else(|| bad("wrong scheme"))?;
        let (mut id, mut code, mut payload) = (None, Zeroizing::new(String::new()), None);
        for pair in query.split('&') {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad("a parameter without ="))?;
            match k {
                "id" => id = Some(v.to_owned()),
                "code" => code = Zeroizing::new(v.to_owned()),
                "payload" => {
                    payload = Some(
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(v)
                            .map_err(|_| bad("payload is not base64url"))?,
                    )
                }
                _ => {}
            }
        }
        Ok(ActivationLink {
            activation_id: id.ok_or_else(|| bad("no id"))?,
            code,
            payload: payload.ok_or_else(|| bad("no payload"))?,
        })
    }
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn challenge_payload() -> Vec<u8> {
        let mut p = CHALLENGE_TAG.to_vec();
        for s in [
            "c1",
            "t",
            "alice",
            "Log in to Borger.dk",
            "borger.dk",
            "LOGIN",
        ] {
            str(&mut p, s.as_bytes());
        }
        p.extend_from_slice(&100u64.to_be_bytes());
        p.extend_from_slice(&220u64.to_be_bytes());
        str(&mut p, &[7; 32]);
        p
    }

    #[test]
    fn challenge_payload_decodes_and_rejects_junk() {
        let p = challenge_payload();
        let d = ChallengePayload::decode(&p).unwrap();
        assert_eq!(
            (d.challenge_id.as_str(), d.text.as_str(), d.purpose.as_str()),
            ("c1", "Log in to Borger.dk", "LOGIN")
        );
        assert_eq!((d.created_at, d.expires_at), (100, 220));
        assert!(ChallengePayload::decode(&p[..p.len() - 1]).is_err());
        assert!(ChallengePayload::decode(&[&p[..], &[0]].concat()).is_err());
        assert!(
            ActivationPayload::decode(&p).is_err(),
            "the tags separate them"
        );
    }

    #[test]
    fn answer_message_is_payload_nul_decision_nul_binding() {
        assert_eq!(
            answer_message(b"P", pb::ChallengeDecision::Approve, "42"),
            b"P\0APPROVE\x0042"
        );
        assert_eq!(
            answer_message(b"P", pb::ChallengeDecision::NotMe, ""),
            b"P\0NOT_ME\0"
        );
        assert_eq!(list_pending_message("d1", 17), b"list-pending\nd1\n17");
    }

    #[test]
    fn server_signature_is_checked_against_the_jwks() {
        let server = DeviceKey::generate();
        let point = server.public_sec1();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..])}]})
        .to_string();
        let keys = ChallengeKeys::from_jwks(&jwks).unwrap();
        let payload = challenge_payload();
        let mut c = pb::Challenge {
            challenge_id: "c1".into(),
            subject: "alice".into(),
            text: "Log in to Borger.dk".into(),
            service_provider: "borger.dk".into(),
            purpose: pb::ChallengePurpose::Login as i32,
            created_at: 100,
            expires_at: 220,
            server_signature: server.sign(&payload),
            payload,
            server_kid: "k1".into(),
            ..Default::default()
        };
        assert_eq!(keys.verify(&c).unwrap().subject, "alice");
        // An unsigned field that differs from the payload: refused.
        c.text = "Pay 10,000 DKK".into();
        assert!(keys.verify(&c).is_err());
        c.text = "Log in to Borger.dk".into();
        // Another key, another kid, a bad signature.
        c.server_kid = "k2".into();
        assert!(keys.verify(&c).is_err());
        c.server_kid = "k1".into();
        c.server_signature = DeviceKey::generate().sign(&c.payload);
        assert!(keys.verify(&c).is_err());
    }

    #[test]
    fn device_signatures_verify_and_state_round_trips() {
        let k = DeviceKey::generate();
        let sig = k.sign(b"m");
        let vk = VerifyingKey::from_sec1_bytes(&k.public_sec1()).unwrap();
        let sig = Signature::from_der(&sig).unwrap();
        vk.verify(b"m", &sig).unwrap();
        assert!(!format!("{k:?}").contains(&*k.secret_hex()));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = DeviceState {
            device_id: "d1".into(),
            subject: "alice".into(),
            tenant: "t".into(),
            display_name: "phone".into(),
            key: k,
            last_list_timestamp: 0,
        };
        let mut f = DeviceState::create_file(&path).unwrap();
        s.write(&mut f, &path).unwrap();
        assert!(
            DeviceState::create_file(&path).is_err(),
            "never overwritten"
        );
        let mut back = DeviceState::load(&path).unwrap();
        assert_eq!(back.key.public_sec1(), s.key.public_sec1());
        // Listings in one second get increasing timestamps, kept across runs.
        assert_eq!(back.next_list_timestamp(100).unwrap(), 100);
        back.last_list_timestamp = 100;
        back.save(&path).unwrap();
        let back = DeviceState::load(&path).unwrap();
        assert_eq!(back.next_list_timestamp(100).unwrap(), 101);
        assert_eq!(back.next_list_timestamp(200).unwrap(), 200);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(
                DeviceState::load(&path).is_err(),
                "readable by others: refused"
            );
        }
    }

    #[test]
    fn activation_link_round_trips() {
        let l = ActivationLink {
            activation_id: "a1".into(),
            code: Zeroizing::new("ABCD2345".into()),
            payload: vec![0, 1, 255],
        };
        let uri = l.to_uri();
        assert_eq!(ActivationLink::parse(&uri).unwrap(), l);
        assert!(!format!("{l:?}").contains("ABCD2345"));
        assert!(ActivationLink::parse("otpauth://x").is_err());
    }
}
