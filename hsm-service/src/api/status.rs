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
            // Which mechanism the token lacks (e.g. an EdDSA key on a token without
            // CKM_EDDSA): the caller can act on it, and it names no secret.
            Error::Hsm(e) if e.kind() == ErrorKind::Unsupported => {
                tracing::warn!(error = %e, "HSM lacks a mechanism");
                Status::failed_precondition(e.to_string())
            }
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
                Error::Hsm(hsm::Error::Unsupported(
                    "the token lacks CKM_EDDSA, which EdDSA (Ed25519) keys need".into(),
                )),
                Code::FailedPrecondition,
                "the token lacks CKM_EDDSA, which EdDSA (Ed25519) keys need",
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

    /// A PostgreSQL statement that outlives `store.statement_timeout_ms` (here a locking
    /// read queued behind another instance's row lock) fails its group-commit batch, and
    /// the caller is answered UNAVAILABLE (retry); the instance's next batch commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_statement_timeout_answers_unavailable_then_recovers() {
        use std::sync::Arc;
        use std::time::{Duration, Instant};

        use crate::store::postgres::testing::TestDatabase;
        use crate::store::postgres::PgBackend;
        use crate::store::uow::Table;
        use crate::store::{Store, StoreOptions};

        let Some((db, holder, waiter)) = tokio::task::spawn_blocking(|| {
            let db = TestDatabase::create()?;
            let holder = db.store("holder");
            let mut o = db.options("waiter");
            o.statement_timeout = Duration::from_millis(300);
            let backend = PgBackend::open(&o).expect("open");
            let waiter =
                Store::with_backend(Arc::new(backend), StoreOptions::default()).expect("store");
            Some((db, holder, Arc::new(waiter)))
        })
        .await
        .expect("set-up") else {
            return;
        };
        holder.put_meta("k", b"0".to_vec()).await.expect("seed");

        // The holder's batch locks the row and keeps it for 2 s.
        let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
        let held = {
            let holder = holder.clone();
            tokio::spawn(async move {
                holder
                    .write(move |t| {
                        t.get(Table::Meta, "k")?;
                        let _ = locked_tx.send(());
                        std::thread::sleep(Duration::from_secs(2));
                        t.put(Table::Meta, "k", b"1")
                    })
                    .await
            })
        };
        locked_rx.await.expect("locked");
        let started = Instant::now();
        let err = waiter
            .write(|t| t.get(Table::Meta, "k"))
            .await
            .expect_err("the waiting statement times out");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        assert!(err.to_string().contains("57014"), "{err}");
        let status = Status::from(crate::error::store_failure("verify", err));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "store unavailable; retry later");

        held.await.expect("holder").expect("the holder commits");
        let v = waiter
            .write(|t| t.get(Table::Meta, "k"))
            .await
            .expect("the waiter's next batch");
        assert_eq!(v.as_deref(), Some(&b"1"[..]));
        drop((holder, waiter));
        tokio::task::spawn_blocking(move || drop(db))
            .await
            .expect("drop");
    }
}
