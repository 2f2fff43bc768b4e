//! The admin HTTP listener: `/healthz` (the process is live), `/readyz`
//! (ready for calls; 503 while starting or draining) and `/metrics`
//! (Prometheus), over HTTP/1.1 with the same connection limits as the call
//! listeners (`listener`). It reads shared state and never calls a front door.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{listener::Gate, server, telemetry::metrics::Metrics};

/// After `stop`, how long the admin requests in flight (a scrape) get.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What the admin endpoints report.
pub struct AdminState {
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
}

/// Serves until `stop` resolves, with `gate`'s limits: past
/// `max_connections` a connection is closed at once; one that has not sent
/// its request headers within `handshake_timeout` (the first request's, or
/// the next one's on a kept-alive connection) is closed. Then the listener
/// closes and the requests in flight get [`CLOSE_WAIT`] to finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    gate: Gate,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let app = router(state);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(gate.limits().handshake_timeout);
    let goaway = CancellationToken::new();
    let mut conns = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(admitted) = gate.admit() else { continue };
        let (http1, goaway) = (http1.clone(), goaway.clone());
        let service = admitted.track(TowerToHyperService::new(app.clone()));
        conns.spawn(async move {
            let conn = http1.serve_connection(TokioIo::new(stream), service);
            server::drive(conn, admitted, goaway, None).await;
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    goaway.cancel();
    let finish = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_WAIT, finish).await.is_err() {
        conns.abort_all();
    }
}
