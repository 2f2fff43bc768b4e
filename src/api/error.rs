//! Every way a call can fail, and the one place where each becomes a gRPC
//! status (CONTRACT.md section 2).

use std::time::Duration;

use thiserror::Error;
use tonic::{Code, Status};

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

impl CallError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        CallError::InvalidArgument { field: field.into(), message: message.into() }
    }

    pub fn code(&self) -> Code {
        match self {
            CallError::InvalidArgument { .. } => Code::InvalidArgument,
            CallError::ModelNotFound(_) => Code::NotFound,
            CallError::Unauthenticated(_) => Code::Unauthenticated,
            CallError::PermissionDenied { .. } => Code::PermissionDenied,
            CallError::DeadlineExceeded => Code::DeadlineExceeded,
            CallError::ShuttingDown => Code::Unavailable,
            CallError::Route(RouteError::UnknownModel(_)) => Code::NotFound,
            CallError::Route(RouteError::Exhausted { last, .. }) if last.is_invalid_request() => {
                Code::InvalidArgument
            }
            CallError::Route(RouteError::Exhausted { .. }) | CallError::MidStream(_) => Code::Unavailable,
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

    fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Route(RouteError::Exhausted { last, .. }) => last.retry_after(),
            _ => None,
        }
    }

    fn message(&self) -> String {
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

    /// The status sent to the caller, with `retry-after-ms` when known.
    pub fn to_status(&self) -> Status {
        let mut status = Status::new(self.code(), self.message());
        if let Some(after) = self.retry_after()
            && let Ok(v) = after.as_millis().to_string().parse()
        {
            status.metadata_mut().insert("retry-after-ms", v);
        }
        status
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
        let status = e.to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("sk-"), "{}", status.message());
    }
}
