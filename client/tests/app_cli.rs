//! `hsmctl` for the app authenticator (issue 13): QR codes of provisioning URIs.

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
