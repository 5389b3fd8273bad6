//! Caller roles, as the config file and status output name them.

use serde::{Deserialize, Serialize};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// An upstream login service: credentials, assertions, public keys, events.
    LoginService,
    /// A security officer: ceremonies, key inventory, credential unlock.
    Officer,
    /// An auditor: reads and verifies the audit trail.
    Auditor,
    /// A notification relay: reads every tenant's events, changes nothing.
    Notifier,
}

impl Role {
    /// The name used in config files and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::LoginService => "login-service",
            Role::Officer => "officer",
            Role::Auditor => "auditor",
            Role::Notifier => "notifier",
        }
    }
}
