//! A third-party app for tests: a P-256 device key made here (never by the service),
//! and the DeviceService / ApprovalService calls a phone makes through its login
//! service, signed as `proto/hsm/v1/devices.proto` says.

use hsm_client::proto::approval_service_client::ApprovalServiceClient;
use hsm_client::proto::device_service_client::DeviceServiceClient;
use hsm_client::proto::{
    AnswerChallengeRequest, BeginActivationRequest, BeginActivationResponse, Challenge,
    ChallengeDecision, ChallengePurpose, CompleteActivationRequest, CreateChallengeRequest, Device,
    ListPendingChallengesRequest,
};
use hsm_client::HsmClient;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use tonic::transport::Channel;

pub fn devices(c: &HsmClient) -> DeviceServiceClient<Channel> {
    DeviceServiceClient::new(c.channel())
}

pub fn approvals(c: &HsmClient) -> ApprovalServiceClient<Channel> {
    ApprovalServiceClient::new(c.channel())
}

/// A fresh P-256 key from the system RNG.
pub fn new_key() -> SigningKey {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    loop {
        let mut b = [0u8; 32];
        rng.fill(&mut b).expect("rng");
        if let Ok(k) = SigningKey::from_slice(&b) {
            return k;
        }
    }
}

/// SEC1 uncompressed point of `k`.
pub fn point(k: &SigningKey) -> Vec<u8> {
    k.verifying_key().to_sec1_point(false).as_bytes().to_vec()
}

/// DER ECDSA P-256/SHA-256 of `msg` with `k`.
pub fn sign(k: &SigningKey, msg: &[u8]) -> Vec<u8> {
    let sig: Signature = k.sign(msg);
    sig.to_der().as_bytes().to_vec()
}

/// An activated app: its key and its device id.
pub struct App {
    pub key: SigningKey,
    pub device_id: String,
    /// Last listing timestamp used (listings need increasing timestamps).
    pub last_list: std::cell::Cell<u64>,
}

fn now() -> u64 {
    hsm_service::common::Clock::system().now()
}

pub async fn begin(
    c: &HsmClient,
    subject: &str,
    authorized_by: &str,
) -> Result<BeginActivationResponse, tonic::Status> {
    devices(c)
        .begin_activation(BeginActivationRequest {
            subject: subject.into(),
            display_name: "Test phone".into(),
            authorized_by_challenge_id: authorized_by.into(),
            tenant: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Completes `begun` with a fresh key.
pub async fn complete(
    c: &HsmClient,
    begun: &BeginActivationResponse,
) -> Result<(App, Device), tonic::Status> {
    let key = new_key();
    let d = devices(c)
        .complete_activation(CompleteActivationRequest {
            activation_id: begun.activation_id.clone(),
            activation_code: begun.activation_code.clone(),
            public_key: point(&key),
            signature: sign(&key, &begun.payload),
        })
        .await?
        .into_inner();
    Ok((
        App {
            key,
            device_id: d.device_id.clone(),
            last_list: std::cell::Cell::new(0),
        },
        d,
    ))
}

/// Begin and complete an activation for `subject` (no other device yet).
pub async fn activate(c: &HsmClient, subject: &str) -> App {
    let begun = begin(c, subject, "").await.expect("begin activation");
    complete(c, &begun).await.expect("complete activation").0
}

pub async fn challenge(
    c: &HsmClient,
    subject: &str,
    purpose: ChallengePurpose,
    text: &str,
    ttl_seconds: u32,
) -> Result<Challenge, tonic::Status> {
    approvals(c)
        .create_challenge(CreateChallengeRequest {
            subject: subject.into(),
            text: text.into(),
            service_provider: "Test Bank".into(),
            purpose: purpose as i32,
            ttl_seconds,
        })
        .await
        .map(|r| r.into_inner())
}

/// The signed answer request of `app` to `ch`.
pub fn answer_request(
    app: &App,
    ch: &Challenge,
    decision: ChallengeDecision,
    binding: &str,
) -> AnswerChallengeRequest {
    let name = match decision {
        ChallengeDecision::Approve => "APPROVE",
        ChallengeDecision::Deny => "DENY",
        ChallengeDecision::NotMe => "NOT_ME",
        ChallengeDecision::Unspecified => "",
    };
    let mut msg = ch.payload.clone();
    msg.push(0);
    msg.extend_from_slice(name.as_bytes());
    msg.push(0);
    msg.extend_from_slice(binding.as_bytes());
    AnswerChallengeRequest {
        challenge_id: ch.challenge_id.clone(),
        device_id: app.device_id.clone(),
        decision: decision as i32,
        binding_code: binding.into(),
        signature: sign(&app.key, &msg),
    }
}

pub async fn answer(
    c: &HsmClient,
    app: &App,
    ch: &Challenge,
    decision: ChallengeDecision,
    binding: &str,
) -> Result<Challenge, tonic::Status> {
    approvals(c)
        .answer_challenge(answer_request(app, ch, decision, binding))
        .await
        .map(|r| r.into_inner())
}

/// The app's pending challenges (a signed listing at a fresh timestamp).
pub async fn pending(c: &HsmClient, app: &App) -> Result<Vec<Challenge>, tonic::Status> {
    let ts = now().max(app.last_list.get() + 1);
    app.last_list.set(ts);
    approvals(c)
        .list_pending_challenges(list_request(app, ts))
        .await
        .map(|r| r.into_inner().challenges)
}

pub fn list_request(app: &App, timestamp: u64) -> ListPendingChallengesRequest {
    ListPendingChallengesRequest {
        device_id: app.device_id.clone(),
        timestamp,
        signature: sign(
            &app.key,
            format!("list-pending\n{}\n{timestamp}", app.device_id).as_bytes(),
        ),
    }
}
