//! Admission: whether a call may go ahead now, given the limits, queue and
//! budgets that apply to its key and to each target. It knows callers only as
//! key names and requests only as token estimates: nothing of gRPC, HTTP or
//! wire formats. Routing asks it, through [`Gate`], before every attempt.
//!
//! A call gets a [`Ticket`] from [`Admission`] after auth; the ticket is the
//! call's [`Gate`] and lives as long as the call. Files, one concern each:
//! `estimate` (tokens of a request), `window` (60 s sliding windows),
//! `limits` (the local backend), `queue` (FIFO waiters), `budget` (per-key
//! windows), `prices` (USD), `redis` (the shared backend and its script),
//! `batch` (Redis steps shared by the calls of a moment), `ahead`
//! (admissions made before their calls, under limits far from full),
//! `plan` (what a step asks of a backend), `control` (the gateway-wide
//! state), `ticket` (one call), `refusal` (what a refused call is told).

mod ahead;
mod batch;
mod budget;
mod control;
pub mod estimate;
mod limits;
mod plan;
pub mod prices;
mod queue;
mod redis;
mod refusal;
mod ticket;
mod window;

use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

pub use control::Admission;
pub use redis::SetupError;
pub use ticket::Ticket;

/// Why admission said no. The front door maps it to its protocol's
/// "resource exhausted" (or "unavailable" for [`RefusalReason::LimiterUnavailable`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{description}")]
pub struct Refusal {
    pub reason: RefusalReason,
    /// Whose limit: the caller's key (the call ends) or one target (routing
    /// tries the next).
    pub scope: Scope,
    /// `key:NAME` or `target:PROVIDER/MODEL` (google.rpc.QuotaFailure subject).
    pub subject: String,
    /// Names the limit, e.g. "rpm 60 of key team-a".
    pub description: String,
    /// When the limit would admit the call, where known.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    RateLimited,
    ConcurrencyLimited,
    QueueTimeout,
    BudgetExhausted,
    /// Shared state unreachable with `failure_mode: closed`.
    LimiterUnavailable,
}

impl RefusalReason {
    /// The `google.rpc.ErrorInfo` reason (CONTRACT.md section 9).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::RateLimited => "RATE_LIMITED",
            RefusalReason::ConcurrencyLimited => "CONCURRENCY_LIMITED",
            RefusalReason::QueueTimeout => "QUEUE_TIMEOUT",
            RefusalReason::BudgetExhausted => "BUDGET_EXHAUSTED",
            RefusalReason::LimiterUnavailable => "LIMITER_UNAVAILABLE",
        }
    }
}

/// What routing needs from admission for one call, attempt by attempt.
/// Implemented by the call's admission ticket; [`Open`] admits everything.
pub trait Gate: Send {
    /// Whether `provider`/`model` could take the call now, without waiting
    /// (routing prefers such targets).
    fn has_capacity(&self, provider: &str, model: &str) -> bool;

    /// Reserves the call's charge on this target before an attempt on it
    /// (and, the first time, on the caller's key), waiting in the queue at
    /// most `queue.max_wait` and never past `deadline`.
    fn reserve<'a>(
        &'a mut self,
        provider: &'a str,
        model: &'a str,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, Result<(), Refusal>>;

    /// The attempt on this target ended before the commit point (failed,
    /// lost a hedge race): its target charge is released. The key's stays.
    fn release(&mut self, provider: &str, model: &str);
}

/// No limits: every reservation succeeds at once.
pub struct Open;

impl Gate for Open {
    fn has_capacity(&self, _: &str, _: &str) -> bool {
        true
    }

    fn reserve<'a>(
        &'a mut self,
        _: &'a str,
        _: &'a str,
        _: Option<Instant>,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn release(&mut self, _: &str, _: &str) {}
}

#[cfg(test)]
#[path = "ticket_tests.rs"]
mod ticket_tests;
