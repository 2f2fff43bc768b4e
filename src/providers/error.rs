//! What can go wrong talking to an upstream, typed so that routing can decide
//! whether to try again and `api/` can map it to a status.

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProviderError {
    /// The provider could not be set up (bad base_url, missing key variable).
    #[error("provider setup: {0}")]
    Setup(String),
    /// No connection could be made, or the request could not be sent.
    #[error("upstream connection failed: {0}")]
    Connect(String),
    /// The upstream answered with a non-success HTTP status.
    #[error("upstream returned HTTP {status}: {message}")]
    Status { status: u16, message: String, retry_after: Option<Duration> },
    /// The upstream's body broke off (reset, timeout between reads).
    #[error("upstream stream broke: {0}")]
    Stream(String),
    /// The upstream sent something that is not its wire format.
    #[error("upstream sent malformed data: {0}")]
    Protocol(String),
    /// The upstream reported an error inside its stream.
    #[error("upstream error ({kind}): {message}")]
    Upstream { kind: String, message: String },
    /// A request field this wire format cannot carry, refused before any
    /// upstream call.
    #[error("{field}: {message}")]
    Unsupported { field: String, message: String },
}

/// The kind of an [`ProviderError::Upstream`] that rejects the request itself.
const INVALID_REQUEST: &str = "invalid_request_error";

impl ProviderError {
    /// A request field this wire format cannot carry, refused before any
    /// upstream call rather than dropped: a caller's error, named by `field`.
    pub fn refused(field: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        ProviderError::Unsupported { field: field.to_string(), message: message.to_string() }
    }

    /// The upstream said, inside its answer, that the request is invalid.
    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        ProviderError::Upstream { kind: INVALID_REQUEST.into(), message: message.into() }
    }

    /// The error with every occurrence of `secret` (the provider's own key,
    /// which some upstreams quote back in their refusals) replaced.
    pub(crate) fn redact(self, secret: &str) -> Self {
        if secret.is_empty() {
            return self;
        }
        let r = |s: String| if s.contains(secret) { s.replace(secret, "[REDACTED]") } else { s };
        match self {
            ProviderError::Setup(m) => ProviderError::Setup(r(m)),
            ProviderError::Connect(m) => ProviderError::Connect(r(m)),
            ProviderError::Status { status, message, retry_after } => {
                ProviderError::Status { status, message: r(message), retry_after }
            }
            ProviderError::Stream(m) => ProviderError::Stream(r(m)),
            ProviderError::Protocol(m) => ProviderError::Protocol(r(m)),
            ProviderError::Upstream { kind, message } => {
                ProviderError::Upstream { kind: r(kind), message: r(message) }
            }
            ProviderError::Unsupported { field, message } => {
                ProviderError::Unsupported { field, message: r(message) }
            }
        }
    }

    /// Whether another attempt (same or next target) may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            ProviderError::Setup(_) | ProviderError::Unsupported { .. } => false,
            // The request itself is at fault: another target would refuse it too.
            ProviderError::Upstream { kind, .. } if kind == INVALID_REQUEST => false,
            ProviderError::Status { status, .. } => {
                matches!(status, 401 | 403 | 408 | 409 | 429) || *status >= 500
            }
            ProviderError::Connect(_)
            | ProviderError::Stream(_)
            | ProviderError::Protocol(_)
            | ProviderError::Upstream { .. } => true,
        }
    }

    /// The upstream rejected the request itself: a caller's error.
    pub fn is_invalid_request(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => {
                (400..500).contains(status) && !matches!(status, 401 | 403 | 408 | 429)
            }
            ProviderError::Upstream { kind, .. } => kind == INVALID_REQUEST,
            ProviderError::Unsupported { .. } => true,
            _ => false,
        }
    }

    /// A low-cardinality label for metrics and `error.type`.
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::Setup(_) => "setup",
            ProviderError::Connect(_) => "connect",
            ProviderError::Status { status, .. } => match status {
                429 => "rate_limited",
                401 | 403 => "unauthorized",
                408 => "timeout",
                400..=499 => "invalid_request",
                _ => "server_error",
            },
            ProviderError::Stream(_) => "stream_broken",
            ProviderError::Protocol(_) => "malformed",
            ProviderError::Upstream { kind, .. } if kind == INVALID_REQUEST => "invalid_request",
            ProviderError::Unsupported { .. } => "unsupported_field",
            ProviderError::Upstream { .. } => "upstream_error",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
