//! The local backend: every subject's window, calls in flight and budget in
//! this process, checked and reserved all or nothing under one lock (held
//! for a few hundred nanoseconds, never across an await). It is the whole
//! story without Redis; with Redis it stands in while Redis is unreachable
//! (`failure_mode: open`), each limit then divided by `redis.replicas`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use super::{
    budget::Spent,
    plan::{BudgetOp, BudgetState, Denial, Granted, Op, Subject},
    window::{Clock, Window},
};

#[derive(Debug, Default)]
struct SubjectState {
    window: Window,
    in_flight: u32,
    spent: Spent,
}

#[derive(Debug)]
pub struct Local {
    /// Each limit is divided by this (rounded up): 1 without Redis.
    share: u64,
    clock: Clock,
    state: Mutex<HashMap<Arc<str>, SubjectState>>,
}

fn scaled(limit: u64, share: u64) -> u64 {
    limit.div_ceil(share.max(1))
}

impl Local {
    pub fn new(share: u32, clock: Clock) -> Self {
        Self { share: u64::from(share.max(1)), clock, state: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, SubjectState>> {
        // A panic elsewhere never leaves the counters half-updated (every
        // update is one statement), so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `op`: releases, then the charges if they all fit.
    pub fn run(&self, op: &Op) -> Result<Granted, Denial> {
        let now = self.clock.now();
        let now_sec = now.as_secs();
        let mut state = self.lock();
        for r in &op.releases {
            let s = state.entry(r.subject.id.clone()).or_default();
            if r.subject.limits.tpm.is_some() {
                s.window.refund(r.at_sec, now_sec, r.refund);
            }
            // A release's `requests` (a block's calls never taken) never
            // comes here: blocks are made in Redis only.
            if r.subject.has_lease() {
                s.in_flight = s.in_flight.saturating_sub(u32::try_from(r.leases).unwrap_or(u32::MAX));
            }
        }
        for (i, c) in op.charges.iter().enumerate() {
            let l = &c.subject.limits;
            let Some(s) = state.get(&c.subject.id) else { continue };
            if c.subject.has_rate() {
                let rpm = l.rpm.map(|v| scaled(v, self.share));
                let tpm = l.tpm.map(|v| scaled(v, self.share));
                s.window.check(now, rpm, tpm, c.tokens).map_err(|full| Denial::Window { charge: i, full })?;
            }
            if let Some(cc) = l.concurrency
                && u64::from(s.in_flight) >= scaled(u64::from(cc), self.share)
            {
                return Err(Denial::Concurrency { charge: i });
            }
        }
        // A subject seen for the first time is empty: only a charge alone
        // over its limit can fail there.
        for (i, c) in op.charges.iter().enumerate() {
            if state.contains_key(&c.subject.id) {
                continue;
            }
            if let Some(tpm) = c.subject.limits.tpm
                && c.tokens > scaled(tpm, self.share)
            {
                let full = super::window::Full {
                    limit: super::window::Exceeded::Tpm,
                    retry_after: None,
                    never: true,
                };
                return Err(Denial::Window { charge: i, full });
            }
        }
        let mut budget = None;
        match &op.budget {
            BudgetOp::None => {}
            BudgetOp::Charge { subject, tokens, nano_usd } => {
                if let Some(limits) = &subject.budget {
                    let s = state.entry(subject.id.clone()).or_default();
                    s.spent.roll(limits, now);
                    s.spent.check(limits, now, *tokens, *nano_usd).map_err(Denial::Budget)?;
                    s.spent.add(*tokens, *nano_usd);
                    budget = Some(budget_state(&s.spent));
                }
            }
            BudgetOp::Refund { subject, window, tokens, nano_usd } => {
                if let Some(limits) = &subject.budget {
                    let s = state.entry(subject.id.clone()).or_default();
                    s.spent.roll(limits, now);
                    s.spent.refund(*window, *tokens, *nano_usd);
                    budget = Some(budget_state(&s.spent));
                }
            }
        }
        for c in &op.charges {
            let s = state.entry(c.subject.id.clone()).or_default();
            if c.subject.has_rate() {
                s.window.add(now_sec, c.tokens);
            }
            if c.subject.has_lease() {
                s.in_flight += 1;
            }
        }
        Ok(Granted { at_sec: now_sec, budget })
    }

    /// Whether one request of `tokens` would fit every subject now, without
    /// reserving anything.
    pub fn fits(&self, subjects: &[Arc<Subject>], tokens: u64) -> bool {
        let now = self.clock.now();
        let state = self.lock();
        subjects.iter().all(|sub| {
            let Some(s) = state.get(&sub.id) else { return true };
            let l = &sub.limits;
            let rate_ok = !sub.has_rate()
                || s.window
                    .check(
                        now,
                        l.rpm.map(|v| scaled(v, self.share)),
                        l.tpm.map(|v| scaled(v, self.share)),
                        tokens,
                    )
                    .is_ok();
            let conc_ok =
                l.concurrency.is_none_or(|cc| u64::from(s.in_flight) < scaled(u64::from(cc), self.share));
            rate_ok && conc_ok
        })
    }

    /// Takes the budget figures Redis reported, so that a fallback to local
    /// limits starts from what was spent, not from zero.
    pub fn mirror_budget(&self, subject: &Subject, budget: BudgetState) {
        let mut state = self.lock();
        let s = state.entry(subject.id.clone()).or_default();
        s.spent = Spent { window: budget.window, tokens: budget.tokens, nano_usd: budget.nano_usd };
    }

    /// A key's budget as spent now.
    #[cfg(test)]
    pub fn budget(&self, subject: &Subject) -> Option<Spent> {
        let limits = subject.budget.as_ref()?;
        let mut state = self.lock();
        let s = state.entry(subject.id.clone()).or_default();
        s.spent.roll(limits, self.clock.now());
        Some(s.spent)
    }
}

fn budget_state(s: &Spent) -> BudgetState {
    BudgetState { window: s.window, tokens: s.tokens, nano_usd: s.nano_usd }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        admission::{
            Scope,
            budget::{BudgetLimits, Spending},
            plan::{Charge, RedisKeys, Release},
            window::Exceeded,
        },
        config::LimitsConfig,
    };

    fn subject(id: &str, limits: LimitsConfig, budget: Option<BudgetLimits>) -> Arc<Subject> {
        Arc::new(Subject {
            id: id.into(),
            scope: Scope::Target,
            name: id.into(),
            limits,
            budget,
            budget_window: String::new(),
            queues: Vec::new(),
            redis: RedisKeys::default(),
        })
    }

    fn charge(subjects: &[&Arc<Subject>], tokens: u64) -> Op {
        Op {
            charges: subjects.iter().map(|s| Charge { subject: (*s).clone(), tokens }).collect(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn all_or_nothing_across_subjects() {
        let local = Local::new(1, Clock::new());
        let key = subject("key:a", LimitsConfig { rpm: Some(10), ..Default::default() }, None);
        let target = subject("model:p/m", LimitsConfig { rpm: Some(1), ..Default::default() }, None);
        local.run(&charge(&[&key, &target], 0)).unwrap();
        let denied = local.run(&charge(&[&key, &target], 0)).unwrap_err();
        assert_eq!(denied.charge(), Some(1));
        // The refused step charged the key nothing: 9 more fit.
        for _ in 0..9 {
            local.run(&charge(&[&key], 0)).unwrap();
        }
        assert!(local.run(&charge(&[&key], 0)).is_err());
        // Over any 60 s: freed 61 s after the first second.
        tokio::time::advance(Duration::from_secs(61)).await;
        local.run(&charge(&[&key, &target], 0)).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_counts_calls_in_flight_and_releases_free_them() {
        let local = Local::new(1, Clock::new());
        let s = subject("provider:p", LimitsConfig { concurrency: Some(2), ..Default::default() }, None);
        let granted = local.run(&charge(&[&s], 0)).unwrap();
        local.run(&charge(&[&s], 0)).unwrap();
        assert_eq!(local.run(&charge(&[&s], 0)).unwrap_err(), Denial::Concurrency { charge: 0 });
        assert!(!local.fits(std::slice::from_ref(&s), 0));
        let release = Op {
            releases: vec![Release {
                subject: s.clone(),
                member: 1,
                at_sec: granted.at_sec,
                refund: 0,
                leases: 1,
                requests: 0,
            }],
            ..charge(&[&s], 0)
        };
        // Release and charge in one step: the freed slot is taken again.
        local.run(&release).unwrap();
        assert!(local.run(&charge(&[&s], 0)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_reserved_then_refunded() {
        let local = Local::new(1, Clock::new());
        let s = subject("model:p/m", LimitsConfig { tpm: Some(1_000), ..Default::default() }, None);
        let never = local.run(&charge(&[&s], 1_001)).unwrap_err();
        assert!(never.never());
        let g = local.run(&charge(&[&s], 800)).unwrap();
        let Denial::Window { full, .. } = local.run(&charge(&[&s], 300)).unwrap_err() else { panic!() };
        assert_eq!(full.limit, Exceeded::Tpm);
        // The call used 100 of its 800: 700 come back, and 300 fit.
        local
            .run(&Op {
                releases: vec![Release {
                    subject: s.clone(),
                    member: 1,
                    at_sec: g.at_sec,
                    refund: 700,
                    leases: 1,
                    requests: 0,
                }],
                ..Default::default()
            })
            .unwrap();
        local.run(&charge(&[&s], 300)).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn limits_are_split_between_replicas_when_asked() {
        let local = Local::new(3, Clock::new());
        let s = subject("key:a", LimitsConfig { rpm: Some(10), ..Default::default() }, None);
        for _ in 0..4 {
            local.run(&charge(&[&s], 0)).unwrap();
        }
        assert!(local.run(&charge(&[&s], 0)).is_err(), "10 / 3 replicas is 4 each");
    }

    #[tokio::test(start_paused = true)]
    async fn budgets_charge_refund_and_refuse() {
        let local = Local::new(1, Clock::new());
        let limits = BudgetLimits { tokens: Some(100), nano_usd: None, window_secs: 3_600 };
        let s = subject("key:a", LimitsConfig::default(), Some(limits));
        let op = |tokens| Op {
            budget: BudgetOp::Charge { subject: s.clone(), tokens, nano_usd: 0 },
            ..Default::default()
        };
        let g = local.run(&op(80)).unwrap();
        let b = g.budget.unwrap();
        let Denial::Budget(e) = local.run(&op(30)).unwrap_err() else { panic!() };
        assert_eq!(e.what, Spending::Tokens);
        assert!(e.retry_after.is_some());
        local
            .run(&Op {
                budget: BudgetOp::Refund { subject: s.clone(), window: b.window, tokens: 50, nano_usd: 0 },
                ..Default::default()
            })
            .unwrap();
        local.run(&op(30)).unwrap();
        assert_eq!(local.budget(&s).unwrap().tokens, 60);
    }
}
