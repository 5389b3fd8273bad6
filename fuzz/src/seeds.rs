//! The seed corpora, made from the project's own test vectors and encoders, so that the
//! fuzzer starts from inputs each parser accepts. `cargo test -p hsm-fuzz --test corpus
//! -- --ignored write_seeds` writes them to `fuzz/corpus/<target>/`; a test checks that
//! every seed of the parsers is accepted.

use std::path::Path;

use hsm_audit::{Actor, Chain, CheckpointSigner, Details, Event};
use hsm_proto::v1 as pb;
use prost::Message;

use crate::requests::{CALLERS, METHODS};

/// One seed: target, file name, bytes.
pub type Seed = (&'static str, String, Vec<u8>);

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn file(target: &'static str, name: &str, path: &str) -> Seed {
    let bytes = std::fs::read(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    (target, name.to_owned(), bytes)
}

/// Every seed.
pub fn all() -> Vec<Seed> {
    // The example's absolute paths made relative to the target's directory, where those
    // files exist.
    let example = std::fs::read_to_string(root().join("hsm-service/config.example.toml"))
        .expect("config.example.toml")
        .replace("\"/etc/", "\"etc/")
        .replace("\"/var/", "\"var/");
    let mut seeds = vec![("config", "example".to_owned(), example.into_bytes())];
    seeds.push(("config", "dev".into(), dev_config().into_bytes()));
    for plan in [
        "example-backup",
        "example-restore",
        "example-root-and-assertion",
        "rotate-seed-master-key",
    ] {
        seeds.push(file("plan", plan, &format!("ceremonies/{plan}.toml")));
    }
    for n in 2..=10 {
        let name = format!("figure{n}");
        seeds.push(file("pskc", &name, &format!("pskc/tests/data/{name}.xml")));
    }
    seeds.extend(shares());
    seeds.extend(backups());
    seeds.extend(audit_logs());
    seeds.extend(requests());
    seeds
}

/// A minimal config, the other end from the full example.
fn dev_config() -> String {
    r#"data_dir = "var/lib/hsm-service"

[server]
listen = "127.0.0.1:50051"
cert = "pki/server.crt"
key = "pki/server.key"
client_ca = "pki/ca.crt"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "hsm-dev"
user_pin_file = "user.pin"

[[client]]
cn = "login-service"
role = "login-service"

[[client]]
cn = "officer-1"
role = "officer"

[[client]]
cn = "auditor"
role = "auditor"
"#
    .to_owned()
}

fn shares() -> Vec<Seed> {
    let kek: Vec<u8> = (1..=32).collect();
    let files = hsm_service::ceremony::shares::split_kek("backup-kek-1", &kek, 2, 3)
        .expect("split the test KEK");
    let text: Vec<String> = files.iter().map(|f| f.encode().to_string()).collect();
    vec![
        ("share", "one".into(), text[0].clone().into_bytes()),
        ("share", "quorum".into(), text[..2].join("\0").into_bytes()),
        ("share", "all".into(), text.join("\0").into_bytes()),
    ]
}

fn backups() -> Vec<Seed> {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use hsm_service::ceremony::backup_file::{
        BackupEntry, BackupFile, PublicKey, FORMAT, FORMAT_V1,
    };
    use hsm_service::signing::Usage;
    let entry = |name: &str, version, algorithm: &str, kind: &str, usage, public| BackupEntry {
        name: name.into(),
        version,
        algorithm: algorithm.into(),
        kind: kind.into(),
        usage,
        id: STANDARD.encode([1, 2, 3]),
        public,
        wrapped_private_key: STANDARD.encode([9; 40]),
        certificate_chain: vec![STANDARD.encode([0x30, 1])],
    };
    let ec = PublicKey::Ec {
        ec_point: STANDARD.encode([4; 65]),
    };
    let rsa = PublicKey::Rsa {
        modulus: STANDARD.encode([0xc5; 384]),
        public_exponent: STANDARD.encode([1, 0, 1]),
    };
    let ed = PublicKey::Edwards {
        ec_point: STANDARD.encode([4; 34]),
    };
    let v2 = BackupFile {
        format: FORMAT.into(),
        plan_id: "ab".repeat(32),
        kek_label: "backup-kek-1".into(),
        kek_check: "0123456789abcdef".into(),
        keys: vec![
            entry("documents", 1, "ES256", "ec-p256", Some(Usage::Raw), ec),
            entry("root", 2, "PS256", "rsa-3072", Some(Usage::Ca), rsa),
            entry(
                "assertions",
                1,
                "EdDSA",
                "ed25519",
                Some(Usage::Signing),
                ed,
            ),
        ],
    };
    let mut v1 = v2.clone();
    v1.format = FORMAT_V1.into();
    for k in &mut v1.keys {
        k.usage = None;
    }
    [("v2", v2), ("v1", v1)]
        .into_iter()
        .map(|(name, f)| {
            let text = f.to_text().expect("backup text");
            ("backup", name.to_owned(), text.into_bytes())
        })
        .collect()
}

struct Signer(ring::signature::EcdsaKeyPair);

impl CheckpointSigner for Signer {
    fn key_id(&self) -> String {
        crate::AUDIT_KEY_ID.to_owned()
    }
    fn sign(&self, statement: &[u8]) -> Result<Vec<u8>, String> {
        let rng = ring::rand::SystemRandom::new();
        self.0
            .sign(&rng, statement)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| e.to_string())
    }
}

fn audit_logs() -> Vec<Seed> {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let signer = Signer(
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            crate::AUDIT_KEY_PKCS8,
            &rng,
        )
        .expect("the fuzz audit key"),
    );
    let t0 = 1_700_000_000_000;
    let mut chain = Chain::new();
    let mut lines = Vec::new();
    let officer = Actor::new("officer-1", &"ab".repeat(32));
    for i in 0..5u64 {
        let event = Event::new(
            t0 + i,
            officer.clone(),
            "credential.create",
            &format!("c{i}"),
        )
        .with_details(Details::new().str("kind", "hotp").u64("digits", 6));
        lines.push(chain.append(event).to_json_line());
    }
    let denied = Event::new(t0 + 6, Actor::service(), "credential.verify", "c1").denied();
    lines.push(chain.append(denied).to_json_line());
    lines.push(
        chain
            .checkpoint(&signer, t0 + 7)
            .expect("checkpoint")
            .to_json_line(),
    );
    let failed = Event::new(t0 + 8, officer, "ceremony.execute", "x").failed("HSM busy");
    lines.push(chain.append(failed).to_json_line());
    let one = lines.join("\n") + "\n";
    // The same chain as a second, named chain of an export.
    let two = format!(
        "{one}{}\n{one}",
        hsm_audit::chain_header("instance-b").trim_end()
    );
    vec![
        ("audit", "one-chain".into(), one.into_bytes()),
        ("audit", "two-chains".into(), two.into_bytes()),
    ]
}

fn index(method: &str) -> u8 {
    METHODS
        .iter()
        .position(|m| *m == method)
        .and_then(|i| u8::try_from(i).ok())
        .expect("a method of METHODS")
}

fn caller(cn: &str) -> u8 {
    CALLERS
        .iter()
        .position(|c| *c == cn)
        .and_then(|i| u8::try_from(i).ok())
        .expect("a caller of CALLERS")
}

fn request(method: &str, cn: &str, message: &impl Message) -> Vec<u8> {
    let mut bytes = vec![index(method), caller(cn)];
    message.encode(&mut bytes).expect("encode");
    bytes
}

fn requests() -> Vec<Seed> {
    let mut seeds = Vec::new();
    // Every method with an empty message from every caller.
    for (m, _) in METHODS.iter().enumerate() {
        for (c, _) in CALLERS.iter().enumerate() {
            let name = format!("empty-{m:02}-{c}");
            seeds.push(("requests", name, vec![m as u8, c as u8]));
        }
    }
    let create = pb::CreateCredentialRequest {
        credential_id: "fuzz-1".into(),
        kind: pb::OtpKind::Hotp as i32,
        algorithm: pb::HashAlgorithm::Sha1 as i32,
        digits: 6,
        seed: b"12345678901234567890".to_vec(),
        subject: "citizen-1".into(),
        ..Default::default()
    };
    let totp = pb::CreateCredentialRequest {
        credential_id: "fuzz-2".into(),
        kind: pb::OtpKind::Totp as i32,
        algorithm: pb::HashAlgorithm::Sha256 as i32,
        digits: 8,
        period_seconds: 30,
        reveal_seed: true,
        issuer: "eID".into(),
        account_name: "citizen-2".into(),
        ..Default::default()
    };
    let verify = pb::VerifyCodeRequest {
        credential_id: "fuzz-1".into(),
        code: "755224".into(),
    };
    let sign = pb::SignRequest {
        key: "documents".into(),
        message: Some(b"hello".to_vec()),
        ..Default::default()
    };
    let assertion = pb::SignAssertionRequest {
        key: "assertions".into(),
        subject: "citizen-1".into(),
        audience: vec!["rp".into()],
        nonce: "n".into(),
        acr: "substantial".into(),
        ttl_seconds: 60,
        extra_claims_json: r#"{"x":1}"#.into(),
        evidence_id: "00".repeat(16),
        ..Default::default()
    };
    let propose = pb::ProposeCeremonyRequest {
        plan_toml: include_str!("../../ceremonies/example-root-and-assertion.toml").into(),
    };
    let events = pb::ListEventsRequest {
        from_seq: 1,
        limit: 10,
        kinds: vec!["credential.created".into()],
        subject: "citizen-1".into(),
    };
    let export = pb::ExportAuditRequest {
        from_seq: 1,
        chain: "default".into(),
    };
    let frames = |messages: &[pb::ImportCredentialsRequest]| {
        let mut bytes = vec![
            index("hsm.v1.CredentialService/ImportCredentials"),
            caller("login-service"),
        ];
        for m in messages {
            let encoded = m.encode_to_vec();
            bytes.extend_from_slice(&u16::try_from(encoded.len()).expect("short").to_le_bytes());
            bytes.extend_from_slice(&encoded);
        }
        bytes
    };
    use pb::import_credentials_request::Message as Part;
    let header = pb::ImportCredentialsRequest {
        message: Some(Part::Header(pb::ImportHeader {
            transport: Some(pb::import_header::Transport::Psk(vec![0x12; 16])),
            mac_method: "http://www.w3.org/2000/09/xmldsig#hmac-sha1".into(),
            dry_run: true,
            ..Default::default()
        })),
    };
    let batch = pb::ImportCredentialsRequest {
        message: Some(Part::Batch(pb::ImportBatch {
            entries: vec![pb::ImportEntry {
                credential_id: "imported-1".into(),
                serial: "987654321".into(),
                kind: pb::OtpKind::Hotp as i32,
                digits: 6,
                plain_secret: b"12345678901234567890".to_vec(),
                ..Default::default()
            }],
        })),
    };
    seeds.push((
        "requests",
        "import".into(),
        frames(&[header.clone(), batch.clone()]),
    ));
    seeds.push(("requests", "import-header-only".into(), frames(&[header])));
    let named = [
        (
            "create-hotp",
            request(
                "hsm.v1.CredentialService/CreateCredential",
                "login-service",
                &create,
            ),
        ),
        (
            "create-totp",
            request(
                "hsm.v1.CredentialService/CreateCredential",
                "login-service",
                &totp,
            ),
        ),
        (
            "verify",
            request(
                "hsm.v1.CredentialService/VerifyCode",
                "login-service",
                &verify,
            ),
        ),
        (
            "sign",
            request("hsm.v1.SigningService/Sign", "login-service", &sign),
        ),
        (
            "assertion",
            request(
                "hsm.v1.SigningService/SignAssertion",
                "login-service",
                &assertion,
            ),
        ),
        (
            "propose",
            request(
                "hsm.v1.CeremonyService/ProposeCeremony",
                "officer-1",
                &propose,
            ),
        ),
        (
            "events",
            request("hsm.v1.EventService/ListEvents", "notifier", &events),
        ),
        (
            "export",
            request("hsm.v1.AuditService/ExportAudit", "auditor", &export),
        ),
    ];
    seeds.extend(
        named
            .into_iter()
            .map(|(name, bytes)| ("requests", name.to_owned(), bytes)),
    );
    seeds
}
