//! Prometheus metrics, served by `admin/` on `/metrics`. Names follow the
//! OpenTelemetry GenAI conventions in Prometheus form; labels stay
//! low-cardinality (model, provider, code; never request or user ids).

use std::sync::atomic::AtomicI64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `grpc` or `http`.
    pub front_door: &'static str,
    pub method: &'static str,
    pub model: String,
    pub provider: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_request_model: String,
    pub gen_ai_provider_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_request_model: String,
    pub gen_ai_provider_name: String,
    pub error_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_request_model: String,
    pub gen_ai_provider_name: String,
    pub gen_ai_token_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub provider: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

fn seconds_histogram() -> Histogram {
    // 0.5 ms .. ~65 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn per_token_histogram() -> Histogram {
    // 0.1 ms .. ~3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn token_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 12))
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    duration: HistFamily<DurationLabels>,
    ttft: HistFamily<GenAiLabels>,
    per_token: HistFamily<GenAiLabels>,
    tokens: HistFamily<TokenLabels>,
    attempts: Family<AttemptLabels, Counter>,
    in_flight: Gauge<i64, AtomicI64>,
    cancelled: Family<ModelLabels, Counter>,
    dropped_spans: Counter,
    pub routing: super::routing_metrics::RoutingMetrics,
    config_reloads: Family<OutcomeLabels, Counter>,
    tls_reloads: Family<OutcomeLabels, Counter>,
    pub admission: super::admission_metrics::AdmissionMetrics,
    pub listeners: super::listener_metrics::ListenerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "llm_gateway_calls",
            "Calls by front door, method, model, provider and status code",
            calls.clone(),
        );
        let duration: HistFamily<DurationLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register_with_unit(
            "gen_ai_client_operation_duration",
            "GenAI operation duration",
            Unit::Seconds,
            duration.clone(),
        );
        let ttft: HistFamily<GenAiLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "Time to the first output token",
            Unit::Seconds,
            ttft.clone(),
        );
        let per_token: HistFamily<GenAiLabels> = Family::new_with_constructor(per_token_histogram);
        registry.register_with_unit(
            "gen_ai_server_time_per_output_token",
            "Time per output token after the first",
            Unit::Seconds,
            per_token.clone(),
        );
        let tokens: HistFamily<TokenLabels> = Family::new_with_constructor(token_histogram);
        registry.register("gen_ai_client_token_usage", "Tokens used per operation, by type", tokens.clone());
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "llm_gateway_upstream_attempts",
            "Upstream attempts by provider and outcome",
            attempts.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register("llm_gateway_streams_in_flight", "Calls in flight", in_flight.clone());
        let cancelled = Family::<ModelLabels, Counter>::default();
        registry.register(
            "llm_gateway_cancelled_calls",
            "Calls the caller cancelled or abandoned",
            cancelled.clone(),
        );
        let dropped_spans = super::export::DROPPED_SPANS.clone();
        registry.register(
            "llm_gateway_dropped_spans",
            "Spans dropped because the export queue was full",
            dropped_spans.clone(),
        );
        registry.register(
            "llm_gateway_dropped_log_lines",
            "Log lines dropped because stdout did not keep up",
            super::logbuf::DROPPED_LINES.clone(),
        );
        let routing = super::routing_metrics::RoutingMetrics::register(&mut registry);
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "llm_gateway_config_reloads",
            "Config reloads (SIGHUP or a changed file) by outcome: ok, invalid",
            config_reloads.clone(),
        );
        let tls_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "llm_gateway_tls_reloads",
            "Reloads of changed TLS files by outcome: ok, error",
            tls_reloads.clone(),
        );
        let admission = super::admission_metrics::AdmissionMetrics::register(&mut registry);
        let listeners = super::listener_metrics::ListenerMetrics::register(&mut registry);
        Self {
            registry,
            routing,
            calls,
            duration,
            ttft,
            per_token,
            tokens,
            attempts,
            in_flight,
            cancelled,
            dropped_spans,
            config_reloads,
            tls_reloads,
            admission,
            listeners,
        }
    }

    pub fn config_reloaded(&self, outcome: &'static str) {
        self.config_reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn tls_reloaded(&self, outcome: &'static str) {
        self.tls_reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn upstream_attempt(&self, provider: &str, outcome: &'static str) {
        self.attempts.get_or_create(&AttemptLabels { provider: provider.to_owned(), outcome }).inc();
    }

    pub fn call_started(&self) {
        self.in_flight.inc();
    }

    pub fn dropped_spans(&self) -> &Counter {
        &self.dropped_spans
    }

    /// Records a finished call.
    pub fn call_finished(&self, call: &FinishedCall<'_>) {
        self.in_flight.dec();
        self.calls
            .get_or_create(&CallLabels {
                front_door: call.front_door,
                method: call.method,
                model: call.model.to_owned(),
                provider: call.provider.to_owned(),
                code: call.code,
            })
            .inc();
        if call.cancelled {
            self.cancelled.get_or_create(&ModelLabels { model: call.model.to_owned() }).inc();
        }
        if call.provider.is_empty() {
            return;
        }
        let genai = GenAiLabels {
            gen_ai_operation_name: "chat",
            gen_ai_request_model: call.model.to_owned(),
            gen_ai_provider_name: call.provider.to_owned(),
        };
        self.duration
            .get_or_create(&DurationLabels {
                gen_ai_operation_name: "chat",
                gen_ai_request_model: call.model.to_owned(),
                gen_ai_provider_name: call.provider.to_owned(),
                error_type: call.error_type,
            })
            .observe(call.duration.as_secs_f64());
        if let Some(ttft) = call.ttft {
            self.ttft.get_or_create(&genai).observe(ttft.as_secs_f64());
            if call.output_tokens > 1 {
                let rest = call.duration.saturating_sub(ttft).as_secs_f64();
                self.per_token.get_or_create(&genai).observe(rest / f64::from(call.output_tokens - 1));
            }
        }
        if let Some((input, output)) = call.usage {
            for (kind, n) in [("input", input), ("output", output)] {
                self.tokens
                    .get_or_create(&TokenLabels {
                        gen_ai_operation_name: "chat",
                        gen_ai_request_model: call.model.to_owned(),
                        gen_ai_provider_name: call.provider.to_owned(),
                        gen_ai_token_type: kind,
                    })
                    .observe(f64::from(n));
            }
        }
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }
}

/// What the call core reports of a call when it ends.
pub struct FinishedCall<'a> {
    pub front_door: &'static str,
    pub method: &'static str,
    pub model: &'a str,
    pub provider: &'a str,
    pub code: &'static str,
    /// `""` on success.
    pub error_type: &'static str,
    pub cancelled: bool,
    pub duration: std::time::Duration,
    pub ttft: Option<std::time::Duration>,
    pub output_tokens: u32,
    pub usage: Option<(u32, u32)>,
}
