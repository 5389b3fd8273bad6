//! ECDSA signature encodings: PKCS#11 `CKM_ECDSA` and JWS use raw `r || s`,
//! while X.509 and PKCS#10 need `Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }`.

use der::{asn1::UintRef, Decode, Encode, Sequence};

use super::SigningError;

/// Largest field we accept (P-521 is 66 bytes) so that garbage is rejected early.
const MAX_FIELD_LEN: usize = 66;

#[derive(Sequence)]
struct EcdsaSigValue<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

/// Converts a raw `r || s` ECDSA signature (as the HSM returns it) to DER.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, SigningError> {
    if raw.is_empty() || raw.len() % 2 != 0 || raw.len() > 2 * MAX_FIELD_LEN {
        return Err(SigningError::InvalidSignature(format!(
            "raw ECDSA signature has length {}, expected an even length up to {}",
            raw.len(),
            2 * MAX_FIELD_LEN
        )));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    // r and s are in [1, n-1]; a zero half means the HSM output is broken.
    if r.iter().all(|&b| b == 0) || s.iter().all(|&b| b == 0) {
        return Err(SigningError::InvalidSignature(
            "raw ECDSA signature has a zero r or s".into(),
        ));
    }
    let sig = EcdsaSigValue {
        r: UintRef::new(r).map_err(enc_err)?,
        s: UintRef::new(s).map_err(enc_err)?,
    };
    sig.to_der().map_err(enc_err)
}

/// Converts a DER ECDSA signature to raw `r || s`, each left-padded to
/// `field_len` bytes (32 for P-256, 48 for P-384).
pub fn ecdsa_der_to_raw(der: &[u8], field_len: usize) -> Result<Vec<u8>, SigningError> {
    if field_len == 0 || field_len > MAX_FIELD_LEN {
        return Err(SigningError::InvalidArgument(format!(
            "unsupported ECDSA field length {field_len}"
        )));
    }
    // Strict DER decoding: trailing data and non-minimal integers are rejected.
    let sig = EcdsaSigValue::from_der(der)
        .map_err(|e| SigningError::InvalidSignature(format!("not a DER ECDSA signature: {e}")))?;
    let mut raw = vec![0u8; 2 * field_len];
    for (half, int) in raw.chunks_exact_mut(field_len).zip([sig.r, sig.s]) {
        let bytes = int.as_bytes();
        if bytes.is_empty() || bytes.len() > field_len {
            return Err(SigningError::InvalidSignature(format!(
                "ECDSA integer of {} bytes does not fit a {field_len}-byte field",
                bytes.len()
            )));
        }
        half[field_len - bytes.len()..].copy_from_slice(bytes);
    }
    Ok(raw)
}

fn enc_err(e: der::Error) -> SigningError {
    SigningError::Encoding(e.to_string())
}
