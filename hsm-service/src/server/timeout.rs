//! The request timeout (`server.limits.request_timeout_seconds`): a call whose answer
//! takes longer is DEADLINE_EXCEEDED and its handler is dropped. ExecuteCeremony is
//! exempt: dropping an execution half-way would leave it `executing` with some of its
//! keys made; an officer's ceremony is bounded by its plan, not by a timer. So is
//! ImportCredentials: a five-million-entry stream takes far longer than any request
//! timeout, commits batch by batch, and has its own per-message idle limit instead (see
//! `api::import`). (A client's own `grpc-timeout` still applies to every call, through
//! tonic.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::{http, Service};

/// Methods (`/service/method`) the timeout does not apply to.
const EXEMPT: &[&str] = &[
    "/hsm.v1.CeremonyService/ExecuteCeremony",
    "/hsm.v1.CredentialService/ImportCredentials",
];

/// Adds [`RequestTimeout`] in front of a service.
#[derive(Clone, Copy)]
pub struct RequestTimeoutLayer {
    timeout: Duration,
}

impl RequestTimeoutLayer {
    /// Calls (except the exempt ones) get at most `timeout` to answer.
    pub fn new(timeout: Duration) -> RequestTimeoutLayer {
        RequestTimeoutLayer { timeout }
    }
}

impl<S> tower_layer::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B, ResBody> Service<http::Request<B>> for RequestTimeout<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let exempt = EXEMPT.contains(&request.uri().path());
        let answer = self.inner.call(request);
        if exempt {
            return Box::pin(answer);
        }
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, answer).await {
                Ok(result) => result,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "no answer within the request timeout ({} s)",
                    timeout.as_secs_f64()
                ))
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_layer::Layer;

    /// Answers after `delay`.
    #[derive(Clone)]
    struct Slow {
        delay: Duration,
    }

    impl Service<http::Request<()>> for Slow {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(http::Response::new(()))
            })
        }
    }

    fn code(response: &http::Response<()>) -> Option<tonic::Code> {
        tonic::Status::from_header_map(response.headers()).map(|s| s.code())
    }

    #[tokio::test]
    async fn slow_calls_are_deadline_exceeded_except_ceremony_executions() {
        let mut svc = RequestTimeoutLayer::new(Duration::from_millis(20)).layer(Slow {
            delay: Duration::from_secs(600),
        });
        let request = |path: &str| http::Request::builder().uri(path).body(()).expect("req");
        let response = svc
            .call(request("/hsm.v1.CredentialService/VerifyCode"))
            .await
            .expect("answer");
        assert_eq!(code(&response), Some(tonic::Code::DeadlineExceeded));

        let execution = svc.call(request("/hsm.v1.CeremonyService/ExecuteCeremony"));
        let waited = tokio::time::timeout(Duration::from_millis(200), execution).await;
        assert!(
            waited.is_err(),
            "an execution is not cut by the request timeout"
        );

        let mut fast = RequestTimeoutLayer::new(Duration::from_secs(600)).layer(Slow {
            delay: Duration::ZERO,
        });
        let response = fast
            .call(request("/hsm.v1.CredentialService/VerifyCode"))
            .await
            .expect("answer");
        assert_eq!(code(&response), None, "answered in time, untouched");
    }
}
