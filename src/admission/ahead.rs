//! Admissions made in Redis ahead of the calls that use them, so that a
//! call under limits far from full waits for no round trip. Each pool is
//! one key (or none) and one target. It holds blocks: one ticket of the
//! script reserving up to `MAX_BLOCK` calls at once (a request, the tokens
//! and a lease each, on the key and on the target, and the budget), made by
//! the pool's keeper task with the steps of the moment. A call takes one
//! call of a block and settles it as if it had made it; the settles of one
//! block's calls merge into one release per step. The calls of a block not
//! taken within `MAX_AGE` are given back whole: their requests, tokens,
//! leases and budget.
//!
//! A pool holds at most a thousandth of any limit it charges, and only as
//! many calls as came in the last `SLOT`: under tight limits, at low rates,
//! with Redis down, or behind a queue, calls ask Redis themselves, and the
//! shared limits stay exact. What a block changes: its requests are counted
//! from the second it was made, up to `MAX_AGE` before their calls started,
//! so they may leave the 60 s window that much early.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{
    control::{Admission, TargetPlan},
    plan::{BudgetOp, Charge, Op, Release, Subject},
};

/// Most calls one pool holds.
const MAX_POOL: u64 = 256;
/// Most calls one block reserves.
const MAX_BLOCK: u64 = 32;
/// A pool holds at most this share of any limit (1 / N).
const SHARE_OF_LIMIT: u64 = 1000;
/// Fewer calls than this are not worth holding.
const MIN_POOL: u64 = 2;
/// How long a block's calls may wait to be taken.
const MAX_AGE: Duration = Duration::from_millis(250);
/// Demand is counted over slots this long.
const SLOT: Duration = MAX_AGE;
/// After a refusal or a Redis error, a pool asks again only this much later.
const PAUSE: Duration = Duration::from_secs(1);
/// A block's leases: its calls' deadlines are not known yet.
const LEASE: Duration = Duration::from_secs(3630);

/// One call of a block made ahead: what the call that takes it holds.
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    /// The block's member.
    pub member: u64,
    pub at_sec: u64,
    pub tokens: u64,
    pub nano_usd: i64,
    /// The budget window charged, when the key has a budget.
    pub window: Option<u64>,
}

/// A block: `left` calls still to take, of `tokens` and `nano_usd` each.
#[derive(Debug, Clone, Copy)]
struct Block {
    member: u64,
    at_sec: u64,
    left: u64,
    tokens: u64,
    nano_usd: i64,
    window: Option<u64>,
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
    /// What each call of a block reserves: the largest call seen.
    tokens: u64,
    nano_usd: i64,
    blocks: VecDeque<Block>,
    /// Calls held in `blocks`.
    held: u64,
    /// Calls asked for and not yet answered.
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
    fn new(tokens: u64, nano_usd: i64) -> Self {
        Self {
            tokens,
            nano_usd,
            blocks: VecDeque::new(),
            held: 0,
            asking: 0,
            keeper: false,
            closed: false,
            paused_until: None,
            slot_start: Instant::now(),
            this_slot: 0,
            last_slot: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        let since = now.saturating_duration_since(self.slot_start);
        if since >= SLOT {
            self.last_slot = if since < SLOT * 2 { self.this_slot } else { 0 };
            self.this_slot = 0;
            self.slot_start = now;
        }
    }

    /// Calls worth holding now: those of the last slot, within `cap`.
    fn target(&self, cap: u64) -> u64 {
        let want = self.last_slot.max(self.this_slot).min(cap);
        if want < MIN_POOL { 0 } else { want }
    }

    fn stale(&mut self, now: Instant) -> Vec<Block> {
        let mut out = Vec::new();
        while self.blocks.front().is_some_and(|b| now.saturating_duration_since(b.made) >= MAX_AGE) {
            out.extend(self.blocks.pop_front());
        }
        self.held = self.held.saturating_sub(out.iter().map(|b| b.left).sum());
        out
    }

    fn take_all(&mut self) -> Vec<Block> {
        self.held = 0;
        self.blocks.drain(..).collect()
    }

    /// One call of the oldest block.
    fn take_one(&mut self) -> Option<Grant> {
        let b = self.blocks.front_mut()?;
        b.left = b.left.saturating_sub(1);
        let grant = Grant {
            member: b.member,
            at_sec: b.at_sec,
            tokens: b.tokens,
            nano_usd: b.nano_usd,
            window: b.window,
        };
        if b.left == 0 {
            self.blocks.pop_front();
        }
        self.held = self.held.saturating_sub(1);
        Some(grant)
    }
}

/// Most calls a pool of `key` and `plan` may hold, of `tokens` and
/// `nano_usd` each.
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

    /// The ticket that reserves a block of `units` calls, each charged as
    /// a call's first step would be.
    fn charge(&self, member: u64, units: u64, tokens: u64, nano_usd: i64) -> Op {
        let tokens = tokens.saturating_mul(units);
        let nano_usd = nano_usd.saturating_mul(i64::try_from(units).unwrap_or(i64::MAX));
        let mut op = Op { member, lease: LEASE, units, ..Default::default() };
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

    /// The settle that gives a block's untaken calls back.
    fn give_back(&self, b: &Block) -> Op {
        let units = i64::try_from(b.left).unwrap_or(i64::MAX);
        let refund = i64::try_from(b.tokens).unwrap_or(i64::MAX).saturating_mul(units);
        let release = |subject: &Arc<Subject>| Release {
            subject: subject.clone(),
            member: b.member,
            at_sec: b.at_sec,
            refund,
            leases: b.left,
            requests: b.left,
        };
        let mut op = Op { member: b.member, ..Default::default() };
        if let Some(k) = &self.key {
            if k.has_rate() || k.has_lease() {
                op.releases.push(release(k));
            }
            if let Some(window) = b.window {
                let nano_usd = b.nano_usd.saturating_mul(units);
                op.budget = BudgetOp::Refund { subject: k.clone(), window, tokens: refund, nano_usd };
            }
        }
        op.releases.extend(self.plan.subjects.iter().map(release));
        op
    }
}

impl Ahead {
    /// A call of a block for a call's first reservation on `plan`, charging
    /// `key` too, when one is held; and, when calls come often enough, the
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
        let pool = lock(&self.pools)
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Pool {
                    key: key.cloned(),
                    plan: plan.clone(),
                    state: Mutex::new(State::new(tokens, nano_usd)),
                    wake: Notify::new(),
                })
            })
            .clone();
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
                // Blocks too small for this call: the pool grows to it.
                back.extend(s.take_all());
                s.tokens = s.tokens.max(tokens);
                s.nano_usd = s.nano_usd.max(nano_usd);
            }
            let grant = s.take_one();
            let target = s.target(pool.cap(s.tokens, s.nano_usd));
            let paused = s.paused_until.is_some_and(|p| now < p);
            // Refilled in bulk, when half is gone.
            let wake = target > 0 && !paused && s.held + s.asking <= target / 2;
            let start_keeper = wake && !std::mem::replace(&mut s.keeper, true);
            (grant, back, start_keeper, wake)
        };
        if grant.is_some() {
            admission.metrics.admission.held_ahead(-1);
        }
        give_back_all(admission, &pool, &back);
        if start_keeper {
            admission.spawn_tracked(keep(pool.clone(), Arc::downgrade(admission)));
        } else if wake {
            pool.wake.notify_one();
        }
        grant
    }

    /// Gives every block back and stops refilling (the gateway stops).
    pub fn close(&self, admission: &Admission) {
        let pools: Vec<_> = lock(&self.pools).values().cloned().collect();
        for pool in pools {
            let blocks = {
                let mut s = lock(&pool.state);
                s.closed = true;
                s.take_all()
            };
            gone(admission, &blocks);
            for b in &blocks {
                admission.queue_settle(pool.give_back(b));
            }
            pool.wake.notify_one();
        }
    }
}

/// Blocks leave the pool: the held gauge follows.
fn gone(admission: &Admission, blocks: &[Block]) {
    let units: u64 = blocks.iter().map(|b| b.left).sum();
    admission.metrics.admission.held_ahead(-i64::try_from(units).unwrap_or(0));
}

/// Gives stale or unwanted blocks back.
fn give_back_all(admission: &Arc<Admission>, pool: &Pool, blocks: &[Block]) {
    gone(admission, blocks);
    for b in blocks {
        admission.release_shared(pool.give_back(b), true);
    }
}

/// A pool's keeper: asks for blocks while calls come, gives back those
/// that waited too long, and ends once the pool is empty and idle. It holds
/// the admission only weakly between rounds, so a gateway that drops it
/// stops it.
async fn keep(pool: Arc<Pool>, owner: Weak<Admission>) {
    loop {
        let Some(admission) = owner.upgrade() else { return };
        let now = Instant::now();
        let (ask, back, next) = {
            let mut s = lock(&pool.state);
            s.roll(now);
            let back = s.stale(now);
            let paused = s.paused_until.is_some_and(|p| now < p);
            let target = if s.closed || paused { 0 } else { s.target(pool.cap(s.tokens, s.nano_usd)) };
            let n = target.saturating_sub(s.held + s.asking);
            if n == 0 && s.blocks.is_empty() && s.asking == 0 && (target == 0 || s.closed) {
                s.keeper = false;
                drop(s);
                give_back_all(&admission, &pool, &back);
                return;
            }
            s.asking += n;
            let next = s.blocks.front().map_or(now + SLOT, |b| b.made + MAX_AGE);
            (n, back, next)
        };
        give_back_all(&admission, &pool, &back);
        if ask > 0 {
            let (tokens, nano_usd) = {
                let s = lock(&pool.state);
                (s.tokens, s.nano_usd)
            };
            let sizes = (0..ask.div_ceil(MAX_BLOCK)).map(|i| (ask - i * MAX_BLOCK).min(MAX_BLOCK));
            let asks = sizes.map(|units| {
                let op = pool.charge(fastrand::u64(..), units, tokens, nano_usd);
                let member = op.member;
                let admission = &admission;
                async move { (member, units, admission.ask_ahead(op).await) }
            });
            // Aged from before the ask: Redis counted the requests at some
            // moment after this one.
            let made = Instant::now();
            let answers = futures_util::future::join_all(asks).await;
            let mut s = lock(&pool.state);
            for (member, units, verdict) in answers {
                s.asking = s.asking.saturating_sub(units);
                match verdict {
                    Ok(Ok(g)) => {
                        let block = Block {
                            member,
                            at_sec: g.at_sec,
                            left: units,
                            tokens,
                            nano_usd,
                            window: g.budget.map(|b| b.window),
                            made,
                        };
                        if s.closed || tokens != s.tokens || nano_usd != s.nano_usd {
                            admission.release_shared(pool.give_back(&block), true);
                        } else {
                            s.blocks.push_back(block);
                            s.held += units;
                            admission.metrics.admission.held_ahead(i64::try_from(units).unwrap_or(0));
                        }
                    }
                    // Limits near full, or Redis in trouble: calls ask
                    // for themselves for a while.
                    Ok(Err(_)) | Err(_) => s.paused_until = Some(Instant::now() + PAUSE),
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
