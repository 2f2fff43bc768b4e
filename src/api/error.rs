//! Every way a call can fail, and the one place where each becomes a gRPC
//! status (CONTRACT.md sections 2 and 9): the code, a safe message, the
//! `retry-after-ms` trailer and `grpc-status-details-bin`.

use std::{collections::HashMap, time::Duration};

use thiserror::Error;
use tonic::{Code, Status, metadata::MetadataMap};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    admission::{Refusal, RefusalReason},
    routing::{Failure, FailureKind, RouteError},
};

/// `google.rpc.ErrorInfo.domain` of every error the gateway returns.
pub const ERROR_DOMAIN: &str = "llmgateway.v1";

#[derive(Debug, Error)]
pub enum CallError {
    /// Bad input; `field` is the request field at fault.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("model {0:?} is not configured")]
    ModelNotFound(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("key {key:?} may not use model {model:?}")]
    PermissionDenied { key: String, model: String },
    #[error("the call's deadline passed")]
    DeadlineExceeded,
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The upstream failed after deltas were sent: the stream cannot be retried.
    #[error("upstream failed mid-stream: {0}")]
    MidStream(Failure),
}

impl CallError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        CallError::InvalidArgument { field: field.into(), message: message.into() }
    }

    pub fn code(&self) -> Code {
        match self {
            CallError::InvalidArgument { .. } => Code::InvalidArgument,
            CallError::ModelNotFound(_) | CallError::Route(RouteError::UnknownModel(_)) => Code::NotFound,
            CallError::Unauthenticated(_) => Code::Unauthenticated,
            CallError::PermissionDenied { .. } => Code::PermissionDenied,
            CallError::DeadlineExceeded => Code::DeadlineExceeded,
            CallError::ShuttingDown => Code::Unavailable,
            CallError::Route(RouteError::Failed { failure, .. }) if failure.kind == FailureKind::Rejected => {
                Code::InvalidArgument
            }
            CallError::Route(RouteError::Refused(r)) if r.reason == RefusalReason::LimiterUnavailable => {
                Code::Unavailable
            }
            CallError::Route(RouteError::Refused(_)) => Code::ResourceExhausted,
            CallError::Route(
                RouteError::Failed { .. } | RouteError::CircuitOpen { .. } | RouteError::CoolingDown { .. },
            )
            | CallError::MidStream(_) => Code::Unavailable,
        }
    }

    /// The `google.rpc.ErrorInfo.reason` (CONTRACT.md section 9).
    pub fn reason(&self) -> &'static str {
        match self {
            CallError::InvalidArgument { .. } => "INVALID_REQUEST",
            CallError::ModelNotFound(_) | CallError::Route(RouteError::UnknownModel(_)) => "MODEL_NOT_FOUND",
            CallError::Unauthenticated(_) => "UNAUTHENTICATED",
            CallError::PermissionDenied { .. } => "MODEL_NOT_ALLOWED",
            CallError::DeadlineExceeded => "DEADLINE_EXCEEDED",
            CallError::ShuttingDown => "SHUTTING_DOWN",
            CallError::Route(RouteError::Failed { failure, .. }) if failure.kind == FailureKind::Rejected => {
                "UPSTREAM_REJECTED"
            }
            CallError::Route(RouteError::Failed { .. } | RouteError::CoolingDown { .. }) => {
                "UPSTREAM_UNAVAILABLE"
            }
            CallError::Route(RouteError::CircuitOpen { .. }) => "CIRCUIT_OPEN",
            CallError::Route(RouteError::Refused(r)) => r.reason.as_str(),
            CallError::MidStream(_) => "UPSTREAM_FAILED_MIDSTREAM",
        }
    }

    /// A low-cardinality label for metrics and `error.type`.
    pub fn label(&self) -> &'static str {
        match self {
            CallError::InvalidArgument { .. } => "invalid_argument",
            CallError::ModelNotFound(_) | CallError::Route(RouteError::UnknownModel(_)) => "model_not_found",
            CallError::Unauthenticated(_) => "unauthenticated",
            CallError::PermissionDenied { .. } => "permission_denied",
            CallError::DeadlineExceeded => "deadline_exceeded",
            CallError::ShuttingDown => "shutting_down",
            CallError::Route(RouteError::Failed { failure, .. }) | CallError::MidStream(failure) => {
                failure.kind.label()
            }
            CallError::Route(RouteError::CircuitOpen { .. }) => "circuit_open",
            CallError::Route(RouteError::CoolingDown { .. }) => "cooling_down",
            CallError::Route(RouteError::Refused(r)) => match r.reason {
                RefusalReason::RateLimited => "rate_limited",
                RefusalReason::ConcurrencyLimited => "concurrency_limited",
                RefusalReason::QueueTimeout => "queue_timeout",
                RefusalReason::BudgetExhausted => "budget_exhausted",
                RefusalReason::LimiterUnavailable => "limiter_unavailable",
            },
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Route(e) => e.retry_after(),
            _ => None,
        }
    }

    fn message(&self) -> String {
        match self {
            CallError::Route(RouteError::Failed { provider, failure, .. })
                if failure.kind == FailureKind::Rejected =>
            {
                format!("provider {provider:?} rejected the request: {failure}")
            }
            CallError::Route(RouteError::Failed { attempts, provider, failure, .. }) => {
                format!("{attempts} attempt(s) failed; last, provider {provider:?}: {failure}")
            }
            other => other.to_string(),
        }
    }

    /// The status sent to the caller: code, message, `retry-after-ms` when
    /// known, and the machine-readable details.
    pub fn to_status(&self) -> Status {
        let retry_after = self.retry_after();
        let mut details = ErrorDetails::new();
        let mut info = HashMap::new();
        match self {
            CallError::InvalidArgument { field, message } => {
                details.add_bad_request_violation(field.clone(), message.clone());
            }
            CallError::Route(RouteError::Failed { provider, model, failure, .. }) => {
                info.insert("provider".to_owned(), provider.to_string());
                info.insert("model".to_owned(), model.to_string());
                if failure.kind == FailureKind::Rejected {
                    // The provider does not say which field; the request as a whole.
                    details.add_bad_request_violation("request", failure.message.clone());
                }
            }
            CallError::Route(RouteError::Refused(Refusal { subject, description, .. })) => {
                details.add_quota_failure_violation(subject.clone(), description.clone());
            }
            _ => {}
        }
        details.set_error_info(self.reason(), ERROR_DOMAIN, info);
        if let Some(after) = retry_after {
            details.set_retry_info(Some(after));
        }
        let mut metadata = MetadataMap::new();
        if let Some(after) = retry_after
            && let Ok(v) = after.as_millis().to_string().parse()
        {
            metadata.insert("retry-after-ms", v);
        }
        Status::with_error_details_and_metadata(self.code(), self.message(), details, metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_key_is_not_echoed_to_callers() {
        let e = CallError::Route(RouteError::Failed {
            attempts: 1,
            provider: "oa".into(),
            model: "m".into(),
            failure: Failure::from(&crate::providers::ProviderError::Status {
                status: 401,
                message: "Incorrect API key provided: sk-...abcd".into(),
                retry_after: None,
            }),
        });
        let status = e.to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("sk-"), "{}", status.message());
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn invalid_arguments_name_the_field() {
        let status = CallError::invalid("temperature", "must be between 0 and 2").to_status();
        let details = status.get_error_details();
        assert_eq!(details.error_info().unwrap().reason, "INVALID_REQUEST");
        assert_eq!(details.bad_request().unwrap().field_violations[0].field, "temperature");
    }

    #[test]
    fn circuit_open_carries_retry_info_and_trailer() {
        let status =
            CallError::Route(RouteError::CircuitOpen { retry_after: Some(Duration::from_millis(1500)) })
                .to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get("retry-after-ms").unwrap(), "1500");
        let details = status.get_error_details();
        assert_eq!(details.error_info().unwrap().reason, "CIRCUIT_OPEN");
        assert!(details.retry_info().unwrap().retry_delay.is_some());
    }
}
