//! Verify an assertion (compact JWS) against a JWK Set, as a relying party does: the
//! `kid` of the header picks the key, the `alg` must be the key's, the signature is
//! checked with `ring` (ES256, ES384, EdDSA, PS256), then `exp`/`nbf` against the clock
//! (60 s leeway) and, when asked, `aud`.

use base64::Engine;
use serde_json::Value;

/// Why an assertion is not valid.
#[derive(Debug, thiserror::Error)]
#[error("assertion not valid: {0}")]
pub struct JwsError(pub String);

fn err(m: impl Into<String>) -> JwsError {
    JwsError(m.into())
}

fn b64(s: &str, what: &str) -> Result<Vec<u8>, JwsError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| err(format!("{what} is not base64url")))
}

/// Leeway for `exp` and `nbf`, seconds.
pub const LEEWAY_SECONDS: u64 = 60;

/// Verify `jws` with the keys of `jwks_json` at Unix time `now`; with `audience`, its
/// `aud` must contain it. The header and the claims.
pub fn verify(
    jws: &str,
    jwks_json: &str,
    audience: Option<&str>,
    now: u64,
) -> Result<(Value, Value), JwsError> {
    let mut parts = jws.trim().split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err("not a compact JWS (three parts)"));
    };
    let header: Value = serde_json::from_slice(&b64(h, "the header")?)
        .map_err(|_| err("the header is not JSON"))?;
    let claims: Value = serde_json::from_slice(&b64(p, "the payload")?)
        .map_err(|_| err("the payload is not JSON"))?;
    let sig = b64(s, "the signature")?;
    let kid = header["kid"]
        .as_str()
        .ok_or_else(|| err("no kid in the header"))?;
    let alg = header["alg"]
        .as_str()
        .ok_or_else(|| err("no alg in the header"))?;
    let jwks: Value = serde_json::from_str(jwks_json).map_err(|_| err("the JWKS is not JSON"))?;
    let key = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == kid))
        .ok_or_else(|| err(format!("kid {kid} is not in the JWKS")))?;
    if key["alg"].as_str().is_some_and(|a| a != alg) {
        return Err(err(format!("alg {alg} is not the key's")));
    }
    let signed = format!("{h}.{p}");
    let field = |name: &str| -> Result<Vec<u8>, JwsError> {
        b64(
            key[name]
                .as_str()
                .ok_or_else(|| err(format!("the key has no {name}")))?,
            name,
        )
    };
    use ring::signature as rs;
    let ok = match alg {
        "ES256" | "ES384" => {
            let point = [&[4u8][..], &field("x")?, &field("y")?].concat();
            let a = if alg == "ES256" {
                &rs::ECDSA_P256_SHA256_FIXED
            } else {
                &rs::ECDSA_P384_SHA384_FIXED
            };
            rs::UnparsedPublicKey::new(a, &point)
                .verify(signed.as_bytes(), &sig)
                .is_ok()
        }
        "EdDSA" => rs::UnparsedPublicKey::new(&rs::ED25519, &field("x")?)
            .verify(signed.as_bytes(), &sig)
            .is_ok(),
        "PS256" => rs::RsaPublicKeyComponents {
            n: field("n")?,
            e: field("e")?,
        }
        .verify(&rs::RSA_PSS_2048_8192_SHA256, signed.as_bytes(), &sig)
        .is_ok(),
        other => return Err(err(format!("alg {other} is not supported"))),
    };
    if !ok {
        return Err(err("the signature does not verify"));
    }
    let exp = claims["exp"].as_u64().ok_or_else(|| err("no exp"))?;
    if exp + LEEWAY_SECONDS < now {
        return Err(err("expired"));
    }
    if claims["nbf"]
        .as_u64()
        .is_some_and(|nbf| nbf > now + LEEWAY_SECONDS)
    {
        return Err(err("not valid yet"));
    }
    if let Some(aud) = audience {
        let has = match &claims["aud"] {
            Value::String(a) => a == aud,
            Value::Array(list) => list.iter().any(|a| a == aud),
            _ => false,
        };
        if !has {
            return Err(err(format!("aud does not contain {aud}")));
        }
    }
    Ok((header, claims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn es256_jws(claims: &Value) -> (String, String) {
        use p256::ecdsa::signature::Signer;
        let key = p256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
        let point = key.verifying_key().to_sec1_point(false);
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": b.encode(&point.as_bytes()[1..33]), "y": b.encode(&point.as_bytes()[33..])}]});
        let h = b.encode(json!({"alg": "ES256", "kid": "k1"}).to_string());
        let p = b.encode(claims.to_string());
        let sig: p256::ecdsa::Signature = key.sign(format!("{h}.{p}").as_bytes());
        (
            format!("{h}.{p}.{}", b.encode(sig.to_bytes())),
            jwks.to_string(),
        )
    }

    #[test]
    fn es256_verifies_and_checks_exp_and_aud() {
        let (jws, jwks) = es256_jws(&json!({"sub": "a", "exp": 1000, "aud": ["rp"]}));
        let (_, claims) = verify(&jws, &jwks, Some("rp"), 900).unwrap();
        assert_eq!(claims["sub"], "a");
        assert!(verify(&jws, &jwks, Some("other"), 900).is_err());
        assert!(verify(&jws, &jwks, None, 2000).is_err(), "expired");
        // One byte of the payload changed: the signature fails.
        let mut parts: Vec<String> = jws.split('.').map(str::to_owned).collect();
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        parts[1] = b.encode(json!({"sub": "b", "exp": 1000, "aud": ["rp"]}).to_string());
        assert!(verify(&parts.join("."), &jwks, None, 900).is_err());
        assert!(verify("a.b", &jwks, None, 900).is_err());
    }
}
