//! The gateway-wide admission state, built once from the config: which
//! subjects (keys, provider accounts, upstream models) have limits, the
//! queue of each target, the prices, and the backends (local, and Redis
//! when configured). Calls get a [`Ticket`] from it.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::{
    Refusal, RefusalReason, Scope,
    ahead::{Ahead, Grant},
    batch::{self, Msg, Steps, Verdict},
    budget::BudgetLimits,
    limits::Local,
    plan::{BudgetOp, BudgetState, Denial, Granted, Op, RedisKeys, Subject},
    prices::Prices,
    queue::{TargetQueue, Waiting},
    redis::{SetupError, Shared, Unreachable},
    ticket::Ticket,
    window::Clock,
};
use crate::{
    config::{Config, FailureMode},
    telemetry::metrics::Metrics,
};

/// Room in the Redis task's inbox; a full one makes admissions wait (each
/// within its bound).
const INBOX: usize = 1024;

/// Where a reservation was made, so it is given back there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    Local,
    Shared,
}

/// One target: the subjects that limit it and its queue.
#[derive(Debug)]
pub struct TargetPlan {
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub subjects: Vec<Arc<Subject>>,
    pub queue: Arc<TargetQueue>,
    /// `max_tokens` reserved when the caller gives none.
    pub default_max_tokens: u32,
    /// Until when (ms on the admission clock) the last answer said the
    /// target is full: routing then prefers another.
    full_until_ms: AtomicU64,
}

impl TargetPlan {
    pub fn subject(&self) -> String {
        format!("target:{}/{}", self.provider, self.model)
    }

    pub fn mark_full(&self, clock: &Clock, for_: Duration) {
        let until = clock.now().saturating_add(for_).as_millis();
        self.full_until_ms.store(u64::try_from(until).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn marked_full(&self, clock: &Clock) -> bool {
        let now = u64::try_from(clock.now().as_millis()).unwrap_or(u64::MAX);
        now < self.full_until_ms.load(Ordering::Relaxed)
    }
}

pub struct Admission {
    keys: HashMap<String, Arc<Subject>>,
    targets: HashMap<String, HashMap<String, Arc<TargetPlan>>>,
    default_max_tokens: HashMap<String, u32>,
    pub(super) prices: Prices,
    pub(super) local: Local,
    /// Redis, when configured: its client and the steps in flight.
    steps: Option<Arc<Steps>>,
    failure_mode: FailureMode,
    /// What local limits are divided by while Redis is unreachable.
    pub(super) share: u64,
    pub(super) max_wait: Duration,
    pub(super) waiting: Arc<Waiting>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) clock: Clock,
    /// The task that sends every Redis step ([`batch`]), started on first use.
    batch: OnceLock<mpsc::Sender<Msg>>,
    /// Admissions made ahead of their calls (Redis only).
    ahead: Ahead,
    tasks: TaskTracker,
}

impl Admission {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Self, SetupError> {
        let prefix = config.redis.as_ref().map(|r| r.key_prefix.as_str()).unwrap_or("llmgw");
        let keys_for = |id: &str| RedisKeys::new(prefix, id);
        // Every target routing may try, once.
        let mut queues: HashMap<(String, String), Arc<TargetQueue>> = HashMap::new();
        for m in config.models.values() {
            for t in &m.targets {
                queues.entry((t.provider.clone(), t.model.clone())).or_default();
            }
        }
        let mut provider_subjects = HashMap::new();
        for (name, p) in &config.providers {
            if p.limits.is_empty() {
                continue;
            }
            let id = format!("provider:{name}");
            let subject = Subject {
                redis: keys_for(&id),
                id: id.into(),
                scope: Scope::Target,
                name: format!("provider {name}"),
                limits: p.limits,
                budget: None,
                budget_window: String::new(),
                queues: queues.iter().filter(|((pn, _), _)| pn == name).map(|(_, q)| q.clone()).collect(),
            };
            provider_subjects.insert(name.clone(), Arc::new(subject));
        }
        let mut targets: HashMap<String, HashMap<String, Arc<TargetPlan>>> = HashMap::new();
        for ((provider, model), queue) in &queues {
            let p = config.providers.get(provider);
            let mut subjects: Vec<Arc<Subject>> =
                provider_subjects.get(provider).cloned().into_iter().collect();
            if let Some(limits) = p.and_then(|p| p.model_limits.get(model))
                && !limits.is_empty()
            {
                let id = format!("model:{provider}/{model}");
                subjects.push(Arc::new(Subject {
                    redis: keys_for(&id),
                    id: id.into(),
                    scope: Scope::Target,
                    name: format!("model {model} at provider {provider}"),
                    limits: *limits,
                    budget: None,
                    budget_window: String::new(),
                    queues: vec![queue.clone()],
                }));
            }
            let plan = TargetPlan {
                provider: provider.as_str().into(),
                model: model.as_str().into(),
                subjects,
                queue: queue.clone(),
                default_max_tokens: p.map_or(0, |p| p.default_max_tokens),
                full_until_ms: AtomicU64::new(0),
            };
            targets.entry(provider.clone()).or_default().insert(model.clone(), Arc::new(plan));
        }
        let mut keys = HashMap::new();
        for k in &config.api_keys {
            if k.limits.is_empty() && k.budget.is_none() {
                continue;
            }
            let id = format!("key:{}", k.name);
            let subject = Subject {
                redis: keys_for(&id),
                id: id.into(),
                scope: Scope::Key,
                name: format!("key {}", k.name),
                limits: k.limits,
                budget: k.budget.as_ref().map(BudgetLimits::new),
                budget_window: k
                    .budget
                    .map(|b| humantime::format_duration(b.window).to_string())
                    .unwrap_or_default(),
                queues: Vec::new(),
            };
            keys.insert(k.name.clone(), Arc::new(subject));
        }
        let steps = config
            .redis
            .as_ref()
            .map(|r| Shared::new(r, metrics.clone()).map(|s| Arc::new(Steps::new(s))))
            .transpose()?;
        let share = config.redis.as_ref().map_or(1, |r| u64::from(r.replicas));
        let clock = Clock::new();
        Ok(Self {
            keys,
            targets,
            default_max_tokens: config
                .providers
                .iter()
                .map(|(n, p)| (n.clone(), p.default_max_tokens))
                .collect(),
            prices: Prices::new(&config.prices),
            local: Local::new(u32::try_from(share).unwrap_or(u32::MAX), clock),
            steps,
            failure_mode: config.redis.as_ref().map(|r| r.failure_mode).unwrap_or_default(),
            share,
            max_wait: config.queue.max_wait,
            waiting: Arc::new(Waiting::new(config.queue.max_waiting, metrics.clone())),
            metrics,
            clock,
            batch: OnceLock::new(),
            ahead: Ahead::default(),
            tasks: TaskTracker::new(),
        })
    }

    /// Connects to Redis, when there is one, so the first call does not pay for it.
    pub async fn connect(&self) {
        if let Some(steps) = &self.steps {
            steps.shared().connect().await;
        }
    }

    /// Waits (at most `bound`) for settles still on their way to Redis.
    pub async fn drain(&self, bound: Duration) {
        self.ahead.close(self);
        let Some(tx) = self.batch.get() else { return };
        let (done, sent) = oneshot::channel();
        let _ = tokio::time::timeout(bound, async {
            if tx.send(Msg::Drain(done)).await.is_ok() {
                let _ = sent.await;
            }
        })
        .await;
    }

    /// The Redis task's inbox, the task started on first use (in a
    /// runtime: without one, none).
    fn batch(self: &Arc<Self>) -> Option<&mpsc::Sender<Msg>> {
        let steps = self.steps.as_ref()?;
        if let Some(tx) = self.batch.get() {
            return Some(tx);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        // Each call in flight has at most one admission waiting here; a
        // settle sends a note only when it is the first settle waiting.
        let (tx, rx) = mpsc::channel(INBOX);
        // Two first calls at once: one inbox wins, the other's is dropped
        // before any task reads it.
        if self.batch.set(tx).is_ok() {
            self.tasks.spawn_on(batch::run(steps.clone(), Arc::downgrade(self), rx), &runtime);
        }
        self.batch.get()
    }

    /// One admission step in Redis, grouped with the others of the moment.
    async fn ask(self: &Arc<Self>, op: Arc<Op>, bound: Duration) -> Verdict {
        let stopped = || Err(Unreachable::Failed("the gateway's Redis task has stopped".into()));
        let Some(tx) = self.batch() else { return stopped() };
        let (reply, answer) = oneshot::channel();
        let asked = async {
            if tx.send(Msg::Admit { op, reply }).await.is_err() {
                return stopped();
            }
            answer.await.unwrap_or_else(|_| stopped())
        };
        tokio::time::timeout(bound, asked).await.unwrap_or(Err(Unreachable::Timeout(bound)))
    }

    /// An admission made ahead of its call ([`Ahead`]): through the task,
    /// so that a pool's grants share one step.
    pub(super) async fn ask_ahead(self: &Arc<Self>, op: Op) -> Verdict {
        let Some(steps) = &self.steps else {
            return Err(Unreachable::Failed("no Redis is configured".into()));
        };
        let bound = steps.shared().timeout() * 3;
        let op = Arc::new(op);
        let verdict = self.ask(op.clone(), bound).await;
        if let Ok(decision) = &verdict {
            self.mirror_charge(decision, &op);
        }
        verdict
    }

    /// A grant made ahead for a call's first reservation on `plan`, when
    /// Redis decides, answers, and nobody waits at the target.
    pub(super) fn take_ahead(
        self: &Arc<Self>,
        key: Option<&Arc<Subject>>,
        plan: &Arc<TargetPlan>,
        tokens: u64,
        nano_usd: i64,
    ) -> Option<Grant> {
        if self.shared_is_up() != Some(true) || !plan.queue.is_empty() || plan.marked_full(&self.clock) {
            return None;
        }
        self.ahead.take(self, key, plan, tokens, nano_usd)
    }

    /// Runs `task` on the gateway's runtime, tracked (none without one).
    pub(super) fn spawn_tracked(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tasks.spawn_on(task, &runtime);
        }
    }

    /// The admission of one call, by the caller's key (None: auth off or a
    /// key without limits) and its input estimate ([`super::estimate`]).
    pub fn ticket(self: &Arc<Self>, key: Option<&str>, input_tokens: u32, max_tokens: Option<u32>) -> Ticket {
        let key = key.and_then(|k| self.keys.get(k)).cloned();
        Ticket::new(self.clone(), key, input_tokens, max_tokens)
    }

    pub fn plan(&self, provider: &str, model: &str) -> Option<&Arc<TargetPlan>> {
        self.targets.get(provider)?.get(model)
    }

    pub fn default_max_tokens(&self, provider: &str) -> u32 {
        self.default_max_tokens.get(provider).copied().unwrap_or(0)
    }

    /// USD of a call's usage at a target's price (0 without one).
    pub fn cost_usd(&self, provider: &str, model: &str, input: u32, cached_input: u32, output: u32) -> f64 {
        self.prices.cost(provider, model, input, cached_input, output)
    }

    pub(super) fn shared_is_up(&self) -> Option<bool> {
        self.steps.as_deref().map(|s| s.shared().is_up())
    }

    /// The share the backend that decided divides limits by.
    pub(super) fn share_of(&self, at: Where) -> u64 {
        if at == Where::Local && self.steps.is_some() { self.share } else { 1 }
    }

    /// Runs an admission step where reservations live now: Redis when
    /// configured and reachable, with the settles waiting to be sent; else,
    /// with `failure_mode: open`, locally (the releases in `op` were
    /// Redis's and are left to age out there).
    pub(super) async fn admit(
        self: &Arc<Self>,
        op: Op,
        refuse: impl Fn() -> Refusal,
    ) -> Result<(Where, Result<Granted, Denial>), Refusal> {
        let Some(steps) = &self.steps else { return Ok((Where::Local, self.local.run(&op))) };
        // A step waits at most for the one in flight and its own, each
        // bounded by the Redis timeout; past that the task is stuck.
        let bound = steps.shared().timeout() * 3;
        let op = Arc::new(op);
        let verdict = match steps.try_now(&op, self).await {
            Some(verdict) => verdict,
            None => self.ask(op.clone(), bound).await,
        };
        match verdict {
            Ok(decision) => {
                self.mirror_charge(&decision, &op);
                Ok((Where::Shared, decision))
            }
            Err(_) if self.failure_mode == FailureMode::Closed => Err(refuse()),
            Err(_) => {
                self.metrics.admission.local_fallback();
                // The releases were Redis's: they age out there.
                let local = Op {
                    member: op.member,
                    lease: op.lease,
                    units: op.units,
                    releases: Vec::new(),
                    charges: op.charges.clone(),
                    budget: op.budget.clone(),
                };
                Ok((Where::Local, self.local.run(&local)))
            }
        }
    }

    /// A budget charge Redis granted, mirrored locally (what
    /// `failure_mode: open` starts from if Redis goes away).
    fn mirror_charge(&self, decision: &Result<Granted, Denial>, op: &Op) {
        if let (Ok(g), BudgetOp::Charge { subject, .. }) = (decision, &op.budget)
            && let Some(b) = g.budget
        {
            self.local.mirror_budget(subject, b);
        }
    }

    /// After a step that carried settles: their refunds' figures mirrored
    /// and shown, and who waits for what they freed woken. A step that
    /// failed lost them; their reservations age out in Redis.
    pub(super) fn landed(&self, carried: &[Op], refunds: &[(Arc<Subject>, BudgetState)]) {
        for (subject, b) in refunds {
            self.local.mirror_budget(subject, *b);
            self.budget_metric(subject, Some(*b));
        }
        for op in carried {
            wake(op);
        }
    }

    /// Gives back reservations made locally, and wakes who waits for them.
    pub(super) fn release_local(&self, op: &Op) {
        if op.is_empty() {
            return;
        }
        // A step of releases only cannot be refused.
        let granted = self.local.run(op);
        if let (Ok(g), BudgetOp::Refund { subject, .. }) = (granted, &op.budget) {
            self.budget_metric(subject, g.budget);
        }
        wake(op);
    }

    /// Gives back reservations made in Redis, in the background: the call
    /// that settles never waits for it. The settle rides on the next
    /// admission step, or is sent soon after with any others waiting
    /// (later when the call was admitted `ahead`: see [`batch`]).
    pub(super) fn release_shared(self: &Arc<Self>, op: Op, ahead: bool) {
        let Some(steps) = &self.steps else { return };
        if op.is_empty() {
            return;
        }
        match steps.push_settle(op, ahead) {
            Err(_) => self.metrics.admission.redis_error("settle_dropped"),
            // Due before the others: the task sends it unless a step takes
            // it first. Without a runtime (the gateway stopping) it waits
            // for the next step.
            Ok(true) => {
                if let Some(tx) = self.batch() {
                    // Full: notes already wait, and the task sets its
                    // timer from the settles waiting.
                    let _ = tx.try_send(Msg::SettleDue);
                }
            }
            Ok(false) => {}
        }
    }

    /// Queues a settle for the next step without telling the task: the
    /// drain that follows sends it.
    pub(super) fn queue_settle(&self, op: Op) {
        if let Some(steps) = &self.steps
            && !op.is_empty()
            && steps.push_settle(op, true).is_err()
        {
            self.metrics.admission.redis_error("settle_dropped");
        }
    }

    /// Sets the budget-left gauges of a key.
    pub(super) fn budget_metric(&self, subject: &Subject, budget: Option<super::plan::BudgetState>) {
        let (Some(limits), Some(b)) = (&subject.budget, budget) else { return };
        let spent = super::budget::Spent { window: b.window, tokens: b.tokens, nano_usd: b.nano_usd };
        let (tokens, usd) = spent.left(limits);
        let key = subject.id.strip_prefix("key:").unwrap_or(&subject.id);
        self.metrics.admission.budget_left(key, tokens, usd);
    }

    /// The refusal when the limiter cannot decide (`failure_mode: closed`).
    pub(super) fn unavailable(subject: String) -> Refusal {
        Refusal {
            reason: RefusalReason::LimiterUnavailable,
            scope: Scope::Key,
            subject,
            description: "limits are kept in Redis, which is unreachable (redis.failure_mode: closed)".into(),
            retry_after: None,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // A config reload drops the old admission once its last call ends:
        // the reservations held ahead go with its last settles, which the
        // Redis task sends once this admission's inbox is gone.
        self.ahead.close(self);
    }
}

/// Wakes the heads of the queues the released subjects limit.
fn wake(op: &Op) {
    for r in &op.releases {
        for q in &r.subject.queues {
            q.wake_head();
        }
    }
}
