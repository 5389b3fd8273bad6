//! `CredentialService.ImportCredentials`: the stream's messages -> the domain's import
//! batches (see `credentials::import`).
//!
//! Messages are small (each within `server.limits.max_request_bytes`, like every
//! CredentialService message); the service groups the entries into batches of
//! [`BATCH_ENTRIES`] consecutive entries, whatever the client's message boundaries, and
//! each batch is one HSM job and one transaction. The stream has no overall timeout
//! (`server.limits.request_timeout_seconds` would cut a five-million-entry import);
//! instead each message must arrive within [`IDLE_SECONDS`] of the previous one.

use std::sync::Arc;
use std::time::Duration;

use hsm_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Status;
use zeroize::Zeroizing;

use super::State;
use crate::auth::Identity;
use crate::credentials::import::{EntryResult, EntrySecret, ImportEntry, ImportHeader};
use crate::error::Error;
use crate::hsm::import::{Encryption, MacAlgorithm, MacKey, Transport};
use crate::otp::{HashAlgorithm, OtpKind};

/// Entries per batch (one HSM job, one transaction, one audit record).
pub const BATCH_ENTRIES: usize = 1000;

/// Seconds the service waits for the next message of an import stream.
pub const IDLE_SECONDS: u64 = 120;

/// Most non-imported entries a response lists.
pub const MAX_LISTED: usize = 100_000;

/// Highest PBKDF2 iteration count accepted.
pub const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;

const XMLENC: &str = "http://www.w3.org/2001/04/xmlenc#";
const HMAC_SHA1: &str = "http://www.w3.org/2000/09/xmldsig#hmac-sha1";
const HMAC_SHA256: &str = "http://www.w3.org/2001/04/xmldsig-more#hmac-sha256";

fn invalid(m: impl Into<String>) -> Status {
    Status::from(Error::InvalidArgument(m.into()))
}

/// An xmlenc method URI.
pub fn encryption_method(uri: &str) -> Result<Encryption, String> {
    let name = uri.strip_prefix(XMLENC).unwrap_or("");
    Ok(match name {
        "aes128-cbc" => Encryption::AesCbc(16),
        "aes192-cbc" => Encryption::AesCbc(24),
        "aes256-cbc" => Encryption::AesCbc(32),
        "kw-aes128" => Encryption::KwAes(16),
        "kw-aes192" => Encryption::KwAes(24),
        "kw-aes256" => Encryption::KwAes(32),
        "rsa-oaep-mgf1p" => Encryption::RsaOaep,
        "rsa-1_5" => Encryption::RsaPkcs1,
        _ => {
            return Err(format!(
                "unsupported encryption method {:?}",
                crate::audit::text::bounded(uri, 120)
            ))
        }
    })
}

fn mac_algorithm(uri: &str) -> Result<MacAlgorithm, Status> {
    match uri {
        HMAC_SHA1 => Ok(MacAlgorithm::Sha1),
        HMAC_SHA256 => Ok(MacAlgorithm::Sha256),
        _ => Err(invalid(
            "mac_method must be the hmac-sha1 or hmac-sha256 URI (RFC 6030 section 6.1.1)",
        )),
    }
}

/// The header, its transport key derived (PBKDF2) or copied into zeroized memory.
fn header(mut h: pb::ImportHeader) -> Result<ImportHeader, Status> {
    let transport = match h.transport.take() {
        None => {
            return Err(invalid(
                "header.transport: one of psk, password or transport_key is required",
            ))
        }
        Some(pb::import_header::Transport::Psk(psk)) => {
            let psk = Zeroizing::new(psk);
            if ![16, 24, 32].contains(&psk.len()) {
                return Err(invalid(format!(
                    "header.psk must be an AES key of 16, 24 or 32 bytes, got {}",
                    psk.len()
                )));
            }
            Transport::Aes(psk)
        }
        Some(pb::import_header::Transport::Password(mut p)) => {
            let password = Zeroizing::new(std::mem::take(&mut p.password));
            if password.is_empty() {
                return Err(invalid("header.password.password is empty"));
            }
            if ![16, 24, 32].contains(&p.key_length) {
                return Err(invalid(
                    "header.password.key_length must be 16, 24 or 32 (the AES transport key)",
                ));
            }
            let iterations = std::num::NonZeroU32::new(p.iteration_count)
                .filter(|n| n.get() <= MAX_PBKDF2_ITERATIONS)
                .ok_or_else(|| {
                    invalid(format!(
                        "header.password.iteration_count must be 1..{MAX_PBKDF2_ITERATIONS}"
                    ))
                })?;
            if p.salt.is_empty() {
                return Err(invalid("header.password.salt is empty"));
            }
            let prf = match p.prf.as_str() {
                "" | HMAC_SHA1 => ring::pbkdf2::PBKDF2_HMAC_SHA1,
                HMAC_SHA256 => ring::pbkdf2::PBKDF2_HMAC_SHA256,
                _ => {
                    return Err(invalid(
                        "header.password.prf must be the hmac-sha1 or hmac-sha256 URI",
                    ))
                }
            };
            // Sized up front: no reallocation leaves an unzeroized copy.
            let mut key = Zeroizing::new(vec![0u8; p.key_length as usize]);
            ring::pbkdf2::derive(prf, iterations, &p.salt, &password, &mut key);
            Transport::Aes(key)
        }
        Some(pb::import_header::Transport::TransportKey(name)) => {
            if !crate::common::valid_key_name(&name) {
                return Err(invalid(format!(
                    "header.transport_key: {}",
                    crate::common::KEY_NAME_RULE
                )));
            }
            Transport::Rsa(name)
        }
    };
    let mac_key = match (h.mac_method.is_empty(), h.encrypted_mac_key) {
        (true, None) => None,
        (false, Some(k)) => Some(MacKey {
            algorithm: mac_algorithm(&h.mac_method)?,
            method: encryption_method(&k.method)
                .map_err(|m| invalid(format!("header.encrypted_mac_key: {m}")))?,
            cipher_value: k.cipher_value,
        }),
        (true, Some(_)) => return Err(invalid("header.encrypted_mac_key needs mac_method")),
        (false, None) => return Err(invalid("header.mac_method needs encrypted_mac_key")),
    };
    if mac_key.is_none() && matches!(transport, Transport::Aes(_)) && !h.allow_unmaced {
        return Err(invalid(
            "the file has no MAC key: refused unless allow_unmaced (RFC 6030 section 6.1.1)",
        ));
    }
    let file_sha256: [u8; 32] = h
        .file_sha256
        .as_slice()
        .try_into()
        .map_err(|_| invalid("header.file_sha256 must be 32 bytes"))?;
    Ok(ImportHeader {
        transport: Arc::new(transport),
        mac_key,
        file_sha256,
        allow_unmaced: h.allow_unmaced,
        dry_run: h.dry_run,
        allow_rsa_1_5: h.allow_rsa_1_5,
    })
}

/// One entry. What the file got wrong (an unknown method, no secret) becomes the entry's
/// refusal, not the stream's.
fn entry(mut e: pb::ImportEntry) -> ImportEntry {
    let kind = match pb::OtpKind::try_from(e.kind) {
        Ok(pb::OtpKind::Hotp) => Some(OtpKind::Hotp),
        Ok(pb::OtpKind::Totp) => Some(OtpKind::Totp),
        _ => None,
    };
    let algorithm = match pb::HashAlgorithm::try_from(e.algorithm) {
        Ok(pb::HashAlgorithm::Unspecified | pb::HashAlgorithm::Sha1) => Some(HashAlgorithm::Sha1),
        Ok(pb::HashAlgorithm::Sha256) => Some(HashAlgorithm::Sha256),
        Ok(pb::HashAlgorithm::Sha512) => Some(HashAlgorithm::Sha512),
        Err(_) => None,
    };
    let plain = Zeroizing::new(std::mem::take(&mut e.plain_secret));
    let secret = match (e.encrypted_secret, plain.is_empty()) {
        _ if kind.is_none() => EntrySecret::Invalid("kind must be HOTP or TOTP".into()),
        _ if algorithm.is_none() => EntrySecret::Invalid("unknown HMAC algorithm".into()),
        (Some(_), false) => EntrySecret::Invalid(
            "an entry has either an encrypted or a plain secret, not both".into(),
        ),
        (Some(enc), true) => match encryption_method(&enc.method) {
            Ok(method) => EntrySecret::Encrypted {
                method,
                cipher_value: enc.cipher_value,
                value_mac: (!e.value_mac.is_empty()).then_some(e.value_mac),
            },
            Err(m) => EntrySecret::Invalid(m),
        },
        (None, false) => EntrySecret::Plain(plain),
        (None, true) => EntrySecret::Invalid("the entry has no secret".into()),
    };
    ImportEntry {
        id: e.credential_id,
        subject: (!e.subject.is_empty()).then_some(e.subject),
        kind: kind.unwrap_or(OtpKind::Hotp),
        algorithm: algorithm.unwrap_or(HashAlgorithm::Sha1),
        digits: if e.digits == 0 { 6 } else { e.digits },
        counter: e.counter,
        period_seconds: e.period_seconds,
        drift_steps: e.drift_steps,
        secret,
    }
}

/// The running totals and the listed results.
#[derive(Default)]
struct Totals {
    response: pb::ImportCredentialsResponse,
}

impl Totals {
    fn add(&mut self, index: u64, id: String, serial: String, result: EntryResult) {
        let r = &mut self.response;
        r.entries += 1;
        let (code, reason) = match result {
            EntryResult::Imported => {
                r.imported += 1;
                return;
            }
            EntryResult::Skipped(m) => {
                r.skipped += 1;
                (pb::ImportResult::Skipped, m)
            }
            EntryResult::Conflict(m) => {
                r.conflicts += 1;
                (pb::ImportResult::Conflict, m)
            }
            EntryResult::Refused(m) => {
                r.refused += 1;
                (pb::ImportResult::Refused, m)
            }
        };
        if r.results.len() >= MAX_LISTED {
            r.results_truncated = true;
            return;
        }
        r.results.push(pb::ImportEntryResult {
            credential_id: id,
            serial,
            result: code as i32,
            reason,
            index,
        });
    }
}

/// Entries waiting for their batch: (stream index, id, serial, entry).
type Pending = Vec<(u64, String, String, ImportEntry)>;

async fn flush(
    state: &State,
    caller: &Identity,
    header: &ImportHeader,
    number: &mut u64,
    pending: &mut Pending,
    totals: &mut Totals,
) -> Result<(), Status> {
    if pending.is_empty() {
        return Ok(());
    }
    let batch = std::mem::take(pending);
    let mut keys = Vec::with_capacity(batch.len());
    let mut entries = Vec::with_capacity(batch.len());
    for (i, id, serial, e) in batch {
        keys.push((i, id, serial));
        entries.push(e);
    }
    *number += 1;
    let report = state
        .credentials
        .import_batch(
            Some(&caller.actor()),
            &caller.tenant,
            header,
            *number,
            entries,
        )
        .await?;
    let r = &mut totals.response;
    r.unmaced += report.unmaced;
    r.decrypted_in_hsm += report.in_hsm;
    r.decrypted_in_host += report.in_host;
    if !header.dry_run {
        r.batches += 1;
    }
    for ((i, id, serial), result) in keys.into_iter().zip(report.results) {
        totals.add(i, id, serial, result);
    }
    Ok(())
}

async fn next(
    stream: &mut tonic::Streaming<pb::ImportCredentialsRequest>,
) -> Result<Option<pb::ImportCredentialsRequest>, Status> {
    match tokio::time::timeout(Duration::from_secs(IDLE_SECONDS), stream.next()).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no import message for {IDLE_SECONDS} s"
        ))),
        Ok(None) => Ok(None),
        Ok(Some(m)) => m.map(Some),
    }
}

/// The whole stream (see the module doc).
pub async fn run(
    state: &State,
    caller: &Identity,
    mut stream: tonic::Streaming<pb::ImportCredentialsRequest>,
) -> Result<pb::ImportCredentialsResponse, Status> {
    let first = next(&mut stream)
        .await?
        .ok_or_else(|| invalid("an empty import stream: the first message must be the header"))?;
    let header = match first.message {
        Some(pb::import_credentials_request::Message::Header(h)) => header(h)?,
        _ => return Err(invalid("the first message of an import must be the header")),
    };
    if header.allow_unmaced {
        tracing::warn!(
            tenant = %caller.tenant,
            file_sha256 = %crate::common::hex(&header.file_sha256),
            "PSKC import with allow_unmaced: entries without a MAC are accepted"
        );
    }
    state.credentials.check_import_header(&header).await?;
    let mut totals = Totals::default();
    totals.response.dry_run = header.dry_run;
    let mut pending: Pending = Vec::with_capacity(BATCH_ENTRIES);
    let mut index = 0u64;
    let mut number = 0u64;
    while let Some(msg) = next(&mut stream).await? {
        let batch = match msg.message {
            Some(pb::import_credentials_request::Message::Batch(b)) => b,
            Some(pb::import_credentials_request::Message::Header(_)) => {
                return Err(invalid("only the first message of an import is a header"))
            }
            None => return Err(invalid("an import message must hold a header or a batch")),
        };
        for mut e in batch.entries {
            let (id, serial) = (e.credential_id.clone(), std::mem::take(&mut e.serial));
            pending.push((index, id, serial, entry(e)));
            index += 1;
            if pending.len() >= BATCH_ENTRIES {
                flush(
                    state,
                    caller,
                    &header,
                    &mut number,
                    &mut pending,
                    &mut totals,
                )
                .await?;
            }
        }
    }
    flush(
        state,
        caller,
        &header,
        &mut number,
        &mut pending,
        &mut totals,
    )
    .await?;
    let r = &totals.response;
    tracing::info!(
        tenant = %caller.tenant,
        entries = r.entries,
        imported = r.imported,
        skipped = r.skipped,
        conflicts = r.conflicts,
        refused = r.refused,
        dry_run = r.dry_run,
        "PSKC import finished"
    );
    Ok(totals.response)
}
