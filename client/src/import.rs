//! PSKC (RFC 6030) import: the file parsed here with the `pskc` crate, its entries
//! streamed to `CredentialService.ImportCredentials` with every secret STILL ENCRYPTED
//! (the service decrypts inside the HSM).
//!
//! Three passes over the file, each streaming (one KeyPackage in memory at a time):
//! 1. validation: the whole file parses (well-formed XML, no DTD, within the limits, no
//!    duplicate `Key/@Id`), its SHA-256; a file that fails here is refused whole and
//!    nothing is sent;
//! 2. the import: the header (transport material, MAC key) then the entries, packed
//!    into messages of at most [`MESSAGE_BYTES`] (the service's per-message limit);
//!    entries this side already knows it cannot import (an unsupported algorithm or
//!    policy, an encrypted counter) are refused here and not sent;
//! 3. with a report: one JSON line per entry, from the service's answer (which lists
//!    every entry it did not import) and this side's refusals.
//!
//! Memory: bounded by the parser's per-package limits, its duplicate-id set (16 bytes
//! per entry), the mapping file, and the non-imported entries listed in the answer.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use prost::Message;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::proto as pb;
use crate::HsmClient;

/// Largest import message this side sends (the service's default
/// `server.limits.max_request_bytes` is 4 KiB).
pub const MESSAGE_BYTES: usize = 3_500;

/// How the file's secrets are protected.
pub enum TransportArg {
    /// The pre-shared AES key.
    Psk(Zeroizing<Vec<u8>>),
    /// The password of a PBKDF2 file.
    Password(Zeroizing<Vec<u8>>),
    /// The name of the HSM's RSA transport key pair.
    Key(String),
}

/// What to import and how.
pub struct ImportOptions {
    /// The transport key.
    pub transport: TransportArg,
    /// `serial,subject` pairs (serial = `DeviceInfo/SerialNo`).
    pub mapping: Option<HashMap<String, String>>,
    /// Check everything, store nothing.
    pub dry_run: bool,
    /// Accept entries without a MAC (and plain values).
    pub allow_unmaced: bool,
    /// Accept `rsa-1_5`.
    pub allow_rsa_1_5: bool,
}

/// One entry's outcome, as the report states it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EntryReport {
    /// Position in the file.
    pub index: u64,
    /// `Key/@Id` (empty when the package had none).
    pub credential_id: String,
    /// `DeviceInfo/SerialNo`.
    pub serial: String,
    /// `imported`, `skipped`, `conflict`, `refused` (or `unknown` beyond the listed
    /// results).
    pub result: &'static str,
    /// Why (not for `imported`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// The outcome of an import.
#[derive(Debug, Default, Clone)]
pub struct ImportSummary {
    /// Entries in the file.
    pub entries: u64,
    /// Imported (dry run: would be).
    pub imported: u64,
    /// Skipped as identical.
    pub skipped: u64,
    /// Conflicts.
    pub conflicts: u64,
    /// Refused (here or by the service).
    pub refused: u64,
    /// Accepted without a MAC.
    pub unmaced: u64,
    /// Decrypted inside the HSM.
    pub decrypted_in_hsm: u64,
    /// Decrypted in a zeroized service buffer.
    pub decrypted_in_host: u64,
    /// Batches the service committed.
    pub batches: u64,
    /// Nothing was stored.
    pub dry_run: bool,
    /// SHA-256 of the file (hex).
    pub file_sha256: String,
    /// Not every non-imported entry is listed (beyond the service's cap).
    pub truncated: bool,
    /// The container has a Signature (recorded, not verified).
    pub signed: bool,
}

impl ImportSummary {
    /// 0 when every entry was imported or skipped, 1 when some were refused or in
    /// conflict, 2 when none could be imported (the whole file refused).
    pub fn exit_code(&self) -> i32 {
        if self.refused + self.conflicts == 0 {
            0
        } else if self.imported + self.skipped == 0 {
            2
        } else {
            1
        }
    }
}

/// Why an import did not run (the whole file refused: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not an acceptable PSKC document (nothing was sent).
    #[error("the file is refused: {0}")]
    File(String),
    /// The service refused the import or failed.
    #[error("the service refused the import: {}: {}", .0.code(), .0.message())]
    Service(tonic::Status),
    /// Reading a file.
    #[error("{0}")]
    Io(String),
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>, ImportError> {
    std::fs::File::open(path)
        .map(|f| BufReader::with_capacity(1 << 16, f))
        .map_err(|e| ImportError::Io(format!("cannot read {}: {e}", path.display())))
}

/// Reads a mapping file: `serial,subject` per line (a header line `serial,subject` and
/// blank lines are skipped).
pub fn read_mapping(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (n == 0 && line.eq_ignore_ascii_case("serial,subject")) {
            continue;
        }
        let (serial, subject) = line
            .split_once(',')
            .ok_or_else(|| format!("{}:{}: expected serial,subject", path.display(), n + 1))?;
        if out
            .insert(serial.trim().to_owned(), subject.trim().to_owned())
            .is_some()
        {
            return Err(format!(
                "{}:{}: serial {:?} is mapped twice",
                path.display(),
                n + 1,
                serial.trim()
            ));
        }
    }
    Ok(out)
}

/// Pass 1: the file parses whole; its entry count, SHA-256 and whether it is signed.
fn validate(path: &Path) -> Result<(u64, [u8; 32], bool), ImportError> {
    struct Hashing<R> {
        inner: R,
        hash: Sha256,
    }
    impl<R: Read> Read for Hashing<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hash.update(&buf[..n]);
            Ok(n)
        }
    }
    let file = std::fs::File::open(path)
        .map_err(|e| ImportError::Io(format!("cannot read {}: {e}", path.display())))?;
    let mut hashing = BufReader::with_capacity(
        1 << 16,
        Hashing {
            inner: file,
            hash: Sha256::new(),
        },
    );
    let mut count = 0u64;
    let signed;
    {
        let mut reader =
            pskc::Reader::new(&mut hashing).map_err(|e| ImportError::File(e.to_string()))?;
        while reader
            .next_entry()
            .map_err(|e| ImportError::File(e.to_string()))?
            .is_some()
        {
            count += 1;
        }
        signed = reader.trailer().signature;
    }
    // Whatever the parser did not need (trailing whitespace) still counts.
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|e| ImportError::Io(e.to_string()))?;
    let digest = hashing.into_inner().hash.finalize().into();
    Ok((count, digest, signed))
}

fn encrypted(v: &pskc::EncryptedValue) -> pb::EncryptedData {
    pb::EncryptedData {
        method: v.algorithm.uri().to_owned(),
        cipher_value: v.cipher_value.clone(),
    }
}

/// The stream's header for `header` of the file.
pub fn import_header(
    header: &pskc::Header,
    options: &ImportOptions,
    file_sha256: [u8; 32],
) -> Result<pb::ImportHeader, ImportError> {
    use pb::import_header::Transport;
    let transport = match (&options.transport, &header.encryption_key) {
        (TransportArg::Password(pw), Some(pskc::EncryptionKey::DerivedKey(d))) => {
            Transport::Password(pb::PasswordTransport {
                password: pw.to_vec(),
                salt: d.salt.clone(),
                iteration_count: d.iteration_count,
                // Absent: the AES key length of the MAC key's method (RFC 8018).
                key_length: d
                    .key_length
                    .or_else(|| {
                        header
                            .mac_method
                            .as_ref()
                            .and_then(|m| m.mac_key.as_ref())
                            .and_then(|k| k.algorithm.aes_key_len())
                    })
                    .unwrap_or(16) as u32,
                prf: match d.prf {
                    pskc::Prf::HmacSha256 => pskc::MacAlgorithm::HmacSha256.uri().to_owned(),
                    _ => pskc::MacAlgorithm::HmacSha1.uri().to_owned(),
                },
            })
        }
        (TransportArg::Password(_), _) => {
            return Err(ImportError::File(
                "--password-file: the file has no DerivedKey (RFC 6030 section 6.2)".into(),
            ))
        }
        (_, Some(pskc::EncryptionKey::DerivedKey(_))) => {
            return Err(ImportError::File(
                "the file is password-protected (DerivedKey): use --password-file".into(),
            ))
        }
        (TransportArg::Psk(k), _) => Transport::Psk(k.to_vec()),
        (TransportArg::Key(name), _) => Transport::TransportKey(name.clone()),
    };
    let (mac_method, encrypted_mac_key) = match &header.mac_method {
        Some(m) => match &m.mac_key {
            Some(k) => (m.algorithm.uri().to_owned(), Some(encrypted(k))),
            None => {
                return Err(ImportError::File(
                    "MACMethod without MACKey (the transport key as MAC key, pre-RFC drafts) is not supported".into(),
                ))
            }
        },
        None => (String::new(), None),
    };
    Ok(pb::ImportHeader {
        transport: Some(transport),
        mac_method,
        encrypted_mac_key,
        file_sha256: file_sha256.to_vec(),
        allow_unmaced: options.allow_unmaced,
        dry_run: options.dry_run,
        allow_rsa_1_5: options.allow_rsa_1_5,
    })
}

fn int(v: &Option<pskc::IntValue>, what: &str) -> Result<Option<i64>, String> {
    match v {
        None => Ok(None),
        Some(pskc::IntValue::Plain(n)) => Ok(Some(*n)),
        Some(_) => Err(format!("an encrypted {what} is not supported")),
    }
}

/// The entry for `pkg`, or why this side refuses it (not sent).
pub fn import_entry(
    pkg: &pskc::KeyPackage,
    mapping: Option<&HashMap<String, String>>,
) -> Result<pb::ImportEntry, String> {
    let k = &pkg.key;
    let unsupported = k.unsupported();
    if !unsupported.is_empty() {
        let reasons: Vec<String> = unsupported.iter().map(|u| u.to_string()).collect();
        return Err(reasons.join("; "));
    }
    let kind = match k.algorithm {
        pskc::Algorithm::Hotp => pb::OtpKind::Hotp,
        pskc::Algorithm::Totp => pb::OtpKind::Totp,
        _ => return Err("unsupported key algorithm".into()),
    };
    let suite = k
        .algorithm_parameters
        .suite
        .as_deref()
        .unwrap_or("")
        .to_ascii_uppercase();
    let algorithm = if suite.contains("SHA512") || suite.contains("SHA-512") {
        pb::HashAlgorithm::Sha512
    } else if suite.contains("SHA256") || suite.contains("SHA-256") {
        pb::HashAlgorithm::Sha256
    } else {
        pb::HashAlgorithm::Sha1
    };
    let digits = k
        .algorithm_parameters
        .response_format
        .as_ref()
        .map_or(6, |r| r.length);
    let serial = pkg.device_info.serial_no.clone().unwrap_or_default();
    let subject = mapping
        .and_then(|m| m.get(&serial).cloned())
        .or_else(|| k.user_id.clone())
        .or_else(|| pkg.device_info.user_id.clone())
        .unwrap_or_default();
    let counter = int(&k.data.counter, "Counter")?.unwrap_or(0);
    let counter = u64::try_from(counter).map_err(|_| "a negative Counter".to_string())?;
    let period = int(&k.data.time_interval, "TimeInterval")?.unwrap_or(0);
    let period = u32::try_from(period).map_err(|_| "TimeInterval out of range".to_string())?;
    let drift = int(&k.data.time_drift, "TimeDrift")?.unwrap_or(0);
    let mut entry = pb::ImportEntry {
        credential_id: k.id.clone(),
        serial,
        subject,
        kind: kind as i32,
        algorithm: algorithm as i32,
        digits,
        counter: if kind == pb::OtpKind::Hotp {
            counter
        } else {
            0
        },
        period_seconds: period,
        drift_steps: drift,
        ..Default::default()
    };
    match &k.data.secret {
        None => return Err("no Secret".into()),
        Some(pskc::SecretValue::Plain(s)) => entry.plain_secret = s.expose_secret().to_vec(),
        Some(pskc::SecretValue::Encrypted { value, mac }) => {
            entry.encrypted_secret = Some(encrypted(value));
            entry.value_mac = mac.clone().unwrap_or_default();
        }
        Some(_) => return Err("an unsupported Secret value".into()),
    }
    Ok(entry)
}

/// An entry this side refused.
struct LocalRefusal {
    index: u64,
    id: String,
    serial: String,
    reason: String,
}

/// Progress callback: entries handled so far (of the total).
pub type Progress = Box<dyn FnMut(u64, u64) + Send>;

/// Runs the import of `path` through `client` (see the module doc). `report`: write
/// the per-entry JSON lines there.
pub async fn import_file(
    client: &HsmClient,
    path: &Path,
    options: ImportOptions,
    report: Option<&Path>,
    mut progress: Progress,
) -> Result<ImportSummary, ImportError> {
    let owned = path.to_path_buf();
    let (total, digest, signed) = tokio::task::spawn_blocking(move || validate(&owned))
        .await
        .map_err(|e| ImportError::Io(e.to_string()))??;
    let mut reader =
        pskc::Reader::new(open(path)?).map_err(|e| ImportError::File(e.to_string()))?;
    let header = import_header(reader.header(), &options, digest)?;
    let (tx, rx) = mpsc::channel::<pb::ImportCredentialsRequest>(32);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    let mapping = options.mapping;
    let producer =
        tokio::task::spawn_blocking(move || -> Result<Vec<LocalRefusal>, ImportError> {
            use pb::import_credentials_request::Message as M;
            let mut local = Vec::new();
            if tx
                .blocking_send(pb::ImportCredentialsRequest {
                    message: Some(M::Header(header)),
                })
                .is_err()
            {
                return Ok(local);
            }
            let mut batch = pb::ImportBatch::default();
            let mut size = 0usize;
            let mut handled = 0u64;
            let flush = |batch: &mut pb::ImportBatch, size: &mut usize| {
                let b = std::mem::take(batch);
                *size = 0;
                tx.blocking_send(pb::ImportCredentialsRequest {
                    message: Some(M::Batch(b)),
                })
                .is_ok()
            };
            while let Some(next) = reader
                .next_entry()
                .map_err(|e| ImportError::File(e.to_string()))?
            {
                handled += 1;
                let entry = match next {
                    Ok(pkg) => {
                        import_entry(&pkg, mapping.as_ref()).map_err(|reason| LocalRefusal {
                            index: pkg.index,
                            id: pkg.key.id.clone(),
                            serial: pkg.device_info.serial_no.clone().unwrap_or_default(),
                            reason,
                        })
                    }
                    Err(e) => Err(LocalRefusal {
                        index: e.index,
                        id: e.key_id.clone().unwrap_or_default(),
                        serial: e.serial_no.clone().unwrap_or_default(),
                        reason: e.kind.to_string(),
                    }),
                };
                match entry {
                    Ok(e) => {
                        let len = e.encoded_len() + 4;
                        if size + len > MESSAGE_BYTES
                            && !batch.entries.is_empty()
                            && !flush(&mut batch, &mut size)
                        {
                            return Ok(local);
                        }
                        size += len;
                        batch.entries.push(e);
                    }
                    Err(r) => local.push(r),
                }
                if handled % 256 == 0 {
                    let _ = done_tx.send(handled);
                }
            }
            if !batch.entries.is_empty() {
                flush(&mut batch, &mut size);
            }
            let _ = done_tx.send(handled);
            Ok(local)
        });
    let call = {
        let mut creds = client.credentials();
        async move {
            creds
                .import_credentials(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }
    };
    tokio::pin!(call);
    let response = loop {
        tokio::select! {
            r = &mut call => break r,
            Some(n) = done_rx.recv() => progress(n, total),
        }
    };
    let local = producer
        .await
        .map_err(|e| ImportError::Io(e.to_string()))??;
    let response = response.map_err(ImportError::Service)?.into_inner();
    progress(total, total);
    let local_refused = local.len() as u64;
    let summary = ImportSummary {
        entries: total,
        imported: response.imported,
        skipped: response.skipped,
        conflicts: response.conflicts,
        refused: response.refused + local_refused,
        unmaced: response.unmaced,
        decrypted_in_hsm: response.decrypted_in_hsm,
        decrypted_in_host: response.decrypted_in_host,
        batches: response.batches,
        dry_run: response.dry_run,
        file_sha256: hex(&digest),
        truncated: response.results_truncated,
        signed,
    };
    if let Some(out) = report {
        write_report(path, out, &response, local)?;
    }
    Ok(summary)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Pass 3: one JSON line per entry of the file.
fn write_report(
    path: &Path,
    out: &Path,
    response: &pb::ImportCredentialsResponse,
    local: Vec<LocalRefusal>,
) -> Result<(), ImportError> {
    use std::io::Write;
    let io = |e: std::io::Error| ImportError::Io(format!("report {}: {e}", out.display()));
    let mut by_id: HashMap<&str, &pb::ImportEntryResult> = HashMap::new();
    for r in &response.results {
        by_id.insert(r.credential_id.as_str(), r);
    }
    let mut local_by_index: HashMap<u64, LocalRefusal> =
        local.into_iter().map(|l| (l.index, l)).collect();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(io)?);
    let mut reader =
        pskc::Reader::new(open(path)?).map_err(|e| ImportError::File(e.to_string()))?;
    let mut index = 0u64;
    while let Some(next) = reader
        .next_entry()
        .map_err(|e| ImportError::File(e.to_string()))?
    {
        let (id, serial) = match &next {
            Ok(p) => (
                p.key.id.clone(),
                p.device_info.serial_no.clone().unwrap_or_default(),
            ),
            Err(e) => (
                e.key_id.clone().unwrap_or_default(),
                e.serial_no.clone().unwrap_or_default(),
            ),
        };
        let line = if let Some(l) = local_by_index.remove(&index) {
            EntryReport {
                index,
                credential_id: l.id,
                serial: l.serial,
                result: "refused",
                reason: l.reason,
            }
        } else if let Some(r) = by_id.get(id.as_str()) {
            EntryReport {
                index,
                credential_id: id,
                serial,
                result: match pb::ImportResult::try_from(r.result) {
                    Ok(pb::ImportResult::Skipped) => "skipped",
                    Ok(pb::ImportResult::Conflict) => "conflict",
                    Ok(pb::ImportResult::Imported) => "imported",
                    _ => "refused",
                },
                reason: r.reason.clone(),
            }
        } else {
            EntryReport {
                index,
                credential_id: id,
                serial,
                result: if response.results_truncated {
                    "unknown"
                } else {
                    "imported"
                },
                reason: String::new(),
            }
        };
        serde_json::to_writer(&mut w, &line).map_err(|e| io(e.into()))?;
        w.write_all(b"\n").map_err(io)?;
        index += 1;
    }
    w.flush().map_err(io)
}

/// Reads `--psk-file`: the transport key as hex (whitespace ignored).
pub fn read_psk_file(path: &PathBuf) -> Result<Zeroizing<Vec<u8>>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let digits: Zeroizing<Vec<u8>> =
        Zeroizing::new(text.bytes().filter(|b| !b.is_ascii_whitespace()).collect());
    if digits.len() % 2 != 0 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!(
            "{}: the transport key must be hex digits",
            path.display()
        ));
    }
    let mut key = Zeroizing::new(Vec::with_capacity(digits.len() / 2));
    for pair in digits.chunks(2) {
        let s = std::str::from_utf8(pair).map_err(|_| "not hex".to_string())?;
        key.push(u8::from_str_radix(s, 16).map_err(|_| "not hex".to_string())?);
    }
    if ![16, 24, 32].contains(&key.len()) {
        return Err(format!(
            "{}: the transport key must be 16, 24 or 32 bytes (32, 48 or 64 hex digits), got {}",
            path.display(),
            key.len()
        ));
    }
    Ok(key)
}

/// Reads `--password-file`: the password, one trailing newline (LF or CRLF) ignored.
pub fn read_password_file(path: &PathBuf) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut bytes = Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    if bytes.ends_with(b"\r\n") {
        let n = bytes.len() - 2;
        bytes.truncate(n);
    } else if bytes.ends_with(b"\n") {
        let n = bytes.len() - 1;
        bytes.truncate(n);
    }
    if bytes.is_empty() {
        return Err(format!("{}: the password is empty", path.display()));
    }
    Ok(bytes)
}
