//! Installs the process-wide log and trace pipeline: structured logs to
//! stdout, and an OTLP/gRPC span exporter when an endpoint is configured.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, filter_fn},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::config::{LogFormat, TelemetryConfig};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.log_level / RUST_LOG: {0}")]
    Filter(String),
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global subscriber is already installed")]
    AlreadyInstalled,
    #[error("OTLP exporter thread: {0}")]
    Thread(std::io::Error),
    #[error("log writer thread: {0}")]
    LogThread(std::io::Error),
}

/// Keeps the pipeline alive; [`Telemetry::shutdown`] flushes queued spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The exporter's connection runs here (see [`ExporterRuntime`]);
    /// dropped after the provider has flushed.
    _exporter_rt: Option<ExporterRuntime>,
    /// Writes the log lines still waiting when dropped.
    _logs: super::logbuf::Guard,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            // Flushes the batch queue; bounded by the exporter's timeout.
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "flushing spans at shutdown failed");
            }
        }
    }
}

/// A runtime of one thread for the OTLP exporter. Its HTTP/2 connection task
/// encodes each batch (hundreds of spans at a time): on a worker that serves
/// calls, that stalled the calls queued behind it by a millisecond or more
/// per export. The CPU is the same; the stall is gone.
struct ExporterRuntime(Option<tokio::runtime::Runtime>);

impl ExporterRuntime {
    fn new() -> Result<Self, TelemetryError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .thread_name("otlp-export")
            .on_thread_start(super::export::lower_priority)
            .enable_all()
            .build()
            .map_err(TelemetryError::Thread)?;
        Ok(Self(Some(rt)))
    }
}

impl Drop for ExporterRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            // Dropped from async code (start-up errors, shutdown): a plain
            // drop would block a runtime thread.
            rt.shutdown_background();
        }
    }
}

/// The OTLP exporter, when there is one, gets a runtime of its own.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v),
        _ => EnvFilter::try_new(&config.log_level),
    }
    .map_err(|e| TelemetryError::Filter(e.to_string()))?;

    // Log lines go to stdout through a bounded buffer and a writer thread
    // of their own (`logbuf`), so a slow stdout never blocks a runtime
    // thread, and a line costs a call no wake-up of another thread.
    let (writer, guard) = super::logbuf::start(std::io::stdout()).map_err(TelemetryError::LogThread)?;
    let fmt = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    };

    // Log lines are events: the log layer never sees a span, so spans cost
    // nothing when no exporter wants them (their fields are not formatted),
    // nor the events meant for spans only.
    let fmt = fmt.with_filter(filter.and(filter_fn(|m| m.is_event() && m.target() != super::SPAN_EVENT)));

    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .or_else(|| config.otlp_endpoint.clone().filter(|v| !v.is_empty()));

    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry().with(fmt).try_init().map_err(|_| TelemetryError::AlreadyInstalled)?;
        return Ok(Telemetry { provider: None, _exporter_rt: None, _logs: guard });
    };

    let exporter_rt = ExporterRuntime::new()?;
    // Built inside the exporter's runtime, so that the channel's tasks (and
    // the connection they start) are spawned there.
    let exporter = {
        let Some(rt) = &exporter_rt.0 else { return Err(TelemetryError::Exporter("no runtime".into())) };
        let _inside = rt.enter();
        SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?
    };
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| config.service_name.clone());
    // Resource::builder() also reads OTEL_RESOURCE_ATTRIBUTES.
    let resource = Resource::builder()
        .with_service_name(service_name)
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    let mut builder = SdkTracerProvider::builder()
        // The batch processor reads OTEL_BSP_*; its queue is bounded, so a
        // collector that is down costs dropped spans, never a slow call.
        .with_span_processor(super::export::GatedProcessor::new(exporter, config.export_interval))
        .with_resource(resource);
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        builder = builder
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))));
    }
    let provider = builder.build();
    let tracer = provider.tracer("llm-gateway");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        // Attaching the span's OpenTelemetry context on every enter (every
        // poll of an instrumented stream: once per delta) costs a lock, a
        // clone and a thread-local push and pop; nothing here reads
        // `Context::current()` (propagation takes the span's own context),
        // and parents come from tracing's span tree either way.
        .with_context_activation(false)
        // Spans at INFO; of the events, those meant for spans, and warnings
        // and errors. The call's log line (INFO, a child of its span) would
        // otherwise be encoded a second time as a span event of fourteen
        // attributes that repeat the span's own: most of the exporter's cost.
        .with_filter(filter_fn(|m| {
            if m.is_event() {
                m.target() == super::SPAN_EVENT || *m.level() <= tracing::Level::WARN
            } else {
                *m.level() <= tracing::Level::INFO
            }
        }));
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    super::set_exporting(true);
    Ok(Telemetry { provider: Some(provider), _exporter_rt: Some(exporter_rt), _logs: guard })
}
