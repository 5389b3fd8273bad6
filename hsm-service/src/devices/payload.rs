//! The exact bytes that are signed: the activation and challenge payloads and the
//! device's signed messages, as `proto/hsm/v1/devices.proto` documents them.
//!
//! `u32(n)`/`u64(n)` are big-endian; `str(s)` is `u32(len) || s`. Every variable-length
//! field is length-prefixed and each payload starts with its own versioned tag, so no
//! two different field lists encode to the same bytes and no payload of one kind can
//! pass for another.

/// Tag of an activation payload (followed by one NUL byte).
pub const ACTIVATION_TAG: &[u8] = b"hsm.v1.activation.v1";
/// Tag of a challenge payload (followed by one NUL byte).
pub const CHALLENGE_TAG: &[u8] = b"hsm.v1.challenge.v1";

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    // Every field is bounded far below 4 GiB by validation (ids, subjects, 512-char text).
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s);
}

fn tagged(tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(tag);
    out.push(0);
    out
}

/// What an activation payload covers.
#[derive(Debug, Clone, Copy)]
pub struct ActivationFields<'a> {
    /// Activation id.
    pub activation_id: &'a str,
    /// Tenant.
    pub tenant: &'a str,
    /// Subject.
    pub subject: &'a str,
    /// Device name.
    pub display_name: &'a str,
    /// Unix seconds.
    pub expires_at: u64,
    /// 32 random bytes.
    pub nonce: &'a [u8],
}

/// `"hsm.v1.activation.v1" 0x00 str(activation_id) str(tenant) str(subject)
/// str(display_name) u64(expires_at) str(nonce)`.
pub fn activation(f: &ActivationFields<'_>) -> Vec<u8> {
    let mut out = tagged(ACTIVATION_TAG);
    for s in [f.activation_id, f.tenant, f.subject, f.display_name] {
        put_str(&mut out, s.as_bytes());
    }
    out.extend_from_slice(&f.expires_at.to_be_bytes());
    put_str(&mut out, f.nonce);
    out
}

/// What a challenge payload covers.
#[derive(Debug, Clone, Copy)]
pub struct ChallengeFields<'a> {
    /// Challenge id.
    pub challenge_id: &'a str,
    /// Tenant.
    pub tenant: &'a str,
    /// Subject.
    pub subject: &'a str,
    /// The text shown.
    pub text: &'a str,
    /// Who asks.
    pub service_provider: &'a str,
    /// Purpose name without prefix (`LOGIN`, `TRANSACTION`, `ACTIVATE_DEVICE`).
    pub purpose: &'a str,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// 32 random bytes.
    pub nonce: &'a [u8],
}

/// `"hsm.v1.challenge.v1" 0x00 str(challenge_id) str(tenant) str(subject) str(text)
/// str(service_provider) str(purpose) u64(created_at) u64(expires_at) str(nonce)`.
pub fn challenge(f: &ChallengeFields<'_>) -> Vec<u8> {
    let mut out = tagged(CHALLENGE_TAG);
    for s in [
        f.challenge_id,
        f.tenant,
        f.subject,
        f.text,
        f.service_provider,
        f.purpose,
    ] {
        put_str(&mut out, s.as_bytes());
    }
    out.extend_from_slice(&f.created_at.to_be_bytes());
    out.extend_from_slice(&f.expires_at.to_be_bytes());
    put_str(&mut out, f.nonce);
    out
}

/// What a device signs to list its pending challenges:
/// `"list-pending\n" || device_id || "\n" || timestamp` (decimal ASCII).
pub fn list_pending(device_id: &str, timestamp: u64) -> Vec<u8> {
    format!("list-pending\n{device_id}\n{timestamp}").into_bytes()
}

/// What a device signs to answer: `payload || 0x00 || decision || 0x00 || binding_code`.
pub fn answer(payload: &[u8], decision: &str, binding_code: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + decision.len() + binding_code.len() + 2);
    out.extend_from_slice(payload);
    out.push(0);
    out.extend_from_slice(decision.as_bytes());
    out.push(0);
    out.extend_from_slice(binding_code.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_payload_is_exactly_the_documented_bytes() {
        let p = challenge(&ChallengeFields {
            challenge_id: "c1",
            tenant: "t",
            subject: "s",
            text: "Pay 10 DKK",
            service_provider: "Bank",
            purpose: "TRANSACTION",
            created_at: 1,
            expires_at: 0x0102,
            nonce: &[0xAA; 2],
        });
        let mut want = b"hsm.v1.challenge.v1\0".to_vec();
        want.extend_from_slice(b"\0\0\0\x02c1\0\0\0\x01t\0\0\0\x01s\0\0\0\x0aPay 10 DKK");
        want.extend_from_slice(b"\0\0\0\x04Bank\0\0\0\x0bTRANSACTION");
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2]);
        want.extend_from_slice(&[0, 0, 0, 2, 0xAA, 0xAA]);
        assert_eq!(p, want);
    }

    #[test]
    fn fields_cannot_slide_into_each_other() {
        let base = ChallengeFields {
            challenge_id: "c",
            tenant: "t",
            subject: "ab",
            text: "c",
            service_provider: "sp",
            purpose: "LOGIN",
            created_at: 1,
            expires_at: 2,
            nonce: &[1; 32],
        };
        let moved = ChallengeFields {
            subject: "a",
            text: "bc",
            ..base
        };
        assert_ne!(challenge(&base), challenge(&moved));
        let a = activation(&ActivationFields {
            activation_id: "c",
            tenant: "t",
            subject: "ab",
            display_name: "c",
            expires_at: 2,
            nonce: &[1; 32],
        });
        assert!(a.starts_with(b"hsm.v1.activation.v1\0"));
        assert_eq!(
            list_pending("d1", 1700000000),
            b"list-pending\nd1\n1700000000"
        );
        assert_eq!(answer(b"P", "APPROVE", "07"), b"P\0APPROVE\x0007");
        assert_eq!(answer(b"P", "DENY", ""), b"P\0DENY\0");
    }
}
