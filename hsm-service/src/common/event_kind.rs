//! The kinds of citizen-notification events (`proto/hsm/v1/events.proto` documents each
//! one's `object_id` and `details_json`), and which of them are critical or a use.

/// What an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A new HOTP/TOTP authenticator (critical).
    CredentialCreated,
    /// An ACCEPTED verification (a use).
    CredentialUsed,
    /// A rejected (or replayed) code.
    CredentialRejected,
    /// The failure that locked a credential (critical).
    CredentialLocked,
    /// An unlock.
    CredentialUnlocked,
    /// A disable.
    CredentialDisabled,
    /// An enable.
    CredentialEnabled,
    /// A deletion (critical).
    CredentialDeleted,
    /// An assertion was signed.
    AssertionSigned,
    /// An activation of a new device was begun.
    DeviceActivationStarted,
    /// A new device was activated (critical).
    DeviceActivated,
    /// A device was revoked (critical).
    DeviceRevoked,
    /// A challenge was sent to the app.
    ChallengeCreated,
    /// A challenge was approved (a use).
    ChallengeApproved,
    /// A challenge was denied.
    ChallengeDenied,
    /// A challenge was reported as not initiated by the citizen (critical).
    ChallengeReported,
    /// A challenge expired unanswered.
    ChallengeExpired,
}

impl EventKind {
    /// Every kind, for validating filters.
    pub const ALL: &'static [EventKind] = &[
        EventKind::CredentialCreated,
        EventKind::CredentialUsed,
        EventKind::CredentialRejected,
        EventKind::CredentialLocked,
        EventKind::CredentialUnlocked,
        EventKind::CredentialDisabled,
        EventKind::CredentialEnabled,
        EventKind::CredentialDeleted,
        EventKind::AssertionSigned,
        EventKind::DeviceActivationStarted,
        EventKind::DeviceActivated,
        EventKind::DeviceRevoked,
        EventKind::ChallengeCreated,
        EventKind::ChallengeApproved,
        EventKind::ChallengeDenied,
        EventKind::ChallengeReported,
        EventKind::ChallengeExpired,
    ];

    /// The wire name (`credential.created` ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::CredentialCreated => "credential.created",
            EventKind::CredentialUsed => "credential.used",
            EventKind::CredentialRejected => "credential.rejected",
            EventKind::CredentialLocked => "credential.locked",
            EventKind::CredentialUnlocked => "credential.unlocked",
            EventKind::CredentialDisabled => "credential.disabled",
            EventKind::CredentialEnabled => "credential.enabled",
            EventKind::CredentialDeleted => "credential.deleted",
            EventKind::AssertionSigned => "assertion.signed",
            EventKind::DeviceActivationStarted => "device.activation_started",
            EventKind::DeviceActivated => "device.activated",
            EventKind::DeviceRevoked => "device.revoked",
            EventKind::ChallengeCreated => "challenge.created",
            EventKind::ChallengeApproved => "challenge.approved",
            EventKind::ChallengeDenied => "challenge.denied",
            EventKind::ChallengeReported => "challenge.reported",
            EventKind::ChallengeExpired => "challenge.expired",
        }
    }

    /// The kind named `name`, if any.
    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.iter().copied().find(|k| k.as_str() == name)
    }

    /// The citizen must always be told (a new authenticator, a lock, a deletion).
    pub fn critical(self) -> bool {
        matches!(
            self,
            EventKind::CredentialCreated
                | EventKind::CredentialLocked
                | EventKind::CredentialDeleted
                | EventKind::DeviceActivated
                | EventKind::DeviceRevoked
                | EventKind::ChallengeReported
        )
    }

    /// A use of an authenticator: notified when the subject asked for every use.
    pub fn is_use(self) -> bool {
        matches!(
            self,
            EventKind::CredentialUsed | EventKind::ChallengeApproved
        )
    }

    /// `notify = critical || (every_use && use)`.
    pub fn notify(self, every_use: bool) -> bool {
        self.critical() || (every_use && self.is_use())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_flags_follow_the_rule() {
        for &k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert!(!k.notify(false) || k.critical());
            assert_eq!(k.notify(true), k.critical() || k.is_use());
        }
        assert_eq!(EventKind::parse("credential.nope"), None);
        assert!(EventKind::CredentialUsed.notify(true));
        assert!(!EventKind::CredentialUsed.notify(false));
    }
}
