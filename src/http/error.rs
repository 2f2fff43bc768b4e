//! The one place where a call's error becomes an HTTP answer, in OpenAI's
//! shape (`{"error": {"message", "type", "code", "param"}}`): a status
//! before the stream starts, an error event after it has. Also how the HTTP
//! front door names its statuses in the call's record.

use std::time::Duration;

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::Serialize;

use super::{headers::call_headers, response::ChunkWriter};
use crate::core::{Call, CallError, Door, INVALID_KEY, MISSING_KEY, Outcome, Reason};

/// The HTTP front door, for the call core's record: the status as the
/// `code` label, the same as `http.response.status_code`; a caller who left
/// is 499 (nginx's "client closed request").
pub static HTTP: Door = Door {
    name: "http",
    status_field: "http.response.status_code",
    ok: Outcome { code: "200", number: 200 },
    cancelled: Outcome { code: "499", number: 499 },
    deadline: Outcome { code: "504", number: 504 },
};

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInfo<'a>,
}

#[derive(Serialize)]
struct ErrorInfo<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'static str,
    param: Option<&'a str>,
}

/// The HTTP status, OpenAI error `type`, and `code` (the contract's reason,
/// in lower case) for `error`.
fn classify(error: &CallError) -> (StatusCode, &'static str, &'static str) {
    use StatusCode as S;
    match error {
        CallError::RequestTooLarge { .. } => {
            return (S::PAYLOAD_TOO_LARGE, "invalid_request_error", "request_too_large");
        }
        CallError::RequestTimeout(_) => {
            return (S::REQUEST_TIMEOUT, "invalid_request_error", "request_timeout");
        }
        _ => {}
    }
    let invalid = "invalid_request_error";
    let limited = "rate_limit_error";
    let server = "server_error";
    match error.reason() {
        Reason::InvalidRequest => (S::BAD_REQUEST, invalid, "invalid_request"),
        Reason::UpstreamRejected => (S::BAD_REQUEST, invalid, "upstream_rejected"),
        Reason::ModelNotFound => (S::NOT_FOUND, invalid, "model_not_found"),
        Reason::Unauthenticated => (S::UNAUTHORIZED, "authentication_error", "unauthenticated"),
        Reason::ModelNotAllowed => (S::FORBIDDEN, "permission_error", "model_not_allowed"),
        Reason::RateLimited => (S::TOO_MANY_REQUESTS, limited, "rate_limited"),
        Reason::ConcurrencyLimited => (S::TOO_MANY_REQUESTS, limited, "concurrency_limited"),
        Reason::QueueTimeout => (S::TOO_MANY_REQUESTS, limited, "queue_timeout"),
        Reason::BudgetExhausted => (S::TOO_MANY_REQUESTS, limited, "budget_exhausted"),
        Reason::DeadlineExceeded => (S::GATEWAY_TIMEOUT, "timeout_error", "deadline_exceeded"),
        Reason::UpstreamUnavailable => (S::SERVICE_UNAVAILABLE, server, "upstream_unavailable"),
        Reason::CircuitOpen => (S::SERVICE_UNAVAILABLE, server, "circuit_open"),
        Reason::UpstreamFailedMidstream => (S::SERVICE_UNAVAILABLE, server, "upstream_failed_midstream"),
        Reason::ShuttingDown => (S::SERVICE_UNAVAILABLE, server, "shutting_down"),
        Reason::LimiterUnavailable => (S::SERVICE_UNAVAILABLE, server, "limiter_unavailable"),
    }
}

/// What the caller reads; the core's auth words name gRPC metadata.
fn message(error: &CallError) -> String {
    match error {
        CallError::Unauthenticated(m) if *m == MISSING_KEY => {
            "missing `Authorization: Bearer <key>` header".into()
        }
        CallError::Unauthenticated(m) if *m == INVALID_KEY => "invalid API key".into(),
        other => other.message(),
    }
}

fn json(error: &CallError) -> (StatusCode, Vec<u8>) {
    let (status, kind, code) = classify(error);
    let text = message(error);
    let body = ErrorBody { error: ErrorInfo { message: &text, kind, code, param: error.field() } };
    (status, serde_json::to_vec(&body).unwrap_or_default())
}

/// `Retry-After` (whole seconds, rounded up) and `retry-after-ms`, which
/// the OpenAI SDKs read first.
fn retry_headers(after: Duration, headers: &mut HeaderMap) {
    let secs = after.as_millis().div_ceil(1000).max(1);
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        headers.insert(header::RETRY_AFTER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&after.as_millis().to_string()) {
        headers.insert("retry-after-ms", v);
    }
}

pub(super) fn outcome(status: StatusCode) -> Outcome {
    let code = match status.as_u16() {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        413 => "413",
        429 => "429",
        503 => "503",
        504 => "504",
        _ => "500",
    };
    Outcome { code, number: i64::from(status.as_u16()) }
}

/// The answer to a call that failed before its stream began, recorded on
/// the call, with the call's headers.
pub fn error_response(call: &mut Call, error: CallError) -> Response {
    let (status, body) = json(&error);
    call.failed(&error, outcome(status));
    let mut headers = call_headers(call);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(after) = error.retry_after() {
        retry_headers(after, &mut headers);
    }
    (status, headers, body).into_response()
}

/// The event that ends a stream which failed after it began (the 200 and
/// some chunks are already sent), recorded on the call as the status it
/// would have had.
pub fn error_event(call: &mut Call, error: CallError, writer: &mut ChunkWriter) -> Bytes {
    let (status, kind, code) = classify(&error);
    call.failed(&error, outcome(status));
    let text = message(&error);
    writer.error(&ErrorBody { error: ErrorInfo { message: &text, kind, code, param: error.field() } })
}

/// An error that is no call's: an unknown path or method.
pub fn plain(status: StatusCode, message: &str, code: &'static str) -> Response {
    let body = ErrorBody { error: ErrorInfo { message, kind: "invalid_request_error", code, param: None } };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}
