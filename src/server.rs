//! The listeners. gRPC: accepts HTTP/2 connections and serves the routes on
//! them, with TCP_NODELAY and bounded streams per connection. We drive hyper
//! directly rather than tonic's `Server` so that deadlines are ours to
//! enforce (tonic's own `grpc-timeout` handling answers CANCELLED where the
//! contract wants DEADLINE_EXCEEDED) and so that draining, connection
//! ageing and the connection limits (`listener`) are explicit. The HTTP
//! front door: HTTP/1.1 (keep-alive) and h2c (or, over TLS, either by ALPN)
//! on one port, with the same limits; it drains and ages its connections
//! the same way. Each HTTP/2 stream runs under [`StreamExec`] (on its
//! connection's task or on one of its own: `streams`), under the call's
//! deadline watchdog (`watchdog`), and so does each HTTP front door
//! connection (HTTP/1.1 serves one call at a time on it), so that a caller
//! that stops reading cannot hold a call past its deadline.

use std::{fmt::Display, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulConnection},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::ServerConfig,
    listener::{Admitted, Expiry, Gate},
    streams::{self, StreamExec},
    tls::{Stream, TlsAcceptor},
    watchdog,
};

const CONNECTION_WINDOW: u32 = 8 << 20;
const STREAM_WINDOW: u32 = 1 << 20;

/// Serves `routes` on `listener` (over TLS with `tls`) until `draining`
/// fires; then closes the listener (new connections are refused) and
/// returns the handle that finishes the open connections gracefully.
/// `gate` admits the connections (`server.max_connections`, handshake and
/// idle timeouts).
pub async fn serve<S>(
    listener: TcpListener,
    routes: S,
    config: &ServerConfig,
    gate: Gate,
    tls: Option<TlsAcceptor>,
    draining: CancellationToken,
) -> Drain
where
    S: tonic::codegen::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Unpin
        + 'static,
    S::Future: Send + Unpin + 'static,
{
    let exec = StreamExec::new();
    let mut http2 = hyper::server::conn::http2::Builder::new(exec.clone());
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
    let max_age = MaxAge::from_config(config);
    let tls = tls.map(std::sync::Arc::new);
    let service = TowerToHyperService::new(routes);
    let goaway = CancellationToken::new();
    let mut connection_set = JoinSet::new();
    while let Some(stream) = accept(&listener, &draining).await {
        let Some(admitted) = gate.admit() else {
            // Refused: closed at once, and counted by the gate.
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let (http2, service, goaway, tls) = (http2.clone(), service.clone(), goaway.clone(), tls.clone());
        connection_set.spawn(async move {
            // The handshake runs in the connection's task, so a slow client
            // never holds up the accept loop.
            let stream = match tls {
                None => Stream::Plain(stream),
                Some(tls) => match tls.accept(stream, admitted.handshake_deadline()).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                },
            };
            let conn = http2.serve_connection(TokioIo::new(stream), admitted.track(service));
            streams::on_connection(drive(conn, admitted, goaway, max_age)).await;
        });
        // Reap finished connections so the set does not grow with them.
        while connection_set.try_join_next().is_some() {}
    }
    drop(listener);
    Drain { goaway, conns: connection_set, streams: exec.streams }
}

/// Serves the HTTP front door's `app` on `listener` (over TLS with `tls`)
/// until `draining` fires, as [`serve`] does for gRPC, with `gate`'s
/// limits. On HTTP/1.1 a connection whose next request's headers take
/// longer than `server.handshake_timeout` is closed too (an idle keep-alive
/// one included).
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    config: &ServerConfig,
    gate: Gate,
    tls: Option<TlsAcceptor>,
    draining: CancellationToken,
) -> Drain {
    let exec = StreamExec::new();
    let mut builder = auto::Builder::new(exec.clone());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(config.handshake_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(config.max_concurrent_streams);
    if !config.http2_keepalive_interval.is_zero() {
        builder
            .http2()
            .keep_alive_interval(config.http2_keepalive_interval)
            .keep_alive_timeout(Duration::from_secs(20));
    }
    let max_age = MaxAge::from_config(config);
    let tls = tls.map(Arc::new);
    let service = TowerToHyperService::new(app);
    let goaway = CancellationToken::new();
    let mut connection_set = JoinSet::new();
    while let Some(stream) = accept(&listener, &draining).await {
        let Some(admitted) = gate.admit() else { continue };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let (builder, service, goaway, tls) = (builder.clone(), service.clone(), goaway.clone(), tls.clone());
        connection_set.spawn(async move {
            let stream = match tls {
                None => Stream::Plain(stream),
                Some(tls) => match tls.accept(stream, admitted.handshake_deadline()).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                },
            };
            let conn = builder.serve_connection(TokioIo::new(stream), admitted.track(service));
            // An HTTP/1.1 call runs on the connection's task: its deadline
            // is watched here (an HTTP/2 one arms its stream's task instead,
            // never this one).
            streams::on_connection(watchdog::guard(drive(conn, admitted, goaway, max_age))).await;
        });
        while connection_set.try_join_next().is_some() {}
    }
    drop(listener);
    Drain { goaway, conns: connection_set, streams: exec.streams }
}

/// `server.max_connection_age` and its grace: a connection is sent GOAWAY at
/// that age, so that its client reconnects and a load balancer that spreads
/// connections (a Kubernetes Service) spreads the calls again.
#[derive(Debug, Clone, Copy)]
pub struct MaxAge {
    pub age: Duration,
    pub grace: Duration,
}

impl MaxAge {
    /// None when `server.max_connection_age` is 0 (off).
    pub fn from_config(config: &ServerConfig) -> Option<Self> {
        (!config.max_connection_age.is_zero())
            .then_some(Self { age: config.max_connection_age, grace: config.max_connection_age_grace })
    }

    /// The age of one connection: ±10% of the configured one, so that the
    /// clients connected together (after a rollout, say) do not all
    /// reconnect together.
    fn jittered(&self) -> Duration {
        self.age.mul_f64(0.9 + 0.2 * fastrand::f64())
    }
}

/// How one connection came to be told GOAWAY.
enum Ending {
    /// The listener drains: [`Drain::finish`] bounds the rest.
    Draining,
    /// Its max age: closed once the grace is over.
    Aged(Duration),
    /// Idle: nothing in flight, so it should close at once.
    Idle,
}

/// Runs one connection to its end. When `goaway` fires (the listener drains),
/// the connection reaches its max age or it has been idle for
/// `server.idle_timeout`, it is sent a graceful GOAWAY: no new calls, the
/// calls in flight finish. An aged connection is closed once its grace is
/// over; a draining one is left to [`Drain::finish`]. One that has sent no
/// request by `server.handshake_timeout` is closed. `admitted` counts the
/// connection open until this returns. Any listener can drive its
/// connections with this (HTTP/1 ones included).
pub async fn drive<C>(conn: C, admitted: Admitted, goaway: CancellationToken, max_age: Option<MaxAge>)
where
    C: GracefulConnection,
    C::Error: Display,
{
    tokio::pin!(conn);
    let aged = async {
        match max_age {
            Some(m) => tokio::time::sleep(m.jittered()).await,
            None => std::future::pending().await,
        }
    };
    let ending = tokio::select! {
        r = conn.as_mut() => return log_end(r),
        _ = goaway.cancelled() => Ending::Draining,
        _ = aged => Ending::Aged(max_age.map_or(Duration::ZERO, |m| m.grace)),
        expiry = admitted.expired() => match expiry {
            Expiry::Handshake => {
                // Dropping the connection closes it.
                tracing::debug!("closing a connection with no request within server.handshake_timeout");
                return;
            }
            Expiry::Idle => Ending::Idle,
        },
    };
    conn.as_mut().graceful_shutdown();
    match ending {
        Ending::Draining => log_end(conn.await),
        Ending::Aged(grace) => match tokio::time::timeout(grace, conn.as_mut()).await {
            Ok(r) => log_end(r),
            // Dropping the connection closes it and cancels its calls.
            Err(_) => {
                tracing::debug!(grace_s = grace.as_secs_f64(), "closing a connection past its max age grace")
            }
        },
        Ending::Idle => {
            // A client that does not read (so the GOAWAY cannot be flushed)
            // or does not close gets as long to go as it had to arrive;
            // a call that slipped in before the GOAWAY runs to its end
            // (its deadline is watched).
            let wait = admitted.limits().handshake_timeout;
            loop {
                match tokio::time::timeout(wait, conn.as_mut()).await {
                    Ok(r) => return log_end(r),
                    Err(_) if admitted.in_flight() == 0 => {
                        tracing::debug!("closing an idle connection that did not close after GOAWAY");
                        return;
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

fn log_end<E: Display>(result: Result<(), E>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The connections still open when the listener closed, and their streams.
pub struct Drain {
    goaway: CancellationToken,
    conns: JoinSet<()>,
    streams: TaskTracker,
}

/// After the calls are cancelled, how long their connections get to send
/// the final status before they are closed.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

impl Drain {
    /// Sends GOAWAY on every connection (no new calls) and waits up to
    /// `grace` for the calls in flight. Past it, `cancel` runs (it ends the
    /// gateway's own calls with a status) and, at the same time, the
    /// connections still open [`FLUSH_WAIT`] later are closed: streams the
    /// gateway does not own (a health watch) and responses nobody reads (a
    /// caller that stopped reading, whose call cannot end by itself) are
    /// reset with them, and their upstream requests dropped.
    pub async fn finish(mut self, grace: Duration, cancel: impl Future<Output = ()>) {
        self.goaway.cancel();
        if tokio::time::timeout(grace, join_all(&mut self.conns)).await.is_err() {
            let close = async {
                if tokio::time::timeout(FLUSH_WAIT, join_all(&mut self.conns)).await.is_err() {
                    tracing::info!(connections = self.conns.len(), "closing connections still open");
                    self.conns.abort_all();
                }
            };
            tokio::join!(cancel, close);
        }
        join_all(&mut self.conns).await;
        // A closed connection ends its streams' tasks; they go at once.
        self.streams.close();
        if tokio::time::timeout(FLUSH_WAIT, self.streams.wait()).await.is_err() {
            tracing::warn!(
                streams = self.streams.len(),
                "stream tasks still running after their connections closed"
            );
        }
    }
}

async fn join_all(set: &mut JoinSet<()>) {
    while set.join_next().await.is_some() {}
}

/// The next connection, or None once `draining` fires. A failed accept (out
/// of descriptors and the like) backs off instead of spinning.
pub(crate) async fn accept(
    listener: &TcpListener,
    draining: &CancellationToken,
) -> Option<tokio::net::TcpStream> {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = draining.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => return Some(stream),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
