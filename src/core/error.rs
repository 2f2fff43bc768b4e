//! Every way a call can fail, in no protocol's terms: each error's
//! [`Reason`] (the contract's `google.rpc.ErrorInfo` reason, CONTRACT.md
//! section 9), the field at fault, a retry delay, a low-cardinality label and
//! the message a caller may see. Each front door maps these to its own
//! statuses in one place (`api/error.rs`, `http/error.rs`).

use std::time::Duration;

use thiserror::Error;

use crate::{providers::ProviderError, routing::RouteError};

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
    MidStream(ProviderError),
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
            CallError::InvalidArgument { .. } => Reason::InvalidRequest,
            CallError::ModelNotFound(_) | CallError::Route(RouteError::UnknownModel(_)) => {
                Reason::ModelNotFound
            }
            CallError::Unauthenticated(_) => Reason::Unauthenticated,
            CallError::PermissionDenied { .. } => Reason::ModelNotAllowed,
            CallError::DeadlineExceeded => Reason::DeadlineExceeded,
            CallError::ShuttingDown => Reason::ShuttingDown,
            CallError::Route(RouteError::Exhausted { last, .. }) if last.is_invalid_request() => {
                Reason::UpstreamRejected
            }
            CallError::Route(RouteError::Exhausted { .. }) => Reason::UpstreamUnavailable,
            CallError::MidStream(_) => Reason::UpstreamFailedMidstream,
        }
    }

    /// The request field at fault, for invalid input.
    pub fn field(&self) -> Option<&str> {
        match self {
            CallError::InvalidArgument { field, .. } => Some(field),
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
            CallError::Route(RouteError::Exhausted { last, .. }) => last.label(),
            CallError::MidStream(e) => e.label(),
        }
    }

    /// How long the caller should wait before trying again, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Route(RouteError::Exhausted { last, .. }) => last.retry_after(),
            _ => None,
        }
    }

    /// What the caller is told: the provider's own words for a request it
    /// rejected, never what could quote the gateway's credentials.
    pub fn message(&self) -> String {
        match self {
            CallError::Route(RouteError::Exhausted { provider, last, .. }) if last.is_invalid_request() => {
                let message = match last {
                    ProviderError::Status { message, .. } | ProviderError::Upstream { message, .. } => {
                        message.as_str()
                    }
                    _ => "",
                };
                format!("provider {provider:?} rejected the request: {message}")
            }
            CallError::Route(RouteError::Exhausted {
                attempts,
                provider,
                last: ProviderError::Status { status: status @ (401 | 403), .. },
                ..
            }) => {
                // The provider's own message can quote the gateway's key.
                format!(
                    "{attempts} target(s) tried, all failed; last, provider {provider:?} refused the gateway's credentials (HTTP {status}); see the gateway's log"
                )
            }
            CallError::Route(RouteError::Exhausted { attempts, provider, last, .. }) => {
                format!("{attempts} target(s) tried, all failed; last, provider {provider:?}: {last}")
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(e.reason(), Reason::UpstreamUnavailable);
        assert!(!e.message().contains("sk-"), "{}", e.message());
    }
}
