//! Authentication methods that leave evidence, as named in config and in `amr`.

/// How a citizen authenticated to this service (the method of an evidence record).
///
/// The name is both the config name (`[[signing.acr]] evidence = ["otp"]`) and the
/// RFC 8176 `amr` value it gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// A one-time code (HOTP/TOTP) this service verified.
    Otp,
    /// An approval in the app (`ApprovalService.AnswerChallenge`): a signature with a
    /// device key this service activated, after the citizen picked the binding code.
    App,
}

impl AuthMethod {
    /// Every method, for config checks and messages.
    pub const ALL: [AuthMethod; 2] = [AuthMethod::Otp, AuthMethod::App];

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Otp => "otp",
            AuthMethod::App => "app",
        }
    }

    /// The method a config name names.
    pub fn parse(name: &str) -> Option<AuthMethod> {
        AuthMethod::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// The RFC 8176 `amr` values an assertion citing this evidence carries.
    pub fn amr(self) -> &'static [&'static str] {
        match self {
            AuthMethod::Otp => &["otp"],
            // RFC 8176: proof of possession of the device key, and user presence (the
            // citizen swiped and picked the binding code).
            AuthMethod::App => &["pop", "user"],
        }
    }

    /// Stable one-byte code in the store (0 is never valid).
    pub fn code(self) -> u8 {
        match self {
            AuthMethod::Otp => 1,
            AuthMethod::App => 2,
        }
    }

    /// The method of a stored code.
    pub fn from_code(code: u8) -> Option<AuthMethod> {
        AuthMethod::ALL.into_iter().find(|m| m.code() == code)
    }
}
