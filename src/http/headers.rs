//! A call's HTTP headers in and out: the plain values the call core reads
//! (`x-request-id`, `authorization`, the W3C trace context), the server
//! span's HTTP attributes, and the headers every answer carries
//! (`x-request-id`, `x-llm-provider`, `x-llm-model`).

use axum::http::{HeaderMap, HeaderValue, Version};
use tracing::Span;

use crate::core::{Call, CallMeta, call_span};

fn value<'a>(headers: &'a HeaderMap, key: &str) -> Option<&'a str> {
    headers.get(key).and_then(|v| v.to_str().ok())
}

/// The values of `headers` the call core reads. HTTP callers send no
/// deadline: `server.default_timeout` is theirs.
pub fn call_meta(headers: &HeaderMap) -> CallMeta<'_> {
    CallMeta {
        request_id: value(headers, "x-request-id"),
        traceparent: value(headers, "traceparent"),
        tracestate: value(headers, "tracestate"),
        baggage: value(headers, "baggage"),
        timeout: None,
    }
}

pub fn authorization(headers: &HeaderMap) -> Option<&str> {
    value(headers, "authorization")
}

/// The server span of a request to `route` (`otel.name` is `"{method} {route}"`).
pub fn span(name: &'static str, method: &'static str, route: &'static str, version: Version) -> Span {
    let version = match version {
        Version::HTTP_2 => "2",
        Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    call_span!(
        "http",
        otel.name = name,
        http.request.method = method,
        http.route = route,
        network.protocol.version = version,
        http.response.status_code = ::tracing::field::Empty
    )
}

/// The headers every answer carries, success or error.
pub fn call_headers(call: &Call) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&call.request_id) {
        headers.insert("x-request-id", v);
    }
    if let Some(v) = call.provider().and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert("x-llm-provider", v);
    }
    if let Some(v) = call.upstream_model().and_then(|m| HeaderValue::from_str(m).ok()) {
        headers.insert("x-llm-model", v);
    }
    headers
}
