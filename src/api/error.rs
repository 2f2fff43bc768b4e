//! The one place where a call's error becomes a gRPC status (CONTRACT.md
//! section 2), and how the gRPC front door names its statuses in the call's
//! record.

use std::collections::HashMap;

use tonic::{Code, Status, metadata::MetadataMap};
use tonic_types::{ErrorDetails, StatusExt};

use super::metadata;
use crate::core::{Call, CallError, Door, Outcome, Reason};

/// The gRPC front door, for the call core's record: the status code's name
/// as the `code` label, its number as `rpc.grpc.status_code`.
pub static GRPC: Door = Door {
    name: "grpc",
    status_field: "rpc.grpc.status_code",
    ok: outcome(Code::Ok),
    cancelled: outcome(Code::Cancelled),
    deadline: outcome(Code::DeadlineExceeded),
};

pub fn code(error: &CallError) -> Code {
    // CONTRACT.md section 10: a request over `server.max_request_bytes`.
    if let CallError::RequestTooLarge { .. } = error {
        return Code::ResourceExhausted;
    }
    match error.reason() {
        Reason::InvalidRequest | Reason::UpstreamRejected => Code::InvalidArgument,
        Reason::ModelNotFound => Code::NotFound,
        Reason::Unauthenticated => Code::Unauthenticated,
        Reason::ModelNotAllowed => Code::PermissionDenied,
        Reason::RateLimited | Reason::ConcurrencyLimited | Reason::QueueTimeout | Reason::BudgetExhausted => {
            Code::ResourceExhausted
        }
        Reason::DeadlineExceeded => Code::DeadlineExceeded,
        Reason::UpstreamUnavailable
        | Reason::CircuitOpen
        | Reason::UpstreamFailedMidstream
        | Reason::ShuttingDown
        | Reason::LimiterUnavailable => Code::Unavailable,
    }
}

/// `google.rpc.ErrorInfo.domain` of every error the gateway returns.
pub const ERROR_DOMAIN: &str = "llmgateway.v1";

/// The status sent to the caller: code, message, `retry-after-ms` when
/// known, and `grpc-status-details-bin` (CONTRACT.md section 9): ErrorInfo
/// always, RetryInfo with a known delay, BadRequest naming the field,
/// QuotaFailure naming the limit.
pub fn to_status(error: &CallError) -> Status {
    let retry_after = error.retry_after();
    let mut details = ErrorDetails::new();
    let mut info = HashMap::new();
    if let Some((provider, model)) = error.target() {
        info.insert("provider".to_owned(), provider.to_owned());
        info.insert("model".to_owned(), model.to_owned());
    }
    details.set_error_info(error.reason().as_str(), ERROR_DOMAIN, info);
    let field = match error {
        CallError::RequestTooLarge { .. } => Some("request"),
        _ => error.field(),
    };
    if let Some(field) = field {
        details.add_bad_request_violation(field, error.message());
    }
    if let Some((subject, description)) = error.quota() {
        details.add_quota_failure_violation(subject, description);
    }
    let mut metadata = MetadataMap::new();
    if let Some(after) = retry_after {
        details.set_retry_info(Some(after));
        if let Ok(v) = after.as_millis().to_string().parse() {
            metadata.insert("retry-after-ms", v);
        }
    }
    Status::with_error_details_and_metadata(code(error), error.message(), details, metadata)
}

/// A request message over `server.max_request_bytes`, refused before it
/// was read whole: RESOURCE_EXHAUSTED naming the limit, with ErrorInfo
/// `INVALID_REQUEST` and BadRequest field `request`.
pub fn request_too_large(limit: usize) -> Status {
    to_status(&CallError::RequestTooLarge { limit })
}

/// The status for `error`, recorded on the call, with the call's headers.
pub fn call_status(call: &mut Call, error: CallError) -> Status {
    let mut status = to_status(&error);
    call.failed(&error, outcome(status.code()));
    metadata::headers(call, status.metadata_mut());
    status
}

/// The response headers of a call that goes ahead.
pub fn response_headers(call: &Call) -> MetadataMap {
    let mut md = MetadataMap::new();
    metadata::headers(call, &mut md);
    md
}

const fn outcome(code: Code) -> Outcome {
    Outcome { code: code_name(code), number: code as i64 }
}

pub const fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        providers::ProviderError,
        routing::{Failure, RouteError},
    };

    #[test]
    fn a_refused_key_is_not_echoed_to_callers() {
        let e = CallError::Route(RouteError::Failed {
            attempts: 1,
            provider: "oa".into(),
            model: "m".into(),
            failure: Failure::from(&ProviderError::Status {
                status: 401,
                message: "Incorrect API key provided: sk-...abcd".into(),
                retry_after: None,
            }),
        });
        let status = to_status(&e);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("sk-"), "{}", status.message());
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn invalid_arguments_name_the_field() {
        let status = to_status(&CallError::invalid("temperature", "must be between 0 and 2"));
        let details = status.get_error_details();
        assert_eq!(details.error_info().expect("ErrorInfo").reason, "INVALID_REQUEST");
        assert_eq!(details.bad_request().expect("BadRequest").field_violations[0].field, "temperature");
    }

    #[test]
    fn circuit_open_carries_retry_info_and_trailer() {
        let status = to_status(&CallError::Route(RouteError::CircuitOpen {
            retry_after: Some(Duration::from_millis(1500)),
        }));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get("retry-after-ms").map(|v| v.to_str().ok()), Some(Some("1500")));
        let details = status.get_error_details();
        assert_eq!(details.error_info().expect("ErrorInfo").reason, "CIRCUIT_OPEN");
        assert!(details.retry_info().is_some_and(|r| r.retry_delay.is_some()));
    }
}
