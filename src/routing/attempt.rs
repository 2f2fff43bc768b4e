//! One upstream attempt: its client span (GenAI conventions), its metrics,
//! and the stream that counts what it forwards. Whatever way the attempt
//! ends (finished, failed, dropped by a caller who left) is recorded once,
//! with the tokens streamed so far.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use futures_util::Stream;
use tracing::{Span, field::Empty};

use super::Target;
use crate::{
    chat::{ChatRequest, Delta, Finish},
    providers::{DeltaStream, ProviderError},
    telemetry::{self, metrics::Metrics},
};

pub struct Attempt {
    span: Span,
    metrics: Arc<Metrics>,
    provider: Arc<str>,
    started: Instant,
    first_token: Option<Duration>,
    deltas: u32,
    ended: bool,
}

impl Attempt {
    pub(super) fn start(target: &Target, request: &ChatRequest, metrics: Arc<Metrics>) -> Self {
        let system = target.provider.system();
        let (address, port) = target.provider.server().unzip();
        let span = tracing::info_span!(
            "chat",
            otel.name = format!("chat {}", target.model),
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = system,
            gen_ai.request.model = &*target.model,
            gen_ai.request.max_tokens = request.max_tokens.map(i64::from),
            gen_ai.request.temperature = request.temperature.map(f64::from),
            gen_ai.request.top_p = request.top_p.map(f64::from),
            gen_ai.response.model = Empty,
            gen_ai.response.id = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            server.address = address,
            server.port = port.map(i64::from),
            llm_gateway.provider = &*target.provider_name,
            llm_gateway.streamed_deltas = Empty,
            error.type = Empty,
        );
        Self {
            span,
            metrics,
            provider: target.provider_name.clone(),
            started: Instant::now(),
            first_token: None,
            deltas: 0,
            ended: false,
        }
    }

    pub fn span(&self) -> &Span {
        &self.span
    }

    pub(super) fn first_token(&mut self, ttft: Duration, first: &Delta) {
        self.first_token = Some(ttft);
        if let Some(model) = &first.model {
            self.span.record("gen_ai.response.model", model.as_str());
        }
        if let Some(id) = &first.id {
            self.span.record("gen_ai.response.id", id.as_str());
        }
        tracing::info!(
            target: crate::telemetry::SPAN_EVENT,
            parent: &self.span,
            ttft_ms = ttft.as_secs_f64() * 1e3,
            "gen_ai.first_token"
        );
    }

    /// Time to first token, once known.
    pub fn ttft(&self) -> Option<Duration> {
        self.first_token
    }

    pub fn deltas(&self) -> u32 {
        self.deltas
    }

    pub(super) fn fail(mut self, error: &ProviderError) {
        // For the operator: callers get a status, and not every detail.
        tracing::warn!(provider = &*self.provider, error = %error, "upstream attempt failed");
        self.end("error", Some(error.label()));
    }

    fn finish(&mut self, finish: &Finish) {
        let reason = finish.reason.map(|r| r.as_str()).unwrap_or("unknown");
        telemetry::set_attribute(
            &self.span,
            "gen_ai.response.finish_reasons".into(),
            opentelemetry::Value::Array(vec![opentelemetry::StringValue::from(reason)].into()),
        );
        self.span.record("gen_ai.usage.input_tokens", i64::from(finish.usage.input_tokens));
        self.span.record("gen_ai.usage.output_tokens", i64::from(finish.usage.output_tokens));
        self.end("ok", None);
    }

    fn end(&mut self, outcome: &'static str, error: Option<&'static str>) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.span.record("llm_gateway.streamed_deltas", i64::from(self.deltas));
        if let Some(kind) = error {
            self.span.record("error.type", kind);
            self.span.record("otel.status_code", "ERROR");
        }
        self.metrics.upstream_attempt(&self.provider, outcome);
        let _ = self.started;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        // Dropped before its end: the caller went away or the deadline passed.
        self.end("cancelled", Some("cancelled"));
    }
}

/// The deltas of the committed attempt, the first one replayed.
pub struct RoutedStream {
    first: Option<Delta>,
    rest: DeltaStream,
    attempt: Attempt,
}

impl RoutedStream {
    pub(super) fn new(first: Delta, rest: DeltaStream, mut attempt: Attempt) -> Self {
        attempt.deltas = 1;
        let mut s = Self { first: None, rest, attempt };
        if let Some(finish) = &first.finish {
            s.attempt.finish(finish);
        }
        s.first = Some(first);
        s
    }

    pub fn attempt(&self) -> &Attempt {
        &self.attempt
    }
}

impl Stream for RoutedStream {
    type Item = Result<Delta, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if this.attempt.ended {
            // After the final delta: a non-blocking read of what is left.
            let _ = this.rest.as_mut().poll_next(cx);
            return Poll::Ready(None);
        }
        let item = ready!(this.rest.as_mut().poll_next(cx));
        match &item {
            Some(Ok(delta)) => {
                this.attempt.deltas += 1;
                if let Some(finish) = &delta.finish {
                    this.attempt.finish(finish);
                }
            }
            Some(Err(e)) => this.attempt.end("error", Some(e.label())),
            None => {
                // A provider stream that stops without its final delta has
                // lost the end of the answer: never a silent success.
                this.attempt.end("error", Some("stream_broken"));
                return Poll::Ready(Some(Err(ProviderError::Stream(
                    "upstream stream ended before the answer finished".into(),
                ))));
            }
        }
        Poll::Ready(item)
    }
}
