//! The composition root. A call crosses these layers, in order:
//!
//! 1. `server` — TCP accept, HTTP/2 (TCP_NODELAY, stream limits), draining;
//!    for `http_listen`, HTTP/1.1 and h2c. Every listener has `listener`'s
//!    connection limits (max connections, handshake and idle timeouts).
//! 2. tonic routes — `grpc.health.v1.Health`, reflection v1 and v1alpha, and
//!    `llmgateway.v1.LlmGateway`, each refusing a message over
//!    `server.max_request_bytes` (`api::RequestLimit` names the limit);
//!    axum routes for the HTTP front door.
//! 3. The front doors. `api` (gRPC): proto to chat types and back, metadata
//!    to plain values, the call core's errors to gRPC statuses. `http`
//!    (OpenAI-compatible): the same for OpenAI's JSON, headers and errors,
//!    request body limits, SSE.
//! 4. `core` — the protocol-neutral call: request id, trace context and
//!    server span, deadline, auth (`authorization`), validation, the
//!    committed response stream, metrics and the log line; reads the
//!    config's keys and timeouts.
//! 5. `admission` — after auth, a ticket per call: the key's and each
//!    target's limits, the queue and the budget (local, or shared in Redis);
//!    routing asks it before every attempt, the call settles it at its end.
//! 6. `routing` — model name to targets, tried in order before the first
//!    delta; one client span and attempt metrics per upstream attempt.
//! 7. `providers` — one wire format each, HTTP/SSE to the upstream.
//!
//! Beside them: `admin` (healthz, readyz, metrics), `telemetry`, `tls`
//! (certificates reloaded for new handshakes) and `reload` (the config file
//! reloaded into `core`'s swappable snapshot: router, keys, admission).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::ServingStatus;

use crate::{
    admin::{self, AdminState},
    admission::Admission,
    api::{GatewayService, RequestLimit, pb},
    config::Config,
    core::{Core, KeyError, Keys, Live},
    http,
    listener::{Gate, Limits},
    providers::ProviderError,
    reload,
    routing::Router,
    server,
    telemetry::metrics::Metrics,
    tls::Tls,
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
    #[error("server.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("admission: {0}")]
    Admission(#[from] crate::admission::SetupError),
    #[error("{0}")]
    Keys(#[from] KeyError),
}

/// The gateway's listeners, bound before it runs so that callers (and
/// tests binding port 0) know the addresses.
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
    /// The HTTP front door, when `http_listen` is set.
    pub http: Option<TcpListener>,
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
        let http = match config.http_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| AppError::Bind {
                what: "http_listen",
                addr,
                source,
            })?),
            None => None,
        };
        Ok(Self { grpc, admin, http })
    }

    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Runs the gateway until `shutdown` resolves, then drains: health turns
/// NOT_SERVING and /readyz 503, the listeners close (gRPC and HTTP alike),
/// calls in flight get `server.shutdown_grace` to finish, and are then
/// cancelled.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    run_with(config, None, listeners, shutdown).await
}

/// What a config reload swaps in: the routes (and their providers), the
/// client keys and admission (limits, budgets, prices), built from `config`.
fn build_live(config: &Config, metrics: &Arc<Metrics>) -> Result<Live, AppError> {
    let router = Router::new(config, metrics.clone()).map_err(|(name, e)| AppError::Provider(name, e))?;
    let admission = Arc::new(Admission::new(config, metrics.clone())?);
    Ok(Live { router, keys: Keys::new(&config.api_keys)?, admission })
}

/// [`run`], reloading the config from `source` (when given) on request and
/// when the file changes.
pub async fn run_with(
    config: Config,
    source: Option<reload::Source>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::new());
    let tls = config.server.tls.as_ref().map(Tls::load).transpose()?;
    let live = build_live(&config, &metrics)?;
    if !live.keys.enabled() && !config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "auth is off: no api_keys, and anyone who can reach the listener may call every model");
    }
    live.admission.connect().await;
    let draining = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    // Counts the gateway's calls in flight, so the drain knows when the
    // cancelled ones have ended.
    let calls = TaskTracker::new();
    let core = Arc::new(Core {
        live: ArcSwap::from_pointee(live),
        metrics: metrics.clone(),
        default_timeout: config.server.default_timeout,
        max_timeout: config.server.max_timeout,
        record_content: config.telemetry.record_content,
        draining: draining.clone(),
        hard_stop: hard_stop.clone(),
        calls: calls.clone(),
    });

    // Every service refuses a message over the limit before reading it.
    let max_request = config.server.max_request_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| AppError::Reflection(e.to_string()))?
        .max_decoding_message_size(max_request);
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| AppError::Reflection(e.to_string()))?
        .max_decoding_message_size(max_request);
    let gateway = pb::llm_gateway_server::LlmGatewayServer::new(GatewayService(core.clone()))
        .max_decoding_message_size(max_request);
    let routes = tonic::service::Routes::new(health_service.max_decoding_message_size(max_request))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(gateway);
    let routes = RequestLimit::new(routes, max_request);
    let http_app = http::router(core.clone(), &config.server);

    // Each listener counts its own connections against the same limits.
    let limits = Limits::from_config(&config.server);
    let admin_state = Arc::new(AdminState { ready: false.into(), metrics: metrics.clone() });
    let admin_stop = CancellationToken::new();
    let grpc_addr = listeners.grpc_addr();
    let admin_addr = listeners.admin_addr();
    let http_addr = listeners.http_addr();
    let admin_run = {
        let stop = admin_stop.clone();
        let gate = Gate::new("admin", limits, &metrics.listeners);
        admin::serve(listeners.admin, admin_state.clone(), gate, async move { stop.cancelled().await })
    };

    let serving = async {
        health.set_serving::<pb::llm_gateway_server::LlmGatewayServer<GatewayService>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(
            grpc_addr = %grpc_addr.map(|a| a.to_string()).unwrap_or_default(),
            admin_addr = %admin_addr.map(|a| a.to_string()).unwrap_or_default(),
            http_addr = %http_addr.map(|a| a.to_string()).unwrap_or_default(),
            "serving"
        );
        let acceptor = tls.as_ref().map(|t| t.acceptor(&[b"h2"]));
        let gate = Gate::new("grpc", limits, &metrics.listeners);
        let grpc = server::serve(listeners.grpc, routes, &config.server, gate, acceptor, draining.clone());
        let http = async {
            let l = listeners.http?;
            // The HTTP front door offers both versions over TLS (ALPN).
            let acceptor = tls.as_ref().map(|t| t.acceptor(&[b"h2", b"http/1.1"]));
            let gate = Gate::new("http", limits, &metrics.listeners);
            Some(server::serve_http(l, http_app, &config.server, gate, acceptor, draining.clone()).await)
        };
        tokio::join!(grpc, http)
    };
    let signal = async {
        shutdown.await;
        tracing::info!(grace_s = config.server.shutdown_grace.as_secs_f64(), "draining");
        admin_state.ready.store(false, Ordering::Release);
        health.set_not_serving::<pb::llm_gateway_server::LlmGatewayServer<GatewayService>>().await;
        health.set_service_status("", ServingStatus::NotServing).await;
        draining.cancel();
    };

    let calls_run = async {
        let ((grpc_drain, http_drain), ()) = tokio::join!(serving, signal);
        // Run by whichever listener's grace ends first; the other waits too.
        let cancel = || async {
            if !hard_stop.is_cancelled() {
                tracing::warn!(
                    in_flight = metrics.in_flight(),
                    "grace period over: cancelling calls in flight"
                );
                hard_stop.cancel();
                calls.close();
            }
            if tokio::time::timeout(CANCEL_WAIT, calls.wait()).await.is_err() {
                tracing::warn!("calls still running after cancelling");
            }
        };
        let grace = config.server.shutdown_grace;
        let http_finish = async {
            if let Some(drain) = http_drain {
                drain.finish(grace, cancel()).await;
            }
        };
        tokio::join!(grpc_drain.finish(grace, cancel()), http_finish);
        // The last calls' settles, on their way to Redis.
        core.live.load().admission.drain(CANCEL_WAIT).await;
        admin_stop.cancel();
    };
    // New handshakes pick up renewed certificate files until the drain.
    let tls_watch = async {
        if let (Some(tls), Some(files)) = (&tls, &config.server.tls) {
            tls.clone().watch(files.reload_interval, metrics.clone(), draining.clone()).await;
        }
    };
    // Models, providers and keys follow the file until the drain; a call
    // keeps the snapshot it started with.
    let reload_watch = async {
        if let Some(source) = source {
            let apply = |c: &Config| {
                let live = build_live(c, &metrics).map_err(|e| e.to_string())?;
                core.live.store(Arc::new(live));
                Ok(())
            };
            reload::watch(source, config.server.config_reload_interval, &metrics, draining.clone(), apply)
                .await;
        }
    };
    tokio::join!(admin_run, calls_run, tls_watch, reload_watch);
    tracing::info!("stopped");
    Ok(())
}
