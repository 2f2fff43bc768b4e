//! Every way a call can fail, in no protocol's terms: each error's
//! [`Reason`] (the contract's `google.rpc.ErrorInfo` reason, CONTRACT.md
//! section 9), the field at fault, a retry delay, a low-cardinality label and
//! the message a caller may see. Each front door maps these to its own
//! statuses in one place (`api/error.rs`, `http/error.rs`).

use std::time::Duration;

use thiserror::Error;

use crate::{
    admission::RefusalReason,
    routing::{Failure, FailureKind, RouteError},
};

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
    /// The request is larger than the front door takes (`server.max_request_bytes`).
    #[error("the request is larger than {limit} bytes (server.max_request_bytes)")]
    RequestTooLarge { limit: usize },
    /// The request did not arrive whole in time (`server.body_read_timeout`).
    #[error("the request did not arrive whole within {0:?} (server.body_read_timeout)")]
    RequestTimeout(Duration),
}

/// Why a call failed, as the contract names it (`google.rpc.ErrorInfo`
/// reasons, CONTRACT.md section 9). Front doors choose their status from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    ModelNotFound,
    InvalidRequest,
    Unauthenticated,
    ModelNotAllowed,
    RateLimited,
    ConcurrencyLimited,
    QueueTimeout,
    BudgetExhausted,
    UpstreamRejected,
    UpstreamUnavailable,
    CircuitOpen,
    UpstreamFailedMidstream,
    DeadlineExceeded,
    ShuttingDown,
    LimiterUnavailable,
}

impl Reason {
    /// The `ErrorInfo.reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ModelNotFound => "MODEL_NOT_FOUND",
            Reason::InvalidRequest => "INVALID_REQUEST",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::ModelNotAllowed => "MODEL_NOT_ALLOWED",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::ConcurrencyLimited => "CONCURRENCY_LIMITED",
            Reason::QueueTimeout => "QUEUE_TIMEOUT",
            Reason::BudgetExhausted => "BUDGET_EXHAUSTED",
            Reason::UpstreamRejected => "UPSTREAM_REJECTED",
            Reason::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            Reason::CircuitOpen => "CIRCUIT_OPEN",
            Reason::UpstreamFailedMidstream => "UPSTREAM_FAILED_MIDSTREAM",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::LimiterUnavailable => "LIMITER_UNAVAILABLE",
        }
    }
}

impl CallError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        CallError::InvalidArgument { field: field.into(), message: message.into() }
    }

    /// The contract's reason for this failure.
    pub fn reason(&self) -> Reason {
        match self {
            CallError::InvalidArgument { .. }
            | CallError::RequestTooLarge { .. }
            | CallError::RequestTimeout(_) => Reason::InvalidRequest,
            CallError::Route(RouteError::Failed { failure, .. })
                if failure.kind == FailureKind::Unsupported =>
            {
                Reason::InvalidRequest
            }
            CallError::ModelNotFound(_) | CallError::Route(RouteError::UnknownModel(_)) => {
                Reason::ModelNotFound
            }
            CallError::Unauthenticated(_) => Reason::Unauthenticated,
            CallError::PermissionDenied { .. } => Reason::ModelNotAllowed,
            CallError::DeadlineExceeded => Reason::DeadlineExceeded,
            CallError::ShuttingDown => Reason::ShuttingDown,
            CallError::Route(RouteError::Failed { failure, .. }) if failure.kind == FailureKind::Rejected => {
                Reason::UpstreamRejected
            }
            CallError::Route(RouteError::Failed { .. } | RouteError::CoolingDown { .. }) => {
                Reason::UpstreamUnavailable
            }
            CallError::Route(RouteError::CircuitOpen { .. }) => Reason::CircuitOpen,
            CallError::Route(RouteError::Refused(r)) => match r.reason {
                RefusalReason::RateLimited => Reason::RateLimited,
                RefusalReason::ConcurrencyLimited => Reason::ConcurrencyLimited,
                RefusalReason::QueueTimeout => Reason::QueueTimeout,
                RefusalReason::BudgetExhausted => Reason::BudgetExhausted,
                RefusalReason::LimiterUnavailable => Reason::LimiterUnavailable,
            },
            CallError::MidStream(_) => Reason::UpstreamFailedMidstream,
        }
    }

    /// The request field at fault, for invalid input; `request` for an
    /// upstream's rejection, whose field the provider does not say.
    pub fn field(&self) -> Option<&str> {
        match self {
            CallError::InvalidArgument { field, .. } => Some(field),
            CallError::Route(RouteError::Failed { failure, .. }) if failure.field.is_some() => {
                failure.field.as_deref()
            }
            CallError::Route(RouteError::Failed { failure, .. }) if failure.kind == FailureKind::Rejected => {
                Some("request")
            }
            _ => None,
        }
    }

    /// The limit that refused the call: (`key:NAME` or
    /// `target:PROVIDER/MODEL`, what the limit is).
    pub fn quota(&self) -> Option<(&str, &str)> {
        match self {
            CallError::Route(RouteError::Refused(r)) => Some((&r.subject, &r.description)),
            _ => None,
        }
    }

    /// The target that failed last, when one was tried.
    pub fn target(&self) -> Option<(&str, &str)> {
        match self {
            CallError::Route(RouteError::Failed { provider, model, .. }) => Some((provider, model)),
            _ => None,
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
            CallError::RequestTooLarge { .. } => "request_too_large",
            CallError::RequestTimeout(_) => "request_timeout",
        }
    }

    /// How long the caller should wait before trying again, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Route(e) => e.retry_after(),
            _ => None,
        }
    }

    /// What the caller is told: the provider's own words for a request it
    /// rejected, never an upstream body that could name the operator's
    /// account (routing's messages are safe by construction).
    pub fn message(&self) -> String {
        match self {
            CallError::Route(RouteError::Failed { provider, failure, .. })
                if failure.kind == FailureKind::Rejected =>
            {
                format!("provider {provider:?} rejected the request: {failure}")
            }
            CallError::Route(RouteError::Failed { provider, failure, .. })
                if failure.kind == FailureKind::Unsupported =>
            {
                format!("{failure} (provider {provider:?} cannot carry it)")
            }
            CallError::Route(RouteError::Failed { attempts, provider, failure, .. }) => {
                format!("{attempts} attempt(s) failed; last, provider {provider:?}: {failure}")
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderError;

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
        assert_eq!(e.reason(), Reason::UpstreamUnavailable);
        assert!(!e.message().contains("sk-"), "{}", e.message());
    }
}
