//! Upstream LLM APIs, one file per wire format behind the [`Provider`] trait.
//! Providers speak HTTP/SSE and the types of `crate::chat`; they know nothing
//! of gRPC, of `api/` or of `routing/`.

pub mod anthropic;
mod conn;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gemini;
mod http;
pub mod mock;
pub mod openai;
mod sse;
#[doc(hidden)]
pub mod transcript;

use std::{pin::Pin, sync::Arc};

use futures_util::{Stream, future::BoxFuture};

pub use error::ProviderError;

use crate::{
    chat::{ChatRequest, Delta},
    config::{ProviderConfig, ProviderKind},
};

/// The deltas of one upstream answer. Dropping it aborts the upstream request.
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<Delta, ProviderError>> + Send>>;

/// One attempt at one upstream.
pub struct UpstreamCall {
    pub request: Arc<ChatRequest>,
    /// The model id to send upstream.
    pub model: String,
    /// Extra headers for the upstream request (trace context).
    pub headers: ::http::HeaderMap,
}

/// An upstream LLM API.
pub trait Provider: Send + Sync + 'static {
    /// The wire format's name, for telemetry (`gen_ai.provider.name`).
    fn system(&self) -> &'static str;

    /// Host and port of the upstream, for telemetry (`server.address`).
    fn server(&self) -> Option<(String, u16)> {
        None
    }

    /// Whether this request's answer arrives whole rather than streamed
    /// (a unary endpoint): routing then bounds it by the deadline and the
    /// read timeout only, not by `first_token`, and does not hedge it.
    fn answers_whole(&self, _request: &ChatRequest) -> bool {
        false
    }

    /// Sends the request. Resolves once the upstream has accepted it (2xx
    /// headers), with the stream of its deltas; an error before that is typed.
    fn stream(&self, call: UpstreamCall) -> BoxFuture<'static, Result<DeltaStream, ProviderError>>;
}

/// Builds the provider a config entry describes.
pub fn build(name: &str, config: &ProviderConfig) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match config.kind {
        ProviderKind::Openai => Arc::new(openai::OpenAi::new(name, config)?),
        ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(name, config)?),
        ProviderKind::Gemini => Arc::new(gemini::Gemini::new(name, config)?),
        ProviderKind::Mock => Arc::new(mock::Mock::new(config)),
    })
}
