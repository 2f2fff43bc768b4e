//! Connection limits every listener shares (gRPC, the HTTP front door,
//! admin): a per-listener count that refuses connections past
//! `server.max_connections`, and per connection, what its requests are
//! doing, so that the listener closes one that has sent no first request
//! within `server.handshake_timeout` and sends GOAWAY to one idle for
//! `server.idle_timeout`. A listener admits each accepted connection through
//! its [`Gate`], serves it with [`Admitted::track`] around its service, and
//! drives it with the [`Admitted`] (`server::drive` races it against
//! [`Admitted::expired`]). Nothing here knows a protocol above HTTP.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    config::ServerConfig,
    telemetry::listener_metrics::{ListenerMetrics, ListenerSeries},
    watchdog,
};

/// The limits of one listener, from `server`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// None: never closed for idleness.
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
}

impl Limits {
    pub fn from_config(config: &ServerConfig) -> Self {
        Self {
            handshake_timeout: config.handshake_timeout,
            idle_timeout: (!config.idle_timeout.is_zero()).then_some(config.idle_timeout),
            max_connections: config.max_connections,
        }
    }
}

/// Counts one listener's open connections.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

struct GateInner {
    name: &'static str,
    limits: Limits,
    open: AtomicUsize,
    series: ListenerSeries,
}

impl Gate {
    /// The gate of the listener `name` (the `listener` metric label).
    pub fn new(name: &'static str, limits: Limits, metrics: &ListenerMetrics) -> Self {
        let inner = GateInner { name, limits, open: AtomicUsize::new(0), series: metrics.series(name) };
        Self { inner: Arc::new(inner) }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// A connection just accepted. None: the listener already has
    /// `max_connections` open; the refusal is counted and the caller closes
    /// the connection at once. Accepting and closing (rather than leaving it
    /// in the kernel's backlog) tells the client now, and keeps the backlog
    /// for the connections that will fit.
    pub fn admit(&self) -> Option<Admitted> {
        let max = self.inner.limits.max_connections;
        let admitted =
            self.inner.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        if admitted.is_err() {
            self.inner.series.refused.inc();
            tracing::debug!(listener = self.inner.name, max_connections = max, "connection refused");
            return None;
        }
        self.inner.series.open.inc();
        Some(Admitted {
            handshake_deadline: Instant::now() + self.inner.limits.handshake_timeout,
            activity: Arc::new(Activity::new()),
            gate: self.inner.clone(),
        })
    }
}

/// One admitted connection: counted open until dropped, with its timers.
pub struct Admitted {
    gate: Arc<GateInner>,
    activity: Arc<Activity>,
    handshake_deadline: Instant,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        self.gate.series.open.dec();
    }
}

/// Why a connection's timers ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No first request by the handshake deadline: close it.
    Handshake,
    /// Nothing in flight for the idle timeout: GOAWAY.
    Idle,
}

impl Admitted {
    /// When the TLS handshake, the preface and the first request must all
    /// be in: `handshake_timeout` after the connection was accepted.
    pub fn handshake_deadline(&self) -> Instant {
        self.handshake_deadline
    }

    pub fn limits(&self) -> &Limits {
        &self.gate.limits
    }

    /// `service`, with each request counted on this connection.
    pub fn track<S>(&self, service: S) -> Tracked<S> {
        Tracked { inner: service, activity: self.activity.clone() }
    }

    /// Requests whose response has not ended yet.
    pub fn in_flight(&self) -> usize {
        self.activity.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when the connection should end: with no first request by
    /// the handshake deadline, or, once it has had one, when nothing has been
    /// in flight for `idle_timeout` (never, without one).
    pub async fn expired(&self) -> Expiry {
        let a = &self.activity;
        tokio::select! {
            _ = a.first.cancelled() => {}
            _ = tokio::time::sleep_until(self.handshake_deadline) => {
                if !a.first.is_cancelled() {
                    return Expiry::Handshake;
                }
            }
        }
        let Some(idle) = self.gate.limits.idle_timeout else {
            return std::future::pending().await;
        };
        loop {
            // The last change is read after the count: a response that ended
            // wrote its time before it left the count.
            let busy = a.in_flight.load(Ordering::Acquire) > 0;
            let quiet = a.since_last_change();
            if !busy && quiet >= idle {
                return Expiry::Idle;
            }
            // Busy: look again an idle period later (a request that ends
            // in between restarts the clock, so this is never early).
            let wait = if busy { idle } else { idle - quiet };
            tokio::time::sleep(wait).await;
        }
    }
}

/// What one connection's requests are doing.
struct Activity {
    /// Cancelled by the first request.
    first: CancellationToken,
    in_flight: AtomicUsize,
    /// Milliseconds from `born` to the last request's start or end.
    last_change: AtomicU64,
    born: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            first: CancellationToken::new(),
            in_flight: AtomicUsize::new(0),
            last_change: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_change.store(ms, Ordering::Release);
    }

    fn since_last_change(&self) -> Duration {
        let now = self.born.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_change.load(Ordering::Acquire)))
    }
}

/// Counts one request in flight from its arrival until its response body
/// is dropped (sent whole, reset or abandoned).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        // One atomic load per request once the first one is seen.
        if !activity.first.is_cancelled() {
            activity.first.cancel();
        }
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The response is over: a kept-alive HTTP/1.1 connection's next
        // call is not held to this one's deadline.
        watchdog::disarm();
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's service with its requests counted ([`Admitted::track`]).
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, R, B> hyper::service::Service<Request<R>> for Tracked<S>
where
    S: hyper::service::Service<Request<R>, Response = Response<B>>,
    S::Future: Unpin,
{
    type Response = Response<Counted<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, request: Request<R>) -> Self::Future {
        let guard = InFlight::start(&self.activity);
        TrackedFuture { inner: self.inner.call(request), guard: Some(guard) }
    }
}

pub struct TrackedFuture<F> {
    inner: F,
    guard: Option<InFlight>,
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>> + Unpin,
{
    type Output = Result<Response<Counted<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = ready!(Pin::new(&mut this.inner).poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| Counted { body, _guard: guard })))
    }
}

/// A response body that keeps its request counted in flight until dropped;
/// every call is delegated as is.
pub struct Counted<B> {
    body: B,
    _guard: Option<InFlight>,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    fn limits(max: usize, idle_ms: Option<u64>) -> Limits {
        Limits {
            handshake_timeout: Duration::from_millis(100),
            idle_timeout: idle_ms.map(Duration::from_millis),
            max_connections: max,
        }
    }

    #[test]
    fn refuses_past_the_limit_and_counts() {
        let metrics = Metrics::new();
        let gate = Gate::new("test", limits(2, None), &metrics.listeners);
        let a = gate.admit().expect("first");
        let b = gate.admit().expect("second");
        assert!(gate.admit().is_none(), "a third is refused");
        drop(a);
        let c = gate.admit().expect("room again after one closed");
        let text = metrics.render();
        assert!(text.contains("llm_gateway_connections_open{listener=\"test\"} 2"), "{text}");
        assert!(text.contains("llm_gateway_connections_refused_total{listener=\"test\"} 1"), "{text}");
        drop((b, c));
    }

    #[tokio::test(start_paused = true)]
    async fn no_first_request_is_a_handshake_expiry() {
        let metrics = Metrics::new();
        let gate = Gate::new("test", limits(1, Some(1000)), &metrics.listeners);
        let conn = gate.admit().expect("admitted");
        assert_eq!(conn.expired().await, Expiry::Handshake);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_response() {
        let metrics = Metrics::new();
        let gate = Gate::new("test", limits(1, Some(1000)), &metrics.listeners);
        let conn = gate.admit().expect("admitted");
        let guard = InFlight::start(&conn.activity);
        let started = Instant::now();
        let expired = conn.expired();
        tokio::pin!(expired);
        // A request in flight for 5 s keeps the connection.
        let _ = tokio::time::timeout(Duration::from_secs(5), expired.as_mut()).await.expect_err("busy");
        drop(guard);
        let ended = Instant::now();
        assert_eq!(expired.await, Expiry::Idle);
        assert!(ended - started >= Duration::from_secs(5));
        assert!(Instant::now() - ended >= Duration::from_secs(1), "idle counts from the response's end");
        assert!(Instant::now() - ended < Duration::from_millis(1100));
    }
}
