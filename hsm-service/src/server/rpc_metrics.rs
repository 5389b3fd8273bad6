//! `hsm_rpc_requests_total` and `hsm_rpc_duration_seconds`: the outermost layer of the
//! server stack, so it sees every answer (the role gate's refusals, the timeout's
//! DEADLINE_EXCEEDED, the decode limit's RESOURCE_EXHAUSTED) with its final status.
//!
//! A gRPC status travels in the response headers (a trailers-only answer, as every
//! error is) or in the trailers after the last message. The response body is wrapped
//! to read the trailers, and the call is counted when the body ends or is dropped: a
//! stream is measured over its whole life, and one the client walked away from before
//! any status was sent counts as CANCELLED.
//!
//! The method label is the path only when it names a known method (the role table,
//! health, reflection); any other path is `unknown`, so a client cannot make series up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::{http, Service};

use crate::auth::gate::METHOD_ROLES;

/// Methods outside the role table that are still labelled by name.
const UNGATED: &[&str] = &[
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// The label of `path` (`/service/method`).
fn method_label(path: &str) -> &'static str {
    let Some(method) = path.strip_prefix('/') else {
        return "unknown";
    };
    METHOD_ROLES
        .iter()
        .map(|(m, _)| *m)
        .chain(UNGATED.iter().copied())
        .find(|m| *m == method)
        .unwrap_or("unknown")
}

/// The gRPC status code in `headers`, if there is one.
fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code = std::str::from_utf8(value.as_bytes()).ok()?.parse().ok()?;
    Some(crate::metrics::grpc_code_name(code))
}

/// Adds [`RpcMetrics`] in front of a service.
#[derive(Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut call = Call {
            method: method_label(request.uri().path()),
            started: Instant::now(),
            status: None,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            match answer.await {
                Ok(response) => {
                    call.status = grpc_status(response.headers());
                    let (parts, body) = response.into_parts();
                    Ok(http::Response::from_parts(
                        parts,
                        MeteredBody {
                            inner: Box::pin(body),
                            call: Some(call),
                        },
                    ))
                }
                Err(e) => {
                    // The connection fails the call; no status reached the client.
                    call.status = Some("UNKNOWN");
                    call.record();
                    Err(e)
                }
            }
        })
    }
}

/// A call not yet counted.
struct Call {
    method: &'static str,
    started: Instant,
    /// Seen in the headers or the trailers.
    status: Option<&'static str>,
}

impl Call {
    fn record(self) {
        let status = self.status.unwrap_or("CANCELLED");
        crate::metrics::rpc(self.method, status, self.started.elapsed());
    }
}

/// The response body, counting its call when it ends (see the module documentation).
pub struct MeteredBody<B> {
    inner: Pin<Box<B>>,
    call: Option<Call>,
}

impl<B> MeteredBody<B> {
    fn finish(&mut self) {
        if let Some(call) = self.call.take() {
            call.record();
        }
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let (Some(call), Some(status)) = (this.call.as_mut(), grpc_status(trailers))
                    {
                        call.status = Some(status);
                    }
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call.as_mut() {
                    call.status.get_or_insert("UNKNOWN");
                }
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_are_labelled_by_name() {
        assert_eq!(
            method_label("/hsm.v1.CredentialService/VerifyCode"),
            "hsm.v1.CredentialService/VerifyCode"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        for path in [
            "/hsm.v1.CredentialService/NoSuchMethod",
            "/credential-id-1234",
            "",
            "hsm.v1.CredentialService/VerifyCode",
        ] {
            assert_eq!(method_label(path), "unknown", "{path:?}");
        }
    }

    #[test]
    fn the_status_comes_from_the_grpc_status_header() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
        assert_eq!(grpc_status(&h), Some("INVALID_ARGUMENT"));
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&h), None);
    }
}
