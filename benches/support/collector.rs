//! An OTLP/gRPC trace collector on loopback for the tracing-cost runs: a
//! tonic server implementing `opentelemetry.proto.collector.trace.v1.TraceService`
//! that counts the spans and export requests it is sent and keeps nothing.
//! It runs on a runtime of its own (threads named [`super::COLLECTOR_THREADS`])
//! so that its CPU can be told apart from the load client's.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{Request, Response, Status};

use super::BoxError;

/// What the collector has been sent since it started.
#[derive(Default)]
pub struct CollectorStats {
    pub spans: AtomicU64,
    pub requests: AtomicU64,
}

impl CollectorStats {
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Waits until no span has arrived for `quiet` (the exporter has sent
    /// what it had), or `limit` has passed. Returns the spans received.
    pub async fn settle(&self, quiet: Duration, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        let mut last = self.spans();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.spans();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                break;
            }
        }
        last
    }
}

struct Sink(Arc<CollectorStats>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize =
            request.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A running collector; stops when dropped.
pub struct Collector {
    pub addr: SocketAddr,
    pub stats: Arc<CollectorStats>,
    server: JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Collector {
    /// Binds 127.0.0.1:0 and serves on the current runtime.
    pub async fn start() -> Result<Self, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(CollectorStats::default());
        let sink = Sink(stats.clone());
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(sink))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok(Self { addr, stats, server })
    }
}

/// A loopback address where nothing listens: a port the kernel handed out,
/// whose listener is closed at once, so connecting to it is refused.
pub fn dead_endpoint() -> Result<SocketAddr, BoxError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Whether connecting to `addr` is still refused (nothing took the port).
pub fn still_refused(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}
