//! A request message beyond its service's decode limit is RESOURCE_EXHAUSTED (as gRPC
//! specifies), not the OUT_OF_RANGE tonic 0.14 answers. tonic refuses it from the
//! 5-byte length prefix, before reading the message; this layer only renames the code
//! of that one answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::{http, Service};

/// The start of tonic's message for a request message over the decode limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

/// Adds [`OversizeStatus`] in front of a service.
#[derive(Clone, Copy, Default)]
pub struct OversizeStatusLayer;

impl<S> tower_layer::Layer<S> for OversizeStatusLayer {
    type Service = OversizeStatus<S>;

    fn layer(&self, inner: S) -> OversizeStatus<S> {
        OversizeStatus { inner }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct OversizeStatus<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for OversizeStatus<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            rename_oversize(response.headers_mut());
            Ok(response)
        })
    }
}

fn rename_oversize(headers: &mut http::HeaderMap) {
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    if status.code() == tonic::Code::OutOfRange && status.message().starts_with(TOO_LARGE) {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static("8"), // RESOURCE_EXHAUSTED
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_decode_limit_answer_is_renamed() {
        let status = |code: tonic::Status| {
            let mut h = code.into_http::<()>().headers().clone();
            rename_oversize(&mut h);
            h.get("grpc-status").map(|v| v.as_bytes().to_vec())
        };
        let oversize = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
        );
        assert_eq!(status(oversize), Some(b"8".to_vec()));
        let other = tonic::Status::out_of_range("counter beyond the window");
        assert_eq!(status(other), Some(b"11".to_vec()));
    }
}
