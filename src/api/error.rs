//! The one place where a call's error becomes a gRPC status (CONTRACT.md
//! section 2), and how the gRPC front door names its statuses in the call's
//! record.

use tonic::{Code, Status, metadata::MetadataMap};

use super::metadata;
use crate::core::{Call, CallError, Door, Outcome, Reason};

/// The gRPC front door, for the call core's record: the status code's name
/// as the `code` label, its number as `rpc.grpc.status_code`.
pub static GRPC: Door = Door {
    name: "grpc",
    status_field: "rpc.grpc.status_code",
    ok: outcome(Code::Ok),
    cancelled: outcome(Code::Cancelled),
};

pub fn code(error: &CallError) -> Code {
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

/// The status sent to the caller, with `retry-after-ms` when known.
pub fn to_status(error: &CallError) -> Status {
    let mut status = Status::new(code(error), error.message());
    if let Some(after) = error.retry_after()
        && let Ok(v) = after.as_millis().to_string().parse()
    {
        status.metadata_mut().insert("retry-after-ms", v);
    }
    status
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
    use super::*;
    use crate::{providers::ProviderError, routing::RouteError};

    #[test]
    fn a_refused_key_is_not_echoed_to_callers() {
        let e = CallError::Route(RouteError::Exhausted {
            attempts: 1,
            provider: "oa".into(),
            model: "m".into(),
            last: ProviderError::Status {
                status: 401,
                message: "Incorrect API key provided: sk-...abcd".into(),
                retry_after: None,
            },
        });
        let status = to_status(&e);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("sk-"), "{}", status.message());
    }
}
