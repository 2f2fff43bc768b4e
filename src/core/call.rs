//! One call's life: its request id, deadline, trace context, server span and
//! the record it leaves (metrics, one log line) however it ends, including a
//! caller who left mid-stream. A front door describes itself with a [`Door`]
//! and hands over its metadata as plain values ([`CallMeta`]).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Span;

use super::error::CallError;
use crate::{
    admission::{Ticket, estimate},
    chat::{ChatRequest, Finish, Usage},
    telemetry::{
        self, TraceContext,
        metrics::{FinishedCall, Metrics},
    },
    watchdog,
};

/// Most completion text recorded on a span; past it the record is cut.
const MAX_RECORDED: usize = 1 << 20;

/// Longest caller-chosen request id kept; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// A front door's vocabulary for the record a call leaves.
pub struct Door {
    /// The front door, as the `front_door` metric label and log field.
    pub name: &'static str,
    /// The span field (declared by the front door's [`call_span!`]) that
    /// holds [`Outcome::number`].
    pub status_field: &'static str,
    /// How a call that succeeded is recorded.
    pub ok: Outcome,
    /// How a call is recorded that ended with no outcome: the caller went away.
    pub cancelled: Outcome,
    /// How a call is recorded whose response the listener dropped at the
    /// deadline because the caller was not reading it (`watchdog`).
    pub deadline: Outcome,
}

/// A call's ending in its front door's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The status by name: the `code` metric label and the log's `status`.
    pub code: &'static str,
    /// The status as a number, on the span.
    pub number: i64,
}

/// The call's metadata, as plain values read by its front door.
#[derive(Debug, Default, Clone, Copy)]
pub struct CallMeta<'a> {
    /// `x-request-id`.
    pub request_id: Option<&'a str>,
    /// W3C trace context.
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
    pub baggage: Option<&'a str>,
    /// The deadline the caller asked for, if any.
    pub timeout: Option<Duration>,
}

/// The server span of a call: the front door's own name and fields (among
/// them its [`Door::status_field`]), then the fields the core records.
macro_rules! call_span {
    ($name:literal, $($door:tt)+) => {
        ::tracing::info_span!(
            $name,
            $($door)+,
            otel.kind = "server",
            otel.status_code = ::tracing::field::Empty,
            request_id = ::tracing::field::Empty,
            llm_gateway.key_name = ::tracing::field::Empty,
            gen_ai.request.model = ::tracing::field::Empty,
            llm_gateway.provider = ::tracing::field::Empty,
            gen_ai.usage.input_tokens = ::tracing::field::Empty,
            gen_ai.usage.output_tokens = ::tracing::field::Empty,
            llm_gateway.cancelled = ::tracing::field::Empty,
            llm_gateway.streamed_deltas = ::tracing::field::Empty,
            llm_gateway.queue_wait_ms = ::tracing::field::Empty,
            error.type = ::tracing::field::Empty,
        )
    };
}
pub(crate) use call_span;

/// How long a call may run: `default` when its caller asks for no deadline
/// (0: `max`), and never more than `max`, whatever it asks.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub default: Duration,
    pub max: Duration,
}

pub struct Call {
    door: &'static Door,
    pub method: &'static str,
    pub request_id: String,
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
    outcome: Option<(Outcome, &'static str)>,
    /// The completion so far, when content recording is on.
    output: Option<String>,
    /// Bytes of text streamed: the output estimate of a call whose upstream
    /// sent no usage.
    streamed_bytes: usize,
    /// The call's admission, settled when the call ends (drop included).
    ticket: Option<Ticket>,
    /// The listener's watch on the deadline, when the call runs under one.
    watchdog: Option<watchdog::Armed>,
    /// Counts this call as in flight until it is dropped.
    _tracked: TaskTrackerToken,
}

impl Call {
    /// Starts the record of a call under `span` (made with [`call_span!`]);
    /// its deadline is the caller's, else the default, and never later than
    /// the maximum from now (see [`Timeouts`]).
    pub(super) fn start(
        door: &'static Door,
        method: &'static str,
        span: Span,
        meta: &CallMeta<'_>,
        timeouts: Timeouts,
        metrics: Arc<Metrics>,
        tracked: TaskTrackerToken,
    ) -> Self {
        let started = Instant::now();
        let request_id = meta
            .request_id
            .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
            .map(str::to_owned)
            .unwrap_or_else(new_id);
        let trace = TraceContext::from_values(meta.traceparent, meta.tracestate, meta.baggage);
        span.record("request_id", request_id.as_str());
        trace.adopt(&span);
        let timeout = match meta.timeout {
            Some(t) => t,
            None if timeouts.default.is_zero() => timeouts.max,
            None => timeouts.default,
        };
        // A caller may not hold a call (and its upstream connection) for
        // days by asking for it.
        let timeout = timeout.min(timeouts.max);
        metrics.call_started();
        let deadline = started.checked_add(timeout);
        Self {
            door,
            method,
            request_id,
            deadline,
            watchdog: deadline.and_then(watchdog::arm),
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
            streamed_bytes: 0,
            ticket: None,
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
    pub fn set_metadata(&self, metadata: &HashMap<String, String>) {
        for (k, v) in metadata {
            telemetry::set_attribute(&self.span, format!("llm_gateway.metadata.{k}"), v.clone());
        }
    }

    /// Prompts and completions go on the span only when the config says so.
    pub fn record_prompt(&mut self, request: &ChatRequest) {
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
        self.streamed_bytes += text.len();
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

    /// Keeps the call's admission to its end.
    pub fn set_ticket(&mut self, ticket: Ticket) {
        self.ticket = Some(ticket);
    }

    /// Time the call waited in admission's queue, on its span.
    pub fn set_queue_wait(&self, waited: Duration) {
        if !waited.is_zero() {
            self.span.record("llm_gateway.queue_wait_ms", waited.as_secs_f64() * 1e3);
        }
    }

    /// USD of the answer's usage at the answering target's price (0 before
    /// the end, or without a price).
    pub fn cost_usd(&self) -> f64 {
        match (&self.ticket, &self.finish) {
            (Some(t), Some(f)) => t.cost_usd(f.usage, f.usage.cached_input_tokens),
            _ => 0.0,
        }
    }

    /// The output tokens streamed so far, estimated.
    fn streamed_tokens(&self) -> u32 {
        estimate::output_tokens(self.streamed_bytes, self.deltas)
    }

    /// The answer's end: settles the call's admission with the usage. An
    /// upstream that sent none (llama.cpp's server, say) gets the estimate
    /// instead: a streamed answer never reports 0 tokens. Returns the
    /// finish as the caller is told it.
    pub fn finished(&mut self, mut finish: Finish) -> Finish {
        if finish.usage == Usage::default() && self.deltas > 0 {
            let input = self.ticket.as_ref().map_or(0, Ticket::input_estimate);
            finish.usage =
                Usage { input_tokens: input, output_tokens: self.streamed_tokens(), ..Usage::default() };
        }
        if let Some(ticket) = &mut self.ticket {
            ticket.settle(Some(finish.usage), self.deltas);
        }
        self.finish = Some(finish);
        self.span.record("gen_ai.usage.input_tokens", i64::from(finish.usage.input_tokens));
        self.span.record("gen_ai.usage.output_tokens", i64::from(finish.usage.output_tokens));
        self.outcome = Some((self.door.ok, ""));
        finish
    }

    /// The answer ended with its final delta.
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// An answer with no upstream behind it (a model list).
    pub fn succeeded(&mut self) {
        self.outcome = Some((self.door.ok, ""));
    }

    /// Records how the call failed, as its front door told the caller. The
    /// first failure recorded is the one that counts.
    pub fn failed(&mut self, error: &CallError, outcome: Outcome) {
        if self.outcome.is_none() {
            self.outcome = Some((outcome, error.label()));
        }
    }

    /// Time left before the deadline.
    pub fn sleep_until_deadline(&self) -> Option<tokio::time::Sleep> {
        self.deadline.map(|d| tokio::time::sleep_until(d.into()))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // A call that did not finish (failed mid-stream, cancelled, past its
        // deadline) is charged what it streamed.
        let streamed = self.streamed_tokens();
        if let Some(ticket) = &mut self.ticket {
            ticket.settle(None, streamed);
        }
        if self.outcome.is_none() && self.watchdog.as_ref().is_some_and(watchdog::Armed::fired) {
            self.outcome = Some((self.door.deadline, CallError::DeadlineExceeded.label()));
        }
        // No outcome recorded: the caller went away before the end.
        let cancelled = self.outcome.is_none();
        let (outcome, error_type) = self.outcome.unwrap_or((self.door.cancelled, "cancelled"));
        let duration = self.started.elapsed();
        let code_name = outcome.code;
        self.span.record(self.door.status_field, outcome.number);
        if outcome != self.door.ok {
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
            front_door: self.door.name,
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
            request_id = self.request_id.as_str(),
            trace_id = trace_id.as_deref().unwrap_or(""),
            front_door = self.door.name,
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
