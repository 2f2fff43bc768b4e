//! The gateway-wide admission state, built once from the config: which
//! subjects (keys, provider accounts, upstream models) have limits, the
//! queue of each target, the prices, and the backends (local, and Redis
//! when configured). Calls get a [`Ticket`] from it.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::task::TaskTracker;

use super::{
    Refusal, RefusalReason, Scope,
    budget::BudgetLimits,
    limits::Local,
    plan::{BudgetOp, Denial, Granted, Op, RedisKeys, Subject},
    prices::Prices,
    queue::{TargetQueue, Waiting},
    redis::{Answer, SetupError, Shared},
    ticket::Ticket,
    window::Clock,
};
use crate::{
    config::{Config, FailureMode},
    telemetry::metrics::Metrics,
};

/// Most settles that may wait for Redis at once; past it a settle is
/// dropped (counted as a Redis error), and its reservations age out.
const MAX_PENDING_SETTLES: usize = 4096;
/// How long a settle waits for an admission step to ride on before it is
/// sent on its own. Under load an admission comes sooner, so a call costs
/// one round trip, not two; meanwhile its reservations still count (for at
/// most this long).
const RIDE_FOR: Duration = Duration::from_millis(2);
/// Most settles one step carries (the script's size stays bounded).
const MAX_CARRIED: usize = 32;

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
    shared: Option<Shared>,
    failure_mode: FailureMode,
    /// What local limits are divided by while Redis is unreachable.
    pub(super) share: u64,
    pub(super) max_wait: Duration,
    pub(super) waiting: Arc<Waiting>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) clock: Clock,
    settles: TaskTracker,
    /// Settles waiting for a step to ride on.
    pending: Pending,
}

/// Redis settles not sent yet, and whether a task is due to send them.
/// Whenever some wait, that task exists.
#[derive(Debug, Default)]
struct Pending {
    state: std::sync::Mutex<(Vec<Op>, bool)>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Op>, bool)> {
        // Every update is one statement: a poisoned lock is still good.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a settle: `Ok(true)` when a task must be started to send it,
    /// `Err` when too many wait.
    fn push(&self, op: Op) -> Result<bool, Op> {
        let mut state = self.lock();
        if state.0.len() >= MAX_PENDING_SETTLES {
            return Err(op);
        }
        state.0.push(op);
        Ok(!std::mem::replace(&mut state.1, true))
    }

    /// Up to `MAX_CARRIED` settles, oldest first; `due` (the sending task)
    /// also stands down when none are left.
    fn take(&self, due: bool) -> Vec<Op> {
        let mut state = self.lock();
        let n = state.0.len().min(MAX_CARRIED);
        let taken: Vec<Op> = state.0.drain(..n).collect();
        if due && state.0.is_empty() {
            state.1 = false;
        }
        taken
    }
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
        let shared = config.redis.as_ref().map(|r| Shared::new(r, metrics.clone())).transpose()?;
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
            shared,
            failure_mode: config.redis.as_ref().map(|r| r.failure_mode).unwrap_or_default(),
            share,
            max_wait: config.queue.max_wait,
            waiting: Arc::new(Waiting::new(config.queue.max_waiting, metrics.clone())),
            metrics,
            clock,
            settles: TaskTracker::new(),
            pending: Pending::default(),
        })
    }

    /// Connects to Redis, when there is one, so the first call does not pay for it.
    pub async fn connect(&self) {
        if let Some(shared) = &self.shared {
            shared.connect().await;
        }
    }

    /// Waits (at most `bound`) for settles still on their way to Redis.
    pub async fn drain(&self, bound: Duration) {
        self.settles.close();
        let _ = tokio::time::timeout(bound, self.settles.wait()).await;
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
        self.shared.as_ref().map(Shared::is_up)
    }

    /// The share the backend that decided divides limits by.
    pub(super) fn share_of(&self, at: Where) -> u64 {
        if at == Where::Local && self.shared.is_some() { self.share } else { 1 }
    }

    /// Runs an admission step where reservations live now: Redis when
    /// configured and reachable, with the settles waiting to be sent; else,
    /// with `failure_mode: open`, locally (the releases in `op` were
    /// Redis's and are left to age out there).
    pub(super) async fn admit(
        &self,
        mut op: Op,
        refuse: impl Fn() -> Refusal,
    ) -> Result<(Where, Result<Granted, Denial>), Refusal> {
        if let Some(shared) = &self.shared {
            let carried = self.pending.take(false);
            let answer = shared.run(&op, &carried).await;
            self.landed(&carried, answer.as_ref().ok());
            match answer {
                Ok(answer) => {
                    if let (Ok(g), BudgetOp::Charge { subject, .. }) = (&answer.decision, &op.budget)
                        && let Some(b) = g.budget
                    {
                        self.local.mirror_budget(subject, b);
                    }
                    return Ok((Where::Shared, answer.decision));
                }
                Err(_) if self.failure_mode == FailureMode::Closed => return Err(refuse()),
                Err(_) => {
                    self.metrics.admission.local_fallback();
                    op.releases.clear();
                }
            }
        }
        Ok((Where::Local, self.local.run(&op)))
    }

    /// After a step that carried settles: their refunds' figures mirrored
    /// and shown, and who waits for what they freed woken. A step that
    /// failed lost them; their reservations age out in Redis.
    fn landed(&self, carried: &[Op], answer: Option<&Answer>) {
        for (subject, b) in answer.map_or(&[][..], |a| &a.refunds[..]) {
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
    /// admission step, or is sent after `RIDE_FOR` with any others waiting.
    pub(super) fn release_shared(self: &Arc<Self>, op: Op) {
        if op.is_empty() || self.shared.is_none() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.metrics.admission.redis_error("settle_dropped");
            return;
        }
        match self.pending.push(op) {
            Err(_) => self.metrics.admission.redis_error("settle_dropped"),
            Ok(false) => {}
            Ok(true) => {
                let this = self.clone();
                self.settles.spawn(async move {
                    tokio::time::sleep(RIDE_FOR).await;
                    this.send_pending().await;
                });
            }
        }
    }

    /// Sends the settles no step took, `MAX_CARRIED` at a time.
    async fn send_pending(&self) {
        let Some(shared) = &self.shared else { return };
        loop {
            let ops = self.pending.take(true);
            if ops.is_empty() {
                return;
            }
            let answer = shared.run(&Op::default(), &ops).await;
            self.landed(&ops, answer.as_ref().ok());
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

/// Wakes the heads of the queues the released subjects limit.
fn wake(op: &Op) {
    for r in &op.releases {
        for q in &r.subject.queues {
            q.wake_head();
        }
    }
}
