//! The `LlmGateway` gRPC service: authenticate, validate, route, and answer,
//! whole (`Completion`) or as a stream (`StreamCompletion`).

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::Instrument;

use super::{
    auth::Keys,
    call::Call,
    convert::{self, Collector, RequestParts},
    error::CallError,
    pb,
    stream::ResponseStream,
};
use crate::{
    routing::{Failure, FailureKind, RouteError, Routed, Router},
    telemetry::metrics::Metrics,
};

/// Largest whole answer `Completion` gathers; a stream has no such bound
/// since nothing is held.
const MAX_ANSWER: usize = 64 << 20;

/// What every call needs, shared by all of them.
pub struct Gateway {
    pub router: Router,
    pub keys: Keys,
    pub metrics: Arc<Metrics>,
    pub default_timeout: Duration,
    /// Record prompts and completions on spans (`telemetry.record_content`).
    pub record_content: bool,
    /// Set when the gateway starts draining: new calls are refused.
    pub draining: CancellationToken,
    /// Set when the grace period is over: calls in flight are cancelled.
    pub hard_stop: CancellationToken,
    /// Holds one token per call in flight (the drain waits on it).
    pub calls: TaskTracker,
}

#[derive(Clone)]
pub struct GatewayService(pub Arc<Gateway>);

impl Gateway {
    /// Everything before the first delta: auth, validation, routing. Retries
    /// and fallback happen inside `router.open`, before the commit point.
    async fn open(
        &self,
        call: &mut Call,
        metadata: &MetadataMap,
        parts: RequestParts,
    ) -> Result<Routed, CallError> {
        if self.draining.is_cancelled() {
            return Err(CallError::ShuttingDown);
        }
        let caller = self.keys.check(metadata)?;
        if let Some(name) = &caller.key_name {
            call.set_key(name);
        }
        if parts.model.is_empty() {
            return Err(CallError::invalid("model", "must name a configured model"));
        }
        if self.router.route(&parts.model).is_none() {
            return Err(CallError::ModelNotFound(parts.model));
        }
        call.set_model(&parts.model);
        if !caller.may_use(&parts.model) {
            return Err(CallError::PermissionDenied {
                key: caller.key_name.as_deref().unwrap_or("").to_owned(),
                model: parts.model,
            });
        }
        let model = parts.model.clone();
        let (request, tags) = convert::chat_request(parts)?;
        call.set_metadata(&tags);
        if self.record_content {
            call.record_prompt(&request);
        }
        let mut gate = crate::admission::Open;
        let routed =
            match self.router.open(&model, Arc::new(request), &call.trace, call.deadline, &mut gate).await {
                Ok(r) => r,
                Err(e) => {
                    // The caller learns which target failed last.
                    if let RouteError::Failed { provider, model, .. } = &e {
                        call.set_target(provider.clone(), model.clone(), None);
                    }
                    return Err(e.into());
                }
            };
        call.set_target(routed.provider.clone(), routed.model.clone(), routed.stream.attempt().ttft());
        Ok(routed)
    }

    /// Runs `fut` until it ends, the deadline passes, or the gateway stops.
    async fn bounded<T>(
        &self,
        deadline: Option<std::time::Instant>,
        fut: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        let deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.hard_stop.cancelled() => Err(CallError::ShuttingDown),
            _ = deadline => Err(CallError::DeadlineExceeded),
            r = fut => r,
        }
    }
}

#[tonic::async_trait]
impl pb::llm_gateway_server::LlmGateway for GatewayService {
    type StreamCompletionStream = ResponseStream;

    async fn completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<Response<pb::CompletionResponse>, Status> {
        let g = &self.0;
        let (metadata, _, body) = request.into_parts();
        let mut call =
            Call::start("Completion", &metadata, g.default_timeout, g.metrics.clone(), g.calls.token());
        let span = call.span.clone();
        let deadline = call.deadline;
        async move {
            let result = g
                .bounded(deadline, async {
                    let routed = g.open(&mut call, &metadata, body.into()).await?;
                    let mut collector = Collector::default();
                    let mut stream = routed.stream;
                    while let Some(delta) = stream.next().await {
                        call.delta();
                        let delta = delta.map_err(CallError::MidStream)?;
                        call.record_output(&delta.content);
                        collector.push(delta);
                        if collector.size() > MAX_ANSWER {
                            return Err(CallError::MidStream(Failure {
                                kind: FailureKind::Malformed,
                                status: None,
                                message: format!("the answer passed {MAX_ANSWER} bytes"),
                                retry_after: None,
                            }));
                        }
                        if collector.finish.is_some() {
                            break;
                        }
                    }
                    Ok(collector)
                })
                .await;
            match result {
                Ok(c) => {
                    let finish = c.finish.unwrap_or_default();
                    call.finished(finish);
                    let tool_calls =
                        c.tool_calls.into_iter().filter(|t| !t.name.is_empty() || !t.id.is_empty()).collect();
                    let mut response = Response::new(pb::CompletionResponse {
                        id: c.id.unwrap_or_else(|| call.request_id.to_str().unwrap_or("").to_owned()),
                        model: call.upstream_model().map(|m| m.to_string()).unwrap_or_default(),
                        provider: call.provider().map(|p| p.to_string()).unwrap_or_default(),
                        content: c.content,
                        tool_calls,
                        finish_reason: convert::finish_reason(finish.reason) as i32,
                        usage: Some(convert::usage(finish.usage)),
                    });
                    call.headers(response.metadata_mut());
                    Ok(response)
                }
                Err(e) => Err(call.status(e)),
            }
        }
        .instrument(span)
        .await
    }

    async fn stream_completion(
        &self,
        request: Request<pb::StreamCompletionRequest>,
    ) -> Result<Response<Self::StreamCompletionStream>, Status> {
        let g = &self.0;
        let (metadata, _, body) = request.into_parts();
        let mut call =
            Call::start("StreamCompletion", &metadata, g.default_timeout, g.metrics.clone(), g.calls.token());
        let span = call.span.clone();
        let deadline = call.deadline;
        let opened = g.bounded(deadline, g.open(&mut call, &metadata, body.into())).instrument(span).await;
        match opened {
            Ok(routed) => {
                // A token of its own, so the stream's polls never touch the
                // shared token's waiter list.
                let shutdown = g.hard_stop.child_token().cancelled_owned().boxed();
                let mut md = MetadataMap::new();
                call.headers(&mut md);
                let mut response = Response::new(ResponseStream::new(call, routed.stream, shutdown));
                *response.metadata_mut() = md;
                Ok(response)
            }
            Err(e) => Err(call.status(e)),
        }
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let g = &self.0;
        let mut call = Call::start(
            "ListModels",
            request.metadata(),
            g.default_timeout,
            g.metrics.clone(),
            g.calls.token(),
        );
        let caller = match g.keys.check(request.metadata()) {
            Ok(c) => c,
            Err(e) => return Err(call.status(e)),
        };
        if let Some(name) = &caller.key_name {
            call.set_key(name);
        }
        let mut models: Vec<pb::Model> = g
            .router
            .models()
            .filter(|(name, _)| caller.may_use(name))
            .map(|(name, route)| pb::Model {
                name: name.clone(),
                targets: route
                    .targets
                    .iter()
                    .map(|t| pb::ModelTarget {
                        provider: t.provider_name.to_string(),
                        model: t.model.to_string(),
                    })
                    .collect(),
            })
            .collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        call.succeeded();
        let mut response = Response::new(pb::ListModelsResponse { models });
        call.headers(response.metadata_mut());
        Ok(response)
    }
}
