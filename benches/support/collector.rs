//! An OTLP/gRPC trace collector on loopback for the tracing-cost runs: a
//! tonic server implementing `opentelemetry.proto.collector.trace.v1.TraceService`
//! that counts the spans and export requests it is sent (decoding no span's
//! fields) and keeps nothing.
//! It runs on a runtime of its own (threads named [`super::COLLECTOR_THREADS`])
//! so that its CPU can be told apart from the load client's.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{
    Request, Response, Status,
    codegen::{BoxFuture, Service},
    server::{NamedService, UnaryService},
};

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

/// The shape of an `ExportTraceServiceRequest` down to its spans, each span
/// decoded as an empty message: prost skips a span's fields by their
/// lengths, so counting costs a walk of a few tags per span instead of a
/// copy of every attribute. The collector stands in for one that would run
/// elsewhere; the less CPU it takes from the cores it shares with the
/// gateway, the more the every-feature row measures the gateway.
mod skeleton {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {}
}

/// `opentelemetry.proto.collector.trace.v1.TraceService`, its one method
/// served with [`skeleton::Request`] for its request type.
#[derive(Clone)]
struct Sink(Arc<CollectorStats>);

impl NamedService for Sink {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl UnaryService<skeleton::Request> for Sink {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<skeleton::Request>) -> Self::Future {
        let spans: usize =
            request.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(Response::new(ExportTraceServiceResponse { partial_success: None })))
    }
}

impl<B> Service<http::Request<B>> for Sink
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let sink = self.clone();
        Box::pin(async move {
            if req.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
                return Ok(Status::unimplemented(req.uri().path().to_owned()).into_http());
            }
            let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, skeleton::Request>::default();
            Ok(tonic::server::Grpc::new(codec).unary(sink, req).await)
        })
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
                .add_service(sink)
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
