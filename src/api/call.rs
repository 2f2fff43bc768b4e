//! One call's life: its request id, deadline, server span and the record it
//! leaves (metrics, one log line) however it ends, including a caller who
//! left mid-stream.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::{
    Code,
    metadata::{AsciiMetadataValue, MetadataMap},
};
use tracing::{Span, field::Empty};

use super::error::CallError;
use crate::{
    chat::Finish,
    telemetry::{
        self, TraceContext,
        metrics::{FinishedCall, Metrics},
    },
};

/// Most completion text recorded on a span; past it the record is cut.
const MAX_RECORDED: usize = 1 << 20;

/// Longest `grpc-timeout` value: 8 digits (gRPC over HTTP/2 spec).
const MAX_TIMEOUT_DIGITS: usize = 8;

pub struct Call {
    pub method: &'static str,
    pub request_id: AsciiMetadataValue,
    pub trace: TraceContext,
    pub span: Span,
    pub deadline: Option<Instant>,
    metrics: Arc<Metrics>,
    started: Instant,
    /// The configured model name; empty until the name is known to be one.
    model: String,
    provider: Option<Arc<str>>,
    upstream_model: Option<Arc<str>>,
    ttft: Option<Duration>,
    deltas: u32,
    finish: Option<Finish>,
    outcome: Option<(Code, &'static str)>,
    /// The completion so far, when content recording is on.
    output: Option<String>,
    /// Counts this call as in flight until it is dropped.
    _tracked: TaskTrackerToken,
}

impl Call {
    pub fn start(
        method: &'static str,
        metadata: &MetadataMap,
        default_timeout: Duration,
        metrics: Arc<Metrics>,
        tracked: TaskTrackerToken,
    ) -> Self {
        let started = Instant::now();
        let request_id = metadata
            .get("x-request-id")
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .cloned()
            .unwrap_or_else(new_request_id);
        let mut trace_headers = http::HeaderMap::new();
        for name in ["traceparent", "tracestate", "baggage"] {
            if let Some(v) = metadata.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
                trace_headers.insert(name, v);
            }
        }
        let trace = TraceContext::from_headers(&trace_headers);
        let span = tracing::info_span!(
            "grpc",
            otel.name = format!("llmgateway.v1.LlmGateway/{method}"),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = "llmgateway.v1.LlmGateway",
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            request_id = request_id.to_str().unwrap_or(""),
            llm_gateway.key_name = Empty,
            gen_ai.request.model = Empty,
            llm_gateway.provider = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            llm_gateway.cancelled = Empty,
            llm_gateway.streamed_deltas = Empty,
            error.type = Empty,
        );
        trace.adopt(&span);
        let timeout = grpc_timeout(metadata);
        let timeout = match timeout {
            Some(t) => Some(t),
            None if default_timeout.is_zero() => None,
            None => Some(default_timeout),
        };
        metrics.call_started();
        Self {
            method,
            request_id,
            deadline: timeout.and_then(|t| started.checked_add(t)),
            trace,
            span,
            metrics,
            started,
            model: String::new(),
            provider: None,
            upstream_model: None,
            ttft: None,
            deltas: 0,
            finish: None,
            outcome: None,
            output: None,
            _tracked: tracked,
        }
    }

    pub fn set_key(&self, name: &str) {
        self.span.record("llm_gateway.key_name", name);
    }

    pub fn set_model(&mut self, model: &str) {
        self.span.record("gen_ai.request.model", model);
        self.model = model.to_owned();
    }

    /// The caller's tags, one span attribute each.
    pub fn set_metadata(&self, metadata: &std::collections::HashMap<String, String>) {
        for (k, v) in metadata {
            telemetry::set_attribute(&self.span, format!("llm_gateway.metadata.{k}"), v.clone());
        }
    }

    /// Prompts and completions go on the span only when the config says so.
    pub fn record_prompt(&mut self, request: &crate::chat::ChatRequest) {
        let messages: Vec<_> = request
            .messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
            .collect();
        let text = serde_json::Value::from(messages).to_string();
        telemetry::set_attribute(&self.span, "gen_ai.input.messages".into(), text);
        self.output = Some(String::new());
    }

    /// Adds streamed text to the recorded completion, when recording.
    pub fn record_output(&mut self, text: &str) {
        if let Some(out) = &mut self.output
            && out.len() < MAX_RECORDED
        {
            out.push_str(text);
        }
    }

    pub fn set_target(&mut self, provider: Arc<str>, model: Arc<str>, ttft: Option<Duration>) {
        self.span.record("llm_gateway.provider", &*provider);
        self.provider = Some(provider);
        self.upstream_model = Some(model);
        self.ttft = ttft;
    }

    pub fn provider(&self) -> Option<&Arc<str>> {
        self.provider.as_ref()
    }

    pub fn upstream_model(&self) -> Option<&Arc<str>> {
        self.upstream_model.as_ref()
    }

    pub fn delta(&mut self) {
        self.deltas += 1;
    }

    pub fn finished(&mut self, finish: Finish) {
        self.finish = Some(finish);
        self.span.record("gen_ai.usage.input_tokens", i64::from(finish.usage.input_tokens));
        self.span.record("gen_ai.usage.output_tokens", i64::from(finish.usage.output_tokens));
        self.outcome = Some((Code::Ok, ""));
    }

    /// The answer ended with its final delta.
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// An answer with no upstream behind it (ListModels).
    pub fn succeeded(&mut self) {
        self.outcome = Some((Code::Ok, ""));
    }

    pub fn failed(&mut self, error: &CallError) {
        if self.outcome.is_none() {
            self.outcome = Some((error.code(), error.label()));
        }
    }

    /// The response metadata every answer carries, success or error.
    pub fn headers(&self, md: &mut MetadataMap) {
        md.insert("x-request-id", self.request_id.clone());
        if let Some(v) = self.provider.as_deref().and_then(|p| p.parse().ok()) {
            md.insert("x-llm-provider", v);
        }
        if let Some(v) = self.upstream_model.as_deref().and_then(|m| m.parse().ok()) {
            md.insert("x-llm-model", v);
        }
    }

    /// The status for `error`, with this call's headers.
    pub fn status(&mut self, error: CallError) -> tonic::Status {
        self.failed(&error);
        let mut status = error.to_status();
        self.headers(status.metadata_mut());
        status
    }

    /// Time left before the deadline.
    pub fn sleep_until_deadline(&self) -> Option<tokio::time::Sleep> {
        self.deadline.map(|d| tokio::time::sleep_until(d.into()))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // No outcome recorded: the caller went away before the end.
        let cancelled = self.outcome.is_none();
        let (code, error_type) = self.outcome.unwrap_or((Code::Cancelled, "cancelled"));
        let duration = self.started.elapsed();
        let code_name = code_name(code);
        self.span.record("rpc.grpc.status_code", i64::from(code as i32));
        if code != Code::Ok {
            self.span.record("otel.status_code", "ERROR");
            self.span.record("error.type", error_type);
        }
        if cancelled {
            self.span.record("llm_gateway.cancelled", true);
        }
        self.span.record("llm_gateway.streamed_deltas", i64::from(self.deltas));
        if let Some(out) = self.output.take() {
            let text = serde_json::json!([{"role": "assistant", "content": out}]).to_string();
            telemetry::set_attribute(&self.span, "gen_ai.output.messages".into(), text);
        }
        let usage = self.finish.map(|f| (f.usage.input_tokens, f.usage.output_tokens));
        let provider = self.provider.as_deref().unwrap_or("");
        self.metrics.call_finished(&FinishedCall {
            method: self.method,
            model: &self.model,
            provider,
            code: code_name,
            error_type,
            cancelled,
            duration,
            ttft: self.ttft,
            output_tokens: usage.map(|u| u.1).unwrap_or(self.deltas),
            usage,
        });
        let trace_id = self.trace.trace_id(&self.span);
        tracing::info!(
            parent: &self.span,
            request_id = self.request_id.to_str().unwrap_or(""),
            trace_id = trace_id.as_deref().unwrap_or(""),
            method = self.method,
            model = %self.model,
            provider,
            upstream_model = self.upstream_model.as_deref().unwrap_or(""),
            status = code_name,
            error_type,
            input_tokens = usage.map(|u| u.0),
            output_tokens = usage.map(|u| u.1),
            deltas = self.deltas,
            ttft_ms = self.ttft.map(|t| t.as_secs_f64() * 1e3),
            duration_ms = duration.as_secs_f64() * 1e3,
            "call finished"
        );
    }
}

/// 32 hex digits, random per call: unique enough to find a call's logs.
pub fn new_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn new_request_id() -> AsciiMetadataValue {
    // Hex digits are always a valid header value.
    AsciiMetadataValue::try_from(new_id()).unwrap_or_else(|_| AsciiMetadataValue::from_static("unknown"))
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > MAX_TIMEOUT_DIGITS {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut m = MetadataMap::new();
        for (v, d) in [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5u", Some(Duration::from_micros(5))),
            ("123456789S", None),
            ("S", None),
            ("10x", None),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), d, "{v}");
        }
    }
}
