//! `hsmctl` for the app authenticator (issue 13): the README's full login with the app
//! (activation, challenge, approve, assertion verified against the JWKS), its refusals,
//! and QR codes of provisioning URIs and activation links.

mod common;

use common::{hsmctl, json, stdout};
use hsm_service::testing::DevEnv;

/// Decode a QR code from a greyscale picture (`dark(x, y)`), with an independent decoder.
fn decode(w: usize, h: usize, dark: impl Fn(usize, usize) -> bool) -> String {
    let mut img =
        rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| if dark(x, y) { 0 } else { 255 });
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the picture");
    grids[0].decode().expect("decodes").1
}

/// A terminal QR code (half blocks; a block is a light module) back into a picture,
/// scaled up 4x so the detector has pixels to work with.
fn decode_terminal(text: &str) -> String {
    let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
    let width = lines[0].len();
    assert!(lines.iter().all(|l| l.len() == width), "a rectangle");
    let rows = lines.len() * 2;
    const S: usize = 4;
    decode(width * S, rows * S, |x, y| {
        let (mx, my) = (x / S, y / S);
        let c = lines[my / 2][mx];
        let top = my % 2 == 0;
        let light = match c {
            '\u{2588}' => true,
            '\u{2580}' => top,
            '\u{2584}' => !top,
            ' ' => false,
            other => panic!("unexpected character {other:?}"),
        };
        !light
    })
}

fn decode_png(path: &std::path::Path) -> String {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).expect("open png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(info.color_type, png::ColorType::Grayscale);
    let (w, h) = (info.width as usize, info.height as usize);
    decode(w, h, |x, y| buf[y * info.line_size + x] < 128)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_create_reveal_qr_terminal_and_png() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let png_path = env.dir.path().join("totp.png");
    // A file that existed with a wider mode is narrowed: the PNG holds the seed.
    std::fs::write(&png_path, b"old").expect("pre-existing file");
    let png_arg = png_path.display().to_string();

    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "credential",
            "create",
            "--kind",
            "totp",
            "--reveal",
            "--qr",
            "--qr-png",
            &png_arg,
            "--issuer",
            "MitID",
            "--account",
            "alice",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    let uri = v["provisioning_uri"].as_str().expect("uri").to_owned();
    assert!(
        uri.starts_with("otpauth://totp/MitID:alice?secret="),
        "{uri}"
    );
    assert_eq!(decode_terminal(v["qr"].as_str().expect("qr")), uri);
    assert_eq!(decode_png(&png_path), uri);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&png_path)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    // Text output: the URI line, then the code drawn below it.
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "create", "--kind", "hotp", "--reveal", "--qr"],
    );
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let uri = text
        .lines()
        .find_map(|l| l.strip_prefix("provisioning URI (shown once): "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    let picture: String = text
        .lines()
        .skip_while(|l| !l.starts_with("provisioning URI"))
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(decode_terminal(&picture), uri);

    // Without --reveal there is no URI to draw: a usage error before any call.
    for flags in [&["--qr"][..], &["--qr-png", &png_arg][..]] {
        let mut args = vec!["credential", "create", "--kind", "totp"];
        args.extend_from_slice(flags);
        let out = hsmctl(&env, addr, "login-service", &args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--reveal"),
            "{out:?}"
        );
    }
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "list", "--json"],
    );
    assert_eq!(json(&out)["credentials"].as_array().expect("list").len(), 2);
}

/// `hsmctl sign verify`: a relying party's check of an assertion against the JWKS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_verify_checks_an_assertion_against_the_jwks() {
    let mut env = DevEnv::new();
    env.allow_unbound_assertions("login-service");
    let server = env.start().await;
    let addr = server.local_addr();
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "sign",
            "assertion",
            "--subject",
            "citizen-1",
            "--aud",
            "https://rp.example",
            "--acr",
            "https://data.gov.dk/concept/core/nsis/Substantial",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let jws = stdout(&out).trim().to_owned();
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &[
            "sign",
            "verify",
            &jws,
            "--aud",
            "https://rp.example",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(
        (v["valid"].as_bool(), v["claims"]["sub"].as_str()),
        (Some(true), Some("citizen-1"))
    );
    // Another audience, and a signature of another payload: exit 1, with the reason.
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["sign", "verify", &jws, "--aud", "https://other.example"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout(&out).starts_with("INVALID: aud"), "{out:?}");
    let parts: Vec<&str> = jws.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0], "eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwfQ", parts[2]
    );
    let out = hsmctl(&env, addr, "login-service", &["sign", "verify", &forged]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout(&out).contains("does not verify"), "{out:?}");
}

/// The value after `prefix` on a line of `text`.
fn line_value(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in {text}"))
        .trim()
        .to_owned()
}

const HIGH: &str = "https://data.gov.dk/concept/core/nsis/High";

/// The README's walkthrough, command for command: a first device activated after
/// identity proofing, a login approved in the app with the binding code from the login
/// page, and the assertion verified against the JWKS (by `hsmctl sign verify` and by
/// jsonwebtoken); the app checks every challenge's server signature against the JWKS
/// usage "challenge", and so does this test, independently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_login_with_the_app() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let h = |args: &[&str]| hsmctl(&env, addr, "login-service", args);
    let state = env.dir.path().join("anna.json");
    let state_arg = state.display().to_string();

    // 1. The login service begins the activation (first device: no approval needed).
    let out = h(&[
        "device",
        "begin",
        "--subject",
        "citizen-4711",
        "--display-name",
        "Anna's phone",
        "--qr",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let code = line_value(&text, "activation code (shown once): ");
    let link = line_value(&text, "activation link: ");
    assert_eq!(code.len(), 8, "{text}");
    assert!(link.starts_with("hsm-activation:?id="), "{text}");
    let picture: String = text
        .lines()
        .skip_while(|l| !l.starts_with("activation link: "))
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(decode_terminal(&picture), link, "the QR code is the link");

    // 2. The phone: scans the link, the citizen types the code.
    let out = h(&[
        "app",
        "activate",
        "--subject",
        "citizen-4711",
        "--activation",
        &link,
        "--code",
        &code,
        "--state",
        &state_arg,
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let device = json(&out);
    assert_eq!(device["state"], "ACTIVE");
    let device_id = device["device_id"].as_str().expect("device id").to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state)
            .expect("state")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let saved = std::fs::read_to_string(&state).expect("state");
    let secret: serde_json::Value = serde_json::from_str(&saved).expect("state JSON");
    let secret = secret["private_key_p256_hex"]
        .as_str()
        .expect("key")
        .to_owned();
    assert_eq!(secret.len(), 64);
    assert!(!stdout(&out).contains(&secret), "the key is never printed");
    let out = h(&["device", "list", "--subject", "citizen-4711", "--json"]);
    let list = json(&out);
    assert_eq!(
        list["devices"].as_array().expect("devices").len(),
        1,
        "{list}"
    );
    assert_eq!(list["devices"][0]["device_id"], device_id.as_str());
    assert_eq!(
        list["devices"][0]["public_key_sha256"],
        device["public_key_sha256"]
    );

    // 3. A login: the login service asks and shows the binding code on the login page.
    let out = h(&[
        "approval",
        "create",
        "--subject",
        "citizen-4711",
        "--text",
        "Log in to borger.dk",
        "--service-provider",
        "borger.dk",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let challenge = text
        .lines()
        .find_map(|l| l.strip_prefix("challenge "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    let binding = line_value(&text, "binding code ");
    assert!(
        binding.len() == 2 && binding.bytes().all(|b| b.is_ascii_digit()),
        "{text}"
    );

    // 4. The phone lists it (checked against the JWKS usage "challenge") and shows the
    // signed text, never the binding code.
    let out = h(&["app", "pending", "--state", &state_arg]);
    assert!(out.status.success(), "{out:?}");
    let shown = stdout(&out);
    assert!(
        shown.contains(&format!("challenge {challenge} LOGIN from borger.dk")),
        "{shown}"
    );
    assert!(shown.contains("    Log in to borger.dk"), "{shown}");
    assert!(shown.contains("(signed by the service)"), "{shown}");
    // Independently: the server signature over the payload verifies with the JWKS key.
    check_server_signature(&env, addr, &challenge).await;

    // 5. The login service waits while the citizen approves with the binding code.
    let wait = common::command(&env, addr, "login-service")
        .args(["approval", "wait", &challenge, "--timeout", "60"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("approval wait");
    let out = h(&[
        "app",
        "approve",
        &challenge,
        "--binding",
        &binding,
        "--state",
        &state_arg,
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains(" APPROVED "), "{out:?}");
    let waited = wait.wait_with_output().expect("wait");
    assert!(waited.status.success(), "{waited:?}");
    let evidence = line_value(&stdout(&waited), "evidence ");

    // 6. The assertion, and a relying party's check of it against the JWKS.
    let out = h(&[
        "sign",
        "assertion",
        "--subject",
        "citizen-4711",
        "--aud",
        "https://bank.example",
        "--acr",
        HIGH,
        "--evidence",
        &evidence,
    ]);
    assert!(out.status.success(), "{out:?}");
    let jws = stdout(&out).trim().to_owned();
    let out = h(&[
        "sign",
        "verify",
        &jws,
        "--aud",
        "https://bank.example",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(
        v["claims"]["amr"],
        serde_json::json!(["pop", "user"]),
        "{v}"
    );
    assert_eq!(v["claims"]["acr"], HIGH);
    let jwks = json(&h(&["keys", "jwks", "--json"]));
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).expect("JWKS");
    let header = jsonwebtoken::decode_header(&jws).expect("header");
    let jwk = set
        .find(header.kid.as_deref().expect("kid"))
        .expect("kid in JWKS");
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["https://bank.example"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &jws,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key"),
        &validation,
    )
    .expect("verifies with jsonwebtoken")
    .claims;
    assert_eq!(claims["sub"], "citizen-4711");

    // The answer is single use; the evidence too.
    let out = h(&[
        "app",
        "approve",
        &challenge,
        "--binding",
        &binding,
        "--state",
        &state_arg,
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // A wrong binding code cancels (fail closed: exit 1); deny and not-me take effect
    // (exit 0).
    for (decision, expect, exit) in [
        ("approve", "CANCELLED", 1),
        ("deny", "DENIED", 0),
        ("not-me", "REPORTED", 0),
    ] {
        let out = h(&[
            "approval",
            "create",
            "--subject",
            "citizen-4711",
            "--text",
            "Pay 100 DKK to shop.example",
            "--purpose",
            "transaction",
            "--json",
        ]);
        assert!(out.status.success(), "{out:?}");
        let c = json(&out);
        let id = c["challenge_id"].as_str().expect("id").to_owned();
        let right = c["binding_code"].as_str().expect("binding").to_owned();
        let wrong = format!("{:02}", (right.parse::<u32>().expect("digits") + 1) % 100);
        let mut args = vec!["app", decision, &id, "--state", &state_arg, "--json"];
        if decision == "approve" {
            args.extend(["--binding", &wrong]);
        }
        let out = h(&args);
        assert_eq!(out.status.code(), Some(exit), "{decision}: {out:?}");
        assert_eq!(json(&out)["state"], expect, "{decision}: {out:?}");
        let out = h(&["approval", "wait", &id, "--timeout", "5"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(stdout(&out).contains(&format!(" {expect} ")), "{out:?}");
    }

    // A state file others may read is refused; an existing one is never overwritten.
    let out = h(&[
        "app",
        "activate",
        "--subject",
        "citizen-4711",
        "--activation",
        &link,
        "--code",
        &code,
        "--state",
        &state_arg,
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        std::fs::read_to_string(&state)
            .expect("state")
            .contains(&secret),
        "the device key is kept"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = h(&["app", "pending", "--state", &state_arg]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
            "{out:?}"
        );
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    // Revoked: the device can no longer list.
    let out = h(&["device", "revoke", &device_id, "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["state"], "REVOKED");
    let out = h(&["app", "pending", "--state", &state_arg]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// GetChallenge, then its server_signature over its payload with the key of the JWKS
/// usage "challenge" named by server_kid, checked with p256 here (not hsm_client::app).
async fn check_server_signature(env: &DevEnv, addr: std::net::SocketAddr, challenge: &str) {
    use base64::Engine;
    use p256::ecdsa::signature::Verifier;
    let out = hsmctl(
        env,
        addr,
        "login-service",
        &["keys", "jwks", "--usage", "challenge", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let jwks = json(&out);
    let client = hsm_client::ClientConfig::dev(env.dir.path(), "login-service")
        .with_endpoint(format!("https://{addr}"))
        .connect()
        .await
        .expect("connect");
    let c = client
        .approvals()
        .get_challenge(hsm_client::proto::GetChallengeRequest {
            challenge_id: challenge.to_owned(),
        })
        .await
        .expect("GetChallenge")
        .into_inner();
    let key = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == c.server_kid.as_str())
        .unwrap_or_else(|| panic!("kid {} not in {jwks}", c.server_kid));
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let coord = |n: &str| {
        b.decode(key[n].as_str().expect("coordinate"))
            .expect("base64url")
    };
    let point = [&[4u8][..], &coord("x"), &coord("y")].concat();
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("P-256 point");
    let sig = p256::ecdsa::Signature::from_der(&c.server_signature).expect("DER");
    vk.verify(&c.payload, &sig)
        .expect("the server signature verifies");
    assert!(c.payload.starts_with(b"hsm.v1.challenge.v1\0"));
}

/// Activate a device for `subject` with the CLI: its state file and device id.
fn activate(
    env: &DevEnv,
    addr: std::net::SocketAddr,
    subject: &str,
    extra: &[&str],
    name: &str,
) -> (String, String) {
    let mut args = vec!["device", "begin", "--subject", subject, "--json"];
    args.extend_from_slice(extra);
    let out = hsmctl(env, addr, "login-service", &args);
    assert!(out.status.success(), "{out:?}");
    let begun = json(&out);
    let state = env.dir.path().join(name).display().to_string();
    // The link carries the code: no --code needed.
    let out = hsmctl(
        env,
        addr,
        "login-service",
        &[
            "app",
            "activate",
            "--subject",
            subject,
            "--activation",
            begun["activation_link"].as_str().expect("link"),
            "--state",
            &state,
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    (
        state,
        json(&out)["device_id"].as_str().expect("id").to_owned(),
    )
}

/// A second phone needs a challenge of purpose activate-device approved on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_device_is_approved_on_the_first() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let h = |args: &[&str]| hsmctl(&env, addr, "login-service", args);
    let (first, _) = activate(&env, addr, "citizen-9", &[], "first.json");

    // An activation for someone else's subject is refused by the app itself.
    let out = h(&["device", "begin", "--subject", "citizen-10", "--json"]);
    let link = json(&out)["activation_link"]
        .as_str()
        .expect("link")
        .to_owned();
    let other = env.dir.path().join("other.json").display().to_string();
    let out = h(&[
        "app",
        "activate",
        "--subject",
        "citizen-9",
        "--activation",
        &link,
        "--state",
        &other,
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is for subject"),
        "{out:?}"
    );
    assert!(!std::path::Path::new(&other).exists());

    // Without an approving challenge: refused, saying why.
    let out = h(&["device", "begin", "--subject", "citizen-9"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"),
        "{out:?}"
    );

    let out = h(&[
        "approval",
        "create",
        "--subject",
        "citizen-9",
        "--text",
        "Add a new phone",
        "--purpose",
        "activate-device",
        "--json",
    ]);
    let c = json(&out);
    let id = c["challenge_id"].as_str().expect("id").to_owned();
    let binding = c["binding_code"].as_str().expect("binding").to_owned();
    let out = h(&[
        "app",
        "approve",
        &id,
        "--binding",
        &binding,
        "--state",
        &first,
    ]);
    assert!(out.status.success(), "{out:?}");
    let (_, second) = activate(
        &env,
        addr,
        "citizen-9",
        &["--authorized-by", &id],
        "second.json",
    );
    let out = h(&["device", "list", "--subject", "citizen-9", "--json"]);
    let list = json(&out);
    let devices = list["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 2, "{list}");
    assert_eq!(devices[1]["device_id"], second.as_str());
    // The approving challenge is used up.
    let out = h(&[
        "device",
        "begin",
        "--subject",
        "citizen-9",
        "--authorized-by",
        &id,
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `hsmctl bench --scenario approve`: every login APPROVED, the devices revoked after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_approve_scenario() {
    let mut env = DevEnv::new();
    // Push-fatigue limit per subject: not what the bench measures.
    env.config.devices.max_challenges_per_minute = 1000;
    let server = env.start().await;
    let out = hsmctl(
        &env,
        server.local_addr(),
        "login-service",
        &[
            "bench",
            "--scenario",
            "approve",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--concurrency",
            "2",
            "--credentials",
            "3",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["scenario"], "approve");
    let requests = v["requests"].as_u64().expect("requests");
    assert!(requests > 0, "{v}");
    assert_eq!(v["outcomes"]["APPROVED"].as_u64(), Some(requests), "{v}");
    assert_eq!(v["accepted_share"].as_f64(), Some(1.0), "{v}");
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
}
