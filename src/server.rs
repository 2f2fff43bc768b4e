//! The gRPC listener: accepts HTTP/2 connections and serves the routes on
//! them, with TCP_NODELAY and bounded streams per connection. We drive hyper
//! directly rather than tonic's `Server` so that deadlines are ours to
//! enforce (tonic's own `grpc-timeout` handling answers CANCELLED where the
//! contract wants DEADLINE_EXCEEDED) and so that draining is explicit.

use std::time::Duration;

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;

const CONNECTION_WINDOW: u32 = 8 << 20;
const STREAM_WINDOW: u32 = 1 << 20;

/// Serves `routes` on `listener` until `draining` fires; then closes the
/// listener (new connections are refused) and returns the handle that
/// finishes the open connections gracefully.
pub async fn serve(
    listener: TcpListener,
    routes: tonic::service::Routes,
    config: &ServerConfig,
    draining: CancellationToken,
) -> Drain {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.max_concurrent_streams)
        // Every request is one small DATA frame; h2 answers a backlog of
        // unread ones past half the connection window with ENHANCE_YOUR_CALM.
        // A 64 KiB start (adaptive windows) let ~145 calls arriving at once
        // close the connection, so the windows are fixed and large.
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_stream_window_size(STREAM_WINDOW)
        .max_send_buf_size(1024 * 1024);
    if !config.http2_keepalive_interval.is_zero() {
        http2
            .keep_alive_interval(config.http2_keepalive_interval)
            .keep_alive_timeout(Duration::from_secs(20));
    }
    let service = TowerToHyperService::new(routes);
    let graceful = GracefulShutdown::new();
    let mut connection_set = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = draining.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let conn = http2.serve_connection(TokioIo::new(stream), service.clone());
        let conn = graceful.watch(conn);
        connection_set.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
        // Reap finished connections so the set does not grow with them.
        while connection_set.try_join_next().is_some() {}
    }
    drop(listener);
    Drain { graceful, conns: connection_set }
}

/// The connections still open when the listener closed.
pub struct Drain {
    graceful: GracefulShutdown,
    conns: JoinSet<()>,
}

/// After the calls are cancelled, how long their connections get to send
/// the final status before they are closed.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

impl Drain {
    /// Sends GOAWAY on every connection (no new calls) and waits up to
    /// `grace` for the calls in flight. Past it, `cancel` runs (it ends the
    /// gateway's own calls with a status); streams it does not own (a health
    /// watch, say) are then cut by closing their connections.
    pub async fn finish(mut self, grace: Duration, cancel: impl Future<Output = ()>) {
        let shutdown = self.graceful.shutdown();
        tokio::pin!(shutdown);
        if tokio::time::timeout(grace, &mut shutdown).await.is_err() {
            cancel.await;
            if tokio::time::timeout(FLUSH_WAIT, &mut shutdown).await.is_err() {
                tracing::info!(connections = self.conns.len(), "closing connections still open");
                self.conns.abort_all();
            }
        }
        while self.conns.join_next().await.is_some() {}
    }
}
