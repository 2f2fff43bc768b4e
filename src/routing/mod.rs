//! Between `api/` and `providers/`: which upstream serves a model, and what
//! happens when one fails. A call is retried on the next target only before
//! its first delta reaches the caller (the commit point); after that a failure
//! ends the stream. Breakers, retries and limits slot in here.

mod attempt;

use std::{collections::HashMap, sync::Arc, time::Instant};

use futures_util::StreamExt;
use thiserror::Error;
use tracing::Instrument;

pub use attempt::{Attempt, RoutedStream};

use crate::{
    chat::{ChatRequest, Delta},
    config::Config,
    providers::{self, Provider, ProviderError, UpstreamCall},
    telemetry::{self, metrics::Metrics},
};

/// One provider and upstream model that can serve a model name.
pub struct Target {
    pub provider_name: Arc<str>,
    pub provider: Arc<dyn Provider>,
    pub model: Arc<str>,
}

pub struct Route {
    pub targets: Vec<Target>,
}

#[derive(Debug, Error)]
pub enum RouteError {
    #[error("model {0:?} is not configured")]
    UnknownModel(String),
    /// Every target tried failed (a non-retryable failure stops the
    /// tries); the last failure is kept, it decides the status.
    #[error("{attempts} target(s) tried, all failed; last: {last}")]
    Exhausted { attempts: usize, provider: Arc<str>, model: Arc<str>, last: ProviderError },
}

/// Reads until the first delta that carries text, a tool call or the end,
/// folding the id and model of empty ones (role chunks, message_start) into it.
async fn first_delta(stream: &mut providers::DeltaStream) -> Option<Result<Delta, ProviderError>> {
    let mut id = None;
    let mut model = None;
    loop {
        match stream.next().await? {
            Ok(mut d) => {
                if d.content.is_empty() && d.tool_calls.is_empty() && d.finish.is_none() {
                    id = id.or(d.id);
                    model = model.or(d.model);
                    continue;
                }
                d.id = d.id.or(id);
                d.model = d.model.or(model);
                return Some(Ok(d));
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

pub struct Router {
    routes: HashMap<String, Route>,
    metrics: Arc<Metrics>,
}

/// The committed call: which target answers, and its deltas (the first one
/// already received).
pub struct Routed {
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub stream: RoutedStream,
}

impl Router {
    /// Builds every provider of the config and the routes that use them.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Self, (String, ProviderError)> {
        let mut providers: HashMap<&str, Arc<dyn Provider>> = HashMap::new();
        for (name, p) in &config.providers {
            let mut p = p.clone();
            if p.base_url.is_empty() {
                p.base_url = crate::config::default_base_url(p.kind).to_owned();
            }
            let built = providers::build(name, &p).map_err(|e| (name.clone(), e))?;
            providers.insert(name.as_str(), built);
        }
        let mut routes = HashMap::new();
        for (name, m) in &config.models {
            let mut targets = Vec::with_capacity(m.targets.len());
            for t in &m.targets {
                let Some(provider) = providers.get(t.provider.as_str()) else {
                    return Err((t.provider.clone(), ProviderError::Setup("no such provider".into())));
                };
                targets.push(Target {
                    provider_name: t.provider.as_str().into(),
                    provider: provider.clone(),
                    model: t.model.as_str().into(),
                });
            }
            routes.insert(name.clone(), Route { targets });
        }
        Ok(Self { routes, metrics })
    }

    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes.get(model)
    }

    pub fn models(&self) -> impl Iterator<Item = (&String, &Route)> {
        self.routes.iter()
    }

    /// One target: sends the request and waits for its first delta.
    async fn attempt(
        &self,
        target: &Target,
        request: &Arc<ChatRequest>,
        trace: &telemetry::TraceContext,
    ) -> Result<Routed, ProviderError> {
        let mut attempt = Attempt::start(target, request, self.metrics.clone());
        let call = UpstreamCall {
            request: request.clone(),
            model: target.model.to_string(),
            headers: trace.headers_for(attempt.span()),
        };
        let started = Instant::now();
        let opened = async {
            let mut stream = target.provider.stream(call).await?;
            // The first delta with something in it is the commit point: a
            // failure before it (an overloaded error right after Anthropic's
            // message_start, say) may still go to the next target.
            match first_delta(&mut stream).await {
                Some(Ok(first)) => Ok((first, stream)),
                Some(Err(e)) => Err(e),
                None => Err(ProviderError::Stream("upstream sent an empty stream".into())),
            }
        }
        .instrument(attempt.span().clone())
        .await;
        match opened {
            Ok((first, stream)) => {
                attempt.first_token(started.elapsed(), &first);
                Ok(Routed {
                    provider: target.provider_name.clone(),
                    model: first.model.as_deref().map(Arc::from).unwrap_or_else(|| target.model.clone()),
                    stream: RoutedStream::new(first, stream, attempt),
                })
            }
            Err(e) => {
                attempt.fail(&e);
                Err(e)
            }
        }
    }

    /// Opens the call: tries each target in order until one yields its first
    /// delta. Dropping the returned future aborts the attempt under way.
    pub async fn open(
        &self,
        model: &str,
        request: Arc<ChatRequest>,
        trace: &telemetry::TraceContext,
    ) -> Result<Routed, RouteError> {
        let route = self.routes.get(model).ok_or_else(|| RouteError::UnknownModel(model.to_owned()))?;
        let mut last = None;
        let mut attempts = 0;
        for target in &route.targets {
            attempts += 1;
            match self.attempt(target, &request, trace).await {
                Ok(routed) => return Ok(routed),
                Err(e) => {
                    let retry = e.retryable();
                    last = Some((target, e));
                    if !retry {
                        break;
                    }
                }
            }
        }
        match last {
            Some((target, last)) => Err(RouteError::Exhausted {
                attempts,
                provider: target.provider_name.clone(),
                model: target.model.clone(),
                last,
            }),
            None => Err(RouteError::UnknownModel(model.to_owned())),
        }
    }
}
