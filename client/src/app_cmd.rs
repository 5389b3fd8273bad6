//! `hsmctl device ...`, `hsmctl approval ...` (the login service's side) and
//! `hsmctl app ...` (the reference app: plays the citizen's phone).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Subcommand, ValueEnum};
use hsm_client::app::{self, ActivationLink, ChallengeKeys, DeviceKey, DeviceState};
use hsm_client::proto as pb;
use hsm_client::{ClientError, HsmClient};
use serde_json::{json, Value};
use zeroize::Zeroizing;

/// `hsmctl device`: activations and devices (role login-service; officers too).
#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Begin activating a device: prints the activation id, the one-time activation code
    /// and the activation link (`hsmctl app activate --activation LINK`).
    Begin {
        /// The citizen.
        #[arg(long)]
        subject: String,
        /// The device's name for the citizen (1..64 characters).
        #[arg(long, default_value = "phone")]
        display_name: String,
        /// A challenge of purpose activate-device approved by one of the subject's active
        /// devices (needed once the subject has one, unless the caller is an officer).
        #[arg(long, default_value = "")]
        authorized_by: String,
        /// Officers: the subject's tenant.
        #[arg(long, default_value = "")]
        tenant: String,
        /// Also print the activation link as a QR code for the app to scan.
        #[arg(long)]
        qr: bool,
        /// Also write the activation link as a QR code PNG (mode 0600).
        #[arg(long, value_name = "FILE")]
        qr_png: Option<PathBuf>,
    },
    /// A subject's devices.
    List {
        /// The citizen.
        #[arg(long)]
        subject: String,
        /// Officers: the subject's tenant.
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Revoke a device.
    Revoke {
        /// The device id.
        device_id: String,
        /// Officers: the device's tenant.
        #[arg(long, default_value = "")]
        tenant: String,
    },
}

/// `hsmctl approval`: challenges, as the login service asks them.
#[derive(Subcommand)]
pub enum ApprovalCmd {
    /// Ask a subject to approve a text in the app: prints the challenge id and the binding
    /// code to show on the login page.
    Create {
        /// The citizen.
        #[arg(long)]
        subject: String,
        /// What the citizen approves, shown verbatim in the app.
        #[arg(long)]
        text: String,
        /// Who asks (shown in the app).
        #[arg(long, default_value = "hsmctl")]
        service_provider: String,
        /// Why.
        #[arg(long, value_enum, default_value = "login")]
        purpose: Purpose,
        /// Lifetime in seconds (0 = 120, at most 600).
        #[arg(long, default_value_t = 0)]
        ttl: u32,
    },
    /// Show a challenge (state, binding code, evidence id once approved).
    Get {
        /// The challenge id.
        challenge_id: String,
    },
    /// Wait until the challenge is answered or expires; exits 0 only when APPROVED (and
    /// prints the evidence id for `sign assertion --evidence`).
    Wait {
        /// The challenge id.
        challenge_id: String,
        /// Give up after this many seconds (exit 1, state still PENDING).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Poll interval in milliseconds.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
}

/// `--purpose`.
#[derive(Clone, Copy, ValueEnum)]
pub enum Purpose {
    /// A login: an approval gives evidence (method "app").
    Login,
    /// A transaction: the assertion carries the SHA-256 of the text.
    Transaction,
    /// Approve a new device's activation (`device begin --authorized-by`).
    ActivateDevice,
}

/// `hsmctl app`: the reference app (plays the phone). Its calls go through the login
/// service's connection (the relay); the device signature proves them.
#[derive(Subcommand)]
pub enum AppCmd {
    /// Make a device key (P-256), complete the activation with it and keep it in a new
    /// state file (mode 0600; never overwritten).
    Activate {
        /// The citizen this phone belongs to (checked against the signed payload).
        #[arg(long)]
        subject: String,
        /// The activation code shown to the citizen (case-insensitive); may be left out
        /// when the activation link carries it.
        #[arg(long)]
        code: Option<String>,
        /// The activation link from `hsmctl device begin` (its QR code).
        #[arg(long)]
        activation: String,
        /// The state file to create.
        #[arg(long)]
        state: PathBuf,
    },
    /// The subject's pending challenges (a signed request), each checked against the
    /// service's challenge keys (JWKS usage "challenge") before it is shown.
    Pending {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
    },
    /// Approve a challenge with the binding code shown on the login page.
    Approve {
        /// The challenge id.
        challenge_id: String,
        /// The two digits shown on the login page.
        #[arg(long)]
        binding: String,
        /// The state file.
        #[arg(long)]
        state: PathBuf,
    },
    /// Deny a challenge.
    Deny {
        /// The challenge id.
        challenge_id: String,
        /// The state file.
        #[arg(long)]
        state: PathBuf,
    },
    /// Report a challenge the citizen did not initiate ("this was not me").
    NotMe {
        /// The challenge id.
        challenge_id: String,
        /// The state file.
        #[arg(long)]
        state: PathBuf,
    },
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn device_state_name(s: i32) -> String {
    pb::DeviceState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("DEVICE_STATE_")
                .to_owned()
        })
        .unwrap_or_else(|_| s.to_string())
}

fn device_json(d: &pb::Device) -> Value {
    json!({
        "device_id": d.device_id,
        "subject": d.subject,
        "display_name": d.display_name,
        "state": device_state_name(d.state),
        "created_at": d.created_at,
        "public_key_sha256": d.public_key_sha256,
        "last_used_at": d.last_used_at,
        "tenant": d.tenant,
        "revoked_at": d.revoked_at,
        "activated_by_officer": d.activated_by_officer,
    })
}

fn print_device(d: &pb::Device) {
    println!(
        "device {} {} subject {} ({}) key sha256 {} tenant {}",
        d.device_id,
        device_state_name(d.state),
        d.subject,
        d.display_name,
        d.public_key_sha256,
        d.tenant
    );
}

fn challenge_json(c: &pb::Challenge) -> Value {
    json!({
        "challenge_id": c.challenge_id,
        "subject": c.subject,
        "text": c.text,
        "service_provider": c.service_provider,
        "purpose": app::purpose_name(c.purpose),
        "state": app::state_name(c.state),
        "binding_code": c.binding_code,
        "created_at": c.created_at,
        "expires_at": c.expires_at,
        "server_kid": c.server_kid,
        "answered_by_device_id": c.answered_by_device_id,
        "evidence_id": c.evidence_id,
        "answered_at": c.answered_at,
        "tenant": c.tenant,
    })
}

fn print_challenge(c: &pb::Challenge) {
    println!(
        "challenge {} {} {} subject {} expires {}",
        c.challenge_id,
        app::purpose_name(c.purpose),
        app::state_name(c.state),
        c.subject,
        c.expires_at
    );
    if !c.binding_code.is_empty() {
        println!("binding code {}", c.binding_code);
    }
    if !c.evidence_id.is_empty() {
        println!("evidence {}", c.evidence_id);
    }
}

/// Run a `device` subcommand.
pub async fn device(
    client: &HsmClient,
    cmd: &DeviceCmd,
    json_out: bool,
) -> Result<ExitCode, ClientError> {
    let mut d = client.devices();
    match cmd {
        DeviceCmd::Begin {
            subject,
            display_name,
            authorized_by,
            tenant,
            qr,
            qr_png,
        } => {
            let r = d
                .begin_activation(pb::BeginActivationRequest {
                    subject: subject.clone(),
                    display_name: display_name.clone(),
                    authorized_by_challenge_id: authorized_by.clone(),
                    tenant: tenant.clone(),
                })
                .await?
                .into_inner();
            let code = Zeroizing::new(r.activation_code.clone());
            let link = ActivationLink {
                activation_id: r.activation_id.clone(),
                code: code.clone(),
                payload: r.payload.clone(),
            }
            .to_uri();
            if let Some(path) = qr_png {
                hsm_client::qr::write_png(&link, path)?;
            }
            let picture = if *qr {
                Some(hsm_client::qr::terminal(&link)?)
            } else {
                None
            };
            if json_out {
                let mut v = json!({
                    "activation_id": r.activation_id,
                    "activation_code": code.as_str(),
                    "expires_at": r.expires_at,
                    "activation_link": link.as_str(),
                });
                if let Some(p) = &picture {
                    v["qr"] = json!(p);
                }
                println!("{v}");
            } else {
                println!("activation {} expires {}", r.activation_id, r.expires_at);
                println!("activation code (shown once): {}", code.as_str());
                println!("activation link: {}", link.as_str());
                if let Some(p) = &picture {
                    print!("{p}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeviceCmd::List { subject, tenant } => {
            let r = d
                .list_devices(pb::ListDevicesRequest {
                    subject: subject.clone(),
                    tenant: tenant.clone(),
                })
                .await?
                .into_inner();
            if json_out {
                let list: Vec<Value> = r.devices.iter().map(device_json).collect();
                println!("{}", json!({ "devices": list }));
            } else {
                for dev in &r.devices {
                    print_device(dev);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeviceCmd::Revoke { device_id, tenant } => {
            let dev = d
                .revoke_device(pb::RevokeDeviceRequest {
                    device_id: device_id.clone(),
                    tenant: tenant.clone(),
                })
                .await?
                .into_inner();
            if json_out {
                println!("{}", device_json(&dev));
            } else {
                print_device(&dev);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Run an `approval` subcommand.
pub async fn approval(
    client: &HsmClient,
    cmd: &ApprovalCmd,
    json_out: bool,
) -> Result<ExitCode, ClientError> {
    let mut a = client.approvals();
    let show = |c: &pb::Challenge| {
        if json_out {
            println!("{}", challenge_json(c));
        } else {
            print_challenge(c);
        }
    };
    match cmd {
        ApprovalCmd::Create {
            subject,
            text,
            service_provider,
            purpose,
            ttl,
        } => {
            let c = a
                .create_challenge(pb::CreateChallengeRequest {
                    subject: subject.clone(),
                    text: text.clone(),
                    service_provider: service_provider.clone(),
                    purpose: match purpose {
                        Purpose::Login => pb::ChallengePurpose::Login,
                        Purpose::Transaction => pb::ChallengePurpose::Transaction,
                        Purpose::ActivateDevice => pb::ChallengePurpose::ActivateDevice,
                    } as i32,
                    ttl_seconds: *ttl,
                })
                .await?
                .into_inner();
            show(&c);
            Ok(ExitCode::SUCCESS)
        }
        ApprovalCmd::Get { challenge_id } => {
            let c = a
                .get_challenge(pb::GetChallengeRequest {
                    challenge_id: challenge_id.clone(),
                })
                .await?
                .into_inner();
            show(&c);
            Ok(ExitCode::SUCCESS)
        }
        ApprovalCmd::Wait {
            challenge_id,
            timeout,
            interval_ms,
        } => {
            let deadline = Instant::now() + Duration::from_secs(*timeout);
            let interval = Duration::from_millis((*interval_ms).max(10));
            loop {
                let c = a
                    .get_challenge(pb::GetChallengeRequest {
                        challenge_id: challenge_id.clone(),
                    })
                    .await?
                    .into_inner();
                let pending = c.state == pb::ChallengeState::Pending as i32;
                if !pending || Instant::now() + interval > deadline {
                    show(&c);
                    return Ok(if c.state == pb::ChallengeState::Approved as i32 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    });
                }
                tokio::time::sleep(interval).await;
            }
        }
    }
}

/// Run an `app` subcommand.
pub async fn app(
    client: &HsmClient,
    cmd: &AppCmd,
    json_out: bool,
) -> Result<ExitCode, ClientError> {
    match cmd {
        AppCmd::Activate {
            subject,
            code,
            activation,
            state,
        } => {
            activate(
                client,
                subject,
                code.as_deref(),
                activation,
                state,
                json_out,
            )
            .await
        }
        AppCmd::Pending { state } => {
            let mut st = DeviceState::load(state)?;
            let (keys, pending) = pending(client, &mut st, state).await?;
            let mut shown = Vec::new();
            for c in &pending {
                let p = keys.verify(c)?;
                shown.push(p);
            }
            if json_out {
                let list: Vec<Value> = shown
                    .iter()
                    .map(|p| {
                        json!({
                            "challenge_id": p.challenge_id,
                            "subject": p.subject,
                            "text": p.text,
                            "service_provider": p.service_provider,
                            "purpose": p.purpose,
                            "created_at": p.created_at,
                            "expires_at": p.expires_at,
                            "server_signature_verified": true,
                        })
                    })
                    .collect();
                println!("{}", json!({ "challenges": list }));
            } else {
                if shown.is_empty() {
                    println!("no pending challenge");
                }
                for p in &shown {
                    println!(
                        "challenge {} {} from {} expires {} (signed by the service)",
                        p.challenge_id, p.purpose, p.service_provider, p.expires_at
                    );
                    for line in p.text.lines() {
                        println!("    {line}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AppCmd::Approve {
            challenge_id,
            binding,
            state,
        } => {
            answer(
                client,
                state,
                challenge_id,
                pb::ChallengeDecision::Approve,
                binding,
                json_out,
            )
            .await
        }
        AppCmd::Deny {
            challenge_id,
            state,
        } => {
            answer(
                client,
                state,
                challenge_id,
                pb::ChallengeDecision::Deny,
                "",
                json_out,
            )
            .await
        }
        AppCmd::NotMe {
            challenge_id,
            state,
        } => {
            answer(
                client,
                state,
                challenge_id,
                pb::ChallengeDecision::NotMe,
                "",
                json_out,
            )
            .await
        }
    }
}

async fn activate(
    client: &HsmClient,
    subject: &str,
    code: Option<&str>,
    activation: &str,
    state: &Path,
    json_out: bool,
) -> Result<ExitCode, ClientError> {
    let link = ActivationLink::parse(activation)?;
    let code = match code {
        Some(c) => Zeroizing::new(c.to_owned()),
        None if !link.code.is_empty() => link.code.clone(),
        None => {
            return Err(app::AppError::Usage(
                "the activation link carries no code: give --code".into(),
            )
            .into())
        }
    };
    // The app checks what it signs: this activation, for this citizen, not expired.
    let p = app::ActivationPayload::decode(&link.payload)?;
    if p.activation_id != link.activation_id {
        return Err(app::AppError::Usage(
            "the activation link's payload is for another activation".into(),
        )
        .into());
    }
    if p.subject != subject {
        return Err(app::AppError::Usage(format!(
            "the activation is for subject {:?}, not {subject:?}",
            p.subject
        ))
        .into());
    }
    if p.expires_at <= now_secs() {
        return Err(app::AppError::Usage("the activation has expired".into()).into());
    }
    // Create the state file first (never overwriting one), so a device key is never made
    // active without being kept.
    let mut file = DeviceState::create_file(state)?;
    let key = DeviceKey::generate();
    let r = client
        .devices()
        .complete_activation(pb::CompleteActivationRequest {
            activation_id: link.activation_id.clone(),
            activation_code: code.to_string(),
            public_key: key.public_sec1(),
            signature: key.sign(&link.payload),
        })
        .await;
    let dev = match r {
        Ok(d) => d.into_inner(),
        Err(s) => {
            drop(file);
            let _ = std::fs::remove_file(state);
            return Err(s.into());
        }
    };
    if dev.public_key_sha256 != key.public_key_sha256() {
        let _ = std::fs::remove_file(state);
        return Err(app::AppError::Usage(
            "the service registered another public key than this device's".into(),
        )
        .into());
    }
    DeviceState {
        device_id: dev.device_id.clone(),
        subject: dev.subject.clone(),
        tenant: dev.tenant.clone(),
        display_name: dev.display_name.clone(),
        key,
        last_list_timestamp: 0,
    }
    .write(&mut file, state)?;
    if json_out {
        let mut v = device_json(&dev);
        v["state_file"] = json!(state.display().to_string());
        println!("{v}");
    } else {
        print_device(&dev);
        println!("device key kept in {} (mode 0600)", state.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The challenge keys and the subject's pending challenges (a signed request; its
/// timestamp kept in the state file at `path`).
async fn pending(
    client: &HsmClient,
    st: &mut DeviceState,
    path: &Path,
) -> Result<(ChallengeKeys, Vec<pb::Challenge>), ClientError> {
    let keys = ChallengeKeys::fetch(client).await?;
    let timestamp = st.next_list_timestamp(now_secs())?;
    st.last_list_timestamp = timestamp;
    st.save(path)?;
    let r = client
        .approvals()
        .list_pending_challenges(app::list_pending_request(&st.key, &st.device_id, timestamp))
        .await?
        .into_inner();
    Ok((keys, r.challenges))
}

async fn answer(
    client: &HsmClient,
    state: &Path,
    challenge_id: &str,
    decision: pb::ChallengeDecision,
    binding: &str,
    json_out: bool,
) -> Result<ExitCode, ClientError> {
    let mut st = DeviceState::load(state)?;
    let (keys, pending) = pending(client, &mut st, state).await?;
    let c = pending
        .iter()
        .find(|c| c.challenge_id == challenge_id)
        .ok_or_else(|| {
            ClientError::Status(tonic::Status::not_found(format!(
                "challenge {challenge_id} is not pending for this device's subject"
            )))
        })?;
    // Never sign a challenge the service did not sign.
    keys.verify(c)?;
    let r = client
        .approvals()
        .answer_challenge(app::answer_request(
            &st.key,
            &st.device_id,
            challenge_id,
            &c.payload,
            decision,
            binding,
        ))
        .await?
        .into_inner();
    if json_out {
        println!("{}", challenge_json(&r));
    } else {
        print_challenge(&r);
    }
    let expected = match decision {
        pb::ChallengeDecision::Approve => pb::ChallengeState::Approved,
        pb::ChallengeDecision::Deny => pb::ChallengeState::Denied,
        _ => pb::ChallengeState::Reported,
    };
    Ok(if r.state == expected as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
