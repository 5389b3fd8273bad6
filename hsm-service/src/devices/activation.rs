//! Device activation: [`Devices::begin_activation`] issues a one-time code (for the
//! citizen) and a payload (for the new device to sign); [`Devices::complete_activation`]
//! takes the code, the device's public key and its signature over the payload (proof of
//! possession) and activates the device.
//!
//! The code is never stored: only its HMAC-SHA256 under the token's binding key,
//! computed in the HSM over a domain-separated context (tag, tenant, activation id), and
//! compared in constant time (`subtle`). Five wrong codes cancel the activation.

use serde_json::json;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::payload::{self, ActivationFields};
use super::records::{self, key, ActivationRecord, ActivationState, DeviceRecord};
use super::signature::{DeviceKey, DeviceSignature};
use super::{
    check_id, check_subject, check_text, emit, invalid, nonce, precondition, Caller,
    ChallengeState, Devices, Purpose, MAX_ACTIVATION_FAILURES, MAX_DISPLAY_NAME_CHARS,
};
use crate::audit::{sha256_hex, Details};
use crate::common::EventKind;
use crate::error::{Error, Result};
use crate::hsm::Hsm;
use crate::store::{Rollback, Table};

/// The activation code alphabet: no 0/O, 1/I/L.
pub const CODE_ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
/// Length of an activation code.
pub const CODE_LEN: usize = 8;
/// Domain tag of the code MAC's context.
const CODE_TAG: &[u8] = b"hsm-service activation code v1";

/// A begun activation, as BeginActivation answers it.
pub struct Begun {
    /// Activation id.
    pub activation_id: String,
    /// The code, shown to the citizen once.
    pub code: Zeroizing<String>,
    /// What the device signs.
    pub payload: Vec<u8>,
    /// Unix seconds.
    pub expires_at: u64,
}

impl std::fmt::Debug for Begun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Begun")
            .field("activation_id", &self.activation_id)
            .field("code", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A completion request.
pub struct Completion {
    /// Activation id.
    pub activation_id: String,
    /// The code typed (case-insensitive).
    pub code: Zeroizing<String>,
    /// SEC1 uncompressed point.
    pub public_key: Vec<u8>,
    /// DER signature over the payload.
    pub signature: Vec<u8>,
}

/// The payload of `rec`.
pub fn payload_of(rec: &ActivationRecord) -> Vec<u8> {
    payload::activation(&ActivationFields {
        activation_id: &rec.id,
        tenant: &rec.tenant,
        subject: &rec.subject,
        display_name: &rec.display_name,
        expires_at: rec.expires_at,
        nonce: &rec.nonce,
    })
}

/// `CODE_LEN` characters of [`CODE_ALPHABET`], uniformly (rejection sampling of HSM
/// random bytes).
async fn new_code(hsm: &Hsm) -> Result<Zeroizing<String>> {
    let limit = (256 / CODE_ALPHABET.len() * CODE_ALPHABET.len()) as u8;
    let mut code = Zeroizing::new(String::with_capacity(CODE_LEN));
    while code.len() < CODE_LEN {
        let bytes = hsm.random(16).await?;
        for &b in bytes.iter() {
            if b < limit && code.len() < CODE_LEN {
                code.push(CODE_ALPHABET[usize::from(b) % CODE_ALPHABET.len()] as char);
            }
        }
    }
    Ok(code)
}

/// The code as typed, normalized (upper case), or INVALID_ARGUMENT when it cannot be a
/// code at all (then nothing is counted).
fn normalized(code: &str) -> Result<Zeroizing<String>> {
    let c = Zeroizing::new(code.trim().to_ascii_uppercase());
    if c.len() != CODE_LEN || !c.bytes().all(|b| CODE_ALPHABET.contains(&b)) {
        return Err(invalid(format!(
            "activation_code must be {CODE_LEN} characters of {}",
            String::from_utf8_lossy(CODE_ALPHABET)
        )));
    }
    Ok(c)
}

/// The HMAC of `code` for activation `id` of `tenant`, computed in the HSM.
async fn code_mac(hsm: &Hsm, tenant: &str, id: &str, code: &str) -> Result<[u8; 32]> {
    let mut context = CODE_TAG.to_vec();
    for part in [tenant, id] {
        context.extend_from_slice(&(part.len() as u32).to_be_bytes());
        context.extend_from_slice(part.as_bytes());
    }
    let macs = hsm
        .seed_bindings(vec![(context, code.as_bytes().to_vec())])
        .await?;
    macs.into_iter()
        .next()
        .ok_or_else(|| Error::Internal("no code MAC computed".into()))
}

impl Devices {
    /// BeginActivation: see the module documentation and `devices.proto`.
    pub async fn begin_activation(
        &self,
        caller: &Caller,
        subject: &str,
        display_name: &str,
        authorized_by: &str,
    ) -> Result<Begun> {
        check_subject(subject)?;
        check_text("display_name", display_name, MAX_DISPLAY_NAME_CHARS, false)?;
        if !authorized_by.is_empty() {
            check_id("authorized_by_challenge_id", authorized_by)?;
        }
        let id = self.new_id().await?;
        let code = new_code(&self.hsm).await?;
        let mac = code_mac(&self.hsm, &caller.tenant, &id, &code).await?;
        let now = self.clock.now();
        let ttl = self.config.activation_ttl_seconds;
        let rec = ActivationRecord {
            tenant: caller.tenant.clone(),
            id: id.clone(),
            subject: subject.to_owned(),
            display_name: display_name.to_owned(),
            code_mac: mac,
            nonce: nonce(&self.hsm).await?,
            created_at: now,
            expires_at: now + ttl,
            failures: 0,
            state: ActivationState::Pending,
            by_officer: false,
            authorized_by: authorized_by.to_owned(),
            device_id: String::new(),
        };
        let payload = payload_of(&rec);
        let max = self.config.max_devices_per_subject;
        let officer = caller.officer;
        let audit = self.audit_event(caller, "device.activation.begin", &id);
        let time_ms = self.clock.now_ms();
        let expires_at = rec.expires_at;
        self.write(move |txn| {
            let mut rec = rec;
            let s = records::subject(txn, &rec.tenant, &rec.subject)?;
            let active = records::devices_of(txn, &rec.tenant, &s)?
                .iter()
                .filter(|d| d.active())
                .count();
            if active >= max as usize {
                return Ok(Err(precondition(format!(
                    "the subject has {active} active devices, the most allowed ([devices] max_devices_per_subject = {max}); revoke one first"
                ))));
            }
            if active > 0 && rec.authorized_by.is_empty() && !officer {
                return Ok(Err(precondition(
                    "the subject already has an active device: authorized_by_challenge_id must name an ACTIVATE_DEVICE challenge approved on it (or an officer begins the activation after an in-person identity check)",
                )));
            }
            if !rec.authorized_by.is_empty() {
                let ck = key(&rec.tenant, &rec.authorized_by);
                let c: Option<super::ChallengeRecord> = records::get(txn, Table::Challenges, &ck)?;
                let refusal = match &c {
                    None => Some("authorized_by_challenge_id names no challenge".to_owned()),
                    Some(c) if c.subject != rec.subject => {
                        Some("authorized_by_challenge_id is a challenge of another subject".into())
                    }
                    Some(c) if c.purpose != Purpose::ActivateDevice => Some(
                        "authorized_by_challenge_id is not a CHALLENGE_PURPOSE_ACTIVATE_DEVICE challenge".into(),
                    ),
                    Some(c) if c.state != ChallengeState::Approved => Some(format!(
                        "authorized_by_challenge_id is {}, not APPROVED",
                        c.state_at(now).as_str()
                    )),
                    Some(c) if c.used => {
                        Some("authorized_by_challenge_id was already used for an activation".into())
                    }
                    Some(c) if now >= c.answered_at.saturating_add(ttl) => Some(format!(
                        "authorized_by_challenge_id was approved more than [devices] activation_ttl_seconds ({ttl}) ago"
                    )),
                    Some(_) => None,
                };
                if let Some(why) = refusal {
                    return Ok(Err(precondition(why)));
                }
                let mut c = c.expect("checked above");
                c.used = true;
                records::put(txn, Table::Challenges, &ck, &c)?;
            }
            rec.by_officer = officer;
            records::insert_expiring(
                txn,
                records::Expiring::Activation,
                &rec.tenant,
                &rec.id,
                rec.expires_at,
                now,
                &rec,
            )?;
            audit.append(
                txn,
                Details::new()
                    .str("subject", &rec.subject)
                    .str("authorized_by_challenge_id", &rec.authorized_by)
                    .bool("officer", officer),
            )?;
            emit(
                txn,
                time_ms,
                EventKind::DeviceActivationStarted,
                &rec.tenant,
                &rec.subject,
                &rec.id,
                json!({"by_officer": rec.by_officer}),
            )?;
            Ok(Ok(()))
        })
        .await?;
        tracing::info!(tenant = %caller.tenant, activation = %id, "device activation begun");
        Ok(Begun {
            activation_id: id,
            code,
            payload,
            expires_at,
        })
    }

    /// CompleteActivation: see the module documentation and `devices.proto`.
    pub async fn complete_activation(
        &self,
        caller: &Caller,
        req: Completion,
    ) -> Result<DeviceRecord> {
        check_id("activation_id", &req.activation_id)?;
        let code = normalized(&req.code)?;
        let device_key = DeviceKey::parse(&req.public_key)?;
        let sig = DeviceSignature::parse("signature", &req.signature)?;
        let tenant = caller.tenant.clone();
        let ak = key(&tenant, &req.activation_id);
        let current: ActivationRecord = {
            let ak = ak.clone();
            self.store
                .read(move |txn| {
                    records::get(txn, Table::Activations, &ak).map_err(|Rollback(e)| e)
                })
                .await
                .map_err(super::store_error)?
                .ok_or_else(|| Error::NotFound(format!("no activation {:?}", req.activation_id)))?
        };
        let now = self.clock.now();
        check_usable(&current, now)?;
        let mac = code_mac(&self.hsm, &tenant, &current.id, &code).await?;
        let code_ok = bool::from(mac.ct_eq(&current.code_mac));
        // A right code with a signature that does not verify changes nothing: the
        // caller does not hold the key it presents.
        if code_ok && !device_key.verifies(&payload_of(&current), &sig) {
            let why = "signature does not verify with public_key over the activation payload";
            self.record_refusal(
                caller,
                "device.activation.complete",
                &current.id,
                Details::new()
                    .str("subject", &current.subject)
                    .str("public_key_sha256", &sha256_hex(&req.public_key))
                    .str("result", "REFUSED")
                    .str("reason", why),
            )
            .await?;
            return Err(Error::PermissionDenied(why.into()));
        }
        let device_id = self.new_id().await?;
        let max = self.config.max_devices_per_subject;
        let time_ms = self.clock.now_ms();
        let public_key = req.public_key.clone();
        let fingerprint = sha256_hex(&public_key);
        let audit = self.audit_event(caller, "device.activation.complete", &current.id);
        let details = Details::new()
            .str("subject", &current.subject)
            .str("public_key_sha256", &fingerprint)
            .bool("code_ok", code_ok);
        self.write(move |txn| {
            let Some(mut rec) = records::get::<ActivationRecord, _>(txn, Table::Activations, &ak)?
            else {
                return Ok(Err(Error::NotFound("no such activation".into())));
            };
            // The record may have moved since the snapshot (a concurrent attempt).
            if let Err(e) = check_usable(&rec, now) {
                return Ok(Err(e));
            }
            if !code_ok {
                rec.failures += 1;
                let left = MAX_ACTIVATION_FAILURES.saturating_sub(rec.failures);
                if left == 0 {
                    rec.state = ActivationState::Cancelled;
                }
                records::put(txn, Table::Activations, &ak, &rec)?;
                audit.append(txn, details.u64("failures", u64::from(rec.failures)))?;
                return Ok(Err(precondition(if left == 0 {
                    format!("wrong activation code; {MAX_ACTIVATION_FAILURES} wrong codes cancelled the activation")
                } else {
                    format!("wrong activation code; {left} attempts left")
                })));
            }
            let sk = key(&rec.tenant, &rec.subject);
            let mut s = records::subject(txn, &rec.tenant, &rec.subject)?;
            let devices = records::devices_of(txn, &rec.tenant, &s)?;
            let active = devices.iter().filter(|d| d.active()).count();
            if active >= max as usize {
                return Ok(Err(precondition(format!(
                    "the subject has {active} active devices, the most allowed ([devices] max_devices_per_subject = {max})"
                ))));
            }
            if devices.iter().any(|d| d.active() && d.public_key == public_key) {
                return Ok(Err(Error::AlreadyExists(
                    "this public key is already an active device of the subject".into(),
                )));
            }
            let device = DeviceRecord {
                tenant: rec.tenant.clone(),
                id: device_id.clone(),
                subject: rec.subject.clone(),
                display_name: rec.display_name.clone(),
                public_key,
                created_at: now,
                revoked_at: 0,
                last_used_at: 0,
                last_list_timestamp: 0,
                activated_by_officer: rec.by_officer && rec.authorized_by.is_empty(),
            };
            records::insert(txn, Table::Devices, &key(&rec.tenant, &device_id), &device)?;
            s.devices.push(device_id.clone());
            records::put(txn, Table::DeviceSubjects, &sk, &s)?;
            rec.state = ActivationState::Completed;
            rec.device_id = device_id.clone();
            records::put(txn, Table::Activations, &ak, &rec)?;
            audit.append(txn, details.str("device_id", &device_id))?;
            emit(
                txn,
                time_ms,
                EventKind::DeviceActivated,
                &rec.tenant,
                &rec.subject,
                &device_id,
                json!({
                    "public_key_sha256": fingerprint,
                    "by_officer": device.activated_by_officer,
                }),
            )?;
            Ok(Ok(device))
        })
        .await
        .inspect(|d| tracing::info!(tenant = %d.tenant, device = %d.id, "device activated"))
    }
}

/// Refuses an activation that is used, cancelled or expired at `now`.
fn check_usable(rec: &ActivationRecord, now: u64) -> Result<()> {
    match rec.state {
        ActivationState::Completed => Err(precondition("the activation was already completed")),
        ActivationState::Cancelled => Err(precondition(
            "the activation was cancelled after too many wrong codes; begin a new one",
        )),
        ActivationState::Pending if now >= rec.expires_at => Err(precondition(
            "the activation has expired ([devices] activation_ttl_seconds); begin a new one",
        )),
        ActivationState::Pending => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_normalized_or_refused() {
        assert_eq!(&*normalized(" abcd2345 ").unwrap(), "ABCD2345");
        for bad in ["ABCD234", "ABCD23450", "ABCD2341", "ABCDOOOO", "ABCD-234"] {
            assert!(normalized(bad).is_err(), "{bad}");
        }
        assert_eq!(CODE_ALPHABET.len(), 31);
    }
}
