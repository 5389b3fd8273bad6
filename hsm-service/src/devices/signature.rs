//! Device signatures: ECDSA P-256 with SHA-256, verified in software with the `p256`
//! crate (RustCrypto). A public-key operation: nothing secret is involved, and the
//! verification's running time depends on public values only.
//!
//! Policy, as `devices.proto` documents it:
//! * public keys are SEC1 *uncompressed* points (65 bytes, `0x04 || x || y`) on the
//!   curve; compressed points, the identity and off-curve points are refused;
//! * signatures are strict ASN.1 DER `Ecdsa-Sig-Value` (minimal lengths, minimal
//!   positive INTEGERs, no trailing bytes: the `der` crate's decoder), at most 72 bytes,
//!   r and s in 1..n-1;
//! * high-s signatures are accepted (P-256 has no low-s rule; phone keystores make
//!   both). Nothing relies on a signature being unique: every signed request is
//!   single-use by state (an answer moves its challenge once; a listing needs a
//!   timestamp above the device's last one), never by remembering signatures.

use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};

use crate::error::Error;

/// Length of a SEC1 uncompressed P-256 point.
pub const PUBLIC_KEY_LEN: usize = 65;
/// Longest DER ECDSA P-256 signature.
pub const MAX_SIGNATURE_LEN: usize = 72;

/// A device's public key, checked.
#[derive(Clone, Debug)]
pub struct DeviceKey(VerifyingKey);

impl DeviceKey {
    /// Parses a SEC1 uncompressed point (INVALID_ARGUMENT otherwise).
    pub fn parse(sec1: &[u8]) -> Result<DeviceKey, Error> {
        if sec1.len() != PUBLIC_KEY_LEN || sec1[0] != 0x04 {
            return Err(Error::InvalidArgument(format!(
                "public_key must be a SEC1 uncompressed P-256 point ({PUBLIC_KEY_LEN} bytes starting with 0x04), got {} bytes",
                sec1.len()
            )));
        }
        VerifyingKey::from_sec1_bytes(sec1)
            .map(DeviceKey)
            .map_err(|_| Error::InvalidArgument("public_key is not a point on P-256".into()))
    }

    /// Whether `sig` is this key's signature over `message`.
    pub fn verifies(&self, message: &[u8], sig: &DeviceSignature) -> bool {
        self.0.verify(message, &sig.0).is_ok()
    }
}

/// A parsed device signature.
#[derive(Clone, Debug)]
pub struct DeviceSignature(Signature);

impl DeviceSignature {
    /// Parses strict DER (INVALID_ARGUMENT otherwise); `field` names the request field.
    pub fn parse(field: &str, der: &[u8]) -> Result<DeviceSignature, Error> {
        if der.is_empty() || der.len() > MAX_SIGNATURE_LEN {
            return Err(Error::InvalidArgument(format!(
                "{field} must be a DER ECDSA P-256 signature (8..{MAX_SIGNATURE_LEN} bytes), got {} bytes",
                der.len()
            )));
        }
        Signature::from_der(der).map(DeviceSignature).map_err(|_| {
            Error::InvalidArgument(format!(
                "{field} is not a strict DER ECDSA P-256 signature (SEQUENCE of two minimal INTEGERs in 1..n-1)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::SigningKey;

    fn key() -> SigningKey {
        SigningKey::from_slice(&[7; 32]).unwrap()
    }

    fn point(k: &SigningKey) -> Vec<u8> {
        k.verifying_key().to_sec1_point(false).as_bytes().to_vec()
    }

    #[test]
    fn verifies_der_and_accepts_high_s() {
        let k = key();
        let dk = DeviceKey::parse(&point(&k)).unwrap();
        let sig: Signature = k.sign(b"msg");
        let der = sig.to_der();
        let parsed = DeviceSignature::parse("signature", der.as_bytes()).unwrap();
        assert!(dk.verifies(b"msg", &parsed));
        assert!(!dk.verifies(b"msh", &parsed));
        // The high-s twin (n - s) of a low-s signature verifies as well.
        let low = sig.normalize_s();
        let (r, s) = low.split_scalars();
        let high = Signature::from_scalars(r, -*s).unwrap();
        let high = DeviceSignature::parse("signature", high.to_der().as_bytes()).unwrap();
        assert!(dk.verifies(b"msg", &high));
    }

    #[test]
    fn refuses_loose_encodings() {
        let k = key();
        let sig: Signature = k.sign(b"msg");
        let der = sig.to_der().as_bytes().to_vec();
        // Trailing byte.
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(DeviceSignature::parse("s", &trailing).is_err());
        // Raw r || s (64 bytes) is not DER.
        assert!(DeviceSignature::parse("s", &sig.to_bytes()).is_err());
        // A non-minimal INTEGER (an extra leading zero before r).
        let r_len = der[3] as usize;
        let mut padded = vec![0x30, der[1] + 1, 0x02, (r_len + 1) as u8, 0x00];
        padded.extend_from_slice(&der[4..]);
        assert!(DeviceSignature::parse("s", &padded).is_err());
        // Long-form length where short form fits.
        let mut long = vec![0x30, 0x81, der[1]];
        long.extend_from_slice(&der[2..]);
        assert!(DeviceSignature::parse("s", &long).is_err());
        for bad in [&[][..], &[0x30, 0x00], &[0u8; 73]] {
            assert!(DeviceSignature::parse("s", bad).is_err());
        }
        // Points: compressed, wrong length, off the curve.
        let p = point(&k);
        let compressed = k.verifying_key().to_sec1_point(true);
        assert!(DeviceKey::parse(compressed.as_bytes()).is_err());
        assert!(DeviceKey::parse(&p[..64]).is_err());
        let mut off = p.clone();
        off[64] ^= 1;
        assert!(DeviceKey::parse(&off).is_err());
        assert!(DeviceKey::parse(&[4u8; 65]).is_err());
    }
}
