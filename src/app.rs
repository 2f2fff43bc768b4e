//! The composition root. A call crosses these layers, in order:
//!
//! 1. `server` — TCP accept, HTTP/2 (TCP_NODELAY, stream limits), draining.
//! 2. tonic routes — `grpc.health.v1.Health`, reflection v1 and v1alpha, and
//!    `llmgateway.v1.LlmGateway`.
//! 3. `api` — the gRPC front door: proto to chat types and back, metadata
//!    to plain values, the call core's errors to gRPC statuses.
//! 4. `core` — the protocol-neutral call: request id, trace context and
//!    server span, deadline, auth (`authorization`), validation, the
//!    committed response stream, metrics and the log line; reads the
//!    config's keys and timeouts.
//! 5. `routing` — model name to targets, tried in order before the first
//!    delta; one client span and attempt metrics per upstream attempt.
//! 6. `providers` — one wire format each, HTTP/SSE to the upstream.
//!
//! Beside them: `admin` (healthz, readyz, metrics) and `telemetry`.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::ServingStatus;

use crate::{
    admin::{self, AdminState},
    api::{GatewayService, pb},
    config::Config,
    core::{Core, KeyError, Keys},
    providers::ProviderError,
    routing::Router,
    server,
    telemetry::metrics::Metrics,
};

/// How long cancelled calls get to end after the grace period.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("provider {0:?}: {1}")]
    Provider(String, ProviderError),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("admin listener: {0}")]
    Admin(std::io::Error),
    #[error("{0}")]
    Keys(#[from] KeyError),
}

/// The gateway's two listeners, bound before it runs so that callers (and
/// tests binding port 0) know the addresses.
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Self, AppError> {
        let grpc = TcpListener::bind(config.listen).await.map_err(|source| AppError::Bind {
            what: "listen",
            addr: config.listen,
            source,
        })?;
        let admin = TcpListener::bind(config.admin_listen).await.map_err(|source| AppError::Bind {
            what: "admin_listen",
            addr: config.admin_listen,
            source,
        })?;
        Ok(Self { grpc, admin })
    }

    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }
}

/// Runs the gateway until `shutdown` resolves, then drains: health turns
/// NOT_SERVING and /readyz 503, the listener closes, calls in flight get
/// `server.shutdown_grace` to finish, and are then cancelled.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::new());
    let router = Router::new(&config, metrics.clone()).map_err(|(name, e)| AppError::Provider(name, e))?;
    let draining = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    // Counts the gateway's calls in flight, so the drain knows when the
    // cancelled ones have ended.
    let calls = TaskTracker::new();
    let keys = Keys::new(&config.api_keys)?;
    if !keys.enabled() && !config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "auth is off: no api_keys, and anyone who can reach the listener may call every model");
    }
    let core = Arc::new(Core {
        router,
        keys,
        metrics: metrics.clone(),
        default_timeout: config.server.default_timeout,
        max_timeout: config.server.max_timeout,
        record_content: config.telemetry.record_content,
        draining: draining.clone(),
        hard_stop: hard_stop.clone(),
        calls: calls.clone(),
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| AppError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| AppError::Reflection(e.to_string()))?;
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::llm_gateway_server::LlmGatewayServer::new(GatewayService(core)));

    let admin_state = Arc::new(AdminState { ready: false.into(), metrics: metrics.clone() });
    let admin_stop = CancellationToken::new();
    let grpc_addr = listeners.grpc_addr();
    let admin_addr = listeners.admin_addr();
    let admin_run = {
        let stop = admin_stop.clone();
        admin::serve(listeners.admin, admin_state.clone(), async move { stop.cancelled().await })
    };

    let serving = async {
        health.set_serving::<pb::llm_gateway_server::LlmGatewayServer<GatewayService>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(
            grpc_addr = %grpc_addr.map(|a| a.to_string()).unwrap_or_default(),
            admin_addr = %admin_addr.map(|a| a.to_string()).unwrap_or_default(),
            "serving"
        );
        server::serve(listeners.grpc, routes, &config.server, draining.clone()).await
    };
    let signal = async {
        shutdown.await;
        tracing::info!(grace_s = config.server.shutdown_grace.as_secs_f64(), "draining");
        admin_state.ready.store(false, Ordering::Release);
        health.set_not_serving::<pb::llm_gateway_server::LlmGatewayServer<GatewayService>>().await;
        health.set_service_status("", ServingStatus::NotServing).await;
        draining.cancel();
    };

    let grpc_run = async {
        let (drain, ()) = tokio::join!(serving, signal);
        let cancel = async {
            tracing::warn!(in_flight = metrics.in_flight(), "grace period over: cancelling calls in flight");
            hard_stop.cancel();
            calls.close();
            if tokio::time::timeout(CANCEL_WAIT, calls.wait()).await.is_err() {
                tracing::warn!("calls still running after cancelling");
            }
        };
        drain.finish(config.server.shutdown_grace, cancel).await;
        admin_stop.cancel();
    };
    let (admin_result, ()) = tokio::join!(admin_run, grpc_run);
    admin_result.map_err(AppError::Admin)?;
    tracing::info!("stopped");
    Ok(())
}
