//! The one place where PKCS#11 return values become the service's error kinds.
//!
//! Every error names the PKCS#11 function that failed, so the server log says exactly
//! what the token refused. Nothing here ever carries key material, a PIN or a code:
//! the only payloads are function names, return-value names and paths.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// What went wrong, in the terms the rest of the service acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The device, the session or the login went away; retrying on a fresh session may work.
    Unavailable,
    /// The request queue in front of the sessions is full.
    Busy,
    /// The token rejected the input (length, size, mechanism parameters).
    InvalidInput,
    /// An object that should exist does not.
    NotFound,
    /// The PIN was wrong or is locked.
    Authentication,
    /// The token lacks a mechanism this needs (named in the message, which is safe to
    /// show: mechanism names only).
    Unsupported,
    /// Anything else: a bug, a misconfigured token.
    Internal,
}

/// An error from the HSM boundary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PKCS#11 function returned something other than CKR_OK.
    #[error("{} failed: {}", function_name(*.function), rv_name(*.rv))]
    Pkcs11 {
        /// The function that failed.
        function: Function,
        /// Its return value.
        rv: RvError,
    },
    /// The PKCS#11 module could not be loaded.
    #[error("cannot load PKCS#11 module {path}: {detail}")]
    Load {
        /// Module path.
        path: String,
        /// Loader message.
        detail: String,
    },
    /// No initialized token matches the configured label or serial number.
    #[error("no initialized token with {0}")]
    TokenNotFound(String),
    /// An object the service relies on is missing from the token.
    #[error("no {0} on the token")]
    ObjectNotFound(String),
    /// The request queue is full.
    #[error("HSM request queue is full")]
    Busy,
    /// The session pool has been shut down.
    #[error("HSM session pool is shut down")]
    ShutDown,
    /// A value the token returned or the caller supplied has an unusable shape.
    #[error("{0}")]
    Invalid(String),
    /// cryptoki failed outside a PKCS#11 call (conversion, missing symbol).
    #[error("PKCS#11 binding error: {0}")]
    Binding(String),
    /// The token lacks (or has a different) mechanism the service needs; the message
    /// names it (see `hsm::mechanisms`).
    #[error("{0}")]
    Unsupported(String),
    /// A wrapped seed's binding MAC does not match its record: it was not unwrapped.
    #[error("the wrapped seed is not bound to its record (binding MAC mismatch)")]
    BindingMismatch,
}

impl Error {
    /// The kind the rest of the service maps to a status code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Pkcs11 { rv, .. } => kind_of(*rv),
            Error::Busy => ErrorKind::Busy,
            Error::ShutDown => ErrorKind::Unavailable,
            Error::ObjectNotFound(_) | Error::TokenNotFound(_) => ErrorKind::NotFound,
            Error::Invalid(_) => ErrorKind::InvalidInput,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Load { .. } | Error::Binding(_) | Error::BindingMismatch => ErrorKind::Internal,
        }
    }

    /// True when the session (or the whole device connection) is gone and a new session
    /// should be opened before the next operation.
    pub(crate) fn is_session_lost(&self) -> bool {
        matches!(
            self,
            Error::Pkcs11 { rv, .. } if matches!(
                rv,
                RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceError
                    | RvError::DeviceRemoved
                    | RvError::DeviceMemory
                    | RvError::TokenNotPresent
                    | RvError::TokenNotRecognized
                    | RvError::UserNotLoggedIn
                    | RvError::CryptokiNotInitialized
            )
        )
    }

    /// True when a cached object handle is no longer valid.
    pub fn is_stale_handle(&self) -> bool {
        matches!(
            self,
            Error::Pkcs11 {
                rv: RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
                ..
            }
        )
    }

    /// The PKCS#11 return value, when there is one.
    pub fn rv(&self) -> Option<RvError> {
        match self {
            Error::Pkcs11 { rv, .. } => Some(*rv),
            _ => None,
        }
    }
}

/// `C_Login` for `Function::Login`: the name the PKCS#11 specification and vendor logs use.
pub(crate) fn function_name(f: Function) -> String {
    format!("C_{f:?}")
}

/// `CKR_PIN_INCORRECT` for `RvError::PinIncorrect`.
pub(crate) fn rv_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn kind_of(rv: RvError) -> ErrorKind {
    use RvError::*;
    match rv {
        SessionHandleInvalid
        | SessionClosed
        | SessionCount
        | DeviceError
        | DeviceRemoved
        | DeviceMemory
        | HostMemory
        | TokenNotPresent
        | TokenNotRecognized
        | UserNotLoggedIn
        | CryptokiNotInitialized
        | FunctionCanceled
        | OperationActive => ErrorKind::Unavailable,
        DataLenRange
        | DataInvalid
        | EncryptedDataInvalid
        | EncryptedDataLenRange
        | KeySizeRange
        | SignatureInvalid
        | SignatureLenRange
        | WrappedKeyInvalid
        | WrappedKeyLenRange
        | MechanismParamInvalid
        | ArgumentsBad => ErrorKind::InvalidInput,
        // A handle that went stale under an operation in flight when its session was lost
        // (the token dropped its handles with the last session): the cache is emptied
        // and the next attempt searches again, so it is worth a retry (faults.rs). An
        // object really missing is `Error::ObjectNotFound`, from the search.
        ObjectHandleInvalid | KeyHandleInvalid => ErrorKind::Unavailable,
        PinIncorrect | PinInvalid | PinLenRange | PinExpired | PinLocked => {
            ErrorKind::Authentication
        }
        _ => ErrorKind::Internal,
    }
}

impl From<CkError> for Error {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, function) => Error::Pkcs11 { function, rv },
            CkError::LibraryLoading(e) => Error::Load {
                path: String::new(),
                detail: e.to_string(),
            },
            other => Error::Binding(other.to_string()),
        }
    }
}

/// Result alias for the HSM boundary.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let cases = [
            (RvError::DeviceError, ErrorKind::Unavailable, true),
            (RvError::SessionHandleInvalid, ErrorKind::Unavailable, true),
            (RvError::UserNotLoggedIn, ErrorKind::Unavailable, true),
            (RvError::KeySizeRange, ErrorKind::InvalidInput, false),
            (RvError::PinIncorrect, ErrorKind::Authentication, false),
            (RvError::KeyHandleInvalid, ErrorKind::Unavailable, false),
            (RvError::MechanismInvalid, ErrorKind::Internal, false),
        ];
        for (rv, kind, lost) in cases {
            let e = Error::from(CkError::Pkcs11(rv, Function::Sign));
            assert_eq!(e.kind(), kind, "{rv}");
            assert_eq!(e.is_session_lost(), lost, "{rv}");
        }
    }

    #[test]
    fn message_names_the_function() {
        let e = Error::from(CkError::Pkcs11(RvError::PinIncorrect, Function::Login));
        assert_eq!(e.to_string(), "C_Login failed: CKR_PIN_INCORRECT");
    }
}
