//! What one admission step asks of a backend (local or Redis): the subjects
//! whose limits apply, what to reserve on each, what to give back. Both
//! backends take the same [`Op`] and answer the same way, all or nothing.

use std::{sync::Arc, time::Duration};

use super::{
    Scope,
    budget::{BudgetLimits, Exhausted},
    queue::TargetQueue,
    window::Full,
};
use crate::config::LimitsConfig;

/// Something with limits: a key, a provider account, or one upstream model.
#[derive(Debug)]
pub struct Subject {
    /// `key:NAME`, `provider:NAME` or `model:PROVIDER/MODEL`: unique, and
    /// the Redis key suffix.
    pub id: Arc<str>,
    pub scope: Scope,
    /// For refusals: "key team-a", "provider openai", "model gpt-4o at provider openai".
    pub name: String,
    pub limits: LimitsConfig,
    /// Keys only.
    pub budget: Option<BudgetLimits>,
    /// The budget's window as configured, for refusals ("30days").
    pub budget_window: String,
    /// The queues of the targets this subject limits, woken when it frees.
    pub queues: Vec<Arc<TargetQueue>>,
    pub redis: RedisKeys,
}

/// The Redis keys of a subject, all under one hash tag.
#[derive(Debug, Default)]
pub struct RedisKeys {
    /// Its window, its live leases (one hash: see `charge_v5.lua`).
    pub subject: String,
    pub budget: String,
}

impl RedisKeys {
    pub fn new(prefix: &str, id: &str) -> Self {
        Self { subject: format!("{{{prefix}}}:v3:s:{id}"), budget: format!("{{{prefix}}}:v3:budget:{id}") }
    }
}

impl Subject {
    pub fn has_rate(&self) -> bool {
        self.limits.rpm.is_some() || self.limits.tpm.is_some()
    }

    pub fn has_lease(&self) -> bool {
        self.limits.concurrency.is_some()
    }
}

/// A reservation on one subject: one request of `tokens`, and a lease when
/// the subject limits concurrency.
#[derive(Debug, Clone)]
pub struct Charge {
    pub subject: Arc<Subject>,
    pub tokens: u64,
}

/// Gives back a reservation made at `at_sec` by ticket `member`: `refund`
/// tokens (negative: charge more, the call used more than reserved) and
/// `leases` of its leases (1 for a call; a block's unused ones, and their
/// `requests`, when it is given back). The member is the release's own: settles of several
/// tickets may ride on one step, and the calls of one block share one.
#[derive(Debug, Clone)]
pub struct Release {
    pub subject: Arc<Subject>,
    pub member: u64,
    pub at_sec: u64,
    pub refund: i64,
    pub leases: u64,
    /// Requests taken off `at_sec`'s count: a block's calls never taken
    /// (0 for a call, which counts as a request however it ends).
    pub requests: u64,
}

#[derive(Debug, Clone, Default)]
pub enum BudgetOp {
    #[default]
    None,
    Charge {
        subject: Arc<Subject>,
        tokens: u64,
        nano_usd: i64,
    },
    Refund {
        subject: Arc<Subject>,
        window: u64,
        tokens: i64,
        nano_usd: i64,
    },
}

/// One step: releases first (always applied), then the charges and the
/// budget, all or none.
#[derive(Debug, Default)]
pub struct Op {
    /// The ticket's id: its lease in every concurrency set.
    pub member: u64,
    /// How long a lease counts if its call is never settled (a replica
    /// that died): the call's deadline, and some.
    pub lease: Duration,
    /// Calls reserved at once: 0 or 1 for a call, more for a block made
    /// ahead (Redis only). Each charge's `tokens` is the total.
    pub units: u64,
    pub releases: Vec<Release>,
    pub charges: Vec<Charge>,
    pub budget: BudgetOp,
}

impl Op {
    pub fn is_empty(&self) -> bool {
        self.releases.is_empty() && self.charges.is_empty() && matches!(self.budget, BudgetOp::None)
    }
}

/// The budget's figures after the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetState {
    pub window: u64,
    pub tokens: u64,
    pub nano_usd: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The second the charges were counted in (the backend's clock).
    pub at_sec: u64,
    pub budget: Option<BudgetState>,
}

/// Which charge refused, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Window { charge: usize, full: Full },
    Concurrency { charge: usize },
    Budget(Exhausted),
}

impl Denial {
    /// The charge that refused; `None` for the budget.
    pub fn charge(&self) -> Option<usize> {
        match self {
            Denial::Window { charge, .. } | Denial::Concurrency { charge } => Some(*charge),
            Denial::Budget(_) => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Denial::Window { full, .. } => full.retry_after,
            Denial::Concurrency { .. } => None,
            Denial::Budget(e) => e.retry_after,
        }
    }

    pub fn never(&self) -> bool {
        match self {
            Denial::Window { full, .. } => full.never,
            Denial::Concurrency { .. } => false,
            Denial::Budget(e) => e.never,
        }
    }
}
