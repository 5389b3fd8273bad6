//! Errors -> gRPC status: the one place that decides codes and what callers see.
//!
//! Caller mistakes (invalid argument, not found, permission) carry their message.
//! Failures inside the service carry a generic message; the detail (which PKCS#11
//! function, which return value) goes to the server log, never key material.

use tonic::{Code, Status};

use crate::error::Error;
use crate::hsm::ErrorKind;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::OutOfRange(m) => Status::out_of_range(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Hsm(e) => {
                let (code, text) = match e.kind() {
                    ErrorKind::Busy => (Code::ResourceExhausted, "HSM is busy; retry later"),
                    ErrorKind::Unavailable => (Code::Unavailable, "HSM unavailable; retry later"),
                    _ => (Code::Internal, "HSM operation failed"),
                };
                if code == Code::ResourceExhausted {
                    tracing::debug!(error = %e, "HSM request refused");
                } else {
                    tracing::error!(error = %e, "HSM operation failed");
                }
                Status::new(code, text)
            }
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Status::unavailable("store unavailable; retry later")
            }
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
            // Logged as tampering where it was found; the caller learns only that.
            Error::Integrity(m) => Status::data_loss(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm;

    #[test]
    fn codes_and_visible_text() {
        let cases: Vec<(Error, Code, &str)> = vec![
            (
                Error::InvalidArgument("code: 6 digits".into()),
                Code::InvalidArgument,
                "code: 6 digits",
            ),
            (
                Error::NotFound("no credential x".into()),
                Code::NotFound,
                "no credential x",
            ),
            (
                Error::PermissionDenied("role".into()),
                Code::PermissionDenied,
                "role",
            ),
            (
                Error::Hsm(hsm::Error::Busy),
                Code::ResourceExhausted,
                "HSM is busy; retry later",
            ),
            (
                Error::Hsm(hsm::Error::ShutDown),
                Code::Unavailable,
                "HSM unavailable; retry later",
            ),
            (
                Error::Hsm(hsm::Error::Invalid("detail".into())),
                Code::Internal,
                "HSM operation failed",
            ),
            (
                Error::Unavailable("store: connection to 10.0.0.5 lost".into()),
                Code::Unavailable,
                "store unavailable; retry later",
            ),
            (
                Error::Internal("secret detail".into()),
                Code::Internal,
                "internal error",
            ),
            (
                Error::Integrity("credential \"b\" failed its integrity check".into()),
                Code::DataLoss,
                "credential \"b\" failed its integrity check",
            ),
        ];
        for (e, code, text) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), text);
        }
    }
}
