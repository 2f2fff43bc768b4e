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

use super::{
    Target,
    failure::{Failure, FailureKind},
    health::{Health, InFlight},
    transitioned,
};
use crate::{
    chat::{ChatRequest, Delta, Finish},
    providers::{DeltaStream, ProviderError},
    telemetry::{self, metrics::Metrics},
};

pub struct Attempt {
    span: Span,
    metrics: Arc<Metrics>,
    provider: Arc<str>,
    model: Arc<str>,
    health: Arc<Health>,
    /// The half-open circuit's probe: its verdict (or its absence) is owed.
    probe: bool,
    _in_flight: InFlight,
    started: Instant,
    first_token: Option<Duration>,
    deltas: u32,
    ended: bool,
}

impl Attempt {
    pub(super) fn start(target: &Target, request: &ChatRequest, metrics: Arc<Metrics>, probe: bool) -> Self {
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
            model: target.model.clone(),
            health: target.health.clone(),
            probe,
            _in_flight: target.health.enter(),
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
        self.health.record_ttft(ttft);
        self.probe = false;
        if let Some(t) = self.health.success() {
            transitioned(&self.metrics, &self.provider, &self.model, t);
        }
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

    /// The attempt failed before its first delta. The breaker hears of
    /// retryable failures; a probe that failed otherwise frees its slot.
    pub(super) fn fail(mut self, failure: &Failure, detail: Option<&ProviderError>) {
        // For the operator: callers get a status, and not every detail.
        match detail {
            Some(error) => {
                tracing::warn!(provider = &*self.provider, model = &*self.model, error = %error, "upstream attempt failed")
            }
            None => {
                tracing::warn!(provider = &*self.provider, model = &*self.model, error = %failure, "upstream attempt failed")
            }
        }
        self.health_failure(failure.kind);
        self.end("error", Some(failure.kind.label()));
    }

    fn health_failure(&mut self, kind: FailureKind) {
        if kind.retryable() {
            if let Some(t) = self.health.failure(tokio::time::Instant::now()) {
                transitioned(&self.metrics, &self.provider, &self.model, t);
            }
            self.probe = false;
        }
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
        if std::mem::take(&mut self.probe) {
            self.health.probe_abandoned();
        }
    }

    /// How long the attempt has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
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
    type Item = Result<Delta, Failure>;

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
        let error = match ready!(this.rest.as_mut().poll_next(cx)) {
            Some(Ok(delta)) => {
                this.attempt.deltas += 1;
                if let Some(finish) = &delta.finish {
                    this.attempt.finish(finish);
                }
                return Poll::Ready(Some(Ok(delta)));
            }
            Some(Err(e)) => e,
            // A provider stream that stops without its final delta has
            // lost the end of the answer: never a silent success.
            None => ProviderError::Stream("upstream stream ended before the answer finished".into()),
        };
        let failure = Failure::from(&error);
        tracing::warn!(provider = &*this.attempt.provider, model = &*this.attempt.model, error = %error, "upstream failed mid-stream");
        this.attempt.health_failure(failure.kind);
        this.attempt.end("error", Some(failure.kind.label()));
        Poll::Ready(Some(Err(failure)))
    }
}
