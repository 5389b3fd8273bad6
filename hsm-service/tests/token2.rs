//! Tokens other than the one the service was written against (issue 15 §6): a token that
//! lacks a mechanism the service needs is refused at start with one line naming it.
//! Runs on whichever token `HSM_PKCS11_MODULE` selects (SoftHSM by default; kryoptic in
//! `scripts/token2.sh test`), each told to hide its RFC 5649 key wrap (SoftHSM's
//! `slots.mechanisms` allow list, kryoptic's `mechanisms = ["DENY", ...]`); and on opencryptoki 3.8's
//! software token, a real token without EC and AES key wrap (and with a token info that
//! cryptoki cannot parse), when `scripts/token2.sh start` made one (`HSM_TEST_OCK_*`,
//! printed by `scripts/token2.sh env`).

mod common;

use std::path::Path;
use std::process::Stdio;

use hsm_service::dev::SoftToken;

/// A dev data directory made by the binary itself, with the service stopped again.
fn dev_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _) = common::spawn_dev(dir.path());
    assert!(common::terminate(&mut child).success());
    dir
}

/// Run `serve` on `config` (a file); expect a refusal (within a minute: a service that
/// starts instead is killed) and return its one line.
fn refusal(config: &Path) -> String {
    let logs = tempfile::tempfile().expect("temporary file");
    let mut child = common::serve_command(config)
        .stdout(Stdio::null())
        .stderr(logs.try_clone().expect("clone"))
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    let mut logs = logs;
    std::io::Seek::rewind(&mut logs).expect("rewind");
    std::io::Read::read_to_string(&mut logs, &mut stderr).expect("logs");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "must refuse to start: {stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("hsm-service: "))
        .collect();
    assert_eq!(lines.len(), 1, "one line saying what is wrong: {stderr}");
    lines[0].to_owned()
}

fn module_of(dir: &Path) -> std::path::PathBuf {
    let config = hsm_service::config::Config::load(&dir.join("config.toml")).expect("config");
    config.hsm.module
}

#[test]
fn a_token_without_rfc5649_key_wrap_is_refused_with_one_line() {
    let dir = dev_dir();
    let kind = SoftToken::of_module(&module_of(dir.path()));
    let conf = dir.path().join(kind.conf_name());
    let text = std::fs::read_to_string(&conf).expect("token configuration");
    let hidden = match kind {
        SoftToken::SoftHsm => {
            // An allow list: SoftHSM 2.6.1 ignores a deny list ("-CKM_...") here.
            assert!(text.contains("slots.mechanisms = ALL"), "{text}");
            text.replace(
                "slots.mechanisms = ALL",
                "slots.mechanisms = CKM_SHA_1_HMAC,CKM_SHA256_HMAC,CKM_SHA512_HMAC,\
                 CKM_GENERIC_SECRET_KEY_GEN,CKM_AES_KEY_GEN,CKM_EC_KEY_PAIR_GEN,CKM_ECDSA",
            )
        }
        SoftToken::Kryoptic => {
            assert!(text.contains("dbtype = \"sqlite\"\n"), "{text}");
            text.replace(
                "dbtype = \"sqlite\"\n",
                "dbtype = \"sqlite\"\nmechanisms = [\"DENY\", \"CKM_AES_KEY_WRAP_KWP\"]\n",
            )
        }
    };
    std::fs::write(&conf, hidden).expect("rewrite");
    let line = refusal(&dir.path().join("config.toml"));
    assert!(
        line.contains("lacks PKCS#11 mechanisms the service needs")
            && line.contains("CKM_AES_KEY_WRAP_KWP or CKM_AES_KEY_WRAP_PAD"),
        "{line}"
    );
    // Only the hidden one is named.
    assert!(!line.contains("CKM_ECDSA"), "{line}");
    // And with it back the same directory starts.
    std::fs::write(&conf, text).expect("restore");
    let (mut child, _) = common::spawn_serve(&dir.path().join("config.toml"));
    assert!(common::terminate(&mut child).success());
}

#[test]
fn opencryptoki_3_8_is_refused_naming_what_it_lacks() {
    let (Ok(module), Ok(label), Ok(pin)) = (
        std::env::var("HSM_TEST_OCK_MODULE"),
        std::env::var("HSM_TEST_OCK_LABEL"),
        std::env::var("HSM_TEST_OCK_PIN_FILE"),
    ) else {
        println!("skipped: no opencryptoki token (scripts/token2.sh start; eval \"$(scripts/token2.sh env)\")");
        return;
    };
    let dir = dev_dir();
    let text = std::fs::read_to_string(dir.path().join("config.toml")).expect("config");
    let mut config: toml::Table = toml::from_str(&text).expect("toml");
    let hsm = config
        .get_mut("hsm")
        .and_then(|v| v.as_table_mut())
        .expect("[hsm]");
    hsm.insert("module".into(), module.into());
    hsm.insert("token_label".into(), label.into());
    hsm.insert("user_pin_file".into(), pin.into());
    hsm.remove("softhsm2_conf");
    hsm.remove("kryoptic_conf");
    let path = dir.path().join("ock.toml");
    std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write");
    let line = refusal(&path);
    // opencryptoki 3.8 lacks EC and AES key wrap (pkcsconf -m; the README's table), but
    // the service never gets to ask: its CK_TOKEN_INFO.utcTime is "HH:MM:SS" where
    // PKCS#11 requires 16 digits, and cryptoki refuses to read the token's info.
    assert!(
        line.contains("no initialized token with label \"ock-t2\"")
            && line.contains("C_GetTokenInfo gave a CK_TOKEN_INFO that cannot be read"),
        "{line}"
    );
}
