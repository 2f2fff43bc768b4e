//! The span export path: the SDK's batch processor behind a gate that keeps
//! its queue bound itself, so that every span a full queue costs is counted
//! (`llm_gateway_dropped_spans_total`) rather than lost silently.

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use opentelemetry::Context;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor},
};
use prometheus_client::metrics::counter::Counter;

/// Spans dropped since start; registered by `metrics`.
pub(crate) static DROPPED_SPANS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The SDK's default for `OTEL_BSP_MAX_QUEUE_SIZE`.
const DEFAULT_QUEUE: usize = 2048;

fn max_queue() -> usize {
    std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_QUEUE)
}

/// Spans handed to the batch processor and not yet given to the exporter.
#[derive(Debug, Default)]
struct Pending(AtomicUsize);

/// Admits a span only while fewer than the queue's size are pending, so the
/// batch processor's own queue never overflows and each drop is counted here.
#[derive(Debug)]
pub(crate) struct GatedProcessor {
    inner: BatchSpanProcessor,
    pending: Arc<Pending>,
    limit: usize,
}

impl GatedProcessor {
    /// `interval` applies unless `OTEL_BSP_SCHEDULE_DELAY` is set; the other
    /// `OTEL_BSP_*` variables are read by the SDK.
    pub(crate) fn new<E: SpanExporter + 'static>(exporter: E, interval: Duration) -> Self {
        let pending = Arc::new(Pending::default());
        let exporter = CountingExporter { inner: exporter, pending: pending.clone() };
        let mut config = BatchConfigBuilder::default();
        if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
            config = config.with_scheduled_delay(interval);
        }
        let inner = BatchSpanProcessor::builder(exporter).with_batch_config(config.build()).build();
        Self { inner, pending, limit: max_queue() }
    }
}

impl SpanProcessor for GatedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .pending
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.limit).then_some(n + 1))
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            DROPPED_SPANS.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    pending: Arc<Pending>,
}

/// How much lower than the calls' threads the exporter's threads run.
const EXPORT_NICENESS: i32 = 10;

/// Lowers the calling thread's scheduling priority, once per thread. Export
/// is background work: a batch being turned into OTLP and encoded (a
/// millisecond or more of CPU at a time) on cores the calls share should
/// yield to a call's next step, not hold it up. The work is the same; its
/// queue is bounded and every span it cannot keep up with is counted.
pub(crate) fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use std::cell::Cell;
        thread_local!(static LOWERED: Cell<bool> = const { Cell::new(false) });
        if LOWERED.replace(true) {
            return;
        }
        // `None` is the calling thread: Linux keeps a nice value per thread.
        if let Ok(now) = rustix::process::getpriority_process(None) {
            let _ = rustix::process::setpriority_process(None, (now + EXPORT_NICENESS).min(19));
        }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        // Called on the batch processor's own thread, which the SDK starts
        // and gives no hook for.
        lower_priority();
        // Whatever the export's fate, these spans have left the queue.
        let n = batch.len();
        let _ =
            self.pending.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| Some(p.saturating_sub(n)));
        self.inner.export(batch)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
