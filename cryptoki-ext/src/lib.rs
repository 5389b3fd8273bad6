//! `MechanismType`s that cryptoki 0.12 cannot name.
//!
//! cryptoki 0.12 knows the mechanisms of PKCS#11 3.0 (and vendor-defined ones, from
//! `CKM_VENDOR_DEFINED` up) only: `MechanismType::try_from` refuses the others and
//! `Pkcs11::get_mechanism_list` silently drops them. PKCS#11 3.1 added
//! `CKM_AES_KEY_WRAP_KWP` (RFC 5649 key wrap with padding), which kryoptic implements in
//! place of `CKM_AES_KEY_WRAP_PAD`. hsm-service's PKCS#11 boundary (`hsm/`) uses this
//! crate to ask the token about it (`C_GetMechanismInfo`) and to call it
//! (`Mechanism::VendorDefined`, which passes any type through as a raw `CK_MECHANISM`).
//! The rest of the workspace forbids unsafe code; this crate allows it for one line.

use cryptoki::mechanism::MechanismType;
use cryptoki_sys::CK_MECHANISM_TYPE;

/// `CKM_AES_KEY_WRAP_KWP` (PKCS#11 3.1, 0x210B): AES key wrap with padding, RFC 5649.
pub const CKM_AES_KEY_WRAP_KWP: CK_MECHANISM_TYPE = 0x0000_210B;

/// The PKCS#11 3.1 mechanisms this crate hands out.
const KNOWN: [CK_MECHANISM_TYPE; 1] = [CKM_AES_KEY_WRAP_KWP];

/// The `MechanismType` of `val`: cryptoki's own when it knows it, else one of [`KNOWN`];
/// `None` for anything else (this is not a way around cryptoki's checks in general).
pub fn mechanism_type(val: CK_MECHANISM_TYPE) -> Option<MechanismType> {
    if !KNOWN.contains(&val) {
        // (cryptoki logs an ERROR for a type it does not know: ask it only about others.)
        return MechanismType::try_from(val).ok();
    }
    // SAFETY: `MechanismType` is `#[repr(transparent)]` over its one field, a
    // `CK_MECHANISM_TYPE` (cryptoki relies on that layout itself, to read a
    // `Vec<CK_MECHANISM_TYPE>` as mechanism types), and any value of that integer is a
    // valid bit pattern for it. cryptoki passes the value through unchanged to
    // `C_GetMechanismInfo` and, inside `Mechanism::VendorDefined`, to `C_WrapKey` /
    // `C_UnwrapKey`.
    #[allow(unsafe_code)]
    let t = unsafe { std::mem::transmute::<CK_MECHANISM_TYPE, MechanismType>(val) };
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_types_come_from_cryptoki_and_kwp_is_its_own_value() {
        assert_eq!(
            mechanism_type(cryptoki_sys::CKM_AES_KEY_WRAP_PAD),
            Some(MechanismType::AES_KEY_WRAP_PAD)
        );
        let kwp = mechanism_type(CKM_AES_KEY_WRAP_KWP).expect("KWP");
        assert_eq!(*kwp, CKM_AES_KEY_WRAP_KWP);
        assert_ne!(kwp, MechanismType::AES_KEY_WRAP_PAD);
        assert_eq!(cryptoki_sys::CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_KWP);
    }

    #[test]
    fn other_unknown_values_are_refused() {
        assert_eq!(mechanism_type(0x0000_210C), None);
        assert_eq!(mechanism_type(0x0000_7FFF), None);
    }
}
