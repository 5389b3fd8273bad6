//! The backup file a `backup` step writes and a `restore` step reads: JSON naming the
//! plan, the KEK (label and check value, never its value) and, per key, its name,
//! version, kind, usage, CKA_ID, public key and private key wrapped under the KEK.
//! Parsed strictly (unknown fields refused); it holds nothing secret without the KEK.
//!
//! Format 2 ([`FORMAT`]) records each key's usage, so that a restore gives the key back
//! exactly the usage it was made with. Format 1 ([`FORMAT_V1`]) had none: it is still
//! read, and its keys take the usage the restore infers (see
//! `Signer::restore_version`). That inference is sound for format 1 because `raw` keys
//! and format 2 came in one change set: no released service wrote a `raw` key into a
//! format-1 file.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hsm::backup::WrappedKeyPair;
use crate::hsm::{KeyPairKind, PublicKeyAttributes};
use crate::signing::{KeyVersion, Usage};

/// `format` of the version written: 2, with each key's usage.
pub const FORMAT: &str = "hsm-key-backup-v2";
/// `format` of version 1 (no usage; still read).
pub const FORMAT_V1: &str = "hsm-key-backup-v1";
/// Largest backup file read.
pub const MAX_BACKUP_LEN: usize = 1 << 20;

/// A backup file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupFile {
    /// [`FORMAT`] (or [`FORMAT_V1`] for a file written before usages were recorded).
    pub format: String,
    /// Id of the ceremony that made it.
    pub plan_id: String,
    /// Label of the trusted KEK the keys are wrapped under.
    pub kek_label: String,
    /// Check value of that KEK (see `shares::kek_check_value`).
    pub kek_check: String,
    /// The keys.
    pub keys: Vec<BackupEntry>,
}

/// One backed-up key pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupEntry {
    /// Key name.
    pub name: String,
    /// Key version.
    pub version: u32,
    /// JWS algorithm the key signs with (`ES256`, `ES384`, `EdDSA`, `PS256`).
    pub algorithm: String,
    /// `ec-p256`, `ec-p384`, `ed25519` or `rsa-3072`.
    pub kind: String,
    /// What the key signs (`signing`, `ca`, `raw`): present in format 2, absent in
    /// format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// CKA_ID, base64.
    pub id: String,
    /// The public key.
    pub public: PublicKey,
    /// The private key wrapped under the KEK (`CKM_AES_KEY_WRAP_PAD`), base64.
    pub wrapped_private_key: String,
    /// The key's certificate chain, DER base64, leaf first (empty: none).
    #[serde(default)]
    pub certificate_chain: Vec<String>,
}

/// A public key's attributes, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PublicKey {
    /// `CKA_EC_POINT` of a P-256 or P-384 key.
    Ec {
        /// base64.
        ec_point: String,
    },
    /// `CKA_EC_POINT` of an Ed25519 key.
    Edwards {
        /// base64.
        ec_point: String,
    },
    /// RSA.
    Rsa {
        /// base64, big-endian.
        modulus: String,
        /// base64, big-endian.
        public_exponent: String,
    },
}

fn kind_name(kind: KeyPairKind) -> &'static str {
    match kind {
        KeyPairKind::EcP256 => "ec-p256",
        KeyPairKind::EcP384 => "ec-p384",
        KeyPairKind::Ed25519 => "ed25519",
        KeyPairKind::Rsa3072 => "rsa-3072",
    }
}

fn invalid(what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("backup file: {what}"))
}

fn b64(field: &str, text: &str) -> Result<Vec<u8>> {
    STANDARD
        .decode(text)
        .map_err(|_| invalid(format!("{field} is not base64")))
}

impl BackupEntry {
    /// The entry for key version `k` wrapped as `w`.
    pub fn new(k: &KeyVersion, w: &WrappedKeyPair) -> BackupEntry {
        let public = match &w.public {
            PublicKeyAttributes::Ec { ec_point } => PublicKey::Ec {
                ec_point: STANDARD.encode(ec_point),
            },
            PublicKeyAttributes::Edwards { ec_point } => PublicKey::Edwards {
                ec_point: STANDARD.encode(ec_point),
            },
            PublicKeyAttributes::Rsa {
                modulus,
                public_exponent,
            } => PublicKey::Rsa {
                modulus: STANDARD.encode(modulus),
                public_exponent: STANDARD.encode(public_exponent),
            },
        };
        BackupEntry {
            name: k.name.clone(),
            version: k.version,
            algorithm: k.algorithm.jws_name().to_owned(),
            kind: kind_name(w.kind).to_owned(),
            usage: Some(k.usage),
            id: STANDARD.encode(&w.id),
            public,
            wrapped_private_key: STANDARD.encode(&w.wrapped_private_key),
            certificate_chain: k
                .certificate_chain
                .iter()
                .map(|c| STANDARD.encode(c))
                .collect(),
        }
    }

    /// The certificate chain, DER.
    pub fn chain(&self) -> Result<Vec<Vec<u8>>> {
        self.certificate_chain
            .iter()
            .map(|c| b64("certificate_chain", c))
            .collect()
    }

    /// What `Hsm::restore_key_pair` takes.
    pub fn wrapped(&self) -> Result<WrappedKeyPair> {
        let kind = [
            KeyPairKind::EcP256,
            KeyPairKind::EcP384,
            KeyPairKind::Ed25519,
            KeyPairKind::Rsa3072,
        ]
        .into_iter()
        .find(|k| kind_name(*k) == self.kind)
        .ok_or_else(|| invalid(format!("key {:?}: unknown kind {:?}", self.name, self.kind)))?;
        let public = match (&self.public, kind) {
            (PublicKey::Ec { ec_point }, KeyPairKind::EcP256 | KeyPairKind::EcP384) => {
                PublicKeyAttributes::Ec {
                    ec_point: b64("ec_point", ec_point)?,
                }
            }
            (PublicKey::Edwards { ec_point }, KeyPairKind::Ed25519) => {
                PublicKeyAttributes::Edwards {
                    ec_point: b64("ec_point", ec_point)?,
                }
            }
            (
                PublicKey::Rsa {
                    modulus,
                    public_exponent,
                },
                KeyPairKind::Rsa3072,
            ) => PublicKeyAttributes::Rsa {
                modulus: b64("modulus", modulus)?,
                public_exponent: b64("public_exponent", public_exponent)?,
            },
            _ => {
                return Err(invalid(format!(
                    "key {:?}: public key type does not match kind {}",
                    self.name, self.kind
                )))
            }
        };
        let id = b64("id", &self.id)?;
        let wrapped_private_key = b64("wrapped_private_key", &self.wrapped_private_key)?;
        if id.is_empty() || wrapped_private_key.is_empty() {
            return Err(invalid(format!(
                "key {:?}: empty id or wrapped private key",
                self.name
            )));
        }
        Ok(WrappedKeyPair {
            kind,
            id,
            public,
            wrapped_private_key,
        })
    }
}

impl BackupFile {
    /// Parse and check a backup file's text.
    pub fn parse(text: &str) -> Result<BackupFile> {
        if text.len() > MAX_BACKUP_LEN {
            return Err(invalid(format!(
                "{} bytes, the limit is {MAX_BACKUP_LEN}",
                text.len()
            )));
        }
        let file: BackupFile = serde_json::from_str(text).map_err(invalid)?;
        let with_usage = match file.format.as_str() {
            FORMAT => true,
            FORMAT_V1 => false,
            other => {
                return Err(invalid(format!(
                    "format {other:?}, expected {FORMAT:?} (or {FORMAT_V1:?})"
                )))
            }
        };
        super::shares::check_kek_label(&file.kek_label)?;
        if file.kek_check.len() != 16 || !file.kek_check.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("kek_check is not 16 hex digits"));
        }
        if file.keys.is_empty() {
            return Err(invalid("no keys"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for k in &file.keys {
            if !seen.insert((&k.name, k.version)) {
                return Err(invalid(format!("key {:?} v{} twice", k.name, k.version)));
            }
            k.wrapped()?;
            k.chain()?;
            if k.version == 0 {
                return Err(invalid(format!("key {:?}: version 0", k.name)));
            }
            match (with_usage, k.usage) {
                (true, None) => {
                    return Err(invalid(format!(
                        "key {:?}: no usage (format {FORMAT} records each key's usage)",
                        k.name
                    )))
                }
                (false, Some(_)) => {
                    return Err(invalid(format!(
                        "key {:?}: usage in a {FORMAT_V1} file (that format has none)",
                        k.name
                    )))
                }
                _ => {}
            }
        }
        Ok(file)
    }

    /// The JSON text (pretty, with a final newline).
    pub fn to_text(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map(|t| t + "\n")
            .map_err(|e| Error::Internal(format!("backup file: {e}")))
    }

    /// The key `name` (its only version in the file, or `version`).
    pub fn key(&self, name: &str, version: Option<u32>) -> Result<&BackupEntry> {
        let found: Vec<_> = self
            .keys
            .iter()
            .filter(|k| k.name == name && version.is_none_or(|v| k.version == v))
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => Err(invalid(format!("no key {name:?} of that version"))),
            _ => Err(invalid(format!(
                "key {name:?} is there in several versions; name one"
            ))),
        }
    }
}

/// Lower-case hex SHA-256 of a backup file's text (for the transcript).
pub fn sha256_hex(text: &str) -> String {
    crate::common::hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// Write `text` to `path`, created new (mode 0600): an existing file is never
/// overwritten.
pub fn write_new(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::FailedPrecondition(format!(
                "{} exists: backup files are never overwritten",
                path.display()
            )),
            _ => Error::Internal(format!("create {}: {e}", path.display())),
        })?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|e| Error::Internal(format!("write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BackupFile {
        let w = WrappedKeyPair {
            kind: KeyPairKind::EcP256,
            id: vec![1, 2, 3],
            public: PublicKeyAttributes::Ec {
                ec_point: vec![4; 67],
            },
            wrapped_private_key: vec![9; 40],
        };
        let r = WrappedKeyPair {
            kind: KeyPairKind::Rsa3072,
            id: vec![7],
            public: PublicKeyAttributes::Rsa {
                modulus: vec![0xc5; 384],
                public_exponent: vec![1, 0, 1],
            },
            wrapped_private_key: vec![8; 1232],
        };
        let version = |name: &str, version, algorithm, usage, chain: Vec<Vec<u8>>| KeyVersion {
            name: name.into(),
            version,
            state: crate::signing::KeyState::Active,
            algorithm,
            key_id: vec![],
            kid: String::new(),
            public_key_der: vec![],
            certificate_chain: chain,
            created_at: 0,
            published_at: 0,
            activated_at: 0,
            retired_at: 0,
            destroyed_at: 0,
            last_expiry: 0,
            origin: crate::signing::KeyOrigin::GeneratedForBackup,
            usage,
        };
        BackupFile {
            format: FORMAT.into(),
            plan_id: "ab".repeat(32),
            kek_label: "backup-kek-1".into(),
            kek_check: "0123456789abcdef".into(),
            keys: vec![
                BackupEntry::new(
                    &version(
                        "documents",
                        1,
                        crate::signing::Algorithm::Es256,
                        Usage::Raw,
                        vec![],
                    ),
                    &w,
                ),
                BackupEntry::new(
                    &version(
                        "root",
                        2,
                        crate::signing::Algorithm::Ps256,
                        Usage::Ca,
                        vec![vec![0x30, 1], vec![0x30, 2]],
                    ),
                    &r,
                ),
            ],
        }
    }

    #[test]
    fn round_trips_and_refuses_what_is_malformed() {
        let file = sample();
        let text = file.to_text().expect("text");
        let back = BackupFile::parse(&text).expect("parse");
        assert_eq!(back, file);
        let w = back
            .key("documents", None)
            .expect("key")
            .wrapped()
            .expect("wrapped");
        assert_eq!(w.id, vec![1, 2, 3]);
        assert_eq!(w.wrapped_private_key, vec![9; 40]);
        // Each key's usage is in the file, by name, and comes back as it was.
        assert_eq!(back.format, FORMAT);
        assert!(text.contains("\"usage\": \"raw\"") && text.contains("\"usage\": \"ca\""));
        assert_eq!(back.key("documents", None).unwrap().usage, Some(Usage::Raw));
        assert_eq!(back.key("root", None).unwrap().usage, Some(Usage::Ca));
        assert!(back.key("root", Some(1)).is_err());
        let root = back.key("root", Some(2)).expect("root");
        assert_eq!(root.algorithm, "PS256");
        assert_eq!(
            root.chain().expect("chain"),
            vec![vec![0x30, 1], vec![0x30, 2]]
        );
        assert!(back.key("nope", None).is_err());
        assert_eq!(sha256_hex(&text).len(), 64);

        let mut twice = sample();
        twice.keys.push(twice.keys[0].clone());
        let mut wrong_type = sample();
        wrong_type.keys[0].kind = "rsa-3072".into();
        let mut unknown_kind = sample();
        unknown_kind.keys[0].kind = "dsa".into();
        let mut empty = sample();
        empty.keys.clear();
        let mut format = sample();
        format.format = "v0".into();
        let mut label = sample();
        label.kek_label = "a b".into();
        let mut check = sample();
        check.kek_check = "xyz".into();
        let mut not_b64 = sample();
        not_b64.keys[0].wrapped_private_key = "!!".into();
        let mut bad_chain = sample();
        bad_chain.keys[1].certificate_chain[1] = "%%".into();
        let mut version_0 = sample();
        version_0.keys[0].version = 0;
        let mut no_usage = sample();
        no_usage.keys[1].usage = None;
        let mut v1_with_usage = sample();
        v1_with_usage.format = FORMAT_V1.into();
        v1_with_usage.keys[1].usage = None;
        for (f, want) in [
            (twice, "twice"),
            (wrong_type, "does not match kind"),
            (unknown_kind, "unknown kind"),
            (empty, "no keys"),
            (format, "expected"),
            (label, "KEK label"),
            (check, "kek_check"),
            (not_b64, "not base64"),
            (bad_chain, "certificate_chain is not base64"),
            (version_0, "version 0"),
            (no_usage, "key \"root\": no usage"),
            (
                v1_with_usage,
                "key \"documents\": usage in a hsm-key-backup-v1 file",
            ),
        ] {
            let e = BackupFile::parse(&f.to_text().unwrap()).expect_err(want);
            assert!(
                matches!(e, Error::InvalidArgument(_)) && e.to_string().contains(want),
                "{want}: {e}"
            );
        }
        let e = BackupFile::parse(&text.replacen("{", "{\"extra\": 1,", 1)).expect_err("unknown");
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(BackupFile::parse("not json").is_err());
        let e = BackupFile::parse(&text.replacen("\"raw\"", "\"challenges\"", 1))
            .expect_err("unknown usage");
        assert!(e.to_string().contains("unknown variant"), "{e}");
        assert!(BackupFile::parse(&" ".repeat(MAX_BACKUP_LEN + 1)).is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.json");
        write_new(&path, &text).expect("write");
        let e = write_new(&path, "other").expect_err("exists");
        assert!(e.to_string().contains("never overwritten"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    /// A file of format 1, as services before usages wrote it (no `usage` fields), is
    /// still read; its keys' usage is left to the restore's inference.
    #[test]
    fn format_1_files_still_parse_without_usages() {
        let mut old = sample();
        old.format = FORMAT_V1.into();
        for k in &mut old.keys {
            k.usage = None;
        }
        let text = old.to_text().expect("text");
        assert!(!text.contains("usage"), "{text}");
        assert!(text.contains("\"format\": \"hsm-key-backup-v1\""), "{text}");
        let back = BackupFile::parse(&text).expect("format 1 parses");
        assert_eq!(back, old);
        assert!(back.keys.iter().all(|k| k.usage.is_none()));
        assert_eq!(
            back.key("root", Some(2)).unwrap().wrapped().unwrap().kind,
            KeyPairKind::Rsa3072
        );
    }
}
