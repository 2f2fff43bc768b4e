//! Logs, traces and metrics. Called by the other modules; calls none of them.
//! Trace context crosses the gateway through the OpenTelemetry propagator,
//! never a hand-written parser.

pub mod admission_metrics;
mod export;
mod init;
pub mod listener_metrics;
mod logbuf;
pub mod metrics;
pub mod routing_metrics;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapCompositePropagator, TextMapPropagator},
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use init::{Telemetry, TelemetryError, init};

/// The target of events meant for a span only (the first token), which the
/// log layer leaves out: one log line per call is enough.
pub const SPAN_EVENT: &str = "llm_gateway::span_event";

/// Whether spans go to an OpenTelemetry pipeline (an OTLP endpoint is set).
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Sets an attribute whose key is only known at run time (a metadata tag,
/// an array value), which `tracing` fields cannot express.
pub fn set_attribute(span: &Span, key: String, value: impl Into<opentelemetry::Value>) {
    if exporting() {
        span.set_attribute(key, value);
    }
}

fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
}

/// The W3C trace context a front door read from its call's metadata.
struct ValueExtractor<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
    baggage: Option<&'a str>,
}

impl Extractor for ValueExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            "baggage" => self.baggage,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let present =
            [("traceparent", self.traceparent), ("tracestate", self.tracestate), ("baggage", self.baggage)];
        present.into_iter().filter(|(_, v)| v.is_some()).map(|(k, _)| k).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// The caller's trace context, extracted from the call's metadata.
pub struct TraceContext {
    parent: Context,
}

impl TraceContext {
    /// Extracts W3C `traceparent`, `tracestate` and `baggage`, as values a
    /// front door has read (gRPC metadata, HTTP headers).
    pub fn from_values(traceparent: Option<&str>, tracestate: Option<&str>, baggage: Option<&str>) -> Self {
        Self::from_parent(propagator().extract(&ValueExtractor { traceparent, tracestate, baggage }))
    }

    fn from_parent(parent: Context) -> Self {
        if exporting() || parent.span().span_context().is_valid() {
            return Self { parent };
        }
        // No caller trace and no exporter: still one trace id per call, so
        // the upstream requests and the log line agree.
        let root = SpanContext::new(
            TraceId::from_bytes(random_bytes()),
            SpanId::from_bytes(random_bytes()),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        Self { parent: parent.with_remote_span_context(root) }
    }

    /// Makes `span` a child of the caller's span (when spans are exported).
    pub fn adopt(&self, span: &Span) {
        if exporting() {
            let _ = span.set_parent(self.parent.clone());
        }
    }

    /// The trace id, for logs, when the caller sent one or a span has one.
    pub fn trace_id(&self, span: &Span) -> Option<String> {
        let cx = if exporting() { span.context() } else { self.parent.clone() };
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| sc.trace_id().to_string())
    }

    /// Headers for an upstream request made under `span`: its `traceparent`.
    /// With no exporter there is no span id to give, so a fresh one is made
    /// in the caller's trace (or a new trace), still through the propagator.
    pub fn headers_for(&self, span: &Span) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        let cx = if exporting() {
            span.context()
        } else {
            let parent = self.parent.span().span_context().clone();
            let span_id = SpanId::from_bytes(random_bytes());
            let sc = SpanContext::new(
                parent.trace_id(),
                span_id,
                parent.trace_flags(),
                false,
                parent.trace_state().clone(),
            );
            self.parent.with_remote_span_context(sc)
        };
        // Only the trace context goes upstream: the caller's baggage is for
        // its own services, not for a third-party provider.
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut headers));
        headers
    }
}

/// Random ids from a thread-local generator: no syscall per call. Trace and
/// span ids need uniqueness, not secrecy.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let v = fastrand::u64(1..).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}
