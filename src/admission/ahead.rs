//! Admissions made in Redis ahead of the calls that use them, so that a
//! call under limits far from full waits for no round trip. Each pool is
//! one key (or none) and one target; a grant in it is an ordinary
//! reservation (its own member, the key's and the target's charges, the
//! budget), made by the pool's keeper task with the steps of the moment.
//! A call takes one and settles it as if it had made it; one not taken
//! within `MAX_AGE` is given back (its tokens, lease and budget; its
//! request stays counted, as a call that never came).
//!
//! A pool holds at most a thousandth of any limit it charges, and only as
//! many grants as calls came in the last `SLOT`: under tight limits, at low
//! rates, with Redis down, or behind a queue, calls ask Redis themselves,
//! and the shared limits stay exact. What a grant changes: its request is
//! counted from the second it was made, up to `MAX_AGE` before its call
//! started, so it may leave the 60 s window that much early.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{
    control::{Admission, TargetPlan},
    plan::{BudgetOp, Charge, Op, Release, Subject},
};

/// Most grants one pool holds.
const MAX_POOL: u64 = 64;
/// A pool holds at most this share of any limit (1 / N).
const SHARE_OF_LIMIT: u64 = 1000;
/// Fewer grants than this are not worth holding.
const MIN_POOL: u64 = 2;
/// How long a grant may wait for its call.
const MAX_AGE: Duration = Duration::from_millis(250);
/// Demand is counted over slots this long.
const SLOT: Duration = MAX_AGE;
/// After a refusal or a Redis error, a pool asks again only this much later.
const PAUSE: Duration = Duration::from_secs(1);
/// A grant's concurrency lease: its call's deadline is not known yet.
const LEASE: Duration = Duration::from_secs(3630);

/// A reservation made ahead: what a call that takes it holds.
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub member: u64,
    pub at_sec: u64,
    pub tokens: u64,
    pub nano_usd: i64,
    /// The budget window charged, when the key has a budget.
    pub window: Option<u64>,
    made: Instant,
}

/// The pools, by key and target.
#[derive(Default)]
pub struct Ahead {
    pools: Mutex<HashMap<(usize, usize), Arc<Pool>>>,
}

struct Pool {
    key: Option<Arc<Subject>>,
    plan: Arc<TargetPlan>,
    state: Mutex<State>,
    wake: Notify,
}

struct State {
    /// What each grant reserves: the largest call seen.
    tokens: u64,
    nano_usd: i64,
    grants: VecDeque<Grant>,
    /// Grants asked for and not yet answered.
    asking: u64,
    keeper: bool,
    closed: bool,
    paused_until: Option<Instant>,
    slot_start: Instant,
    this_slot: u64,
    last_slot: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a few plain stores: a poisoned lock is still good.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn roll(&mut self, now: Instant) {
        let since = now.saturating_duration_since(self.slot_start);
        if since >= SLOT {
            self.last_slot = if since < SLOT * 2 { self.this_slot } else { 0 };
            self.this_slot = 0;
            self.slot_start = now;
        }
    }

    /// Grants worth holding now: the calls of the last slot, within `cap`.
    fn target(&self, cap: u64) -> u64 {
        let want = self.last_slot.max(self.this_slot).min(cap);
        if want < MIN_POOL { 0 } else { want }
    }

    fn stale(&mut self, now: Instant) -> Vec<Grant> {
        let mut out = Vec::new();
        while self.grants.front().is_some_and(|g| now.saturating_duration_since(g.made) >= MAX_AGE) {
            out.extend(self.grants.pop_front());
        }
        out
    }
}

/// Most grants a pool of `key` and `plan` may hold for calls of `tokens`
/// and `nano_usd`.
fn cap(key: Option<&Arc<Subject>>, plan: &TargetPlan, tokens: u64, nano_usd: i64) -> u64 {
    let mut cap = MAX_POOL;
    let mut room = |limit: Option<u64>, each: u64| {
        if let Some(limit) = limit {
            cap = cap.min(limit / SHARE_OF_LIMIT / each.max(1));
        }
    };
    let charged = key.filter(|k| k.has_rate() || k.has_lease());
    for s in charged.into_iter().chain(&plan.subjects) {
        room(s.limits.rpm, 1);
        room(s.limits.tpm, tokens);
        room(s.limits.concurrency.map(u64::from), 1);
    }
    if let Some(b) = key.and_then(|k| k.budget.as_ref()) {
        room(b.tokens, tokens);
        if nano_usd > 0 {
            room(b.nano_usd.map(|n| u64::try_from(n).unwrap_or(0)), u64::try_from(nano_usd).unwrap_or(1));
        }
    }
    cap
}

impl Pool {
    fn cap(&self, tokens: u64, nano_usd: i64) -> u64 {
        cap(self.key.as_ref(), &self.plan, tokens, nano_usd)
    }

    /// The step that reserves one grant, as a call's first step would.
    fn charge(&self, member: u64, tokens: u64, nano_usd: i64) -> Op {
        let mut op = Op { member, lease: LEASE, ..Default::default() };
        if let Some(k) = &self.key {
            if k.has_rate() || k.has_lease() {
                op.charges.push(Charge { subject: k.clone(), tokens });
            }
            if k.budget.is_some() {
                op.budget = BudgetOp::Charge { subject: k.clone(), tokens, nano_usd };
            }
        }
        op.charges.extend(self.plan.subjects.iter().map(|s| Charge { subject: s.clone(), tokens }));
        op
    }

    /// The step that gives an untaken grant back, whole.
    fn give_back(&self, g: &Grant) -> Op {
        let refund = i64::try_from(g.tokens).unwrap_or(i64::MAX);
        let release = |subject: &Arc<Subject>| Release {
            subject: subject.clone(),
            member: g.member,
            at_sec: g.at_sec,
            refund,
        };
        let mut op = Op { member: g.member, ..Default::default() };
        if let Some(k) = &self.key {
            if k.has_rate() || k.has_lease() {
                op.releases.push(release(k));
            }
            if let Some(window) = g.window {
                op.budget =
                    BudgetOp::Refund { subject: k.clone(), window, tokens: refund, nano_usd: g.nano_usd };
            }
        }
        op.releases.extend(self.plan.subjects.iter().map(release));
        op
    }
}

impl Ahead {
    /// A grant for a call's first reservation on `plan`, charging `key`
    /// too, when one is held; and, when calls come often enough, the
    /// pool's keeper told to hold more.
    pub fn take(
        &self,
        admission: &Arc<Admission>,
        key: Option<&Arc<Subject>>,
        plan: &Arc<TargetPlan>,
        tokens: u64,
        nano_usd: i64,
    ) -> Option<Grant> {
        // Limits too tight for a pool: never one.
        if cap(key, plan, tokens, nano_usd) < MIN_POOL {
            return None;
        }
        let id = (key.map_or(0, |k| Arc::as_ptr(k) as usize), Arc::as_ptr(plan) as usize);
        let pool = {
            let mut pools = lock(&self.pools);
            pools
                .entry(id)
                .or_insert_with(|| {
                    Arc::new(Pool {
                        key: key.cloned(),
                        plan: plan.clone(),
                        state: Mutex::new(State {
                            tokens,
                            nano_usd,
                            grants: VecDeque::new(),
                            asking: 0,
                            keeper: false,
                            closed: false,
                            paused_until: None,
                            slot_start: Instant::now(),
                            this_slot: 0,
                            last_slot: 0,
                        }),
                        wake: Notify::new(),
                    })
                })
                .clone()
        };
        let now = Instant::now();
        let (grant, back, start_keeper, wake) = {
            let mut s = lock(&pool.state);
            if s.closed {
                return None;
            }
            s.roll(now);
            s.this_slot += 1;
            let mut back = s.stale(now);
            if tokens > s.tokens || nano_usd > s.nano_usd {
                // Grants too small for this call: the pool grows to it.
                back.extend(s.grants.drain(..));
                s.tokens = s.tokens.max(tokens);
                s.nano_usd = s.nano_usd.max(nano_usd);
            }
            let grant = s.grants.pop_front();
            let target = s.target(pool.cap(s.tokens, s.nano_usd));
            let held = s.grants.len() as u64 + s.asking;
            let paused = s.paused_until.is_some_and(|p| now < p);
            // Refilled in bulk, when half is gone.
            let wake = target > 0 && !paused && held <= target / 2;
            let start_keeper = wake && !std::mem::replace(&mut s.keeper, true);
            (grant, back, start_keeper, wake)
        };
        let gone = back.len() + usize::from(grant.is_some());
        admission.metrics.admission.held_ahead(-i64::try_from(gone).unwrap_or(0));
        for g in &back {
            admission.release_shared(pool.give_back(g), true);
        }
        if start_keeper {
            admission.spawn_tracked(keep(pool.clone(), Arc::downgrade(admission)));
        } else if wake {
            pool.wake.notify_one();
        }
        grant
    }

    /// Gives every grant back and stops refilling (the gateway stops).
    pub fn close(&self, admission: &Admission) {
        let pools: Vec<_> = lock(&self.pools).values().cloned().collect();
        for pool in pools {
            let grants: Vec<_> = {
                let mut s = lock(&pool.state);
                s.closed = true;
                s.grants.drain(..).collect()
            };
            admission.metrics.admission.held_ahead(-i64::try_from(grants.len()).unwrap_or(0));
            for g in &grants {
                admission.queue_settle(pool.give_back(g));
            }
            pool.wake.notify_one();
        }
    }
}

/// A pool's keeper: asks for grants while calls come, gives back those
/// that waited too long, and ends once the pool is empty and idle. It holds
/// the admission only weakly, so a gateway that drops it stops it.
async fn keep(pool: Arc<Pool>, owner: std::sync::Weak<Admission>) {
    loop {
        let Some(admission) = owner.upgrade() else { return };
        let now = Instant::now();
        let (ask, back, next) = {
            let mut s = lock(&pool.state);
            s.roll(now);
            let back = s.stale(now);
            let paused = s.paused_until.is_some_and(|p| now < p);
            let target = if s.closed || paused { 0 } else { s.target(pool.cap(s.tokens, s.nano_usd)) };
            let held = s.grants.len() as u64 + s.asking;
            let n = target.saturating_sub(held);
            if n == 0 && s.grants.is_empty() && s.asking == 0 && (target == 0 || s.closed) {
                s.keeper = false;
                drop(s);
                admission.metrics.admission.held_ahead(-i64::try_from(back.len()).unwrap_or(0));
                for g in &back {
                    admission.release_shared(pool.give_back(g), true);
                }
                return;
            }
            s.asking += n;
            let next = s.grants.front().map_or(now + SLOT, |g| g.made + MAX_AGE);
            (n.min(MAX_POOL), back, next)
        };
        admission.metrics.admission.held_ahead(-i64::try_from(back.len()).unwrap_or(0));
        for g in &back {
            admission.release_shared(pool.give_back(g), true);
        }
        if ask > 0 {
            let (tokens, nano_usd) = {
                let s = lock(&pool.state);
                (s.tokens, s.nano_usd)
            };
            let asks = (0..ask).map(|_| {
                let op = pool.charge(fastrand::u64(..), tokens, nano_usd);
                let member = op.member;
                let admission = &admission;
                async move { (member, admission.ask_ahead(op).await) }
            });
            let answers = futures_util::future::join_all(asks).await;
            let made = Instant::now();
            let mut s = lock(&pool.state);
            for (member, verdict) in answers {
                s.asking = s.asking.saturating_sub(1);
                match verdict {
                    Ok(Ok(g)) => {
                        let grant = Grant {
                            member,
                            at_sec: g.at_sec,
                            tokens,
                            nano_usd,
                            window: g.budget.map(|b| b.window),
                            made,
                        };
                        if s.closed || tokens != s.tokens || nano_usd != s.nano_usd {
                            admission.release_shared(pool.give_back(&grant), true);
                        } else {
                            s.grants.push_back(grant);
                            admission.metrics.admission.held_ahead(1);
                        }
                    }
                    // Limits near full, or Redis in trouble: calls ask
                    // for themselves for a while.
                    Ok(Err(_)) | Err(_) => s.paused_until = Some(made + PAUSE),
                }
            }
            continue;
        }
        drop(admission);
        tokio::select! {
            () = pool.wake.notified() => {}
            () = tokio::time::sleep_until(next) => {}
        }
    }
}
