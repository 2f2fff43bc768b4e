//! One call's admission, from after auth to its end: it implements
//! [`Gate`] for routing, and holds what the call reserved. The first
//! reservation charges the key and the first target in one step; a later
//! target is charged on its own (with what earlier targets gave back, in the
//! same step), never the key again. The call is settled exactly once: by
//! [`Ticket::settle`] when it ends, or when the ticket is dropped, with the
//! last figures it was told (the upstream's usage, else the input estimate
//! plus the output tokens streamed).

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::{
    Gate, Refusal, Scope,
    control::{Admission, TargetPlan, Where},
    plan::{BudgetOp, Charge, Op, Release, Subject},
    prices::nano_usd,
    queue::{Place, WaitSlot, expected_wait},
    refusal,
};
use crate::chat::Usage;

/// A reservation's lease when its call has no deadline, and the most any
/// lease lasts: past it, a call never settled (its replica died) stops
/// counting against concurrency.
const MAX_LEASE: Duration = Duration::from_secs(3600);
const LEASE_SLACK: Duration = Duration::from_secs(30);
/// How often the head of a queue asks again when the backend cannot say
/// when capacity comes back (a concurrency limit freed on another replica).
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct KeyHold {
    /// Whose reservation: the ticket's own, or a block made ahead.
    member: u64,
    at: Where,
    at_sec: u64,
    tokens: u64,
    nano_usd: i64,
    /// Whether the key's rate or concurrency was charged (not only a budget).
    charged: bool,
    /// The budget window the reservation went to.
    window: Option<u64>,
}

#[derive(Debug)]
struct TargetHold {
    member: u64,
    plan: Arc<TargetPlan>,
    at: Where,
    at_sec: u64,
    tokens: u64,
}

impl TargetHold {
    fn releases(&self, used: u64) -> impl Iterator<Item = Release> + '_ {
        let refund = i64::try_from(self.tokens).unwrap_or(i64::MAX) - i64::try_from(used).unwrap_or(i64::MAX);
        self.plan.subjects.iter().map(move |s| Release {
            subject: s.clone(),
            member: self.member,
            at_sec: self.at_sec,
            refund,
            leases: 1,
            requests: 0,
        })
    }
}

pub struct Ticket {
    admission: Arc<Admission>,
    /// The lease member in every concurrency set.
    id: u64,
    key: Option<Arc<Subject>>,
    input: u32,
    max_tokens: Option<u32>,
    key_hold: Option<KeyHold>,
    /// Targets charged and not released (two while a hedge races).
    targets: Vec<TargetHold>,
    /// Released targets whose reservation is in Redis: given back with the
    /// next step (the next reservation's round trip, or the settle).
    released: Vec<TargetHold>,
    /// The last target reserved: whose price the call pays.
    last: Option<(Arc<str>, Arc<str>)>,
    waited: Duration,
    usage: Option<Usage>,
    streamed: u32,
    settled: bool,
    admitted: bool,
    /// Admitted by a reservation made ahead: its settle may wait longer.
    ahead: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id)
            .field("key", &self.key.as_ref().map(|k| &k.id))
            .field("input", &self.input)
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    pub(super) fn new(
        admission: Arc<Admission>,
        key: Option<Arc<Subject>>,
        input: u32,
        max_tokens: Option<u32>,
    ) -> Self {
        Self {
            admission,
            id: fastrand::u64(..),
            key,
            input,
            max_tokens,
            key_hold: None,
            targets: Vec::new(),
            released: Vec::new(),
            last: None,
            waited: Duration::ZERO,
            usage: None,
            streamed: 0,
            settled: false,
            admitted: false,
            ahead: false,
        }
    }

    /// The input tokens estimated for the request.
    pub fn input_estimate(&self) -> u32 {
        self.input
    }

    /// Time spent in queues so far (for the call's span).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Output tokens streamed so far: what a call cut short is charged.
    pub fn note_streamed(&mut self, output_tokens: u32) {
        self.streamed = output_tokens;
    }

    /// The upstream's usage, once it has sent it.
    pub fn note_usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }

    /// USD of `usage` at the price of the target reserved last (0 without one).
    pub fn cost_usd(&self, usage: Usage, cached_input: u32) -> f64 {
        match &self.last {
            Some((p, m)) => {
                self.admission.cost_usd(p, m, usage.input_tokens, cached_input, usage.output_tokens)
            }
            None => 0.0,
        }
    }

    /// Settles the call with what it used: `usage` when the upstream sent
    /// one, else the input estimate plus `streamed_output_tokens`. The
    /// reservations' excess is given back (or the shortfall charged). Once:
    /// later calls, and the drop, do nothing.
    pub fn settle(&mut self, usage: Option<Usage>, streamed_output_tokens: u32) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let (input, output) = match usage {
            Some(u) => (u.input_tokens, u.output_tokens),
            None => (self.input, streamed_output_tokens),
        };
        let cached = usage.map_or(0, |u| u.cached_input_tokens);
        let used = u64::from(input) + u64::from(output);
        let mut local = Op { member: self.id, ..Default::default() };
        let mut shared = Op { member: self.id, ..Default::default() };
        for hold in self.released.drain(..) {
            shared.releases.extend(hold.releases(0));
        }
        for hold in self.targets.drain(..) {
            let op = if hold.at == Where::Local { &mut local } else { &mut shared };
            op.releases.extend(hold.releases(used));
        }
        if let (Some(k), Some(key)) = (self.key_hold.take(), &self.key) {
            let cost = self
                .cost_usd(Usage { input_tokens: input, output_tokens: output, ..Usage::default() }, cached);
            let refund =
                i64::try_from(k.tokens).unwrap_or(i64::MAX) - i64::try_from(used).unwrap_or(i64::MAX);
            let op = if k.at == Where::Local { &mut local } else { &mut shared };
            if k.charged {
                op.releases.push(Release {
                    subject: key.clone(),
                    member: k.member,
                    at_sec: k.at_sec,
                    refund,
                    leases: 1,
                    requests: 0,
                });
            }
            if let Some(window) = k.window {
                op.budget = BudgetOp::Refund {
                    subject: key.clone(),
                    window,
                    tokens: refund,
                    nano_usd: k.nano_usd - nano_usd(cost),
                };
            }
        }
        self.admission.release_local(&local);
        self.admission.release_shared(shared, self.ahead);
    }

    /// The lease of a reservation made now.
    fn lease(deadline: Option<Instant>) -> Duration {
        let left = deadline.map_or(MAX_LEASE, |d| d.saturating_duration_since(Instant::now()));
        left.min(MAX_LEASE) + LEASE_SLACK
    }

    fn output_reserve(&self, plan: Option<&TargetPlan>, provider: &str) -> u32 {
        self.max_tokens.unwrap_or_else(|| {
            plan.map_or_else(|| self.admission.default_max_tokens(provider), |p| p.default_max_tokens)
        })
    }

    /// Gives a released target's reservation back: at once when local; with
    /// the next step when it is in Redis.
    fn give_back(&mut self, hold: TargetHold) {
        if hold.plan.subjects.is_empty() {
            return;
        }
        match hold.at {
            Where::Local => {
                let op = Op { member: self.id, releases: hold.releases(0).collect(), ..Default::default() };
                self.admission.release_local(&op);
            }
            Where::Shared => self.released.push(hold),
        }
    }

    /// Sends pending Redis releases on their own (no step to ride on).
    fn flush_released(&mut self) {
        if self.released.is_empty() {
            return;
        }
        let mut op = Op { member: self.id, ..Default::default() };
        for hold in self.released.drain(..) {
            op.releases.extend(hold.releases(0));
        }
        self.admission.release_shared(op, false);
    }

    fn count_admitted(&mut self) {
        if !std::mem::replace(&mut self.admitted, true) {
            self.admission.metrics.admission.admitted();
        }
    }

    fn refused(&self, r: Refusal) -> Refusal {
        let scope = match r.scope {
            Scope::Key => "key",
            Scope::Target => "target",
        };
        self.admission.metrics.admission.refused(r.reason.as_str(), scope);
        r
    }

    async fn reserve_inner(
        &mut self,
        provider: &str,
        model: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), Refusal> {
        let admission = self.admission.clone();
        let plan = admission.plan(provider, model).cloned();
        if let Some(plan) = &plan {
            if self.targets.iter().any(|t| Arc::ptr_eq(&t.plan, plan)) {
                return Ok(());
            }
            self.last = Some((plan.provider.clone(), plan.model.clone()));
        } else {
            self.last = Some((provider.into(), model.into()));
        }
        let tokens = u64::from(self.input) + u64::from(self.output_reserve(plan.as_deref(), provider));
        let key = if self.key_hold.is_none() { self.key.clone() } else { None };
        let subjects: &[Arc<Subject>] = plan.as_ref().map_or(&[], |p| &p.subjects);
        if key.is_none() && subjects.is_empty() {
            self.flush_released();
            if let Some(plan) = plan {
                self.targets.push(TargetHold { member: self.id, plan, at: Where::Local, at_sec: 0, tokens });
            }
            self.count_admitted();
            return Ok(());
        }
        let deadline = deadline.map(Instant::from_std);
        let lease = Self::lease(deadline);
        let started = Instant::now();
        let max_wait_end = started + admission.max_wait;
        let wait_until = deadline.map_or(max_wait_end, |d| d.min(max_wait_end));
        let key_charged = key.as_ref().is_some_and(|k| k.has_rate() || k.has_lease());
        let key_charges = usize::from(key_charged);
        let nano = match (&key, admission.prices.get(provider, model)) {
            (Some(_), Some(price)) => {
                nano_usd(price.cost(self.input, 0, self.output_reserve(plan.as_deref(), provider)))
            }
            _ => 0,
        };
        // A call's first reservation, under limits far from full: one made
        // ahead in Redis, when the target's pool holds one (see `ahead`).
        if self.key_hold.is_none()
            && self.targets.is_empty()
            && self.released.is_empty()
            && let Some(plan) = &plan
            && let Some(g) = admission.take_ahead(key.as_ref(), plan, tokens, nano)
        {
            self.ahead = true;
            if key.is_some() {
                self.key_hold = Some(KeyHold {
                    member: g.member,
                    at: Where::Shared,
                    at_sec: g.at_sec,
                    tokens: g.tokens,
                    nano_usd: g.nano_usd,
                    charged: key_charged,
                    window: g.window,
                });
            }
            self.targets.push(TargetHold {
                member: g.member,
                plan: plan.clone(),
                at: Where::Shared,
                at_sec: g.at_sec,
                tokens: g.tokens,
            });
            admission.metrics.admission.admitted_ahead();
            self.count_admitted();
            return Ok(());
        }
        let limits: Vec<_> = subjects.iter().map(|s| &s.limits).collect();
        let mut place: Option<(Place, WaitSlot)> = None;
        let mut poll = POLL_MIN;
        let mut hint = None;

        // First come, first served: behind those already waiting here.
        if let Some(plan) = &plan
            && !subjects.is_empty()
            && !plan.queue.is_empty()
        {
            let Some(slot) = admission.waiting.enter() else {
                let d = "the wait queue is full (queue.max_waiting)".to_owned();
                return Err(self.refused(refusal::queue(plan, d, None)));
            };
            let (joined, ahead) = plan.queue.join(tokens);
            let decides = if admission.shared_is_up() == Some(false) { Where::Local } else { Where::Shared };
            let estimate = expected_wait(&limits, admission.share_of(decides), None, ahead);
            if started + estimate > wait_until {
                let d = format!(
                    "{} call(s) wait for target {}/{}; the wait (about {estimate:?}) would pass the call's deadline or queue.max_wait",
                    ahead.waiters, plan.provider, plan.model
                );
                // Leaves the queue (and its slot) at once.
                drop((joined, slot));
                return Err(self.refused(refusal::queue(plan, d, Some(estimate))));
            }
            place = Some((joined, slot));
        }
        let result = loop {
            if let (Some((p, _)), Some(plan)) = (&place, &plan)
                && !p.is_head()
            {
                tokio::select! {
                    _ = p.woken() => continue,
                    _ = tokio::time::sleep_until(wait_until) => {
                        let d = format!("no capacity at target {}/{} within queue.max_wait or the call's deadline", plan.provider, plan.model);
                        break Err(refusal::queue(plan, d, hint));
                    }
                }
            }
            let mut op = Op { member: self.id, lease, ..Default::default() };
            for hold in self.released.drain(..) {
                op.releases.extend(hold.releases(0));
            }
            if let Some(k) = &key {
                if key_charged {
                    op.charges.push(Charge { subject: k.clone(), tokens });
                }
                if k.budget.is_some() {
                    op.budget = BudgetOp::Charge { subject: k.clone(), tokens, nano_usd: nano };
                }
            }
            op.charges.extend(subjects.iter().map(|s| Charge { subject: s.clone(), tokens }));
            let unavailable_subject = match (&key, &plan) {
                (Some(k), _) => k.id.to_string(),
                (None, Some(p)) => p.subject(),
                (None, None) => format!("target:{provider}/{model}"),
            };
            let (at, decision) =
                match admission.admit(op, || Admission::unavailable(unavailable_subject.clone())).await {
                    Ok(d) => d,
                    Err(r) => break Err(r),
                };
            let denial = match decision {
                Ok(g) => {
                    if let Some(k) = &key {
                        self.key_hold = Some(KeyHold {
                            member: self.id,
                            at,
                            at_sec: g.at_sec,
                            tokens,
                            nano_usd: nano,
                            charged: key_charged,
                            window: g.budget.map(|b| b.window),
                        });
                        admission.budget_metric(k, g.budget);
                    }
                    if let Some(plan) = plan.clone() {
                        self.targets.push(TargetHold { member: self.id, plan, at, at_sec: g.at_sec, tokens });
                    }
                    break Ok(());
                }
                Err(d) => d,
            };
            // The key's own limit or budget: no queue, the call ends.
            let by_target =
                denial.charge().and_then(|c| c.checked_sub(key_charges)).and_then(|i| subjects.get(i));
            let (Some(subject), Some(plan)) = (by_target, &plan) else {
                let Some(k) = &key else {
                    break Err(Admission::unavailable(unavailable_subject));
                };
                break Err(refusal::denial(&denial, k, None, tokens, denial.retry_after()));
            };
            if denial.never() {
                break Err(refusal::denial(&denial, subject, Some(plan), tokens, None));
            }
            // The target is full: wait for it, if the wait can end in time.
            hint = denial.retry_after();
            let ahead = match &place {
                Some(_) => super::queue::Ahead::default(),
                None => {
                    let n = plan.queue.len() as u64;
                    super::queue::Ahead { waiters: n, tokens: n * tokens }
                }
            };
            let estimate = expected_wait(&limits, admission.share_of(at), hint, ahead);
            let now = Instant::now();
            plan.mark_full(&admission.clock, hint.unwrap_or(poll));
            if now + estimate > wait_until || now >= wait_until && place.is_none() {
                let retry = hint.map(|h| h.max(estimate));
                break Err(refusal::denial(&denial, subject, Some(plan), tokens, retry));
            }
            if place.is_none() {
                let Some(slot) = admission.waiting.enter() else {
                    break Err(refusal::queue(
                        plan,
                        "the wait queue is full (queue.max_waiting)".into(),
                        hint,
                    ));
                };
                place = Some((plan.queue.join(tokens).0, slot));
            }
            let next = now + hint.unwrap_or(poll).max(Duration::from_millis(1));
            poll = (poll * 2).min(POLL_MAX);
            if let Some((p, _)) = &place {
                tokio::select! {
                    _ = p.woken() => {}
                    _ = tokio::time::sleep_until(next.min(wait_until)) => {}
                }
            }
            if Instant::now() >= wait_until {
                let d = format!(
                    "no capacity at target {}/{} within queue.max_wait or the call's deadline",
                    plan.provider, plan.model
                );
                break Err(refusal::queue(plan, d, hint));
            }
        };
        if place.is_some() {
            let waited = started.elapsed();
            self.waited += waited;
            admission.metrics.admission.queue_wait(waited);
        }
        drop(place);
        match result {
            Ok(()) => {
                self.count_admitted();
                Ok(())
            }
            Err(r) => Err(self.refused(r)),
        }
    }
}

impl Gate for Ticket {
    fn has_capacity(&self, provider: &str, model: &str) -> bool {
        let Some(plan) = self.admission.plan(provider, model) else { return true };
        if plan.subjects.is_empty() {
            return true;
        }
        if !plan.queue.is_empty() || plan.marked_full(&self.admission.clock) {
            return false;
        }
        match self.admission.shared_is_up() {
            // Redis decides; the last refusal's hint is all we know here.
            Some(true) => true,
            _ => {
                let tokens = u64::from(self.input) + u64::from(self.output_reserve(Some(plan), provider));
                self.admission.local.fits(&plan.subjects, tokens)
            }
        }
    }

    fn reserve<'a>(
        &'a mut self,
        provider: &'a str,
        model: &'a str,
        deadline: Option<std::time::Instant>,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(self.reserve_inner(provider, model, deadline))
    }

    fn release(&mut self, provider: &str, model: &str) {
        let Some(i) =
            self.targets.iter().position(|t| &*t.plan.provider == provider && &*t.plan.model == model)
        else {
            return;
        };
        let hold = self.targets.remove(i);
        self.give_back(hold);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // However the call ended (finished, failed, cancelled, deadline):
        // settled once, with the last figures it was told.
        self.settle(self.usage, self.streamed);
    }
}
