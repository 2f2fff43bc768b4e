//! `server.max_request_bytes` on the gRPC listener. tonic refuses a larger
//! message itself, from its length prefix and before reading it (each
//! service's `max_decoding_message_size`), but answers OUT_OF_RANGE; this
//! layer turns that refusal into the contract's RESOURCE_EXHAUSTED naming
//! the limit (`error::request_too_large`). Every other response passes
//! through untouched, at the cost of one header lookup.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use tonic::{Code, Status, body::Body, codegen::Service};

use super::error;

/// What tonic's decoder says when a message's length prefix is over the limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// `inner` (the gRPC routes) with tonic's size refusal rewritten.
#[derive(Clone)]
pub struct RequestLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> RequestLimit<S> {
    /// `limit`: the `max_decoding_message_size` every service was given.
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }
}

impl<S, R> Service<http::Request<R>> for RequestLimit<S>
where
    S: Service<http::Request<R>, Response = http::Response<Body>>,
    S::Future: Unpin,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = LimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<R>) -> Self::Future {
        LimitFuture { inner: self.inner.call(request), limit: self.limit }
    }
}

pub struct LimitFuture<F> {
    inner: F,
    limit: usize,
}

impl<F, E> Future for LimitFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = ready!(Pin::new(&mut this.inner).poll(cx))?;
        if is_size_refusal(response.headers()) {
            tracing::debug!(max_request_bytes = this.limit, "request message over server.max_request_bytes");
            return Poll::Ready(Ok(error::request_too_large(this.limit).into_http()));
        }
        Poll::Ready(Ok(response))
    }
}

/// tonic's trailers-only answer to an oversized message: `grpc-status` in
/// the headers, OUT_OF_RANGE, and its decoder's message.
fn is_size_refusal(headers: &http::HeaderMap) -> bool {
    let Some(code) = headers.get(Status::GRPC_STATUS) else { return false };
    code.as_bytes() == b"11"
        && Status::from_header_map(headers)
            .is_some_and(|s| s.code() == Code::OutOfRange && s.message().starts_with(TONIC_TOO_LARGE))
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn only_tonic_size_refusals_are_rewritten() {
        let refusal =
            Status::out_of_range(format!("{TONIC_TOO_LARGE}: found 5000 bytes, the limit is: 1024 bytes"))
                .into_http::<Body>();
        assert!(is_size_refusal(refusal.headers()));
        let other = Status::out_of_range("seek past the end").into_http::<Body>();
        assert!(!is_size_refusal(other.headers()));
        assert!(!is_size_refusal(&http::HeaderMap::new()), "an answer with trailers to come");
    }

    #[test]
    fn the_status_names_the_limit() {
        let status = error::request_too_large(1024);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("server.max_request_bytes") && status.message().contains("1024"));
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("INVALID_REQUEST", "llmgateway.v1"));
        assert_eq!(details.bad_request().expect("BadRequest").field_violations[0].field, "request");
    }
}
