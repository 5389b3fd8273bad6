//! The bodies of the fuzz targets: one function per kind of outside input, each taking
//! the fuzzer's bytes. `fuzz/libfuzzer/` wraps each in a `fuzz_target!` for cargo-fuzz;
//! this crate's tests run them over the seed corpora and the regression inputs, so they
//! build and pass in every CI run. See fuzz/README.md.
//!
//! A target panics only on a bug: a parser that panics, a round trip that changes what
//! was parsed, or a request answered with `INTERNAL`/`UNKNOWN`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use hsm_service::ceremony::backup_file::BackupFile;
use hsm_service::ceremony::plan::{self, Context, ExistingKey};
use hsm_service::ceremony::shares::{self, ShareFile};
use hsm_service::config::Config;
use hsm_service::signing::{KeyOrigin, KeyState, Usage};

pub mod requests;

/// The names of the targets, as directories of `fuzz/corpus/` and binaries of
/// `fuzz/libfuzzer/`.
pub const TARGETS: &[&str] = &[
    "config", "plan", "share", "backup", "audit", "pskc", "requests",
];

/// Run target `name` on `data`. Panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "config" => config(data),
        "plan" => plan(data),
        "share" => share(data),
        "backup" => backup(data),
        "audit" => audit(data),
        "pskc" => pskc(data),
        "requests" => requests::requests(data),
        _ => panic!("no fuzz target {name:?}"),
    }
}

/// Files a config may name, relative to [`config_dir`], so that validation gets past its
/// existence checks (the seeds name these; see [`seeds`]).
pub const CONFIG_FILES: &[&str] = &[
    "etc/hsm-service/tls/server.crt",
    "etc/hsm-service/tls/server.key",
    "etc/hsm-service/tls/client-ca.crt",
    "etc/hsm-service/tls/client-ca.crl",
    "etc/hsm-service/user.pin",
    "etc/hsm-service/postgres.password",
    "etc/hsm-service/postgres-ca.pem",
    "var/lib/hsm-service/softhsm2.conf",
    "pki/server.crt",
    "pki/server.key",
    "pki/ca.crt",
    "user.pin",
];

/// The directory the config target's file is in: a temporary one holding
/// [`CONFIG_FILES`] (empty).
pub fn config_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("config directory");
        for f in CONFIG_FILES {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("directory");
            std::fs::write(&path, b"").expect("file");
        }
        dir
    })
    .path()
}

/// The service's config file (`hsm-service serve --config`): parse, resolve, validate,
/// then the serve-only rules.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, &config_dir().join("config.toml")) {
        let _ = config.ceremony.validate_for_serve();
        let _ = config.store.audit_chain();
        let _ = config.store.instance_name();
        let _ = config.store.postgres_options();
    }
}

/// The validation context of the plan target: a service with a few keys of each usage,
/// a seed master key, no backup KEK, and an empty backup directory.
fn plan_context() -> &'static Context {
    static CONTEXT: OnceLock<(tempfile::TempDir, Context)> = OnceLock::new();
    let (_, ctx) = CONTEXT.get_or_init(|| {
        let dir = tempfile::tempdir().expect("backup directory");
        let key = |version, state, usage| ExistingKey {
            version,
            state,
            origin: KeyOrigin::Generated,
            usage,
        };
        let existing = BTreeMap::from([
            (
                "assertions".to_owned(),
                vec![
                    key(1, KeyState::VerifyOnly, Usage::Signing),
                    key(2, KeyState::Active, Usage::Signing),
                ],
            ),
            ("root".to_owned(), vec![key(1, KeyState::Active, Usage::Ca)]),
            (
                "documents".to_owned(),
                vec![key(1, KeyState::Published, Usage::Raw)],
            ),
        ]);
        let ctx = Context {
            max_validity_days: 3650,
            existing,
            seed_rotation: true,
            keks: BTreeMap::new(),
            backup_dir: dir.path().to_owned(),
        };
        (dir, ctx)
    });
    ctx
}

/// A ceremony plan file (`hsmctl ceremony propose PLAN`): parse, validate, and the
/// canonical form must parse back to the same plan with the same id.
pub fn plan(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = plan::parse(text) else {
        return;
    };
    for step in &parsed.steps {
        let _ = (step.kind(), step.summary());
    }
    let _ = plan::validate(&parsed, plan_context());
    let canonical = plan::canonical(&parsed).expect("a parsed plan has a canonical form");
    let back = plan::from_canonical(&canonical).expect("the canonical form parses");
    assert_eq!(back, parsed, "canonical round trip changed the plan");
    let again = plan::canonical(&back).expect("canonical form");
    assert_eq!(
        plan::id_of(&again),
        plan::id_of(&canonical),
        "canonical form is not stable"
    );
}

/// Share files of a backup KEK (`hsmctl ceremony ... --share FILE`): the input is up to
/// eight files separated by NUL bytes; each is parsed, a parsed one must encode back to
/// what parses the same, and those of the first one's KEK are combined.
pub fn share(data: &[u8]) {
    let mut files = Vec::new();
    for part in data.split(|b| *b == 0).take(8) {
        let Ok(text) = std::str::from_utf8(part) else {
            continue;
        };
        if let Ok(file) = ShareFile::parse(text) {
            let again = ShareFile::parse(&file.encode()).expect("an encoded share parses");
            assert_eq!(
                (&again.label, again.threshold, again.index, &again.check),
                (&file.label, file.threshold, file.index, &file.check)
            );
            assert_eq!(again.share.as_slice(), file.share.as_slice());
            files.push(file);
        }
    }
    if let Some(first) = files.first() {
        let label = first.label.clone();
        let _ = shares::combine_share_files(&label, &files);
    }
}

/// A key backup file (`restore` step of a ceremony): parse, read every entry, and the
/// file's text must parse back to the same file.
pub fn backup(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = BackupFile::parse(text) else {
        return;
    };
    for entry in &file.keys {
        let _ = entry.chain();
        let _ = entry.wrapped();
        let _ = file.key(&entry.name, Some(entry.version));
        let _ = file.key(&entry.name, None);
    }
    let text = file.to_text().expect("a parsed backup file has a text");
    let back = BackupFile::parse(&text).expect("its text parses");
    assert_eq!(back, file, "text round trip changed the backup file");
}

/// The key id of the checkpoint key the audit seeds are signed with.
pub const AUDIT_KEY_ID: &str = "fuzz-audit-1";

/// The checkpoint key of the audit seeds (PKCS#8, P-256; a test key, public on purpose).
pub const AUDIT_KEY_PKCS8: &[u8] = include_bytes!("audit-key.p8");

fn audit_keys() -> &'static HashMap<String, Vec<u8>> {
    static KEYS: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    KEYS.get_or_init(|| {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, AUDIT_KEY_PKCS8, &rng)
                .expect("the fuzz audit key");
        HashMap::from([(AUDIT_KEY_ID.to_owned(), pair.public_key().as_ref().to_vec())])
    })
}

/// An audit export (`hsmctl audit verify FILE`): the single-chain verifier and the
/// multi-chain one, which must agree on a one-chain input's record count.
pub fn audit(data: &[u8]) {
    let keys = audit_keys();
    let single = hsm_audit::verify(data, keys);
    let _ = single.is_ok();
    let _ = single.is_fully_covered();
    let chains = hsm_audit::verify_chains(data, keys, &hsm_audit::ChainsOptions::default());
    let _ = chains.is_ok();
    let _ = chains.all_problems().count();
    let _ = chains.records();
}

pub mod seeds;

/// The pre-shared key of RFC 6030's figure 6 (and the seeds made from it).
const PSKC_PSK: [u8; 16] = [
    0x12, 0x34, 0x56, 0x78, 0x90, 0x12, 0x34, 0x56, 0x78, 0x90, 0x12, 0x34, 0x56, 0x78, 0x90, 0x12,
];

/// Entries read at most from one input.
const PSKC_MAX_ENTRIES: usize = 256;

/// A PSKC file (RFC 6030; `hsmctl credential import`): the streaming reader with its
/// default limits, then for every entry the policy checks and, with figure 6's
/// pre-shared key or figure 7's password ("qwerty"), the MAC check and decryption of its
/// secret and integers.
pub fn pskc(data: &[u8]) {
    use pskc::crypto::Decryptor;
    let Ok(mut reader) = pskc::Reader::new(data) else {
        return;
    };
    let decryptor = Decryptor::from_psk(reader.header(), pskc::SecretBytes::new(PSKC_PSK.to_vec()))
        .or_else(|_| Decryptor::from_password(reader.header(), b"qwerty"))
        .ok();
    for _ in 0..PSKC_MAX_ENTRIES {
        let Ok(Some(entry)) = reader.next_entry() else {
            break;
        };
        let Ok(package) = entry else {
            continue;
        };
        let key = &package.key;
        let _ = key.unsupported();
        let _ = key.policy.refusals();
        let Some(decryptor) = &decryptor else {
            continue;
        };
        if let Some(secret) = &key.data.secret {
            let _ = decryptor.secret(secret);
        }
        let d = &key.data;
        for value in [&d.counter, &d.time, &d.time_interval, &d.time_drift]
            .into_iter()
            .flatten()
        {
            let _ = decryptor.int(value);
        }
    }
    let _ = reader.trailer();
    let _ = reader.entries_read();
}
