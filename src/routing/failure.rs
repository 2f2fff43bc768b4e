//! What routing reports when a call cannot be opened or breaks: its own
//! types, so that front doors never match on a provider's error. Messages
//! here are safe to show a caller; the provider's full text (which can name
//! the operator's account) goes only to the operator's log.

use std::{sync::Arc, time::Duration};

use thiserror::Error;

use crate::{admission::Refusal, providers::ProviderError};

/// What kind of failure an attempt met, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The upstream rejected the request itself (4xx other than 401, 403,
    /// 408, 429): never retried, the caller's to fix.
    Rejected,
    /// The upstream refused the gateway's credentials (401, 403).
    Unauthorized,
    /// The upstream's own rate limit (429).
    RateLimited,
    /// 5xx, 408 and the like.
    ServerError,
    /// No connection could be made.
    Connect,
    /// No first delta within `timeouts.first_token`.
    FirstTokenTimeout,
    /// The body broke off, or ended before the answer did.
    Broken,
    /// Not the provider's wire format.
    Malformed,
    /// The upstream reported an error inside its stream.
    UpstreamError,
    /// The provider is not usable (its setup failed).
    Setup,
    /// The target's wire format cannot carry a field of the request (named
    /// in [`Failure::field`]); nothing was sent. Another target may.
    Unsupported,
}

impl FailureKind {
    /// Worth another attempt on the same target (after a backoff); these
    /// are also what a circuit breaker counts.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            FailureKind::ServerError
                | FailureKind::Connect
                | FailureKind::FirstTokenTimeout
                | FailureKind::Broken
                | FailureKind::Malformed
                | FailureKind::UpstreamError
        )
    }

    /// Worth trying the next target.
    pub fn falls_back(self) -> bool {
        self != FailureKind::Rejected
    }

    /// A low-cardinality label for metrics, span events and `error.type`.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Rejected => "invalid_request",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::ServerError => "server_error",
            FailureKind::Connect => "connect",
            FailureKind::FirstTokenTimeout => "first_token_timeout",
            FailureKind::Broken => "stream_broken",
            FailureKind::Malformed => "malformed",
            FailureKind::UpstreamError => "upstream_error",
            FailureKind::Setup => "setup",
            FailureKind::Unsupported => "unsupported_field",
        }
    }
}

/// One attempt's failure, with a message a caller may see.
#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: FailureKind,
    /// The upstream's HTTP status, when it answered with one.
    pub status: Option<u16>,
    pub message: String,
    /// How long the upstream asked us to wait, when it said.
    pub retry_after: Option<Duration>,
    /// The request field at fault, when the gateway knows it.
    pub field: Option<String>,
}

impl Failure {
    pub fn first_token_timeout(after: Duration) -> Self {
        Failure {
            kind: FailureKind::FirstTokenTimeout,
            status: None,
            message: format!("no first token within {after:?}"),
            retry_after: None,
            field: None,
        }
    }
}

impl From<&ProviderError> for Failure {
    fn from(e: &ProviderError) -> Self {
        if let ProviderError::Unsupported { field, message } = e {
            return Failure {
                kind: FailureKind::Unsupported,
                status: None,
                message: format!("{field}: {message}"),
                retry_after: None,
                field: Some(field.clone()),
            };
        }
        let (kind, status, message) = match e {
            ProviderError::Setup(_) => (FailureKind::Setup, None, "the provider is not set up".to_owned()),
            ProviderError::Connect(_) => {
                (FailureKind::Connect, None, "could not connect to the upstream".to_owned())
            }
            ProviderError::Status { status, message, .. } => {
                let status = *status;
                let kind = match status {
                    429 => FailureKind::RateLimited,
                    401 | 403 => FailureKind::Unauthorized,
                    408 | 409 => FailureKind::ServerError,
                    400..=499 => FailureKind::Rejected,
                    _ => FailureKind::ServerError,
                };
                let message = match kind {
                    // The caller's request was at fault: the provider's words help.
                    FailureKind::Rejected => message.clone(),
                    FailureKind::Unauthorized => {
                        format!(
                            "the upstream refused the gateway's credentials (HTTP {status}); see the gateway's log"
                        )
                    }
                    FailureKind::RateLimited => {
                        "the upstream is rate-limiting the gateway (HTTP 429)".to_owned()
                    }
                    _ => format!("the upstream answered HTTP {status}"),
                };
                (kind, Some(status), message)
            }
            ProviderError::Stream(m) => {
                (FailureKind::Broken, None, format!("the upstream stream broke: {m}"))
            }
            ProviderError::Protocol(_) => {
                (FailureKind::Malformed, None, "the upstream sent malformed data".to_owned())
            }
            ProviderError::Upstream { kind, message } if kind == "invalid_request_error" => {
                (FailureKind::Rejected, None, message.clone())
            }
            ProviderError::Upstream { kind, .. } => {
                (FailureKind::UpstreamError, None, format!("the upstream reported an error ({kind})"))
            }
            ProviderError::Unsupported { field, message } => {
                (FailureKind::Unsupported, None, format!("{field}: {message}"))
            }
        };
        Failure { kind, status, message, retry_after: e.retry_after(), field: None }
    }
}

/// Why a call could not be opened.
#[derive(Debug, Error)]
pub enum RouteError {
    #[error("model {0:?} is not configured")]
    UnknownModel(String),
    /// Every target tried failed (or the first failure was final); the last
    /// failure decides the status.
    #[error("{attempts} attempt(s) failed; last, provider {provider:?}: {failure}")]
    Failed { attempts: u32, provider: Arc<str>, model: Arc<str>, failure: Failure },
    /// Every target's circuit is open: no upstream was touched.
    #[error("every target's circuit is open")]
    CircuitOpen { retry_after: Option<Duration> },
    /// Every target is cooling down after its rate limit, or open.
    #[error("every target is rate-limited or unavailable for now")]
    CoolingDown { retry_after: Option<Duration> },
    /// Admission refused the call (the caller's key, or every target).
    #[error(transparent)]
    Refused(Refusal),
}

impl RouteError {
    /// How long until a retry could succeed, where known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RouteError::Failed { failure, .. } => failure.retry_after,
            RouteError::CircuitOpen { retry_after } | RouteError::CoolingDown { retry_after } => *retry_after,
            RouteError::Refused(r) => r.retry_after,
            RouteError::UnknownModel(_) => None,
        }
    }
}
