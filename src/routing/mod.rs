//! Between the call core and `providers/`: which upstream serves a model,
//! and what happens when one fails. A call is retried, falls back or is
//! hedged only before its first delta reaches the caller (the commit point);
//! after that a failure ends the stream. Breakers, cool-downs, strategies and
//! admission's per-target gate are consulted before every attempt.

mod attempt;
mod failure;
mod health;
mod strategy;

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::time::Instant;
use tracing::Instrument;

pub use attempt::{Attempt, RoutedStream};
pub use failure::{Failure, FailureKind, RouteError};
pub use health::CircuitState;

use self::health::{Admit, Health, Transition};
use crate::{
    admission::{Gate, Refusal, Scope},
    chat::{ChatRequest, Delta},
    config::{Config, RetryConfig, Strategy},
    providers::{self, Provider, ProviderError, UpstreamCall},
    telemetry::{self, metrics::Metrics},
};

/// The bound on a whole (unary) answer beside the call's deadline.
const MAX_WHOLE_ANSWER: Duration = Duration::from_secs(24 * 3600);

/// A 429 with no hint of how long to wait keeps its target out this long.
const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(1);

/// One provider and upstream model that can serve a model name.
pub struct Target {
    pub provider_name: Arc<str>,
    pub provider: Arc<dyn Provider>,
    pub model: Arc<str>,
    pub weight: u32,
    health: Arc<Health>,
    retry: RetryConfig,
    first_token: Duration,
}

impl Target {
    pub fn circuit(&self) -> CircuitState {
        self.health.circuit()
    }
}

pub struct Route {
    pub targets: Vec<Target>,
    strategy: Strategy,
    hedge_after: Option<Duration>,
}

/// Reads until the first delta that carries text, a tool call or the end,
/// folding the id and model of empty ones (role chunks, message_start) into it.
async fn first_delta(stream: &mut providers::DeltaStream) -> Option<Result<Delta, ProviderError>> {
    let mut id = None;
    let mut model = None;
    loop {
        match stream.next().await? {
            Ok(mut d) => {
                if !d.has_output() && d.finish.is_none() {
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

/// A breaker changed state: the gauge, a counter and a span event.
fn transitioned(metrics: &Metrics, provider: &str, model: &str, (from, to): Transition) {
    metrics.routing.circuit(provider, model, from.as_str(), to.as_str(), to.gauge());
    tracing::info!(
        target: telemetry::SPAN_EVENT,
        provider,
        model,
        from = from.as_str(),
        to = to.as_str(),
        "llm_gateway.circuit"
    );
    tracing::warn!(provider, model, from = from.as_str(), to = to.as_str(), "circuit breaker changed state");
}

/// One call's progress through its targets: what is left to try and what
/// the tries so far have taught.
struct Plan {
    order: Vec<usize>,
    /// Attempts left per target (indexed like `route.targets`).
    left: Vec<u32>,
    /// Failed tries per target, for the backoff's exponent.
    failed: Vec<u32>,
    in_flight: Vec<bool>,
    attempts: u32,
    last: Option<(usize, Failure)>,
    /// Earliest time a skipped target becomes available again.
    skipped_open: Option<Option<Instant>>,
    skipped_cooling: Option<Instant>,
    refused: Option<Refusal>,
}

impl Plan {
    fn note_open(&mut self, until: Option<Instant>) {
        self.skipped_open = Some(match (self.skipped_open.flatten(), until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        });
    }

    fn note_cooling(&mut self, until: Instant) {
        self.skipped_cooling = Some(self.skipped_cooling.map_or(until, |u| u.min(until)));
    }
}

/// One attempt's record on the call's span, written however it ends: a
/// hedge's loser or an attempt cut by the caller is "aborted".
struct AttemptEvent<'a> {
    target: &'a Target,
    call_span: tracing::Span,
    backoff: Duration,
    hedge: bool,
    started: Instant,
    outcome: &'static str,
}

impl<'a> AttemptEvent<'a> {
    fn new(target: &'a Target, backoff: Duration, hedge: bool) -> Self {
        Self {
            target,
            call_span: tracing::Span::current(),
            backoff,
            hedge,
            started: Instant::now(),
            outcome: "aborted",
        }
    }
}

impl Drop for AttemptEvent<'_> {
    fn drop(&mut self) {
        tracing::info!(
            target: telemetry::SPAN_EVENT,
            parent: &self.call_span,
            provider = &*self.target.provider_name,
            model = &*self.target.model,
            outcome = self.outcome,
            duration_ms = self.started.elapsed().as_secs_f64() * 1e3,
            backoff_ms = self.backoff.as_secs_f64() * 1e3,
            hedge = self.hedge,
            "llm_gateway.attempt"
        );
    }
}

/// What every attempt of one call shares.
#[derive(Clone, Copy)]
struct CallParts<'a> {
    request: &'a Arc<ChatRequest>,
    trace: &'a telemetry::TraceContext,
    deadline: Option<Instant>,
}

type AttemptFuture<'a> = Pin<Box<dyn Future<Output = (usize, Result<Routed, Failure>)> + Send + 'a>>;

impl Router {
    /// Builds every provider of the config and the routes that use them.
    /// Targets naming the same provider and model share their health.
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
        let mut health: HashMap<(&str, &str), Arc<Health>> = HashMap::new();
        let mut routes = HashMap::new();
        for (name, m) in &config.models {
            let mut targets = Vec::with_capacity(m.targets.len());
            for t in &m.targets {
                let (Some(provider), Some(pc)) =
                    (providers.get(t.provider.as_str()), config.providers.get(&t.provider))
                else {
                    return Err((t.provider.clone(), ProviderError::Setup("no such provider".into())));
                };
                let h = health
                    .entry((t.provider.as_str(), t.model.as_str()))
                    .or_insert_with(|| {
                        metrics.routing.circuit_state(&t.provider, &t.model, CircuitState::Closed.gauge());
                        Health::new(pc.circuit_breaker.clone())
                    })
                    .clone();
                targets.push(Target {
                    provider_name: t.provider.as_str().into(),
                    provider: provider.clone(),
                    model: t.model.as_str().into(),
                    weight: t.weight,
                    health: h,
                    retry: pc.retry.clone(),
                    first_token: pc.timeouts.first_token,
                });
            }
            routes.insert(name.clone(), Route { targets, strategy: m.strategy, hedge_after: m.hedge_after });
        }
        Ok(Self { routes, metrics })
    }

    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes.get(model)
    }

    pub fn models(&self) -> impl Iterator<Item = (&String, &Route)> {
        self.routes.iter()
    }

    /// One try on one target: the backoff, then the request, then its first
    /// delta within `timeouts.first_token`. Dropping it aborts the upstream
    /// request (its connection is closed).
    async fn attempt(
        &self,
        target: &Target,
        request: &Arc<ChatRequest>,
        trace: &telemetry::TraceContext,
        probe: bool,
    ) -> Result<Routed, Failure> {
        let mut attempt = Attempt::start(target, request, self.metrics.clone(), probe);
        let call = UpstreamCall {
            request: request.clone(),
            model: target.model.to_string(),
            headers: trace.headers_for(attempt.span()),
        };
        let started = std::time::Instant::now();
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
        .instrument(attempt.span().clone());
        // A whole answer's "first delta" is the whole answer: only the
        // deadline and the read timeout bound it.
        let first_token =
            if target.provider.answers_whole(request) { MAX_WHOLE_ANSWER } else { target.first_token };
        match tokio::time::timeout(first_token, opened).await {
            Ok(Ok((first, stream))) => {
                attempt.first_token(started.elapsed(), &first);
                Ok(Routed {
                    provider: target.provider_name.clone(),
                    model: first.model.as_deref().map(Arc::from).unwrap_or_else(|| target.model.clone()),
                    stream: RoutedStream::new(first, stream, attempt),
                })
            }
            Ok(Err(e)) => {
                let failure = Failure::from(&e);
                attempt.fail(&failure, Some(&e));
                Err(failure)
            }
            Err(_) => {
                let failure = Failure::first_token_timeout(target.first_token);
                attempt.fail(&failure, None);
                Err(failure)
            }
        }
    }

    /// Picks the next try: the first target in the plan's order with tries
    /// left that is not already running, whose circuit and cool-down let it
    /// through and that admission accepts. `hedge`: a second try beside a
    /// running one, which never waits (no backoff, no queue).
    async fn next<'a>(
        &'a self,
        route: &'a Route,
        plan: &mut Plan,
        call: &CallParts<'a>,
        gate: &mut dyn Gate,
        hedge: bool,
    ) -> Result<Option<(usize, AttemptFuture<'a>)>, RouteError> {
        let CallParts { request, trace, deadline } = *call;
        for pos in 0..plan.order.len() {
            let i = plan.order[pos];
            if plan.left[i] == 0 || plan.in_flight[i] {
                continue;
            }
            let target = &route.targets[i];
            let backoff = match plan.failed[i] {
                0 => Duration::ZERO,
                n => strategy::backoff(n, target.retry.initial_backoff, target.retry.max_backoff),
            };
            if hedge && (!backoff.is_zero() || !gate.has_capacity(&target.provider_name, &target.model)) {
                continue;
            }
            // A backoff that would end past the deadline is never started.
            if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                plan.left[i] = 0;
                continue;
            }
            let (admit, transition) = target.health.admit(Instant::now());
            if let Some(t) = transition {
                transitioned(&self.metrics, &target.provider_name, &target.model, t);
            }
            let probe = match admit {
                Admit::Yes => false,
                Admit::Probe => true,
                Admit::CircuitOpen(until) => {
                    plan.left[i] = 0;
                    plan.note_open(until);
                    continue;
                }
                Admit::CoolingDown(until) => {
                    plan.left[i] = 0;
                    plan.note_cooling(until);
                    continue;
                }
            };
            let reserved =
                gate.reserve(&target.provider_name, &target.model, deadline.map(Instant::into_std)).await;
            if let Err(refusal) = reserved {
                if probe {
                    target.health.probe_abandoned();
                }
                if refusal.scope == Scope::Key {
                    return Err(RouteError::Refused(refusal));
                }
                plan.left[i] = 0;
                plan.refused = Some(refusal);
                continue;
            }
            plan.left[i] -= 1;
            plan.in_flight[i] = true;
            plan.attempts += 1;
            if plan.failed[i] > 0 {
                self.metrics.routing.retry(&target.provider_name);
            }
            let fut = async move {
                let mut event = AttemptEvent::new(target, backoff, hedge);
                if !backoff.is_zero() {
                    tokio::time::sleep(backoff).await;
                }
                event.started = Instant::now();
                let result = self.attempt(target, request, trace, probe).await;
                event.outcome = match &result {
                    Ok(_) => "committed",
                    Err(f) => f.kind.label(),
                };
                (i, result)
            };
            return Ok(Some((i, Box::pin(fut))));
        }
        Ok(None)
    }

    /// Opens the call: tries targets (the strategy's order, retries with
    /// backoff, fallback, an optional hedge) until one yields its first
    /// delta. Dropping the returned future aborts every attempt under way.
    /// One call makes at most the sum of its targets' `retry.attempts`.
    pub async fn open(
        &self,
        model: &str,
        request: Arc<ChatRequest>,
        trace: &telemetry::TraceContext,
        deadline: Option<std::time::Instant>,
        gate: &mut dyn Gate,
    ) -> Result<Routed, RouteError> {
        let route = self.routes.get(model).ok_or_else(|| RouteError::UnknownModel(model.to_owned()))?;
        let deadline = deadline.map(Instant::from_std);
        let n = route.targets.len();
        let candidates: Vec<strategy::Candidate> = route
            .targets
            .iter()
            .map(|t| strategy::Candidate {
                weight: t.weight,
                in_flight: t.health.in_flight(),
                ttft_us: t.health.ttft_us(),
            })
            .collect();
        let mut order = strategy::order(route.strategy, &candidates);
        // Targets that can take the call now go first; the order among each
        // group stays the strategy's.
        let now = Instant::now();
        order.sort_by_key(|&i| {
            let t = &route.targets[i];
            !(t.health.available(now) && gate.has_capacity(&t.provider_name, &t.model))
        });
        let mut plan = Plan {
            order,
            left: route.targets.iter().map(|t| t.retry.attempts).collect(),
            failed: vec![0; n],
            in_flight: vec![false; n],
            attempts: 0,
            last: None,
            skipped_open: None,
            skipped_cooling: None,
            refused: None,
        };
        let parts = CallParts { request: &request, trace, deadline };
        let mut running: FuturesUnordered<AttemptFuture<'_>> = FuturesUnordered::new();
        let mut hedge_target = None;
        loop {
            if running.is_empty() {
                match self.next(route, &mut plan, &parts, gate, false).await? {
                    Some((_, f)) => running.push(f),
                    None => break,
                }
            }
            // A whole answer has no early first delta to race for.
            let armed = running.len() == 1
                && !plan
                    .in_flight
                    .iter()
                    .zip(&route.targets)
                    .any(|(busy, t)| *busy && t.provider.answers_whole(&request));
            let hedge = async {
                match route.hedge_after {
                    Some(after) if armed => tokio::time::sleep(after).await,
                    _ => std::future::pending().await,
                }
            };
            let done = tokio::select! {
                done = running.next() => done,
                () = hedge => {
                    if let Some(f) = self.next(route, &mut plan, &parts, gate, true).await? {
                        self.metrics.routing.hedge(model, "started");
                        hedge_target = Some(f.0);
                        running.push(f.1);
                    }
                    continue;
                }
            };
            let Some((i, result)) = done else { continue };
            plan.in_flight[i] = false;
            let target = &route.targets[i];
            match result {
                Ok(routed) => {
                    if hedge_target == Some(i) {
                        self.metrics.routing.hedge(model, "won");
                    }
                    // The losers are dropped (aborted) with `running`.
                    for (j, busy) in plan.in_flight.iter().enumerate() {
                        if *busy {
                            let t = &route.targets[j];
                            gate.release(&t.provider_name, &t.model);
                        }
                    }
                    return Ok(routed);
                }
                Err(failure) => {
                    gate.release(&target.provider_name, &target.model);
                    let kind = failure.kind;
                    if kind == FailureKind::RateLimited {
                        let wait = failure.retry_after.unwrap_or(DEFAULT_COOL_DOWN);
                        target.health.cool_down(Instant::now() + wait);
                        self.metrics.routing.cool_down(&target.provider_name, &target.model);
                    }
                    if kind.retryable() {
                        plan.failed[i] += 1;
                    } else {
                        plan.left[i] = 0;
                    }
                    plan.last = Some((i, failure));
                    if !kind.falls_back() {
                        break;
                    }
                }
            }
        }
        Err(self.exhausted(route, plan))
    }

    /// Why nothing could be opened, from what the plan saw.
    fn exhausted(&self, route: &Route, plan: Plan) -> RouteError {
        let until = |at: Option<Instant>| at.map(|a| a.saturating_duration_since(Instant::now()));
        if let Some((i, failure)) = plan.last {
            let t = &route.targets[i];
            return RouteError::Failed {
                attempts: plan.attempts,
                provider: t.provider_name.clone(),
                model: t.model.clone(),
                failure,
            };
        }
        if let Some(refusal) = plan.refused {
            return RouteError::Refused(refusal);
        }
        match (plan.skipped_open, plan.skipped_cooling) {
            (Some(open), None) => RouteError::CircuitOpen { retry_after: until(open) },
            (open, cooling) => {
                let at = match (open.flatten(), cooling) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                RouteError::CoolingDown { retry_after: until(at) }
            }
        }
    }
}
