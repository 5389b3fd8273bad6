//! Tests with software keys standing in for the HSM, verified independently
//! by the RustCrypto crates.

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine as _,
};
use p256::ecdsa::signature::{Signer, Verifier};
use rsa::{sha2::Sha256, traits::PublicKeyParts};
use serde_json::Value;

use super::*;
use crate::common::soft_key::{wrap_octets, SoftKey};

fn b64url(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).unwrap()
}

/// Verifies a compact JWS against a JWK, using only the JWK's members.
fn verify_with_jwk(token: &str, jwk: &Value) -> Result<(), String> {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let sig = b64url(sig);
    let m = |k: &str| b64url(jwk[k].as_str().unwrap());
    let msg = input.as_bytes();
    let bad = |e: String| e;
    match (jwk["kty"].as_str().unwrap(), jwk["crv"].as_str()) {
        ("EC", Some("P-256")) => {
            let key =
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&[&[4][..], &m("x"), &m("y")].concat())
                    .map_err(|e| e.to_string())?;
            let sig = p256::ecdsa::Signature::from_slice(&sig).map_err(|e| e.to_string())?;
            key.verify(msg, &sig).map_err(|e| bad(e.to_string()))
        }
        ("EC", Some("P-384")) => {
            let key =
                p384::ecdsa::VerifyingKey::from_sec1_bytes(&[&[4][..], &m("x"), &m("y")].concat())
                    .map_err(|e| e.to_string())?;
            let sig = p384::ecdsa::Signature::from_slice(&sig).map_err(|e| e.to_string())?;
            key.verify(msg, &sig).map_err(|e| bad(e.to_string()))
        }
        ("OKP", Some("Ed25519")) => {
            let key = ed25519_dalek::VerifyingKey::from_bytes(&m("x").try_into().unwrap())
                .map_err(|e| e.to_string())?;
            let sig = ed25519_dalek::Signature::from_slice(&sig).map_err(|e| e.to_string())?;
            key.verify_strict(msg, &sig).map_err(|e| bad(e.to_string()))
        }
        ("RSA", None) => {
            let (n, e) = (m("n"), m("e"));
            let key = rsa::PublicKey::new(
                rsa::BoxedUint::from_be_slice(&n, n.len() as u32 * 8).unwrap(),
                rsa::BoxedUint::from_be_slice(&e, 64).unwrap(),
            )
            .map_err(|e| e.to_string())?;
            key.pss_verify::<Sha256>(msg, &sig)
                .map_err(|e| e.to_string())
        }
        other => Err(format!("unexpected JWK type {other:?}")),
    }
}

fn params<'a>(aud: &'a [String], amr: &'a [String], extra: &'a str) -> AssertionParams<'a> {
    AssertionParams {
        issuer: "https://idp.example.dk",
        subject: "pseudonym-123",
        audience: aud,
        nonce: "n-0S6_WzA2Mj",
        acr: "https://data.gov.dk/concept/core/nsis/substantial",
        amr,
        auth_time: 1_700_000_000,
        now: 1_700_000_010,
        ttl_seconds: 300,
        jti: "c2f8a1e0-jti",
        extra_claims_json: extra,
        txn_text_sha256: None,
    }
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&b64url(payload)).unwrap()
}

fn header_of(token: &str) -> Value {
    serde_json::from_slice(&b64url(token.split('.').next().unwrap())).unwrap()
}

fn all_keys() -> Vec<SoftKey> {
    vec![
        SoftKey::p256(7),
        SoftKey::p384(7),
        SoftKey::ed25519(7),
        SoftKey::rsa(),
    ]
}

#[test]
fn algorithm_names_round_trip() {
    for alg in [
        Algorithm::Es256,
        Algorithm::Es384,
        Algorithm::EdDsa,
        Algorithm::Ps256,
    ] {
        assert_eq!(alg.jws_name().parse::<Algorithm>().unwrap(), alg);
        assert_eq!(alg.to_string(), alg.jws_name());
    }
    assert!(matches!(
        "RS256".parse::<Algorithm>(),
        Err(SigningError::InvalidArgument(_))
    ));
    assert!("es256".parse::<Algorithm>().is_err());
    assert_eq!(Algorithm::EdDsa.digest(b"x"), None);
    assert_eq!(Algorithm::Es384.digest(b"x").unwrap().len(), 48);
    assert_eq!(Algorithm::Ps256.digest(b"x").unwrap().len(), 32);
}

#[test]
fn rfc7638_thumbprint_example() {
    // RFC 7638 §3.1.
    let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
    let key = PublicKey::from_rsa_components(&b64url(n), &b64url("AQAB")).unwrap();
    assert_eq!(
        thumbprint(&key),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
}

#[test]
fn thumbprint_matches_jwk_members_for_all_types() {
    for k in all_keys() {
        let pk = k.public();
        let jwk = jwk(&pk, "kid", pk.algorithm(), None);
        // Recompute from the JWK with only the required members, sorted.
        let required: &[&str] = match jwk["kty"].as_str().unwrap() {
            "EC" => &["crv", "kty", "x", "y"],
            "OKP" => &["crv", "kty", "x"],
            _ => &["e", "kty", "n"],
        };
        let canonical = format!(
            "{{{}}}",
            required
                .iter()
                .map(|m| format!("\"{m}\":{}", jwk[*m]))
                .collect::<Vec<_>>()
                .join(",")
        );
        let expected = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ));
        assert_eq!(thumbprint(&pk), expected);
    }
}

#[test]
fn ec_points_wrapped_or_raw() {
    for k in [SoftKey::p256(3), SoftKey::p384(3)] {
        let raw = match &k {
            SoftKey::P256(s) => s.verifying_key().to_sec1_point(false).as_bytes().to_vec(),
            SoftKey::P384(s) => s.verifying_key().to_sec1_point(false).as_bytes().to_vec(),
            _ => unreachable!(),
        };
        assert_eq!(PublicKey::from_ec_point(&raw).unwrap(), k.public());
        assert_eq!(
            PublicKey::from_ec_point(&wrap_octets(&raw)).unwrap(),
            k.public()
        );
        let mut compressed = raw[..raw.len() / 2 + 1].to_vec();
        compressed[0] = 0x02;
        assert!(matches!(
            PublicKey::from_ec_point(&compressed),
            Err(SigningError::InvalidKey(_))
        ));
        assert!(PublicKey::from_ec_point(&raw[..raw.len() - 1]).is_err());
    }
    assert!(PublicKey::from_ec_point(&[]).is_err());
}

#[test]
fn ed25519_point_wrapped_or_raw() {
    let k = SoftKey::ed25519(9);
    let SoftKey::Ed25519(sk) = &k else {
        unreachable!()
    };
    let raw = sk.verifying_key().to_bytes();
    assert_eq!(PublicKey::from_ed25519_point(&raw).unwrap(), k.public());
    assert!(PublicKey::from_ed25519_point(&raw[..31]).is_err());
}

#[test]
fn rsa_components_validated() {
    let k = SoftKey::rsa();
    let SoftKey::Rsa(sk) = &k else { unreachable!() };
    // Leading zeros from fixed-width attributes are stripped.
    let mut padded = vec![0, 0];
    padded.extend_from_slice(&sk.n().to_be_bytes());
    let pk = PublicKey::from_rsa_components(&padded, &[0, 1, 0, 1]).unwrap();
    let PublicKey::Rsa { n, e } = &pk else {
        unreachable!()
    };
    assert_ne!(n[0], 0);
    assert_eq!(e, &[1, 0, 1]);
    assert!(PublicKey::from_rsa_components(&[0xff; 128], &[1, 0, 1]).is_err()); // 1024 bits
    assert!(PublicKey::from_rsa_components(&n[..], &[2]).is_err());
    assert!(PublicKey::from_rsa_components(&[], &[]).is_err());
}

#[test]
fn spki_matches_independent_encoders_and_round_trips() {
    use p256::pkcs8::EncodePublicKey;
    for k in all_keys() {
        let pk = k.public();
        let der = pk.to_spki_der().unwrap();
        assert_eq!(PublicKey::from_spki_der(&der).unwrap(), pk);
        let independent = match &k {
            SoftKey::P256(s) => s.verifying_key().to_public_key_der().unwrap().into_vec(),
            SoftKey::P384(s) => s.verifying_key().to_public_key_der().unwrap().into_vec(),
            // RFC 8410 §10.1 fixed prefix followed by the key.
            SoftKey::Ed25519(s) => [
                &hex("302a300506032b6570032100")[..],
                s.verifying_key().as_bytes(),
            ]
            .concat(),
            SoftKey::Rsa(s) => rsa::pkcs8::EncodePublicKey::to_public_key_der(&s.to_public_key())
                .unwrap()
                .into_vec(),
        };
        assert_eq!(der, independent, "{:?}", pk.algorithm());
    }
    assert!(PublicKey::from_spki_der(b"\x30\x00").is_err());
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn ecdsa_raw_der_conversions() {
    let k = p256::ecdsa::SigningKey::from_slice(&[5; 32]).unwrap();
    for i in 0..32u8 {
        let msg = [i; 10];
        let sig: p256::ecdsa::Signature = k.sign(&msg);
        let der = ecdsa_raw_to_der(&sig.to_bytes()).unwrap();
        // p256's DER parser is strict, so this also checks minimal encoding.
        let parsed = p256::ecdsa::DerSignature::from_bytes(&der).unwrap();
        k.verifying_key().verify(&msg, &parsed).unwrap();
        assert_eq!(der, sig.to_der().as_bytes());
        assert_eq!(ecdsa_der_to_raw(&der, 32).unwrap(), sig.to_bytes().to_vec());
    }
    // High bit set gets a zero byte; leading zeros are dropped.
    let mut raw = [0u8; 64];
    raw[0] = 0x80;
    raw[63] = 1;
    let der = ecdsa_raw_to_der(&raw).unwrap();
    assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x21, 0x00]);
    assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x01]);
    assert_eq!(ecdsa_der_to_raw(&der, 32).unwrap(), raw);
    assert!(ecdsa_raw_to_der(&raw[..63]).is_err());
    assert!(ecdsa_raw_to_der(&[0; 64]).is_err());
    assert!(ecdsa_der_to_raw(&der, 16).is_err());
    assert!(ecdsa_der_to_raw(&der[..der.len() - 1], 32).is_err());
}

#[test]
fn assertions_verify_with_each_algorithm() {
    let aud = vec!["client-1".to_string()];
    let amr = vec!["pwd".to_string(), "otp".to_string()];
    for k in all_keys() {
        let alg = k.algorithm();
        let p = params(
            &aud,
            &amr,
            r#"{"loa":"substantial","cpr":{"verified":true}}"#,
        );
        let input = prepare_assertion(alg, "key-1", &p).unwrap();
        assert_eq!(input.expires_at(), 1_700_000_310);
        let sig = k.sign(input.bytes(), input.digest(alg));
        let token = input.finish(&sig);

        let pk = k.public();
        let jwk = jwk(&pk, "key-1", alg, None);
        verify_with_jwk(&token, &jwk).unwrap();

        // Tampering with the payload must break verification.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"sub":"someone-else"}"#);
        parts[1] = &forged;
        assert!(verify_with_jwk(&parts.join("."), &jwk).is_err());

        assert_eq!(
            header_of(&token),
            serde_json::json!({"alg": alg.jws_name(), "kid": "key-1", "typ": "JWT"})
        );
        let c = claims_of(&token);
        assert_eq!(c["iss"], "https://idp.example.dk");
        assert_eq!(c["sub"], "pseudonym-123");
        assert_eq!(c["aud"], "client-1");
        assert_eq!(c["iat"], 1_700_000_010u64);
        assert_eq!(c["nbf"], 1_700_000_010u64);
        assert_eq!(c["exp"], 1_700_000_310u64);
        assert_eq!(c["auth_time"], 1_700_000_000u64);
        assert_eq!(c["amr"], serde_json::json!(["pwd", "otp"]));
        assert_eq!(c["cpr"]["verified"], true);
    }
}

#[test]
fn header_and_payload_are_exact_json() {
    let p = params(&[], &[], "");
    let input = prepare_assertion(Algorithm::Es256, "k\"1", &p).unwrap();
    let s = std::str::from_utf8(input.bytes()).unwrap();
    let (h, c) = s.split_once('.').unwrap();
    assert_eq!(b64url(h), br#"{"alg":"ES256","kid":"k\"1","typ":"JWT"}"#);
    assert_eq!(
        String::from_utf8(b64url(c)).unwrap(),
        concat!(
            r#"{"iss":"https://idp.example.dk","sub":"pseudonym-123","iat":1700000010,"#,
            r#""nbf":1700000010,"exp":1700000310,"jti":"c2f8a1e0-jti","nonce":"n-0S6_WzA2Mj","#,
            r#""acr":"https://data.gov.dk/concept/core/nsis/substantial","auth_time":1700000000}"#
        )
    );
}

#[test]
fn audience_and_optional_claims() {
    let many = vec!["a".to_string(), "b".to_string()];
    let c = claims_of(
        &prepare_assertion(Algorithm::EdDsa, "k", &params(&many, &[], ""))
            .unwrap()
            .finish(&[0; 64]),
    );
    assert_eq!(c["aud"], serde_json::json!(["a", "b"]));
    assert!(c.get("amr").is_none());

    let mut p = params(&[], &[], "  ");
    p.nonce = "";
    let c = claims_of(
        &prepare_assertion(Algorithm::EdDsa, "k", &p)
            .unwrap()
            .finish(&[0; 64]),
    );
    assert!(c.get("aud").is_none());
    assert!(c.get("nonce").is_none());
    assert!(c.get("amr").is_none());
}

fn invalid_arg(p: &AssertionParams) -> String {
    match prepare_assertion(Algorithm::Es256, "k", p) {
        Err(SigningError::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn reserved_claims_cannot_be_overridden() {
    for claim in [
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
    ] {
        let extra = format!(r#"{{"ok":1,"{claim}":"x"}}"#);
        let msg = invalid_arg(&params(&[], &[], &extra));
        assert!(msg.contains(&format!("\"{claim}\"")), "{msg}");
    }
}

#[test]
fn extra_claims_must_be_a_sane_object() {
    for bad in ["[1,2]", "\"str\"", "42", "null", "{", "{\"a\":1} x"] {
        let msg = invalid_arg(&params(&[], &[], bad));
        assert!(msg.contains("extra_claims_json"), "{bad}: {msg}");
    }
    let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(20_000));
    assert!(invalid_arg(&params(&[], &[], &big)).contains("limit"));
    let deep = format!("{{\"x\":{}1{}}}", "[".repeat(40), "]".repeat(40));
    assert!(invalid_arg(&params(&[], &[], &deep)).contains("nests"));
    let ok = format!("{{\"x\":{}1{}}}", "[".repeat(10), "]".repeat(10));
    assert!(prepare_assertion(Algorithm::Es256, "k", &params(&[], &[], &ok)).is_ok());
}

#[test]
fn required_fields_and_times_checked() {
    let mut p = params(&[], &[], "");
    p.subject = "";
    assert!(invalid_arg(&p).contains("subject"));
    let mut p = params(&[], &[], "");
    p.ttl_seconds = 0;
    assert!(invalid_arg(&p).contains("ttl"));
    let mut p = params(&[], &[], "");
    p.now = u64::MAX;
    assert!(invalid_arg(&p).contains("overflows"));
    let empty_aud = vec![String::new()];
    assert!(invalid_arg(&params(&empty_aud, &[], "")).contains("audience"));
}

#[test]
fn jwk_with_chain_and_jwks() {
    let pk = SoftKey::p256(1).public();
    let chain = vec![b"leaf-der".to_vec(), b"root-der".to_vec()];
    let j = jwk(&pk, "kid-1", Algorithm::Es256, Some(&chain));
    assert_eq!(j["kty"], "EC");
    assert_eq!(j["crv"], "P-256");
    assert_eq!(j["use"], "sig");
    assert_eq!(j["alg"], "ES256");
    assert_eq!(j["kid"], "kid-1");
    assert_eq!(
        j["x5c"],
        serde_json::json!([STANDARD.encode(b"leaf-der"), STANDARD.encode(b"root-der")])
    );
    assert_eq!(
        j["x5t#S256"],
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, b"leaf-der"))
    );
    assert!(jwk(&pk, "k", Algorithm::Es256, Some(&[]))
        .get("x5c")
        .is_none());

    let set: Value = serde_json::from_str(&jwks(&[j.clone(), j])).unwrap();
    assert_eq!(set["keys"].as_array().unwrap().len(), 2);
}
