//! A call up to its commit point, the first delta: refused while draining,
//! auth, the model's name, validation, then routing (retries and fallback
//! happen inside `router.open`). Then either the committed stream
//! ([`Core::commit`]) or the whole answer ([`Core::complete`]), and the model
//! list. Everything runs within the call's deadline and the hard stop.

use std::{collections::HashMap, sync::Arc};

use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    Core,
    call::Call,
    collect::{Answer, Collector},
    error::CallError,
    stream::CallStream,
};
use crate::{
    admission::estimate,
    chat::ChatRequest,
    routing::{Failure, FailureKind, RouteError, Routed},
};

/// Largest whole answer a unary call gathers; a stream has no such bound
/// since nothing is held.
const MAX_ANSWER: usize = 64 << 20;

/// A request as a front door received it: the model it names, and its
/// translation into a checked [`ChatRequest`]. The core asks for the
/// translation only once the caller may use the model, so that an unknown
/// model or a refused key is reported before any field.
pub trait WireRequest {
    fn model(&self) -> &str;
    fn into_chat(self) -> Result<Validated, CallError>;
}

/// A request translated and checked.
pub struct Validated {
    pub request: ChatRequest,
    /// The caller's tags, recorded on the trace.
    pub tags: HashMap<String, String>,
}

/// A model a caller may use.
pub struct ModelInfo {
    pub name: String,
    /// (provider, upstream model), in the order tried.
    pub targets: Vec<(Arc<str>, Arc<str>)>,
}

impl Core {
    /// Everything before the first delta.
    /// `unary`: the caller wants the answer whole (a provider with a unary
    /// endpoint of its own may use it).
    async fn open(
        &self,
        call: &mut Call,
        authorization: Option<&str>,
        request: impl WireRequest,
        unary: bool,
    ) -> Result<Routed, CallError> {
        if self.draining.is_cancelled() {
            return Err(CallError::ShuttingDown);
        }
        // The call's one look at the reloadable config: it keeps this
        // snapshot however the config changes while it runs.
        let live = self.live.load_full();
        let caller = live.keys.check(authorization)?;
        if let Some(name) = &caller.key_name {
            call.set_key(name);
        }
        let model = request.model();
        if model.is_empty() {
            return Err(CallError::invalid("model", "must name a configured model"));
        }
        if live.router.route(model).is_none() {
            return Err(CallError::ModelNotFound(model.to_owned()));
        }
        call.set_model(model);
        if !caller.may_use(model) {
            return Err(CallError::PermissionDenied {
                key: caller.key_name.as_deref().unwrap_or("").to_owned(),
                model: model.to_owned(),
            });
        }
        let model = model.to_owned();
        let Validated { mut request, tags } = request.into_chat()?;
        request.unary = unary;
        call.set_metadata(&tags);
        if self.record_content {
            call.record_prompt(&request);
        }
        // The call's admission: routing reserves through it before every
        // attempt; the call keeps it to its end, and settles it then.
        let mut ticket = live.admission.ticket(
            caller.key_name.as_deref(),
            estimate::input_tokens(&request),
            request.max_tokens,
        );
        let opened =
            live.router.open(&model, Arc::new(request), &call.trace, call.deadline, &mut ticket).await;
        call.set_queue_wait(ticket.waited());
        let routed = match opened {
            Ok(r) => r,
            Err(e) => {
                // No upstream answered: the reservations all come back.
                ticket.settle(Some(Default::default()), 0);
                // The caller learns which target failed last.
                if let RouteError::Failed { provider, model, .. } = &e {
                    call.set_target(provider.clone(), model.clone(), None);
                }
                return Err(e.into());
            }
        };
        call.set_target(routed.provider.clone(), routed.model.clone(), routed.stream.attempt().ttft());
        call.set_ticket(ticket);
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

    /// Opens a streamed call up to its first delta; [`Core::commit`] turns
    /// the result into the answer stream.
    pub async fn open_stream(
        &self,
        call: &mut Call,
        authorization: Option<&str>,
        request: impl WireRequest,
    ) -> Result<Routed, CallError> {
        let span = call.span.clone();
        let deadline = call.deadline;
        self.bounded(deadline, self.open(call, authorization, request, false)).instrument(span).await
    }

    /// The committed call as a stream of deltas, watching the deadline and
    /// the hard stop.
    pub fn commit(&self, call: Call, routed: Routed) -> CallStream {
        // A token of its own, so the stream's polls never touch the shared
        // token's waiter list.
        let shutdown = self.hard_stop.child_token().cancelled_owned().boxed();
        CallStream::new(call, routed.stream, shutdown)
    }

    /// A unary call: the whole answer, gathered from the stream.
    pub async fn complete(
        &self,
        call: &mut Call,
        authorization: Option<&str>,
        request: impl WireRequest,
    ) -> Result<Answer, CallError> {
        let span = call.span.clone();
        let deadline = call.deadline;
        let collected = self
            .bounded(deadline, async {
                let routed = self.open(call, authorization, request, true).await?;
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
                            field: None,
                        }));
                    }
                    if collector.finish.is_some() {
                        break;
                    }
                }
                Ok(collector)
            })
            .instrument(span)
            .await?;
        let mut answer = collected.answer(&call.request_id);
        answer.finish = call.finished(answer.finish);
        answer.cost_usd = call.cost_usd();
        Ok(answer)
    }

    /// The models the caller may use, by name.
    pub fn models(&self, call: &mut Call, authorization: Option<&str>) -> Result<Vec<ModelInfo>, CallError> {
        let live = self.live.load();
        let caller = live.keys.check(authorization)?;
        if let Some(name) = &caller.key_name {
            call.set_key(name);
        }
        let mut models: Vec<ModelInfo> = live
            .router
            .models()
            .filter(|(name, _)| caller.may_use(name))
            .map(|(name, route)| ModelInfo {
                name: name.clone(),
                targets: route.targets.iter().map(|t| (t.provider_name.clone(), t.model.clone())).collect(),
            })
            .collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        call.succeeded();
        Ok(models)
    }
}
