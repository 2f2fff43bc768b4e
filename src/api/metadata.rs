//! A call's gRPC metadata in and out: the plain values the call core reads
//! (`x-request-id`, `authorization`, the W3C trace context, `grpc-timeout`),
//! the server span's gRPC attributes, and the response headers every answer
//! carries (`x-request-id`, `x-llm-provider`, `x-llm-model`).

use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tracing::Span;

use crate::core::{Call, CallMeta, call_span};

/// Longest `grpc-timeout` value: 8 digits (gRPC over HTTP/2 spec).
const MAX_TIMEOUT_DIGITS: usize = 8;

fn value<'a>(metadata: &'a MetadataMap, key: &str) -> Option<&'a str> {
    metadata.get(key).and_then(|v| v.to_str().ok())
}

/// The values of `metadata` the call core reads.
pub fn call_meta(metadata: &MetadataMap) -> CallMeta<'_> {
    CallMeta {
        request_id: value(metadata, "x-request-id"),
        traceparent: value(metadata, "traceparent"),
        tracestate: value(metadata, "tracestate"),
        baggage: value(metadata, "baggage"),
        timeout: grpc_timeout(metadata),
    }
}

pub fn authorization(metadata: &MetadataMap) -> Option<&str> {
    value(metadata, "authorization")
}

/// The server span of a call to `LlmGateway/{method}`.
pub fn span(otel_name: &'static str, method: &'static str) -> Span {
    call_span!(
        "grpc",
        otel.name = otel_name,
        rpc.system = "grpc",
        rpc.service = "llmgateway.v1.LlmGateway",
        rpc.method = method,
        rpc.grpc.status_code = ::tracing::field::Empty
    )
}

/// The response metadata every answer carries, success or error.
pub fn headers(call: &Call, md: &mut MetadataMap) {
    if let Ok(v) = AsciiMetadataValue::try_from(call.request_id.as_str()) {
        md.insert("x-request-id", v);
    }
    if let Some(v) = call.provider().and_then(|p| p.parse().ok()) {
        md.insert("x-llm-provider", v);
    }
    if let Some(v) = call.upstream_model().and_then(|m| m.parse().ok()) {
        md.insert("x-llm-model", v);
    }
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    // Digits only: `u64::from_str` would also take a sign ("+100m", found
    // by fuzzing), which the spec does not allow.
    if digits.is_empty() || digits.len() > MAX_TIMEOUT_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut m = MetadataMap::new();
        for (v, d) in [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5u", Some(Duration::from_micros(5))),
            ("123456789S", None),
            ("S", None),
            ("10x", None),
            ("+100m", None),
            ("-1S", None),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), d, "{v}");
        }
    }
}
