//! tonic services: proto <-> domain, errors -> status. Thin on purpose: every decision
//! lives in a domain module, every check of the caller in `auth`.

pub mod admin;
pub mod audit;
pub mod ceremony;
pub mod credentials;
pub mod devices;
pub mod events;
pub mod import;
pub mod signing;
pub mod status;

use std::sync::Arc;
use std::time::Instant;

use crate::audit::log::AuditLog;
use crate::auth::Authorizer;
use crate::common::Clock;
use crate::credentials::Credentials;
use crate::hsm::Hsm;
use crate::store::Store;

/// What every service handler shares.
pub struct AppState {
    /// The token.
    pub hsm: Hsm,
    /// Durable state.
    pub store: Arc<Store>,
    /// HOTP/TOTP credentials.
    pub credentials: Credentials<Store>,
    /// The clock the service runs on.
    pub clock: Clock,
    /// The audit trail.
    pub audit: Arc<AuditLog>,
    /// Certificate -> role.
    pub authorizer: Arc<Authorizer>,
    /// Process start, for uptime.
    pub started: Instant,
    /// Signing keys and everything signed with them.
    pub signing: Arc<crate::signing::Signer>,
    /// Key ceremonies.
    pub ceremonies: Arc<crate::ceremony::Ceremonies>,
    /// The citizen-notification event stream.
    pub events: Arc<crate::events::Events>,
    /// The app authenticator.
    pub devices: Arc<crate::devices::Devices>,
    /// The metrics endpoint's bound address (`None`: off), for GetStatus.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Shared handle to the state.
pub type State = Arc<AppState>;
